"""What both training engines share: one trial's description (:class:`TrialLoop`), its
precision, ZeRO stage and DeepSpeed config, the model loaded for training, the task's validation
(:func:`evaluate`, all-reduced over the ranks), the report to Ray Train and the saved best model.
The engines are :mod:`~ray_pipeline.finetune.train` (the hand-written DeepSpeed loop, and the
per-worker function that picks the engine) and :mod:`~ray_pipeline.finetune.hf_trainer`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np

from ..config import FinetuneConfig
from ..errors import InputError
from .task import size, task_for


@dataclass(frozen=True)
class TrialLoop:
    """Everything one trial's workers need, built once by the sweep (``sweep._trial``).

    finetune: the run's config section, whole. seed: the run's seed. model_path: the base model's
    directory. label_names: the classifier's labels (None for a causal LM). train / eval: the
    task's arrays (``Task.arrays``) of the candidate subset and of the validation part (never the
    test part). use_gpu: decided once by the sweep's resource plan. steps: this trial's cap
    (:func:`step_cap`). best_model_dir: where rank 0 keeps the best model. history_file: where
    rank 0 appends each evaluation's scores (:func:`report`). name, placement_group_file,
    inject_failure: the trial's name, where its placement group is noted
    (``sweep.release_placement_groups``), and a fault injected by the tests (True: the worker
    raises at once; an int N: it raises after reporting step N, in an attempt that did not resume:
    a worker lost mid-trial, once). modality: what the samples are (``Pool.modality``), with
    ``finetune.task`` the trial's task (``task_for``)."""

    finetune: FinetuneConfig
    seed: int
    model_path: str
    label_names: Optional[list]
    train: dict
    eval: dict
    use_gpu: bool
    steps: int
    best_model_dir: str
    name: str = ""
    placement_group_file: Optional[str] = None
    inject_failure: Union[bool, int] = False
    history_file: Optional[str] = None
    modality: str = "text"


def precision_of(ft: FinetuneConfig, on_gpu: bool) -> str:
    """``fp32``, ``bf16`` or ``fp16``: ``finetune.train.precision``, ``auto`` = bf16 on a GPU, fp32 on a CPU."""
    return ft.train.precision if ft.train.precision != "auto" else ("bf16" if on_gpu else "fp32")


def zero_stage_of(ft: FinetuneConfig, on_gpu: bool) -> int:
    """``finetune.train.zero_stage``; empty: 2 on GPUs, 0 on CPUs."""
    return ft.train.zero_stage if ft.train.zero_stage is not None else (2 if on_gpu else 0)


def check_device(ft: FinetuneConfig, on_gpu: bool) -> None:
    """What the training settings need of the device, before any trial: fp16 and a 4-bit base
    need a CUDA GPU (no silent fallback on a CPU)."""
    if on_gpu:
        return
    if precision_of(ft, on_gpu) == "fp16":
        raise InputError("finetune.train.precision 'fp16' needs a CUDA GPU and these trials run on CPUs; use "
                         "'bf16' or 'fp32' (or 'auto'), or a cluster with GPUs")
    if ft.train.quantization == "4bit":
        raise InputError("finetune.train.quantization '4bit' (QLoRA through bitsandbytes) needs a CUDA GPU and these "
                         "trials run on CPUs; use 'none', or a cluster with GPUs")


def deepspeed_config(ft: FinetuneConfig, on_gpu: bool) -> dict:
    """ZeRO-2 + bf16 on a GPU, ZeRO-0 + fp32 on a CPU, unless the config names them; the
    micro-batch and gradient accumulation of ``finetune.train``."""
    tr = ft.train
    precision = precision_of(ft, on_gpu)
    return {
        "train_micro_batch_size_per_gpu": tr.batch_size,
        "gradient_accumulation_steps": tr.gradient_accumulation_steps,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": zero_stage_of(ft, on_gpu)},
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        "steps_per_print": 10 ** 9,
    }


