"""The selection stage as Ray tasks over shards, for pools whose vectors do not fit the driver.

:func:`select_candidates_sharded` gives the selection :func:`ray_pipeline.pipeline.select_candidates`
gives, index for index, reading the vectors from Parquet shards in the embedding stage's layout
(``row``, ``embedding`` columns; any number of files) instead of one array on the driver. The
driver holds about 21 bytes per row (cluster, similarity, rank, a flag) plus the k-means training
sample (``k * max_points_per_centroid`` rows); the vectors move between tasks through Ray's
object store. Per K:

1. ``read_shard`` tasks send the driver its seeded training sample; it trains the centroids.
2. ``_assign_shard`` tasks: every row's cluster and similarity to it (:func:`cluster.assign`,
   whose results do not depend on how rows are batched).
3. The driver cuts the clusters into groups of consecutive ids with about equal rows;
   ``_partition_shard`` tasks split each shard by group (the cluster-sorted shards).
4. ``_keys_group`` tasks: center and key samples of the group's clusters. The driver then draws
   the budgets, exactly as the driver path does (they need every cluster's size).
5. ``_greedy_group`` tasks: the k-center greedy of the group's clusters.

A group keeps its rows in pool order, so "lowest index" tie-breaks are the driver path's. The
kernels are the driver path's (:mod:`ray_pipeline.select`); these tasks only move data.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Optional

import numpy as np

from .cluster import assign as assign_rows
from .cluster import train_centroids, training_rows
from .config import Config
from .errors import InputError

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# pure helpers


def read_shard(path: str, row_map: Optional[np.ndarray] = None,
               rows_wanted: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
    """(rows (r,) int64, x (r, d) float32) of one shard; ``row_map`` renumbers the file's ``row``
    column (-1 drops the row); ``rows_wanted`` (sorted) keeps only those rows."""
    import pyarrow.parquet as pq

    t = pq.read_table(path, columns=["row", "embedding"])
    rows = t.column("row").to_numpy().astype(np.int64)
    emb = t.column("embedding").combine_chunks()
    x = emb.values.to_numpy(zero_copy_only=False).reshape(len(t), -1).astype(np.float32, copy=False)
    keep = np.ones(len(rows), dtype=bool)
    if row_map is not None:
        rows = row_map[rows]
        keep &= rows >= 0
    if rows_wanted is not None:
        pos = np.clip(np.searchsorted(rows_wanted, rows), 0, max(0, len(rows_wanted) - 1))
        keep &= (len(rows_wanted) > 0) & (rows_wanted[pos] == rows)
    return rows[keep], x[keep]


def cluster_groups(sizes: np.ndarray, groups: int) -> np.ndarray:
    """(k,) group of each cluster: consecutive cluster ids, about sum(sizes)/groups rows a group."""
    cum = np.cumsum(sizes) - sizes / 2.0  # a cluster's middle row decides its group
    total = max(1.0, float(sizes.sum()))
    return np.minimum((cum * groups / total).astype(np.int64), groups - 1)


def _group_arrays(pieces: list[tuple]) -> tuple[np.ndarray, np.ndarray]:
    rows = np.concatenate([p[0] for p in pieces])
    x = np.concatenate([p[1] for p in pieces])
    order = np.argsort(rows, kind="stable")
    return rows[order], x[order]


# ----------------------------------------------------------------------------------------------
# task bodies (plain functions; wrapped with ray.remote where they run)


def _assign_shard(path, row_map, centroids):
    rows, x = read_shard(path, row_map)
    a, s = assign_rows(x, centroids)
    return rows, a, s


def _partition_shard(path, row_map, assign, group_of_cluster, groups):
    rows, x = read_shard(path, row_map)
    g = group_of_cluster[assign[rows]]
    out = tuple((rows[g == i], x[g == i]) for i in range(groups))
    return out if groups > 1 else out[0]  # one return value per group


def _keys_group(c0, c1, assign, sim, *pieces):
    import torch

    from .select import center_and_key_samples

    rows, x = _group_arrays(list(pieces))
    local = torch.from_numpy(assign[rows] - c0)
    center, key = center_and_key_samples(torch.from_numpy(x), local, torch.from_numpy(sim[rows]), c1 - c0)
    center, key = center.numpy(), key.numpy()
    return np.where(center >= 0, rows[center], -1), np.where(key >= 0, rows[key], -1)


def _greedy_group(c0, c1, assign, eligible, run_to, key, *pieces):
    import torch

    from .select import k_center_greedy

    rows, x = _group_arrays(list(pieces))
    local = torch.from_numpy(assign[rows] - c0)
    starts = np.searchsorted(rows, np.maximum(key[c0:c1], 0))  # rows are sorted: global -> local
    el = None if eligible is None else torch.from_numpy(eligible[rows])
    rank = k_center_greedy(torch.from_numpy(x), local, torch.from_numpy(np.array(run_to[c0:c1])),
                           torch.from_numpy(starts), eligible=el)
    return rows, rank.numpy()


# ----------------------------------------------------------------------------------------------
# the driver


def shard_paths(stage_dir: str | Path) -> list[str]:
    """The Parquet shards of an embedding stage directory, in name order."""
    paths = sorted(str(p) for p in Path(stage_dir).glob("shard-*.parquet"))
    if not paths:
        raise InputError(f"{stage_dir} holds no shard-*.parquet files; point at a directory the embedding "
                         f"stage wrote")
    return paths


def select_candidates_sharded(shards: list[str], n: int, cfg: Config, *, rng: np.random.Generator,
                              row_map: Optional[np.ndarray] = None, groups: int = 0):
    """:func:`ray_pipeline.pipeline.select_candidates` over Parquet shards, as Ray tasks.

    shards: Parquet files with ``row`` (the sample's position, 0 <= row < n once renumbered by
    ``row_map``) and ``embedding`` (L2-normalised, fixed-size lists). groups: how many groups the
    clusters are cut into for the per-cluster tasks (0: twice the cluster's CPUs). Needs a running
    Ray (joins it). Returns the same :class:`~ray_pipeline.pipeline.Selection`.
    """
    import ray

    from .pipeline import KSelection, Selection, _budgets_and_eligible, _centroid_rank, random_ranks

    budgets = cfg.select.resolve_budgets(n)
    grid = cfg.candidate_grid(n)
    groups = groups or max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
    fetch, assign_t = ray.remote(read_shard), ray.remote(_assign_shard)
    row_map_ref = ray.put(row_map)
    per_k = []
    for k in sorted({k for k, _ in grid}):
        ms = [m for kk, m in grid if kk == k]
        t0 = time.perf_counter()
        wanted = training_rows(n, k, seed=cfg.seed, max_points_per_centroid=cfg.cluster.max_points_per_centroid)
        wanted_ref = ray.put(np.arange(n) if wanted is None else wanted)
        got = ray.get([fetch.remote(p, row_map_ref, wanted_ref) for p in shards])
        rows_s, x_s = _group_arrays(got)
        if len(rows_s) != (n if wanted is None else len(wanted)):
            raise InputError(f"the shards hold {len(rows_s)} of the {n if wanted is None else len(wanted)} rows "
                             f"k-means needs; the shards do not cover rows 0..{n - 1} once each")
        centroids = train_centroids(x_s, k, seed=cfg.seed, niter=cfg.cluster.niter)
        del x_s
        assign, sim = np.full(n, -1, dtype=np.int64), np.zeros(n, dtype=np.float32)
        for rows, a, s in ray.get([assign_t.remote(p, row_map_ref, centroids) for p in shards]):
            assign[rows], sim[rows] = a, s
        if (assign < 0).any():
            raise InputError(f"the shards do not cover every row: row {int(np.flatnonzero(assign < 0)[0])} "
                             f"is missing")
        t1 = time.perf_counter()

        sizes = np.bincount(assign, minlength=k)
        g_of_c = cluster_groups(sizes, groups)
        bounds = np.searchsorted(g_of_c, np.arange(groups + 1))  # group i holds clusters [bounds[i], bounds[i+1])
        assign_ref, sim_ref = ray.put(assign), ray.put(sim)
        part = ray.remote(num_returns=groups)(_partition_shard) if groups > 1 else ray.remote(_partition_shard)
        pieces = [part.remote(p, row_map_ref, assign_ref, g_of_c, groups) for p in shards]
        if groups == 1:
            pieces = [[ref] for ref in pieces]
        live = [g for g in range(groups) if bounds[g + 1] > bounds[g]]
        keys = ray.get([ray.remote(_keys_group).remote(int(bounds[g]), int(bounds[g + 1]), assign_ref, sim_ref,
                                                       *[pc[g] for pc in pieces]) for g in live])
        center, key = np.full(k, -1, dtype=np.int64), np.full(k, -1, dtype=np.int64)
        for g, (c, kk) in zip(live, keys):
            center[bounds[g]:bounds[g + 1]], key[bounds[g]:bounds[g + 1]] = c, kk
        t2 = time.perf_counter()
        per_m, run_to, eligible = _budgets_and_eligible(assign, sim, k, key, ms, cfg)
        eligible_ref = ray.put(None if eligible.all() else eligible)
        run_ref, key_ref = ray.put(run_to), ray.put(key)
        for method in cfg.select.method:
            t3 = time.perf_counter()
            if method == "centroid":
                rank = _centroid_rank(assign, sim, k, eligible, run_to)
            else:
                rank = np.full(n, -1, dtype=np.int64)
                greedy = ray.remote(_greedy_group)
                for rows, r in ray.get([greedy.remote(int(bounds[g]), int(bounds[g + 1]), assign_ref, eligible_ref,
                                                      run_ref, key_ref, *[pc[g] for pc in pieces]) for g in live]):
                    rank[rows] = r
            t4 = time.perf_counter()
            per_k.append(KSelection(k=k, assign=assign, center=center, key=key, budgets=per_m, rank=rank,
                                    seconds={"kmeans": t1 - t0, "key_samples": t2 - t1, "greedy": t4 - t3},
                                    method=method))
            log.info("K=%d over %d shards in %d groups: k-means %.2fs, key samples %.2fs, %s %.2fs", k,
                     len(shards), len(live), t1 - t0, t2 - t1, method, t4 - t3)
        del pieces
    children = rng.spawn(len(cfg.select.random_seeds))
    random = {seed: random_ranks(n, child) for seed, child in zip(cfg.select.random_seeds, children)}
    return Selection(n=n, budgets=budgets, per_k=per_k, random=random)
