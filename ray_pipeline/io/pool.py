"""Stage 1: the pool of samples (METHOD.md step 1).

Reads JSONL, JSON (a list of records), CSV or Parquet into a :class:`Pool`: stable ids, the
text each sample is embedded from, an optional label and optional precomputed embeddings.
Every problem is reported as an :class:`InputError` naming the file, row or field and the fix,
before any expensive work starts.
"""

from __future__ import annotations

import logging
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pyarrow.parquet as pq

from ..config import DataConfig
from .chat import chat_column, embed_text, turns
from ..errors import InputError
from .formats import read_table
from .media import media_problems

log = logging.getLogger(__name__)


@dataclass
class Pool:
    """ids: (n,) str, unique. texts: (n,) str ("" where a sample has only an image) or None
    (embeddings given). labels: (n,) or None. images: (n,) object array of absolute paths (str),
    bytes or None, or None for a text-only pool; audios, videos: the same for speech and video
    (``io.media`` decodes them), read up to ``max_seconds`` (``embed.max_seconds``) of each.
    embeddings: (n, d) float32 or None.
    skipped: reason -> number of rows dropped under ``embed.on_bad_rows: skip``. records: the
    data file's rows as read (every original field), row for row with ``ids``, or None (vectors
    only): kept so that the task, the export and predict read the file once per command."""

    ids: np.ndarray
    texts: Optional[np.ndarray]
    labels: Optional[np.ndarray]
    embeddings: Optional[np.ndarray]
    source: str
    images: Optional[np.ndarray] = None
    audios: Optional[np.ndarray] = None
    videos: Optional[np.ndarray] = None
    skipped: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)  # task columns, e.g. prompts and responses
    records: Optional[pa.Table] = None
    max_seconds: float = 30.0

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def modality(self) -> str:
        """What a model fine-tuned on this pool reads: ``text`` wherever samples have text (a text
        model, images and recordings beside it or not), else ``audio``, ``image`` or ``video``
        (the one kind of media the pool holds), or ``none`` (vectors only)."""
        if self.texts is not None:
            return "text"
        kinds = [k for k, v in (("audio", self.audios), ("image", self.images), ("video", self.videos)) if v is not None]
        return kinds[0] if len(kinds) == 1 else "none" if not kinds else "+".join(kinds)

    def take(self, rows: np.ndarray) -> "Pool":
        """The samples at ``rows`` (an int index or a bool mask), every per-sample field with them.

        Example:
            >>> p = Pool(ids=np.array(["a", "b", "c"], dtype=object), texts=np.array(["x", "y", "z"], dtype=object),
            ...          labels=None, embeddings=None, source="demo")
            >>> p.take(np.array([2, 0])).ids.tolist()
            ['c', 'a']
        """
        pick = lambda v: None if v is None else v[rows]  # noqa: E731
        rows = np.asarray(rows)
        at = np.flatnonzero(rows) if rows.dtype == bool else rows
        return Pool(ids=self.ids[rows], texts=pick(self.texts), labels=pick(self.labels),
                    embeddings=pick(self.embeddings), source=self.source, images=pick(self.images),
                    audios=pick(self.audios), videos=pick(self.videos),
                    skipped=dict(self.skipped), extra={k: v[rows] for k, v in self.extra.items()},
                    records=None if self.records is None else self.records.take(pa.array(at, pa.int64())),
                    max_seconds=self.max_seconds)

    def positions(self, ids) -> np.ndarray:
        """(len(ids),) int64 row of each id in this pool, -1 where it is not here."""
        return positions(self.ids, ids)

    def label_codes(self, names: Optional[list] = None) -> tuple[list[str], np.ndarray]:
        """The pool's labels as indices: :func:`label_codes` of ``labels`` (which must be set)."""
        if self.labels is None:
            raise InputError(f"{self.source} has no labels: set data.label_column (or data.labels_path)")
        return label_codes(self.labels, names)