def evaluate(engine, tok, loop: TrialLoop, rank: int, world: int, device) -> dict:
    """Validation metrics; each rank scores a slice, the sums are all-reduced (a sync point)."""
    import torch
    import torch.distributed as dist

    task, tr = task_for(loop.finetune.task, loop.modality), loop.finetune.train
    ev = loop.eval
    mine = np.arange(rank, size(ev), world)
    loss_sum = torch.zeros(1, dtype=torch.float64)
    count = torch.zeros(1, dtype=torch.float64)
    preds, trues = [], []
    # Every rank runs the same number of forward passes: under ZeRO-3 each one gathers the weights
    # from all ranks (a collective), so a rank with a shorter slice runs a spare batch it discards.
    passes = math.ceil(math.ceil(size(ev) / world) / tr.eval_batch_size)
    engine.eval()
    with torch.inference_mode():
        for lo in range(0, passes * tr.eval_batch_size, tr.eval_batch_size):
            idx = mine[lo:lo + tr.eval_batch_size]
            batch = task.batch(tok, ev, idx if len(idx) else [0], tr.max_length)
            out = engine(**{k: v.to(device) for k, v in batch.items()})
            if not len(idx):
                continue
            part, n, pred = task.eval_sums(out, batch)
            loss_sum += part
            count += n
            if pred is not None:
                preds.append(pred)
                trues.append(np.asarray(ev["labels"])[idx])
    engine.train()
    if world > 1:  # sync point: every rank must reach this
        dist.all_reduce(loss_sum)
        dist.all_reduce(count)
    p = np.concatenate(preds) if preds else None
    t = np.concatenate(trues) if trues else None
    if p is not None and world > 1:
        # gather predictions to compute macro-F1 over the whole validation part (sync point)
        gathered_p, gathered_t = [None] * world, [None] * world
        dist.all_gather_object(gathered_p, p)
        dist.all_gather_object(gathered_t, t)
        p, t = np.concatenate(gathered_p), np.concatenate(gathered_t)
    return task.eval_metrics(float(loss_sum / count.clamp(min=1)), p, t, len(loop.label_names or ()))


def step_cap(ft: FinetuneConfig, subset_size: int) -> int:
    """A trial's most steps: ``max_epochs`` passes over its subset, at most ``max_steps``; one rule
    for every trial, so a small subset and the full pool both train until patience or this cap.

    Example:
        >>> from ray_pipeline.config import TrainSettings
        >>> ft = FinetuneConfig(train=TrainSettings(batch_size=16, max_epochs=10, max_steps=400))
        >>> step_cap(ft, 200), step_cap(ft, 10_000)
        (125, 400)
    """
    per_step = ft.train.batch_size * ft.train.gradient_accumulation_steps * ft.resources.num_workers
    return max(1, min(ft.train.max_steps, math.ceil(ft.train.max_epochs * subset_size / per_step)))


def record_placement_group(path: str) -> None:
    """Append the placement group this worker runs in to ``path`` (one hex id per line), so that
    the sweep can release it when the trial ends (:func:`sweep.release_placement_groups`)."""
    import ray

    pg = ray.util.get_current_placement_group()
    if pg is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(pg.id.hex() + "\n")


