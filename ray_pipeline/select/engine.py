"""The selection (METHOD.md steps 3-7): candidate subsets for every (K, M) of the grid, and the
random baselines, as arrays (the stage's tables are in ``tables``).

One routine, :func:`_select_k`, does a K: k-means, center and key samples, budgets, and one
candidate order per method. It asks a *vectors strategy* (the protocols
:class:`~ray_pipeline.select.strategy.Vectors` and
:class:`~ray_pipeline.select.strategy.Clustering`) for the steps that touch the vectors, as
faiss's ``contrib/clustering.py`` swaps ``DatasetAssign`` for ``DatasetAssignGPU``:

- :class:`InMemory` (``select.engine: driver``), here: every vector in this process, on the
  run's device (:class:`~ray_pipeline.runtime.devices.Devices`);
- ``sharded.Sharded`` (``select.engine: ray``): Ray tasks over the embedding stage's Parquet
  shards, for pools whose vectors do not fit the driver.

Both give the same arrays, index for index, so the two engines cannot drift apart: every option
(stratified budgets, the robust variant, several methods) runs through the same code.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Optional

import numpy as np

from .. import faults
from .facility import facility_location
from .boundary import boundary_picks, boundary_share, fit_probe, probe_margins
from .kmeans import hierarchical_kmeans, kmeans
from ..config import Config
from ..runtime.devices import Devices, decide
from ..errors import ConfigError, InputError
from .kernels import (
    center_and_key_samples,
    centroid_ranks,
    k_center_greedy,
    lift,
    outlier_mask,
    proportional_budgets,
    random_ranks,
    semantic_duplicates,
)
from .strategy import Vectors

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


@dataclass
class KSelection:
    """Everything selected for one K and method. assign: (n,) cluster of each sample (-1: left
    out before clustering); center, key: (k,) row indices (-1 for an empty cluster); budgets:
    M -> (k,) per-cluster counts; rank: (n,) rank in its cluster's order (-1 if never chosen),
    run to the most any budget asks of the cluster."""

    k: int
    assign: np.ndarray
    center: np.ndarray
    key: np.ndarray
    budgets: dict[int, np.ndarray]
    rank: np.ndarray
    seconds: dict[str, float] = field(default_factory=dict)
    method: str = "kcenter"

    @property
    def family(self) -> str:
        """``k{K}`` for the method of METHOD.md, ``{method}_k{K}`` for a variant; a ``boundary``
        selection holds one budget (its candidates are not prefixes of one order), so its family is
        its one candidate, ``boundary_k{K}_m{M}``."""
        if self.method == "boundary":
            return f"boundary_k{self.k}_m{next(iter(self.budgets))}"
        return f"k{self.k}" if self.method == "kcenter" else f"{self.method}_k{self.k}"

    def name(self, m: int) -> str:
        """Candidate name: the family and the budget, ``k{K}_m{M}``."""
        return self.family if self.method == "boundary" else f"{self.family}_m{m}"

    def members(self, m: int) -> np.ndarray:
        """(n,) bool: the candidate subset of size m."""
        return (self.rank >= 0) & (self.rank < self.budgets[m][self.assign])  # rank -1 where assign is -1


@dataclass
class Selection:
    n: int
    budgets: tuple[int, ...]
    per_k: list[KSelection]
    random: dict[int, np.ndarray]  # seed -> (n,) random rank; the subset of size m is rank < m

    def candidates(self) -> list[dict]:
        """Every candidate as data (what ``select.json`` lists and the Tune stage reads)."""
        out = [{"name": s.name(m), "kind": "selection", "method": s.method, "k": s.k, "m": m, "family": s.family}
               for s in self.per_k for m in s.budgets]
        out += [{"name": f"random_m{m}_s{seed}", "kind": "random", "seed": seed, "m": m}
                for seed in self.random for m in self.budgets]
        return out


# ----------------------------------------------------------------------------------------------
# the driver's vectors strategy


class InMemory:
    """Vectors in this process (a :class:`~ray_pipeline.select.strategy.Vectors`). x: (n, d)
    float32, L2-normalised rows; the kernels run on ``devices.select`` and faiss on
    ``devices.faiss_gpus``."""

    def __init__(self, x: np.ndarray, cfg: Config, devices: Devices):
        import torch

        self.x, self.cfg, self.devices = x, cfg, devices
        self.x_t = torch.from_numpy(x).to(devices.torch())  # no copy on a CPU
        self.n = len(x)

    def cluster(self, k: int) -> "_InMemoryClustering":
        c = self.cfg.cluster
        kw = dict(seed=self.cfg.seed, niter=c.niter, max_points_per_centroid=c.max_points_per_centroid,
                  gpus=self.devices.faiss_gpus)
        km = hierarchical_kmeans(self.x, k, branching=c.branching, leaf=c.leaf, **kw) \
            if c.algorithm_for(self.n, k) == "hierarchical" else kmeans(self.x, k, **kw)
        return _InMemoryClustering(self.x_t, km.assign, km.sim, k)

    def subset(self, rows: np.ndarray) -> "InMemory":
        return InMemory(self.x[rows], self.cfg, self.devices)

    def probe_margins(self, labels: np.ndarray, train: np.ndarray) -> np.ndarray:
        """(n,) the margin of a linear probe fit on the rows ``train`` (see ``boundary``)."""
        return probe_margins(fit_probe(self.x[train], labels[train]), self.x)

    def near_duplicates(self) -> np.ndarray:
        """(n,) bool, SemDeDup: k-means into sqrt(n) clusters, then per cluster the members within
        ``select.dedup_threshold`` cosine of a member farther from the centroid."""
        k = max(1, int(round(np.sqrt(self.n))))
        c = self.cluster(k)  # sqrt(n) clusters, as SemDeDup
        return semantic_duplicates(self.x_t, c.assign_t, c.sim_t, k, self.cfg.select.dedup_threshold).cpu().numpy()


class _InMemoryClustering:
    """One K in this process (a :class:`~ray_pipeline.select.strategy.Clustering`). x_t: (n, d)
    float32 tensor on the selection's device; assign: (n,) int64; sim: (n,) float32."""

    def __init__(self, x_t: torch.Tensor, assign: np.ndarray, sim: np.ndarray, k: int):
        import torch

        self.x_t, self.assign, self.sim, self.k = x_t, assign, sim, k
        self.assign_t = torch.from_numpy(assign).to(x_t.device)  # copied to the device once, for every step
        self.sim_t = torch.from_numpy(sim).to(x_t.device)

    def center_and_key(self) -> tuple[np.ndarray, np.ndarray]:
        center, key = center_and_key_samples(self.x_t, self.assign_t, self.sim_t, self.k)
        return center.cpu().numpy(), key.cpu().numpy()

    def greedy(self, run_to: np.ndarray, key: np.ndarray, eligible: Optional[np.ndarray],
               method: str = "kcenter") -> np.ndarray:
        import torch

        dev = self.x_t.device
        el = None if eligible is None else torch.from_numpy(eligible).to(dev)
        if method == "facility":
            rank = facility_location(self.x_t, self.assign_t, torch.from_numpy(run_to).to(dev), eligible=el)
        else:
            rank = k_center_greedy(self.x_t, self.assign_t, torch.from_numpy(run_to).to(dev),
                                   torch.from_numpy(key).to(dev), eligible=el)
        return rank.cpu().numpy()  # the one device-to-host copy of the greedy


