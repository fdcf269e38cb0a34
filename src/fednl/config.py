"""Typed run configuration (``RunConfig``), TOML loading, ``--set`` overrides, presets and a TOML writer.

A run config is a TOML file (or a packaged preset, ``src/fednl/presets/<name>.toml``)::

    description = "one line shown by `fednl presets`"
    seed = 0
    rounds = 2
    [method]            # name + that strategy's own options (validated by its ``Options`` model)
    name = "fednl"
    scope = "rules"
    [model]   ...       # fednl.models.ModelConfig
    [memory]  ...       # fednl.models.MemoryConfig (Titans conversion)
    [lora]    ...       # fednl.models.LoraConfig
    [task]    ...       # fednl.data TaskConfig (discriminated by ``name``)
    [train]   ...       # TrainConfig
    [engine]  ...       # EngineConfig
    [screen]  ...       # fednl.engine.screening.ScreenConfig (optional norm check of client updates)
    [robust]  ...       # fednl.engine.robust.RobustConfig (median, trimmed mean, Krum, norm clipping)
    [dp]      ...       # fednl.engine.dp.DPConfig (client-level differential privacy)

``method`` may instead be an array of tables (``[[method]]``): the file then describes one run per method on
identical settings (a comparison, e.g. the ``quickstart`` preset). ``--set method=NAME`` keeps only that method.
On a single method, ``--set method=NAME`` and ``--set method.name=NAME`` switch the strategy and carry over only
the options the new one also has (``fraction_fit``), so a preset's ``scope`` does not follow FedNL to FedAvg.

Overrides are ``key.sub=value``; the value is parsed as a TOML literal (``3``, ``1e-4``, ``true``,
``["q_proj"]``, ``"text"``) and falls back to a plain string. Every error names the key path, e.g.
``train.lr: Input should be greater than 0``.
"""

from __future__ import annotations

import copy
import math
import tomllib
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, InstanceOf, ValidationError, model_serializer, model_validator

from fednl.data.build import TASK_NAMES, TaskConfig
from fednl.util.atomic import atomic_write_text
from fednl.engine.codecs import WireSpec
from fednl.engine.dp import DPConfig
from fednl.engine.guard import composition_errors
from fednl.engine.robust import RobustConfig
from fednl.engine.screening import ScreenConfig
from fednl.strategies.server_opt import SERVER_OPT_NAMES, ServerOptConfig
from fednl.models.config import LoraConfig, MemoryConfig, ModelConfig
from fednl.strategies import get_strategy

RESOLVED_NAME = "config.resolved.toml"


class ConfigError(ValueError):
    """A config problem; the message names the key path(s)."""


class _NestedError(ValueError):
    """Raised inside a validator to report errors at key paths below the validated field."""

    def __init__(self, errors: list[tuple[str, str]]):
        self.errors = errors
        super().__init__("; ".join(f"{loc}: {msg}" for loc, msg in errors))


# ---------------------------------------------------------------------------------------------- sections
class GroupOptimConfig(BaseModel):
    """Optimiser settings of one parameter group (``[train.groups.rule]``, ``.gate``, ``.lora`` ...); every unset
    field inherits the ``[train]`` value."""

    model_config = ConfigDict(extra="forbid")

    lr: float | None = Field(None, gt=0)
    weight_decay: float | None = Field(None, ge=0)
    warmup_steps: int | None = Field(None, ge=0)
    schedule: Literal["constant", "cosine", "linear"] | None = None


