"""Stage 8 of METHOD.md: fine-tune the pretrained model on one candidate subset.

:func:`train_loop_per_worker` is the per-worker training function that Ray Train's
``TorchTrainer`` runs (the sweep over candidates is :mod:`~ray_pipeline.finetune.sweep`). It
trains through Hugging Face's ``Trainer`` (``finetune.train.engine: trainer``,
:mod:`~ray_pipeline.finetune.hf_trainer`) or the hand-written loop here (``loop``: DeepSpeed's
``deepspeed.initialize``, ZeRO stage and precision from the config), over the process group Ray
Train set up: NCCL on GPUs, gloo and DeepSpeed's CPU accelerator on a machine without one. Every
``finetune.train.eval_every`` steps it scores the validation part, reports the metrics (with a
small checkpoint, which Ray needs to keep them), and rank 0 saves the model when the score
improved. What both engines share is :mod:`~ray_pipeline.finetune.trial`'s; what differs between
a classifier and a causal LM is the task strategy's (:mod:`~ray_pipeline.finetune.task`); both
use real pretrained weights that install offline (MiniLM, SmolLM2-135M-Instruct).
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from pathlib import Path

import numpy as np

from .task import size, task_for, units
from .trial import TrialLoop, deepspeed_config, evaluate, injected_failure, keeps_training_state, load_for_training, \
    peak_rss_gib, record_placement_group, report, resume_point, save_model
from .trial import check_device, precision_of, step_cap, zero_stage_of  # noqa: F401  (here before trial.py)

log = logging.getLogger(__name__)


def train_loop_per_worker(config: dict) -> None:
    """Ray Train worker: fine-tune ``loop.model_path`` on ``loop.train`` with DeepSpeed, where
    ``loop = config["loop"]`` is the trial's :class:`TrialLoop`: through Hugging Face's
    ``Trainer`` (``finetune.train.engine: trainer``, :mod:`~ray_pipeline.finetune.hf_trainer`) or
    the hand-written loop (``loop``), the same reports either way.

    Trains until ``patience`` evaluations in a row did not improve the validation score, or the
    cap. Reports after every evaluation: step, samples_seen, epochs, train_loss, validation
    metrics and ``score`` (higher is better), ``stopped_by_patience``; rank 0 writes the model of
    the best validation score to ``loop.best_model_dir``.
    """
    import ray.train
    import torch

    loop: TrialLoop = config["loop"]
    ft, tr = loop.finetune, loop.finetune.train
    task = task_for(ft.task, loop.modality)
    if ft.resources.threads_per_worker:
        torch.set_num_threads(ft.resources.threads_per_worker)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if rank == 0 and loop.placement_group_file:
        record_placement_group(loop.placement_group_file)
    device = torch.device(f"cuda:{ctx.get_local_rank()}" if loop.use_gpu else "cpu")
    if loop.inject_failure is True:  # fault injection (tests): this trial's worker raises
        raise RuntimeError(f"injected failure in trial {loop.name}")
    if tr.engine == "trainer":
        from .hf_trainer import fit_with_trainer

        return fit_with_trainer(loop, task, rank, world, device)
    _hand_loop(loop, task, rank, world, device)


def _hand_loop(loop: TrialLoop, task, rank: int, world: int, device) -> None:
    """``finetune.train.engine: loop``: the hand-written DeepSpeed loop."""
    import torch

    tr = loop.finetune.train
    torch.manual_seed(loop.seed)
    engine, tok = build_engine(loop, task, device)
    engine.train()  # from_pretrained gives the model in eval mode: dropout from the first step, as after a resume
    n = size(loop.train)
    mine = np.arange(rank, n, world)  # this worker's share of the candidate subset
    rng = np.random.default_rng(loop.seed + rank)
    order, pos = rng.permutation(mine), 0
    best, since_best, done_s, start = -math.inf, 0, 0.0, 0
    tokens_seen = 0
    ckpt, state = resume_point()
    if ckpt is not None:  # a retried trial: on from its last evaluation, as if never stopped
        with ckpt.as_directory() as d:
            engine.load_checkpoint(d, tag="state")  # weights, optimizer, schedule (every rank: a collective)
            mine_state = torch.load(Path(d, f"rank-{rank}.pt"), weights_only=False)
        rng.bit_generator.state, order, pos = mine_state["rng"], mine_state["order"], mine_state["pos"]
        torch.set_rng_state(mine_state["torch_rng"])
        tokens_seen = mine_state["tokens"]
        start, best, since_best, done_s = state["step"], state["best"], state["since_best"], state["train_seconds"]
        if since_best >= tr.patience:  # lost after its last report: nothing left to train
            start = loop.steps
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)  # summed on the device: no sync a step
    t0 = time.perf_counter() - done_s
    micro = tr.batch_size
    for step in range(start + 1, loop.steps + 1):
        for _ in range(tr.gradient_accumulation_steps):  # DeepSpeed steps the optimizer on the last one
            if pos + micro > len(order):
                order, pos = rng.permutation(mine), 0
            idx = order[pos:pos + micro]
            pos += micro
            batch = task.batch(tok, loop.train, idx, tr.max_length)
            tokens_seen += units(batch)
            out = engine(**{k: v.to(device) for k, v in batch.items()})
            engine.backward(out.loss)  # scaled by 1 / gradient_accumulation_steps
            engine.step()
            loss_sum += out.loss.detach().double()
        if step % tr.eval_every and step != loop.steps:
            continue
        # a sync point: the window's mean training loss comes to the host once per evaluation
        window = (step - 1) % tr.eval_every + 1
        train_loss = float(loss_sum) / (window * tr.gradient_accumulation_steps)
        loss_sum.zero_()
        metrics = evaluate(engine, tok, loop, rank, world, device)
        improved = metrics["score"] > best
        if improved:
            best, since_best = metrics["score"], 0
        else:
            since_best += 1
        stop = since_best >= tr.patience
        elapsed = time.perf_counter() - t0
        samples_seen = step * micro * tr.gradient_accumulation_steps * world
        metrics.update(step=step, evaluation=math.ceil(step / tr.eval_every), samples_seen=samples_seen,
                       epochs=samples_seen / max(n, 1), train_loss=train_loss, best_score=best,
                       tokens_per_s=tokens_seen * world / max(elapsed, 1e-9), train_seconds=elapsed,
                       peak_rss_gib=peak_rss_gib(), stopped_by_patience=stop, resumed_from_step=start)
        if rank == 0 and improved:
            save_model(engine.module, tok, Path(loop.best_model_dir), metrics)
        if keeps_training_state(loop):
            with tempfile.TemporaryDirectory(prefix="trial-state-") as d:
                engine.save_checkpoint(d, tag="state")  # every rank writes its part: a collective
                torch.save({"rng": rng.bit_generator.state, "order": order, "pos": pos, "tokens": tokens_seen,
                            "torch_rng": torch.get_rng_state()}, Path(d, f"rank-{rank}.pt"))
                report(metrics, rank, {"best": best, "since_best": since_best, "train_seconds": elapsed},
                       files=Path(d), history_file=loop.history_file)
        else:
            report(metrics, rank, history_file=loop.history_file)
        injected_failure(loop, step, resumed=ckpt is not None)
        if stop:
            break


def build_engine(loop: TrialLoop, task, device):
    """(DeepSpeed engine, tokenizer) of one trial: the model of :func:`load_for_training`, AdamW
    with weight decay and the learning-rate schedule over the trial's steps."""
    import deepspeed
    import torch
    from transformers import get_scheduler

    ft, tr = loop.finetune, loop.finetune.train
    model, tok = load_for_training(loop, task)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=tr.lr,
                                  weight_decay=tr.weight_decay)
    # A torch optimizer, not DeepSpeed's: its fused/CPU Adam ops would compile for minutes.
    schedule = get_scheduler(tr.lr_scheduler_type, optimizer, num_warmup_steps=math.ceil(tr.warmup_ratio * loop.steps),
                             num_training_steps=loop.steps)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=schedule,
                                           config=deepspeed_config(ft, loop.use_gpu))
    return engine, tok