def label_codes(labels, names: Optional[list] = None) -> tuple[list[str], np.ndarray]:
    """(names, codes): the label names (the labels' distinct values as text, sorted, unless given)
    and (n,) int64 the index of each label among them, -1 where it is not one of them. The one
    label codec of the package: labels are compared as text everywhere.

    Example:
        >>> label_codes(["b", "a", 3, "b"])
        (['3', 'a', 'b'], array([2, 1, 0, 2]))
        >>> label_codes(["a", "z"], ["a", "b"])[1]
        array([ 0, -1])
    """
    text = [str(v) for v in labels]
    names = sorted(set(text)) if names is None else list(names)
    index = {v: i for i, v in enumerate(names)}
    return names, np.fromiter((index.get(v, -1) for v in text), dtype=np.int64, count=len(text))


def positions(keys, wanted) -> np.ndarray:
    """(len(wanted),) int64: where each of ``wanted`` stands in ``keys`` (unique), -1 if absent.
    The one id-to-row map of the package: pools, embedding files and selections are joined by it."""
    where = {v: i for i, v in enumerate(np.asarray(keys, dtype=object).tolist())}
    return np.fromiter((where.get(v, -1) for v in wanted), dtype=np.int64, count=len(wanted))


def _column(table: pa.Table, name: str, path: str, role: str) -> list:
    if name not in table.column_names:
        raise InputError(f"{path} has no {role} column {name!r}; its columns are {table.column_names}. "
                         f"Set data.{role}_column to one of them")
    return table.column(name).to_pylist()


def _texts(table: pa.Table, cfg: DataConfig, path: str) -> Optional[list]:
    """Each sample's text (None where empty), or None when the pool has no text at all (images only)."""
    n = table.num_rows
    if cfg.text_template:
        fields = [f for _, f, _, _ in string.Formatter().parse(cfg.text_template) if f]
        missing = [f for f in fields if f not in table.column_names]
        if missing:
            raise InputError(f"data.text_template uses field(s) {missing} that {path} does not have; "
                             f"its columns are {table.column_names}")
        cols = {f: table.column(f).to_pylist() for f in fields}
        out = []
        for i in range(n):
            values = {f: ("" if cols[f][i] is None else cols[f][i]) for f in fields}
            try:
                out.append(cfg.text_template.format(**values))
            except (ValueError, TypeError) as e:
                raise InputError(f"{path}: data.text_template cannot format row {i} ({e}); use plain fields such "
                                 f"as '{{instruction}}' without format specs") from None
    elif (chat := chat_column(table.column_names, cfg.chat_column,
                              has_text=bool(cfg.text_column) or "text" in table.column_names)) is not None:
        out = [embed_text(c, cfg.chat_text) for c in read_chats(table, chat, path)]
    else:
        name = cfg.text_column or "text"
        if name not in table.column_names:
            if (cfg.image_column or cfg.audio_column or cfg.video_column) and not cfg.text_column:
                return None  # an image-, audio- or video-only pool
            raise InputError(f"{path} has no text column {name!r}; its columns are {table.column_names}. "
                             f"Set data.text_column, or data.text_template such as '{{instruction}}\\n{{input}}'")
        out = table.column(name).to_pylist()
    return [None if t is None or not str(t).strip() else str(t) for t in out]


def read_chats(table: pa.Table, column: str, path: str) -> list[list[dict]]:
    """Every sample's turns from the chat column ``column`` (module ``chat``), checked."""
    return [turns(v, f"{path}, row {i} ({column})") for i, v in enumerate(_column(table, column, path, "chat"))]


def _texts_beside_vectors(table: pa.Table, cfg: DataConfig, path: str) -> Optional[np.ndarray]:
    """With precomputed vectors nothing is embedded, but fine-tuning and the report still need the
    texts: those the config names (an error if they are missing), else a ``text`` column if the
    file has one, else None."""
    if not (cfg.text_template or cfg.text_column or "text" in table.column_names
            or chat_column(table.column_names, cfg.chat_column, has_text=False)):
        return None
    return np.array([t or "" for t in _texts(table, cfg, path)], dtype=object)


def _images(table: pa.Table, cfg: DataConfig, path: str, role: str = "image") -> list:
    """Absolute paths (str) or bytes per row of the ``role`` column (image, audio, video); None
    where a row has none."""
    raw = _column(table, getattr(cfg, f"{role}_column"), path, role)
    base = Path(path).absolute().parent  # absolute: Ray Tune runs each trial in a directory of its own
    out = []
    for v in raw:
        if v is None or (isinstance(v, (str, bytes)) and not v):
            out.append(None)
        elif isinstance(v, bytes):
            out.append(v)
        else:
            p = Path(str(v))
            out.append(str(p if p.is_absolute() else (base / p)))
    return out