class TrainConfig(BaseModel):
    """Local training (Level 1). ``max_steps`` (if set) replaces ``epochs`` as the per-round budget.

    * ``objective``: ``"lm"`` (the paper's: next-token loss back-propagated through the memory trajectory),
      ``"attention_transfer"`` (LoLCATs stage 1: per converted layer, the MSE between the hybrid attention output
      and the frozen full-attention output on the same inputs, summed over layers; needs a converted model; the
      gradient reaches the memory's parameters and, if trainable, the LoRA adapters of q/k/v/o — the LoLCATs
      stage-1 recipe freezes LoRA, ``lora.trainable = false``), ``"mixed"`` (``lm + transfer_weight * attention_transfer``) or
      ``"two_stage"`` (attention transfer in rounds ``1 .. stage1_rounds``, then LM).
    * Learning-rate schedule over each client's cumulative local steps: linear warm-up for ``warmup_steps``, then
      ``constant``, or ``cosine`` / ``linear`` decay to ``min_lr_ratio * lr`` at ``decay_steps``.
    * ``groups``: per-group overrides (``lr``, ``weight_decay``, ``warmup_steps``, ``schedule``) for ``rule``,
      ``gate``, ``lora`` or any group the model has.
    * ``segment_len``: truncated BPTT: a sequence longer than ``segment_len`` is fed in consecutive segments; the
      memory state (and the window cache) is carried from segment to segment and detached at each boundary, so a
      client learns from documents longer than one forward pass in bounded memory. ``None`` = one pass.
    """

    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(1, ge=1)
    max_steps: int | None = Field(None, ge=1)
    batch_size: int = Field(4, ge=1)
    seq_len: int = Field(256, ge=2)
    lr: float = Field(3e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, ge=0)  # max gradient norm; 0 disables clipping
    optimizer: Literal["adamw", "sgd"] = "adamw"
    momentum: float = Field(0.0, ge=0, lt=1)  # SGD only
    persist_optimizer: bool = False  # keep optimiser moments in each ClientState across rounds
    objective: Literal["lm", "attention_transfer", "mixed", "two_stage"] = "lm"
    transfer_weight: float = Field(1.0, gt=0)
    stage1_rounds: int = Field(1, ge=0)
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    decay_steps: int | None = Field(None, ge=1)
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    groups: dict[str, GroupOptimConfig] = Field(default_factory=dict)
    segment_len: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _finite(self) -> TrainConfig:
        for key in ("lr", "weight_decay", "grad_clip", "transfer_weight"):
            if not math.isfinite(getattr(self, key)):
                raise _NestedError([(key, "must be a finite number")])
        schedules = {self.schedule, *(g.schedule for g in self.groups.values() if g.schedule)}
        if schedules - {"constant"} and self.decay_steps is None:
            raise _NestedError([("decay_steps", "a cosine or linear schedule needs decay_steps (the step at which "
                                                "the learning rate reaches min_lr_ratio * lr)")])
        if self.segment_len is not None and self.objective != "lm":
            raise _NestedError([("segment_len", f"truncated BPTT trains the LM loss; objective {self.objective!r} "
                                                "compares full forwards (drop segment_len or use objective = 'lm')")])
        return self

    def group_settings(self, group: str) -> dict[str, Any]:
        """``lr``, ``weight_decay``, ``warmup_steps``, ``schedule`` in force for ``group``."""
        own = self.groups.get(group, GroupOptimConfig())
        return {
            key: getattr(self, key) if getattr(own, key) is None else getattr(own, key)
            for key in ("lr", "weight_decay", "warmup_steps", "schedule")
        }

    def objective_at(self, rnd: int) -> str:
        """The objective of round ``rnd`` (``two_stage`` resolves to ``attention_transfer`` or ``lm``)."""
        if self.objective == "two_stage":
            return "attention_transfer" if rnd <= self.stage1_rounds else "lm"
        return self.objective


class FlowerResources(BaseModel):
    """``[flower]``: Ray resources of ``fednl flower simulate``: per ClientApp (``num_cpus``/``num_gpus``,
    fractions allowed) and for the whole Ray instance (``ray_num_cpus``/``ray_num_gpus``, default: what the
    machine has)."""

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


