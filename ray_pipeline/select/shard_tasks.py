"""The shard engine's pure parts: reading a shard, cutting clusters into groups, and the bodies of
its Ray tasks (plain functions over arrays; :mod:`~ray_pipeline.select.sharded` wraps them with
``ray.remote`` where they run)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import numpy as np

from .boundary import probe_margins
from .kmeans import assign as assign_rows
from .kmeans import subtree
from ..io.pool import check_vectors

if TYPE_CHECKING:
    from sklearn.linear_model import LogisticRegression

Piece = tuple[np.ndarray, np.ndarray]  # (rows (r,) int64 pool rows, x (r, d) their vectors as the shard holds them)

# ----------------------------------------------------------------------------------------------
# pure helpers


def read_shard(path: str, row_map: Optional[np.ndarray] = None,
               rows_wanted: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
    """(rows (r,) int64, x (r, d) float32) of one shard; ``row_map`` renumbers the file's ``row``
    column (-1 drops the row); ``rows_wanted`` (sorted) keeps only those rows. The vectors are
    normalised as :func:`io.pool.load_embeddings` normalises the whole stage for the driver engine
    (row by row, so the same bits): without it a tie between two members that the driver's copy
    breaks one way can break the other way here."""
    rows, x = _read_raw(path, row_map, rows_wanted)
    return rows, check_vectors(x, path) if len(x) else x.astype(np.float32)


def _read_raw(path: str, row_map: Optional[np.ndarray] = None,
              rows_wanted: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
    """:func:`read_shard` before the check: x (r, d) as the file holds it (float16 or float32),
    not normalised. What the partition ships, so a float16 stage crosses the object store at half
    the bytes; :func:`_group_arrays` checks and normalises it there (row by row: the same bits)."""
    import pyarrow.parquet as pq

    t = pq.read_table(path, columns=["row", "embedding"])
    rows = t.column("row").to_numpy().astype(np.int64)
    emb = t.column("embedding").combine_chunks()
    x = emb.values.to_numpy(zero_copy_only=False).reshape(len(t), -1)
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


def _group_arrays(pieces: list[Piece]) -> Piece:
    """The pieces of one group (one from each shard) as one, its rows ascending (pool order), x
    checked and normalised to float32 (the pieces are :func:`_read_raw`'s). Each piece is written
    straight to its rows' places in the one float32 array, normalised there in place: the group
    costs its float32 vectors and no second copy (a concatenation, then its sorted copy, then
    the float32 cast were three)."""
    rows = np.concatenate([p[0] for p in pieces])
    order = np.argsort(rows, kind="stable")
    place = np.empty(len(rows), dtype=np.int64)
    place[order] = np.arange(len(rows))  # where each piece's row goes in pool order
    d = pieces[0][1].shape[1] if pieces else 0
    x, at = np.empty((len(rows), d), dtype=np.float32), 0
    for _, xp in pieces:
        x[place[at:at + len(xp)]] = xp  # float16 -> float32 is exact: the bits the cast gave
        at += len(xp)
    return rows[order], check_vectors(x, "a cluster group of the shards") if len(x) else x


# ----------------------------------------------------------------------------------------------
# task bodies (plain functions; wrapped with ray.remote where they run). row_map: as
# :func:`read_shard`'s; assign, sim, eligible: (n,) over the pool's rows (int64, float32, bool);
# pieces: one :data:`Piece` from each shard, what :func:`_partition_shard` cut for the group.


def _assign_shard(path: str, row_map: Optional[np.ndarray],
                  centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One shard's rows (r,) int64, their nearest of the (k, d) float32 ``centroids`` (r,) int64
    and their similarity to it (r,) float32 (:func:`kmeans.assign`)."""
    rows, x = read_shard(path, row_map)
    a, s = assign_rows(x, centroids)
    return rows, a, s


def _margin_shard(path: str, row_map: Optional[np.ndarray],
                  probe: Optional[LogisticRegression]) -> tuple[np.ndarray, np.ndarray]:
    """One shard's rows (r,) int64 and the margins (r,) float32 of ``probe``
    (:func:`boundary.fit_probe`'s; None: all 1) on them."""
    rows, x = read_shard(path, row_map)
    return rows, probe_margins(probe, x)


def _partition_shard(path: str, row_map: Optional[np.ndarray], assign: np.ndarray, group_of_cluster: np.ndarray,
                     groups: int) -> Piece | tuple[Piece, ...]:
    """One shard cut by group: for each group g, the :data:`Piece` of the shard's rows whose
    cluster (``assign``) is in g (``group_of_cluster``: (k,) int64 in [0, groups)). One return
    value per group (the task runs with ``num_returns=groups``), so a group's task fetches only
    its own pieces."""
    rows, x = _read_raw(path, row_map)
    g = group_of_cluster[assign[rows]]
    out = tuple((rows[g == i], x[g == i]) for i in range(groups))
    return out if groups > 1 else out[0]  # one return value per group


def _subtrees_group(nodes: list[tuple[int, tuple[int, ...]]], first: int, params: dict[str, int],
                    node_of: np.ndarray, *pieces: Piece) -> tuple:
    """The subtrees of a group of tree nodes, each :func:`kmeans.subtree` of its own rows at its path
    (``nodes``: (clusters asked, path) of the nodes ``first``, ``first + 1``, ... of ``node_of``,
    (n,) int64 each row's node), and the center and key samples of their leaves: the group holds
    every row of those leaves, so the keys are :func:`_keys_group`'s without a second pass over
    the vectors. The group's leaves are numbered node after node, from 0. Returns rows (r,) int64
    ascending, their leaf (r,) int64, similarity to it (r,) float32, each node's (path, leaves),
    and center, key ((leaves,) int64 pool rows, -1 for an empty leaf)."""
    import torch

    from .kernels import center_and_key_samples, lift

    rows, x = _group_arrays(list(pieces))
    node = node_of[rows]
    leaf, sim, counts, made = np.empty(len(rows), dtype=np.int64), np.empty(len(rows), dtype=np.float32), [], 0
    for j, (k, path) in enumerate(nodes):
        mine = node == first + j
        r = subtree(x, k, path=path, rows=np.flatnonzero(mine), **params)  # in pool order, as the driver's tree
        leaf[mine], sim[mine] = r.assign + made, r.sim
        counts.append((path, len(r.centroids)))
        made += len(r.centroids)
    center, key = center_and_key_samples(torch.from_numpy(x), torch.from_numpy(leaf), torch.from_numpy(sim), made)
    return rows, leaf, sim, counts, lift(center.numpy(), rows), lift(key.numpy(), rows)


def _assign_nodes_shard(path: str, row_map: Optional[np.ndarray], node_of: np.ndarray,
                        centroids: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One level of the tree on one shard: each row of a node ``j`` (``node_of``: (n,) int64, -1
    for a row in none) assigned to that node's ``centroids[j]`` (:func:`kmeans.assign`). Returns
    those rows (r,) int64, their cluster within the node (r,) int64 and similarity (r,) float32."""
    rows, x = read_shard(path, row_map)
    node = node_of[rows]
    keep = node >= 0
    rows, x, node = rows[keep], x[keep], node[keep]
    a, s = np.empty(len(rows), dtype=np.int64), np.empty(len(rows), dtype=np.float32)
    for j in np.unique(node):
        mine = node == j
        a[mine], s[mine] = assign_rows(x[mine], centroids[j])
    return rows, a, s


def _keys_group(c0: int, c1: int, assign: np.ndarray, sim: np.ndarray, *pieces: Piece) -> tuple[np.ndarray, np.ndarray]:
    """Center and key samples of the clusters [c0, c1) (:func:`kernels.center_and_key_samples`)
    over the group's rows: (center, key), each (c1 - c0,) int64 pool rows, -1 for an empty cluster."""
    import torch

    from .kernels import center_and_key_samples, lift

    rows, x = _group_arrays(list(pieces))
    local = torch.from_numpy(assign[rows] - c0)
    center, key = center_and_key_samples(torch.from_numpy(x), local, torch.from_numpy(sim[rows]), c1 - c0)
    return lift(center.numpy(), rows), lift(key.numpy(), rows)


def _greedy_group(c0: int, c1: int, method: str, assign: np.ndarray, eligible: Optional[np.ndarray],
                  run_to: np.ndarray, key: np.ndarray, *pieces: Piece) -> tuple[np.ndarray, np.ndarray]:
    """k-center greedy (:func:`kernels.k_center_greedy`) or, ``method`` ``facility``, facility
    location (:func:`facility.facility_location`) of the clusters [c0, c1) over the group's rows.
    run_to, key: (k,) int64 over every cluster (picks, and start pool rows). eligible: None for
    every row. Returns rows (r,) int64 ascending and their rank (r,) int64."""
    import torch

    from .facility import facility_location
    from .kernels import k_center_greedy

    rows, x = _group_arrays(list(pieces))
    local = torch.from_numpy(assign[rows] - c0)
    starts = np.searchsorted(rows, np.maximum(key[c0:c1], 0))  # rows are sorted: global -> local
    el = None if eligible is None else torch.from_numpy(eligible[rows])
    if method == "facility":
        return rows, facility_location(torch.from_numpy(x), local, torch.from_numpy(np.array(run_to[c0:c1])),
                                       eligible=el).numpy()
    rank = k_center_greedy(torch.from_numpy(x), local, torch.from_numpy(np.array(run_to[c0:c1])),
                           torch.from_numpy(starts), eligible=el)
    return rows, rank.numpy()
