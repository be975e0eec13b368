"""The selection's kernels (METHOD.md steps 3-7): pure functions over arrays, no IO, no config.

- :func:`center_and_key_samples`: per cluster, the member nearest its centroid (center sample)
  and the other member nearest the center sample (key sample).
- :func:`proportional_budgets`: n_k = M |C_k| / N, largest-remainder rounded, capped.
- :func:`k_center_greedy`: farthest-first traversal inside every cluster at once, started at the
  key samples. Returns the greedy *rank* of each sample in its cluster, so one pass to the
  largest budget yields every smaller budget as a prefix.
- :func:`centroid_ranks`, :func:`outlier_mask`, :func:`semantic_duplicates`,
  :func:`random_ranks`: the variants and the random baseline.
- :func:`lift`: row indices of a subset as rows of the whole, -1 kept (an empty cluster's center,
  a row a map drops).

The torch kernels run on whatever device their input tensors live on. The slow, obvious
references they are tested against live in ``tests/reference.py``.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import InputError

# ----------------------------------------------------------------------------------------------
# segment and index primitives


def lift(idx: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Positions into ``rows`` as the values they point at, -1 (none) kept as -1.

    idx: any shape, int, each -1 or in [0, len(rows)). rows: (r,) int64, e.g. the pool rows of a
    subset, or a row map. Returns int64 shaped like idx: ``rows[idx]`` where idx >= 0, else -1.
    ``rows`` may be empty when idx holds only -1 (a group of empty clusters). O(idx.size).

    Example:
        >>> lift(np.array([2, -1, 0]), np.array([10, 20, 30]))
        array([30, -1, 10])
        >>> lift(np.array([-1]), np.array([], dtype=np.int64))
        array([-1])
    """
    idx = np.asarray(idx)
    out = np.full(idx.shape, -1, dtype=np.int64)
    hit = idx >= 0
    out[hit] = rows[idx[hit]]
    return out


def segment_argmax(values: torch.Tensor, seg: torch.Tensor, n_seg: int) -> torch.Tensor:
    """Index of the largest value in each segment (the lowest index among ties); -1 if empty.

    values: (n,) float tensor. seg: (n,) int64 segment id of each value, in [0, n_seg).
    Segments need not be contiguous. O(n) work, two scatter-reductions, no host sync.
    NaN values are not supported (they never compare equal to the max).
    """
    n = values.shape[0]
    top = torch.full((n_seg,), float("-inf"), dtype=values.dtype, device=values.device)
    top = top.scatter_reduce(0, seg, values, reduce="amax", include_self=True)
    pos = torch.arange(n, device=values.device)
    cand = torch.where(values == top[seg], pos, n)
    first = torch.full((n_seg,), n, dtype=torch.int64, device=values.device)
    first = first.scatter_reduce(0, seg, cand, reduce="amin", include_self=True)
    return torch.where(first == n, -1, first)


def _rowwise_dot(a: torch.Tensor, table: torch.Tensor, index: torch.Tensor, chunk_rows: int) -> torch.Tensor:
    """(p,) ``a[i] . table[index[i]]`` for the (p, d) rows of ``a``; index: (p,) int64 rows of
    ``table``. Gathered ``chunk_rows`` at a time, so the temporary is (chunk_rows, d), never (p, d)."""
    out = torch.empty(a.shape[0], dtype=a.dtype, device=a.device)
    for lo in range(0, a.shape[0], chunk_rows):
        hi = min(lo + chunk_rows, a.shape[0])
        out[lo:hi] = (a[lo:hi] * table[index[lo:hi]]).sum(dim=1)
    return out


def _sq_dist_to_own_center(xb: torch.Tensor, nb: torch.Tensor, seg: torch.Tensor, centers: torch.Tensor,
                           nc: torch.Tensor, strategy: str, chunk_rows: int) -> torch.Tensor:
    """Squared distance of each row to the center of its own segment: |x|^2 + |c|^2 - 2 x.c.

    xb: (p, d) rows, nb: (p,) their squared norms, seg: (p,) segment of each row in [0, a),
    centers: (a, d), nc: (a,) their squared norms. ``gemm``: one (p, a) matrix product, then the
    own column of each row (a times the dot products, but at BLAS speed: best when a block holds
    few clusters, as on a CPU). ``rowwise``: gathered row-by-row dot products in pieces of
    ``chunk_rows`` (no wasted work: best when a block holds every cluster, as on a GPU).
    """
    if strategy == "gemm":
        dot = (xb @ centers.T).gather(1, seg[:, None])[:, 0]
    else:
        dot = _rowwise_dot(xb, centers, seg, chunk_rows)
    return (nb + nc[seg] - 2.0 * dot).clamp_(min=0.0)


