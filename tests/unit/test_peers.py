"""benchmarks/peers.py's own re-implementations of peers that have no library: hand cases."""

import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # benchmarks/ is not installed; `python -m pytest` from the root has it
    sys.path.insert(0, str(ROOT))

from benchmarks.peers import coverage_redundancy, kmq, top_by_score  # noqa: E402


def test_zcore_coverage_redundancy_by_hand():
    # Points on a line at 0, 1, 1.1 and 5; probes at 0.2 (nearest: 0), 4.0 (nearest: 5) and 1.08
    # (nearest: 1.1). Each probe's nearest sample gets +1 and that sample's nearest other -0.5:
    # 0's neighbour is 1, 5's is 1.1, 1.1's is 1. Scores 1, -1, 1 - 0.5, 1.
    xs = np.array([[0.0], [1.0], [1.1], [5.0]])
    score = coverage_redundancy(xs, np.array([[0.2], [4.0], [1.08]]), neighbours=1, redundancy=0.5)
    assert score.tolist() == [1.0, -1.0, 0.5, 1.0]
    assert top_by_score(score)[:2].tolist() == [0, 3]  # the tie goes to the lower row


def test_kmq_takes_each_clusters_share_at_random():
    rng = np.random.default_rng(0)
    centers = np.eye(4, 8, dtype=np.float32) * 10
    z = np.repeat(np.arange(4), [100, 50, 30, 20])
    x = centers[z] + rng.normal(size=(200, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    sub = kmq(x, [20], np.random.default_rng(1), k=4)[20]
    assert len(set(sub.tolist())) == 20
    assert sorted(np.bincount(z[sub], minlength=4).tolist()) == [2, 3, 5, 10]  # 20 * 100/200, 50/200, ...