# ----------------------------------------------------------------------------------------------
# the selection


def select_candidates(vectors: np.ndarray | Vectors, cfg: Config, *, rng: np.random.Generator,
                      labels: Optional[np.ndarray] = None, devices: Optional[Devices] = None,
                      progress: bool = False) -> Selection:
    """Candidate subsets for every (K, M) of ``cfg.candidate_grid`` plus seeded random baselines.

    vectors: (n, d) float32 L2-normalised rows (run in memory on ``devices``, decided from the
    config when not given), or a vectors strategy (:class:`InMemory`, ``sharded.Sharded``).
    rng: draws the random baselines (one child stream per seed in ``select.random_seeds``, so
    adding a seed does not change the others). labels: (n,) the pool's labels, used by
    ``select.stratify`` (``auto``: stratify when given). k-means runs once per distinct K (per
    label when stratified); one greedy pass per K serves all of its budgets. With
    ``select.dedup_threshold`` the near-duplicates are removed first and never selected; the
    random baselines still draw from the whole pool. progress: a bar over the labels of each K.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> x = rng.normal(size=(500, 16)).astype(np.float32)
        >>> x /= np.linalg.norm(x, axis=1, keepdims=True)
        >>> cfg = Config.from_dict({"cluster": {"k": [5]}, "select": {"budgets": [10, 50]}})
        >>> sel = select_candidates(x, cfg, rng=rng)
        >>> [int(sel.per_k[0].members(m).sum()) for m in (10, 50)]
        [10, 50]
    """
    if isinstance(vectors, np.ndarray):
        vectors = InMemory(vectors, cfg, devices or decide(cfg))
    n = vectors.n
    budgets = cfg.select.resolve_budgets(n)
    grid = cfg.candidate_grid(n)
    if cfg.select.stratify == "label" and labels is None:
        raise ConfigError("select.stratify 'label' needs the pool's labels: set data.label_column (or "
                          "data.labels_path), or use select.stratify 'none'")
    stratify = cfg.select.stratify == "label" or (cfg.select.stratify == "auto" and labels is not None)
    methods = cfg.select.method
    boundary = "boundary" in methods and labels is not None
    if methods == ("boundary",) and labels is None:
        raise ConfigError("select.method ['boundary'] needs the pool's labels: set data.label_column (or "
                          "data.labels_path), or add 'kcenter' or 'centroid' to select.method")
    if "boundary" in methods and labels is None:
        log.warning("select.method 'boundary' needs the pool's labels (data.label_column or data.labels_path): "
                    "its candidates are left out")
    # the boundary candidate starts from the nearest-to-centroid one, computed whether asked for or not
    run_methods = tuple(m for m in methods if m != "boundary") + (("centroid",) if boundary and "centroid"
                                                                   not in methods else ())
    rows, base = np.arange(n), vectors
    if cfg.select.dedup_threshold is not None:
        rows = np.flatnonzero(~vectors.near_duplicates())
        if len(rows) < max(budgets):
            raise InputError(f"after removing {n - len(rows)} near-duplicates (select.dedup_threshold "
                             f"{cfg.select.dedup_threshold}) the pool holds {len(rows)} samples, fewer than the "
                             f"budget {max(budgets)}; raise the threshold or lower the budget")
        log.info("near-duplicates: %d of %d samples removed before clustering (cosine > %g)", n - len(rows), n,
                 cfg.select.dedup_threshold)
        base = vectors.subset(rows)
    per_k = []
    for k in sorted({k for k, _ in grid}):
        ms = [m for kk, m in grid if kk == k]
        protos = {m: m - int(round(boundary_share(m, n) * m)) for m in ms} if boundary else {}
        run_ms = sorted(set(ms) | set(protos.values()))
        if stratify:
            sels = _select_stratified(base, np.asarray(labels)[rows], k, run_ms, cfg, run_methods, progress)
        else:
            sels = _select_k(base, k, run_ms, cfg, run_methods)
        if boundary:
            centroid = next(s for s in sels if s.method == "centroid")
            sels += [_boundary(base, centroid, np.asarray(labels)[rows], m, protos[m]) for m in ms]
        sels = [s if s.method == "boundary" else replace(s, budgets={m: s.budgets[m] for m in ms})
                for s in sels if s.method in methods]
        per_k += [_lift(s, rows, n) for s in sels]
        log.info("K=%d (M=%s)%s: k-means %.2fs, key samples %.2fs, %s", k, ",".join(map(str, ms)),
                 f", stratified over {len(set(map(str, labels)))} labels" if stratify else "",
                 sels[0].seconds["kmeans"], sels[0].seconds["key_samples"],
                 ", ".join(f"{s.method} {s.seconds['greedy']:.2f}s" for s in sels if s.method != "boundary"))
    children = rng.spawn(len(cfg.select.random_seeds))
    random = {seed: random_ranks(n, child) for seed, child in zip(cfg.select.random_seeds, children)}
    return Selection(n=n, budgets=budgets, per_k=per_k, random=random)


