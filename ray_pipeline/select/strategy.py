"""What the selection routine asks of the vectors: the *vectors strategy*, as two protocols.

The routine (:func:`~ray_pipeline.select.engine.select_candidates`) never touches a vector
itself; it asks a :class:`Vectors` for the steps that do, as faiss's ``contrib/clustering.py``
swaps ``DatasetAssign`` for ``DatasetAssignGPU``. Two strategies implement these (structurally,
without inheriting from them):

- ``engine.InMemory`` (``select.engine: driver``): every vector in this process, on the run's
  device;
- ``sharded.Sharded`` (``select.engine: ray``): Ray tasks over the embedding stage's Parquet
  shards, for pools whose vectors do not fit the driver.

Both return the same arrays, index for index, for the same inputs; that is the contract, and the
tests hold the two against each other. Row indices are positions 0..n-1 of the strategy's own
rows (a :meth:`Vectors.subset` renumbers them); -1 means none.
"""

from __future__ import annotations

from typing import Optional, Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Clustering(Protocol):
    """One K's spherical k-means over a :class:`Vectors`, and the two steps that need the vectors
    again. assign: (n,) int64 cluster of each row in [0, k). sim: (n,) float32 cosine of each row
    to its own centroid."""

    assign: np.ndarray
    sim: np.ndarray

    def center_and_key(self) -> tuple[np.ndarray, np.ndarray]:
        """(center, key), each (k,) int64 row indices, -1 for an empty cluster: the member most
        similar to the centroid, and the member other than it most similar to it
        (:func:`~ray_pipeline.select.kernels.center_and_key_samples`; ties: the lowest row)."""
        ...

    def greedy(self, run_to: np.ndarray, key: np.ndarray, eligible: Optional[np.ndarray],
               method: str = "kcenter") -> np.ndarray:
        """(n,) int64 greedy rank of every row in its cluster, -1 if not picked
        (:func:`~ray_pipeline.select.kernels.k_center_greedy`, or with ``method`` ``facility``
        :func:`~ray_pipeline.select.facility.facility_location`). run_to: (k,) int64 how many each
        cluster picks; key: (k,) int64 each cluster's start row (k-center's; facility location
        makes its own first pick); eligible: (n,) bool, rows that may be picked (None: all)."""
        ...


@runtime_checkable
class Vectors(Protocol):
    """The pool's vectors, L2-normalised float32 rows, wherever they live. n: how many rows."""

    n: int

    def cluster(self, k: int) -> Clustering:
        """k-means into k clusters (flat or multi-level, as ``cluster.algorithm_for`` decides),
        seeded by the config: the same clusters whichever strategy runs it."""
        ...

    def subset(self, rows: np.ndarray) -> Vectors:
        """The rows ``rows`` ((r,) int64, sorted) as a strategy of their own, renumbered 0..r-1."""
        ...

    def probe_margins(self, labels: np.ndarray, train: np.ndarray) -> np.ndarray:
        """(n,) float32 margin of a linear probe fit on the rows ``train`` ((t,) int64) with
        ``labels`` ((n,), any values) (:func:`~ray_pipeline.select.boundary.probe_margins`)."""
        ...

    def near_duplicates(self) -> np.ndarray:
        """(n,) bool, True for a near-duplicate to remove before clustering (SemDeDup,
        :func:`~ray_pipeline.select.kernels.semantic_duplicates`). A strategy that cannot (the
        sharded one) raises :class:`~ray_pipeline.errors.ConfigError` saying what to use instead."""
        ...
