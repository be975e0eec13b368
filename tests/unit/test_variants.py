"""The selection variants of issue 8: near-duplicate removal (SemDeDup) and label-stratified budgets."""

import numpy as np
import pytest
import torch

from conftest import unit_blobs
from ray_pipeline.config import Config
from ray_pipeline.errors import ConfigError, InputError
from ray_pipeline.io.pool import Pool
from ray_pipeline.select.kernels import proportional_budgets, semantic_duplicates
from ray_pipeline.select.engine import select_candidates
from ray_pipeline.select.tables import clusters_table, selection_table
from reference import semantic_duplicates_reference


def test_semantic_duplicates_by_hand():
    # one cluster; order farthest-first: rows 0 (.7), 2 (.7), 3 (.98), 1 (.99).
    # row 3 . row 2 = 0.96 > 0.95: a duplicate; row 1's closest earlier is row 3 (0.936): kept.
    x = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [0.28, 0.96]])
    sim = torch.tensor([0.7, 0.99, 0.7, 0.98])
    got = semantic_duplicates(x, torch.zeros(4, dtype=torch.int64), sim, 1, 0.95)
    assert got.tolist() == [False, False, False, True]
    # in two clusters, rows 2 and 3 are no longer compared
    got = semantic_duplicates(x, torch.tensor([0, 0, 1, 0]), sim, 2, 0.95)
    assert got.tolist() == [False, False, False, False]


@pytest.mark.parametrize("threshold,chunk", [(0.9, 7), (0.99, 64), (0.999, 4096)])
def test_semantic_duplicates_match_the_pairwise_loop(threshold, chunk):
    rng = np.random.default_rng(0)
    x = unit_blobs(250, 8, 3, 0)
    x = np.concatenate([x, x[:50] + 0.01 * rng.normal(size=(50, 8)).astype(np.float32)])
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    assign = rng.integers(0, 5, len(x))
    sim = rng.random(len(x)).astype(np.float32)
    sim[10:20] = sim[0]  # ties in the order: lower index first
    fast = semantic_duplicates(torch.from_numpy(x), torch.from_numpy(assign), torch.from_numpy(sim), 5, threshold,
                               chunk_rows=chunk)
    assert (fast.numpy() == semantic_duplicates_reference(x, assign, sim, threshold)).all()


def test_dedup_never_selects_a_removed_copy_and_keeps_the_random_baseline():
    base = unit_blobs(1500, 16, 10, 4)
    x = np.concatenate([base, base[:500]])  # 500 exact copies
    cfg = Config.from_dict({"cluster": {"k": [20]}, "select": {"budgets": [100, 400], "dedup_threshold": 0.999,
                                                               "random_seeds": [0]}})
    sel = select_candidates(x, cfg, rng=np.random.default_rng(0))
    plain = select_candidates(x, Config.from_dict({**cfg.to_dict(), "select": {**cfg.to_dict()["select"],
                                                                              "dedup_threshold": None}}),
                              rng=np.random.default_rng(0))
    for s in sel.per_k:
        removed = s.assign < 0
        assert removed.sum() == 500  # one of each exact pair, nothing else (blobs are not that tight)
        for m in (100, 400):
            chosen = np.flatnonzero(s.members(m))
            assert len(chosen) == m and not removed[chosen].any()
            keyed = {x[i].tobytes() for i in chosen}
            assert len(keyed) == m  # no two identical vectors in a subset
    assert (sel.random[0] == plain.random[0]).all()
    pool = Pool(ids=np.array([f"r{i}" for i in range(len(x))], dtype=object), texts=None, labels=None, embeddings=x,
                source="x")
    assert selection_table(pool, sel).num_rows == 2000
    t = clusters_table(pool, sel)
    assert sum(t.column("size").to_pylist()) == 1500
    with pytest.raises(InputError, match="near-duplicates"):
        too_big = Config.from_dict({**cfg.to_dict(), "select": {**cfg.to_dict()["select"], "budgets": [1800]}})
        select_candidates(x, too_big, rng=np.random.default_rng(0))


def test_stratified_budgets_follow_the_label_shares_exactly():
    rng = np.random.default_rng(3)
    x = unit_blobs(2000, 16, 8, 5)
    labels = rng.choice(np.array(["a", "b", "c", "d"], dtype=object), size=2000, p=[0.55, 0.25, 0.15, 0.05])
    cfg = Config.from_dict({"cluster": {"k": [40, "M/2"]}, "select": {"budgets": [37, 200], "stratify": "label",
                                                                      "random_seeds": []}})
    sel = select_candidates(x, cfg, rng=np.random.default_rng(0), labels=labels)
    names, code = np.unique(labels, return_inverse=True)
    sizes = np.bincount(code)
    for s in sel.per_k:
        assert all(len(set(labels[s.assign == c])) <= 1 for c in range(len(s.center)))  # label-pure clusters
        for m in s.budgets:
            chosen = s.members(m)
            assert chosen.sum() == m
            if s.method != "boundary":  # its boundary rows go to the confusable labels (test_boundary)
                assert (np.bincount(code[chosen], minlength=4) == proportional_budgets(sizes, m)).all()
            assert (s.budgets[m].sum() == m) and (s.key[s.key >= 0] >= 0).all()
    with pytest.raises(ConfigError, match="needs the pool's labels"):
        select_candidates(x, cfg, rng=np.random.default_rng(0))


def test_dedup_is_refused_by_the_shard_engine_and_stratify_is_not():
    with pytest.raises(ConfigError, match="select.engine"):
        Config.from_dict({"select": {"engine": "ray", "dedup_threshold": 0.95}})
    assert Config.from_dict({"select": {"engine": "ray", "stratify": "label"}}).select.stratify == "label"
    with pytest.raises(ConfigError, match="dedup_threshold"):
        Config.from_dict({"select": {"dedup_threshold": 1.5}})


def test_hierarchical_clustering_gives_exact_budgets_and_repeats_itself():
    x = unit_blobs(5000, 16, 30, 7)
    cfg = Config.from_dict({"cluster": {"algorithm": "hierarchical", "branching": 6},
                            "select": {"budgets": [50, 250], "stratify": "none"}})
    a = select_candidates(x, cfg, rng=np.random.default_rng(0))
    b = select_candidates(x, cfg, rng=np.random.default_rng(0))
    for s, t in zip(a.per_k, b.per_k):
        assert (s.rank == t.rank).all() and (s.assign == t.assign).all()
        for m in s.budgets:
            assert s.members(m).sum() == m
    assert {s.k for s in a.per_k} == {25, 50, 125, 250}


def test_auto_clusters_hierarchically_only_past_the_size_where_flat_costs_more():
    c = Config.from_dict({}).cluster
    assert c.algorithm == "auto"
    assert c.algorithm_for(10_003, 2_000) == "flat"  # banking77 at 20%: N K = 2e7
    assert c.algorithm_for(100_000, 1_000) == "hierarchical"  # 1% of 100k: N K = 1e8
    assert c.algorithm_for(10**7, 64) == "flat"  # K within one level: the tree would be flat k-means
    assert c.algorithm_for(10**7, 999) == "flat"  # below 1000 clusters the tree lost to flat; flat is linear here
    assert c.algorithm_for(10**7, 1000) == "hierarchical"
    assert c.algorithm_for(99_999, 1000) == "flat"  # N K just below 1e8
    assert Config.from_dict({"cluster": {"algorithm": "flat"}}).cluster.algorithm_for(10**7, 10**5) == "flat"
