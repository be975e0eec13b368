"""The selection kernels: hand-computed cases, invariants, and the fast path against the slow one."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ray_pipeline.errors import InputError
from ray_pipeline.select.kernels import (
    center_and_key_samples,
    centroid_ranks,
    k_center_greedy,
    outlier_mask,
    proportional_budgets,
    random_ranks,
    segment_argmax,
)
from reference import center_and_key_reference, centroid_ranks_reference, k_center_greedy_reference

DTYPES = [torch.float32, torch.float64]


def unit(rows):
    x = np.asarray(rows, dtype=np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def greedy(x, assign, budgets, starts, **kw):
    return k_center_greedy(torch.as_tensor(x), torch.as_tensor(assign), torch.as_tensor(budgets),
                           torch.as_tensor(starts), **kw).numpy()


# ---------------------------------------------------------------------------------------------
# layer 1: toy cases worked out by hand


def test_segment_argmax_by_hand():
    values = torch.tensor([1.0, 5.0, 5.0, 2.0, 7.0, 0.5])
    seg = torch.tensor([0, 0, 0, 2, 2, 0])
    # segment 0: max 5 at rows 1 and 2 -> 1 (lowest); segment 1 empty -> -1; segment 2: row 4
    assert segment_argmax(values, seg, 3).tolist() == [1, -1, 4]


@pytest.mark.parametrize("dtype", DTYPES)
def test_center_and_key_by_hand(dtype):
    # Cluster 0: three points on the unit circle at 0, 30 and 80 degrees; its centroid direction
    # lies nearest the 30-degree point, which is the center sample. Of the others, 0 degrees is
    # 30 degrees away from it and 80 degrees is 50 away: the key sample is the 0-degree point.
    # Cluster 1: a single point, its own center and key.
    ang = np.deg2rad([0, 30, 80, 200])
    x = np.stack([np.cos(ang), np.sin(ang)], axis=1)
    assign = np.array([0, 0, 0, 1])
    centroid0 = unit([x[:3].mean(axis=0)])[0]
    sim = np.array([x[0] @ centroid0, x[1] @ centroid0, x[2] @ centroid0, 1.0])
    center, key = center_and_key_samples(torch.tensor(x, dtype=dtype), torch.tensor(assign),
                                         torch.tensor(sim, dtype=dtype), 3)
    assert center.tolist() == [1, 3, -1]  # cluster 2 is empty
    assert key.tolist() == [0, 3, -1]


def test_budgets_by_hand():
    # N = 10, M = 4: quotas 2.0, 1.2, 0.8 -> floors 2, 1, 0 (sum 3); the one left goes to the
    # largest remainder (0.8, cluster 2).
    assert proportional_budgets(np.array([5, 3, 2]), 4).tolist() == [2, 1, 1]
    # N = 9, M = 3, equal sizes: 1 each exactly.
    assert proportional_budgets(np.array([3, 3, 3]), 3).tolist() == [1, 1, 1]
    # Equal remainders (1/3 each) for one seat: the larger cluster wins, then the lower index.
    assert proportional_budgets(np.array([1, 1, 1]), 1).tolist() == [1, 0, 0]
    assert proportional_budgets(np.array([2, 4, 3]), 1).tolist() == [0, 1, 0]


@pytest.mark.parametrize("dtype", DTYPES)
def test_greedy_by_hand(dtype):
    # Cluster 0 on a line at 0, 1, 3, 7; start at 1. Distances to {1}: 1, -, 2, 6 -> 7 next.
    # Then to {1, 7}: 0 -> 1, 3 -> 2: pick 3; last 0. Cluster 1: start at 11 (row 5), budget 1.
    x = np.array([[0.0, 0], [1, 0], [3, 0], [7, 0], [10, 0], [11, 0]])
    assign = np.array([0, 0, 0, 0, 1, 1])
    rank = greedy(torch.tensor(x, dtype=dtype), assign, np.array([4, 1]), np.array([1, 5]))
    assert rank.tolist() == [3, 0, 2, 1, -1, 0]


# ---------------------------------------------------------------------------------------------
# layer 2: invariants and regressions


def blobs(n, d, k, seed, dtype=np.float64):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, d)) * 3
    assign = rng.integers(0, k, size=n)
    x = centers[assign] + rng.normal(size=(n, d))
    return unit(x).astype(dtype), assign


def keys_for(x, assign, k):
    sim = np.zeros(len(x))
    for c in range(k):
        m = assign == c
        if m.any():
            cen = unit([x[m].mean(axis=0)])[0]
            sim[m] = x[m] @ cen
    _, key = center_and_key_samples(torch.tensor(x), torch.tensor(assign), torch.tensor(sim), k)
    return key.numpy()


@pytest.mark.parametrize("seed", range(3))
def test_greedy_invariants(seed):
    x, assign = blobs(600, 8, 7, seed)
    k = 7
    sizes = np.bincount(assign, minlength=k)
    rng = np.random.default_rng(seed)
    budgets = rng.integers(0, sizes + 1)
    key = keys_for(x, assign, k)
    rank = greedy(x, assign, budgets, key)
    for c in range(k):
        members = np.flatnonzero(assign == c)
        chosen = members[rank[members] >= 0]
        assert len(chosen) == budgets[c]  # exact size, so no duplicates either
        assert sorted(rank[chosen].tolist()) == list(range(budgets[c]))  # ranks 0..b-1, each once
        if budgets[c] > 0:
            assert rank[key[c]] == 0  # the key sample is the first pick


def test_greedy_budget_zero_one_and_all():
    x, assign = blobs(200, 4, 3, 0)
    sizes = np.bincount(assign, minlength=3)
    key = keys_for(x, assign, 3)
    assert (greedy(x, assign, np.zeros(3, np.int64), key) == -1).all()
    one = greedy(x, assign, np.ones(3, np.int64), key)
    assert sorted(np.flatnonzero(one == 0).tolist()) == sorted(key.tolist())
    full = greedy(x, assign, sizes, key)
    assert (full >= 0).all()


def test_greedy_duplicate_points_never_picked_twice():
    # Every member of cluster 0 is the same point: all distances are 0 after the first pick.
    # A greedy that does not mask chosen rows picks the start again (distance 0 ties).
    x = np.array([[1.0, 0.0]] * 5 + [[0.0, 1.0]] * 3)
    assign = np.array([0] * 5 + [1] * 3)
    rank = greedy(x, assign, np.array([5, 2]), np.array([2, 7]))
    assert sorted(rank[:5].tolist()) == [0, 1, 2, 3, 4]
    assert rank[2] == 0 and rank[7] == 0
    assert sorted(rank[5:].tolist()) == [-1, 0, 1]


def test_greedy_empty_and_singleton_clusters():
    x = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    assign = np.array([0, 2, 2])  # cluster 1 is empty, cluster 0 a singleton
    rank = greedy(x, assign, np.array([1, 0, 2]), np.array([0, -1, 2]))
    assert rank.tolist() == [0, 1, 0]


def test_regression_first_pick_is_the_start_not_row_0():
    # Google's active-learning k-center greedy started every run from index 0; ours starts from
    # the key sample given, wherever it is.
    x, assign = blobs(100, 4, 1, 1)
    start = 57
    rank = greedy(x, np.zeros(100, np.int64), np.array([10]), np.array([start]))
    assert rank[start] == 0 and rank[0] != 0


def test_regression_start_point_is_kept_in_the_subset():
    # anomalib's KCenterGreedy dropped its start point from the returned subset.
    x, _ = blobs(50, 4, 1, 2)
    rank = greedy(x, np.zeros(50, np.int64), np.array([5]), np.array([13]))
    assert rank[13] == 0 and (rank >= 0).sum() == 5


def test_greedy_rejects_bad_budgets_and_starts():
    x, assign = blobs(30, 3, 2, 0)
    sizes = np.bincount(assign, minlength=2)
    key = keys_for(x, assign, 2)
    with pytest.raises(ValueError, match="budget"):
        greedy(x, assign, sizes + np.array([1, 0]), key)
    wrong = key[::-1].copy()  # each start in the other cluster
    with pytest.raises(ValueError, match="start"):
        greedy(x, assign, np.array([1, 1]), wrong)


@given(sizes=st.lists(st.integers(0, 40), min_size=1, max_size=12), data=st.data())
@settings(max_examples=200, deadline=None)
def test_budgets_sum_and_caps(sizes, data):
    sizes = np.array(sizes)
    m = data.draw(st.integers(0, int(sizes.sum())))
    b = proportional_budgets(sizes, m)
    assert b.sum() == m
    assert (b >= 0).all() and (b <= sizes).all()
    # within one of the exact quota
    quota = m * sizes / max(1, sizes.sum())
    assert (np.abs(b - quota) < 1).all()


@given(weights=st.lists(st.integers(0, 20), min_size=1, max_size=8), data=st.data())
@settings(max_examples=200, deadline=None)
def test_budgets_redistribute_above_caps(weights, data):
    weights = np.array(weights)
    caps = np.array(data.draw(st.lists(st.integers(0, 10), min_size=len(weights), max_size=len(weights))))
    total = data.draw(st.integers(0, int(caps.sum())))
    b = proportional_budgets(weights, total, caps)
    assert b.sum() == total and (b <= caps).all() and (b >= 0).all()


def test_budget_above_pool_is_an_error():
    with pytest.raises(InputError, match="cannot place 11 samples"):
        proportional_budgets(np.array([5, 5]), 11)


def test_budgets_for_m_equal_n_take_everything():
    sizes = np.array([7, 1, 0, 12])
    assert proportional_budgets(sizes, int(sizes.sum())).tolist() == sizes.tolist()


def test_regression_budget_paradox_every_candidate_has_its_exact_budget():
    """Largest-remainder budgets are not monotone in M (the Alabama paradox): with clusters of 6, 7,
    11 and 9, M=16 gives cluster 1 four samples and M=17 only three. One greedy pass per K serves
    every budget only if each cluster's order runs to the most any budget asks of it (``run_to``);
    run to the largest M's budgets instead, M=16 would get three from cluster 1, one short."""
    from ray_pipeline.config import Config
    from ray_pipeline.select.engine import KSelection, _budgets_and_eligible

    sizes = np.array([6, 7, 11, 9])
    assert proportional_budgets(sizes, 16).tolist() == [3, 4, 5, 4]
    assert proportional_budgets(sizes, 17).tolist() == [3, 3, 6, 5]
    assign = np.repeat(np.arange(4), sizes)
    x, _ = blobs(len(assign), 4, 1, 0)
    key = np.array([np.flatnonzero(assign == c)[0] for c in range(4)])
    per_m, run_to, eligible = _budgets_and_eligible(assign, np.ones(len(assign)), 4, key, [16, 17], Config())
    assert run_to.tolist() == [3, 4, 6, 5] and eligible.all()
    rank = greedy(x, assign, run_to, key)
    s = KSelection(k=4, assign=assign, center=key, key=key, budgets=per_m, rank=rank)
    for m in (16, 17):
        assert np.bincount(assign[s.members(m)], minlength=4).tolist() == per_m[m].tolist()