def table_ids(table: pa.Table, cfg: DataConfig, path: str) -> np.ndarray:
    """The samples' ids: the id column's values as text, or row-<n> in the file's order; unique."""
    if cfg.id_column:
        raw = _column(table, cfg.id_column, path, "id")
        nulls = [i for i, v in enumerate(raw) if v is None]
        if nulls:
            raise InputError(f"{path}: id column {cfg.id_column!r} is null at row {nulls[0]}; every sample needs an id")
        ids = np.array([str(v) for v in raw], dtype=object)
    else:
        ids = np.array([f"row-{i}" for i in range(table.num_rows)], dtype=object)
    uniq, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        dup = uniq[counts > 1]
        raise InputError(f"{path}: {len(dup)} id(s) appear more than once, e.g. {dup[0]!r}; ids must be "
                         f"unique (fix column {cfg.id_column!r} or leave data.id_column empty for row ids)")
    return ids


def _vectors_from_column(table: pa.Table, column: str, path: str) -> np.ndarray:
    """A list-of-floats column as an (n, d) array; ragged, null or non-list columns are errors."""
    if column not in table.column_names:
        raise InputError(f"{path} has no embedding column {column!r}; its columns are {table.column_names}. "
                         f"Set data.embedding_column")
    col = table.column(column).combine_chunks()
    fixed = pa.types.is_fixed_size_list(col.type)
    if not (fixed or pa.types.is_list(col.type) or pa.types.is_large_list(col.type)):
        raise InputError(f"{path}: column {column!r} is {col.type}, not a list of floats")
    if col.null_count:
        raise InputError(f"{path}: column {column!r} has {col.null_count} null vector(s)")
    if fixed:
        d = col.type.list_size
    else:
        lengths = np.unique(np.asarray(col.value_lengths()))
        if len(lengths) > 1:
            raise InputError(f"{path}: vectors in {column!r} have different lengths {lengths[:5].tolist()}; "
                             f"all must have the encoder's dimension")
        d = int(lengths[0]) if len(lengths) else 0
    return col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), d)


def check_vectors(x: np.ndarray, path: str) -> np.ndarray:
    """Float, 2-D, non-empty, finite, non-zero rows; returned L2-normalised float32.

    Meant for arrays just read from a file: a writable float32 array is normalised in place, in
    pieces, so a pool of vectors costs its own size in memory and not two or three times it."""
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise InputError(f"{path}: embeddings must be a non-empty 2-D array (n, d), got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        raise InputError(f"{path}: embeddings must be floats, got {x.dtype}")
    if x.dtype != np.float32 or not x.flags.writeable or not x.flags.c_contiguous:
        x = np.array(x, dtype=np.float32, order="C")
    step = 1 << 16
    for lo in range(0, len(x), step):
        part = x[lo:lo + step]
        finite = np.isfinite(part).all(axis=1)
        if not finite.all():
            bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
            raise InputError(f"{path}: {len(bad)} vector(s) hold NaN or inf, first at row {int(bad[0])}; "
                             f"recompute or drop them")
        norms = np.linalg.norm(part, axis=1, keepdims=True)
        if (norms == 0).any():
            zero = int((np.linalg.norm(x, axis=1) == 0).sum())
            raise InputError(f"{path}: {zero} vector(s) are all zeros and have no direction")
        np.divide(part, norms, out=part)
    return x


def normalize(x: np.ndarray, what: str = "embeddings") -> np.ndarray:
    """Rows scaled to unit L2 norm (float32, a new array); a zero row is an error."""
    return check_vectors(np.array(x, dtype=np.float32, order="C"), what)


def load_embeddings(path: str | Path, column: str = "embedding") -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Precomputed vectors from a ``.npy`` (n, d) array or a Parquet file with ``column`` (and
    optionally ``id``). Returns (x, ids): x (n, d) float32 L2-normalised; ids from the file or None."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"embeddings file {str(p)!r} does not exist; pass a .npy or .parquet file "
                         f"or a directory the embedding stage wrote")
    ids = None
    if p.is_dir():  # the shards the embedding stage wrote
        if not (p / "manifest.json").is_file():
            raise InputError(f"{p} holds no complete embedding stage (no manifest.json); rerun the "
                             f"embedding (it resumes) or pass a .npy / .parquet file")
        files = sorted(p.glob("shard-*.parquet"))
        table = pa.concat_tables([pq.read_table(f) for f in files])
        table = table.take(pa.compute.sort_indices(table, [("row", "ascending")]))  # pool order
        x = _vectors_from_column(table, column, str(p))
        ids = np.array(table.column("id").to_pylist(), dtype=object)
        return check_vectors(x, str(p)), ids
    if p.suffix.lower() == ".npy":
        try:
            x = np.load(p, allow_pickle=False)
        except (ValueError, OSError) as e:
            raise InputError(f"cannot read {str(p)!r} as a .npy array: {e}") from None
    elif p.suffix.lower() in (".parquet", ".pq"):
        table = read_table(p, "parquet")
        x = _vectors_from_column(table, column, str(p))
        if "id" in table.column_names:
            ids = np.array([str(v) for v in table.column("id").to_pylist()], dtype=object)
    else:
        raise InputError(f"embeddings file {str(p)!r} must be .npy or .parquet")
    return check_vectors(x, str(p)), ids