class EngineConfig(BaseModel):
    """The simulator. ``eval_every=0`` evaluates only after the last round (which is always evaluated).

    ``wire_up`` / ``wire_down`` pick a codec per direction (:class:`fednl.engine.codecs.WireSpec`: ``"fp16"``,
    ``"int8"``, ``"int8-row"``, ``"topk-0.01"`` ...); unset, a direction casts to ``wire_dtype``. ``max_bytes``
    ends the run cleanly after the last round that fits in that many bytes of traffic (both directions).

    Drop-outs and stragglers (docs/ROBUSTNESS.md): ``dropout`` is the fraction of each round's sampled clients that
    are offline for the round (``round(dropout × sampled)`` of them, drawn from a generator seeded by the run seed
    and the round, so a resume drops the same ones); ``deadline_s`` is how long a client may take to answer (a
    later answer is discarded and the client counts as dropped; on Flower it is the round timeout);
    ``min_clients`` is the fewest updates that must pass screening for a round to be aggregated (a round below it
    is skipped: the global state stays, the reason is recorded). Unset, they are off (``min_clients``: 1).
    """

    model_config = ConfigDict(extra="forbid")

    wire_dtype: Literal["fp32", "fp16", "bf16"] = "fp32"
    wire_up: WireSpec | None = None
    wire_down: WireSpec | None = None
    max_bytes: int | None = Field(None, ge=1)
    dropout: float | None = Field(None, ge=0, lt=1)  # fraction of the sampled clients offline each round
    deadline_s: float | None = Field(None, gt=0)  # a reply later than this is discarded (Flower: round timeout)
    min_clients: int | None = Field(None, ge=1)  # fewest accepted updates to aggregate a round (default 1)
    eval_every: int = Field(0, ge=0)
    eval_batch_size: int | None = Field(None, ge=1)  # default: train.batch_size
    eval_seq_len: int | None = Field(None, ge=2)  # default: train.seq_len (evaluate longer streams than you train on)
    device: str = "cpu"  # "cpu", "cuda", "cuda:N" or "auto"
    threads: int | None = Field(None, ge=1)  # torch intra-op threads (default: torch's choice)
    progress: bool = True  # progress bar over clients (only on a terminal)

    @model_validator(mode="after")
    def _device(self) -> EngineConfig:
        d = self.device
        if not (d in ("cpu", "cuda", "auto") or (d.startswith("cuda:") and d[5:].isdigit())):
            raise _NestedError([("device", f"expected 'cpu', 'cuda', 'cuda:N' or 'auto', got {d!r}")])
        return self


class MethodConfig(BaseModel):
    """``name`` of a registered strategy plus its options, validated by that strategy's ``Options`` model.

    In TOML the options sit next to ``name`` (``[method] name = "fednl"  scope = "rules"``).
    """

    model_config = ConfigDict(extra="forbid")

    name: str
    options: InstanceOf[BaseModel]

    @model_validator(mode="before")
    @classmethod
    def _split(cls, data: Any) -> Any:
        if isinstance(data, str):
            data = {"name": data}
        if not isinstance(data, dict):
            raise _NestedError([("", f"expected a table with a 'name', got {type(data).__name__}")])
        if isinstance(data.get("options"), BaseModel):
            return data
        flat = dict(data)
        name = flat.pop("name", None)
        if not isinstance(name, str):
            raise _NestedError([("name", "a method name is required (e.g. name = \"fednl\")")])
        try:
            strategy_cls = get_strategy(name)
        except ValueError as exc:
            raise _NestedError([("name", str(exc))]) from None
        try:
            options = strategy_cls.Options.model_validate(flat)
        except ValidationError as exc:
            takes = sorted(strategy_cls.Options.model_fields)
            raise _NestedError([(_loc(e["loc"]), e["msg"] + (f" (method {name!r} takes {takes})"
                                                          if e["type"] == "extra_forbidden" else ""))
                                for e in exc.errors()]) from None
        return {"name": name, "options": options}

    @model_serializer(mode="plain")
    def _flat(self) -> dict[str, Any]:
        return {"name": self.name, **self.options.model_dump(mode="json")}

    def strategy_class(self) -> type[Any]:
        """The registered :class:`~fednl.strategies.base.Strategy` subclass of ``name``."""
        return get_strategy(self.name)

    def model_spec(self) -> Any:
        """The :class:`~fednl.models.spec.ModelSpec` this method trains (kind + parameters from its options)."""
        return self.strategy_class().model_spec(self.options)

    def build(self, *, groups: Any) -> Any:
        """The strategy with these options on a model's parameter ``groups``."""
        return self.strategy_class()(self.options, groups=groups)


