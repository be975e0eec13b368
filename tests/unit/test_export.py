"""Export: a candidate's samples with every original field, in the pool's format or another one;
and pools read from Hugging Face dataset directories."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from conftest import unit_blobs
from ray_pipeline.cli import main
from ray_pipeline.config import DataConfig
from ray_pipeline.io.pool import read_pool
from ray_pipeline.errors import InputError

N = 120


def chat(i: int) -> dict:
    return {"id": f"c{i}", "text": f"question {i}", "label": f"L{i % 3}", "score": i / 10,
            "messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]}


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory):
    """A messages-format pool with precomputed vectors, selected (no fine-tuning)."""
    d = tmp_path_factory.mktemp("chat")
    (d / "pool.jsonl").write_text("".join(json.dumps(chat(i)) + "\n" for i in range(N)))
    np.save(d / "x.npy", unit_blobs(N, 8, 4, 0))
    rc = main(["select", "--data", str(d / "pool.jsonl"), "--embeddings", str(d / "x.npy"), "--id-column", "id",
               "--label-column", "label", "--k", "6", "--budgets", "12", "--out", str(d / "run"), "--no-progress",
               "--set", "select.method=[kcenter, centroid, boundary]"])
    assert rc == 0
    return d


def test_jsonl_messages_pool_exports_its_own_records(chat_run, capsys):
    out = chat_run / "k6.jsonl"
    assert main(["export", str(chat_run / "run"), "--candidate", "k6_m12", "--output", str(out)]) == 0
    got = [json.loads(line) for line in out.read_text().splitlines()]
    sel = pq.read_table(chat_run / "run" / "selection.parquet").to_pandas()
    chosen = sel.id[sel.in_k6_m12].tolist()
    assert [r["id"] for r in got] == chosen  # pool order
    assert got == [chat(int(i[1:])) for i in chosen]  # every field, messages as a list of role/content records
    assert "12 samples of k6_m12" in capsys.readouterr().out


def test_greedy_order_puts_every_clusters_key_sample_first(chat_run):
    out = chat_run / "greedy.jsonl"
    assert main(["export", str(chat_run / "run"), "--candidate", "k6_m12", "--order", "greedy", "--output",
                 str(out)]) == 0
    ids = [json.loads(line)["id"] for line in out.read_text().splitlines()]
    sel = pq.read_table(chat_run / "run" / "selection.parquet").to_pandas().set_index("id")
    ranks = [int(sel.loc[i, "rank_k6"]) for i in ids]
    assert ranks == sorted(ranks) and ranks[0] == 0 and sorted(ids) == sorted(sel.index[sel.in_k6_m12])
    keys = pq.read_table(chat_run / "run" / "clusters.parquet").to_pandas()
    assert set(ids[: (np.array(ranks) == 0).sum()]) <= set(keys.key_id.dropna())


def test_a_boundary_candidate_exports_in_its_own_order(chat_run):
    """A boundary candidate's family holds its one budget: its rank column is named after it."""
    out = chat_run / "boundary.jsonl"
    assert main(["export", str(chat_run / "run"), "--candidate", "boundary_k6_m12", "--order", "greedy",
                 "--output", str(out)]) == 0
    ids = [json.loads(line)["id"] for line in out.read_text().splitlines()]
    sel = pq.read_table(chat_run / "run" / "selection.parquet").to_pandas().set_index("id")
    ranks = [int(sel.loc[i, "rank_boundary_k6_m12"]) for i in ids]
    assert ranks == sorted(ranks) and sorted(ids) == sorted(sel.index[sel.in_boundary_k6_m12])