def read_pool(cfg: DataConfig, *, skip_bad_rows: bool = False, max_seconds: float = 30.0) -> Pool:
    """The pool described by ``cfg``: either a data file (with or without embeddings) or only
    an embeddings file (then ids come from it, or are row ids). Rows with nothing to embed (an
    empty text and no image, or an image file that does not exist) are an error, or with
    ``skip_bad_rows`` dropped and counted in ``Pool.skipped``. Recordings and clips are decoded
    once here, their first ``max_seconds`` (``embed.max_seconds``), to find the bad ones."""
    if cfg.path is None and cfg.embeddings is None:
        raise InputError("no data given: pass --data FILE (jsonl, json, csv, parquet) or --embeddings FILE")
    if cfg.path is None:
        x, file_ids = load_embeddings(cfg.embeddings, cfg.embedding_column)
        if cfg.limit:
            x, file_ids = x[: cfg.limit], (None if file_ids is None else file_ids[: cfg.limit])
        ids = file_ids if file_ids is not None else np.array([f"row-{i}" for i in range(len(x))], dtype=object)
        if len(set(ids)) != len(ids):
            raise InputError(f"{cfg.embeddings}: ids are not unique")
        return Pool(ids=ids, texts=None, labels=None, embeddings=x, source=str(cfg.embeddings))

    table = read_table(cfg.path, cfg.format)
    path = str(cfg.path)
    rows_in_file = table.num_rows
    if cfg.limit:
        table = table.slice(0, cfg.limit)
    if table.num_rows == 0:
        raise InputError(f"{path} holds no samples; the pool must not be empty")
    ids = table_ids(table, cfg, path)
    labels = None
    if cfg.labels_path:
        labels = _labels_file(cfg.labels_path, rows_in_file)[: table.num_rows]
    elif cfg.label_column:
        labels = np.array(_column(table, cfg.label_column, path, "label"), dtype=object)
    if labels is not None:
        missing = [i for i, v in enumerate(labels) if v is None or (isinstance(v, str) and not v.strip())]
        if missing:
            raise InputError(f"{path}: {len(missing)} sample(s) have no label, first at row {missing[0]} (0-based); "
                             f"label them or remove them (or leave the label column unset)")
    if cfg.embeddings is not None:
        embeddings, file_ids = load_embeddings(cfg.embeddings, cfg.embedding_column)
        if file_ids is None and len(embeddings) == rows_in_file:
            embeddings = embeddings[: len(ids)]  # row-aligned with the file; data.limit applies too
        embeddings = _align(embeddings, file_ids, ids, str(cfg.embeddings))
        return Pool(ids=ids, texts=_texts_beside_vectors(table, cfg, path), labels=labels, embeddings=embeddings,
                    source=path, records=table)
    if cfg.embedding_column in table.column_names:
        embeddings = check_vectors(_vectors_from_column(table, cfg.embedding_column, path), path)
        return Pool(ids=ids, texts=_texts_beside_vectors(table, cfg, path), labels=labels, embeddings=embeddings,
                    source=path, records=table)

    texts = _texts(table, cfg, path)
    images = _images(table, cfg, path) if cfg.image_column else None
    audios = _images(table, cfg, path, "audio") if cfg.audio_column else None
    videos = _images(table, cfg, path, "video") if cfg.video_column else None
    # Every sample needs something to embed: a non-empty text, or an image, recording or clip
    # that exists (and, for recordings and clips, decodes: io.media's pre-flight).
    bad: dict[str, list[int]] = {}
    shown: dict[int, str] = {}
    media = [m for m in (audios, videos) if m is not None]
    for kind, column in (("audio", audios), ("video", videos)):
        if column is not None:
            found, at = media_problems(column, kind, max_seconds)
            for reason, rows in found.items():
                bad.setdefault(reason, []).extend(rows)
            shown.update(at)
    flagged = {i for rows in bad.values() for i in rows}
    for i in range(table.num_rows):
        text = texts[i] if texts is not None else None
        image = images[i] if images is not None else None
        if i in flagged:
            continue
        if isinstance(image, str) and not Path(image).is_file():
            bad.setdefault("image file missing", []).append(i)
            shown.setdefault(i, repr(image))
        elif text is None and image is None and all(m[i] is None for m in media):
            reason = "nothing to embed" if media else "empty or null text" if images is None else "neither text nor image"
            bad.setdefault(reason, []).append(i)
    if bad and not skip_bad_rows:
        reason, rows = next(iter(bad.items()))
        example = f" ({shown[rows[0]]})" if rows[0] in shown else ""
        raise InputError(f"{path}: {len(rows)} sample(s) have {reason}, first at row {rows[0]} (0-based){example}; "
                         f"fix or remove them, or set embed.on_bad_rows: skip to drop and count them")
    keep = np.ones(table.num_rows, dtype=bool)
    for rows in bad.values():
        keep[rows] = False
    if keep.sum() == 0:
        raise InputError(f"{path}: every sample was dropped as bad ({ {k: len(v) for k, v in bad.items()} })")
    log.info("read %d samples from %s", int(keep.sum()), path)
    return Pool(ids=ids[keep], texts=_kept([t or "" for t in texts] if texts is not None else None, keep),
                labels=_kept(labels, keep), embeddings=None, source=path, images=_kept(images, keep),
                audios=_kept(audios, keep), videos=_kept(videos, keep),
                skipped={k: len(v) for k, v in bad.items()}, max_seconds=max_seconds,
                records=table if keep.all() else table.filter(pa.array(keep)))


