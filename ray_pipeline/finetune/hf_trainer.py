"""``finetune.train.engine: trainer``: one trial's worker through Hugging Face's ``Trainer``.

As Ray's own LLM fine-tuning examples do (``doc/source/train/examples/deepspeed/``,
``transformers_torch_trainer_basic.py``): inside the Ray Train worker a ``transformers.Trainer``
is built, wrapped by ``ray.train.huggingface.transformers.prepare_trainer``, and a
``TrainerCallback`` reports to Ray Train (so to Tune's ASHA and the patience rule) with the
project's metric names and a small checkpoint. The DeepSpeed config of
:func:`~ray_pipeline.finetune.trial.deepspeed_config` goes in through
``TrainingArguments(deepspeed=...)``; the project's training settings map to the
``TrainingArguments`` fields of their own names, and ``finetune.train.training_args`` passes any
other field through.

Plain ``Trainer``, not TRL's ``SFTTrainer``: the task strategy (:mod:`~ray_pipeline.finetune.task`)
already renders chats with the model's template and masks the loss to the assistant turns (what
``SFTTrainer``'s ``assistant_only_loss`` adds), and one tokenization path means both engines
train on the very same tokens. The batches are the task's (``Task.batch`` as the collator of a
dataset of row indices); the evaluation is the task's too
(:func:`~ray_pipeline.finetune.trial.evaluate`: token-weighted loss, accuracy, macro-F1).

ZeRO-3: the ``TrainingArguments`` holding a stage-3 config are made *before* ``from_pretrained``,
so transformers (``HfDeepSpeedConfig``) loads the weights straight into ``deepspeed.zero.Init``
shards; ``stage3_gather_16bit_weights_on_model_save`` lets ``Trainer.save_model`` gather them whole
on rank 0 (a collective: every rank saves).
"""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

from .task import size, task_for, units
from .trial import (TrialLoop, deepspeed_config, evaluate, injected_failure, keeps_training_state, load_for_training,
                    peak_rss_gib, precision_of, report, resume_point, save_model, swap_in, zero_stage_of)

log = logging.getLogger(__name__)


def hf_deepspeed_config(loop: TrialLoop) -> dict:
    """The trial's DeepSpeed config with ``auto`` where ``TrainingArguments`` holds the value (the
    Trainer fills them in and refuses a mismatch); under ZeRO-3, the whole model gathered on save."""
    ds = deepspeed_config(loop.finetune, loop.use_gpu)
    ds.update(train_micro_batch_size_per_gpu="auto", gradient_accumulation_steps="auto", gradient_clipping="auto",
              bf16={"enabled": "auto"}, fp16={"enabled": "auto"})
    if ds["zero_optimization"]["stage"] == 3:
        ds["zero_optimization"].update(stage3_gather_16bit_weights_on_model_save=True)
    return ds


def training_arguments(loop: TrialLoop, output_dir: str):
    """The ``TrainingArguments`` of one trial: the project's settings by their own names, the
    pass-through ``finetune.train.training_args`` over the rest. Evaluation, logging and stopping
    are the :class:`ReportToRay` callback's. Where a trial may be retried
    (``trial.keeps_training_state``), the Trainer saves its state at each evaluation (the last one
    kept), which the callback hands to Ray Train as the checkpoint; otherwise it saves none."""
    from transformers import TrainingArguments

    ft, tr = loop.finetune, loop.finetune.train
    precision = precision_of(ft, loop.use_gpu)
    ours = dict(
        output_dir=output_dir, deepspeed=hf_deepspeed_config(loop), max_steps=loop.steps,
        per_device_train_batch_size=tr.batch_size, per_device_eval_batch_size=tr.eval_batch_size,
        gradient_accumulation_steps=tr.gradient_accumulation_steps, learning_rate=tr.lr,
        lr_scheduler_type=tr.lr_scheduler_type, warmup_steps=tr.warmup_ratio,  # < 1: a share of the steps
        weight_decay=tr.weight_decay, max_grad_norm=1.0,
        activation_checkpointing=tr.gradient_checkpointing,  # transformers 5's name for gradient_checkpointing
        activation_checkpointing_kwargs={"use_reentrant": False} if tr.gradient_checkpointing else None,
        bf16=precision == "bf16", fp16=precision == "fp16", use_cpu=not loop.use_gpu, seed=loop.seed,
        data_seed=loop.seed, eval_strategy="no", logging_strategy="steps",
        **(dict(save_strategy="steps", save_steps=tr.eval_every, save_total_limit=1) if keeps_training_state(loop)
           else dict(save_strategy="no")),
        logging_steps=tr.eval_every, report_to="none", disable_tqdm=True, remove_unused_columns=False,
        dataloader_num_workers=0, optim="adamw_torch")  # torch's AdamW: DeepSpeed's would compile for minutes
    # the pass-through may change the defaults above that no project key owns (max_grad_norm, optim, ...)
    return TrainingArguments(**{**ours, **tr.training_args})


