"""Stage 2: samples to L2-normalised vectors with pretrained encoders (METHOD.md step 2), in
resumable shards.

- :class:`ShardEmbedder`: a batch of *shards* in, one Parquet file per shard out (written by the
  actor, atomically); what Ray Data's ``map_batches`` runs. Within a shard, rows are already in
  length order and cut into mini-batches of ``embed.batch_size``, so padding is not paid for and
  a shard's bytes depend only on its rows: a rerun skips finished shards and the output is
  byte-identical.
- :func:`embed_pool`, the stage's entry point: plans the shards, skips those already on disk,
  runs the rest through Ray Data actors (``engine: ray``) or in-process (``engine: local``),
  writes ``manifest.json`` and returns it. :func:`load_stage` reads the vectors back in a pool's
  order. The other names are the stage's parts, public so that they can be tested alone.

The encoders a shard runs (text, image, their fusion) are in :mod:`.encoders`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np

from ..io.run_dir import write_json, write_parquet
from ..config import EmbedConfig
from ..errors import PipelineError
from ..io.media import BadMedia, load_audio
from .audio import AudioEmbedder
from .encoders import BadImage, ImageEmbedder, TextEmbedder, TextEncoding, fuse, text_encoding
from .video import VideoEmbedder

if TYPE_CHECKING:
    from ..io.pool import Pool

log = logging.getLogger(__name__)


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
              cfg: EmbedConfig, text: Optional[TextEncoding] = None, *, audios: Optional[np.ndarray] = None,
              videos: Optional[np.ndarray] = None) -> str:
    """Hash of what decides the vectors: the samples and the encoder settings (not how many
    actors or threads compute them). ``text``: how the text model embeds (:func:`text_encoding`),
    for a pool with texts: sentence-transformers or a bare model, the pooling, prompt and maximum
    length in effect, so that the model's own defaults count and a changed one recomputes.
    ``audios`` / ``videos`` and the settings of their encoders count only in a pool that has them
    (a text or image pool keeps the key it had before they existed)."""
    h = hashlib.sha256()
    skip = {"engine", "actors", "threads_per_actor"}
    if videos is None:
        skip |= {"video_fps", "video_frames", "video_audio"}
    if audios is None and not (videos is not None and cfg.video_audio):
        skip |= {"audio_model"}
    if audios is None and videos is None:
        skip |= {"max_seconds"}
    if text is not None:  # the settings in effect stand for these four
        skip |= {"pooling", "max_length", "prompt", "prompt_name"}
    settings = {k: v for k, v in asdict(cfg).items() if k not in skip}
    if text is not None:
        settings["text_encoding"] = text.describe()
    h.update(json.dumps(settings, sort_keys=True).encode())
    for column in (ids, texts, images, *(c for c in (audios, videos) if c is not None)):
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
                 audio: bool = False, video: bool = False, threads: Optional[int] = None):
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.cfg = cfg
        self.stage_dir = Path(stage_dir)
        self.text = TextEmbedder(cfg) if text else None
        self.image = ImageEmbedder(cfg) if image or video else None
        self.audio = AudioEmbedder(cfg) if audio or (video and cfg.video_audio) else None
        self.video = VideoEmbedder(cfg, self.image, self.audio) if video else None
        self.modal = {"image": image, "audio": audio, "video": video}

    def _one_by_one(self, sources: list, embed, dim: int, good: np.ndarray) -> np.ndarray:
        """(n, dim) vectors of ``sources`` through ``embed`` (one source -> (dim,)); zeros where a
        row has none; a bad file raises, or under ``on_bad_rows: skip`` clears the row in ``good``."""
        vec = np.zeros((len(sources), dim), np.float32)
        for j, src in enumerate(sources):
            if src is None:
                continue
            try:
                vec[j] = embed(src)
            except (BadImage, BadMedia):
                if self.cfg.on_bad_rows == "error":
                    raise
                good[j] = False
        return vec

    def _audio_rows(self, sources: list, good: np.ndarray) -> np.ndarray:
        """The recordings of a mini-batch decoded one by one, encoded in one call."""
        waves, at = [], []
        for j, src in enumerate(sources):
            if src is None:
                continue
            try:
                waves.append(load_audio(src, self.audio.rate, self.cfg.max_seconds))
                at.append(j)
            except BadMedia:
                if self.cfg.on_bad_rows == "error":
                    raise
                good[j] = False
        vec = np.zeros((len(sources), self.audio.dim), np.float32)
        if waves:
            vec[at] = self.audio.embed_waves(waves)
        return vec

    def _embed_rows(self, texts, images, audios=None, videos=None) -> tuple[np.ndarray, np.ndarray]:
        """(vectors of the good rows, mask of good rows) for one mini-batch."""
        n = next(len(c) for c in (texts, images, audios, videos) if c is not None)
        good = np.ones(n, dtype=bool)
        tvec = ivec = avec = vvec = None
        if self.modal["image"]:
            ivec = self._one_by_one(images, lambda src: self.image({"image": [src]})["embedding"][0],
                                    self.image.dim, good)
        if self.modal["audio"]:
            avec = self._audio_rows(audios, good)
        if self.modal["video"]:
            vvec = self._one_by_one(videos, self.video.embed_one, self.video.dim, good)
        if self.text is not None:
            tvec = np.zeros((n, self.text.dim), np.float32)
            has = np.array([bool(t) for t in texts])
            if has.any():
                tvec[has] = self.text({"text": np.asarray(texts, dtype=object)[has]})["embedding"]
        return fuse(tvec, ivec, avec, vvec)[good], good

    def __call__(self, batch: dict) -> dict:
        out = {"shard": [], "rows": [], "skipped": [], "seconds": []}
        for s in range(len(batch["shard"])):
            t0 = time.perf_counter()
            ids = list(batch["ids"][s])
            rows = np.asarray(batch["rows"][s], dtype=np.int64)
            texts = list(batch["texts"][s]) if self.text is not None else None
            media = {k: list(batch[k + "s"][s]) if self.modal[k] else None for k in ("image", "audio", "video")}
            vecs, kept, kept_rows = [], [], []
            for lo in range(0, len(ids), self.cfg.batch_size):
                hi = lo + self.cfg.batch_size
                try:
                    v, good = self._embed_rows(None if texts is None else texts[lo:hi],
                                               *(None if m is None else m[lo:hi] for m in media.values()))
                except (BadImage, BadMedia) as e:
                    raise type(e)(f"{e} (in shard {int(batch['shard'][s])}, ids {ids[lo]}..{ids[min(hi, len(ids)) - 1]}); "
                                  f"fix the file or set embed.on_bad_rows: skip") from None
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


@dataclass(frozen=True)
class _ShardPlan:
    """One stage's shards: what each holds, which are still to embed, where they go.

    pool: the samples (texts and/or images). stage_dir: ``<stage_root>/<key>``, where shard i is
    :func:`shard_name` (i). shards: each shard's pool rows, (r,) int64 (:func:`plan_shards`).
    pending: the numbers of the shards not yet on disk, ascending.
    """

    pool: Pool
    stage_dir: Path
    shards: list[np.ndarray]
    pending: list[int]

    @property
    def modal(self) -> dict[str, bool]:
        """Which encoders run: ``{"text": ..., "image": ..., "audio": ..., "video": ...}``, as
        :class:`ShardEmbedder` takes them."""
        p = self.pool
        return {"text": p.texts is not None, "image": p.images is not None, "audio": p.audios is not None,
                "video": p.videos is not None}

    def batch(self, which: list[int]) -> dict:
        """The shards ``which`` as one :class:`ShardEmbedder` batch: a row per shard, its pool rows,
        ids, texts and images as lists (empty for a modality the pool does not have)."""
        pool, shards = self.pool, self.shards
        return {
            "shard": which,
            "rows": [shards[i].tolist() for i in which],
            "ids": [pool.ids[shards[i]].tolist() for i in which],
            "texts": [pool.texts[shards[i]].tolist() if pool.texts is not None else [] for i in which],
            "images": [pool.images[shards[i]].tolist() if pool.images is not None else [] for i in which],
            "audios": [pool.audios[shards[i]].tolist() if pool.audios is not None else [] for i in which],
            "videos": [pool.videos[shards[i]].tolist() if pool.videos is not None else [] for i in which],
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


EMBEDDING_ACTOR = "ShardEmbedder"  # in the class name Ray Data gives its actors: MapWorker(MapBatches(ShardEmbedder))


def _unwrap_pipeline_error(exc: BaseException) -> Optional[PipelineError]:
    seen = exc
    for _ in range(10):
        if seen is None:
            return None
        if isinstance(seen, PipelineError):
            return seen
        seen = getattr(seen, "cause", None) or seen.__cause__
    return None


def embed_pool(pool: Pool, cfg: EmbedConfig, stage_root: Path, *, progress: bool = True,
               ray_bars: bool = False) -> dict:
    """Embed every sample of ``pool`` into ``stage_root/<key>/`` (resumable); returns the manifest.

    The key (:func:`stage_key`) hashes the samples and the encoder settings, so a changed pool or
    model gets a directory of its own. Shards already on disk are skipped; the rest run through Ray
    Data (``engine: ray``: an actor pool over the shards, each actor writing its shards, on the Ray
    this process has joined, else the one at ``RAY_ADDRESS``, else a local one) or in this process (``engine: local``). ``manifest.json``,
    written last, marks the stage complete; it says ``key``, ``rows``, ``dim``, the skipped rows
    and how the shards ran. :func:`load_stage` reads the vectors back. progress: a bar over the
    shards; ray_bars: Ray Data's own bars instead (engine ``ray``; what ``--verbose`` shows).

    Example:
        >>> import tempfile
        >>> from ray_pipeline.io.pool import Pool
        >>> pool = Pool(ids=np.array(["a", "b", "c"], dtype=object), labels=None, embeddings=None,
        ...             texts=np.array(["a cat", "a dog", "a car"], dtype=object), source="demo")
        >>> root = Path(tempfile.mkdtemp())
        >>> manifest = embed_pool(pool, EmbedConfig(engine="local", device="cpu"), root, progress=False)
        >>> manifest["rows"], manifest["dim"], manifest["shards_computed"]
        (3, 384, 1)
        >>> kept, x = load_stage(root / manifest["key"], pool.ids)
        >>> kept.tolist(), x.shape
        ([True, True, True], (3, 384))
    """
    text = text_encoding(cfg) if pool.texts is not None else None  # an error here comes before any work
    stage_dir = Path(stage_root) / stage_key(pool.ids, pool.texts, pool.images, cfg, text, audios=pool.audios,
                                             videos=pool.videos)
    manifest_path = stage_dir / "manifest.json"
    if manifest_path.is_file():
        log.info("embeddings complete in %s: nothing to do", stage_dir)
        return json.loads(manifest_path.read_text())
    stage_dir.mkdir(parents=True, exist_ok=True)
    shards = plan_shards(pool.texts, len(pool), cfg.shard_size)
    pending = [i for i in range(len(shards)) if not (stage_dir / shard_name(i)).is_file()]
    log.info("embedding %d samples in %d shards (%d done before, %d to do) -> %s", len(pool), len(shards),
             len(shards) - len(pending), len(pending), stage_dir)
    shard_plan = _ShardPlan(pool=pool, stage_dir=stage_dir, shards=shards, pending=pending)
    t0 = time.perf_counter()
    plan = None
    if pending and cfg.engine == "local":
        embedder = ShardEmbedder(cfg, str(stage_dir), **shard_plan.modal, threads=cfg.threads_per_actor)
        from tqdm.auto import tqdm

        for i in tqdm(pending, desc="embed shards", unit="shard", disable=not progress):
            embedder(shard_plan.batch([i]))
    elif pending:
        plan = _embed_with_ray(shard_plan, cfg, progress=progress, ray_bars=ray_bars)
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
                "model": cfg.model, "text_encoding": text and text.describe(), "modalities": shard_plan.modal,
                "engine": cfg.engine, "actor_plan": plan, "seconds": seconds,
                "samples_per_s": (sum(len(shards[i]) for i in pending) / seconds) if pending and seconds else None}
    write_json(manifest, manifest_path)
    return manifest


def _embed_with_ray(shard_plan: _ShardPlan, cfg: EmbedConfig, *, progress: bool, ray_bars: bool) -> dict:
    """The pending shards of ``shard_plan`` through a Ray Data actor pool of :class:`ShardEmbedder`;
    returns the :func:`actor_plan` it ran, plus ``shard_seconds`` (the time spent inside the actors).

    Runs on the Ray this process has joined (the pipeline joins ``ray_address`` once per command),
    else starts one for the call (``runtime.session.ray_session``). One block per shard, so the actors take the shards one at a
    time; each actor writes its shards itself and sends back one small row per shard, never the
    vectors. progress: a bar over the shards, or with ray_bars Ray Data's own (one per operator).
    An error of ours raised in an actor reaches the caller as itself, not wrapped in Ray's.
    """
    import pyarrow as pa
    import ray
    from tqdm.auto import tqdm

    from ..runtime.capacity import Request, bounded_waits, ensure_fits, gpus_to_grow_to
    from ..runtime.retries import actor_retries, actors_waiting
    from ..runtime.session import ray_session

    with ray_session() as res:
        plan = actor_plan(res.cpus, gpus_to_grow_to(res.gpus), cfg)  # an autoscaler's GPUs count
        change = "lower embed.threads_per_actor (an actor's CPUs), or set embed.device: cpu"
        ensure_fits([Request("an embedding actor", {"CPU": plan["num_cpus"], "GPU": plan["num_gpus"]}, change)])
        log.info("Ray Data: %d embedding actor(s), %s CPU / %s GPU each, %d torch threads",
                 plan["actors"], plan["num_cpus"], plan["num_gpus"], plan["threads"])
        job = ray.get_runtime_context().get_job_id()
        before = actor_retries(job, EMBEDDING_ACTOR)  # this job's embedding actors so far (an earlier stage's)
        # One block per shard, so the actors share the shards out one at a time.
        blocks = [pa.table(shard_plan.batch([i])) for i in shard_plan.pending]
        ds = ray.data.from_arrow(blocks)
        out = ds.map_batches(
            ShardEmbedder,
            fn_constructor_args=(cfg, str(shard_plan.stage_dir)),
            fn_constructor_kwargs={**shard_plan.modal, "threads": plan["threads"]},
            batch_size=1,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=plan["actors"]),
            num_cpus=plan["num_cpus"],
            num_gpus=plan["num_gpus"] or None,
            # Ray Data's actor pools restart dead actors and retry their tasks by default
            # (max_restarts=-1, max_task_retries=-1; ActorPoolMapOperator in Ray 2.60): an actor
            # lost with its node starts again where the cluster has room (a replacement node);
            # shard files are written atomically, so a retried shard cannot leave half a file.
        )
        out.context.enable_progress_bars = progress and ray_bars  # this dataset's copy of the DataContext
        try:
            # actors waiting for a node (a first start, or a lost node's restart): bounded by ray.wait_timeout_s, not Ray Data's wait without end
            with bounded_waits(lambda: actors_waiting(job, EMBEDDING_ACTOR, before), "the embedding actors", change):
                done = list(tqdm(out.iter_rows(), total=len(shard_plan.pending), desc="embed shards", unit="shard",
                                 disable=not progress or ray_bars))
        except (ray.exceptions.RayError, RuntimeError) as e:  # Ray wraps an actor's errors: surface ours
            err = _unwrap_pipeline_error(e)
            if err is not None:
                raise err from None
            raise
        plan["shard_seconds"] = float(sum(r["seconds"] for r in done))  # time inside the actors
        retried = actor_retries(job, EMBEDDING_ACTOR, before)
        plan["retried"] = retried and {k: retried[k] for k in ("actor_restarts", "tasks_retried")}
        log.info("Ray Data wrote %d shards%s", len(done),
                 "" if not retried or not retried["actor_restarts"] else
                 f"; {retried['actor_restarts']} actor restart(s), {retried['tasks_retried']} "
                 f"shard task(s) retried (a lost worker or node)")
    return plan


def load_stage(stage_dir: Path, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The vectors of a finished stage (``stage_root/<key>``, as :func:`embed_pool` wrote it) in the
    order of ``ids`` ((n,) str): (kept (n,) bool, False for a row the stage skipped or does not
    hold; x (kept.sum(), d) float32, L2-normalised rows, those of ``ids[kept]`` in order)."""
    from ..io.pool import load_embeddings, positions

    x, file_ids = load_embeddings(stage_dir)
    at = positions(file_ids, ids)
    return at >= 0, x[at[at >= 0]]