def test_parquet_and_json_outputs_and_csv_refuses_nested_messages(chat_run):
    run = str(chat_run / "run")
    assert main(["export", run, "--candidate", "random_m12_s0", "--output", str(chat_run / "r.parquet")]) == 0
    t = pq.read_table(chat_run / "r.parquet")
    assert t.num_rows == 12 and t.column("messages").to_pylist()[0][1]["role"] == "assistant"
    assert main(["export", run, "--candidate", "full", "--format", "json", "--output", str(chat_run / "all")]) == 0
    assert len(json.loads((chat_run / "all").read_text())) == N
    assert main(["export", run, "--candidate", "k6_m12", "--output", str(chat_run / "x.csv")]) == 2
    assert not (chat_run / "x.csv").exists()


def test_export_errors_name_the_fix(chat_run, capsys):
    run = str(chat_run / "run")
    assert main(["export", run, "--output", str(chat_run / "t.jsonl")]) == 2  # target, but not fine-tuned
    assert "has no target" in capsys.readouterr().err
    assert main(["export", run, "--candidate", "k99_m1", "--output", str(chat_run / "t.jsonl")]) == 2
    assert "no candidate 'k99_m1'" in capsys.readouterr().err
    assert main(["export", run, "--candidate", "random_m12_s0", "--order", "greedy", "--output",
                 str(chat_run / "t.jsonl")]) == 2
    assert main(["export", str(chat_run), "--candidate", "k6_m12", "--output", str(chat_run / "t.jsonl")]) == 2
    assert main(["export", run, "--candidate", "k6_m12", "--output", str(chat_run)]) == 2  # a directory
    assert not (chat_run / "t.jsonl").exists()


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_csv_and_parquet_pools_export_in_their_own_format(tmp_path, fmt):
    table = pa.table({"text": [f"sample {i}" for i in range(60)], "category": [f"c{i % 2}" for i in range(60)],
                      "code": [f"{i:03d}" for i in range(60)]})
    pool = tmp_path / f"pool.{fmt}"
    (pacsv.write_csv if fmt == "csv" else pq.write_table)(table, pool)
    np.save(tmp_path / "x.npy", unit_blobs(60, 6, 3, 1))
    assert main(["select", "--data", str(pool), "--embeddings", str(tmp_path / "x.npy"), "--k", "3",
                 "--budgets", "9", "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    out = tmp_path / f"sub.{fmt}"
    assert main(["export", str(tmp_path / "run"), "--candidate", "k3_m9", "--output", str(out)]) == 0
    got = pacsv.read_csv(out, convert_options=pacsv.ConvertOptions(strings_can_be_null=False,
                                                                     column_types={"code": pa.string()})) \
        if fmt == "csv" else pq.read_table(out)
    assert got.num_rows == 9 and got.column_names == ["text", "category", "code"]
    assert set(got.column("code").to_pylist()) <= {f"{i:03d}" for i in range(60)}  # "007" stays "007"


def test_a_save_to_disk_directory_and_a_parquet_snapshot_are_pools(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [chat(i) for i in range(30)]
    ds = datasets.Dataset.from_list(rows)
    ds.save_to_disk(str(tmp_path / "saved"))
    pool = read_pool(DataConfig(path=str(tmp_path / "saved"), id_column="id", label_column="label"))
    assert pool.ids.tolist() == [r["id"] for r in rows] and pool.texts[3] == "question 3"
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "dict"))
    with pytest.raises(InputError, match="point at one of its splits, e.g. .*/train"):
        read_pool(DataConfig(path=str(tmp_path / "dict")))
    (tmp_path / "snap").mkdir()
    ds.select(range(10)).to_parquet(str(tmp_path / "snap" / "part-0.parquet"))
    ds.select(range(10, 30)).to_parquet(str(tmp_path / "snap" / "part-1.parquet"))
    snap = read_pool(DataConfig(path=str(tmp_path / "snap"), id_column="id"))
    assert snap.ids.tolist() == [r["id"] for r in rows]
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="holds no .parquet or .arrow"):
        read_pool(DataConfig(path=str(tmp_path / "empty")))


