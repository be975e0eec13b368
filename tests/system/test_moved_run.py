"""A run started from one working directory with relative paths is read from any other, and still
once its directory is moved: ``run.json`` records the paths inside the run directory relative to it
and the pool's location absolute (the bug: export from elsewhere said "has no complete select
stage", and a moved run could be neither exported nor resumed)."""

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import unit_blobs
from ray_pipeline.cli import main

N = 150
ARGS = ["--id-column", "id", "--label-column", "label", "--k", "5", "--budgets", "20", "--no-progress"]


@pytest.fixture
def started(tmp_path, monkeypatch):
    """``ray-pipeline run`` started in ``tmp_path/a`` with a relative pool, vectors and --out."""
    a = tmp_path / "a"
    a.mkdir()
    (a / "pool.jsonl").write_text("".join(json.dumps({"id": f"s{i}", "text": f"sample {i}", "label": f"L{i % 4}"})
                                          + "\n" for i in range(N)))
    np.save(a / "x.npy", unit_blobs(N, 8, 5, 3))
    monkeypatch.chdir(a)
    assert main(["run", "--data", "pool.jsonl", "--embeddings", "x.npy", "--out", "runs/x", *ARGS]) == 0
    return a


def _chosen(run_dir) -> list[str]:
    sel = pq.read_table(run_dir / "selection.parquet").to_pandas()
    return sel.id[sel.in_k5_m20].tolist()


def _exported(run_dir, output, monkeypatch, where) -> list[str]:
    monkeypatch.chdir(where)
    assert main(["export", str(run_dir), "--candidate", "k5_m20", "--order", "greedy", "--output", str(output)]) == 0
    return [json.loads(line)["id"] for line in output.read_text().splitlines()]


def test_run_json_records_locations_absolute_and_stage_paths_relative(started):
    info = json.loads((started / "runs" / "x" / "run.json").read_text())
    assert info["config"]["data"]["path"] == str(started / "pool.jsonl")
    assert info["config"]["data"]["embeddings"] == str(started / "x.npy")
    assert info["stages"]["select"]["dir"] == f"select/{info['stages']['select']['key']}"
    assert info["stages"]["report"]["path"] == "report.html"
    # the same relative config from the same directory is the same run: resumed, the stage reused
    assert main(["run", "--data", "pool.jsonl", "--embeddings", "x.npy", "--out", "runs/x", "--resume", *ARGS]) == 0
    assert json.loads((started / "runs" / "x" / "run.json").read_text())["stages"]["select"]["reused"] is True


def test_export_by_absolute_path_from_another_directory(started, tmp_path, monkeypatch):
    run_dir = started / "runs" / "x"
    (tmp_path / "b").mkdir()
    ids = _exported(run_dir, tmp_path / "b" / "s.jsonl", monkeypatch, tmp_path / "b")
    assert sorted(ids) == sorted(_chosen(run_dir)) and len(ids) == 20


def test_moved_run_exports_and_resumes_in_its_new_place(started, tmp_path, monkeypatch):
    run_dir = started / "runs" / "x"
    before = _exported(run_dir, tmp_path / "before.jsonl", monkeypatch, started)
    selection = (run_dir / "selection.parquet").read_bytes()
    c = tmp_path / "c"
    c.mkdir()
    shutil.move(str(run_dir), str(c / "moved"))
    assert _exported(c / "moved", tmp_path / "after.jsonl", monkeypatch, tmp_path) == before
    # continued in its new place from there, the pool named relative to that directory: the same run
    monkeypatch.chdir(c)
    assert main(["run", "--data", "../a/pool.jsonl", "--embeddings", "../a/x.npy", "--out", "moved", "--resume",
                 *ARGS]) == 0
    info = json.loads((c / "moved" / "run.json").read_text())
    assert info["status"] == "complete" and info["stages"]["select"]["reused"] is True
    assert (c / "moved" / "selection.parquet").read_bytes() == selection
    assert not (started / "runs" / "x").exists()  # nothing written back to the old place
    page = (c / "moved" / "report.html").read_text()  # rewritten there, its candidates from select.json
    assert "The subset centroid_k5_m20 (20 samples" in page and str(c / "moved") in page
    assert _exported(c / "moved", tmp_path / "again.jsonl", monkeypatch, c) == before
