"""The peers' re-implementations (benchmarks/peer_methods.py) on hand cases, and the harness's (benchmarks/peers.py)
proxy choice and candidate naming."""

import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # benchmarks/ is not installed; `python -m pytest` from the root has it
    sys.path.insert(0, str(ROOT))

from benchmarks.peer_methods import coverage_redundancy, kmq, per_label, top_by_score  # noqa: E402


def test_zcore_coverage_redundancy_by_hand():
    # Points on a line at 0, 1, 1.1 and 5; probes at 0.2 (nearest: 0), 4.0 (nearest: 5) and 1.08
    # (nearest: 1.1). Each probe's nearest sample gets +1 and that sample's nearest other -0.5:
    # 0's neighbour is 1, 5's is 1.1, 1.1's is 1. Scores 1, -1, 1 - 0.5, 1.
    xs = np.array([[0.0], [1.0], [1.1], [5.0]])
    score = coverage_redundancy(xs, np.array([[0.2], [4.0], [1.08]]), neighbours=1, redundancy=0.5)
    assert score.tolist() == [1.0, -1.0, 0.5, 1.0]
    assert top_by_score(score)[:2].tolist() == [0, 3]  # the tie goes to the lower row


def test_per_label_runs_the_order_in_each_label_with_its_share():
    # Labels a (rows 0, 3) and b (rows 1, 2, 4, 5). m = 3: shares 1 and 2 (proportional); m = 6:
    # 2 and 4. The order picks a label's rows last first, so its first picks are its last rows.
    x = np.arange(6, dtype=np.float32)[:, None]
    y = np.array(["a", "b", "b", "a", "b", "b"])
    calls = []

    def last_first(xl, m):
        calls.append((xl[:, 0].tolist(), m))
        return np.arange(len(xl))[::-1][:m]

    got = per_label(last_first, x, y, [3, 6])
    assert calls == [([0.0, 3.0], 2), ([1.0, 2.0, 4.0, 5.0], 4)]  # one run a label, to its largest share
    assert got[3].tolist() == [3, 5, 4] and sorted(got[6].tolist()) == list(range(6))


def test_kmq_takes_each_clusters_share_at_random():
    rng = np.random.default_rng(0)
    centers = np.eye(4, 8, dtype=np.float32) * 10
    z = np.repeat(np.arange(4), [100, 50, 30, 20])
    x = centers[z] + rng.normal(size=(200, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    sub = kmq(x, [20], np.random.default_rng(1), k=4)[20]
    assert len(set(sub.tolist())) == 20
    assert sorted(np.bincount(z[sub], minlength=4).tolist()) == [2, 3, 5, 10]  # 20 * 100/200, 50/200, ...


def test_proxy_choice_picks_by_validation_and_reports_the_regret():
    from benchmarks.peers import proxy_choice

    cands = {("kcenter", "M"): {"name": "k10_m10", "validation": 0.50, "test": 0.70},
             ("facility", "M"): {"name": "facility_k10_m10", "validation": 0.60, "test": 0.65},
             ("centroid", "M"): {"name": "centroid_k10_m10", "validation": 0.40, "test": 0.90}}
    r = proxy_choice(cands, [("kcenter", "M"), ("facility", "M")])
    assert (r["chose"], r["best"], r["mean"]) == ("facility_k10_m10", "k10_m10", 0.65)
    assert abs(r["regret"] - 0.05) < 1e-12
    assert set(r["candidates"]) == {"k10_m10", "facility_k10_m10"}  # the third was not among them


def test_pipeline_candidates_name_each_k_spec_as_the_grid_does():
    from benchmarks.peers import KS, METHODS, PIPELINES, pipeline_candidates

    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    labels = np.array([str(i % 3) for i in range(600)], dtype=object)
    sizes = []
    cands = pipeline_candidates(x, labels, 60, lambda rows, on: sizes.append(len(rows)) or 0.0, "val", "test")
    assert set(cands) == {(m, k) for m in METHODS for k in KS}
    # K = round(r M) for M = 60: M/8 -> 8 (7.5 rounds to even), M/4 -> 15, M/2 -> 30, M -> 60
    assert {k: cands[("facility", k)]["name"] for k in KS} == {
        "M/8": "facility_k8_m60", "M/4": "facility_k15_m60", "M/2": "facility_k30_m60", "M": "facility_k60_m60"}
    assert cands[("kcenter", "M/2")]["name"] == "k30_m60"
    assert set(sizes) == {60}  # every candidate holds M rows
    assert all(m != "facility" for m, _ in PIPELINES["pipeline"])  # the default grid's own candidates
