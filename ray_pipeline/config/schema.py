"""One typed config for a whole run, validated once, at construction.

A config is a tree of frozen dataclasses. It is built from a YAML file (``Config.from_yaml``),
from a plain dict (``Config.from_dict``) or in Python, and overridden field by field from the
command line (``config.override(["cluster.k=[50,100]", "seed=3"])``). Every check happens in
``__post_init__``, so an object that exists is valid; a bad value raises :class:`ConfigError`
naming the field and what is allowed.

Example:
    >>> cfg = Config.from_dict({"cluster": {"k": [20, 50]}, "select": {"budgets": ["1%", 200]}})
    >>> cfg.cluster.k
    (20, 50)
    >>> cfg.select.resolve_budgets(10_000)
    (100, 200)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from .finetune import FinetuneConfig, refuse_moved
from .ray_settings import RaySettings
from ..errors import ConfigError
from .typed import (Budget, KValue, build, check_revision, check_template, fail, no_credentials_in, parse_budget,
                    parse_k, plain)

@dataclass(frozen=True)
class DataConfig:
    """Where the pool comes from and how a sample's text is made.

    ``path``: a JSONL, JSON (list of records), CSV, Parquet or text file (``.txt``: one sample
    per line, with labels one per line in ``labels_path`` if any). ``text_column`` names a single
    text field; ``text_template`` (a ``str.format`` template such as
    ``"{instruction}\\n{input}\\n{output}"``) builds the text from several. With neither,
    a column named ``text`` is used, else a chat column. ``chat_column``: a list of turns per
    sample (OpenAI/TRL ``messages`` of ``role``/``content``, or ShareGPT ``conversations`` of
    ``from``/``value``); empty: ``messages`` or ``conversations`` when the file has one and no text
    is configured. ``chat_text``: what of a conversation is embedded, ``all`` turns or the
    ``user`` turns only. ``id_column`` empty: stable ids ``row-<n>`` from the row order.
    ``image_column``: an image per sample, as a file path (relative to the data file) or bytes.
    ``audio_column`` (wav, flac, ogg, mp3) and ``video_column`` (mp4, webm, avi, mkv): likewise.
    ``embeddings``: precomputed vectors (``.npy`` of shape (N, d) in row order, or a Parquet file
    with ``id`` and ``embedding_column``); then no encoder runs.
    """

    path: Optional[str] = None
    format: Literal["auto", "jsonl", "json", "csv", "parquet", "text"] = "auto"
    text_column: Optional[str] = None
    image_column: Optional[str] = None
    audio_column: Optional[str] = None
    video_column: Optional[str] = None
    text_template: Optional[str] = None
    chat_column: Optional[str] = None
    chat_text: Literal["all", "user"] = "all"
    label_column: Optional[str] = None
    labels_path: Optional[str] = None
    id_column: Optional[str] = None
    embeddings: Optional[str] = None
    embedding_column: str = "embedding"
    limit: Optional[int] = None

    def __post_init__(self) -> None:
        if self.text_column and self.text_template:
            fail("data.text_template", self.text_template,
                  "leave it empty when data.text_column is set (use one or the other)")
        if self.text_template is not None:
            check_template("data.text_template", self.text_template)
        if self.chat_column and (self.text_column or self.text_template):
            fail("data.chat_column", self.chat_column, "empty when data.text_column or data.text_template is set "
                 "(the text comes from one of them)")
        if self.labels_path and self.label_column:
            fail("data.labels_path", self.labels_path, "leave it empty when data.label_column is set")
        if self.limit is not None and self.limit < 1:
            fail("data.limit", self.limit, "empty (the whole pool) or an int >= 1")
        for name in ("path", "labels_path", "embeddings"):
            no_credentials_in(f"data.{name}", getattr(self, name))


@dataclass(frozen=True)
class EmbedConfig:
    """The encoders and how the embedding stage runs.

    ``model``: ``"minilm"`` (the packaged all-MiniLM-L6-v2), ``"smollm2"``, a local model
    directory or a Hugging Face Hub id ``ORG/NAME`` (resolved by
    :func:`~ray_pipeline.io.models.resolve`), at ``revision`` (a Hub id's branch, tag or commit;
    empty: its default branch). ``trust_remote_code``: let a model run the code its repository
    ships (off unless set). A sentence-transformers model (its directory has ``modules.json``)
    embeds through ``SentenceTransformer`` with its own pooling, normalisation, maximum length and
    default prompt; any other transformers ``AutoModel`` (e.g. a saved SmolLM2) is pooled with
    ``pooling``. ``pooling``: ``mean``, ``cls`` or ``last`` for a model without its own; empty: the
    model's own (``mean`` for a model without one); set for a sentence-transformers model, it must
    be what the model's ``1_Pooling/config.json`` says, else an error (no silent override).
    ``max_length``: tokens per text; empty: the model's own ``max_seq_length`` for a
    sentence-transformers model, 128 for the others; set, it caps a sentence-transformers model's
    own (never raises it). ``prompt``: a text put before every sample (e5's ``"query: "``);
    ``prompt_name``: one of the model's own named prompts (``config_sentence_transformers.json``);
    neither: the model's default prompt, if it names one.
    ``image_model``: ``"efficientnet-lite0"`` (packaged; the only image encoder) for samples with
    ``data.image_column``.
    ``audio_model``: ``"resemblyzer"`` (the packaged GE2E speaker encoder, 256-d, 16 kHz) or a
    Hugging Face audio model by directory or Hub id (``AutoModel`` + ``AutoFeatureExtractor``, its
    last hidden states mean-pooled over time). ``max_seconds``: the first seconds of a recording or
    clip that are decoded and embedded (and trained on, fine-tuning a speech model).
    ``video_fps`` / ``video_frames``: frames sampled per second and at most how many, each through
    the image encoder, averaged; ``video_audio``: a video's audio track through the speech encoder
    too, fused with its frames.
    ``engine``: ``ray`` (Ray Data actors over shards of ``shard_size`` rows, resumable) or
    ``local`` (one in-process loop). ``actors``/``threads_per_actor``: empty = sized from the
    cluster (one actor per GPU; on CPUs, actors of up to 4 threads). ``dtype``: how vectors are
    stored. ``on_bad_rows``: ``error`` stops at the first empty text or unreadable image,
    recording or clip;
    ``skip`` drops such rows and counts them in ``run.json``.
    """

    model: str = "minilm"
    revision: Optional[str] = None
    trust_remote_code: bool = False
    pooling: Optional[Literal["mean", "cls", "last"]] = None
    batch_size: int = 64
    max_length: Optional[int] = None
    prompt: Optional[str] = None
    prompt_name: Optional[str] = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    image_model: str = "efficientnet-lite0"
    image_size: int = 224
    audio_model: str = "resemblyzer"
    max_seconds: float = 30.0
    video_fps: float = 2.0
    video_frames: int = 16
    video_audio: bool = False
    engine: Literal["ray", "local"] = "ray"
    shard_size: int = 4096
    actors: Optional[int] = None
    threads_per_actor: Optional[int] = None
    dtype: Literal["float32", "float16"] = "float32"
    on_bad_rows: Literal["error", "skip"] = "error"

    def __post_init__(self) -> None:
        check_revision("embed.revision", self.revision)
        if self.image_model != "efficientnet-lite0":
            fail("embed.image_model", self.image_model, "'efficientnet-lite0' (the packaged image encoder; Hub ids "
                 "and directories of image models are not supported)")
        if self.batch_size < 1:
            fail("embed.batch_size", self.batch_size, "an int >= 1")
        if self.max_length is not None and self.max_length < 2:
            fail("embed.max_length", self.max_length, "empty (the model's own) or an int >= 2 (tokens per sample)")
        if self.prompt is not None and self.prompt_name is not None:
            fail("embed.prompt_name", self.prompt_name, "empty when embed.prompt is set (give the prompt's text "
                 "or the name of one of the model's prompts, not both)")
        if self.prompt_name is not None and not self.prompt_name.strip():
            fail("embed.prompt_name", self.prompt_name, "empty, or the name of one of the model's prompts")
        if self.image_size < 32:
            fail("embed.image_size", self.image_size, "an int >= 32 (pixels)")
        if not self.audio_model.strip():
            fail("embed.audio_model", self.audio_model, "'resemblyzer' (packaged) or an audio model's directory or Hub id")
        if not self.max_seconds > 0 or self.max_seconds > 86400:
            fail("embed.max_seconds", self.max_seconds, "a number of seconds > 0 (and at most 86400)")
        if not self.video_fps > 0 or self.video_fps > 120:
            fail("embed.video_fps", self.video_fps, "frames per second > 0 and <= 120")
        if self.video_frames < 1 or self.video_frames > 1024:
            fail("embed.video_frames", self.video_frames, "an int from 1 to 1024 (frames per clip)")
        if self.shard_size < 1:
            fail("embed.shard_size", self.shard_size, "an int >= 1 (rows per shard file)")
        if self.actors is not None and self.actors < 1:
            fail("embed.actors", self.actors, "empty (sized from the cluster) or an int >= 1")
        if self.threads_per_actor is not None and self.threads_per_actor < 1:
            fail("embed.threads_per_actor", self.threads_per_actor, "empty or an int >= 1")


@dataclass(frozen=True)
class ClusterConfig:
    """FAISS spherical k-means, one run per distinct K.

    ``k``: absolute numbers of clusters (``100``) and/or ratios of each budget M (``"M"``,
    ``"M/2"``, ``"M/4"``): a ratio gives one K per M, so the clusters follow the budget.
    ``max_points_per_centroid``: faiss trains on at most K times this many points (a seeded
    sample), then assigns every point. ``algorithm``: ``flat`` (one k-means into K clusters: cost
    N K d per iteration), ``hierarchical`` (multi-level k-means: nodes split into at most
    ``branching`` clusters until a node is asked for at most ``leaf``, which runs flat k-means;
    about N d (niter leaf + branching log_branching(K / leaf)); on the shard engine each child of
    the root is clustered in a Ray task) or ``auto``: hierarchical where flat k-means would cost more and the
    tree costs no quality, i.e. where N K >= ``HIERARCHICAL_ABOVE`` (1e8: about 20 s of flat
    k-means on a 2-core CPU) and K >= ``HIERARCHICAL_MIN_K`` (1000; below it the tree lost up to
    2.7 points of probe accuracy to flat k-means in the quality benchmark, and flat k-means into
    fewer clusters is linear in N: it trains on at most 256 K rows) and K > ``leaf``
    (benchmarks/README.md, benchmarks/bench_clustering.py).
    """

    k: tuple[KValue, ...] = ("M/2", "M")
    niter: int = 20
    max_points_per_centroid: int = 256
    gpu: Literal["auto", "never"] = "auto"
    algorithm: Literal["auto", "flat", "hierarchical"] = "auto"
    branching: int = 16
    leaf: int = 8

    HIERARCHICAL_ABOVE = 10**8  # N K from which ``auto`` clusters hierarchically ...
    HIERARCHICAL_MIN_K = 1000  # ... into at least this many clusters

    def algorithm_for(self, n: int, k: int) -> str:
        """``flat`` or ``hierarchical`` for K clusters of N rows (``auto`` decided here, once)."""
        if self.algorithm != "auto":
            return self.algorithm
        deep = k > self.leaf and k >= self.HIERARCHICAL_MIN_K and n * k >= self.HIERARCHICAL_ABOVE
        return "hierarchical" if deep else "flat"

    def __post_init__(self) -> None:
        if not self.k:
            fail("cluster.k", list(self.k), "a non-empty list of ints >= 1 or ratios such as 'M/2'")
        parsed = [parse_k("cluster.k", k) for k in self.k]
        if len(set(parsed)) != len(parsed):
            fail("cluster.k", list(self.k), "distinct values (each K is one candidate family)")
        if self.niter < 1:
            fail("cluster.niter", self.niter, "an int >= 1")
        if self.max_points_per_centroid < 1:
            fail("cluster.max_points_per_centroid", self.max_points_per_centroid, "an int >= 1")
        if self.branching < 2:
            fail("cluster.branching", self.branching, "an int >= 2 (clusters per level)")
        if self.leaf < 1:
            fail("cluster.leaf", self.leaf, "an int >= 1 (the most clusters a leaf k-means makes)")


@dataclass(frozen=True)
class SelectConfig:
    """Budgets M (each a count or a fraction of the pool), how each cluster's share is chosen,
    and the random baselines.

    ``method``: one or more of ``kcenter`` (METHOD.md: farthest-first from the key sample) and
    ``centroid`` (the members nearest the centroid) and ``boundary`` (budget-aware: prototypes,
    then the samples near the boundaries between labels, a share growing with M/N; needs labels,
    left out with a warning without them; not in the default: the quality benchmark found it
    within noise of the others, benchmarks/README.md) and ``facility`` (facility location per
    cluster with the same budgets: every member well represented, module ``select.facility``); each gives
    its own candidates.
    ``outlier_quantile``: robust k-center: in each cluster the members farthest from the centroid
    (this share of them) are never picked (0: off). ``engine``: ``driver`` (all vectors in the
    driver's memory) or ``ray`` (tasks over the embedding stage's shards; the same selection, index
    for index, for pools whose vectors do not fit one machine; ``groups`` splits the clusters into
    that many tasks, 0: twice the cluster's CPUs and at least one per 250k rows). ``dedup_threshold``: remove near-duplicates
    before clustering, SemDeDup-style (a sample within this cosine similarity of another in its
    neighbourhood; empty: off). ``stratify``: ``label`` splits every budget and K over the labels
    by their share of the pool and selects inside each label (needs labels); ``auto`` (default):
    ``label`` when the pool has labels, else ``none`` (the quality benchmark's evidence: benchmarks/README.md).
    Both engines give the same selection, index for index, under every option but
    ``dedup_threshold``, which needs the driver.
    """

    budgets: tuple[Budget, ...] = ("1%", "2%", "5%")
    random_seeds: tuple[int, ...] = (0, 1, 2)
    method: tuple[Literal["kcenter", "centroid", "boundary", "facility"], ...] = ("kcenter", "centroid")
    outlier_quantile: float = 0.0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    engine: Literal["driver", "ray"] = "driver"
    groups: int = 0
    dedup_threshold: Optional[float] = None
    stratify: Literal["auto", "none", "label"] = "auto"

    def __post_init__(self) -> None:
        if not self.budgets:
            fail("select.budgets", list(self.budgets), "a non-empty list such as ['1%', '2%'] or [100, 200]")
        parsed = [parse_budget("select.budgets", b) for b in self.budgets]
        if len(set(parsed)) != len(parsed):
            fail("select.budgets", list(self.budgets), "distinct budgets")
        if len(set(self.random_seeds)) != len(self.random_seeds):
            fail("select.random_seeds", list(self.random_seeds), "distinct ints")
        if not self.method or len(set(self.method)) != len(self.method):
            fail("select.method", list(self.method), "a non-empty list of distinct 'kcenter', 'centroid', 'boundary', "
                 "'facility'")
        if not 0.0 <= self.outlier_quantile < 0.5:
            fail("select.outlier_quantile", self.outlier_quantile, "a share in [0, 0.5): 0 turns it off")
        if self.groups < 0:
            fail("select.groups", self.groups, "an int >= 0 (0: twice the cluster's CPUs)")
        if self.dedup_threshold is not None and not 0.0 < self.dedup_threshold <= 1.0:
            fail("select.dedup_threshold", self.dedup_threshold, "a cosine similarity in (0, 1], e.g. 0.95; "
                  "empty turns it off")
        if self.engine == "ray" and self.dedup_threshold is not None:
            fail("select.engine", self.engine, "'driver' when select.dedup_threshold is set (near-duplicate "
                  "removal compares every pair in a cluster, in the driver's memory)")

    def resolve_budgets(self, n: int) -> tuple[int, ...]:
        """Budgets as sample counts for a pool of ``n``; a count above ``n`` is an error."""
        out = []
        for raw in self.budgets:
            b = parse_budget("select.budgets", raw)
            m = b if isinstance(b, int) else max(1, int(round(b * n)))
            if m > n:
                raise ConfigError(
                    f"config field 'select.budgets' has {raw!r} = {m} samples, more than the pool's "
                    f"{n}; use a count <= {n} or a fraction")
            out.append(m)
        if len(set(out)) != len(out):
            raise ConfigError(
                f"config field 'select.budgets' {list(self.budgets)} gives duplicate sample counts "
                f"{out} for a pool of {n}; give budgets that differ")
        return tuple(out)


@dataclass(frozen=True)
class Config:
    """A whole run. ``seed`` seeds k-means and the random baselines; ``threads`` caps torch's.
    ``ray_address``: the Ray cluster to join (else ``RAY_ADDRESS``, else a local one is started)."""

    data: DataConfig = field(default_factory=DataConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    output_dir: str = "runs/latest"
    seed: int = 0
    threads: Optional[int] = None
    ray_address: Optional[str] = None
    ray: RaySettings = field(default_factory=RaySettings)  # waits on the cluster; its node types

    def __post_init__(self) -> None:
        if self.seed < 0:
            fail("seed", self.seed, "an int >= 0")
        if self.threads is not None and self.threads < 1:
            fail("threads", self.threads, "empty (torch's default) or an int >= 1")
        if not self.output_dir:
            fail("output_dir", self.output_dir, "a directory path")
        no_credentials_in("output_dir", self.output_dir)
        for name in ("eval_path", "eval_labels_path", "test_path", "test_labels_path"):
            no_credentials_in(f"finetune.heldout.{name}", getattr(self.finetune.heldout, name))
        no_credentials_in("ray_address", self.ray_address)

    def candidate_grid(self, n: int) -> list[tuple[int, int]]:
        """The (K, M) pairs for a pool of ``n``: every absolute K with every M, and each ratio K
        with its own M (K = max(1, round(r M)), at most n). Sorted by K, then M."""
        pairs = set()
        for m in self.select.resolve_budgets(n):
            for raw in self.cluster.k:
                kind, v = parse_k("cluster.k", raw)
                k = int(v) if kind == "abs" else max(1, int(round(v * m)))
                if k > n:
                    raise ConfigError(f"config field 'cluster.k' has {raw!r} = {k} clusters for a pool of {n}; "
                                      f"choose K <= {n}")
                pairs.add((k, m))
        return sorted(pairs)

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "Config":
        if isinstance(raw, dict):
            refuse_moved(raw.get("finetune"))
        return build(cls, raw, "")

    @classmethod
    def from_yaml(cls, path: str | Path) -> "Config":
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist; pass the path of a YAML file")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {str(p)!r} must hold a mapping of fields, not {type(raw).__name__}")
        return cls.from_dict(raw)

    def to_dict(self) -> dict[str, Any]:
        return plain(dataclasses.asdict(self))

    def override(self, assignments: list[str]) -> "Config":
        """A new config with ``section.field=value`` assignments applied (value parsed as YAML)."""
        values = {}
        for item in assignments:
            if "=" not in item:
                raise ConfigError(f"override {item!r} is not of the form section.field=value")
            key, _, text = item.partition("=")
            try:
                values[key.strip()] = yaml.safe_load(text)
            except yaml.YAMLError:
                values[key.strip()] = text
        return self.with_fields(values)

    def with_fields(self, values: dict[str, Any]) -> "Config":
        """A new config with dotted fields (``"cluster.k"``) set to plain values, validated anew."""
        raw = self.to_dict()
        for key, value in values.items():
            node = raw
            parts = key.split(".")
            for part in parts[:-1]:
                if not isinstance(node.get(part), dict):
                    raise ConfigError(f"{key!r}: {part!r} is not a config section; sections are "
                                      f"{sorted(k for k, v in raw.items() if isinstance(v, dict))}")
                node = node[part]
            node[parts[-1]] = value
        return Config.from_dict(raw)
