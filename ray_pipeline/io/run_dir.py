"""The run directory and its files, written so that a reader never sees half of one.

Each file is written to a hidden temporary name in its final directory, flushed, then renamed
over the final name (``os.replace`` is atomic on one filesystem). :class:`Run` owns
``run.json``; stages write under keyed directories (:func:`digest` of their inputs and config),
so a rerun reuses a complete stage and a changed config computes anew beside it::

    <out>/embeddings/<key>/   shard-*.parquet, manifest.json (marks it complete)
    <out>/select/<key>/       selection.parquet, clusters.parquet, select.json (marks it complete)
    <out>/tune/<key>/         candidates.json (marks it complete), target/, trials/, tune/, train/
    <out>/selection.parquet, clusters.parquet, candidates.json, target -> tune/<key>/target
    <out>/report.html, run.json (config, status of each stage, timings, versions)

So that a run started from any working directory reads from any other, and still reads once moved
or copied, ``run.json`` records the paths inside the run directory (each stage's ``dir``, the
report's ``path``, the target's files) relative to the run directory, and the file locations of its
config (``data.path``, ``data.embeddings``, the held-out set's ``*_path`` fields) absolute.
:func:`in_run` reads a stored path back.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .. import __version__
from ..config import Config
from ..errors import InputError, OutputError

log = logging.getLogger(__name__)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yields a temporary path beside ``path``; renamed to ``path`` only if the block succeeds."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_parquet(table: pa.Table, path: str | Path) -> None:
    """``table`` as a Parquet file at ``path``, atomically; vector columns (lists of floats, e.g.
    the embedding stage's ``embedding``) without dictionary encoding, every other column with it
    (:func:`dictionary_columns`)."""
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, use_dictionary=dictionary_columns(table.schema))


def dictionary_columns(schema: pa.Schema) -> list[str]:
    """The Parquet column paths of ``schema`` to dictionary-encode: every leaf but the floats
    inside a list. A float16 vector column has at most 65,536 distinct values, so Parquet keeps
    its dictionary for the whole column, and decoding through it made a 50,000 x 384 shard take
    0.47 s to read against 0.09 s without it (pyarrow 26, the 2-core EPYC); the selection's
    passes read every shard several times a K. Paths follow pyarrow's nested naming
    (``a.list.element``, ``a.b``, ``a.key_value.key``).

    Example:
        >>> dictionary_columns(pa.schema([("id", pa.string()), ("embedding", pa.list_(pa.float16(), 4)),
        ...                               ("tags", pa.list_(pa.string()))]))
        ['id', 'tags.list.element']
    """
    def leaves(path: str, t: pa.DataType, in_list: bool):
        if pa.types.is_struct(t):
            for f in t:
                yield from leaves(f"{path}.{f.name}", f.type, in_list)
        elif pa.types.is_map(t):
            yield from leaves(f"{path}.key_value.key", t.key_type, True)
            yield from leaves(f"{path}.key_value.value", t.item_type, True)
        elif pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
            yield from leaves(f"{path}.list.element", t.value_type, True)
        elif not (in_list and pa.types.is_floating(t)):
            yield path

    return [p for f in schema for p in leaves(f.name, f.type, False)]


def write_json(obj: Any, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def publish(src: Path, dst: Path) -> None:
    """A stage file copied to the run directory's top level, atomically."""
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def link(target: Path, link_path: Path) -> None:
    """``link_path`` -> ``target`` (relative), replaced atomically."""
    tmp = link_path.with_name(f".{link_path.name}.tmp-{os.getpid()}")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(os.path.relpath(target, link_path.parent), tmp)
    os.replace(tmp, link_path)


def digest(*parts) -> str:
    """16 hex digits of SHA-256 over ``parts``: arrays by their bytes (no copy of a large one),
    everything else as sorted JSON."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, np.ndarray) and part.dtype != object:
            h.update(memoryview(np.ascontiguousarray(part)).cast("B"))
        else:
            h.update(json.dumps(part, sort_keys=True, default=str).encode())
        h.update(b"\x00")
    return h.hexdigest()[:16]


def versions() -> dict[str, str]:
    import faiss
    import torch

    return {"ray_pipeline": __version__, "python": platform.python_version(), "numpy": np.__version__,
            "torch": torch.__version__, "faiss": faiss.__version__, "pyarrow": pa.__version__}


def _is_location(field: str) -> bool:
    """A config field that names a file or directory: ``path``, ``*_path``, ``embeddings``, ``output_dir``."""
    return field in ("path", "embeddings", "output_dir") or field.endswith("_path")


def located(config: dict) -> dict:
    """A config's dict (``Config.to_dict()``) with every file location absolute: a relative one is
    read against the working directory, which a reader of ``run.json`` elsewhere does not know. A
    URL (``s3://...``) stays as it is."""
    def walk(node: dict) -> dict:
        return {k: walk(v) if isinstance(v, dict) else
                os.path.abspath(v) if _is_location(k) and isinstance(v, str) and "://" not in v else v
                for k, v in node.items()}

    return walk(config)


def same_run(stored: Optional[dict], config: dict) -> bool:
    """Whether ``run.json``'s config (``stored``) and ``config`` are one run: the same fields, the
    same files (both sides :func:`located`, so a relative path and its absolute spelling agree, as
    does a ``run.json`` written before locations were recorded absolute, read from where it was
    started). The run directory's own location does not count: a moved run is the same run."""
    return stored is not None and _what_runs(stored) == _what_runs(config)


def _what_runs(config: dict) -> dict:
    return {k: v for k, v in located(config).items() if k not in ("output_dir", "ray")}  # ray: waits, not results


def in_run(run_dir: str | Path, stored: str) -> Path:
    """A path that ``run.json`` or ``candidates.json`` records, read back: relative to the run
    directory ``run_dir`` (an absolute one stays itself). A run written before paths were recorded
    so holds them as they were given, relative to the working directory it was started from: read
    as such where the run directory does not hold the relative one."""
    inside = Path(run_dir) / stored
    return inside if inside.exists() or not Path(stored).exists() else Path(stored)


def stage_path(run_dir: str | Path, info: dict, name: str) -> Optional[Path]:
    """The directory the stage ``name`` of ``run.json`` (``info``) wrote (``embed``, ``select``,
    ``tune``); None where it recorded none (vectors given, or the stage not run)."""
    stored = info.get("stages", {}).get(name, {}).get("dir")
    return None if stored is None else in_run(run_dir, stored)


def read_run(run_dir: str | Path) -> dict:
    """``run_dir``'s ``run.json``."""
    path = Path(run_dir) / "run.json"
    if not path.is_file():
        raise InputError(f"{str(run_dir)!r} is not a run directory (no run.json)")
    return json.loads(path.read_text())


def select_listing(run_dir: str | Path, info: Optional[dict] = None) -> dict:
    """The select stage's ``select.json`` of the run in ``run_dir`` (its ``run.json``: ``info``, read
    when not given): every candidate with its ``kind``, ``method``, ``k``, ``m``, ``family``, the
    budgets, the dimension. Readers take these facts from here, never from a candidate's name."""
    d = stage_path(run_dir, read_run(run_dir) if info is None else info, "select")
    if d is None or not (d / "select.json").is_file():
        raise InputError(f"the run in {str(run_dir)!r} has no complete select stage; rerun it with --resume")
    return json.loads((d / "select.json").read_text())


class Run:
    """The run directory and its ``run.json``: the config, each stage's status and timings.

    ``run.json`` is written when the run starts (``status: running``) and after every stage; a
    directory whose run did not finish is continued only with ``resume``. It holds the config with
    its file locations absolute (:func:`located`) and each stage's paths relative to the run
    directory (:meth:`relative`; read back with :meth:`path_of`), so the directory can be moved and
    continued from its new place (``--out NEW --resume``).
    """

    def __init__(self, cfg: Config, *, resume: bool = False, overwrite: bool = False):
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.path = self.out / "run.json"
        if self.out.exists() and not self.out.is_dir():
            raise OutputError(f"output directory {str(self.out)!r} is an existing file; choose a directory with --out")
        config = located(cfg.to_dict())
        previous = self._read()
        if previous and not overwrite:
            if not same_run(previous.get("config"), config):
                raise OutputError(f"output directory {str(self.out)!r} holds a different run (its run.json has "
                                  f"another config); choose another --out, or pass --overwrite to replace it")
            if previous.get("status") != "complete" and not resume:
                raise OutputError(f"output directory {str(self.out)!r} holds a run that did not finish; pass "
                                  f"--resume to continue it, or --overwrite to start again")
        self.info = {"config": config, "status": "running", "stages": {},
                     "versions": versions(), "machine": {"platform": platform.platform(), "cpus": os.cpu_count()}}
        if previous and resume and same_run(previous.get("config"), config):
            self.info["stages"] = previous.get("stages", {})

    def start(self) -> None:
        """Mark the directory as holding this (running) run; called once the input checked out."""
        self._write()

    def _read(self) -> Optional[dict]:
        try:
            return json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def _write(self) -> None:
        write_json(self.info, self.path)

    def relative(self, path: str | Path) -> str:
        """``path``, a file or directory inside the run directory, as ``run.json`` records it:
        relative to the run directory."""
        return Path(os.path.abspath(path)).relative_to(os.path.abspath(self.out)).as_posix()

    def path_of(self, name: str) -> Optional[Path]:
        """The directory the stage ``name`` recorded (:func:`stage_path`)."""
        return stage_path(self.out, self.info, name)

    def stage(self, name: str, **info) -> None:
        """Record a finished stage and log its time."""
        self.info["stages"][name] = {**self.info["stages"].get(name, {}), **info, "status": "complete"}
        self._write()
        log.info("stage %s done in %.1fs%s", name, info.get("seconds", 0.0),
                 " (reused)" if info.get("reused") else "")

    def finish(self, **info) -> None:
        self.info.update(info, status="complete")
        self._write()


STAGES = ("read", "embed", "select", "tune", "report")  # in the order a run goes through them


def mark_interrupted(run_dir: str | Path, signal_name: str) -> Optional[str]:
    """Record in ``run_dir``'s ``run.json``, where a run is in progress there, that a signal stopped
    it: ``status: interrupted`` (unfinished: continued only with ``--resume``), the signal and the
    stage it cut (the first not complete); that stage, or None where no run was in progress."""
    path = Path(run_dir) / "run.json"
    try:
        info = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if info.get("status") != "running":
        return None
    done = info.get("stages", {})
    stage = next((s for s in STAGES if done.get(s, {}).get("status") != "complete"), "finish")
    info.update(status="interrupted", interrupted={"signal": signal_name, "stage": stage})
    write_json(info, path)
    return stage
