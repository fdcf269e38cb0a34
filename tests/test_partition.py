"""Partitioners (flwr-datasets and pure-Python backends), held-out clients and the heterogeneity report."""

from __future__ import annotations

import importlib.util
import math
from collections import Counter

import pytest

from fednl.data import PartitionConfig, build_task, format_report, heterogeneity_report
from fednl.data.partition import choose_heldout, dirichlet, iid, long_tail, long_tail_sizes, partition, pathological
from fednl.models.tokenizer import ByteTokenizer

HAS_FLWR = importlib.util.find_spec("flwr_datasets") is not None
NO_FLWR = pytest.mark.skipif(not HAS_FLWR, reason="flwr-datasets not installed")
BACKENDS = ["python", pytest.param("flwr", marks=NO_FLWR)]
LABELS = [f"L{i % 5}" for i in range(200)]  # 5 labels x 40 examples


def _is_partition(parts, n, allow_dropped=False):
    flat = [i for p in parts for i in p]
    assert len(flat) == len(set(flat)), "an example went to two clients"
    assert all(p == sorted(p) for p in parts)
    if not allow_dropped:
        assert sorted(flat) == list(range(n))


def test_iid_sizes_and_seed():
    parts = iid(10, 3, seed=0)
    _is_partition(parts, 10)
    assert [len(p) for p in parts] == [4, 3, 3]
    assert parts == iid(10, 3, seed=0) and parts != iid(10, 3, seed=1)
    with pytest.raises(ValueError, match="cannot deal 2 examples to 3 clients"):
        iid(2, 3, 0)


@pytest.mark.filterwarnings("ignore:The specified min_partition_size")  # flwr-datasets redraws, as designed
@pytest.mark.parametrize("backend", BACKENDS)
def test_dirichlet_invariants_and_alpha_effect(backend):
    parts = dirichlet(LABELS, 4, alpha=0.5, seed=0, min_size=5, backend=backend)
    _is_partition(parts, len(LABELS))
    assert min(len(p) for p in parts) >= 5
    assert parts == dirichlet(LABELS, 4, alpha=0.5, seed=0, min_size=5, backend=backend)

    def mean_tv(alpha):
        tvs = []
        for seed in range(5):
            ps = dirichlet(LABELS, 4, alpha=alpha, seed=seed, min_size=1, backend=backend)
            rep = heterogeneity_report({str(c): [LABELS[i] for i in p] for c, p in enumerate(ps)})
            tvs.append(rep["summary"]["mean_tv"])
        return sum(tvs) / len(tvs)

    # Large alpha ~ IID shares (small distance to the pooled mix), small alpha ~ one client per label.
    assert mean_tv(1000.0) < 0.1 < 0.5 < mean_tv(0.05)


def test_dirichlet_min_size_unreachable_is_an_error():
    with pytest.raises(ValueError, match="min_size=150"):
        dirichlet(LABELS, 4, alpha=0.5, seed=0, min_size=150, backend="python")


@pytest.mark.parametrize("backend", BACKENDS)
def test_pathological_k_labels_per_client(backend):
    parts = pathological(LABELS, 5, k=2, seed=3, backend=backend)
    _is_partition(parts, len(LABELS), allow_dropped=True)
    for c, p in enumerate(parts):
        labs = {LABELS[i] for i in p}
        assert len(labs) == 2
        assert f"L{c}" in labs  # first label is deterministic: labels[c % n_labels]
    # every label is held by someone (5 clients >= 5 labels), so nothing is dropped
    _is_partition(parts, len(LABELS))
    # k = 1 with one client per label is the natural split: client c holds exactly label c
    one = pathological(LABELS, 5, k=1, seed=0, backend=backend)
    assert [sorted({LABELS[i] for i in p}) for p in one] == [[f"L{c}"] for c in range(5)]
    assert [len(p) for p in one] == [40] * 5
    with pytest.raises(ValueError, match="k=6 labels per client, but the data has 5 labels"):
        pathological(LABELS, 5, k=6, seed=0, backend=backend)


def test_long_tail_sizes_by_hand():
    # exponential: w = e, e^2, e^3 -> shares .0900, .2447, .6652 of 100 -> floor 9, 24, 66 (+1 remainder to last)
    assert long_tail_sizes(100, 3, "exponential") == [9, 24, 67]
    # zipf s=1 over reversed ids: w = 1/3, 1/2, 1 -> 2/11, 3/11, 6/11 of 100 -> 18, 27, 54 (+1)
    assert long_tail_sizes(100, 3, "zipf", 1.0) == [18, 27, 55]
    # zipf s=2: w = 1/9, 1/4, 1 (sum 49/36) -> 100*4/49 = 8.16, 100*9/49 = 18.37, 100*36/49 = 73.47 -> 8, 18, 73 (+1)
    assert long_tail_sizes(100, 3, "zipf", 2.0) == [8, 18, 74]
    with pytest.raises(ValueError, match="leave a client empty"):
        long_tail_sizes(100, 8, "exponential")