def _copy(run_dir, to):
    """A copy of the run directory (run.json records its stages relative to it, so a copy reads)."""
    import shutil

    shutil.copytree(run_dir, to)
    return to, json.loads((to / "run.json").read_text())


def _edit_listing(run_dir, info, edit) -> None:
    marker = run_dir / info["stages"]["select"]["dir"] / "select.json"
    meta = json.loads(marker.read_text())
    meta["candidates"] = [edit(c) for c in meta["candidates"]]
    marker.write_text(json.dumps(meta))


def test_greedy_order_takes_the_family_from_select_json_not_from_the_name(chat_run, tmp_path):
    """Renamed in select.json and in selection.parquet's columns, a candidate exports as before:
    no fact is parsed out of ``k6_m12`` or ``rank_k6``."""
    run, info = _copy(chat_run / "run", tmp_path / "copy")
    _edit_listing(run, info, lambda c: {**c, "name": "picked", "family": "fam"} if c["name"] == "k6_m12" else c)
    table = pq.read_table(run / "selection.parquet")
    pq.write_table(table.rename_columns([{"in_k6_m12": "in_picked", "rank_k6": "rank_fam"}.get(c, c)
                                         for c in table.column_names]), run / "selection.parquet")
    for name, where in (("k6_m12", chat_run / "run"), ("picked", run)):
        assert main(["export", str(where), "--candidate", name, "--order", "greedy", "--output",
                     str(tmp_path / f"{name}.jsonl")]) == 0
    assert (tmp_path / "picked.jsonl").read_text() == (tmp_path / "k6_m12.jsonl").read_text()


def test_a_select_json_without_families_refuses_greedy_order_and_says_what_to_do(chat_run, tmp_path, capsys):
    run, info = _copy(chat_run / "run", tmp_path / "copy")
    _edit_listing(run, info, lambda c: {k: v for k, v in c.items() if k != "family"})  # an older version's
    out = tmp_path / "g.jsonl"
    assert main(["export", str(run), "--candidate", "k6_m12", "--order", "greedy", "--output", str(out)]) == 2
    assert "names no candidate's family" in capsys.readouterr().err and not out.exists()
    assert main(["export", str(run), "--candidate", "k6_m12", "--output", str(out)]) == 0


def test_a_run_json_with_paths_as_given_reads_from_where_it_was_started(chat_run, tmp_path, monkeypatch):
    """run.json written before stage paths were recorded relative to the run directory held them as
    given: relative to the working directory the run started from. Read from there, it exports."""
    run, info = _copy(chat_run / "run", tmp_path / "copy")
    info["stages"]["select"]["dir"] = f"copy/{info['stages']['select']['dir']}"  # as `--out copy` wrote it
    (run / "run.json").write_text(json.dumps(info))
    monkeypatch.chdir(tmp_path)
    assert main(["export", "copy", "--candidate", "k6_m12", "--output", "k6.jsonl"]) == 0
    assert len((tmp_path / "k6.jsonl").read_text().splitlines()) == 12


def test_a_save_cut_short_is_removed_and_a_finished_model_kept(tmp_path):
    """What an interrupted sweep leaves when a worker is stopped inside save_model: its temporary
    directory beside best_model, removed after Tune stops; the models already swapped in stay."""
    from ray_pipeline.finetune.trial import remove_unfinished_saves

    trial = tmp_path / "trials" / "k4_m16"
    (trial / "best_model").mkdir(parents=True)
    (trial / "best_model" / "config.json").write_text("{}")
    (trial / ".best_model.tmp-rz2baf26").mkdir()
    (trial / ".best_model.tmp-rz2baf26" / "model.safetensors").write_bytes(b"half")
    assert remove_unfinished_saves(tmp_path / "trials") == [trial / ".best_model.tmp-rz2baf26"]
    assert sorted(p.name for p in trial.iterdir()) == ["best_model"]
    assert remove_unfinished_saves(tmp_path / "trials") == []
