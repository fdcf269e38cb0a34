"""Rule files: the shared memory parameters of a converted model, portable on their own.

A *rule* is what FedNL's server aggregates — the parameters of groups ``rule`` (β / decay projections) and
``gate`` (Memory-as-Gate) of a Titans-converted model — together with everything needed to use it again:

* the :class:`MemoryConfig` that built those parameters (their names and shapes depend on it, and so does what
  they mean: ``rule``, ``mix``, ``write``, ``scale`` ...);
* the backbone identity: the model source string (``"smollm2"``, ``"tiny"``, ``"hf:<folder>"``) and the full
  :class:`ModelConfig` (the tiny model's dimensions and seed);
* free-form provenance (run directory name, rounds, seed, CE numbers ...), any JSON value.

Format: one ``.safetensors`` file; the tensors under their ``named_parameters()`` names, and one metadata entry
``"fednl_rule"`` holding JSON ``{"format": 1, "model_source", "model", "memory", "groups", "provenance"}``
(safetensors metadata is ``str -> str``). Files are written atomically.

Named rules are packaged files ``fednl/rules/<name>.safetensors`` (:func:`list_rules`); :func:`load_rule`
takes a name or a path. :func:`install_rule` copies a rule into a converted model after checking the backbone,
the memory design and every tensor name and shape. Fields of the memory config that only say how the model is
*run* (:data:`RUNTIME_FIELDS`: window, sinks, sparse cache, gate override, op mode and chunk size) may differ between the rule
and the model it is installed in; every other field must match.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from fednl.models.config import MemoryConfig, ModelConfig

FORMAT = 1
META_KEY = "fednl_rule"
SUFFIX = ".safetensors"
#: The parameter groups a rule carries (what FedNL shares under ``scope = "rules"``).
RULE_GROUPS: tuple[str, ...] = ("rule", "gate")
#: Memory-config fields that describe how the model is run, not what the rule's parameters mean.
RUNTIME_FIELDS: frozenset[str] = frozenset({"attn_window", "attn_sinks", "gate_override", "mode", "chunk_size",
                                            "init_rule", "cache", "cache_every", "cache_select"})
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class UnknownRule(FileNotFoundError):
    """No packaged rule has the given name."""


@dataclass
class Rule:
    """A loaded rule file (see the module docstring). ``origin`` is the name or path it was loaded from."""

    tensors: dict[str, torch.Tensor]
    memory_config: MemoryConfig
    model_source: str
    model_config: ModelConfig
    groups: dict[str, list[str]]
    provenance: dict[str, Any] = field(default_factory=dict)
    origin: str = ""

    @property
    def n_params(self) -> int:
        return sum(t.numel() for t in self.tensors.values())


def backbone_id(source: str) -> str:
    """What identifies a backbone across machines: the source, with an ``hf:`` folder reduced to its name."""
    if source.startswith("hf:"):
        return "hf:" + Path(source[3:].rstrip("/\\")).name
    return source


def rules_dir() -> Path:
    """The folder of packaged rules (``fednl/rules``; it may not exist when no rule is packaged)."""
    return Path(str(resources.files("fednl"))) / "rules"


def list_rules() -> list[str]:
    """Names of the packaged rules, sorted."""
    folder = rules_dir()
    if not folder.is_dir():
        return []
    return sorted(p.name[: -len(SUFFIX)] for p in folder.iterdir() if p.name.endswith(SUFFIX) and p.is_file())


def _is_path(name_or_path: str | os.PathLike[str]) -> bool:
    if isinstance(name_or_path, os.PathLike):
        return True
    s = str(name_or_path)
    return s.endswith(SUFFIX) or "/" in s or os.sep in s or Path(s).exists()


def resolve_rule(name_or_path: str | os.PathLike[str]) -> Path:
    """The file behind a rule name or path; ``FileNotFoundError`` naming the packaged rules if there is none."""
    if _is_path(name_or_path):
        path = Path(name_or_path)
        if not path.is_file():
            raise FileNotFoundError(f"rule file {path} does not exist")
        return path
    name = str(name_or_path)
    if not _NAME.match(name):
        raise ValueError(f"bad rule name {name!r}: give a packaged rule's name or a path to a {SUFFIX} file")
    path = rules_dir() / f"{name}{SUFFIX}"
    if not path.is_file():
        known = list_rules()
        listing = ", ".join(known) if known else "none yet"
        raise UnknownRule(f"no packaged rule named {name!r} exists (packaged rules: {listing}); give a path "
                                "to a rule file (`fednl rule export RUN_DIR --out FILE` writes one)")
    return path


# ---------------------------------------------------------------------------------------------- model side
def _memory_config(model: nn.Module) -> MemoryConfig:
    from fednl.models.titans import titans_layers

    cfg = getattr(model, "fednl_memory_config", None)
    if not titans_layers(model) or not isinstance(cfg, MemoryConfig):
        raise ValueError(f"{type(model).__name__} is not a converted (Titans) model: it has no memory rule")
    return cfg


def rule_names(model: nn.Module) -> dict[str, list[str]]:
    """Group -> sorted parameter names of the rule groups of a converted model."""
    from fednl.models.groups import param_groups

    _memory_config(model)
    groups = param_groups(model)
    return {g: sorted(groups.get(g, ())) for g in RULE_GROUPS}


def design_differences(a: MemoryConfig, b: MemoryConfig) -> list[str]:
    """``"field: a vs b"`` for every memory-config field outside :data:`RUNTIME_FIELDS` where ``a`` and ``b``
    differ."""
    da, db = a.model_dump(), b.model_dump()
    return [f"{k}: {da[k]!r} vs {db[k]!r}" for k in da if k not in RUNTIME_FIELDS and da[k] != db[k]]


def save_rule(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    model_source: str | None = None,
    provenance: dict[str, Any] | None = None,
) -> Path:
    """Write the rule of converted ``model`` to ``path`` (atomic). ``model_source`` defaults to the source of
    the model's :class:`ModelConfig` (recorded by :func:`fednl.models.build_model`); ``provenance`` is any
    JSON-able dict. Returns the path."""
    from fednl.util.atomic import atomic_write_bytes

    memory = _memory_config(model)
    model_cfg = getattr(model, "fednl_model_config", None)
    if model_source is None:
        if not isinstance(model_cfg, ModelConfig):
            raise ValueError("save_rule: give model_source (the model was not built by build_model)")
        model_source = model_cfg.source
    if not isinstance(model_cfg, ModelConfig) or backbone_id(model_cfg.source) != backbone_id(model_source):
        model_cfg = ModelConfig(source=model_source)
    names = rule_names(model)
    params = dict(model.named_parameters())
    tensors = {n: params[n].detach().to("cpu").contiguous().clone() for g in RULE_GROUPS for n in names[g]}
    if not tensors:
        raise ValueError("save_rule: the model's rule and gate groups are empty (are they frozen?)")
    meta = {"format": FORMAT, "model_source": model_source, "model": model_cfg.model_dump(mode="json"),
            "memory": memory.model_dump(mode="json"), "groups": names, "provenance": dict(provenance or {})}
    try:
        text = json.dumps(meta, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"save_rule: provenance must be JSON-able ({exc})") from None
    path = Path(path)
    atomic_write_bytes(path, st_save(tensors, metadata={META_KEY: text}))
    return path


# ---------------------------------------------------------------------------------------------- file side
def _header_metadata(data: bytes, where: str) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors blob (8-byte little-endian header length, then a JSON header)."""
    if len(data) < 8:
        raise ValueError(f"{where} is not a safetensors file ({len(data)} bytes)")
    n = int.from_bytes(data[:8], "little")
    if n > len(data) - 8:
        raise ValueError(f"{where} is not a safetensors file (header of {n} bytes in a {len(data)}-byte file)")
    try:
        header = json.loads(data[8 : 8 + n])
    except (ValueError, UnicodeDecodeError):
        raise ValueError(f"{where} is not a safetensors file (unreadable header)") from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return meta if isinstance(meta, dict) else {}