def _default_block_rows(x: torch.Tensor) -> int:
    # The greedy runs every step of a block of clusters before the next block. On a GPU one block
    # holds every cluster (one step advances all of them); on a CPU a block is about 4 MB of rows,
    # so a block's steps run from cache instead of streaming all of x from memory once per step.
    if x.device.type != "cpu":
        return max(1, x.shape[0])
    return max(1024, (4 << 20) // max(1, x.shape[1] * x.element_size()))


def _cluster_blocks(sizes: np.ndarray, block_rows: int) -> list[tuple[int, int]]:
    """Consecutive cluster ranges [c0, c1) of about ``block_rows`` rows (a bigger cluster alone)."""
    blocks, c0, rows = [], 0, 0
    for c, size in enumerate(sizes):
        if rows and rows + size > block_rows:
            blocks.append((c0, c))
            c0, rows = c, 0
        rows += int(size)
    if len(sizes):
        blocks.append((c0, len(sizes)))
    return blocks


# ----------------------------------------------------------------------------------------------
# step 3-4: center and key samples


def center_and_key_samples(x: torch.Tensor, assign: torch.Tensor, centroid_sim: torch.Tensor,
                           k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Center and key sample of every cluster (METHOD.md steps 3-4).

    x: (n, d) float tensor of L2-normalised rows. assign: (n,) int64 cluster of each row in
    [0, k). centroid_sim: (n,) similarity of each row to its own centroid (from k-means).
    Returns (center, key), each (k,) int64 row indices: the member most similar to the centroid,
    and the member other than the center most cosine-similar to the center. A singleton
    cluster's key is its center; an empty cluster has -1 for both. Ties: the lowest index.

    Example:
        >>> x = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8], [0.0, 1.0]])
        >>> assign = torch.tensor([0, 0, 0, 1])
        >>> sim = torch.tensor([0.8, 1.0, 0.96, 1.0])  # centroid 0 at (0.8, 0.6)
        >>> center_and_key_samples(x, assign, sim, 2)
        (tensor([1, 3]), tensor([2, 3]))
    """
    center = segment_argmax(centroid_sim, assign, k)
    owner = center[assign]  # (n,) the center sample of each row's cluster
    sim_to_center = _rowwise_dot(x, x, owner, chunk_rows=8192)
    rows = torch.arange(x.shape[0], device=x.device)
    sim_to_center[rows == owner] = float("-inf")  # the center itself is not a key candidate
    key = segment_argmax(sim_to_center, assign, k)
    # A singleton's only value is -inf, which is its max: key == center, as documented.
    return center, key


# ----------------------------------------------------------------------------------------------
# step 5: budgets


def proportional_budgets(weights: np.ndarray, total: int, caps: np.ndarray | None = None) -> np.ndarray:
    """Split ``total`` into integers proportional to ``weights``, each <= its cap, summing to total.

    n_k = M |C_k| / N (METHOD.md step 5) with ``weights`` the cluster sizes and ``caps`` what each
    cluster can give (default: its size). weights, caps: (k,) non-negative ints. Exact integer
    arithmetic: floors first, then one more to the largest remainders (ties: larger weight, then
    lower index). A share above its cap is clipped and the excess split again among the others,
    by weight. Not monotone in ``total`` (the Alabama paradox): a cluster can get fewer at a larger
    total, which is why the selection runs each cluster to the most any budget asks of it.

    Example:
        >>> proportional_budgets(np.array([5, 3, 2]), 4)
        array([2, 1, 1])
        >>> proportional_budgets(np.array([5, 3, 2]), 4, caps=np.array([1, 3, 2]))
        array([1, 2, 1])
    """
    weights = np.asarray(weights, dtype=np.int64)
    caps = weights if caps is None else np.asarray(caps, dtype=np.int64)
    if total < 0 or total > int(caps.sum()):
        raise InputError(f"cannot place {total} samples in clusters holding {int(caps.sum())}; "
                         f"choose a budget between 0 and {int(caps.sum())}")
    out = np.zeros_like(weights)
    left = int(total)
    open_ = caps > 0
    while left > 0:
        w = np.where(open_, weights, 0)
        if w.sum() == 0:  # only zero-weight clusters have room: fill them by index order
            w = open_.astype(np.int64)
        wsum = int(w.sum())
        floor = (left * w) // wsum
        rem = (left * w) % wsum
        extra = left - int(floor.sum())
        order = np.lexsort((np.arange(len(w)), -w, -rem))  # last key sorts first
        share = floor.copy()
        share[order[:extra]] += 1
        share = np.minimum(share, caps - out)
        out += share
        left -= int(share.sum())
        open_ = out < caps
    return out


# ----------------------------------------------------------------------------------------------
# step 6: k-center greedy


def _check_greedy_inputs(x, assign, budgets, starts, eligible):
    k = budgets.shape[0]
    if x.ndim != 2 or assign.shape != (x.shape[0],) or starts.shape != (k,):
        raise ValueError(f"shapes do not match: x {tuple(x.shape)}, assign {tuple(assign.shape)}, "
                         f"budgets {tuple(budgets.shape)}, starts {tuple(starts.shape)}")
    sizes = torch.bincount(assign if eligible is None else assign[eligible], minlength=k)
    if bool((budgets < 0).any()) or bool((budgets > sizes).any()):
        raise ValueError("every budget must be between 0 and its cluster's (eligible) size")
    live = budgets > 0
    if bool((starts[live] < 0).any()) or bool((assign[starts[live]] != torch.nonzero(live)[:, 0]).any()):
        raise ValueError("every cluster with a budget needs a start row that belongs to it")


def k_center_greedy(x: torch.Tensor, assign: torch.Tensor, budgets: torch.Tensor,
                    starts: torch.Tensor, *, eligible: torch.Tensor | None = None,
                    block_rows: int | None = None, strategy: str = "auto",
                    chunk_rows: int = 1 << 16) -> torch.Tensor:
    """Farthest-first traversal in every cluster at once; returns each row's greedy rank.

    x: (n, d) float tensor (float32 or float64; distances are computed in its dtype).
    assign: (n,) int64 cluster of each row in [0, k). budgets: (k,) int64, 0 <= b_k <= |C_k|.
    starts: (k,) int64 row index of each cluster's first pick (its key sample); ignored where
    the budget is 0. eligible: optional (n,) bool; rows that are False are never picked (the
    robust variant leaves out each cluster's outliers) and budgets count eligible rows only.
    All on one device; the result stays there.

    Returns rank: (n,) int64, the step at which the row was chosen in its cluster (0 for the
    start), -1 if it was not. Cluster k's subset for any budget b <= b_k is ``rank < b`` on its
    members, so the largest budgets give every smaller one.

    Clusters are laid out by budget, largest first, and cut into blocks of about ``block_rows``
    rows: every cluster in one block on a GPU, cache-sized blocks on a CPU. Within a block, one
    step advances every cluster that still has budget: a segment argmax of the running
    squared-distance-to-chosen vector, then one update of it (``strategy``: ``gemm`` on a CPU,
    ``rowwise`` on a GPU; see :func:`_sq_dist_to_own_center`). The clusters still picking are
    always a prefix of the block, so finished clusters cost nothing. Work O(sum_k |C_k| b_k d),
    as a per-cluster loop, in O(n_blocks * max b_k) steps instead of O(M); memory O(n) beyond x
    plus one block's rows, never an n x M distance matrix. Ties: the lowest row index.

    Example:
        >>> x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [3.0, 0.0], [10.0, 0.0], [11.0, 0.0]])
        >>> k_center_greedy(x, torch.tensor([0, 0, 0, 1, 1]), torch.tensor([3, 1]),
        ...                 torch.tensor([1, 4]))
        tensor([ 2,  0,  1, -1,  0])
    """
    _check_greedy_inputs(x, assign, budgets, starts, eligible)
    device = x.device
    n, k = x.shape[0], budgets.shape[0]
    if strategy == "auto":
        strategy = "gemm" if device.type == "cpu" else "rowwise"
    b_host = budgets.cpu().numpy()
    # Lay clusters out by budget, largest first (stable), and rows by cluster.
    corder = np.argsort(-b_host, kind="stable")
    cpos = np.empty(k, dtype=np.int64)
    cpos[corder] = np.arange(k)
    seg, perm = torch.sort(torch.as_tensor(cpos, device=device)[assign], stable=True)
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(n, device=device)
    first = inv[starts[torch.as_tensor(corder, device=device)]]  # start rows, as sorted positions

    b_sorted = b_host[corder]
    sizes_sorted = np.bincount(cpos[assign.cpu().numpy()], minlength=k)
    row_end = np.cumsum(sizes_sorted)  # cluster position j holds sorted rows [row_end[j] - size, row_end[j])
    rank = torch.full((n,), -1, dtype=torch.int64, device=device)

    for c0, c1 in _cluster_blocks(sizes_sorted, block_rows or _default_block_rows(x)):
        steps = int(b_sorted[c0])  # the block's largest budget
        if steps == 0:
            break  # budgets are sorted: every later block is empty too
        r0, r1 = (int(row_end[c0 - 1]) if c0 else 0), int(row_end[c1 - 1])
        rows = perm[r0:r1]
        xb, sb = x[rows], seg[r0:r1] - c0  # the block, gathered once (cache-sized on a CPU)
        nb = torch.linalg.vector_norm(xb, dim=1).square_()
        mind = torch.full((r1 - r0,), float("inf"), dtype=x.dtype, device=device)
        if eligible is not None:
            mind[~eligible[rows]] = float("-inf")  # never picked; the min-update keeps them -inf
        rank_b = torch.full((r1 - r0,), -1, dtype=torch.int64, device=device)
        for t in range(steps):
            a = int((b_sorted[c0:c1] > t).sum())  # clusters still picking: block positions [0, a)
            p = int(row_end[c0 + a - 1]) - r0  # their rows: [0, p)
            pick = first[c0:c0 + a] - r0 if t == 0 else segment_argmax(mind[:p], sb[:p], a)
            rank_b[pick] = t
            mind[pick] = float("-inf")  # chosen rows are never chosen again, even among duplicates
            if t == steps - 1:
                break
            d2 = _sq_dist_to_own_center(xb[:p], nb[:p], sb[:p], xb[pick], nb[pick], strategy, chunk_rows)
            torch.minimum(mind[:p], d2, out=mind[:p])
        rank[rows] = rank_b
    return rank


def centroid_ranks(assign: np.ndarray, centroid_sim: np.ndarray, k: int) -> np.ndarray:
    """The nearest-to-centroid variant: each row's rank in its cluster by similarity to the
    centroid, most similar first (ties: lower index). The subset for budget b is ``rank < b``."""
    n = len(assign)
    order = np.lexsort((np.arange(n), -centroid_sim, assign))
    start = np.concatenate([[0], np.cumsum(np.bincount(assign, minlength=k))])[:-1]
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n) - start[assign[order]]
    return rank


def outlier_mask(assign: np.ndarray, centroid_sim: np.ndarray, k: int, quantile: float,
                 keep: np.ndarray) -> np.ndarray:
    """(n,) bool: False for the ``quantile`` share of each cluster farthest from its centroid
    (rounded down, so small clusters keep everyone); rows in ``keep`` (the key samples) stay True."""
    if quantile <= 0:
        return np.ones(len(assign), dtype=bool)
    ascending = centroid_ranks(assign, -centroid_sim, k)  # 0 = farthest from the centroid
    sizes = np.bincount(assign, minlength=k)
    drop = ascending < np.floor(quantile * sizes[assign])
    mask = ~drop
    mask[keep[keep >= 0]] = True
    return mask


def semantic_duplicates(x: torch.Tensor, assign: torch.Tensor, sim: torch.Tensor, k: int,
                        threshold: float, chunk_rows: int = 2048) -> torch.Tensor:
    """(n,) bool, True for a near-duplicate to remove (SemDeDup, Abbas et al. 2023, section 3).

    x: (n, d) unit rows; assign: (n,) cluster of each row in [0, k); sim: (n,) similarity to its
    centroid. In each cluster the members are ordered by similarity to the centroid, farthest
    first (ties: lower index first), and a member is a duplicate when its cosine similarity to a
    member *earlier* in that order exceeds ``threshold``; so of a group of near-copies the one
    farthest from the centroid stays. Work O(sum_k |C_k|^2 d), in pieces of ``chunk_rows`` rows.

    Example:
        >>> x = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [0.28, 0.96]])
        >>> semantic_duplicates(x, torch.zeros(4, dtype=torch.int64), torch.tensor([.7, .99, .7, .98]), 1, 0.95)
        tensor([False, False, False,  True])
    """
    n = x.shape[0]
    dup = torch.zeros(n, dtype=torch.bool, device=x.device)
    order = torch.from_numpy(np.lexsort((np.arange(n), sim.cpu().numpy(), assign.cpu().numpy()))).to(x.device)
    sizes = torch.bincount(assign, minlength=k).cpu().numpy()
    lo = 0
    for size in sizes:
        members = order[lo:lo + size]  # farthest from the centroid first
        lo += int(size)
        if size < 2:
            continue
        xm = x[members]
        for r0 in range(0, int(size), chunk_rows):
            r1 = min(r0 + chunk_rows, int(size))
            s = xm[r0:r1] @ xm[:r1].T  # (rows, rows and everything before them)
            earlier = torch.arange(r1, device=x.device)[None, :] < torch.arange(r0, r1, device=x.device)[:, None]
            s = torch.where(earlier, s, torch.full_like(s, float("-inf")))
            dup[members[r0:r1]] = s.max(dim=1).values > threshold
    return dup


# ----------------------------------------------------------------------------------------------
# step 7: candidates


def random_ranks(n: int, rng: np.random.Generator) -> np.ndarray:
    """A random order of the pool as a rank per row: the random subset of size m is ``rank < m``,
    so random subsets of one seed are nested, like the greedy ones."""
    rank = np.empty(n, dtype=np.int64)
    rank[rng.permutation(n)] = np.arange(n)
    return rank
