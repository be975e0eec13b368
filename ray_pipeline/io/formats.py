"""Files in and out: a pool's table from any format and filesystem, and records written back.

Reading (:func:`read_table`): JSONL, JSON (a list of records), CSV (every column as text), Parquet,
plain text (one sample per line); a directory written by Hugging Face ``datasets``'
``save_to_disk`` (its Arrow files, read with pyarrow); a directory of Parquet or Arrow files (a
dataset snapshot); on any filesystem pyarrow opens (``s3://``, ``gs://``, ``hdfs://``,
``file://``) and ``hf://`` (the Hub, through ``huggingface_hub``'s filesystem, when it can be
reached). The export stage writes records back in the same formats.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from ..errors import InputError

FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet",
           ".pq": "parquet", ".txt": "text"}
SUFFIX = {"jsonl": ".jsonl", "json": ".json", "csv": ".csv", "parquet": ".parquet", "text": ".txt"}


def detect_format(path: Path, fmt: str = "auto") -> str:
    if fmt != "auto":
        return fmt
    try:
        return FORMATS[path.suffix.lower()]
    except KeyError:
        raise InputError(f"cannot tell the format of {str(path)!r} from its suffix; name it .jsonl, "
                         f".json, .csv, .parquet or .txt, or set data.format") from None


def open_uri(path: str):
    """(filesystem, path within it) for a local path or any URI pyarrow reads (``s3://``, ``gs://``,
    ``hdfs://``, ``file://``); credentials come from the environment, as pyarrow finds them."""
    import pyarrow.fs as pafs

    if path.startswith("hf://"):
        # The Hub through huggingface_hub's fsspec filesystem: hf://datasets/<owner>/<name>/<file>
        from huggingface_hub import HfFileSystem

        return pafs.PyFileSystem(pafs.FSSpecHandler(HfFileSystem())), path[len("hf://"):]
    if "://" in path:
        try:
            return pafs.FileSystem.from_uri(path)
        except (pa.ArrowInvalid, OSError) as e:
            raise InputError(f"cannot open {path!r}: {e}") from None
    return pafs.LocalFileSystem(), str(Path(path).resolve())


def read_table(path: str | Path, fmt: str = "auto") -> pa.Table:
    """The file as an Arrow table; errors name the file and what was wrong with it."""
    import pyarrow.fs as pafs

    path = str(path)
    fs, inner = open_uri(path)
    try:
        kind_of = fs.get_file_info(inner).type
    except OSError as e:  # a remote filesystem that cannot be reached
        raise InputError(f"cannot open {path!r}: {e}") from None
    if kind_of == pafs.FileType.Directory:
        return _read_directory(fs, inner, path)
    if kind_of != pafs.FileType.File:
        where = "" if "://" in path or Path(path).is_absolute() else f" (relative paths are read from {Path.cwd()})"
        raise InputError(f"data file {path!r} does not exist{where}; pass an existing file or dataset directory")
    kind = detect_format(Path(inner), fmt)
    p = path
    try:
        if kind == "parquet":
            return pq.read_table(inner, filesystem=fs)
        if kind == "csv":
            # Every column as text: ids such as "007" and labels stay exactly as written.
            with fs.open_input_stream(inner) as f:
                names = pacsv.open_csv(f).schema.names
            opts = pacsv.ConvertOptions(column_types={c: pa.string() for c in names})
            with fs.open_input_stream(inner) as f:
                return pacsv.read_csv(f, convert_options=opts)
        with fs.open_input_stream(inner) as f:
            text = f.read().decode("utf-8")
        if kind == "text":  # one sample per line, in a column named "text"
            return pa.table({"text": text.splitlines()})
        if kind == "jsonl":
            records = []
            for line_no, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise InputError(f"{p}: line {line_no} is not valid JSON ({e.msg}); "
                                     f"each line of a .jsonl file must be one JSON object") from None
                if not isinstance(rec, dict):
                    raise InputError(f"{p}: line {line_no} is a JSON {type(rec).__name__}, not an object")
                records.append(rec)
            return records_to_table(records)
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(f"{p} is not valid JSON ({e.msg} at line {e.lineno}); a .json pool "
                             f"is one list of objects (use .jsonl for one object per line)") from None
        if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
            raise InputError(f"{p} must hold a JSON list of objects (records)")
        return records_to_table(records)
    except (pa.ArrowInvalid, pa.ArrowTypeError, UnicodeDecodeError, OSError) as e:
        raise InputError(f"cannot read {p!r} as {kind}: {e}") from None


def records_to_table(records: list[dict]) -> pa.Table:
    """JSON records as a table; a column whose values mix types (ids 7 and "7a", say) or do not
    fit Arrow's types (integers beyond 64 bits) becomes text (lists and objects as their JSON)."""
    try:
        return pa.Table.from_pylist(records)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
        names = list(dict.fromkeys(k for r in records for k in r))
        as_text = lambda v: v if v is None or isinstance(v, str) else json.dumps(v)  # noqa: E731
        return pa.table({c: pa.array([as_text(r.get(c)) for r in records], pa.string()) for c in names})




def _read_directory(fs, inner: str, path: str) -> pa.Table:
    """A Hugging Face ``save_to_disk`` directory (``state.json`` + Arrow stream files), or a
    directory of Parquet / Arrow files (a dataset snapshot), as one table in file-name order."""
    import pyarrow.fs as pafs

    names = sorted(i.base_name for i in fs.get_file_info(pafs.FileSelector(inner)) if i.type == pafs.FileType.File)
    join = lambda name: f"{inner.rstrip('/')}/{name}"  # noqa: E731
    try:
        if "dataset_dict.json" in names:
            with fs.open_input_stream(join("dataset_dict.json")) as f:
                splits = json.loads(f.read().decode("utf-8")).get("splits", [])
            raise InputError(f"{path} is a DatasetDict saved with save_to_disk; point at one of its splits, e.g. "
                             f"{path.rstrip('/')}/{splits[0] if splits else 'train'}")
        if "state.json" in names:
            with fs.open_input_stream(join("state.json")) as f:
                files = [d["filename"] for d in json.loads(f.read().decode("utf-8"))["_data_files"]]
        else:
            files = [n for n in names if n.endswith((".parquet", ".arrow"))]
        if not files:
            raise InputError(f"directory {path!r} holds no .parquet or .arrow files and is not a dataset saved with "
                             f"save_to_disk; pass a data file or such a directory")
        tables = [pq.read_table(join(n), filesystem=fs) if n.endswith(".parquet") else _read_arrow(fs, join(n))
                  for n in files]
        return pa.concat_tables(tables, promote_options="default") if len(tables) > 1 else tables[0]
    except (pa.ArrowInvalid, pa.ArrowTypeError, KeyError, ValueError, OSError) as e:
        if isinstance(e, InputError):
            raise
        raise InputError(f"cannot read the dataset directory {path!r}: {e}") from None


def _read_arrow(fs, path: str) -> pa.Table:
    """An Arrow IPC file: the stream format ``datasets`` writes, or the random-access file format."""
    with fs.open_input_file(path) as f:
        try:
            return pa.ipc.open_stream(f).read_all()
        except pa.ArrowInvalid:
            f.seek(0)
            return pa.ipc.open_file(f).read_all()
