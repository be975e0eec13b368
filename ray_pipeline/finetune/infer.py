"""Using a tuned model: the per-sample test values the verdict reads, and step 10 of METHOD.md,
prediction on new samples. The task comes from the saved model (:func:`task.saved_task`)."""

from __future__ import annotations

import numpy as np

from ..config import FinetuneConfig
from .task import saved_task, size


def load_tuned(model_dir: str, *, trust_remote_code: bool = False) -> tuple:
    """(model, tokenizer, task) of a model a run saved (``target/model``); a classifier keeps
    its own labels. ``trust_remote_code``: the base model's (``finetune.trust_remote_code``)."""
    task = saved_task(model_dir, trust_remote_code=trust_remote_code)
    model, tok = task.load(model_dir, trust_remote_code=trust_remote_code)
    return model, tok, task


def per_sample_values(model_dir: str, ft: FinetuneConfig, data: dict, device: str = "cpu") -> np.ndarray:
    """(n, 2) test values of a saved model, one row per sample, for :mod:`~ray_pipeline.finetune.verdict`:
    (correct, 1) for a classifier, (-response loss summed over its tokens, tokens) for a causal LM.
    data: the task's arrays of the test part (``Task.arrays``)."""
    import torch

    model, tok, task = load_tuned(model_dir, trust_remote_code=ft.trust_remote_code)
    model.to(device).eval()
    step, n = ft.train.eval_batch_size, size(data)
    with torch.inference_mode():
        rows = [task.sample_values(model, tok, data, lo, min(lo + step, n), ft.train.max_length, device)
                for lo in range(0, n, step)]
    return np.concatenate(rows).astype(np.float64) if rows else np.zeros((0, 2))


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
            out += task.predict(model, tok, list(texts[lo:lo + batch_size]), max_length, max_new_tokens)
    return out

