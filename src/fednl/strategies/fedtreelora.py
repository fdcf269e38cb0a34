"""FedTreeLoRA (Bian, Wang, Zhang, Xu; ICML 2026): one client tree, cut ever finer from shallow to deep layers.

Model kind ``"treelora"`` (:mod:`fednl.models.treelora`): per adapted linear a cluster expert (``lora_A``/``lora_B``,
trained, sent back) and a frozen external expert (``ext_A``/``ext_B``), mixed per transformer block by the
client's private scalar ``λ = sigmoid(ρ)``; a server-set gate is 0 in blocks that are fully shared.

1. **Warm-up** (``warmup_rounds`` rounds): ``warmup_mode="local"`` (the paper) — each client trains its own LoRA
   and uploads it; nothing is averaged into the clients (they continue from their own copy, kept in their
   ``ClientState``). ``"fedavg"`` — the warm-up rounds are plain FedAvg (FedIT) rounds.
2. **Tree** (once, after the last warm-up round, as soon as every client has uploaded: a client that dropped
   out, was rejected or was not sampled keeps the run in warm-up, round after round, until it has sent one):
   with ``B_{l,k}`` client k's LoRA ``B`` matrices in block l,
   ``D^(l)_ij = mean over the block's adapted modules of ||B_i − B_j||_F`` and ``D = mean_l D^(l)``;
   agglomerative clustering of ``D`` (``linkage``, default ``"average"``) gives one merge tree T.
3. **Cuts**, shallow to deep, ``c_0 = 1``: block l takes ``c_l = argmax_{c ∈ Ω_l} φ(c)`` over
   ``Ω_l = {c_{l−1}, …, min(N − 1, c_{l−1} + max_growth)}`` with ``φ(1) = τ`` and ``φ(c ≥ 2)`` the silhouette of
   the c-cluster cut of T scored on ``D^(l)``; ties go to the smaller c. The number of clusters never decreases
   with depth and grows by at most ``max_growth`` per block (the paper's window ``K`` is ``max_growth + 1``).
4. **Rounds after the tree**: client k receives, per block, its cluster's expert (A and B, N_k-weighted mean of
   the members' uploads) and — if the block is split — the external expert (the N_k-weighted mean of the other
   clusters' experts) plus gate 1; it trains the cluster expert and λ (external frozen) and uploads the expert;
   the server re-averages each cluster's expert over the members that took part (a cluster with no participant
   keeps its expert). ``configure_train`` therefore sends per-client payloads.

With ``tau`` above every silhouette (e.g. ``tau = 1``) every block stays at the root: one cluster, no external
expert, λ_eff = 1 — exactly FedAvg on LoRA after the warm-up (and throughout with ``warmup_mode="fedavg"``).
The paper publishes neither τ, K, E_warm nor the linkage; the defaults here are documented in docs/STRATEGIES.md.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import BaseModel, Field
from scipy.cluster.hierarchy import linkage as scipy_linkage
from scipy.spatial.distance import squareform

from fednl.models.treelora import block_index
from fednl.strategies import register
from fednl.strategies.base import ClientContext, ClientReply, Params, Payload, Strategy, StrategyError, check_replies

OWN_PREFIX = "treelora/own/"
MIX_INIT_KEY = "treelora_mix_initialised"
PHASE_KEY = "treelora_phase"
RESTORE_KEY = "treelora_restore"


# ---------------------------------------------------------------------------------------------- tree maths
def frobenius_distances(mats: Sequence[torch.Tensor]) -> np.ndarray:
    """``D_ij = ||M_i − M_j||_F`` (float64, symmetric, zero diagonal)."""
    flat = torch.stack([m.detach().to(torch.float64).reshape(-1) for m in mats])
    return torch.cdist(flat[None], flat[None])[0].numpy()


def build_tree(dist: np.ndarray, method: str = "average") -> np.ndarray:
    """Agglomerative clustering of a precomputed distance matrix; scipy's linkage matrix ``Z``."""
    n = dist.shape[0]
    if dist.shape != (n, n) or n < 2:
        raise StrategyError(f"tree needs a square distance matrix over >= 2 clients, got shape {dist.shape}")
    sym = 0.5 * (dist + dist.T)
    np.fill_diagonal(sym, 0.0)
    return scipy_linkage(squareform(sym, checks=False), method=method)