def _select_k(vectors: Vectors, k: int, ms: list[int], cfg: Config, methods: tuple[str, ...]) -> list[KSelection]:
    """One K over ``vectors``: k-means, key samples, budgets for each M in ``ms``, and one
    candidate order per method of ``methods`` (kcenter, facility, centroid). The routine both engines run."""
    t0 = time.perf_counter()
    c = vectors.cluster(k)
    t1 = time.perf_counter()
    faults.point("select:kmeans")
    center, key = c.center_and_key()
    t2 = time.perf_counter()
    per_m, run_to, eligible = _budgets_and_eligible(c.assign, c.sim, k, key, ms, cfg)
    out = []
    for method in methods:
        t3 = time.perf_counter()
        if method == "centroid":
            rank = _centroid_rank(c.assign, c.sim, k, eligible, run_to)
        else:
            rank = c.greedy(run_to, key, None if eligible.all() else eligible, method)
        t4 = time.perf_counter()
        out.append(KSelection(k=k, assign=c.assign, center=center, key=key, budgets=per_m, rank=rank,
                              seconds={"kmeans": t1 - t0, "key_samples": t2 - t1, "greedy": t4 - t3}, method=method))
        log.debug("K=%d over %d rows (M=%s): k-means %.2fs, key samples %.2fs, %s %.2fs (%d empty clusters)", k,
                  vectors.n, ",".join(map(str, ms)), t1 - t0, t2 - t1, method, t4 - t3,
                  int((np.bincount(c.assign, minlength=k) == 0).sum()))
    return out