def load_rule(name_or_path: str | os.PathLike[str]) -> Rule:
    """Load a packaged rule by name, or a rule file by path; ``ValueError`` for anything that is not a complete
    fednl rule file, ``FileNotFoundError`` for a missing one."""
    path = resolve_rule(name_or_path)
    where = f"rule file {path}"
    data = path.read_bytes()
    meta_text = _header_metadata(data, where).get(META_KEY)
    if meta_text is None:
        raise ValueError(f"{where} is a safetensors file but not a fednl rule (no {META_KEY!r} metadata)")
    try:
        meta = json.loads(meta_text)
        fmt = meta["format"]
        source, model_raw, memory_raw = meta["model_source"], meta["model"], meta["memory"]
        groups = {g: list(v) for g, v in meta["groups"].items()}
        provenance = dict(meta.get("provenance") or {})
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"{where}: malformed {META_KEY!r} metadata ({exc!r})") from None
    if fmt != FORMAT:
        raise ValueError(f"{where} has rule format {fmt}; this version reads format {FORMAT}")
    try:
        memory = MemoryConfig.model_validate(memory_raw)
        model_cfg = ModelConfig.model_validate(model_raw)
    except ValidationError as exc:
        raise ValueError(f"{where}: invalid configuration in its metadata ({exc.errors()[0]['msg']})") from None
    try:
        tensors = dict(st_load(data))
    except Exception as exc:  # safetensors' own error types
        raise ValueError(f"{where}: cannot read its tensors ({exc})") from None
    listed = {n for names in groups.values() for n in names}
    if listed != set(tensors):
        raise ValueError(f"{where}: its metadata lists {len(listed)} tensors but the file holds {len(tensors)}")
    origin = str(name_or_path) if not _is_path(name_or_path) else str(path)
    return Rule(tensors=tensors, memory_config=memory, model_source=str(source), model_config=model_cfg,
                groups=groups, provenance=provenance, origin=origin)


