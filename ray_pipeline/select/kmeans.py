"""Stage 3: spherical k-means with FAISS (METHOD.md step 3).

A pure kernel over arrays: :func:`kmeans` takes L2-normalised float32 vectors and returns the
centroids, each point's cluster and its cosine similarity to that centroid. faiss trains on a
seeded sample of at most ``k * max_points_per_centroid`` points (:func:`training_rows`, drawn
here rather than inside faiss so that a reader of sharded vectors can fetch exactly those rows),
then every point is assigned by :func:`assign` (which shard tasks call on their own rows).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from ..errors import InputError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KMeansResult:
    """centroids: (k, d) float32, unit norm. assign: (n,) int64 in [0, k). sim: (n,) float32,
    the inner product of each point with its own centroid (cosine, for unit vectors)."""

    centroids: np.ndarray
    assign: np.ndarray
    sim: np.ndarray

    @property
    def sizes(self) -> np.ndarray:
        return np.bincount(self.assign, minlength=len(self.centroids))


def kmeans(x: np.ndarray, k: int, *, seed: int, niter: int = 20,
           max_points_per_centroid: int = 256, gpus: int = 0) -> KMeansResult:
    """Spherical k-means of the rows of ``x``.

    x: (n, d) float32 array of L2-normalised vectors, C-contiguous (copied if not).
    k: number of clusters, 1 <= k <= n. seed: faiss's seed (sampling and initialisation).
    gpus: 0 for the CPU; > 0 trains and assigns on that many GPUs (faiss-gpu only; not bit-exact
    against the CPU). Cost: O(niter * min(n, k * max_points_per_centroid) * k * d) to train,
    O(n * k * d) to assign.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> x = rng.normal(size=(200, 8)).astype(np.float32)
        >>> x /= np.linalg.norm(x, axis=1, keepdims=True)
        >>> r = kmeans(x, 4, seed=0)
        >>> r.centroids.shape, r.assign.shape, int(r.sizes.sum())
        ((4, 8), (200,), 200)
    """

    n, d = x.shape
    if not 1 <= k <= n:
        raise InputError(f"cannot make k={k} clusters of n={n} samples; choose 1 <= k <= {n}")
    return _kmeans_of_rows(np.ascontiguousarray(x, dtype=np.float32), None, k, seed=seed, niter=niter,
                           max_points_per_centroid=max_points_per_centroid, gpus=gpus)


def _kmeans_of_rows(x: np.ndarray, rows: np.ndarray | None, k: int, *, seed: int, niter: int,
                    max_points_per_centroid: int, gpus: int) -> KMeansResult:
    """:func:`kmeans` of ``x[rows]`` (rows: (r,) int64, None for all of x) without gathering it:
    only the training sample is copied, the assignment gathers ``batch_rows`` rows at a time. The
    same bits as gathering first (the same rows, batches and sample), at O(sample) memory
    instead of O(r d) per tree node."""
    n = len(x) if rows is None else len(rows)
    sample = training_rows(n, k, seed=seed, max_points_per_centroid=max_points_per_centroid)
    pick = sample if rows is None else (rows if sample is None else rows[sample])
    centroids = train_centroids(x if pick is None else x[pick], k, seed=seed, niter=niter, gpus=gpus)
    assign_, sim = assign(x, centroids, gpus=gpus, rows=rows)
    return KMeansResult(centroids=centroids, assign=assign_, sim=sim)


def training_rows(n: int, k: int, *, seed: int, max_points_per_centroid: int = 256) -> np.ndarray | None:
    """The sorted rows k-means trains on: a seeded sample of ``k * max_points_per_centroid`` of
    the ``n`` rows, or None (all of them) when there are no more than that."""
    cap = k * max_points_per_centroid
    if n <= cap:
        return None
    return np.sort(np.random.default_rng(seed).choice(n, size=cap, replace=False))


def train_centroids(sample: np.ndarray, k: int, *, seed: int, niter: int = 20, gpus: int = 0) -> np.ndarray:
    """(k, d) float32 unit centroids of spherical k-means trained on every row of ``sample``."""
    import faiss

    km = faiss.Kmeans(
        sample.shape[1], k, niter=niter, seed=seed, spherical=True, gpu=gpus if gpus > 0 else False,
        max_points_per_centroid=max(1, -(-len(sample) // k)),  # the sample is already drawn: use all of it
        min_points_per_centroid=1,  # small pools are legitimate here; no faiss warning
        verbose=False,
    )
    km.train(np.ascontiguousarray(sample, dtype=np.float32))
    return np.ascontiguousarray(km.centroids, dtype=np.float32)


def assign(x: np.ndarray, centroids: np.ndarray, *, gpus: int = 0, batch_rows: int = 1 << 16,
           rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Each row's nearest centroid by inner product: (assign (n,) int64, sim (n,) float32);
    ``rows`` ((n,) int64): assign ``x[rows]`` instead of x, gathered a batch at a time.

    For unit vectors and the unit centroids of spherical k-means the similarity is the cosine.
    Rows are searched in batches of ``batch_rows`` (bounded temporaries). A BLAS product's last
    bits depend on the shape it is computed in, so faiss's top two per row are re-scored one row at
    a time (ties: the lower centroid): a row's result then does not depend on its batch, and
    shards assigned apart agree with one pass over all rows, bit for bit.
    """
    import faiss

    index = faiss.IndexFlatIP(centroids.shape[1])
    if gpus > 0:
        index = faiss.index_cpu_to_all_gpus(index, ngpu=gpus)
    centroids = np.ascontiguousarray(centroids, dtype=np.float32)
    index.add(centroids)
    top = min(2, len(centroids))
    n = len(x) if rows is None else len(rows)
    out_a = np.empty(n, dtype=np.int64)
    out_s = np.empty(n, dtype=np.float32)
    for lo in range(0, n, batch_rows):
        hi = min(lo + batch_rows, n)
        xb = np.ascontiguousarray(x[lo:hi] if rows is None else x[rows[lo:hi]], dtype=np.float32)
        _, idx = index.search(xb, top)
        sims = np.empty((hi - lo, top), dtype=np.float32)
        for c0 in range(0, hi - lo, 4096):  # one row at a time in any case; 4096 keeps the gather in cache
            for j in range(top):
                sims[c0:c0 + 4096, j] = np.einsum("ij,ij->i", xb[c0:c0 + 4096], centroids[idx[c0:c0 + 4096, j]])
        best = np.argmax(sims, axis=1)  # first of equal maxima; make that the lower centroid
        if top == 2:
            tie = sims[:, 0] == sims[:, 1]
            best[tie] = np.argmin(idx[tie], axis=1)
        at = np.arange(hi - lo)
        out_a[lo:hi], out_s[lo:hi] = idx[at, best], sims[at, best]
    return out_a, out_s