def test_random_ranks_nested_and_seeded():
    a = random_ranks(1000, np.random.default_rng(5))
    b = random_ranks(1000, np.random.default_rng(5))
    assert (a == b).all() and sorted(a.tolist()) == list(range(1000))
    assert ((a < 10) <= (a < 50)).all()  # the 10-subset lies inside the 50-subset


# ---------------------------------------------------------------------------------------------
# layer 3: the vectorised greedy against the per-cluster loop, index for index


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("kw", [{}, {"strategy": "rowwise", "chunk_rows": 7}, {"block_rows": 1},
                                {"block_rows": 10**9}], ids=["auto", "rowwise", "tiny-blocks", "one-block"])
def test_vectorised_greedy_equals_reference(seed, kw):
    rng = np.random.default_rng(100 + seed)
    k = int(rng.integers(1, 30))
    x, assign = blobs(int(rng.integers(k, 2000)), int(rng.integers(2, 64)), k, seed)
    sizes = np.bincount(assign, minlength=k)
    budgets = np.minimum(sizes, rng.integers(0, 40, size=k))
    key = keys_for(x, assign, k)
    fast = greedy(x, assign, budgets, key, **kw)
    slow = k_center_greedy_reference(x, assign, budgets, key)
    assert (fast == slow).all()


