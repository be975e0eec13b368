"""The training options LLM users expect, through the real Ray Train + DeepSpeed worker:
gradient accumulation equals the larger batch, bf16 weights with LoRA on a CPU, what a CPU
cannot do refused up front, and the GPU memory plan refusing what cannot fit."""

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import fit_trial

from ray_pipeline.config import Config, FinetuneConfig, ResourceSettings, TrainSettings
from ray_pipeline.errors import ConfigError, InputError
from ray_pipeline.finetune.train import check_device, step_cap


def fit(model_path, data, labels, ft, out: Path):
    """One trial's worker on ``data`` (train and validation alike), one worker on the CPU."""
    from ray_pipeline.finetune.train import TrialLoop

    loop = TrialLoop(finetune=ft, seed=0, use_gpu=False, steps=ft.train.max_steps, model_path=str(model_path),
                     label_names=labels, train=data, eval=data, best_model_dir=str(out / "best"))
    return fit_trial(loop, out).metrics_dataframe


def weights(model_dir: Path) -> dict:
    from safetensors.numpy import load_file

    return load_file(str(model_dir / "model.safetensors"))


@pytest.mark.slow
def test_gradient_accumulation_4_x_4_is_the_update_of_batch_16(tmp_path, local_ray):
    """One optimizer step on 16 samples: as one batch of 16, or 4 micro-batches of 4 accumulated,
    the update is the same (cosine > 0.9999); one batch of 4 alone is a different update (the test
    can fail). Dropout is off so that the only difference is how the batch is cut."""
    from ray_pipeline.io.models import resolve

    model = tmp_path / "minilm-no-dropout"
    shutil.copytree(resolve("minilm"), model)
    conf = json.loads((model / "config.json").read_text())
    conf.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (model / "config.json").write_text(json.dumps(conf))
    texts = [f"sample {i}: {'card' if i % 2 else 'transfer'} question number {i * 7}" for i in range(16)]
    data = {"texts": texts, "labels": np.arange(16) % 2}
    updates = {}
    for name, batch, accumulate in (("b16", 16, 1), ("b4x4", 4, 4), ("b4", 4, 1)):
        ft = FinetuneConfig(train=TrainSettings(lr=1e-3, batch_size=batch, gradient_accumulation_steps=accumulate,
                                                eval_batch_size=16, max_steps=1, eval_every=1, max_length=16,
                                                precision="fp32", zero_stage=0))
        fit(model, data, ["a", "b"], ft, tmp_path / name)
        updates[name] = weights(tmp_path / name / "best")

    def flat_diff(a, b):
        return np.concatenate([(a[k].astype(np.float64) - b[k]).ravel() for k in sorted(a)])

    # every run starts from the same weights (seeded head): the differences of the results are the
    # differences of the updates
    same = flat_diff(updates["b4x4"], updates["b16"])
    other = flat_diff(updates["b4"], updates["b16"])
    assert np.abs(same).max() < 1e-5, np.abs(same).max()
    assert np.abs(other).max() > 1e-4  # a batch of 4 alone moves the weights elsewhere


@pytest.mark.slow
def test_bf16_weights_with_lora_train_on_a_cpu(tmp_path, local_ray):
    from ray_pipeline.io.models import smollm2_path

    data = {"prompts": ["What is the capital of France?\n", "What colour is the sky?\n"],
            "responses": ["Paris.", "Blue."]}
    ft = FinetuneConfig(task="instruction", resources=ResourceSettings(threads_per_worker=2),
                        train=TrainSettings(lr=2e-3, batch_size=2, max_steps=4, eval_every=2, max_length=32,
                                            precision="bf16", gradient_checkpointing=True, warmup_ratio=0.5,
                                            lr_scheduler_type="linear"))
    h = fit(smollm2_path(), data, None, ft, tmp_path / "bf16")
    assert list(h["step"]) == [2, 4] and np.isfinite(h["eval_loss"]).all()
    assert h["eval_loss"].iloc[-1] < h["eval_loss"].iloc[0]
    conf = json.loads((tmp_path / "bf16" / "best" / "config.json").read_text())
    assert conf.get("torch_dtype", conf.get("dtype")) == "bfloat16"  # saved as it trained
    assert (tmp_path / "bf16" / "best" / "adapter" / "adapter_config.json").is_file()


