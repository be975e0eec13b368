"""Facility location per cluster (select/facility.py): a toy by hand, invariants, the blocked
path against the one-cluster-at-a-time path, and apricot's greedy as the reference."""

import numpy as np
import pytest
import torch

from ray_pipeline.config import Config
from ray_pipeline.select.engine import select_candidates
from ray_pipeline.select.facility import facility_location

# Four unit vectors at 0, 36.9, 53.1 and 90 degrees; squared cosines:
#   [1, .64, .36, 0], [.64, 1, .9216, .36], [.36, .9216, 1, .64], [0, .36, .64, 1].
TOY = [[1.0, 0.0], [0.8, 0.6], [0.6, 0.8], [0.0, 1.0]]


def order(rank: torch.Tensor) -> list[int]:
    """Rows by pick order."""
    r = rank.numpy()
    return [int(i) for i in np.argsort(np.where(r < 0, 1 << 40, r), kind="stable")[: int((r >= 0).sum())]]


def unit(rng, n, d, dtype=np.float64):
    x = rng.normal(size=(n, d)).astype(dtype)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_toy_by_hand(dtype):
    # Column sums 2, 2.9216, 2.9216, 2: rows 1 and 2 tie, the lower wins. Then the gains over
    # cur = [.64, 1, .9216, .36] are .36 (row 0), .0784 + .28 = .3584 (row 2), .64 (row 3): row 3.
    x = torch.tensor(TOY, dtype=dtype)
    rank = facility_location(x, torch.zeros(4, dtype=torch.int64), torch.tensor([3]))
    assert rank.tolist() == [2, 0, -1, 1]


def test_toy_two_clusters_forced_start_and_eligible():
    x = torch.tensor(TOY + [[-1.0, 0.0], [-0.8, 0.6]], dtype=torch.float64)
    assign = torch.tensor([0, 0, 0, 0, 1, 1])
    rank = facility_location(x, assign, torch.tensor([2, 1]), starts=torch.tensor([0, -1]))
    assert rank.tolist() == [0, -1, 1, -1, 0, -1]  # after row 0: row 2 gains .9216-.64 + 1-.36 + .64 = 1.5616
    rank = facility_location(x, assign, torch.tensor([1, 1]), eligible=torch.tensor([True, False] + [True] * 4))
    assert rank.tolist() == [-1, -1, 0, -1, 0, -1]  # row 1 may not be picked: row 2, its equal, is


def test_invariants_budget_zero_full_and_duplicates():
    rng = np.random.default_rng(0)
    x = torch.from_numpy(unit(rng, 40, 6))
    x[10:20] = x[0]  # ten copies of row 0
    assign = torch.from_numpy(rng.integers(0, 3, 40))
    sizes = torch.bincount(assign, minlength=3)
    rank = facility_location(x, assign, torch.tensor([0, int(sizes[1]), 2]))
    for c, b in enumerate([0, int(sizes[1]), 2]):
        r = rank[assign == c]
        assert sorted(r[r >= 0].tolist()) == list(range(b))  # each step once, no row twice
    assert (rank[assign == 0] == -1).all()


def test_blocks_do_not_change_the_ranks():
    """A cluster's ranks are its own: every cluster alone (tiny blocks), all in one block, or a
    cluster too large for a block (streamed) give the same picks."""
    rng = np.random.default_rng(1)
    x = torch.from_numpy(unit(rng, 600, 8, np.float32))
    assign = torch.from_numpy(rng.integers(0, 12, 600))
    budgets = torch.bincount(assign, minlength=12) // 5
    one = facility_location(x, assign, budgets, block_pairs=1 << 30)
    assert (facility_location(x, assign, budgets, block_pairs=1 << 12) == one).all()
    assert (facility_location(x, assign, budgets, block_pairs=900) == one).all()  # 900 < n_k^2: streamed


@pytest.mark.parametrize("seed,n,d", [(1, 150, 32), (2, 300, 24)])
def test_against_apricot_greedy(seed, n, d):
    # inputs whose greedy never meets a near-tie (the runner-up's gain is >= 2e-4 below at every
    # step): float rounding of a different sum order then cannot flip a pick
    apricot = pytest.importorskip("apricot")
    x = unit(np.random.default_rng(seed), n, d)
    ref = apricot.FacilityLocationSelection(25, metric="cosine", optimizer="naive").fit(x).ranking
    ours = order(facility_location(torch.from_numpy(x), torch.zeros(n, dtype=torch.int64), torch.tensor([25])))
    assert ours == [int(i) for i in ref]
    # a forced first pick is apricot's initial_subset (which it leaves out of its ranking)
    ref = apricot.FacilityLocationSelection(24, metric="cosine", optimizer="naive", initial_subset=[7]).fit(x).ranking
    ours = order(facility_location(torch.from_numpy(x), torch.zeros(n, dtype=torch.int64), torch.tensor([25]),
                                   starts=torch.tensor([7])))
    assert ours == [7] + [int(i) for i in ref]


def test_per_cluster_against_apricot_in_each_cluster():
    apricot = pytest.importorskip("apricot")
    rng = np.random.default_rng(3)
    x = unit(rng, 400, 20)
    assign = rng.integers(0, 5, 400)
    budgets = np.array([3, 10, 0, 7, 12])
    rank = facility_location(torch.from_numpy(x), torch.from_numpy(assign), torch.from_numpy(budgets))
    for c in range(5):
        rows = np.flatnonzero(assign == c)
        got = order(rank[torch.from_numpy(rows)])
        if budgets[c] == 0:
            assert got == []
            continue
        ref = apricot.FacilityLocationSelection(int(budgets[c]), metric="cosine", optimizer="naive").fit(x[rows])
        assert got == [int(i) for i in ref.ranking]


def test_facility_is_a_candidate_family():
    rng = np.random.default_rng(0)
    x = unit(rng, 800, 16, np.float32)
    cfg = Config.from_dict({"cluster": {"k": [10]}, "select": {"budgets": [20, 60], "method": ["kcenter", "facility"]}})
    sel = select_candidates(x, cfg, rng=rng)
    names = [c["name"] for c in sel.candidates() if c["kind"] == "selection"]
    assert names == ["k10_m20", "k10_m60", "facility_k10_m20", "facility_k10_m60"]
    fac = next(s for s in sel.per_k if s.method == "facility")
    assert fac.family == "facility_k10"
    # what the stage's select.json lists (pipeline.py writes sel.candidates())
    assert {c["family"] for c in sel.candidates() if c.get("method") == "facility"} == {"facility_k10"}
    assert (fac.members(20) <= fac.members(60)).all() and fac.members(60).sum() == 60
