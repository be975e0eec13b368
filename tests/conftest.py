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


@pytest.fixture(scope="session")
def local_ray():
    """One local Ray for the whole test session. Ray Train does not survive a second ray.init in
    a process that already ran one (its controller is cancelled before it starts), so every test
    that needs an in-process Ray shares this one. The dashboard stays on: Train V2 inside Tune polls
    its state API (../shared/STACK_NOTES.md)."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=False)
    yield ray
    ray.shutdown()


def hub_model(cache: Path, repo_id: str, src: Path, commit: str = "0" * 40, refs=("main",)) -> Path:
    """``src`` (a model directory) entered in the Hugging Face cache ``cache`` (``$HF_HOME/hub``) as
    Hub model ``repo_id`` at ``commit``, with branches/tags ``refs`` pointing at it: the layout
    huggingface_hub writes (``models--ORG--NAME/refs/<ref>``, ``snapshots/<commit>/``), its files
    linked to ``src``'s as the hub links them to its blobs. Returns the snapshot directory."""
    repo = Path(cache) / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True, exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    for f in Path(src).iterdir():
        if not (snap / f.name).exists():
            (snap / f.name).symlink_to(f.resolve(), target_is_directory=f.is_dir())
    return snap


def fit_trial(loop, out: Path, *, workers: int = 1, cpus: float = 1.0):
    """The trial ``loop`` (a ``finetune.train.TrialLoop``) through the real per-worker function in a
    ``TorchTrainer`` of ``workers`` workers (NCCL and a GPU each where ``loop.use_gpu``, else gloo
    and ``cpus`` CPUs); Ray Train's result."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from ray_pipeline.finetune.train import train_loop_per_worker

    per_worker = {"CPU": cpus, **({"GPU": 1} if loop.use_gpu else {})}
    return TorchTrainer(train_loop_per_worker, train_loop_config={"loop": loop},
                        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=loop.use_gpu,
                                                               resources_per_worker=per_worker),
                        torch_config=TorchConfig(backend="nccl" if loop.use_gpu else "gloo"),
                        run_config=ray.train.RunConfig(name=out.name, storage_path=str(out / "store"))).fit()