def test_what_a_cpu_cannot_do_is_refused_before_any_trial():
    with pytest.raises(InputError, match="'fp16' needs a CUDA GPU"):
        check_device(FinetuneConfig(train=TrainSettings(precision="fp16")), on_gpu=False)
    with pytest.raises(InputError, match="'4bit'.*needs a CUDA GPU"):
        check_device(FinetuneConfig(train=TrainSettings(quantization="4bit")), on_gpu=False)
    check_device(FinetuneConfig(train=TrainSettings(precision="fp16", quantization="4bit")), on_gpu=True)
    check_device(FinetuneConfig(train=TrainSettings(precision="bf16")), on_gpu=False)  # bf16 runs on CPUs
    with pytest.raises(ConfigError, match="use finetune.train.engine: trainer for ZeRO-3"):
        TrainSettings(zero_stage=3, engine="loop")
    assert TrainSettings(zero_stage=3, engine="trainer").zero_stage == 3  # ZeRO-3 through the Trainer


def test_training_args_pass_through_and_are_checked_against_the_dataclass():
    cfg = Config.from_dict({"finetune": {"train": {"engine": "trainer",
                                                       "training_args": {"adam_beta2": 0.95, "max_grad_norm": 0.5}}}})
    assert cfg.finetune.train.training_args == {"adam_beta2": 0.95, "max_grad_norm": 0.5}
    with pytest.raises(ConfigError, match=r"'finetune.train.training_args.adam_beta3' is not a field of transformers"):
        Config.from_dict({"finetune": {"train": {"engine": "trainer", "training_args": {"adam_beta3": 0.9}}}})
    for key, use in (("max_steps", "finetune.train.max_steps"), ("deepspeed", "finetune.train.zero_stage"),
                     ("learning_rate", "finetune.train.lr"), ("output_dir", "the run's output_dir")):
        with pytest.raises(ConfigError, match=rf"training_args.{key}' is set by the project; use {use}"):
            Config.from_dict({"finetune": {"train": {"engine": "trainer", "training_args": {key: 1}}}})
    with pytest.raises(ConfigError, match="training_args.*a mapping"):
        Config.from_dict({"finetune": {"train": {"engine": "trainer", "training_args": [1, 2]}}})
    with pytest.raises(ConfigError, match="empty with finetune.train.engine: loop"):
        Config.from_dict({"finetune": {"train": {"engine": "loop", "training_args": {"adam_beta2": 0.95}}}})


