"""Seeded partitioners: deal example indices to clients by a label.

Every function returns one sorted list of example indices per client. ``backend="flwr"`` runs the
`flwr-datasets` partitioner (``DirichletPartitioner``, ``PathologicalPartitioner``, ``ExponentialPartitioner``,
``IdToSizeFncPartitioner`` for Zipf sizes) on a ``datasets.Dataset`` built from the label column;
``backend="python"`` is a dependency-free implementation of the same scheme; ``"auto"`` uses flwr-datasets when
it is installed (the ``flower`` extra) and the pure-Python version otherwise. The two backends draw different
random numbers, so Dirichlet / pathological splits differ between them (both are seeded and satisfy the same
invariants); the IID and long-tail splits are identical across backends.

* ``iid``: seeded shuffle, sizes differ by at most one.
* ``dirichlet``: for each label, client shares ~ Dir(alpha); redrawn (at most 10 times) until every client has
  ``min_size`` examples.
* ``pathological``: client ``c`` holds exactly ``k`` labels, the first ``labels[c % n_labels]`` and the rest drawn
  at random; each label is split evenly among its holders. Examples of a label no client holds are dropped.
* ``long_tail``: client ``i`` (1-based) gets ``floor(n * w_i / sum(w))`` examples of a seeded shuffle, with
  ``w_i = exp(i)`` (exponential) or ``w_i = (n_clients + 1 - i) ** -exponent`` (Zipf); the rounding remainder
  goes to the last (largest) client.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Hashable, Sequence
from typing import Any

from fednl.data.config import PartitionConfig

Labels = Sequence[Hashable]
MAX_DRAWS = 10


def _flwr() -> tuple[Any, Any] | None:
    try:
        import datasets
        import flwr_datasets.partitioner as partitioner
    except ImportError:
        return None
    return partitioner, datasets


def _use_flwr(backend: str) -> bool:
    if backend == "python":
        return False
    available = _flwr() is not None
    if backend == "flwr" and not available:
        raise ImportError(
            "partition backend 'flwr' needs flwr-datasets: pip install 'fednl[flower]' (or use backend='python')"
        )
    return available


def _run_flwr(make: Callable[[Any], Any], labels: Sequence[str], order: Sequence[int] | None = None) -> list[list[int]]:
    """Run a flwr-datasets partitioner on a Dataset with columns ``label`` and ``idx`` (rows in ``order``)."""
    partitioner_mod, datasets = _flwr()  # type: ignore[misc]
    order = list(range(len(labels))) if order is None else list(order)
    ds = datasets.Dataset.from_dict({"label": [labels[i] for i in order], "idx": order})
    part = make(partitioner_mod)
    part.dataset = ds
    return [sorted(part.load_partition(c)["idx"]) for c in range(part.num_partitions)]


def _check(n: int, n_clients: int) -> None:
    if n_clients < 1:
        raise ValueError(f"n_clients must be >= 1, got {n_clients}")
    if n < n_clients:
        raise ValueError(f"cannot deal {n} examples to {n_clients} clients")


def _label_groups(labels: Labels) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = {}
    for i, lab in enumerate(labels):
        groups.setdefault(str(lab), []).append(i)
    return dict(sorted(groups.items()))


def iid(n: int, n_clients: int, seed: int) -> list[list[int]]:
    """Seeded shuffle of ``range(n)`` cut into ``n_clients`` parts whose sizes differ by at most one."""
    _check(n, n_clients)
    order = list(range(n))
    random.Random(f"iid|{seed}").shuffle(order)
    base, extra = divmod(n, n_clients)
    out, start = [], 0
    for c in range(n_clients):
        size = base + (1 if c < extra else 0)
        out.append(sorted(order[start : start + size]))
        start += size
    return out


def dirichlet(
    labels: Labels, n_clients: int, alpha: float, seed: int, min_size: int = 1, backend: str = "auto"
) -> list[list[int]]:
    """Per-label client shares drawn from a symmetric Dirichlet(alpha)."""
    _check(len(labels), n_clients)
    if alpha <= 0:
        raise ValueError(f"dirichlet alpha must be > 0, got {alpha}")
    str_labels = [str(x) for x in labels]
    if _use_flwr(backend):
        make = lambda p: p.DirichletPartitioner(  # noqa: E731
            num_partitions=n_clients, partition_by="label", alpha=float(alpha), min_partition_size=min_size,
            self_balancing=False, shuffle=False, seed=seed,
        )
        try:
            return _run_flwr(make, str_labels)
        except ValueError as err:
            raise ValueError(f"dirichlet partition (alpha={alpha}, min_size={min_size}) failed: {err}") from None
    rng = random.Random(f"dirichlet|{seed}")
    groups = _label_groups(str_labels)
    for _ in range(MAX_DRAWS):
        parts: list[list[int]] = [[] for _ in range(n_clients)]
        for idx in groups.values():
            idx = list(idx)
            rng.shuffle(idx)
            shares = [rng.gammavariate(alpha, 1.0) for _ in range(n_clients)]
            total = sum(shares)
            if total == 0.0:  # every gamma draw underflowed (tiny alpha): the whole label goes to one client
                shares = [0.0] * n_clients
                shares[rng.randrange(n_clients)] = 1.0
                total = 1.0
            cum, prev = 0.0, 0
            for c in range(n_clients):
                cum += shares[c] / total
                cut = len(idx) if c == n_clients - 1 else int(cum * len(idx))
                parts[c].extend(idx[prev:cut])
                prev = cut
        if min(len(p) for p in parts) >= min_size:
            return [sorted(p) for p in parts]
    raise ValueError(
        f"dirichlet partition: after {MAX_DRAWS} draws some client still had fewer than min_size={min_size} "
        f"examples (alpha={alpha}, {n_clients} clients, {len(labels)} examples); raise alpha or lower min_size"
    )


def pathological(labels: Labels, n_clients: int, k: int, seed: int, backend: str = "auto") -> list[list[int]]:
    """Each client holds exactly ``k`` labels; each label is split evenly among the clients holding it."""
    _check(len(labels), n_clients)
    str_labels = [str(x) for x in labels]
    groups = _label_groups(str_labels)
    if not 1 <= k <= len(groups):
        raise ValueError(f"pathological k={k} labels per client, but the data has {len(groups)} labels")
    if _use_flwr(backend):
        make = lambda p: p.PathologicalPartitioner(  # noqa: E731
            num_partitions=n_clients, partition_by="label", num_classes_per_partition=k,
            class_assignment_mode="first-deterministic", shuffle=False, seed=seed,
        )
        return _run_flwr(make, str_labels)
    rng = random.Random(f"pathological|{seed}")
    names = list(groups)
    holders: dict[str, list[int]] = {lab: [] for lab in names}
    for c in range(n_clients):
        first = names[c % len(names)]
        rest = rng.sample([lab for lab in names if lab != first], k - 1)
        for lab in [first, *rest]:
            holders[lab].append(c)
    parts: list[list[int]] = [[] for _ in range(n_clients)]
    for lab, idx in groups.items():
        if not holders[lab]:
            continue
        idx = list(idx)
        rng.shuffle(idx)
        h = len(holders[lab])
        base, extra = divmod(len(idx), h)
        start = 0
        for j, c in enumerate(sorted(holders[lab])):
            size = base + (1 if j < extra else 0)
            parts[c].extend(idx[start : start + size])
            start += size
    return [sorted(p) for p in parts]


def _size_weights(n_clients: int, law: str, exponent: float) -> Callable[[Any], Any]:
    if law == "exponential":
        return lambda ids: [math.exp(float(i)) for i in ids]
    if law == "zipf":
        return lambda ids: [(n_clients + 1 - float(i)) ** -exponent for i in ids]
    raise ValueError(f"unknown long-tail law {law!r} (use 'exponential' or 'zipf')")


def long_tail_sizes(n: int, n_clients: int, law: str = "exponential", exponent: float = 1.0) -> list[int]:
    """Client sizes ``floor(n * w_i / sum(w))``, remainder to the last client (see module docstring)."""
    _check(n, n_clients)
    weights = _size_weights(n_clients, law, exponent)(range(1, n_clients + 1))
    total = sum(weights)
    sizes = [int(w / total * n) for w in weights]
    sizes[-1] += n - sum(sizes)
    if min(sizes) < 1:
        raise ValueError(
            f"long_tail {law} sizes for {n_clients} clients over {n} examples leave a client empty ({sizes}); "
            "use fewer clients, more data or a flatter law (zipf with a small exponent)"
        )
    return sizes


def long_tail(
    n: int, n_clients: int, law: str = "exponential", exponent: float = 1.0, seed: int = 0, backend: str = "auto"
) -> list[list[int]]:
    """Long-tail client sizes over a seeded shuffle of ``range(n)``."""
    sizes = long_tail_sizes(n, n_clients, law, exponent)
    order = list(range(n))
    random.Random(f"long_tail|{seed}").shuffle(order)
    if _use_flwr(backend):
        import numpy as np

        if law == "exponential":
            make = lambda p: p.ExponentialPartitioner(num_partitions=n_clients)  # noqa: E731
        else:
            fn = lambda ids: (n_clients + 1 - np.asarray(ids, dtype=float)) ** -exponent  # noqa: E731
            make = lambda p: p.IdToSizeFncPartitioner(  # noqa: E731
                num_partitions=n_clients, partition_id_to_size_fn=fn
            )
        try:
            return _run_flwr(make, ["_"] * n, order)
        except ValueError as err:
            raise ValueError(f"long_tail {law} partition failed: {err}") from None
    out, start = [], 0
    for size in sizes:
        out.append(sorted(order[start : start + size]))
        start += size
    return out


def partition(labels: Labels, cfg: PartitionConfig, seed: int) -> list[list[int]]:
    """Dispatch on ``cfg.kind`` (not ``natural``, which keeps the task's own clients)."""
    n_clients = cfg.n_clients or 0
    if cfg.kind == "iid":
        return iid(len(labels), n_clients, seed)
    if cfg.kind == "dirichlet":
        return dirichlet(labels, n_clients, cfg.alpha, seed, cfg.min_size, cfg.backend)
    if cfg.kind == "pathological":
        return pathological(labels, n_clients, cfg.k, seed, cfg.backend)
    if cfg.kind == "long_tail":
        return long_tail(len(labels), n_clients, cfg.law, cfg.exponent, seed, cfg.backend)
    raise ValueError(f"partition kind {cfg.kind!r} does not re-deal examples")


def choose_heldout(names: Sequence[str], heldout: int | Sequence[str], seed: int) -> list[str]:
    """Names of the held-out clients: ``heldout`` names, or that many picked with the seed (in client order)."""
    if isinstance(heldout, int):
        if heldout == 0:
            return []
        if heldout >= len(names):
            raise ValueError(f"heldout={heldout} leaves no training client (the task has {len(names)} clients)")
        picked = set(random.Random(f"heldout|{seed}").sample(list(names), heldout))
        return [n for n in names if n in picked]
    unknown = [h for h in heldout if h not in names]
    if unknown:
        raise ValueError(f"heldout client(s) {unknown} not found; clients: {list(names)}")
    if len(set(heldout)) != len(heldout):
        raise ValueError(f"heldout lists a client twice: {list(heldout)}")
    if len(heldout) >= len(names):
        raise ValueError(f"heldout={list(heldout)} leaves no training client")
    return [n for n in names if n in set(heldout)]