def peak_rss_gib() -> float:
    """This worker process's peak resident memory so far (GiB; Linux reports KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def keeps_training_state(loop: TrialLoop) -> bool:
    """Whether each report's checkpoint holds the training state (weights, optimizer, schedule,
    data order) a retried trial resumes from: where a trial may be retried
    (``finetune.sweep.max_retries`` > 0). It costs a save of the model and optimizer per
    evaluation; without it a checkpoint holds only ``state.json``."""
    return loop.finetune.sweep.max_retries > 0


HISTORY_FIELDS = ("step", "score", "eval_loss", "accuracy", "train_loss")  # a trial's learning curve


def report(metrics: dict, rank: int, state: Optional[dict] = None, files: Optional[Path] = None,
           history_file: Optional[str] = None) -> None:
    """``ray.train.report`` of one evaluation's metrics from every rank (a sync point), with a
    checkpoint: Ray keeps a trial's metrics only with one (the best model is saved apart). Rank 0
    writes ``state.json`` (step, score, and ``state``: what a retried trial resumes with); with
    ``files``, this rank's directory of training state (:func:`keeps_training_state`) is its part
    of the checkpoint (Ray merges the ranks' parts), and ``state.json`` goes in with it. Rank 0
    also appends the :data:`HISTORY_FIELDS` to ``history_file`` (JSON lines), the learning curve
    across attempts: a trial resumed in a restored sweep reports only its later steps to Tune."""
    import ray.train

    if rank == 0 and history_file:
        Path(history_file).parent.mkdir(parents=True, exist_ok=True)
        with open(history_file, "a") as f:
            f.write(json.dumps({k: metrics[k] for k in HISTORY_FIELDS if k in metrics}, default=float) + "\n")
    with tempfile.TemporaryDirectory() as d:
        root = Path(files) if files is not None else Path(d)
        if rank == 0:
            (root / "state.json").write_text(json.dumps({"step": metrics["step"], "score": metrics["score"],
                                                         "resumable": files is not None, **(state or {})}))
        ckpt = ray.train.Checkpoint.from_directory(str(root)) if rank == 0 or files is not None else None
        ray.train.report(metrics, checkpoint=ckpt)


def resume_point():
    """(checkpoint, its state.json) this attempt of the trial resumes from: Ray Train's latest
    checkpoint of the trial, there when the trial is retried after a lost worker or error, or its
    sweep resumed; (None, {}) on a first attempt, or where the checkpoint holds no training state
    (the attempt then starts over, and reports its steps again)."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return None, {}
    with ckpt.as_directory() as d:
        state = json.loads(Path(d, "state.json").read_text())
    return (ckpt, state) if state.get("resumable") else (None, {})


def injected_failure(loop: TrialLoop, step: int, resumed: bool) -> None:
    """The tests' fault (``TrialLoop.inject_failure`` = N): raise after the report of step N, once."""
    if loop.inject_failure is not True and loop.inject_failure and step == loop.inject_failure and not resumed:
        raise RuntimeError(f"injected failure in trial {loop.name} after step {step}")


def load_for_training(loop: TrialLoop, task):
    """(model, tokenizer) of one trial, for either engine: the base model loaded in the training
    precision (or 4-bit for QLoRA), its new head warm-started where the task can
    (``Task.warm_start``, ``finetune.train.head_init``), gradient checkpointing, LoRA adapters where
    the task's or the config's choice says so. Under ZeRO-3 with the Trainer, the weights are sharded as they load
    (``hf_trainer`` builds the ``TrainingArguments`` first)."""
    ft, tr = loop.finetune, loop.finetune.train
    precision = precision_of(ft, loop.use_gpu)
    model, tok = task.load(loop.model_path, loop.label_names, precision=precision, quantization=tr.quantization,
                           trust_remote_code=ft.trust_remote_code)
    if tr.head_init == "auto" and loop.label_names and zero_stage_of(ft, loop.use_gpu) != 3:
        task.warm_start(model, tok, loop.train, tr.eval_batch_size)  # the same on every rank: same samples
    if tr.quantization == "4bit":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=tr.gradient_checkpointing)
    elif tr.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if tr.gradient_checkpointing:
        model.config.use_cache = False  # a cache is of no use in training and clashes with checkpointing
    if task.uses_lora(ft):
        model = task.with_lora(model, ft.lora)
    return model, tok


def save_model(model, tok, out: Path, metrics: dict) -> None:
    """save_pretrained into a temporary directory beside ``out``, then swap it in. A LoRA model
    is saved merged (a plain model for ``from_pretrained``) with its adapter in ``adapter/``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    if hasattr(model, "merge_and_unload"):  # a PEFT model
        import copy

        model.save_pretrained(tmp / "adapter", safe_serialization=True)
        model = copy.deepcopy(model).merge_and_unload()
    model.save_pretrained(tmp, safe_serialization=True)
    swap_in(tmp, tok, out, metrics)


def remove_unfinished_saves(trials_dir: Path) -> list[Path]:
    """The temporary directories :func:`save_model` left under ``trials_dir`` when a worker was
    stopped mid-save (an interrupted sweep): removed, never taken for a model. Returns them."""
    left = sorted(Path(trials_dir).glob("*/.*.tmp-*"))
    for p in left:
        shutil.rmtree(p, ignore_errors=True)
    return left


def swap_in(tmp: Path, tok, out: Path, metrics: dict) -> None:
    """The saved model in ``tmp`` (beside ``out``), with its tokenizer and ``metrics.json``,
    becomes ``out``; the model ``out`` held before is removed."""
    tok.save_pretrained(tmp)
    (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float))
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
