"""The budget-aware ``boundary`` candidate: its kernels by hand and against a slow loop, and the
candidate's invariants through ``select_candidates`` (both engines agree in test_distributed)."""

import logging

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ray_pipeline.select.boundary import boundary_picks, boundary_share, fit_probe, probe_margins
from ray_pipeline.config import Config
from ray_pipeline.io.pool import Pool
from ray_pipeline.errors import ConfigError
from ray_pipeline.select.engine import select_candidates
from ray_pipeline.select.tables import clusters_table
from reference import boundary_picks_reference

# ---------------------------------------------------------------------------------------------
# layer 1: by hand


def test_boundary_share_grows_with_the_budget_up_to_half():
    assert [boundary_share(m, 1000) for m in (10, 100, 200, 500)] == [0.025, 0.25, 0.5, 0.5]


def test_boundary_picks_by_hand_one_per_cluster_then_the_rest():
    margin = np.array([0.10, 0.20, 0.30, 0.90, 0.05, 0.15, 0.60])
    assign = np.array([0, 0, 1, 1, 2, 0, -1])
    taken = np.array([False, False, False, False, True, False, False])
    # cluster 2's only row is taken; row 6 has no cluster. Cluster leads: 0 (0.10), 2 (0.30);
    # then by margin: 5 (0.15), 1 (0.20), 3 (0.90)
    assert boundary_picks(margin, assign, taken, 5).tolist() == [0, 2, 5, 1, 3]
    with pytest.raises(ValueError):
        boundary_picks(margin, assign, taken, 6)


def test_probe_margin_by_hand_small_between_two_labels_large_at_their_ends():
    angles = np.linspace(-1.0, 1.0, 41)
    x = np.stack([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)
    y = np.where(angles < 0, "a", "b")
    margin = probe_margins(fit_probe(x, y), x)
    assert margin.argmin() in (19, 20, 21)  # the boundary is at angle 0
    assert margin[0] > 0.9 and margin[-1] > 0.9 and margin[20] < 0.2


def test_one_label_has_no_boundary():
    x = np.eye(3, dtype=np.float32)
    assert fit_probe(x, np.array(["a", "a", "a"])) is None
    assert probe_margins(None, x).tolist() == [1.0, 1.0, 1.0]


# ---------------------------------------------------------------------------------------------
# layer 3: the vectorised picks against the loop


@given(data=st.data(), n=st.integers(1, 40))
@settings(max_examples=200, deadline=None)
def test_boundary_picks_equal_reference(data, n):
    margin = np.array(data.draw(st.lists(st.sampled_from([0.0, 0.1, 0.2, 0.5, 1.0]), min_size=n, max_size=n)))
    assign = np.array(data.draw(st.lists(st.integers(-1, 4), min_size=n, max_size=n)))
    taken = np.array(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    free = int((~taken & (assign >= 0)).sum())
    need = data.draw(st.integers(0, free))
    assert boundary_picks(margin, assign, taken, need).tolist() == boundary_picks_reference(margin, assign, taken, need)


# ---------------------------------------------------------------------------------------------
# layer 2: the candidate's invariants


def labelled_blobs(n=600, d=8, labels=4, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(labels, d))
    y = rng.integers(0, labels, n)
    x = (centers[y] + 0.9 * rng.normal(size=(n, d))).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, np.array([f"label{v}" for v in y], dtype=object)


def select(x, labels, k=("M",), **select_opts):
    cfg = Config.from_dict({"cluster": {"k": list(k)}, "select": {"random_seeds": [], **select_opts}, "seed": 0})
    return select_candidates(x, cfg, rng=np.random.default_rng(0), labels=labels)


@pytest.mark.parametrize("stratify", ["label", "none"])
def test_boundary_candidate_is_the_prototypes_then_the_least_sure_rows(stratify):
    x, labels = labelled_blobs()
    n = len(x)
    budgets = [6, 60, 150]
    sel = select(x, labels, budgets=budgets, method=["centroid", "boundary"], stratify=stratify)
    by_name = {s.name(m): s for s in sel.per_k for m in s.budgets}
    for m in budgets:
        b = by_name[f"boundary_k{m}_m{m}"]
        assert b.family == f"boundary_k{m}_m{m}" and list(b.budgets) == [m]
        chosen = b.members(m)
        assert chosen.sum() == m
        m_protos = m - int(round(boundary_share(m, n) * m))
        # the prototypes: the centroid candidate of size m_protos over the same clusters
        other = select(x, labels, k=[m], budgets=[m_protos], method=["centroid"], stratify=stratify)
        protos = other.per_k[0].members(m_protos) if m_protos != m else chosen
        assert (chosen & protos).sum() == m_protos
        hard = np.flatnonzero(chosen & ~protos)
        margin = probe_margins(fit_probe(x[protos], labels[protos]), x)
        assert hard.tolist() == sorted(boundary_picks(margin, b.assign, protos, m - m_protos).tolist())
        # ranks count 0..c-1 inside each cluster over the chosen rows, -1 elsewhere
        assert (b.rank[~chosen] == -1).all()
        for c in np.unique(b.assign[chosen]):
            assert sorted(b.rank[chosen & (b.assign == c)].tolist()) == list(range(int((chosen & (b.assign == c)).sum())))
    assert (by_name["boundary_k150_m150"].members(150) != by_name["centroid_k150_m150"].members(150)).any()


def test_boundary_candidates_are_listed_and_seeded():
    x, labels = labelled_blobs()
    every = ["kcenter", "centroid", "boundary"]
    a, b = select(x, labels, budgets=[30, 60], method=every), select(x, labels, budgets=[30, 60], method=every)
    names = [c["name"] for c in a.candidates() if c["kind"] == "selection"]
    assert {"boundary_k30_m30", "boundary_k60_m60", "centroid_k30_m30", "k60_m60"} <= set(names)
    assert all((s.rank == t.rank).all() for s, t in zip(a.per_k, b.per_k))
    # a boundary family holds one budget; the clusters table takes its budgets from the others
    pool = Pool(ids=np.arange(len(x)).astype(str).astype(object), texts=None, labels=labels, embeddings=x,
                source="blobs")
    table = clusters_table(pool, a).to_pydict()
    assert None not in [v for k, v in zip(table["k"], table["budget_m30"]) if k == 30]


def test_boundary_without_labels_is_left_out_with_a_warning(caplog):
    x, _ = labelled_blobs()
    with caplog.at_level(logging.WARNING, logger="ray_pipeline.select.engine"):
        sel = select(x, None, budgets=[30], method=["kcenter", "centroid", "boundary"])
    assert {s.method for s in sel.per_k} == {"kcenter", "centroid"}
    assert "needs the pool's labels" in caplog.text
    with pytest.raises(ConfigError, match="needs the pool's labels"):
        select(x, None, budgets=[30], method=["boundary"])