def test_the_trainer_gets_the_project_settings_by_their_own_names(tmp_path):
    from ray_pipeline.finetune.hf_trainer import hf_deepspeed_config, training_arguments
    from ray_pipeline.finetune.train import TrialLoop

    ft = FinetuneConfig(train=TrainSettings(lr=3e-4, batch_size=4, gradient_accumulation_steps=2, warmup_ratio=0.1,
                                            weight_decay=0.05, lr_scheduler_type="cosine", eval_every=5,
                                            precision="bf16", engine="trainer",
                                            training_args={"adam_beta2": 0.95, "max_grad_norm": 0.5}))
    loop = TrialLoop(finetune=ft, seed=7, model_path="", label_names=None, train={}, eval={}, use_gpu=False, steps=20,
                     best_model_dir="")
    a = training_arguments(loop, str(tmp_path))
    assert (a.learning_rate, a.per_device_train_batch_size, a.gradient_accumulation_steps, a.max_steps) == \
        (3e-4, 4, 2, 20)
    assert (a.get_warmup_steps(20), a.weight_decay, a.lr_scheduler_type, a.bf16, a.seed, a.logging_steps) == \
        (2, 0.05, "cosine", True, 7, 5)
    assert a.adam_beta2 == 0.95 and a.max_grad_norm == 0.5 and a.use_cpu
    # a trial that may be retried (finetune.sweep.max_retries, 2 by default) keeps its training state
    assert (a.save_strategy, a.save_steps, a.save_total_limit) == ("steps", 5, 1)
    once = replace(loop, finetune=replace(ft, sweep=replace(ft.sweep, max_retries=0)))
    assert training_arguments(once, str(tmp_path)).save_strategy == "no"
    assert hf_deepspeed_config(loop)["zero_optimization"] == {"stage": 0}
    zero3 = replace(loop, finetune=replace(ft, train=replace(ft.train, zero_stage=3)))
    assert hf_deepspeed_config(zero3)["zero_optimization"] == {"stage": 3,
                                                               "stage3_gather_16bit_weights_on_model_save": True}


def test_a_step_takes_the_accumulated_micro_batches():
    ft = FinetuneConfig(train=TrainSettings(batch_size=4, gradient_accumulation_steps=4, max_epochs=1, max_steps=100))
    assert step_cap(ft, 160) == 10  # 160 samples, 16 a step


def test_a_plan_that_cannot_fit_the_gpu_is_refused_with_what_to_change(tmp_path):
    """The memory plan of the packaged MiniLM (22.7M parameters) in full fine-tuning cannot fit a
    GPU of 0.5 GB (the CUDA context alone is 1 GiB): an error that names the fixes; --check says
    so as exit 2 with one line, before anything is written."""
    from ray_pipeline.cli import main
    from ray_pipeline.finetune.sizing import check_memory, count_parameters
    from ray_pipeline.io.models import resolve
    from transformers import AutoConfig

    size = count_parameters(AutoConfig.from_pretrained(resolve("minilm")), num_labels=3)
    assert 22_000_000 < size.params < 23_500_000 and size.head == 384 * 3 + 3
    cfg = Config.from_dict({"finetune": {"resources": {"gpu_memory_gb": 0.5}}})
    with pytest.raises(InputError, match=r"more than its GPU's 0.5 GB.*lora.enabled: true.*gradient_checkpointing"):
        check_memory(cfg, resolve("minilm"), 3, on_gpu=True)
    assert check_memory(Config.from_dict({"finetune": {"resources": {"gpu_memory_gb": 80}}}), resolve("minilm"), 3,
                        on_gpu=True)["total"] < 80
    (tmp_path / "pool.csv").write_text("text,label\n" + "".join(f"sample {i},{'ab'[i % 2]}\n" for i in range(40)))
    (tmp_path / "held.csv").write_text("text,label\n" + "".join(f"held {i},{'ab'[i % 2]}\n" for i in range(10)))
    rc = main(["run", "--data", str(tmp_path / "pool.csv"), "--label-column", "label", "--eval",
               str(tmp_path / "held.csv"), "--budgets", "4", "--k", "2", "--out", str(tmp_path / "run"), "--check",
               "--set", "finetune.resources.gpu_memory_gb=0.5"])
    assert rc == 2 and not (tmp_path / "run").exists()


def test_lora_fields_keep_peft_names():
    from ray_pipeline.finetune.task import CausalLM

    cfg = Config.from_dict({"finetune": {"task": "instruction", "lora": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.1}}})
    assert (cfg.finetune.lora.r, cfg.finetune.lora.lora_alpha, cfg.finetune.lora.lora_dropout) == (4, 8.0, 0.1)
    with pytest.raises(ConfigError, match=r"finetune\.lora\.lora_alpha"):
        Config.from_dict({"finetune": {"lora": {"alpha": 8}}})
    assert CausalLM().uses_lora(cfg.finetune)
