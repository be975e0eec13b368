"""The peers of ``benchmarks/peers.py``: the selectors a user would pick instead of the pipeline,
each through its own library where one exists (apricot, submodlib), our re-implementation where
none does (SemDeDup + random, kMQ, the ZCore-style score; tested on hand cases in
tests/unit/test_peers.py). Pure functions over an (n, d) float32 array of L2-normalised rows."""

from __future__ import annotations

import numpy as np

from ray_pipeline.select.kernels import proportional_budgets, semantic_duplicates
from ray_pipeline.select.kmeans import kmeans

# Each returns an order of the pool's rows (the first m are the subset of size m) or, where
# subsets are not prefixes of one order, {m: rows}


def apricot_fl(x: np.ndarray, m_max: int) -> np.ndarray:
    from apricot import FacilityLocationSelection

    return np.asarray(FacilityLocationSelection(m_max, metric="cosine").fit(x.astype(np.float64)).ranking)


def fl_per_label(x: np.ndarray, y: np.ndarray, ms: list[int]) -> dict[int, np.ndarray]:
    """Facility location label by label with proportional budgets, through the pipeline's kernel
    (select/facility.py) with each label as one cluster: apricot's greedy, index for index
    (tests/unit/test_facility.py holds the kernel to apricot), without apricot's per-fit numba
    compile (seconds per label on this machine, minutes for 77 labels)."""
    import torch

    from ray_pipeline.select.facility import facility_location

    labels, code = np.unique(y, return_inverse=True)
    sizes = np.bincount(code)
    share = {m: proportional_budgets(sizes, m) for m in ms}
    run_to = np.max(np.stack(list(share.values())), axis=0)
    rank = facility_location(torch.from_numpy(x), torch.from_numpy(code.astype(np.int64)), torch.from_numpy(run_to),
                             block_pairs=int(sizes.max()) ** 2).numpy()
    return {m: np.flatnonzero((rank >= 0) & (rank < share[m][code])) for m in ms}


def per_label(order, x: np.ndarray, y: np.ndarray, ms: list[int]) -> dict[int, np.ndarray]:
    """``order(x_label, m)`` (a whole-pool greedy: its first m picks) label by label, each label's
    share of every m by proportional_budgets; one run per label to its largest share, each m the
    prefixes."""
    labels, code = np.unique(y, return_inverse=True)
    sizes = np.bincount(code)
    share = {m: proportional_budgets(sizes, m) for m in ms}
    orders = []
    for lab in range(len(labels)):
        rows = np.flatnonzero(code == lab)
        most = max(int(share[m][lab]) for m in ms)
        orders.append(rows[order(x[rows], most)] if most >= 1 and len(rows) > 1 else rows[:most])
    return {m: np.concatenate([o[:int(share[m][lab])] for lab, o in enumerate(orders)]) for m in ms}


def apricot_fl_per_label(x: np.ndarray, y: np.ndarray, ms: list[int]) -> dict[int, np.ndarray]:
    """apricot label by label (:func:`per_label`)."""
    return per_label(apricot_fl, x, y, ms)


def submodlib_fl_per_label(x: np.ndarray, y: np.ndarray, ms: list[int]) -> dict[int, np.ndarray]:
    """submodlib label by label (:func:`per_label`)."""
    return per_label(submodlib_fl, x, y, ms)


def submodlib_fl(x: np.ndarray, m_max: int) -> np.ndarray:
    from submodlib import FacilityLocationFunction

    f = FacilityLocationFunction(n=len(x), mode="dense", data=x, metric="cosine")
    return np.array([i for i, _ in f.maximize(budget=m_max, optimizer="LazyGreedy", show_progress=False)])


def semdedup_random(x: np.ndarray, m_max: int, rng: np.random.Generator, threshold: float = 0.95) -> np.ndarray:
    import torch

    k = max(1, int(round(np.sqrt(len(x)))))
    km = kmeans(x, k, seed=0)
    dup = semantic_duplicates(torch.from_numpy(x), torch.from_numpy(km.assign), torch.from_numpy(km.sim), k,
                              threshold).numpy()
    kept = np.flatnonzero(~dup)
    return rng.permutation(kept)[:m_max] if len(kept) >= m_max else np.r_[rng.permutation(kept),
                                                                          rng.permutation(np.flatnonzero(dup))][:m_max]


def kmq(x: np.ndarray, ms: list[int], rng: np.random.Generator, k: int | None = None) -> dict[int, np.ndarray]:
    """k-means into k (default sqrt(N)) clusters; per cluster a random order; cluster c's share of m
    by proportional_budgets; the subset: each cluster's first share members."""
    k = k or max(1, int(round(np.sqrt(len(x)))))
    a = kmeans(x, k, seed=0).assign
    sizes = np.bincount(a, minlength=k)
    order = np.lexsort((rng.random(len(x)), a))  # by cluster, random inside
    start = np.r_[0, np.cumsum(sizes)]
    return {m: np.concatenate([order[start[c]:start[c] + b] for c, b in enumerate(proportional_budgets(sizes, m))])
            for m in ms}


def zcore_scores(x: np.ndarray, rng: np.random.Generator, *, probes: int, dims: int = 2, subspaces: int = 16,
                 neighbours: int = 4, redundancy: float = 0.5) -> np.ndarray:
    """(n,) a ZCore-style score (Griffin et al. 2024), label-free: in each of ``subspaces`` random
    ``dims``-dimensional coordinate subspaces, ``probes / subspaces`` points are drawn uniformly in
    the data's bounding box; each probe credits its nearest sample +1 (coverage: samples alone in a
    large region gather many probes) and charges that sample's ``neighbours`` nearest others
    ``redundancy`` each (redundancy: a crowded sample's neighbours lose). Our re-implementation of
    the idea, not the authors' code; :func:`coverage_redundancy` is one subspace's step."""
    from scipy.spatial import cKDTree

    score = np.zeros(len(x))
    for _ in range(subspaces):
        cols = rng.choice(x.shape[1], dims, replace=False)
        xs = x[:, cols].astype(np.float64)
        p = rng.uniform(xs.min(0), xs.max(0), size=(max(1, probes // subspaces), dims))
        score += coverage_redundancy(xs, p, neighbours, redundancy, tree=cKDTree(xs))
    return score


def coverage_redundancy(xs: np.ndarray, probes: np.ndarray, neighbours: int, redundancy: float,
                        tree=None) -> np.ndarray:
    """(n,) one subspace's score: +1 to each probe's nearest sample, -``redundancy`` to each of
    that sample's ``neighbours`` nearest other samples. xs: (n, s), probes: (p, s)."""
    from scipy.spatial import cKDTree

    tree = tree or cKDTree(xs)
    _, nn = tree.query(probes, k=1)
    score = np.bincount(nn, minlength=len(xs)).astype(np.float64)
    if neighbours and len(xs) > 1:
        _, near = tree.query(xs[nn], k=min(len(xs), neighbours + 1))
        near = near[:, 1:].ravel()  # the first is the sample itself
        score -= redundancy * np.bincount(near, minlength=len(xs))
    return score


def top_by_score(score: np.ndarray) -> np.ndarray:
    return np.lexsort((np.arange(len(score)), -score))  # highest first, ties: lower row
