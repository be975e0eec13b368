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

from .run_dir import atomic_path, read_run, select_listing
from ..config import Config, DataConfig
from .pool import Pool, positions, table_ids
from ..errors import InputError, OutputError
from .formats import SUFFIX, detect_format, read_table

log = logging.getLogger(__name__)

OUT_FORMATS = ("jsonl", "json", "csv", "parquet", "text")


def pool_format(data: DataConfig) -> str:
    """The format of the pool's own file (``jsonl`` for a dataset directory)."""
    path = Path(str(data.path))
    if path.is_dir() or ("://" in str(data.path) and not path.suffix):
        return "jsonl"
    return detect_format(path, data.format)


def export_records(data: DataConfig, ids: list[str], output: Path, fmt: str = "auto", *,
                   pool: Optional[Pool] = None) -> dict:
    """Write the pool's records of ``ids`` (in that order) to ``output`` in ``fmt`` (``auto``: from
    the output's suffix, else the pool's own format). Returns what was written. pool: the pool as
    this command read it (its ``records``), so the file is not read again; else it is read."""
    if data.path is None:
        raise InputError("the pool was given as vectors only (data.embeddings): there are no records to export; "
                         "the chosen ids are in selection.parquet")
    output = Path(output)
    if output.is_dir():
        raise OutputError(f"--output {str(output)!r} is a directory; give a file name such as subset.jsonl")
    if fmt == "auto":
        fmt = {v: k for k, v in SUFFIX.items()}.get(output.suffix.lower()) or pool_format(data)
    if fmt not in OUT_FORMATS:
        raise InputError(f"cannot write format {fmt!r}; choose one of {', '.join(OUT_FORMATS)}")
    if pool is not None and pool.records is not None:
        table, keys = pool.records, pool.ids
    else:
        table = read_table(data.path, data.format)
        if data.limit:
            table = table.slice(0, data.limit)
        keys = table_ids(table, data, str(data.path))
    at = positions(keys, ids)
    if (at < 0).any():
        raise InputError(f"{data.path} no longer holds the selected sample {ids[int(np.argmax(at < 0))]!r}; "
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
    listed = select_listing(run_dir)["candidates"]
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
        if "family" not in spec:
            raise InputError(f"the select stage of {str(run_dir)!r} was written by an older version, whose select.json "
                             f"names no candidate's family (its greedy order); use --order pool, or remove that "
                             f"select/ directory and rerun the select command")
        rank = table.column(f"rank_{spec['family']}").to_numpy()[rows]  # the family's order (selection_table)
        rows = rows[np.lexsort((rows, rank))]
    elif order != "pool":
        raise InputError(f"--order {order!r}: choose pool or greedy")
    return name, ids[rows].tolist()


def export_run(run_dir: Path, candidate: str, output: Path, *, fmt: str = "auto", order: str = "pool",
               cfg: Optional[Config] = None) -> dict:
    """``ray-pipeline export``: the candidate's samples of a run, with every original field.

    Example (a run directory made by ``ray-pipeline select``)::

        export_run(Path("runs/banking77"), "target", Path("subset.jsonl"), order="greedy")
    """
    run_dir = Path(run_dir)
    # the pool where the run read it (run.json records its location absolute); only the data
    # section is read, so a run written under another layout of the other sections still exports
    data = cfg.data if cfg is not None else Config.from_dict({"data": read_run(run_dir)["config"]["data"]}).data
    name, ids = candidate_ids(run_dir, candidate, order)
    return {"candidate": name, "order": order, **export_records(data, ids, output, fmt)}
