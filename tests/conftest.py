"""Shared fixtures and lanes. GPU tests carry ``@pytest.mark.gpu`` and skip where torch sees no GPU."""

import os
from pathlib import Path

import numpy as np
import pytest

# One thread per library: on a loaded 2-core machine torch with two threads can be many times
# slower than with one (../shared/STACK_NOTES.md).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; run with -m gpu on a GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"the shared data folder {SHARED_DATA} is not beside this checkout")
    return SHARED_DATA


def unit_blobs(n: int, d: int, k: int, seed: int) -> np.ndarray:
    """n float32 unit vectors around k random directions."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, d)) * 3
    x = centers[rng.integers(0, k, size=n)] + rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
