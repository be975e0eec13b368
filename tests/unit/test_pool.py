"""Reading pools: every format, templates, ids, labels, precomputed embeddings, and bad input."""

import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ray_pipeline.config import DataConfig
from ray_pipeline.io.pool import load_embeddings, read_pool
from ray_pipeline.errors import InputError

RECORDS = [
    {"uid": "007", "instruction": "Add", "input": "2 and 3", "output": "5", "label": "math"},
    {"uid": "008", "instruction": "Name a colour", "input": None, "output": "red", "label": "misc"},
]


def write(tmp_path, fmt, records=RECORDS):
    p = tmp_path / f"pool.{fmt}"
    if fmt == "jsonl":
        p.write_text("".join(json.dumps(r) + "\n" for r in records))
    elif fmt == "json":
        p.write_text(json.dumps(records))
    elif fmt == "csv":
        cols = list(records[0])
        lines = [",".join(cols)] + [",".join("" if r[c] is None else str(r[c]) for c in cols) for r in records]
        p.write_text("\n".join(lines) + "\n")
    else:
        pq.write_table(pa.Table.from_pylist(records), p)
    return p


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "parquet"])
def test_every_format_with_template_label_and_ids(tmp_path, fmt):
    p = write(tmp_path, fmt)
    pool = read_pool(DataConfig(path=str(p), text_template="{instruction}: {input} -> {output}",
                                label_column="label", id_column="uid"))
    assert pool.ids.tolist() == ["007", "008"]  # CSV ids stay text: "007", not 7
    assert pool.texts.tolist() == ["Add: 2 and 3 -> 5", "Name a colour:  -> red"]
    assert pool.labels.tolist() == ["math", "misc"]
    assert pool.embeddings is None


def test_single_text_column_and_generated_ids(tmp_path):
    p = write(tmp_path, "jsonl")
    pool = read_pool(DataConfig(path=str(p), text_column="instruction", limit=1))
    assert pool.ids.tolist() == ["row-0"] and pool.texts.tolist() == ["Add"]


@pytest.mark.parametrize("cfg_kw, message", [
    ({"text_column": "body"}, "no text column 'body'"),
    ({"text_template": "{question}"}, "field(s) ['question']"),
    ({"text_column": "instruction", "label_column": "y"}, "no label column 'y'"),
    ({"text_column": "instruction", "id_column": "key"}, "no id column 'key'"),
])
def test_missing_columns_are_named(tmp_path, cfg_kw, message):
    with pytest.raises(InputError, match=re.escape(message)):
        read_pool(DataConfig(path=str(write(tmp_path, "jsonl")), **cfg_kw))


