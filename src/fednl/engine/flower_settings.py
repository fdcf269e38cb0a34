"""Settings of a Flower run: where the fednl config is, the overrides, the output folder, Ray resources.

The fednl TOML config (the same file ``fednl run`` takes) stays the single description of the experiment. The
Flower run config (``deploy/pyproject.toml`` ``[tool.flwr.app.config]``, overridable with ``flwr run -c``) only
points at it and carries overrides — these keys, all strings/bools/numbers as Flower requires:

=================  ===================================================================================
``fednl-config``   path (on the SuperLink machine) of the fednl TOML, or a preset name
``fednl-set``      ``--set`` overrides separated by ``;`` (``"rounds=2; train.lr=1e-3"``)
``out-dir``        output folder of the ServerApp (metrics.jsonl, results.json, checkpoint/, flower.json)
``resume``         continue the run in ``out-dir`` from its last checkpoint
``state-dir``      where SuperNodes keep client state when their node config names no ``state-dir``
``wait-nodes-s``   how long the ServerApp waits for all SuperNodes to connect
``round-timeout-s`` how long one round may take before the run fails (0 = no limit)
=================  ===================================================================================

:class:`FlowerResources` are the per-client Ray resources of ``fednl flower simulate``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

RUN_CONFIG_KEYS = ("fednl-config", "fednl-set", "out-dir", "resume", "state-dir", "wait-nodes-s", "round-timeout-s")
_RUN_KEY_OF_FIELD = {"config": "fednl-config", "overrides": "fednl-set", "out": "out-dir", "resume": "resume",
                     "state_dir": "state-dir", "wait_nodes_s": "wait-nodes-s", "round_timeout_s": "round-timeout-s"}


class FlowerResources(BaseModel):
    """Ray resources of the simulation backend: per ClientApp (``num_cpus``/``num_gpus``, fractions allowed)
    and for the whole Ray instance (``ray_num_cpus``/``ray_num_gpus``, default: what the machine has)."""

    model_config = ConfigDict(extra="forbid")

    num_cpus: float = Field(1.0, gt=0)
    num_gpus: float = Field(0.0, ge=0)
    ray_num_cpus: int | None = Field(None, ge=1)
    ray_num_gpus: int | None = Field(None, ge=0)

    def backend_config(self) -> dict[str, Any]:
        """The ``backend_config`` of :func:`flwr.simulation.run_simulation`."""
        init: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True}
        if self.ray_num_cpus is not None:
            init["num_cpus"] = self.ray_num_cpus
        if self.ray_num_gpus is not None:
            init["num_gpus"] = self.ray_num_gpus
        return {"client_resources": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}, "init_args": init}


class AppSettings(BaseModel):
    """What the ServerApp needs to start (ClientApps get everything else in the messages)."""

    model_config = ConfigDict(extra="forbid")

    config: str = Field(min_length=1)
    overrides: list[str] = Field(default_factory=list)
    out: str = Field(min_length=1)
    resume: bool = False
    state_dir: str | None = None
    wait_nodes_s: float = Field(300.0, gt=0)
    round_timeout_s: float = Field(0.0, ge=0)

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> AppSettings:
        """Parse Flower's ``Context.run_config`` (keys :data:`RUN_CONFIG_KEYS`)."""
        unknown = sorted(set(run_config) - set(RUN_CONFIG_KEYS))
        if unknown:
            raise ValueError(f"Flower run config has unknown key(s) {unknown}; fednl reads {list(RUN_CONFIG_KEYS)}")
        config = str(run_config.get("fednl-config", "")).strip()
        out = str(run_config.get("out-dir", "")).strip()
        if not config:
            raise ValueError("Flower run config: 'fednl-config' is empty; pass -c \"fednl-config='path/to/run.toml'\"")
        if not out:
            raise ValueError("Flower run config: 'out-dir' is empty; pass -c \"out-dir='/path/to/out'\"")
        state_dir = str(run_config.get("state-dir", "")).strip() or None
        try:
            return cls(
                config=config,
                overrides=split_overrides(str(run_config.get("fednl-set", ""))),
                out=out,
                resume=bool(run_config.get("resume", False)),
                state_dir=state_dir,
                wait_nodes_s=float(run_config.get("wait-nodes-s", 300.0)),
                round_timeout_s=float(run_config.get("round-timeout-s", 0.0)),
            )
        except ValidationError as exc:
            err = exc.errors()[0]
            key = _RUN_KEY_OF_FIELD.get(str(err["loc"][0]), str(err["loc"][0]))
            raise ValueError(f"Flower run config: {key}: {err['msg']}") from None

    def to_run_config(self) -> dict[str, Any]:
        """The inverse of :meth:`from_run_config` (what ``flwr run -c`` gets)."""
        return {
            "fednl-config": self.config,
            "fednl-set": join_overrides(self.overrides),
            "out-dir": self.out,
            "resume": self.resume,
            "state-dir": self.state_dir or "",
            "wait-nodes-s": self.wait_nodes_s,
            "round-timeout-s": self.round_timeout_s,
        }


def split_overrides(text: str) -> list[str]:
    """``"a=1; b.c=x"`` -> ``["a=1", "b.c=x"]`` (empty items dropped)."""
    return [part.strip() for part in text.split(";") if part.strip()]


def join_overrides(overrides: Sequence[str]) -> str:
    for o in overrides:
        if ";" in o:
            raise ValueError(f"override {o!r} contains ';', which separates overrides in the Flower run config")
    return "; ".join(overrides)