def _boundary(vectors: Vectors, centroid: KSelection, labels: np.ndarray, m: int, m_protos: int) -> KSelection:
    """The ``boundary`` candidate of size m (module ``boundary``): the nearest-to-centroid
    candidate of size ``m_protos`` (label-stratified when the others are), then m - m_protos rows
    a probe fit on those is least sure of, one per cluster first, from whichever labels they are
    (the confusable labels get more: the benchmark measured this above exact label shares for
    them). Its rank: the prototypes in centroid order, then the boundary rows in pick order,
    counted inside each cluster."""
    t0 = time.perf_counter()
    protos = centroid.members(m_protos)
    margin = vectors.probe_margins(labels, np.flatnonzero(protos))
    hard = boundary_picks(margin, centroid.assign, protos, m - m_protos)
    order_key = np.full(len(protos), -1, dtype=np.int64)
    order_key[protos] = centroid.rank[protos]
    order_key[hard] = int(centroid.rank.max()) + 1 + np.arange(len(hard))
    chosen = np.flatnonzero(order_key >= 0)
    chosen = chosen[np.lexsort((order_key[chosen], centroid.assign[chosen]))]  # by cluster, then pick order
    a = centroid.assign[chosen]
    starts = np.flatnonzero(np.r_[True, a[1:] != a[:-1]])
    rank = np.full(len(protos), -1, dtype=np.int64)
    rank[chosen] = np.arange(len(chosen)) - np.repeat(starts, np.diff(np.r_[starts, len(chosen)]))
    budgets = {m: np.bincount(a, minlength=len(centroid.center))}
    seconds = dict(centroid.seconds, greedy=0.0, boundary=time.perf_counter() - t0)
    return replace(centroid, budgets=budgets, rank=rank, seconds=seconds, method="boundary")


