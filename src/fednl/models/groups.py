"""Named parameter groups: which tensors are backbone (``frozen``), LoRA, memory rule or gate.

How a parameter gets its group: a module may define ``fednl_param_groups() -> dict[str, str]`` mapping the
names of its *own* parameters (``named_parameters(recurse=False)``) to a group name. :class:`LoRALinear` claims
``lora_A``/``lora_B`` as ``lora``; the Titans attention claims its gate logits as ``gate`` and its β/decay
modules claim theirs as ``rule``. Other model kinds may claim new group names the same way.

Rules: a parameter with ``requires_grad=False`` is always ``frozen`` (e.g. LoRA frozen by ``trainable=False``); an
unclaimed parameter must be frozen; a claimed trainable parameter goes to its group. So ``frozen`` is exactly the
set of parameters that do not require grad, and the groups partition ``named_parameters()``.
"""

from __future__ import annotations

from torch import nn

#: Groups always present in :func:`param_groups` (possibly empty).
BASE_GROUPS: tuple[str, ...] = ("frozen", "lora", "rule", "gate")


def _claims(model: nn.Module) -> dict[str, str]:
    claims: dict[str, str] = {}
    for mod_name, mod in model.named_modules():
        fn = getattr(mod, "fednl_param_groups", None)
        if fn is None:
            continue
        for local, group in fn().items():
            claims[f"{mod_name}.{local}" if mod_name else local] = group
    return claims


def param_groups(model: nn.Module) -> dict[str, set[str]]:
    """Group name -> set of ``named_parameters()`` names; the sets partition all parameters.

    Raises ``ValueError`` if a trainable parameter is claimed by no group (a conversion bug).
    """
    claims = _claims(model)
    groups: dict[str, set[str]] = {g: set() for g in BASE_GROUPS}
    unclaimed: list[str] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            groups["frozen"].add(name)
        elif name in claims:
            groups.setdefault(claims[name], set()).add(name)
        else:
            unclaimed.append(name)
    if unclaimed:
        raise ValueError(
            f"{len(unclaimed)} trainable parameters belong to no group (first: {unclaimed[:3]}); "
            "freeze them or claim them with fednl_param_groups()"
        )
    return groups


def group_counts(model: nn.Module) -> dict[str, int]:
    """Group name -> number of scalar parameters in it."""
    params = dict(model.named_parameters())
    return {g: sum(params[n].numel() for n in names) for g, names in param_groups(model).items()}


def group_tensors(model: nn.Module, group: str) -> dict[str, nn.Parameter]:
    """The live parameters of one group, by name (sorted)."""
    groups = param_groups(model)
    if group not in groups:
        raise ValueError(f"unknown parameter group {group!r}; the model has {sorted(groups)}")
    params = dict(model.named_parameters())
    return {n: params[n] for n in sorted(groups[group])}


def format_group_table(model: nn.Module, title: str = "") -> str:
    """A plain-text table: group, tensors, parameters, share of the total."""
    groups = param_groups(model)
    params = dict(model.named_parameters())
    total = sum(p.numel() for p in params.values()) or 1
    lines = [title] if title else []
    lines.append(f"{'group':<10} {'tensors':>8} {'parameters':>14} {'share':>9}")
    for g, names in groups.items():
        n = sum(params[x].numel() for x in names)
        lines.append(f"{g:<10} {len(names):>8} {n:>14,} {100.0 * n / total:>8.3f}%")
    trainable = total - sum(params[x].numel() for x in groups["frozen"])
    lines.append(f"{'trainable':<10} {'':>8} {trainable:>14,} {100.0 * trainable / total:>8.3f}%")
    lines.append(f"{'total':<10} {len(params):>8} {total:>14,}")
    return "\n".join(lines)


def print_group_counts(model: nn.Module, title: str = "") -> None:
    """Print :func:`format_group_table`."""
    print(format_group_table(model, title))
