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
from ..errors import OutputError

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
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


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


class Run:
    """The run directory and its ``run.json``: the config, each stage's status and timings.

    ``run.json`` is written when the run starts (``status: running``) and after every stage; a
    directory whose run did not finish is continued only with ``resume``.
    """

    def __init__(self, cfg: Config, *, resume: bool = False, overwrite: bool = False):
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.path = self.out / "run.json"
        if self.out.exists() and not self.out.is_dir():
            raise OutputError(f"output directory {str(self.out)!r} is an existing file; choose a directory with --out")
        config = cfg.to_dict()
        previous = self._read()
        if previous and not overwrite:
            if previous.get("config") != config:
                raise OutputError(f"output directory {str(self.out)!r} holds a different run (its run.json has "
                                  f"another config); choose another --out, or pass --overwrite to replace it")
            if previous.get("status") != "complete" and not resume:
                raise OutputError(f"output directory {str(self.out)!r} holds a run that did not finish; pass "
                                  f"--resume to continue it, or --overwrite to start again")
        self.info = {"config": config, "status": "running", "stages": {},
                     "versions": versions(), "machine": {"platform": platform.platform(), "cpus": os.cpu_count()}}
        if previous and resume and previous.get("config") == config:
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

    def stage(self, name: str, **info) -> None:
        """Record a finished stage and log its time."""
        self.info["stages"][name] = {**self.info["stages"].get(name, {}), **info, "status": "complete"}
        self._write()
        log.info("stage %s done in %.1fs%s", name, info.get("seconds", 0.0),
                 " (reused)" if info.get("reused") else "")

    def finish(self, **info) -> None:
        self.info.update(info, status="complete")
        self._write()