def test_vectorised_greedy_equals_reference_float32_separated():
    # float32 on data without near-ties: the same order as the float64 reference loop.
    x, assign = blobs(800, 16, 6, 9, dtype=np.float32)
    budgets = np.minimum(np.bincount(assign, minlength=6), 25)
    key = keys_for(x.astype(np.float64), assign, 6)
    fast = greedy(x, assign, budgets, key)
    slow = k_center_greedy_reference(x.astype(np.float64), assign, budgets, key)
    assert (fast == slow).all()


def test_prefix_property_one_pass_serves_every_budget():
    x, assign = blobs(500, 8, 5, 4)
    sizes = np.bincount(assign, minlength=5)
    key = keys_for(x, assign, 5)
    big = greedy(x, assign, np.minimum(sizes, 20), key)
    small = greedy(x, assign, np.minimum(sizes, 6), key)
    assert ((big < np.minimum(sizes, 6)[assign]) & (big >= 0) == (small >= 0)).all()


@pytest.mark.gpu
def test_greedy_cuda_matches_cpu():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    x, assign = blobs(5000, 32, 20, 3)
    budgets = np.minimum(np.bincount(assign, minlength=20), 30)
    key = keys_for(x, assign, 20)
    cpu = greedy(x, assign, budgets, key)
    gpu = k_center_greedy(torch.tensor(x, device="cuda"), torch.tensor(assign, device="cuda"),
                          torch.tensor(budgets, device="cuda"), torch.tensor(key, device="cuda")).cpu().numpy()
    assert (cpu == gpu).all()


