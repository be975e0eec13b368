"""FAISS spherical k-means: a toy case, invariants, and determinism under a seed."""

import numpy as np
import pytest

from conftest import unit_blobs
from ray_pipeline.select.kmeans import child_shares, hierarchical_kmeans, kmeans, node_fan, node_seed
from ray_pipeline.errors import InputError


def test_two_obvious_groups_by_hand():
    # Four unit vectors near +x and four near +y: two clusters, centroids near the axes.
    a = np.deg2rad([-5, -2, 2, 5, 85, 88, 92, 95])
    x = np.stack([np.cos(a), np.sin(a)], axis=1).astype(np.float32)
    r = kmeans(x, 2, seed=0)
    assert len(set(r.assign[:4])) == 1 and len(set(r.assign[4:])) == 1
    assert r.assign[0] != r.assign[4]
    c = r.centroids[r.assign[0]]
    np.testing.assert_allclose(c, [1.0, 0.0], atol=1e-6)  # symmetric around +x, unit norm
    np.testing.assert_allclose(r.sim[:4], np.cos(np.deg2rad([5, 2, 2, 5])), rtol=1e-6)


def test_invariants_and_sim_is_cosine_to_own_centroid():
    x = unit_blobs(3000, 16, 12, 0)
    r = kmeans(x, 12, seed=1)
    assert r.assign.min() >= 0 and r.assign.max() < 12 and r.sizes.sum() == 3000
    np.testing.assert_allclose(np.linalg.norm(r.centroids, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(r.sim, (x * r.centroids[r.assign]).sum(1), atol=1e-5)
    # every point's own centroid is its most similar one
    assert (r.sim >= (x @ r.centroids.T).max(1) - 1e-5).all()


def test_trains_on_a_sample_and_still_assigns_every_point():
    x = unit_blobs(5000, 8, 10, 2)
    r = kmeans(x, 10, seed=0, max_points_per_centroid=20)  # trains on 200 points
    assert r.assign.shape == (5000,) and r.sizes.sum() == 5000


def test_seeded_runs_are_identical_and_seeds_differ():
    x = unit_blobs(4000, 32, 30, 3)
    a, b = kmeans(x, 30, seed=7), kmeans(x, 30, seed=7)
    assert (a.assign == b.assign).all() and (a.centroids == b.centroids).all()
    c = kmeans(x, 30, seed=8)
    assert not (a.centroids == c.centroids).all()


@pytest.mark.parametrize("k", [0, 11])
def test_k_out_of_range_is_an_input_error(k):
    with pytest.raises(InputError, match="choose 1 <= k <= 10"):
        kmeans(unit_blobs(10, 4, 2, 0), k, seed=0)


@pytest.mark.gpu
def test_gpu_selection_agrees_with_the_cpu_within_tolerance():
    """faiss k-means on the GPU is not bit-exact against the CPU (different reduction orders), so
    the selections may differ in a few members: at least 90% of every candidate must agree."""
    import numpy as np

    from conftest import unit_blobs
    from ray_pipeline.config import Config
    from ray_pipeline.select.engine import select_candidates

    x = unit_blobs(50_000, 64, 50, 0)
    base = {"cluster": {"k": [50, 200]}, "select": {"budgets": [500, 2000], "stratify": "none"}}
    gpu = select_candidates(x, Config.from_dict({**base, "cluster": {**base["cluster"], "gpu": "auto"},
                                                 "select": {**base["select"], "device": "cuda"}}),
                            rng=np.random.default_rng(0))
    cpu = select_candidates(x, Config.from_dict({**base, "cluster": {**base["cluster"], "gpu": "never"},
                                                 "select": {**base["select"], "device": "cpu"}}),
                            rng=np.random.default_rng(0))
    for sg, sc in zip(gpu.per_k, cpu.per_k):
        for m in sg.budgets:
            a, b = sg.members(m), sc.members(m)
            assert a.sum() == b.sum() == m
            assert (a & b).sum() >= 0.9 * m, f"{sg.name(m)}: {(a & b).sum()} of {m} shared"


# ---------------------------------------------------------------------------------------------
# multi-level k-means


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """The two labelings group the rows the same way, whatever the cluster numbers."""
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def test_hierarchical_by_hand_four_groups_two_by_two():
    # Four tight groups at 0, 20, 90 and 110 degrees: the first level splits {0, 20} from {90, 110},
    # the second splits each pair, so the four leaves are the four groups.
    a = np.deg2rad(np.concatenate([g + np.array([-1.0, 0.0, 1.0]) for g in (0, 20, 90, 110)]))
    x = np.stack([np.cos(a), np.sin(a)], axis=1).astype(np.float32)
    r = hierarchical_kmeans(x, 4, seed=0, branching=2, leaf=2)
    assert same_partition(r.assign, np.repeat(np.arange(4), 3))
    assert set(r.assign[:6]) in ({0, 1}, {2, 3})  # leaves numbered depth-first: siblings are adjacent


def test_hierarchical_invariants_and_determinism():
    x = unit_blobs(6000, 16, 40, 4)
    r = hierarchical_kmeans(x, 150, seed=3, branching=8, max_points_per_centroid=32)
    assert r.centroids.shape == (150, 16) and r.assign.min() >= 0 and r.assign.max() < 150
    assert r.sizes.sum() == 6000 and (r.sizes > 0).sum() >= 140  # leaves are not left empty wholesale
    np.testing.assert_allclose(r.sim, (x * r.centroids[r.assign]).sum(1), atol=1e-5)
    again = hierarchical_kmeans(x, 150, seed=3, branching=8, max_points_per_centroid=32)
    assert (again.assign == r.assign).all() and (again.centroids == r.centroids).all()


def _tree_by_recursion(x, rows, k, path, branching, leaf, mppc):
    """The tree as its docstring reads, in plain recursion over gathered copies: a node asked for
    more than ``leaf`` splits by flat k-means into node_fan clusters and recurses into each child
    with its share; otherwise (or where the split leaves one child) it is one flat k-means. Returns
    the leaves depth-first as (rows, assign within the leaf, sim, clusters)."""
    kw = dict(seed=node_seed(path), max_points_per_centroid=mppc)
    fan = node_fan(k, branching, leaf)
    if fan > 1:
        split = kmeans(x[rows], fan, **kw)
        if (split.sizes > 0).sum() > 1:
            share = child_shares(split.sizes, k)
            return [lf for c in range(fan) if share[c] > 0
                    for lf in _tree_by_recursion(x, rows[split.assign == c], int(share[c]), (*path, c), branching,
                                                 leaf, mppc)]
    r = kmeans(x[rows], min(k, len(rows)), **kw)
    return [(rows, r.assign, r.sim, len(r.centroids))]


@pytest.mark.parametrize("k,branching,leaf", [(150, 4, 8), (37, 3, 2), (500, 16, 8)])
def test_hierarchical_equals_the_tree_written_as_recursion(k, branching, leaf):
    """Index for index against :func:`_tree_by_recursion`: the leaves' numbering (a running count
    depth-first), each row's leaf and its similarity; several levels and hundreds of leaves."""
    x = unit_blobs(5000, 16, 60, 7)
    r = hierarchical_kmeans(x, k, seed=4, branching=branching, leaf=leaf, max_points_per_centroid=16)
    assign, sim, made = np.full(len(x), -1), np.zeros(len(x), np.float32), 0
    for rows, a, s, clusters in _tree_by_recursion(x, np.arange(len(x)), k, (4,), branching, leaf, 16):
        assign[rows], sim[rows], made = a + made, s, made + clusters
    assert made == len(r.centroids) and (r.assign == assign).all() and (r.sim == sim).all()


def test_hierarchical_with_k_up_to_the_leaf_is_flat_kmeans():
    x = unit_blobs(2000, 8, 6, 5)
    h = hierarchical_kmeans(x, 6, seed=2, branching=2, leaf=6)
    f = kmeans(x, 6, seed=int(np.random.default_rng((2,)).integers(0, 2**31 - 1)))
    assert (h.assign == f.assign).all()


@pytest.mark.parametrize("data", ["separated", "overlapping"])
def test_hierarchical_objective_is_within_a_tolerance_of_flat(data):
    """Against flat k-means at the same K: the mean cosine to the own centroid (the spherical
    k-means objective) is no more than 0.02 worse. (On the separated blobs the tree is better:
    flat k-means settles in a local minimum there.)"""
    rng = np.random.default_rng(0)
    if data == "separated":
        centers = rng.normal(size=(24, 32))
        x = centers[rng.integers(0, 24, 4000)] * 5 + rng.normal(size=(4000, 32)) * 0.3
        x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    else:
        x = unit_blobs(8000, 32, 60, 1)
    flat = kmeans(x, 96, seed=0)
    tree = hierarchical_kmeans(x, 96, seed=0, branching=8)
    assert tree.sim.mean() >= flat.sim.mean() - 0.02


@pytest.mark.parametrize("branching,leaf", [(16, 8), (64, 64), (2, 1), (4, 16)])
def test_node_fan_reaches_k_in_leaves_of_at_most_leaf(branching, leaf):
    """Splitting each node's k as evenly as its fan allows, down to the leaves: every fan is within
    [2, branching], every leaf is asked for at most ``leaf`` clusters, and the leaves' clusters add
    up to k; the levels above the leaves are the fewest that reach ceil(k / leaf) groups."""
    for k in [1, 2, 7, 8, 9, 63, 64, 65, 200, 1000, 2263, 10_000, 100_000]:
        leaves, depth, stack = [], 0, [(k, 0)]
        while stack:
            kk, d = stack.pop()
            fan = node_fan(kk, branching, leaf)
            if fan == 1:
                leaves.append(kk)
                depth = max(depth, d)
                continue
            assert 2 <= fan <= branching and kk > leaf
            stack.extend((kk // fan + (c < kk % fan), d + 1) for c in range(fan) if kk // fan + (c < kk % fan))
        assert sum(leaves) == k and max(leaves) <= leaf
        groups, fewest = -(-k // leaf), 0
        while branching ** fewest < groups:
            fewest += 1
        assert depth == fewest


def test_hierarchical_terminates_on_duplicates():
    x = np.tile(unit_blobs(1, 4, 1, 0), (500, 1))  # one point 500 times: no split can separate them
    r = hierarchical_kmeans(x, 100, seed=0, branching=4)
    assert r.sizes.sum() == 500 and r.centroids.shape[0] <= 100