def node_fan(k: int, branching: int, leaf: int) -> int:
    """Clusters a tree node asked for ``k`` leaves splits into, or 1 where it is a leaf
    (``k <= leaf``: one flat k-means into ``k``). Above ``leaf``: enough groups of at most ``leaf``
    leaves (ceil(k / leaf)), reached in the fewest levels of at most ``branching``
    (:func:`node_branching` of the groups). A leaf trains on all its rows (it has fewer than
    ``max_points_per_centroid`` a centroid), so its cost per row is niter x leaf x d whatever K:
    bounding the leaf keeps the tree's cost per row from growing with K but for the levels above,
    which cost one assignment pass each.

    Example:
        >>> node_fan(10_000, 16, 8), node_fan(900, 16, 8), node_fan(80, 16, 8), node_fan(8, 16, 8)
        (11, 11, 10, 1)
    """
    if k <= leaf:
        return 1
    return max(2, node_branching(-(-k // leaf), branching))


def node_branching(k: int, branching: int) -> int:
    """Clusters a node asked for ``k`` leaves splits into: the fewest levels of at most
    ``branching`` that reach ``k`` (L = ceil(log_branching k)), each level the same fan-out
    ceil(k ** (1/L)); so 200 leaves under a cap of 64 are 15 x ~14, not 64 x ~3.

    Example:
        >>> node_branching(200, 64), node_branching(2000, 64), node_branching(10_000, 64), node_branching(50, 64)
        (15, 45, 22, 50)
    """
    levels = 1
    while branching ** levels < k:
        levels += 1
    fan = int(np.ceil(k ** (1.0 / levels) - 1e-9))
    return max(2, min(branching, fan)) if k > 1 else 1


def hierarchical_kmeans(x: np.ndarray, k: int, *, seed: int, niter: int = 20, max_points_per_centroid: int = 256,
                        branching: int = 16, leaf: int = 8, gpus: int = 0) -> KMeansResult:
    """Multi-level spherical k-means (as in Vo et al. 2024, "Automatic Data Curation for
    Self-Supervised Learning"): k-means into :func:`node_fan` clusters (at most ``branching``),
    then the same inside each of them with its share of ``k`` (by size, largest remainder, at least
    one), down to nodes asked for at most ``leaf`` clusters, which run flat :func:`kmeans`. The
    leaves are the ``k`` clusters, numbered depth-first.

    x: (n, d) float32 L2-normalised rows; 1 <= k <= n. Same result type and contract as
    :func:`kmeans` (``sim`` is each row's similarity to its own leaf centroid). Cost: about
    ``n * branching * d`` a level above the leaves (training on a sample, then one assignment) and
    ``niter * n * leaf * d`` at the leaves, against ``niter * n * k * d`` for flat k-means:
    n log(k) when k grows with n. Seeded: each node's seed derives from ``seed`` and its path.
    With ``k <= leaf`` it is :func:`kmeans`.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> x = rng.normal(size=(3000, 8)).astype(np.float32)
        >>> x /= np.linalg.norm(x, axis=1, keepdims=True)
        >>> r = hierarchical_kmeans(x, 40, seed=0, branching=8, leaf=8)
        >>> r.centroids.shape, int(r.sizes.sum()), int(r.assign.max()) < 40
        ((40, 8), 3000, True)
    """
    n = len(x)
    if not 1 <= k <= n:
        raise InputError(f"cannot make k={k} clusters of n={n} samples; choose 1 <= k <= {n}")
    if branching < 2 or leaf < 1:
        raise ValueError("branching must be at least 2 and leaf at least 1")
    return subtree(x, k, path=(seed,), niter=niter, max_points_per_centroid=max_points_per_centroid,
                   branching=branching, leaf=leaf, gpus=gpus)


def node_seed(path: tuple) -> int:
    """faiss's seed for the tree node at ``path`` (the run's seed, then the child indices)."""
    return int(np.random.default_rng(path).integers(0, 2**31 - 1))


def child_shares(sizes: np.ndarray, k: int) -> np.ndarray:
    """Leaves of each child of a node asked for ``k``: one per non-empty child, the rest by size
    (largest remainder), never more than a child's rows.

    Example:
        >>> child_shares(np.array([60, 30, 10, 0]), 10).tolist()  # 1 each, then 7 as 4.2 / 2.1 / 0.7
        [5, 3, 2, 0]
    """
    from .kernels import proportional_budgets

    live = sizes > 0
    return live.astype(np.int64) + proportional_budgets(sizes, k - int(live.sum()), sizes - live)


def subtree(x: np.ndarray, k: int, *, path: tuple, rows: np.ndarray | None = None, niter: int = 20,
            max_points_per_centroid: int = 256, branching: int = 16, leaf: int = 8, gpus: int = 0) -> KMeansResult:
    """The leaves under the tree node at ``path`` whose rows are ``x[rows]`` (``rows``: ascending
    positions in x, in pool order; None: all of x), asked for ``k``: :func:`hierarchical_kmeans`
    from that node down; assign and sim are the node's rows', in that order. The shard engine
    runs a group of nodes in a Ray task, and gets the driver's leaves; x[rows] is not copied."""
    assign = np.empty(len(x), dtype=np.int64)
    sim = np.empty(len(x), dtype=np.float32)
    centroids: list[np.ndarray] = []
    made = 0  # leaves numbered so far (a running count: summing the list each leaf was quadratic in K)
    mine = np.arange(len(x)) if rows is None else rows
    stack = [(mine, k, tuple(path))]  # (rows, clusters asked of the node, path); depth-first, in order
    while stack:
        rows, k_here, path = stack.pop()
        kw = dict(seed=node_seed(path), niter=niter, max_points_per_centroid=max_points_per_centroid, gpus=gpus)
        fan = node_fan(k_here, branching, leaf)
        # x[rows] is never gathered whole: a node copies its training sample and a batch at a time
        split = None if fan == 1 else _kmeans_of_rows(x, rows, fan, **kw)
        if split is None or int((split.sizes > 0).sum()) == 1:  # a leaf node, or one that would not split
            k_here = min(k_here, len(rows))
            r = _kmeans_of_rows(x, rows, k_here, **kw)
            assign[rows] = r.assign + made
            sim[rows] = r.sim
            centroids.append(r.centroids)
            made += len(r.centroids)
            continue
        share = child_shares(split.sizes, k_here)
        children = [(rows[split.assign == c], int(share[c]), (*path, c)) for c in range(fan) if share[c] > 0]
        stack.extend(reversed(children))  # popped in child order
    if len(mine) < len(x):  # the node's rows of x, in their order
        assign, sim = assign[mine], sim[mine]
    return KMeansResult(centroids=np.concatenate(centroids), assign=assign, sim=sim)
