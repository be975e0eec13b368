"""Facility location per cluster: the ``facility`` candidate family's kernel. Pure, no IO, no config.

k-center greedy (:func:`~ray_pipeline.select.kernels.k_center_greedy`) minimises the largest
distance from a member to the chosen set, so as a cluster's budget grows it spends picks on the
cluster's outliers. Facility location maximises how well *every* member is represented:

    f(S) = sum_i max_{j in S} sim(i, j)

over the cluster's members i, greedily (each step adds the member with the largest gain, which
is within 1 - 1/e of the best set of that size: f is monotone submodular). ``sim`` is apricot's
``metric='cosine'`` similarity of the L2-normalised rows, the *squared* cosine (x_i . x_j)^2: it is
never negative, so the empty set's value 0 is a true floor, and apricot's greedy on the same rows
is the reference the tests hold this kernel to, index for index.

Per cluster, so the similarity matrix is a cluster's, n_k x n_k, never N x N: the clusters are
processed in blocks whose padded sum of n_k^2 stays under ``block_pairs`` (a cluster above it
alone, its similarities recomputed in row pieces at every step). With the method's budgets
(proportional_budgets) each cluster gets its share, as k-center does.

The first pick is the objective's own (the member with the largest total similarity, the
cluster's medoid by squared cosine), not the key sample: k-center needs a seed and takes the
key sample; facility location's greedy has a best first pick, and starting elsewhere would only
lower f. ``starts`` can still force one (apricot's ``initial_subset``).
"""

from __future__ import annotations

import numpy as np
import torch

DEFAULT_BLOCK_PAIRS = 1 << 23  # similarity entries per block: 32 MB in float32, twice that with the step's temporary