def cut_tree(Z: np.ndarray, n: int, c: int) -> list[int]:
    """Labels of the ``c``-cluster cut of the merge tree (undo its last ``c − 1`` merges). Labels are numbered in
    order of each cluster's smallest member."""
    if not 1 <= c <= n:
        raise StrategyError(f"cannot cut a tree over {n} clients into {c} clusters")
    parent = list(range(2 * n - 1))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in range(n - c):
        a, b = int(Z[i, 0]), int(Z[i, 1])
        parent[find(a)] = n + i
        parent[find(b)] = n + i
    roots: dict[int, int] = {}
    return [roots.setdefault(find(i), len(roots)) for i in range(n)]


def silhouette(dist: np.ndarray, labels: Sequence[int]) -> float:
    """Mean silhouette (Rousseeuw 1987) over a precomputed distance matrix; a singleton's s(i) is 0.

    ``s(i) = (b_i − a_i) / max(a_i, b_i)`` with ``a_i`` the mean distance to the other members of i's cluster and
    ``b_i`` the smallest mean distance to another cluster. Needs ``2 <= #clusters <= n − 1``."""
    lab = np.asarray(labels)
    n = lab.shape[0]
    ids = np.unique(lab)
    if not 2 <= ids.size <= n - 1:
        raise StrategyError(f"silhouette needs 2..{n - 1} clusters, got {ids.size}")
    member = lab[None, :] == ids[:, None]  # [C, n]
    sums = dist @ member.T  # [n, C]: Σ of distances from i to each cluster
    sizes = member.sum(1).astype(np.float64)  # [C]
    own = np.searchsorted(ids, lab)
    own_size = sizes[own]
    a = np.where(own_size > 1, sums[np.arange(n), own] / np.maximum(own_size - 1, 1), 0.0)
    means = sums / sizes[None, :]
    means[np.arange(n), own] = np.inf
    b = means.min(1)
    denom = np.maximum(a, b)
    s = np.where((own_size > 1) & (denom > 0), (b - a) / np.where(denom > 0, denom, 1.0), 0.0)
    return float(s.mean())


def choose_cuts(Z: np.ndarray, n: int, layer_dists: Sequence[np.ndarray], tau: float, max_growth: int
                ) -> tuple[list[int], list[dict[int, float]]]:
    """Clusters per layer (shallow to deep) and the scores φ(c) each layer compared."""
    c_prev, cuts, scores = 1, [], []
    for dist in layer_dists:
        window = range(c_prev, min(n - 1, c_prev + max_growth) + 1)
        phi = {c: (tau if c == 1 else silhouette(dist, cut_tree(Z, n, c))) for c in window}
        if phi:
            best = max(phi.values())
            c_prev = min(c for c, v in phi.items() if v == best)
        cuts.append(c_prev)
        scores.append(phi)
    return cuts, scores


def weighted_average(tensors: Sequence[Params], weights: Sequence[float]) -> Params:
    """``Σ w_k t_k / Σ w_k`` per name, in float64, returned in each tensor's dtype."""
    total = float(sum(weights))
    if total <= 0:
        raise StrategyError("aggregation weights sum to zero")
    out: Params = {}
    for name, ref in tensors[0].items():
        acc = torch.zeros_like(ref, dtype=torch.float64)
        for t, w in zip(tensors, weights):
            acc += t[name].to(torch.float64) * (float(w) / total)
        out[name] = acc.to(ref.dtype)
    return out


