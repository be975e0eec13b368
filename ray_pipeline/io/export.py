"""Export: a candidate subset as the pool's own records, in a file a trainer reads.

The run directory knows which samples a candidate holds (``selection.parquet``, the candidates
``select.json`` lists, the target in ``candidates.json``); this stage reads the pool's file again
and writes those samples with every original field (a ``messages`` list stays a ``messages``
list) as JSONL, JSON, CSV, Parquet or text, in pool order or in greedy order (the order the
selection picked them: every cluster's key sample first, then every cluster's second pick, ...),
so the file goes straight into TRL, Axolotl or LLaMA-Factory. Written to a temporary name and
renamed when complete.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from .run_dir import atomic_path
from ..config import Config
from .pool import positions, table_ids
from ..errors import InputError, OutputError
from .formats import SUFFIX, detect_format, read_table

log = logging.getLogger(__name__)

OUT_FORMATS = ("jsonl", "json", "csv", "parquet", "text")


def pool_format(cfg: Config) -> str:
    """The format of the pool's own file (``jsonl`` for a dataset directory)."""
    path = Path(str(cfg.data.path))
    if path.is_dir() or ("://" in str(cfg.data.path) and not path.suffix):
        return "jsonl"
    return detect_format(path, cfg.data.format)


def export_records(cfg: Config, ids: list[str], output: Path, fmt: str = "auto") -> dict:
    """Write the pool's records of ``ids`` (in that order) to ``output`` in ``fmt`` (``auto``: from
    the output's suffix, else the pool's own format). Returns what was written."""
    if cfg.data.path is None:
        raise InputError("the pool was given as vectors only (data.embeddings): there are no records to export; "
                         "the chosen ids are in selection.parquet")
    output = Path(output)
    if output.is_dir():
        raise OutputError(f"--output {str(output)!r} is a directory; give a file name such as subset.jsonl")
    if fmt == "auto":
        fmt = {v: k for k, v in SUFFIX.items()}.get(output.suffix.lower()) or pool_format(cfg)
    if fmt not in OUT_FORMATS:
        raise InputError(f"cannot write format {fmt!r}; choose one of {', '.join(OUT_FORMATS)}")
    table = read_table(cfg.data.path, cfg.data.format)
    if cfg.data.limit:
        table = table.slice(0, cfg.data.limit)
    at = positions(table_ids(table, cfg.data, str(cfg.data.path)), ids)
    if (at < 0).any():
        raise InputError(f"{cfg.data.path} no longer holds the selected sample {ids[int(np.argmax(at < 0))]!r}; "
                         f"the pool changed since the run: rerun the selection")
    rows = table.take(pa.array(at))
    _write(rows, output, fmt)
    log.info("exported %d samples (%s) to %s", rows.num_rows, fmt, output)
    return {"rows": rows.num_rows, "format": fmt, "output": str(output)}


def _write(table: pa.Table, output: Path, fmt: str) -> None:
    with atomic_path(output) as tmp:
        if fmt == "parquet":
            pq.write_table(table, tmp)
        elif fmt == "csv":
            nested = [f.name for f in table.schema if pa.types.is_nested(f.type)]
            if nested:
                raise InputError(f"CSV cannot hold the nested column(s) {nested} (e.g. chat messages); export as "
                                 f".jsonl, .json or .parquet")
            pacsv.write_csv(table, tmp)
        elif fmt == "text":
            if "text" not in table.column_names:
                raise InputError(f"text output writes the column 'text', which this pool lacks (it has "
                                 f"{table.column_names}); export as .jsonl instead")
            tmp.write_text("".join(f"{v}\n" for v in table.column("text").to_pylist()), encoding="utf-8")
        else:
            records = table.to_pylist()
            dump = lambda r: json.dumps(r, ensure_ascii=False, default=str)  # noqa: E731
            text = "".join(dump(r) + "\n" for r in records) if fmt == "jsonl" else \
                "[\n" + ",\n".join(dump(r) for r in records) + "\n]\n"
            tmp.write_text(text, encoding="utf-8")


def candidate_ids(run_dir: Path, candidate: str, order: str = "pool") -> tuple[str, list[str]]:
    """(name, ids) of a run's candidate (``target``: the tune stage's target), in ``order``:
    ``pool`` (the pool's order) or ``greedy`` (by pick: rank, then pool order)."""
    run_dir = Path(run_dir)
    sel_path = run_dir / "selection.parquet"
    if not sel_path.is_file():
        raise InputError(f"{str(run_dir)!r} is not a finished run directory (no selection.parquet); pass the --out "
                         f"of a select or run command")
    listed = _listed(run_dir)
    name = candidate
    if candidate == "target":
        cand = run_dir / "candidates.json"
        target = json.loads(cand.read_text())["summary"]["target"] if cand.is_file() else None
        if not target:
            raise InputError(f"the run in {str(run_dir)!r} has no target (it was not fine-tuned, or no candidate "
                             f"finished); pass --candidate NAME, one of: {', '.join(c['name'] for c in listed)}")
        name = target["name"]
    spec = next((c for c in listed if c["name"] == name), None)
    if spec is None and name != "full":
        raise InputError(f"no candidate {name!r} in this run; choose one of: full, "
                         f"{', '.join(c['name'] for c in listed)}")
    table = pq.read_table(sel_path)
    ids = np.asarray(table.column("id").to_pylist(), dtype=object)
    chosen = np.ones(len(ids), bool) if name == "full" else table.column(f"in_{name}").to_numpy(zero_copy_only=False)
    rows = np.flatnonzero(chosen)
    if order == "greedy":
        if spec is None or spec["kind"] != "selection":
            raise InputError(f"{name!r} has no greedy order (only selection candidates do); use --order pool")
        family = spec.get("family") or (f"k{spec['k']}" if spec["method"] == "kcenter"  # runs before "family"
                                        else f"{spec['method']}_k{spec['k']}")
        rank = table.column(f"rank_{family}").to_numpy()[rows]  # the family's column (select.KSelection.family)
        rows = rows[np.lexsort((rows, rank))]
    elif order != "pool":
        raise InputError(f"--order {order!r}: choose pool or greedy")
    return name, ids[rows].tolist()


def _listed(run_dir: Path) -> list[dict]:
    info = json.loads((run_dir / "run.json").read_text())
    key = info.get("stages", {}).get("select", {}).get("dir")
    if key is None or not (Path(key) / "select.json").is_file():
        raise InputError(f"the run in {str(run_dir)!r} has no complete select stage; rerun it with --resume")
    return json.loads((Path(key) / "select.json").read_text())["candidates"]


def export_run(run_dir: Path, candidate: str, output: Path, *, fmt: str = "auto", order: str = "pool",
               cfg: Optional[Config] = None) -> dict:
    """``ray-pipeline export``: the candidate's samples of a run, with every original field.

    Example (a run directory made by ``ray-pipeline select``)::

        export_run(Path("runs/banking77"), "target", Path("subset.jsonl"), order="greedy")
    """
    run_dir = Path(run_dir)
    if cfg is None:
        run_json = run_dir / "run.json"
        if not run_json.is_file():
            raise InputError(f"{str(run_dir)!r} is not a run directory (no run.json)")
        cfg = Config.from_dict(json.loads(run_json.read_text())["config"])
    name, ids = candidate_ids(run_dir, candidate, order)
    return {"candidate": name, "order": order, **export_records(cfg, ids, output, fmt)}