def _lift(s: KSelection, rows: np.ndarray, n: int) -> KSelection:
    """A selection made on ``rows`` of the pool as one on all ``n`` rows (the others: cluster -1,
    never chosen)."""
    if len(rows) == n:
        return s
    assign, rank = np.full(n, -1, dtype=np.int64), np.full(n, -1, dtype=np.int64)
    assign[rows], rank[rows] = s.assign, s.rank
    return KSelection(k=s.k, assign=assign, center=lift(s.center, rows), key=lift(s.key, rows), budgets=s.budgets,
                      rank=rank, seconds=s.seconds, method=s.method)


def _select_stratified(vectors: Vectors, labels: np.ndarray, k: int, ms: list[int], cfg: Config,
                       methods: tuple[str, ...], progress: bool = False) -> list[KSelection]:
    """Label-stratified budgets: each M split over the labels by their share of the pool (largest
    remainder), K likewise (at least one cluster a label), and :func:`_select_k` run inside each
    label. The clusters of all labels are numbered one after another."""
    n = vectors.n
    values = np.array([str(v) for v in labels], dtype=object)
    names, code = np.unique(values, return_inverse=True)
    sizes = np.bincount(code, minlength=len(names))
    ks = np.maximum(1, np.minimum(sizes, proportional_budgets(sizes, min(k, n))))
    share = {m: proportional_budgets(sizes, m) for m in ms}
    from tqdm.auto import tqdm

    parts = []
    for lab in tqdm(range(len(names)), desc=f"select K={k}, per label", unit="label", disable=not progress,
                    leave=False):
        sub = np.flatnonzero(code == lab)
        local = {m: int(share[m][lab]) for m in ms}
        parts.append((sub, _select_k(vectors.subset(sub), int(ks[lab]), sorted(set(local.values())), cfg, methods),
                      local))
    out = []
    for j, method in enumerate(methods):
        assign, rank = np.full(n, -1, dtype=np.int64), np.full(n, -1, dtype=np.int64)
        center, key, per_m, offset = [], [], {m: [] for m in ms}, 0
        seconds: dict[str, float] = {}
        for sub, sels, local in parts:
            s = sels[j]
            assign[sub], rank[sub] = s.assign + offset, s.rank
            center.append(lift(s.center, sub))
            key.append(lift(s.key, sub))
            for m in ms:
                per_m[m].append(s.budgets[local[m]])
            offset += len(s.center)
            for name, v in s.seconds.items():
                seconds[name] = seconds.get(name, 0.0) + v
        out.append(KSelection(k=k, assign=assign, center=np.concatenate(center), key=np.concatenate(key),
                              budgets={m: np.concatenate(v) for m, v in per_m.items()}, rank=rank,
                              seconds=seconds, method=method))
    log.debug("K=%d stratified over %d labels: %s clusters each", k, len(names), ks.tolist())
    return out


def _budgets_and_eligible(assign: np.ndarray, sim: np.ndarray, k: int, key: np.ndarray, ms: list[int],
                          cfg: Config) -> tuple[dict[int, np.ndarray], np.ndarray, np.ndarray]:
    """Per budget M the (k,) per-cluster counts; how far each cluster's order must run; the (n,)
    rows that may be picked (all but the robust variant's outliers)."""
    eligible = outlier_mask(assign, sim, k, cfg.select.outlier_quantile, key)
    room = np.bincount(assign[eligible], minlength=k)
    sizes = np.bincount(assign, minlength=k)
    per_m = {m: proportional_budgets(sizes, m, room) for m in ms}
    # Largest remainder is not monotone in M (the Alabama paradox): run each cluster to the most
    # any budget asks of it, so every candidate is a prefix of one order.
    run_to = np.max(np.stack(list(per_m.values())), axis=0)
    return per_m, run_to, eligible


def _centroid_rank(assign: np.ndarray, sim: np.ndarray, k: int, eligible: np.ndarray,
                   run_to: np.ndarray) -> np.ndarray:
    """The nearest-to-centroid order, cut at each cluster's ``run_to`` (-1 beyond and for outliers)."""
    rank = np.where(eligible, centroid_ranks(assign, sim, k), -1)
    return np.where(rank < run_to[assign], rank, -1)

