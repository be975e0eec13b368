"""The selection's vectors as Ray tasks over shards, for pools whose vectors do not fit the driver.

:class:`Sharded` is the ``select.engine: ray`` vectors strategy (the protocols of
:mod:`~ray_pipeline.select.strategy`): the selection routine is the driver's
(:mod:`~ray_pipeline.select.engine`), only the steps that touch vectors run here, so the
selection is the driver path's index for index under every config (stratified budgets included:
:meth:`Sharded.subset` narrows the shards to a label's rows through their row map). Vectors are
read from Parquet shards in the embedding stage's layout (``row``, ``embedding`` columns; any
number of files). The driver holds about 21 bytes per row (cluster, similarity, rank, a flag) plus
the k-means training sample (``k * max_points_per_centroid`` rows); the vectors move between tasks
through Ray's object store. Per K:

1. ``read_shard`` tasks send the driver its seeded training sample; it trains the centroids (on
   the run's faiss GPUs where it has them).
2. ``_assign_shard`` tasks: every row's cluster and similarity to it (:func:`kmeans.assign`,
   whose results do not depend on how rows are batched).
3. The driver cuts the clusters into groups of consecutive ids with about equal rows;
   ``_partition_shard`` tasks split each shard by group (the cluster-sorted shards).
4. ``_keys_group`` tasks: center and key samples of the group's clusters. The driver then draws
   the budgets, exactly as the driver path does (they need every cluster's size).
5. ``_greedy_group`` tasks: the k-center greedy (or facility location) of the group's clusters.

Where the tree is used (``cluster.algorithm``), steps 1-2 run level by level for the tree's
nodes of more than ``node_rows`` rows (one sample pass and one assignment pass a level), and the
smaller nodes' subtrees run in group tasks cut as in step 3 (:meth:`Sharded._tree`): the rows a
task holds do not grow with N. A group's nodes make consecutive clusters, so those tasks also
make the key samples (step 4) and their pieces serve step 5: the tree's pool is cut once a K.

A group keeps its rows in pool order, so "lowest index" tie-breaks are the driver path's. The
kernels are :mod:`~ray_pipeline.select.kernels`'s; these tasks only move data. They ask for CPUs
only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

import numpy as np

from .boundary import fit_probe
from .kmeans import child_shares, node_fan, node_seed, train_centroids, training_rows
from .shard_tasks import (Piece, _assign_nodes_shard, _assign_shard, _greedy_group, _group_arrays,  # noqa: F401
                          _keys_group, _margin_shard, _partition_shard, _read_raw, _subtrees_group, cluster_groups,
                          read_shard)
from ..config import Config
from ..io.pool import Pool
from ..runtime.devices import Devices
from ..errors import ConfigError, InputError

if TYPE_CHECKING:
    from sklearn.linear_model import LogisticRegression

log = logging.getLogger(__name__)

GROUP_ROWS = 250_000  # groups=0: at least one group per this many rows, so a group task holds ~0.4 GB at d=384

# ----------------------------------------------------------------------------------------------
# the driver


def shard_paths(stage_dir: str | Path) -> list[str]:
    """The Parquet shards of an embedding stage directory, in name order."""
    paths = sorted(str(p) for p in Path(stage_dir).glob("shard-*.parquet"))
    if not paths:
        raise InputError(f"{stage_dir} holds no shard-*.parquet files; point at a directory the embedding "
                         f"stage wrote")
    return paths


class Sharded:
    """Vectors in Parquet shards, read by Ray tasks (joins the running Ray); a
    :class:`~ray_pipeline.select.strategy.Vectors`.

    shards: files with ``row`` (the sample's position once renumbered by ``row_map``: 0 <= row
    < n, -1 drops it) and ``embedding`` (L2-normalised, fixed-size lists). groups: how many groups
    the clusters are cut into for the per-cluster tasks (0: twice the cluster's CPUs, and at least
    one per ``GROUP_ROWS`` rows). node_rows: the tree's nodes above this many rows run from the
    driver level by level, the smaller ones whole in a task (:meth:`_tree`).
    """

    def __init__(self, shards: list[str], n: int, cfg: Config, devices: Devices, *,
                 row_map: Optional[np.ndarray] = None, groups: int = 0, node_rows: int = GROUP_ROWS):
        import ray

        self.shards, self.n, self.cfg, self.devices, self.row_map = shards, n, cfg, devices, row_map
        self.node_rows = node_rows
        self.groups = groups or max(2, 2 * int(ray.cluster_resources().get("CPU", 1)), -(-n // GROUP_ROWS))
        self._row_map_ref = None

    @classmethod
    def from_stage(cls, stage_dir: str | Path, pool: Pool, cfg: Config, devices: Devices) -> "Sharded":
        """The vectors of an embedding stage directory as this strategy, their rows renumbered to
        ``pool``'s order by id (a shard row whose id the pool lacks, e.g. skipped, is dropped).
        Reads only the shards' ``id`` and ``row`` columns."""
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        paths = shard_paths(stage_dir)
        tables = [pq.read_table(f, columns=["id", "row"]) for f in paths]
        size = 1 + max((int(pc.max(t.column("row")).as_py() or 0) for t in tables if len(t)), default=0)
        row_map = np.full(size, -1, dtype=np.int64)
        for t in tables:
            row_map[t.column("row").to_numpy()] = pool.positions(t.column("id").to_pylist())
        return cls(paths, len(pool), cfg, devices, row_map=row_map, groups=cfg.select.groups)

    def row_map_ref(self):
        import ray

        if self._row_map_ref is None:
            self._row_map_ref = ray.put(self.row_map)
        return self._row_map_ref

    def _per_shard(self, fn: Callable, *args) -> list:
        """``fn(path, row_map, *args)`` in one Ray task per shard, waited for: the results, in
        shard order."""
        import ray

        task = ray.remote(fn)
        return ray.get([task.remote(p, self.row_map_ref(), *args) for p in self.shards])

    def _cut_by_group(self, assign_ref, group_of_cluster: np.ndarray, groups: int) -> list[list]:
        """Every shard cut by group (:func:`_partition_shard`), not waited for: per shard, its
        ``groups`` piece refs, so that a group's task is given piece g of every shard."""
        import ray

        part = ray.remote(num_returns=groups)(_partition_shard) if groups > 1 else ray.remote(_partition_shard)
        refs = [part.remote(p, self.row_map_ref(), assign_ref, group_of_cluster, groups) for p in self.shards]
        return refs if groups > 1 else [[ref] for ref in refs]

    def subset(self, rows: np.ndarray) -> "Sharded":
        """The rows ``rows`` (sorted) as rows 0..len(rows)-1: the shards stay, the row map narrows."""
        from .kernels import lift

        local = np.full(self.n, -1, dtype=np.int64)
        local[rows] = np.arange(len(rows))
        row_map = local if self.row_map is None else lift(self.row_map, local)
        return Sharded(self.shards, len(rows), self.cfg, self.devices, row_map=row_map, groups=self.groups,
                       node_rows=self.node_rows)

    def probe_margins(self, labels: np.ndarray, train: np.ndarray) -> np.ndarray:
        """(n,) the margin of a linear probe fit on the rows ``train`` (gathered to the driver), every
        row scored by a task per shard."""
        import ray

        rows_t, x_t = _group_arrays(self._per_shard(_read_raw, ray.put(np.sort(train))))
        probe = ray.put(fit_probe(x_t, np.asarray(labels)[rows_t]))
        margin = np.ones(self.n, np.float32)
        for rows, mg in self._per_shard(_margin_shard, probe):
            margin[rows] = mg
        return margin

    def near_duplicates(self) -> np.ndarray:
        raise ConfigError("select.dedup_threshold needs select.engine 'driver' (near-duplicate removal compares "
                          "every pair in a cluster, in the driver's memory)")

    def cluster(self, k: int) -> "_ShardedClustering":
        c = self.cfg.cluster
        if c.algorithm_for(self.n, k) == "hierarchical":
            assign, sim, cut = self._tree(k)
        else:
            (assign, sim), cut = self._flat(k, self.cfg.seed), None
        return _ShardedClustering(self, k, assign, sim, cut)

    def _flat(self, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """k-means over the shards: the seeded training sample gathered to the driver, centroids
        trained there, every row assigned by a task per shard."""
        n, c = self.n, self.cfg.cluster
        wanted = training_rows(n, k, seed=seed, max_points_per_centroid=c.max_points_per_centroid)
        x_s = self._gather(np.arange(n) if wanted is None else wanted)[1]  # None: k-means trains on every row
        centroids = train_centroids(x_s, k, seed=seed, niter=c.niter, gpus=self.devices.faiss_gpus)
        del x_s
        return self._collect(self._per_shard(_assign_shard, centroids), np.ones(n, dtype=bool))

    def _gather(self, wanted: np.ndarray) -> Piece:
        """The rows ``wanted`` (sorted) gathered to the driver (a task per shard), checked and
        normalised as :func:`_group_arrays` does; every one of them must be in some shard."""
        import ray

        rows, x = _group_arrays(self._per_shard(_read_raw, ray.put(wanted)))
        if len(rows) != len(wanted):
            raise InputError(f"the shards hold {len(rows)} of the {len(wanted)} rows k-means needs; the shards "
                             f"do not cover rows 0..{self.n - 1} once each")
        return rows, x

    def _collect(self, results: list, expected: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The per-shard (rows, assign, sim) of an assignment pass as (n,) arrays (-1 / 0 where a row
        was not assigned); every row of the mask ``expected`` must have been."""
        assign, sim = np.full(self.n, -1, dtype=np.int64), np.zeros(self.n, dtype=np.float32)
        for rows, a, s in results:
            assign[rows], sim[rows] = a, s
        missing = np.flatnonzero(expected & (assign < 0))
        if len(missing):
            raise InputError(f"the shards do not cover every row: row {int(missing[0])} is missing")
        return assign, sim

    def _tree(self, k: int) -> tuple[np.ndarray, np.ndarray, Optional["_Cut"]]:
        """Multi-level k-means (``kmeans.hierarchical_kmeans``) over the shards, the driver's leaves
        numbered the same way (depth-first). The levels whose nodes hold more than ``node_rows`` rows
        (the root always) run level by level from the driver: every such node's seeded training
        sample gathered in one pass over the shards and its centroids trained here, then every row
        assigned to its node's centroids by a task per shard. The nodes below that size are cut into
        groups and each node's whole subtree runs in its group's task (``kmeans.subtree``). So no
        task holds more than about ``node_rows`` rows plus a group's share, whatever N, and the
        driver holds the samples (about ``max_points_per_centroid`` x fan-out rows a node) and a
        few ints a row. Returns assign, sim and, where the group tasks made every leaf, their cut
        with the leaves' key samples (:meth:`_finish_tree`)."""
        pending = [(np.arange(self.n), k, (self.cfg.seed,), False)]  # (rows, clusters asked, path, as a leaf)
        done, small = [], []  # done here: (path, leaves, rows, assign, sim); small: (rows, k, path)
        while pending:
            pending = self._tree_level(pending, done, small)
        return self._finish_tree(done, small)

    def _tree_level(self, nodes: list, done: list, small: list) -> list:
        """One level of the tree for ``nodes`` (each split or, as a leaf, clustered); the children
        too large for a task come back for the next level, the others go to ``small``."""
        import ray

        c = self.cfg.cluster
        plan = []  # (rows, k asked, path, clusters made here, leaf?, the sample's pool rows)
        for rows, k_here, path, as_leaf in nodes:
            fan = node_fan(k_here, c.branching, c.leaf)
            leaf = as_leaf or fan == 1
            kk = min(k_here, len(rows)) if leaf else fan
            sample = training_rows(len(rows), kk, seed=node_seed(path), max_points_per_centroid=c.max_points_per_centroid)
            plan.append((rows, k_here, path, kk, leaf, rows if sample is None else rows[sample]))
        rows_s, x_s = self._gather(np.sort(np.concatenate([p[5] for p in plan])))
        centroids = [train_centroids(x_s[np.searchsorted(rows_s, pick)], kk, seed=node_seed(path), niter=c.niter,
                                     gpus=self.devices.faiss_gpus) for _, _, path, kk, _, pick in plan]
        del x_s
        node_of = np.full(self.n, -1, dtype=np.int64)
        for j, p in enumerate(plan):
            node_of[p[0]] = j
        assign, sim = self._collect(self._per_shard(_assign_nodes_shard, ray.put(node_of), ray.put(centroids)),
                                    node_of >= 0)
        below = []
        for rows, k_here, path, kk, leaf, _ in plan:
            a = assign[rows]
            if leaf:
                done.append((path, kk, rows, a, sim[rows]))
                continue
            sizes = np.bincount(a, minlength=kk)
            if int((sizes > 0).sum()) == 1:  # it would not split: one flat k-means of its rows, same seed
                below.append((rows, k_here, path, True))
                continue
            share = child_shares(sizes, k_here)
            for ch in range(kk):
                if share[ch] > 0:
                    child = (rows[a == ch], int(share[ch]), (*path, ch))
                    if len(child[0]) > self.node_rows:
                        below.append((*child, False))
                    else:
                        small.append(child)
        return below

    def _finish_tree(self, done: list, small: list) -> tuple[np.ndarray, np.ndarray, Optional["_Cut"]]:
        """The subtrees of the ``small`` nodes in group tasks, then every leaf numbered in the
        order of its node's path (the driver's depth-first order). A group's nodes are consecutive
        in that order, so its leaves are consecutive clusters and its pieces hold every row of
        them: where no leaf was made here (``done`` empty) the pieces and the keys the group tasks
        computed are the clustering's :class:`_Cut`, and the pool is not cut a second time."""
        import ray

        c = self.cfg.cluster
        leaves: dict[tuple, int] = {path: kk for path, kk, *_ in done}
        results = []
        if small:
            small.sort(key=lambda node: node[2])
            groups = min(self.groups, len(small))
            g_of = cluster_groups(np.array([len(rows) for rows, _, _ in small]), groups)
            node_of = np.full(self.n, len(small), dtype=np.int64)  # len(small): in no group's piece
            for j, (rows, _, _) in enumerate(small):
                node_of[rows] = j
            node_ref = ray.put(node_of)
            pieces = self._cut_by_group(node_ref, np.append(g_of, groups), groups)
            params = {"niter": c.niter, "max_points_per_centroid": c.max_points_per_centroid, "branching": c.branching,
                      "leaf": c.leaf, "gpus": 0}  # tasks ask for CPUs only
            bounds = np.searchsorted(g_of, np.arange(groups + 1))  # group g: small nodes [bounds[g], bounds[g+1])
            live = [g for g in range(groups) if bounds[g + 1] > bounds[g]]
            task = ray.remote(_subtrees_group)
            results = ray.get([task.remote([(kk, path) for _, kk, path in small[bounds[g]:bounds[g + 1]]],
                                           int(bounds[g]), params, node_ref, *[pc[g] for pc in pieces])
                               for g in live])
            for _, _, _, counts, _, _ in results:
                for path, count in counts:
                    leaves[path] = count
        offset, at = 0, {}
        for path in sorted(leaves):
            at[path], offset = offset, offset + leaves[path]
        assign, sim = np.full(self.n, -1, dtype=np.int64), np.zeros(self.n, dtype=np.float32)
        for path, _, rows, a, s in done:
            assign[rows], sim[rows] = a + at[path], s
        if not small:
            return assign, sim, None
        center, key = np.full(offset, -1, dtype=np.int64), np.full(offset, -1, dtype=np.int64)
        for rows, a, s, counts, cg, kg in results:
            # the group's leaves (numbered from 0 over its nodes) as the tree's: each node's run of them
            leaf_at = np.concatenate([np.arange(at[path], at[path] + count) for path, count in counts])
            assign[rows], sim[rows] = leaf_at[a], s
            center[leaf_at], key[leaf_at] = cg, kg
        if done:  # the driver's leaves sit between a group's nodes: its clusters are not one run
            return assign, sim, None
        first = np.array([at[path] for _, _, path in small] + [offset], dtype=np.int64)[bounds]
        return assign, sim, _Cut(pieces, first, (center, key))


@dataclass
class _Cut:
    """The pool's rows cut into groups of consecutive clusters, in the object store: ``pieces``,
    per shard, each group's piece ref (:meth:`Sharded._cut_by_group`); group g holds the clusters
    [bounds[g], bounds[g + 1]); ``keys``: their (center, key) samples where the tasks that cut
    them computed those too (the tree's groups), else None."""

    pieces: list[list]
    bounds: np.ndarray
    keys: Optional[tuple[np.ndarray, np.ndarray]] = None


class _ShardedClustering:
    """One K over the shards (a :class:`~ray_pipeline.select.strategy.Clustering`); the
    cluster-sorted pieces are cut once (or come cut from the tree, ``cut``) and serve the key
    samples and every greedy pass."""

    def __init__(self, vectors: Sharded, k: int, assign: np.ndarray, sim: np.ndarray, cut: Optional[_Cut] = None):
        import ray

        self.vectors, self.k, self.assign, self.sim = vectors, k, assign, sim
        self.assign_ref, self.sim_ref = ray.put(assign), ray.put(sim)
        if cut is None:
            g_of_c = cluster_groups(np.bincount(assign, minlength=k), vectors.groups)
            bounds = np.searchsorted(g_of_c, np.arange(vectors.groups + 1))
            cut = _Cut(vectors._cut_by_group(self.assign_ref, g_of_c, vectors.groups), bounds)
        self.pieces, self.bounds, self.keys = cut.pieces, cut.bounds, cut.keys  # group i: clusters [bounds[i], bounds[i+1])
        self.live = [g for g in range(len(self.bounds) - 1) if self.bounds[g + 1] > self.bounds[g]]

    def _span(self, g: int) -> tuple[int, int]:
        return int(self.bounds[g]), int(self.bounds[g + 1])

    def center_and_key(self) -> tuple[np.ndarray, np.ndarray]:
        import ray

        if self.keys is not None:  # the tree's group tasks computed them
            center, key = (np.full(self.k, -1, dtype=np.int64) for _ in range(2))
            made = len(self.keys[0])  # clusters from there to k are empty
            center[:made], key[:made] = self.keys
            return center, key
        task = ray.remote(_keys_group)
        keys = ray.get([task.remote(*self._span(g), self.assign_ref, self.sim_ref, *[pc[g] for pc in self.pieces])
                        for g in self.live])
        center, key = np.full(self.k, -1, dtype=np.int64), np.full(self.k, -1, dtype=np.int64)
        for g, (c, kk) in zip(self.live, keys):
            lo, hi = self._span(g)
            center[lo:hi], key[lo:hi] = c, kk
        return center, key

    def greedy(self, run_to: np.ndarray, key: np.ndarray, eligible: Optional[np.ndarray],
               method: str = "kcenter") -> np.ndarray:
        import ray

        task = ray.remote(_greedy_group)
        refs = [ray.put(eligible), ray.put(run_to), ray.put(key)]
        rank = np.full(self.vectors.n, -1, dtype=np.int64)
        for rows, r in ray.get([task.remote(*self._span(g), method, self.assign_ref, *refs,
                                            *[pc[g] for pc in self.pieces])
                                for g in self.live]):
            rank[rows] = r
        return rank