class TaskCollator:
    """Row indices -> the task's batch (``Task.batch``); counts this rank's tokens for tokens/s."""

    def __init__(self, task, tok, data: dict, max_length: int):
        self.task, self.tok, self.data, self.max_length = task, tok, data, max_length
        self.tokens = 0

    def __call__(self, idx: list) -> dict:
        batch = self.task.batch(self.tok, self.data, idx, self.max_length)
        self.tokens += units(batch)
        return batch


def _callback(loop: TrialLoop, tok, collator: TaskCollator, rank: int, world: int, device, resumed: dict):
    from transformers import TrainerCallback

    class ReportToRay(TrainerCallback):
        """Every ``eval_every`` steps (when the Trainer logs the window's mean loss, averaged over
        the ranks) and at the last step: the task's validation metrics, the best model saved,
        ``ray.train.report`` (a sync point; once the Trainer has saved its state, where it does),
        and the patience rule stops the Trainer. ``resumed``: the state.json of the checkpoint a
        retried trial resumes from (its best score, patience count, seconds and tokens so far)."""

        def __init__(self):
            self.trainer = None  # set once the Trainer is built
            self.best, self.since_best = resumed.get("best", -math.inf), resumed.get("since_best", 0)
            self.done_s, self.t0 = resumed.get("train_seconds", 0.0), time.perf_counter()
            self.pending = None  # metrics of this step's evaluation, reported with the state saved after it
            collator.tokens = resumed.get("tokens", 0)

        def on_train_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter() - self.done_s
            if self.since_best >= loop.finetune.train.patience:  # lost after its last report: nothing left
                control.should_training_stop = True
            return control

        def on_step_end(self, args, state, control, **kw):
            if state.global_step == loop.steps:
                control.should_log = True  # the last step is evaluated even off the eval_every grid
            return control

        def on_log(self, args, state, control, logs=None, **kw):
            if not logs or "loss" not in logs:  # the end-of-training summary, not a window
                return control
            tr, step = loop.finetune.train, state.global_step
            metrics = evaluate(self.trainer.model, tok, loop, rank, world, device)
            improved = metrics["score"] > self.best
            self.best, self.since_best = (metrics["score"], 0) if improved else (self.best, self.since_best + 1)
            stop = self.since_best >= tr.patience
            elapsed = time.perf_counter() - self.t0
            samples_seen = step * tr.batch_size * tr.gradient_accumulation_steps * world
            metrics.update(step=step, evaluation=math.ceil(step / tr.eval_every), samples_seen=samples_seen,
                           epochs=samples_seen / max(size(loop.train), 1), train_loss=float(logs["loss"]),
                           best_score=self.best, tokens_per_s=collator.tokens * world / max(elapsed, 1e-9),
                           train_seconds=elapsed, peak_rss_gib=peak_rss_gib(), stopped_by_patience=stop,
                           resumed_from_step=resumed.get("step", 0))
            if improved:
                save_best(self.trainer, loop, tok, metrics, rank)
            if control.should_save and keeps_training_state(loop):  # saved next: report in on_save
                self.pending = metrics
            else:
                self._report(metrics)
            if stop:  # never reset: at the last step the Trainer's own flow has set it already
                control.should_training_stop = True
            return control

        def on_save(self, args, state, control, **kw):
            if self.pending is not None:
                metrics, self.pending = self.pending, None
                self._report(metrics, Path(args.output_dir) / f"checkpoint-{state.global_step}")
            return control

        def _report(self, metrics: dict, files=None):
            report(metrics, rank, {"best": self.best, "since_best": self.since_best,
                                   "train_seconds": metrics["train_seconds"], "tokens": collator.tokens}, files=files,
                   history_file=loop.history_file)
            injected_failure(loop, metrics["step"], resumed=bool(resumed))

    return ReportToRay()