# ---------------------------------------------------------------------------------------------- strategy
@register
class FedTreeLoRA(Strategy):
    """Warm-up, one B-distance tree, monotone per-block cuts, cluster + external experts mixed by λ."""

    name: ClassVar[str] = "fedtreelora"
    model_kind: ClassVar[str] = "treelora"
    accepts_server_opt: ClassVar[bool] = False  # the next round sends the cluster experts, not the global
    # the tree is built from a warm-up upload of every client; afterwards each cluster expert is its own average
    robust_select: ClassVar[bool] = False
    robust_means: ClassVar[bool] = False
    private_mean: ClassVar[bool] = False

    class Options(Strategy.Options):
        warmup_rounds: int = Field(1, ge=1)  # E_warm
        warmup_mode: Literal["local", "fedavg"] = "local"
        tau: float = 0.25  # φ(1): a block splits off the root only if a silhouette beats it
        max_growth: int = Field(1, ge=1)  # clusters a block may add over the previous one
        linkage: Literal["average", "complete", "single"] = "average"
        lambda_init: float = Field(0.5, gt=0.0, lt=1.0)  # λ of a split block at its first round
        weighting: Literal["num_examples", "uniform"] = "num_examples"

    def __init__(self, options: BaseModel | None = None, *, groups: Mapping[str, set[str]]):
        super().__init__(options, groups=groups)
        lora = self._names({"lora"})
        ext = self._names({"tree_ext"})
        mix = self._names({"tree_mix"})
        self._blocks: dict[int, list[str]] = {}
        self._ext_of: dict[str, str] = {}
        for n in sorted(lora):
            b = block_index(n)
            leaf = n.rsplit(".", 1)[-1]
            if b is None or leaf not in ("lora_A", "lora_B"):
                raise StrategyError(f"FedTreeLoRA: LoRA parameter {n!r} is not a block's lora_A/lora_B")
            e = n[: -len(leaf)] + ("ext_A" if leaf == "lora_A" else "ext_B")
            if e not in ext:
                raise StrategyError(f"FedTreeLoRA: {n!r} has no external expert {e!r} (model kind 'treelora'?)")
            self._blocks.setdefault(b, []).append(n)
            self._ext_of[n] = e
        self._gate: dict[int, str] = {}
        self._rho: dict[int, str] = {}
        for n in ext - set(self._ext_of.values()):
            if n.endswith("treelora_mix.gate") and (b := block_index(n)) is not None:
                self._gate[b] = n
        for n in mix:
            if n.endswith("treelora_mix.rho") and (b := block_index(n)) is not None:
                self._rho[b] = n
        lacking = sorted(b for b in self._blocks if b not in self._gate or b not in self._rho)
        if lacking:
            raise StrategyError(f"FedTreeLoRA: blocks {lacking} lack treelora_mix.gate / treelora_mix.rho")
        # server state
        self._clients: list[str] = []
        self._n: dict[str, float] = {}
        self._uploads: dict[str, Params] = {}
        self._rounds_done = 0
        self._tree: dict[str, Any] | None = None  # clients, labels per block, cuts, scores, Z
        self._experts: dict[int, list[Params]] = {}

    def shared_groups(self) -> set[str]:
        return {"lora"}

    # ------------------------------------------------------------------ bookkeeping
    @property
    def in_warmup(self) -> bool:
        return self._tree is None

    @property
    def block_ids(self) -> list[int]:
        return sorted(self._blocks)

    def _weight(self, cid: str) -> float:
        return 1.0 if self.options.weighting == "uniform" else float(self._n[cid])

    def sample(self, rnd: int, clients: list[str], rng: random.Random) -> list[str]:
        self._clients = list(clients)
        return super().sample(rnd, clients, rng)

    def labels(self, block: int) -> dict[str, int]:
        """Client -> cluster of ``block`` (after the tree is built)."""
        if self._tree is None:
            raise StrategyError("FedTreeLoRA: the tree is not built yet (still in warm-up)")
        return dict(zip(self._tree["clients"], self._tree["labels"][str(block)]))

    def cuts(self) -> dict[int, int]:
        if self._tree is None:
            raise StrategyError("FedTreeLoRA: the tree is not built yet (still in warm-up)")
        return {int(b): int(c) for b, c in self._tree["cuts"].items()}

    # ------------------------------------------------------------------ server
    def configure_train(self, rnd: int, cid: str, global_params: Params) -> Payload:
        if self.in_warmup:
            if self.options.warmup_mode == "local" and cid in self._uploads:
                return Payload({}, {"round": rnd, PHASE_KEY: "warmup", RESTORE_KEY: True})
            return Payload(dict(global_params), {"round": rnd, PHASE_KEY: "warmup", RESTORE_KEY: False})
        return Payload(self.client_tensors(cid), {"round": rnd, PHASE_KEY: "tree", RESTORE_KEY: False})

    def client_tensors(self, cid: str) -> Params:
        """What client ``cid`` trains from: its cluster experts, and in split blocks the external expert + gate."""
        out: Params = {}
        for b in self.block_ids:
            lab = self.labels(b)
            if cid not in lab:
                raise StrategyError(f"FedTreeLoRA: client {cid!r} was not in the tree (built over {sorted(lab)})")
            experts = self._experts[b]
            mine = lab[cid]
            out.update(experts[mine])
            if len(experts) > 1:
                w = [sum(self._weight(j) for j, k in lab.items() if k == s) for s in range(len(experts))]
                others = [s for s in range(len(experts)) if s != mine]
                ext = weighted_average([experts[s] for s in others], [w[s] for s in others])
                out.update({self._ext_of[n]: t for n, t in ext.items()})
                out[self._gate[b]] = torch.ones(1, dtype=experts[mine][self._blocks[b][0]].dtype)
        return out

    def aggregate_train(self, rnd: int, replies: list[ClientReply], global_params: Params) -> Params:
        check_replies(replies, expected=set(global_params), reference=global_params)
        for r in replies:
            self._n[r.cid] = float(r.num_examples)
        weights = [self._weight(r.cid) for r in replies]
        if self.in_warmup:
            for r in replies:
                self._uploads[r.cid] = {n: t.detach().clone() for n, t in r.payload.tensors.items()}
            new_global = weighted_average([r.payload.tensors for r in replies], weights)
            self._rounds_done += 1
            # the tree needs an upload from every client: a client that dropped out, was rejected or was not sampled
            # keeps the run in warm-up until it has sent one (``warmup_missing`` names who is still awaited)
            if self._rounds_done >= int(self.options.warmup_rounds) and not self.warmup_missing():
                self.build()
                return self.global_mean(new_global)
            return new_global
        for b in self.block_ids:
            lab = self.labels(b)
            names = self._blocks[b]
            for s in range(len(self._experts[b])):
                members = [(r, w) for r, w in zip(replies, weights) if lab[r.cid] == s]
                if members:
                    self._experts[b][s] = weighted_average(
                        [{n: m.payload.tensors[n] for n in names} for m, _ in members], [w for _, w in members])
        self._rounds_done += 1
        return self.global_mean(global_params)

    def warmup_missing(self) -> list[str]:
        """The clients without a warm-up upload yet (the tree is built once this is empty)."""
        return [c for c in self._clients if c not in self._uploads]

    def build(self) -> None:
        """Build the tree and the per-block cuts and cluster experts from the clients' warm-up uploads."""
        clients = list(self._clients) or sorted(self._uploads)
        missing = self.warmup_missing()
        if missing:
            raise StrategyError(
                f"FedTreeLoRA needs a warm-up upload from every client to build its tree; missing {missing} "
                "(use fraction_fit=1.0 or more warm-up rounds)")
        n = len(clients)
        layer_d: list[np.ndarray] = []
        for b in self.block_ids:
            b_names = [x for x in self._blocks[b] if x.endswith("lora_B")]
            if not b_names:
                raise StrategyError(f"FedTreeLoRA: block {b} has no lora_B matrix")
            if n >= 2:
                layer_d.append(np.mean([frobenius_distances([self._uploads[c][x] for c in clients]) for x in b_names],
                                       axis=0))
        if n >= 2:
            d_glob = np.mean(layer_d, axis=0)
            Z = build_tree(d_glob, self.options.linkage)
            cuts, scores = choose_cuts(Z, n, layer_d, float(self.options.tau), int(self.options.max_growth))
            labels = {str(b): cut_tree(Z, n, c) for b, c in zip(self.block_ids, cuts)}
            z_list = Z.tolist()
        else:
            cuts, scores, z_list = [1] * len(self.block_ids), [{1: float(self.options.tau)}] * len(self.block_ids), []
            labels = {str(b): [0] * n for b in self.block_ids}
        self._tree = {
            "clients": clients, "labels": labels, "Z": z_list,
            "cuts": {str(b): int(c) for b, c in zip(self.block_ids, cuts)},
            "scores": {str(b): {str(c): float(v) for c, v in s.items()} for b, s in zip(self.block_ids, scores)},
        }
        self._experts = {}
        for b in self.block_ids:
            lab = self.labels(b)
            names = self._blocks[b]
            k = max(lab.values()) + 1
            self._experts[b] = [
                weighted_average([{x: self._uploads[c][x] for x in names} for c in clients if lab[c] == s],
                                 [self._weight(c) for c in clients if lab[c] == s])
                for s in range(k)
            ]
        self._uploads = {}

    def global_mean(self, like: Params) -> Params:
        """The weighted mean over all clients of their cluster experts (the tree's root view; FedAvg at c = 1)."""
        out: Params = {}
        for b in self.block_ids:
            lab = self.labels(b)
            experts = self._experts[b]
            w = [sum(self._weight(j) for j, k in lab.items() if k == s) for s in range(len(experts))]
            out.update(weighted_average(experts, w))
        return {n: out[n].to(like[n].dtype) for n in like}

    def eval_params(self, cid: str, global_params: Params, client_state: Any) -> Params:
        if not self.in_warmup:
            return self.client_tensors(cid)
        if self.options.warmup_mode == "local" and client_state is not None:
            own = {k[len(OWN_PREFIX):]: v for k, v in client_state.tensors.items() if k.startswith(OWN_PREFIX)}
            if own:
                return own
        return global_params

    # ------------------------------------------------------------------ server state
    def server_state(self) -> tuple[Params, dict[str, Any]]:
        tensors: Params = {}
        for cid, up in self._uploads.items():
            for n, t in up.items():
                tensors[f"upload|{cid}|{n}"] = t
        for b, experts in self._experts.items():
            for s, ex in enumerate(experts):
                for n, t in ex.items():
                    tensors[f"expert|{b}|{s}|{n}"] = t
        info = {"rounds_done": self._rounds_done, "n": dict(self._n), "clients": list(self._clients),
                "tree": self._tree}
        return tensors, info

    def load_server_state(self, tensors: Params, info: dict[str, Any]) -> None:
        try:
            self._rounds_done = int(info["rounds_done"])
            self._n = {str(k): float(v) for k, v in info["n"].items()}
            self._clients = list(info["clients"])
            self._tree = info["tree"]
        except (KeyError, TypeError, ValueError) as exc:
            raise StrategyError(f"FedTreeLoRA checkpoint: malformed server info ({exc})") from None
        self._uploads, self._experts = {}, {}
        experts: dict[int, dict[int, Params]] = {}
        for key, t in tensors.items():
            parts = key.split("|")
            if parts[0] == "upload" and len(parts) == 3:
                self._uploads.setdefault(parts[1], {})[parts[2]] = t
            elif parts[0] == "expert" and len(parts) == 4:
                experts.setdefault(int(parts[1]), {}).setdefault(int(parts[2]), {})[parts[3]] = t
            else:
                raise StrategyError(f"FedTreeLoRA checkpoint: unexpected tensor {key!r}")
        self._experts = {b: [d[s] for s in sorted(d)] for b, d in experts.items()}

    # ------------------------------------------------------------------ client
    def client_receive(self, ctx: ClientContext, payload: Payload) -> None:
        phase = payload.meta.get(PHASE_KEY, "warmup")
        ctx.scratch[PHASE_KEY] = phase
        if payload.meta.get(RESTORE_KEY):
            own = {k[len(OWN_PREFIX):]: v for k, v in ctx.state.tensors.items() if k.startswith(OWN_PREFIX)}
            lacking = sorted(self.shared_names() - set(own))
            if lacking:
                raise StrategyError(f"client {ctx.cid}: warm-up restore lacks its own LoRA {lacking[:3]}")
            with torch.no_grad():
                for n, t in own.items():
                    ctx.params[n].copy_(t.to(ctx.params[n].dtype))
        super().client_receive(ctx, payload)
        if phase == "tree":
            for k in [k for k in ctx.state.tensors if k.startswith(OWN_PREFIX)]:
                del ctx.state.tensors[k]
            if not ctx.state.info.get(MIX_INIT_KEY):
                lam = float(self.options.lambda_init)
                with torch.no_grad():
                    for name in self._rho.values():
                        ctx.params[name].fill_(math.log(lam / (1.0 - lam)))
                ctx.state.info[MIX_INIT_KEY] = True

    def client_reply(self, ctx: ClientContext) -> Payload:
        payload = super().client_reply(ctx)
        if ctx.scratch.get(PHASE_KEY) == "warmup" and self.options.warmup_mode == "local":
            for n, t in payload.tensors.items():
                ctx.state.tensors[OWN_PREFIX + n] = t.detach().to("cpu").clone()
        return payload