def test_centroid_ranks_and_outlier_mask_by_hand():
    assign = np.array([0, 0, 0, 0, 1, 1])
    sim = np.array([0.5, 0.9, 0.1, 0.9, 0.3, 0.7])
    # cluster 0 by similarity: rows 1 and 3 tie at 0.9 (lower index first), then 0, then 2
    assert centroid_ranks(assign, sim, 2).tolist() == [2, 0, 3, 1, 1, 0]
    # a quarter of cluster 0 (one row, the farthest: row 2) drops; cluster 1 (2 rows) keeps both
    assert outlier_mask(assign, sim, 2, 0.25, keep=np.array([1, 5])).tolist() == [1, 1, 0, 1, 1, 1]
    # a key sample is never dropped, even when it is the farthest
    assert outlier_mask(assign, sim, 2, 0.25, keep=np.array([2, 5])).tolist() == [1, 1, 1, 1, 1, 1]


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("dtype", DTYPES)
def test_center_and_key_samples_equal_reference(seed, dtype):
    rng = np.random.default_rng(seed)
    k = int(rng.integers(1, 12))
    x, assign = blobs(int(rng.integers(k, 300)), int(rng.integers(2, 16)), k, seed)
    k += 2  # two empty clusters as well
    sim = rng.random(len(x))
    sim[rng.integers(0, len(x), 5)] = sim.max()  # ties: the lower index wins
    center, key = center_and_key_samples(torch.tensor(x, dtype=dtype), torch.tensor(assign),
                                         torch.tensor(sim, dtype=dtype), k)
    ref_center, ref_key = center_and_key_reference(x, assign, sim, k)
    assert center.tolist() == ref_center.tolist() and key.tolist() == ref_key.tolist()


@given(assign=st.lists(st.integers(0, 4), min_size=1, max_size=60), data=st.data())
@settings(max_examples=100, deadline=None)
def test_centroid_ranks_equal_reference(assign, data):
    assign = np.array(assign)
    sim = np.array(data.draw(st.lists(st.sampled_from([0.1, 0.5, 0.5, 0.9]), min_size=len(assign),
                                      max_size=len(assign))))  # few values: many ties
    assert centroid_ranks(assign, sim, 5).tolist() == centroid_ranks_reference(assign, sim, 5).tolist()


@pytest.mark.parametrize("seed", range(3))
def test_greedy_with_eligible_rows_equals_reference(seed):
    x, assign = blobs(700, 8, 6, seed)
    rng = np.random.default_rng(seed)
    eligible = rng.random(700) > 0.2
    key = keys_for(x, assign, 6)
    eligible[key] = True
    room = np.bincount(assign[eligible], minlength=6)
    budgets = np.minimum(room, 15)
    fast = k_center_greedy(torch.tensor(x), torch.tensor(assign), torch.tensor(budgets), torch.tensor(key),
                           eligible=torch.tensor(eligible)).numpy()
    slow = k_center_greedy_reference(x, assign, budgets, key, eligible)
    assert (fast == slow).all() and not (fast[~eligible] >= 0).any()