@pytest.mark.parametrize("law", ["exponential", "zipf"])
def test_long_tail_backends_agree(law):
    pytest.importorskip("flwr_datasets")
    py = long_tail(200, 4, law, 1.0, seed=2, backend="python")
    fl = long_tail(200, 4, law, 1.0, seed=2, backend="flwr")
    _is_partition(py, 200)
    assert py == fl
    assert [len(p) for p in py] == long_tail_sizes(200, 4, law, 1.0)


def test_partition_dispatch_and_config_errors():
    cfg = PartitionConfig(kind="iid", n_clients=4)
    assert partition(LABELS, cfg, 0) == iid(200, 4, 0)
    with pytest.raises(ValueError, match="needs n_clients"):
        PartitionConfig(kind="dirichlet")
    with pytest.raises(ValueError, match=r"\['k'\] do not apply to kind='dirichlet'"):
        PartitionConfig(kind="dirichlet", n_clients=3, k=3)
    assert PartitionConfig(kind="dirichlet", n_clients=3, k=2).k == 2  # a default value (dumped configs) is fine
    with pytest.raises(ValueError, match="does not re-deal"):
        partition(LABELS, PartitionConfig(), 0)


def test_choose_heldout():
    names = ["a", "b", "c", "d"]
    picked = choose_heldout(names, 2, seed=0)
    assert len(picked) == 2 and picked == [n for n in names if n in picked]
    assert picked == choose_heldout(names, 2, seed=0)
    assert choose_heldout(names, ["d", "b"], 0) == ["b", "d"]
    assert choose_heldout(names, 0, 0) == []
    with pytest.raises(ValueError, match=r"heldout client\(s\) \['z'\] not found"):
        choose_heldout(names, ["z"], 0)
    with pytest.raises(ValueError, match="leaves no training client"):
        choose_heldout(names, 4, 0)


def test_heterogeneity_report_by_hand():
    rep = heterogeneity_report({"a": ["x", "x"], "b": ["y", "y"], "c": ["x", "y"]}, heldout=["c"])
    # pooled: x 3, y 3 -> q = (.5, .5), entropy 1 bit
    assert rep["labels"] == ["x", "y"] and rep["pooled"] == {"x": 3, "y": 3}
    a, c = rep["clients"]["a"], rep["clients"]["c"]
    assert a == {"n": 2, "heldout": False, "counts": {"x": 2}, "entropy_bits": 0.0, "tv": 0.5, "js_bits": a["js_bits"]}
    # JS(p=(1,0), q=(.5,.5)) = 0.5*KL(p||m) + 0.5*KL(q||m), m = (.75,.25)
    js = 0.5 * math.log2(1 / 0.75) + 0.5 * (0.5 * math.log2(0.5 / 0.75) + 0.5 * math.log2(0.5 / 0.25))
    assert a["js_bits"] == pytest.approx(js, abs=1e-6)
    assert c["tv"] == 0.0 and c["entropy_bits"] == 1.0 and c["heldout"] is True
    s = rep["summary"]
    assert s["pooled_entropy_bits"] == 1.0 and s["mean_tv"] == pytest.approx((2 * 0.5 + 2 * 0.5 + 0) / 6)
    assert s["max_tv"] == 0.5 and s["size_cv"] == 0.0
    table = format_report(rep)
    assert "c (heldout)" in table and "x:2" in table and "pooled entropy 1.000 bits" in table


def test_task_repartition_keeps_every_example_and_split():
    base = {"name": "niah7", "quickstart": True, "n_train": 8, "n_test": 4, "templates": ["passkey", "uuid", "counter"]}
    natural = build_task(base, ByteTokenizer(), 0)
    uids = {r["uid"]: r["split"] for r in natural.iter_records()}
    for part in ({"kind": "iid", "n_clients": 4}, {"kind": "dirichlet", "n_clients": 3, "alpha": 0.3},
                 {"kind": "pathological", "n_clients": 3, "k": 1},
                 {"kind": "long_tail", "n_clients": 3, "law": "zipf"}):
        task = build_task({**base, "partition": part, "heldout": 1}, ByteTokenizer(), 0)
        recs = list(task.iter_records())
        assert {r["uid"]: r["split"] for r in recs} == uids, part
        assert len(task.clients) == part["n_clients"] - 1 and len(task.heldout) == 1
        assert all(r["meta"]["client"] == r["client"] for r in recs)
        assert Counter(r["meta"]["natural_client"] for r in recs) == {"passkey": 12, "uuid": 12, "counter": 12}
        assert task.info["heterogeneity"]["clients"][task.heldout[0].name]["heldout"] is True
    patho = build_task({**base, "partition": {"kind": "pathological", "n_clients": 3, "k": 1}}, ByteTokenizer(), 0)
    assert all(len({e.meta["template"] for e in c.train + c.test}) == 1 for c in patho.clients)


def test_natural_heldout_by_name():
    task = build_task({"name": "niah7", "quickstart": True, "n_train": 2, "n_test": 1, "heldout": ["counter"]},
                      ByteTokenizer(), 0)
    assert [c.name for c in task.heldout] == ["counter"]
    assert "counter" not in [c.name for c in task.clients] and len(task.clients) == 6
    assert task.info["counts"]["counter"] == {"train": 2, "test": 1, "heldout": True}