def _labels_file(path: str, rows: int) -> np.ndarray:
    """Labels one per line, parallel to the data file's rows (as tweeteval ships them)."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"labels file {str(p)!r} does not exist; pass a file with one label per line")
    labels = p.read_text(encoding="utf-8").splitlines()
    if len(labels) != rows:
        raise InputError(f"labels file {p} has {len(labels)} lines but the data file has {rows} rows; "
                         f"they must match line for line")
    return np.array(labels, dtype=object)


def _kept(values, keep: np.ndarray) -> Optional[np.ndarray]:
    return None if values is None else np.array(values, dtype=object)[keep]


def _align(x: np.ndarray, file_ids: Optional[np.ndarray], ids: np.ndarray, path: str) -> np.ndarray:
    """Rows of ``x`` in the order of the pool's ``ids``: by id where the file has ids, else by row."""
    if file_ids is None:
        if len(x) != len(ids):
            raise InputError(f"{path} holds {len(x)} vectors but the pool has {len(ids)} samples; "
                             f"they must match row for row (or give the Parquet file an id column)")
        return x
    at = positions(file_ids, ids)
    if (at < 0).any():
        raise InputError(f"{path}: {int((at < 0).sum())} pool id(s) have no vector, e.g. {ids[np.argmax(at < 0)]!r}")
    return x[at]