class RunConfig(BaseModel):
    """One federated run: seed, rounds, method, model (+ memory conversion + LoRA), task, training, engine."""

    model_config = ConfigDict(extra="forbid")

    description: str = ""
    seed: int = 0
    rounds: int = Field(2, ge=1)
    method: MethodConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    memory: MemoryConfig = Field(default_factory=MemoryConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    task: TaskConfig
    train: TrainConfig = Field(default_factory=TrainConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    flower: FlowerResources = Field(default_factory=FlowerResources)  # Ray resources of `fednl flower simulate`
    server_opt: ServerOptConfig | None = None  # outer optimiser on the aggregate (fednl.strategies.server_opt)
    screen: ScreenConfig | None = None  # update screening's norm check (the structural checks always run)
    robust: RobustConfig | None = None  # robust aggregation (fednl.engine.robust)
    dp: DPConfig | None = None  # client-level differential privacy (fednl.engine.dp)
    out: str | None = None  # output directory (the CLI's --out wins)

    @model_validator(mode="after")
    def _server_opt_fits_method(self) -> RunConfig:
        if self.server_opt is not None and not get_strategy(self.method.name).accepts_server_opt:
            raise _NestedError([("server_opt", f"method {self.method.name!r} makes its own server update; "
                                               "it takes no server optimiser (drop [server_opt])")])
        errors = composition_errors(get_strategy(self.method.name), screen=self.screen, robust=self.robust,
                                    dp=self.dp)
        if errors:
            raise _NestedError(errors)
        return self

    def strategy_options(self) -> BaseModel:
        return self.method.options

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (``None`` values dropped, as in the TOML file)."""
        return _drop_none(self.model_dump(mode="json"))


# ---------------------------------------------------------------------------------------------- errors
_UNION_TAGS = {("task", n) for n in TASK_NAMES} | {("server_opt", n) for n in SERVER_OPT_NAMES}


def _loc(loc: Sequence[Any]) -> str:
    parts: list[str] = []
    for p in loc:
        if isinstance(p, int):
            parts.append(f"[{p}]")
        elif p != "":
            parts.append(("." if parts else "") + str(p))
    return "".join(parts)


def _format_validation(exc: ValidationError, prefix: str = "") -> str:
    lines = []
    for e in exc.errors():
        raw = tuple(e["loc"])
        if len(raw) > 1 and (raw[0], raw[1]) in _UNION_TAGS:  # drop the union tag: task.niah7.x -> task.x
            raw = (raw[0], *raw[2:])
        loc = _loc(raw)
        err = (e.get("ctx") or {}).get("error")
        if isinstance(err, _NestedError):
            for sub, msg in err.errors:
                lines.append(f"{_join(prefix, _join(loc, sub))}: {msg}")
            continue
        msg = e["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        lines.append(f"{_join(prefix, loc) or '<config>'}: {msg}")
    return "\n".join(lines)


def _join(a: str, b: str) -> str:
    if not a:
        return b
    if not b:
        return a
    return a + b if b.startswith("[") else f"{a}.{b}"


def validate_config(data: dict[str, Any], *, source: str = "config", local_paths: bool = True) -> RunConfig:
    """Validate a plain dict into a :class:`RunConfig`; raises :class:`ConfigError` naming the bad keys.
    ``local_paths=False``: the task's data paths belong to another machine (a Flower ServerApp or SuperNode reads
    none of them), so they are not checked here."""
    if isinstance(data.get("method"), list):
        raise ConfigError(f"{source}: 'method' lists several methods; use load_runs() or --set method=NAME")
    try:
        return RunConfig.model_validate(data, context={"local_paths": local_paths})
    except ValidationError as exc:
        raise ConfigError(f"invalid config {source}:\n{_format_validation(exc)}") from None


# ---------------------------------------------------------------------------------------------- TOML in
def preset_names() -> list[str]:
    """Names of the packaged presets (``src/fednl/presets/*.toml``)."""
    root = resources.files("fednl.presets")
    return sorted(p.name[: -len(".toml")] for p in root.iterdir() if p.name.endswith(".toml"))


def preset_text(name: str) -> str:
    path = resources.files("fednl.presets") / f"{name}.toml"
    if not path.is_file():
        raise FileNotFoundError(f"no preset named {name!r}; presets: {', '.join(preset_names())}")
    return path.read_text(encoding="utf-8")


def list_presets() -> list[tuple[str, str]]:
    """``(name, description)`` of every preset."""
    out = []
    for name in preset_names():
        data = tomllib.loads(preset_text(name))
        out.append((name, str(data.get("description", "")).strip()))
    return out


def read_source(source: str) -> tuple[dict[str, Any], str]:
    """Parse a config file path or a preset name into a dict; returns ``(data, label)``."""
    path = Path(source).expanduser()
    if path.is_file():
        text, label = path.read_text(encoding="utf-8"), str(path)
    elif source in preset_names():
        text, label = preset_text(source), f"preset {source!r}"
    elif path.suffix == ".toml" or "/" in source:
        raise FileNotFoundError(f"config file not found: {source}")
    else:
        raise FileNotFoundError(
            f"{source!r} is neither a config file nor a preset; presets: {', '.join(preset_names())}"
        )
    try:
        return tomllib.loads(text), label
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{label}: invalid TOML ({exc})") from None


def parse_value(text: str) -> Any:
    """A TOML literal (``3``, ``1e-4``, ``true``, ``[1, 2]``, ``"x"``), else the raw string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _strategy_fields(name: Any) -> set[str]:
    try:
        return set(get_strategy(str(name)).Options.model_fields)
    except ValueError:
        return set()


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply one ``key.sub=value`` to ``data`` in place (see the module docstring)."""
    key, sep, raw = assignment.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {assignment!r}: expected key=value (e.g. train.lr=1e-4)")
    parts = key.split(".")
    if any(not p for p in parts):
        raise ConfigError(f"--set {assignment!r}: malformed key {key!r}")
    value = parse_value(raw.strip())
    if parts[0] == "method":
        _override_method(data, parts[1:], value, key)
        return
    node = data
    for i, p in enumerate(parts[:-1]):
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"--set {key}: {'.'.join(parts[: i + 1])} is a value, not a table")
        node = nxt
    node[parts[-1]] = value


def _override_method(data: dict[str, Any], rest: list[str], value: Any, key: str) -> None:
    method = data.get("method")
    if not rest or rest == ["name"]:  # method=NAME / method.name=NAME: pick or switch the strategy
        if not isinstance(value, str):
            raise ConfigError(f"--set {key}: expected a method name, got {value!r}")
        if isinstance(method, list):
            picked = [m for m in method if isinstance(m, dict) and m.get("name") == value]
            if not picked:
                names = [m.get("name") for m in method if isinstance(m, dict)]
                raise ConfigError(f"--set {key}={value}: this config runs {names}; pick one of them")
            data["method"] = picked[0]
        elif isinstance(method, dict) and method.get("name") != value:
            # switch strategy: keep only the options the new one also declares (e.g. fraction_fit)
            allowed = _strategy_fields(value)
            data["method"] = {"name": value, **{k: v for k, v in method.items() if k in allowed}}
        elif not isinstance(method, dict):
            data["method"] = {"name": value}
        return
    if len(rest) != 1:
        raise ConfigError(f"--set {key}: method options are flat (method.OPTION=value)")
    opt = rest[0]
    if isinstance(method, list):
        targets = [m for m in method if isinstance(m, dict) and opt in _strategy_fields(m.get("name"))]
        if not targets:
            raise ConfigError(f"--set {key}: no method of this config has an option {opt!r}")
        for m in targets:
            m[opt] = value
        return
    if method is None:
        method = data["method"] = {}
    if not isinstance(method, dict):
        raise ConfigError(f"--set {key}: method is not a table")
    method[opt] = value


def load_runs(source: str, overrides: Sequence[str] = (), *, local_paths: bool = True) -> list[RunConfig]:
    """Load a config file or preset, apply ``--set`` overrides and validate: one RunConfig per method
    (``local_paths``: see :func:`validate_config`)."""
    data, label = read_source(source)
    data = copy.deepcopy(data)
    for assignment in overrides:
        apply_override(data, assignment)
    methods = data.get("method")
    if isinstance(methods, list):
        if not methods:
            raise ConfigError(f"{label}: 'method' is an empty list")
        runs = []
        for i, m in enumerate(methods):
            one = {**data, "method": m}
            try:
                runs.append(RunConfig.model_validate(one, context={"local_paths": local_paths}))
            except ValidationError as exc:
                raise ConfigError(f"invalid config {label} (method [{i}]):\n{_format_validation(exc)}") from None
        return runs
    return [validate_config(data, source=label, local_paths=local_paths)]


def load_config(source: str, overrides: Sequence[str] = (), *, local_paths: bool = True) -> RunConfig:
    """Like :func:`load_runs` for a config that describes exactly one method."""
    runs = load_runs(source, overrides, local_paths=local_paths)
    if len(runs) != 1:
        names = [r.method.name for r in runs]
        raise ConfigError(f"{source}: describes {len(runs)} runs ({names}); pick one with --set method=NAME")
    return runs[0]


# ---------------------------------------------------------------------------------------------- TOML out
def _drop_none(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _drop_none(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, list):
        return [_drop_none(v) for v in obj]
    return obj


def _toml_key(k: str) -> str:
    return k if k and all(c.isalnum() or c in "-_" for c in k) else _toml_str(k)


def _toml_str(s: str) -> str:
    out = ['"']
    for ch in s:
        code = ord(ch)
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\u{code:04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        text = repr(v)
        return text if any(c in text for c in ".en") else text + ".0"
    if isinstance(v, str):
        return _toml_str(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"cannot write {type(v).__name__} as TOML")


def to_toml(data: dict[str, Any]) -> str:
    """Serialise nested dicts / lists / scalars as TOML (``None`` values are omitted)."""
    lines: list[str] = []
    _emit_table(_drop_none(data), [], lines)
    return "\n".join(lines).strip() + "\n"


def _is_table_array(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(x, dict) for x in v)


def _emit_table(table: dict[str, Any], path: list[str], lines: list[str]) -> None:
    scalars = {k: v for k, v in table.items() if not isinstance(v, dict) and not _is_table_array(v)}
    for k, v in scalars.items():
        lines.append(f"{_toml_key(k)} = {_toml_value(v)}")
    for k, v in table.items():
        if isinstance(v, dict):
            sub = [*path, k]
            lines.append("")
            lines.append("[" + ".".join(_toml_key(p) for p in sub) + "]")
            _emit_table(v, sub, lines)
        elif _is_table_array(v):
            sub = [*path, k]
            for item in v:
                lines.append("")
                lines.append("[[" + ".".join(_toml_key(p) for p in sub) + "]]")
                _emit_table(item, sub, lines)


def save_resolved(cfg: RunConfig | Sequence[RunConfig], out_dir: str | Path) -> Path:
    """Write ``out_dir/config.resolved.toml`` atomically (a list of runs becomes ``[[method]]`` tables)."""
    if isinstance(cfg, RunConfig):
        data = cfg.to_dict()
    else:
        runs = list(cfg)
        data = runs[0].to_dict()
        data["method"] = [r.to_dict()["method"] for r in runs]
    path = Path(out_dir) / RESOLVED_NAME
    atomic_write_text(path, to_toml(data))
    return path