def fit_with_trainer(loop: TrialLoop, task, rank: int, world: int, device) -> None:
    """One trial's worker (``train.train_loop_per_worker`` decided the engine): build the
    Trainer over the task's batches and train until patience or ``loop.steps``."""
    import torch
    from ray.train.huggingface.transformers import prepare_trainer
    from transformers import Trainer

    tr = loop.finetune.train
    ckpt, resumed = resume_point()  # a retried trial goes on from its last checkpoint
    with tempfile.TemporaryDirectory(prefix="hf-trainer-") as out, \
            (ckpt.as_directory() if ckpt is not None else nullcontext()) as state_dir:
        args = training_arguments(loop, out)  # before from_pretrained: ZeRO-3 loads into shards
        torch.manual_seed(loop.seed)
        model, tok = load_for_training(loop, task)
        collator = TaskCollator(task, tok, loop.train, tr.max_length)
        callback = _callback(loop, tok, collator, rank, world, device, resumed)
        trainer = Trainer(model=model, args=args, train_dataset=list(range(size(loop.train))),
                          data_collator=collator, callbacks=[callback])
        # A classifier's loss accepts num_items_in_batch and ignores it: without this, an accumulated
        # step's gradient would be gradient_accumulation_steps times too large.
        trainer.model_accepts_loss_kwargs = task.loss_takes_num_items
        trainer = prepare_trainer(trainer)
        callback.trainer = trainer
        # resumed: weights, optimizer, schedule, RNG and the data order's position (the Trainer's own)
        trainer.train(resume_from_checkpoint=state_dir)


def save_best(trainer, loop: TrialLoop, tok, metrics: dict, rank: int) -> None:
    """The trial's best model into ``loop.best_model_dir`` (``trial.save_model``'s layout: a plain
    model for ``from_pretrained``, a LoRA adapter beside it in ``adapter/``). Under ZeRO-3 every
    rank takes part (``Trainer.save_model`` gathers the shards onto rank 0: a collective); a LoRA
    adapter saved so is merged on rank 0 into the base model, read whole from its files."""
    if zero_stage_of(loop.finetune, loop.use_gpu) != 3:
        if rank == 0:
            save_model(trainer.model, tok, Path(loop.best_model_dir), metrics)
        return
    out = Path(loop.best_model_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    gathered = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.zero3-")) if rank == 0 else None
    trainer.save_model(str(gathered) if gathered else None)  # rank 0 writes; output_dir elsewhere is unused
    if rank != 0:
        return
    (gathered / "training_args.bin").unlink(missing_ok=True)
    if not (gathered / "adapter_config.json").is_file():
        swap_in(gathered, tok, out, metrics)  # a whole model already
        return
    from peft import PeftModel

    ft = loop.finetune
    with whole_weights():
        base, _ = task_for(ft.task, loop.modality).load(loop.model_path, loop.label_names,
                                                        precision=precision_of(ft, loop.use_gpu),
                                                        trust_remote_code=ft.trust_remote_code)
    save_model(PeftModel.from_pretrained(base, str(gathered)), tok, out, metrics)
    shutil.rmtree(gathered, ignore_errors=True)


@contextmanager
def whole_weights():
    """``from_pretrained`` loads whole weights in the block, on this process alone: transformers'
    ZeRO-3 hook (``HfDeepSpeedConfig``, alive with the ``TrainingArguments``) would otherwise load
    them into ``zero.Init`` shards, a collective the other ranks do not join."""
    from transformers.integrations import deepspeed as hf_ds

    saved = hf_ds._hf_deepspeed_config_weak_ref
    hf_ds.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = saved