def facility_location(x: torch.Tensor, assign: torch.Tensor, budgets: torch.Tensor, *,
                      starts: torch.Tensor | None = None, eligible: torch.Tensor | None = None,
                      block_pairs: int = DEFAULT_BLOCK_PAIRS) -> torch.Tensor:
    """Greedy facility location in every cluster; returns each row's greedy rank in its cluster.

    x: (n, d) float tensor of L2-normalised rows (similarities in its dtype). assign: (n,) int64
    cluster of each row in [0, k). budgets: (k,) int64, 0 <= b_k <= |C_k| (eligible members).
    starts: optional (k,) int64 row of each cluster's forced first pick (-1: the greedy's own).
    eligible: optional (n,) bool; False rows are never picked but still count as members to be
    represented. All on one device; the result stays there.

    Returns rank: (n,) int64, the step at which the row was chosen in its cluster, -1 if not:
    cluster k's subset for any b <= b_k is ``rank < b`` on its members (greedy orders are
    prefixes). Ties: the lowest row index. Work O(sum_k n_k^2 (d + b_k)); memory O(n) plus one
    block: at most ``block_pairs`` similarities and a temporary of the same size. The result
    depends on each cluster alone (its own matrix product and sums), not on which clusters share
    its block, so a task over any group of clusters gives the same ranks.

    Example:
        >>> x = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8], [0.0, 1.0]])
        >>> facility_location(x, torch.zeros(4, dtype=torch.int64), torch.tensor([2]))
        tensor([-1,  0, -1,  1])
    """
    n, k = x.shape[0], budgets.shape[0]
    if x.ndim != 2 or assign.shape != (n,) or (starts is not None and starts.shape != (k,)):
        raise ValueError(f"shapes do not match: x {tuple(x.shape)}, assign {tuple(assign.shape)}, "
                         f"budgets {tuple(budgets.shape)}")
    sizes = torch.bincount(assign if eligible is None else assign[eligible], minlength=k)
    if bool((budgets < 0).any()) or bool((budgets > sizes[:k]).any()):
        raise ValueError("every budget must be between 0 and its cluster's (eligible) size")
    device = x.device
    rank = torch.full((n,), -1, dtype=torch.int64, device=device)
    a_host, b_host = assign.cpu().numpy(), budgets.cpu().numpy()
    order = np.argsort(a_host, kind="stable")  # rows by cluster, pool order inside
    bounds = np.concatenate([[0], np.cumsum(np.bincount(a_host, minlength=k))])
    live = np.flatnonzero(b_host > 0)
    live = live[np.argsort(-(bounds[live + 1] - bounds[live]), kind="stable")]  # largest first: little padding
    s_host = None if starts is None else starts.cpu().numpy()
    el = None if eligible is None else eligible

    def members(c: int) -> torch.Tensor:
        return torch.from_numpy(order[bounds[c]:bounds[c + 1]]).to(device)

    i = 0
    while i < len(live):
        size = int(bounds[live[i] + 1] - bounds[live[i]])
        if size * size > block_pairs:  # alone, streamed
            c = int(live[i])
            rows = members(c)
            start = -1 if s_host is None else int(s_host[c])
            forced = -1 if start < 0 else int(np.flatnonzero(order[bounds[c]:bounds[c + 1]] == start)[0])
            ok = None if el is None else el[rows]
            rank[rows] = _streamed(x[rows], int(b_host[c]), forced, ok, block_pairs)
            i += 1
            continue
        j = i + max(1, block_pairs // (size * size))
        block = [int(c) for c in live[i:j]]
        i = j
        rows = [members(c) for c in block]
        forced = []
        for c, r in zip(block, rows):
            start = -1 if s_host is None else int(s_host[c])
            forced.append(-1 if start < 0 else int(np.flatnonzero(order[bounds[c]:bounds[c + 1]] == start)[0]))
        ranks = _dense_block(x, rows, [int(b_host[c]) for c in block], forced, el, size)
        for r, rk in zip(rows, ranks):
            rank[r] = rk
    return rank


def _dense_block(x: torch.Tensor, rows: list[torch.Tensor], budgets: list[int], forced: list[int],
                 eligible: torch.Tensor | None, width: int) -> list[torch.Tensor]:
    """The greedy of a block of B clusters at once. rows: B tensors of member rows (pool order);
    width: the largest cluster's size. Each cluster's (n_k, n_k) squared-cosine matrix is its own
    product, copied into a zero-padded (B, width, width) tensor: a padded member has similarity 0
    to all (it adds nothing to any gain) and is never picked. Returns B (n_k,) rank tensors."""
    B, device = len(rows), x.device
    s = torch.zeros((B, width, width), dtype=x.dtype, device=device)
    pickable = torch.zeros((B, width), dtype=torch.bool, device=device)
    for b, r in enumerate(rows):
        xm = x[r]
        s[b, :len(r), :len(r)] = (xm @ xm.T).square_()
        pickable[b, :len(r)] = True if eligible is None else eligible[r]
    cur = torch.zeros((B, width), dtype=x.dtype, device=device)  # max similarity to the chosen, per member
    rank = torch.full((B, width), -1, dtype=torch.int64, device=device)
    tmp = torch.empty_like(s)
    bud = torch.tensor(budgets, device=device)
    forced_t = torch.tensor(forced, device=device)
    arange = torch.arange(B, device=device)
    for t in range(max(budgets)):
        # gain of candidate j: sum_i max(s_ij - cur_i, 0), summed over i in order (padding adds +0)
        gains = torch.sub(s, cur[:, :, None], out=tmp).clamp_(min=0).sum(dim=1)
        gains.masked_fill_(~pickable, float("-inf"))
        pick = gains.argmax(dim=1)  # the first of equal maxima: the lowest row
        if t == 0:
            pick = torch.where(forced_t >= 0, forced_t, pick)
        going = bud > t
        rank[arange[going], pick[going]] = t
        pickable[arange[going], pick[going]] = False
        col = s.gather(2, pick[:, None, None].expand(B, width, 1))[:, :, 0]  # s_i,pick
        cur = torch.where(going[:, None], torch.maximum(cur, col), cur)
    return [rank[b, :len(r)] for b, r in enumerate(rows)]


def _streamed(xm: torch.Tensor, budget: int, forced: int, eligible: torch.Tensor | None,
              block_pairs: int) -> torch.Tensor:
    """The greedy of one cluster too large for a block: its similarities recomputed at every step
    in pieces of rows, so memory is ``block_pairs`` whatever n_k; work O(b n_k^2 d)."""
    m = xm.shape[0]
    piece = max(1, block_pairs // m)
    cur = torch.zeros(m, dtype=xm.dtype, device=xm.device)
    rank = torch.full((m,), -1, dtype=torch.int64, device=xm.device)
    blocked = torch.zeros(m, dtype=torch.bool, device=xm.device) if eligible is None else ~eligible
    for t in range(budget):
        if t == 0 and forced >= 0:
            pick = forced
        else:
            gains = torch.zeros(m, dtype=xm.dtype, device=xm.device)
            for lo in range(0, m, piece):
                s = (xm[lo:lo + piece] @ xm.T).square_()
                gains += s.sub_(cur[lo:lo + piece, None]).clamp_(min=0).sum(dim=0)
            gains.masked_fill_(blocked, float("-inf"))
            pick = int(gains.argmax())
        rank[pick] = t
        blocked[pick] = True
        cur = torch.maximum(cur, (xm @ xm[pick]).square_())
    return rank