def test_bad_files(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        read_pool(DataConfig(path=str(tmp_path / "none.jsonl")))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(InputError, match="line 2 is not valid JSON"):
        read_pool(DataConfig(path=str(bad)))
    odd = tmp_path / "pool.xyz"
    odd.write_text("x")
    with pytest.raises(InputError, match="cannot tell the format"):
        read_pool(DataConfig(path=str(odd)))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(InputError, match="no samples"):
        read_pool(DataConfig(path=str(empty)))


def test_empty_texts_and_duplicate_ids(tmp_path):
    p = write(tmp_path, "jsonl", [{"text": "a", "id": "x"}, {"text": " ", "id": "y"}])
    with pytest.raises(InputError, match="empty or null text, first at row 1"):
        read_pool(DataConfig(path=str(p)))
    p = write(tmp_path, "jsonl", [{"text": "a", "id": "x"}, {"text": "b", "id": "x"}])
    with pytest.raises(InputError, match="appear more than once, e.g. 'x'"):
        read_pool(DataConfig(path=str(p), id_column="id"))


def test_precomputed_embeddings_npy_and_parquet(tmp_path):
    x = np.array([[3.0, 4.0], [0.0, 2.0], [1.0, 1.0]])
    np.save(tmp_path / "e.npy", x)
    got, ids = load_embeddings(tmp_path / "e.npy")
    np.testing.assert_allclose(got, [[0.6, 0.8], [0, 1], [2 ** -0.5, 2 ** -0.5]], rtol=1e-6)
    assert ids is None and got.dtype == np.float32
    # Parquet with ids in another order than the pool: aligned by id.
    pq.write_table(pa.table({"id": ["b", "a", "c"], "embedding": [[0.0, 2.0], [3.0, 4.0], [1.0, 1.0]]}),
                   tmp_path / "e.parquet")
    pool_file = write(tmp_path, "jsonl", [{"id": k, "text": k} for k in "abc"])
    pool = read_pool(DataConfig(path=str(pool_file), id_column="id", embeddings=str(tmp_path / "e.parquet")))
    np.testing.assert_allclose(pool.embeddings, got, rtol=1e-6)
    assert pool.texts.tolist() == ["a", "b", "c"]  # not embedded, but fine-tuning and the report use them
    # Only embeddings: ids from the file.
    only = read_pool(DataConfig(embeddings=str(tmp_path / "e.parquet")))
    assert only.ids.tolist() == ["b", "a", "c"]


def test_embedding_column_inside_the_pool_file(tmp_path):
    p = tmp_path / "pool.parquet"
    pq.write_table(pa.table({"text": ["a", "b"], "embedding": [[1.0, 0.0], [0.0, 5.0]]}), p)
    pool = read_pool(DataConfig(path=str(p)))
    np.testing.assert_allclose(pool.embeddings, [[1, 0], [0, 1]])


def test_texts_beside_precomputed_embeddings_feed_fine_tuning(tmp_path):
    """Regression: with data.embeddings the texts were dropped, and the Tune stage then refused the
    pool ("give data.path, not only embeddings") although data.path was given."""
    from ray_pipeline.config import Config
    from ray_pipeline.finetune.task import Classification

    np.save(tmp_path / "e.npy", np.eye(3, 2) + 0.5)
    with_text = write(tmp_path, "jsonl", [{"text": f"t{i}", "label": "ab"[i % 2]} for i in range(3)])
    cfg = Config.from_dict({"data": {"path": str(with_text), "label_column": "label",
                                     "embeddings": str(tmp_path / "e.npy")}})
    arrays = Classification().arrays(read_pool(cfg.data))
    assert arrays["texts"] == ["t0", "t1", "t2"] and arrays["labels"].tolist() == [0, 1, 0]
    # No text in the file and none asked for: vectors only. A named text column that is missing: an error.
    (tmp_path / "q").mkdir()
    no_text = write(tmp_path / "q", "jsonl", [{"body": "x"}] * 3)
    assert read_pool(DataConfig(path=str(no_text), embeddings=str(tmp_path / "e.npy"))).texts is None
    with pytest.raises(InputError, match="no text column 'prompt'"):
        read_pool(DataConfig(path=str(no_text), text_column="prompt", embeddings=str(tmp_path / "e.npy")))


@pytest.mark.parametrize("x, message", [
    (np.array([[1.0, np.nan], [1.0, 0.0]]), "NaN or inf, first at row 0"),
    (np.array([[0.0, 0.0], [1.0, 0.0]]), "all zeros"),
    (np.array([1.0, 2.0]), "2-D"),
    (np.array([[1, 2]]), "must be floats"),
])
def test_bad_embeddings(tmp_path, x, message):
    np.save(tmp_path / "e.npy", x)
    with pytest.raises(InputError, match=message):
        load_embeddings(tmp_path / "e.npy")


def test_embeddings_rows_must_match_pool(tmp_path):
    np.save(tmp_path / "e.npy", np.ones((3, 2)))
    p = write(tmp_path, "jsonl", [{"text": "a"}, {"text": "b"}])
    with pytest.raises(InputError, match="holds 3 vectors but the pool has 2"):
        read_pool(DataConfig(path=str(p), embeddings=str(tmp_path / "e.npy")))


def test_text_lines_with_a_parallel_labels_file(tmp_path):
    (tmp_path / "t.txt").write_text("first tweet\nsecond tweet\n")
    (tmp_path / "l.txt").write_text("3\n7\n")
    pool = read_pool(DataConfig(path=str(tmp_path / "t.txt"), labels_path=str(tmp_path / "l.txt")))
    assert pool.texts.tolist() == ["first tweet", "second tweet"] and pool.labels.tolist() == ["3", "7"]
    (tmp_path / "l.txt").write_text("3\n")
    with pytest.raises(InputError, match="has 1 lines but the data file has 2 rows"):
        read_pool(DataConfig(path=str(tmp_path / "t.txt"), labels_path=str(tmp_path / "l.txt")))


def test_missing_labels_are_named(tmp_path):
    p = write(tmp_path, "jsonl", [{"text": "a", "label": "x"}, {"text": "b", "label": None}])
    with pytest.raises(InputError, match="1 sample\\(s\\) have no label, first at row 1"):
        read_pool(DataConfig(path=str(p), label_column="label"))


def test_uris_read_through_pyarrow_filesystems(tmp_path):
    # file:// goes through the same pyarrow.fs path as s3:// or gs:// (which need a network)
    p = write(tmp_path, "csv")
    pool = read_pool(DataConfig(path=p.as_uri(), text_column="instruction", id_column="uid"))
    assert pool.ids.tolist() == ["007", "008"]
    with pytest.raises(InputError, match="does not exist"):
        read_pool(DataConfig(path=(tmp_path / "none.jsonl").as_uri()))