def _listing(names: list[str]) -> str:
    return ", ".join(names[:5]) + (f" (+{len(names) - 5} more)" if len(names) > 5 else "")


def install_rule(model: nn.Module, rule: Rule) -> None:
    """Copy ``rule``'s tensors into converted ``model`` in place, after checking: the backbone (when the model
    records its :class:`ModelConfig`), the memory design (every field outside :data:`RUNTIME_FIELDS`), and that
    the rule holds exactly the model's rule and gate tensors with the same shapes. Nothing is written unless
    every check passes."""
    memory = _memory_config(model)
    where = f"rule {rule.origin}" if rule.origin else "rule"
    model_cfg = getattr(model, "fednl_model_config", None)
    if isinstance(model_cfg, ModelConfig) and backbone_id(model_cfg.source) != backbone_id(rule.model_source):
        raise ValueError(f"{where} was trained for backbone {rule.model_source!r}, but the model is "
                         f"{model_cfg.source!r}")
    diffs = design_differences(rule.memory_config, memory)
    if diffs:
        raise ValueError(f"{where} was built with another memory design (rule vs model): {'; '.join(diffs)}")
    names = rule_names(model)
    expected = {n for g in RULE_GROUPS for n in names[g]}
    missing, extra = sorted(expected - set(rule.tensors)), sorted(set(rule.tensors) - expected)
    if missing or extra:
        parts = ([f"missing {len(missing)} tensors the model needs: {_listing(missing)}"] if missing else []) + (
            [f"{len(extra)} tensors the model does not have: {_listing(extra)}"] if extra else [])
        raise ValueError(f"{where} does not fit this model: {'; '.join(parts)}")
    params = dict(model.named_parameters())
    bad = [f"{n} {tuple(rule.tensors[n].shape)} vs {tuple(params[n].shape)}" for n in sorted(expected)
           if tuple(rule.tensors[n].shape) != tuple(params[n].shape)]
    if bad:
        raise ValueError(f"{where} does not fit this model: shape mismatch (rule vs model) for {_listing(bad)}")
    with torch.no_grad():
        for n in sorted(expected):
            params[n].copy_(rule.tensors[n].to(device=params[n].device, dtype=params[n].dtype))


def describe_rule(rule: Rule) -> str:
    """One line: backbone, tensor and parameter counts, the memory design, and the provenance."""
    m = rule.memory_config
    design = (f"rule={m.rule} decay={m.decay} gate={m.gate}/{m.gate_granularity}/{m.gate_source} write={m.write} "
              f"mix={m.mix} window={m.attn_window} sinks={m.sinks}")
    prov = json.dumps(rule.provenance, sort_keys=True) if rule.provenance else "{}"
    return f"backbone {rule.model_source}, {len(rule.tensors)} tensors, {rule.n_params:,} parameters; {design}; " \
           f"provenance {prov}"


__all__ = ["FORMAT", "RULE_GROUPS", "RUNTIME_FIELDS", "Rule", "UnknownRule", "backbone_id", "describe_rule",
           "design_differences", "install_rule", "list_rules", "load_rule", "resolve_rule", "rule_names", "rules_dir",
           "save_rule"]
