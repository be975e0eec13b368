"""The training options that need CUDA, through the real Ray Train + Trainer worker: bf16 weights,
QLoRA (a 4-bit base through bitsandbytes), ZeRO-3 and two GPUs per trial. Marked ``gpu``: skipped
where torch sees no GPU (tests/conftest.py), run with ``-m gpu`` the day one is at hand."""

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import fit_trial

from ray_pipeline.config import FinetuneConfig, ResourceSettings, TrainSettings

PROMPTS = {"prompts": [f"Question {i}: what is {i} plus {i}?\n" for i in range(16)],
           "responses": [f"{2 * i}." for i in range(16)]}


def fit_on_gpus(ft: FinetuneConfig, out: Path, model_path=None, label_names=None, data=PROMPTS):
    """One trial's worker function on ``ft.resources.num_workers`` GPUs (NCCL); its history."""
    from ray_pipeline.finetune.train import TrialLoop
    from ray_pipeline.io.models import smollm2_path

    loop = TrialLoop(finetune=ft, seed=0, use_gpu=True, steps=ft.train.max_steps,
                     model_path=str(model_path or smollm2_path()), label_names=label_names, train=data, eval=data,
                     best_model_dir=str(out / "best"))
    return fit_trial(loop, out, workers=ft.resources.num_workers).metrics_dataframe


def instruction(workers: int = 1, engine: str = "trainer", **train) -> FinetuneConfig:
    settings = dict(lr=2e-3, batch_size=4, max_steps=4, eval_every=2, max_length=32, engine=engine)
    settings.update(train)
    return FinetuneConfig(task="instruction", resources=ResourceSettings(num_workers=workers),
                          train=TrainSettings(**settings))


def shapes(model_dir: Path) -> dict:
    """Tensor name -> shape in a model's ``model.safetensors`` (read from its header; bf16 too)."""
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        return {k: f.get_slice(k).get_shape() for k in f.keys()}


def saved_dtype(model_dir: Path) -> str:
    conf = json.loads((model_dir / "config.json").read_text())
    return conf.get("dtype", conf.get("torch_dtype"))


ENGINES = pytest.mark.parametrize("engine", ["loop", "trainer"])


@pytest.mark.gpu
@pytest.mark.slow
@ENGINES
def test_bf16_weights_with_lora_on_a_gpu(engine, tmp_path, local_ray):
    h = fit_on_gpus(instruction(engine=engine, precision="bf16", gradient_checkpointing=True), tmp_path / "bf16")
    assert list(h["step"]) == [2, 4] and h["eval_loss"].iloc[-1] < h["eval_loss"].iloc[0]
    assert saved_dtype(tmp_path / "bf16" / "best") == "bfloat16"


@pytest.mark.gpu
@pytest.mark.slow
@ENGINES
def test_qlora_trains_lora_adapters_on_a_4bit_base(engine, tmp_path, local_ray):
    pytest.importorskip("bitsandbytes")
    h = fit_on_gpus(instruction(engine=engine, quantization="4bit", precision="bf16", gradient_checkpointing=True),
                    tmp_path / "qlora")
    assert np.isfinite(h["eval_loss"]).all() and h["eval_loss"].iloc[-1] < h["eval_loss"].iloc[0]
    assert (tmp_path / "qlora" / "best" / "adapter" / "adapter_config.json").is_file()


@pytest.mark.gpu
@pytest.mark.slow
@ENGINES
def test_two_gpus_per_trial_share_the_batch(engine, tmp_path, local_ray):
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA GPUs")
    h = fit_on_gpus(instruction(workers=2, engine=engine, precision="bf16", zero_stage=2), tmp_path / "two")
    assert list(h["step"]) == [2, 4]
    assert list(h["samples_seen"]) == [2 * 4 * 2, 4 * 4 * 2]  # steps x batch x two workers


@pytest.mark.gpu
@pytest.mark.slow
def test_zero3_on_gpus_saves_a_whole_model(tmp_path, local_ray):
    import torch

    from ray_pipeline.io.models import smollm2_path

    workers = min(2, torch.cuda.device_count())
    h = fit_on_gpus(instruction(workers=workers, precision="bf16", zero_stage=3), tmp_path / "zero3")
    assert list(h["step"]) == [2, 4] and np.isfinite(h["eval_loss"]).all()
    base, saved = shapes(Path(smollm2_path())), shapes(tmp_path / "zero3" / "best")
    assert len(saved) > 100 and all(saved[k] == base[k] for k in saved)  # gathered, not empty shards
    assert (tmp_path / "zero3" / "best" / "adapter" / "adapter_config.json").is_file()
