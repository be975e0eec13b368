"""Stage 3: spherical k-means with FAISS (METHOD.md step 3).

A pure kernel over arrays: :func:`kmeans` takes L2-normalised float32 vectors and returns the
centroids, each point's cluster and its cosine similarity to that centroid. faiss trains on a
seeded sample of at most ``k * max_points_per_centroid`` points, then every point is assigned.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from .errors import InputError

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
    import faiss

    n, d = x.shape
    if not 1 <= k <= n:
        raise InputError(f"cannot make k={k} clusters of n={n} samples; choose 1 <= k <= {n}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    km = faiss.Kmeans(
        d, k, niter=niter, seed=seed, spherical=True, gpu=gpus if gpus > 0 else False,
        max_points_per_centroid=max_points_per_centroid,
        min_points_per_centroid=1,  # small pools are legitimate here; no faiss warning
        verbose=False,
    )
    km.train(x)
    # For spherical k-means faiss keeps an inner-product index: the top-1 "distance" is the
    # cosine similarity to the nearest (= own) centroid.
    sim, assign = km.index.search(x, 1)
    return KMeansResult(
        centroids=np.ascontiguousarray(km.centroids, dtype=np.float32),
        assign=assign[:, 0].astype(np.int64),
        sim=sim[:, 0].astype(np.float32),
    )
