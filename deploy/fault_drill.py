#!/usr/bin/env python3
"""Fault drills on a real Flower deployment on loopback: kill a SuperNode, or the ServerApp, in the middle of a run.

    python deploy/fault_drill.py CONFIG OUT --kill-node 1 --after-round 1 [--set k=v ...]
    python deploy/fault_drill.py CONFIG OUT --kill-server-in-round 2 [--set k=v ...]

One SuperLink and one SuperNode per client of CONFIG (insecure, 127.0.0.1 only: the TLS and authentication set-up
is deploy/loopback_smoke.sh's), each node reading its own client folder (``fednl flower split-data``), then
``flwr run`` of fednl's app, once the SuperLink answers ``flwr ls`` (on a loaded machine it needs many seconds to
start serving, and a ``flwr run`` before that fails at once).

* ``--kill-node I --after-round R``: SuperNode ``I`` (its whole process group: the node and its ClientApp
  processes) is killed with SIGKILL as soon as round ``R``'s line is in metrics.jsonl, so it is gone for the rest
  of the run. Its reply never comes: the client counts as dropped when the round's deadline passes
  (``engine.deadline_s``, here ``--deadline`` seconds: ``deadline: ...``) or when the SuperLink, no longer
  receiving the node's heartbeats, answers for it (``node unavailable: ...``, about a minute after the kill),
  whichever comes first, and the run goes on to the end.
* ``--kill-server-in-round R``: the ServerApp process is killed with SIGKILL once the first reply of round ``R``
  is stored (the round's journal holds it), then the run is started again with ``resume = true``; it must reuse
  that reply and end where an uninterrupted run ends.

Writes ``OUT/drill.json`` (what was killed when, the rounds completed, each round's dropped clients with their
reasons, the flwr exit codes, timings) next to the run's own outputs in ``OUT/run`` and the deployment files in
``OUT/loopback`` (logs, node states, client folders). Every process it starts gets its own process group; all
are stopped (SIGTERM, then SIGKILL) when it ends, whatever happened. Exit status 1 when the run did not finish.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from fednl.util.procs import stop_groups

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Deployment:
    """The processes of one loopback deployment, each in its own process group."""

    def __init__(self, work: Path, env: dict[str, str]):
        self.work, self.env = work, env
        self.logs = work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, cmd: list[str]) -> subprocess.Popen[bytes]:
        log = open(self.logs / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        self.procs[name] = proc
        with open(self.work / "pgids", "a") as fh:
            fh.write(f"{proc.pid}\n")
        return proc

    def kill(self, name: str) -> None:
        """SIGKILL the process group of ``name`` (a crash: nothing of it runs a handler)."""
        try:
            os.killpg(self.procs[name].pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.procs[name].wait(timeout=30)

    def stop_all(self) -> None:
        stop_groups(p.pid for p in self.procs.values())


def children(pid: int) -> list[int]:
    """Every descendant of ``pid`` (from /proc)."""
    kids: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        kids.setdefault(int(fields[1]), []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for k in kids.get(todo.pop(), []):
            out.append(k)
            todo.append(k)
    return out


def serverapp_pids(superlink_pid: int) -> list[int]:
    """The ServerApp processes the SuperLink started (``flwr-serverapp``)."""
    out = []
    for pid in children(superlink_pid):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "flwr-serverapp" in cmd:
            out.append(pid)
    return out


def wait_for_superlink(port: int, proc: subprocess.Popen[bytes], env: dict[str, str], log: Path,
                       timeout: float) -> float:
    """Block until the SuperLink answers ``flwr ls`` (its HTTP port open and serving); return the seconds waited.

    ``flwr run`` started before that fails at once ("Connection to the SuperLink is unavailable"), and on a loaded
    machine the SuperLink takes many seconds to import and bind."""
    t0 = time.monotonic()
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"error: the SuperLink exited with {proc.returncode}:\n{tail(log)}")
        if time.monotonic() - t0 > timeout:
            raise SystemExit(f"error: the SuperLink did not answer on 127.0.0.1:{port} within {timeout:.0f} s:\n"
                             f"{tail(log)}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                pass
        except OSError:
            time.sleep(0.5)
            continue
        ls = subprocess.run([str(BIN / "flwr"), "ls", "drill"], env=env, capture_output=True, text=True)
        if ls.returncode == 0 and "unavailable" not in ls.stdout + ls.stderr:
            return time.monotonic() - t0
        time.sleep(0.5)


def tail(path: Path, n: int = 3000) -> str:
    return path.read_text(errors="replace")[-n:] if path.is_file() else f"({path.name}: no log)"


def round_lines(run: Path) -> list[dict[str, Any]]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("type") == "round":
            rows.append(rec)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config")
    ap.add_argument("out", type=Path)
    ap.add_argument("--set", dest="sets", action="append", default=[], help="fednl override key=value")
    ap.add_argument("--kill-node", type=int, help="partition id of the SuperNode to kill")
    ap.add_argument("--after-round", type=int, default=1, help="kill the node once this round is recorded")
    ap.add_argument("--kill-server-in-round", type=int, help="kill the ServerApp after a reply of this round")
    ap.add_argument("--deadline", type=float, default=300.0,
                    help="engine.deadline_s of the run (seconds; keep it well above an honest round)")
    ap.add_argument("--timeout", type=float, default=900.0, help="give up after this many seconds")
    args = ap.parse_args()
    if (args.kill_node is None) == (args.kill_server_in_round is None):
        ap.error("give exactly one of --kill-node and --kill-server-in-round")
    out = args.out.resolve()
    if out.exists() and any(out.iterdir()):
        sys.exit(f"error: {out} is not empty")
    work, run = out / "loopback", out / "run"
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "HF_HUB_OFFLINE": "1",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "FLWR_DISABLE_UPDATE_CHECK": "1",
           "FLWR_HOME": str(work / "flwr-home"), "OMP_NUM_THREADS": "1"}
    config = str(Path(args.config).resolve()) if Path(args.config).is_file() else args.config
    sets = [*args.sets, f"engine.deadline_s={args.deadline}"]
    set_args = [a for s in sets for a in ("--set", s)]
    fednl = str(BIN / "fednl")
    data = work / "data"
    split = subprocess.run([fednl, "flower", "split-data", config, "--out", str(data), *set_args], env=env,
                           capture_output=True, text=True)
    if split.returncode != 0:
        sys.exit(f"error: split-data failed:\n{split.stdout}{split.stderr}")
    n = len(split.stdout.splitlines())
    port = free_port()
    home = work / "flwr-home"
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(f'[superlink]\ndefault = "drill"\n\n[superlink.drill]\n'
                                      f'address = "127.0.0.1:{port}"\ninsecure = true\n')

    def run_config_file(resume: bool) -> Path:
        cmd = [fednl, "flower", "run-config", config, "--out", str(run), *set_args, *(["--resume"] if resume else [])]
        text = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
        path = work / ("resume.toml" if resume else "run.toml")
        path.write_text(text)
        return path

    record: dict[str, Any] = {"config": args.config, "sets": sets, "nodes": n, "events": []}
    dep = Deployment(work, env)
    t0 = time.monotonic()

    def event(what: str, **kw: Any) -> None:
        record["events"].append({"t_s": round(time.monotonic() - t0, 2), "event": what, **kw})
        print(f"[{time.monotonic() - t0:7.1f} s] {what} {kw if kw else ''}", flush=True)

    rc = 1
    try:
        link = dep.start("superlink", [str(BIN / "flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port",
                                       str(port), "--disable-runtime-dependency-installation"])
        for i in range(n):
            dep.start(f"supernode{i}", [str(BIN / "flower-supernode"), "--insecure", "--superlink",
                                        f"127.0.0.1:{port}", "--port", str(free_port()), "--node-config",
                                        f'partition-id={i} num-partitions={n} state-dir="{work}/node-state-{i}" '
                                        f'data-dir="{data}/partition-{i}"'])
        event("started", superlink=link.pid, supernodes=n)
        waited = wait_for_superlink(port, link, env, dep.logs / "superlink.log", timeout=min(180.0, args.timeout))
        event("SuperLink ready", waited_s=round(waited, 1))
        flwr = [str(BIN / "flwr"), "run", str(HERE), "drill", "--stream", "--run-config"]
        deadline = t0 + args.timeout
        first = dep.start("flwr-run", [*flwr, str(run_config_file(False))])
        killed_node = killed_server = False
        while first.poll() is None and time.monotonic() < deadline:
            rounds = round_lines(run)
            if args.kill_node is not None and not killed_node and any(r["round"] >= args.after_round for r in rounds):
                dep.kill(f"supernode{args.kill_node}")
                killed_node = True
                event("killed SuperNode", partition=args.kill_node, after_round=args.after_round)
            journal = run / "journal" / f"round-{args.kill_server_in_round or 0:04d}"
            if args.kill_server_in_round is not None and not killed_server and journal.is_dir() \
                    and any(journal.iterdir()):
                pids = serverapp_pids(link.pid)
                for pid in pids:
                    os.kill(pid, signal.SIGKILL)
                killed_server = bool(pids)
                if killed_server:
                    event("killed ServerApp", pids=pids, round=args.kill_server_in_round,
                          stored=sorted(p.stem for p in journal.iterdir()))
                    time.sleep(2.0)
                    break  # `flwr run --stream` of the dead ServerApp: stopped below
            time.sleep(0.2)
        if first.poll() is None:
            dep.kill("flwr-run")
        record["flwr_run_rc"] = first.returncode  # -9: stopped by the drill
        event("flwr run ended", rc=first.returncode)
        if args.kill_server_in_round is not None:
            if not killed_server:
                raise SystemExit("error: the ServerApp was never killed (did the run reach the round?)")
            again = dep.start("flwr-resume", [*flwr, str(run_config_file(True))])
            while again.poll() is None and time.monotonic() < deadline:
                time.sleep(0.5)
            if again.poll() is None:
                dep.kill("flwr-resume")
            record["flwr_resume_rc"] = again.returncode
            event("flwr run --resume ended", rc=again.returncode)
        rounds = round_lines(run)
        record["rounds_completed"] = len(rounds)
        record["dropped"] = {str(r["round"]): r.get("dropped_reason", {}) for r in rounds}
        record["finished"] = (run / "results.json").is_file()
        rc = 0 if record["finished"] else 1
        if rc:
            for name in ("flwr-run", "flwr-resume", "superlink"):
                if name in dep.procs:
                    print(f"--- tail of {name}.log ---\n{tail(dep.logs / f'{name}.log')}", flush=True)
    finally:
        dep.stop_all()
        record["wall_s"] = round(time.monotonic() - t0, 1)
        out.mkdir(parents=True, exist_ok=True)
        (out / "drill.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps({k: record[k] for k in ("rounds_completed", "dropped", "finished", "wall_s") if k in record}))
    return rc


if __name__ == "__main__":
    sys.exit(main())
