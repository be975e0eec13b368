"""The GPU check's own arithmetic (benchmarks/gpu_parts.py): agreement measures and its data."""

import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # benchmarks/ is not installed; `python -m pytest` from the root has it
    sys.path.insert(0, str(ROOT))

from benchmarks.gpu_parts import adjusted_rand, clustered, matched_share  # noqa: E402


def test_adjusted_rand_equals_scikit_learns():
    from sklearn.metrics import adjusted_rand_score

    rng = np.random.default_rng(0)
    a = rng.integers(0, 7, size=500)
    b = np.where(rng.random(500) < 0.7, a, rng.integers(0, 5, size=500))
    assert np.isclose(adjusted_rand(a, b), adjusted_rand_score(a, b))
    assert adjusted_rand(a, a) == 1.0


def test_matched_share_ignores_cluster_numbers():
    a = np.array([0, 0, 1, 1, 2, 2, 2])
    relabelled = np.array([2, 0, 1])[a]
    assert matched_share(a, relabelled) == 1.0
    assert np.isclose(matched_share(a, np.array([1, 1, 0, 0, 2, 2, 0])), 6 / 7)


def test_clustered_rows_are_unit_and_near_their_center():
    x, labels, centers = clustered(3000, 16, 5, seed=3)
    assert x.shape == (3000, 16) and x.dtype == np.float32 and labels.max() < 5
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
    own = np.einsum("ij,ij->i", x, centers[labels])
    assert own.mean() > 0.7 and ((x @ centers.T).argmax(1) == labels).mean() > 0.98
