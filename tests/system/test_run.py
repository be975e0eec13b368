"""`ray-pipeline run`: the stages in one job, stage reuse, and a self-contained report."""

import json
import re

import numpy as np
import pytest

from conftest import unit_blobs
from ray_pipeline.cli import main


@pytest.fixture(scope="module")
def vectors(tmp_path_factory):
    p = tmp_path_factory.mktemp("vec") / "x.npy"
    np.save(p, unit_blobs(2000, 16, 10, 1))
    return p


def test_run_without_tuning_writes_the_report_and_reuses_stages(tmp_path, vectors):
    out = tmp_path / "run"
    args = ["run", "--embeddings", str(vectors), "--k", "10", "20", "--budgets", "20", "50", "--out", str(out),
            "--no-progress"]
    assert main(args) == 0
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "complete"
    assert [s for s in info["stages"]] == ["read", "embed", "select", "report"]
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 3  # cluster sizes, map, costs
    assert not re.search(r"""(src|href)=["']?https?:""", page)  # nothing loaded from the network
    assert re.search(r"The subset (centroid_)?k20_m50 \(50 samples", page)
    # the same run again: every stage reused, byte-identical selection
    before = (out / "selection.parquet").read_bytes()
    assert main(args) == 0
    info = json.loads((out / "run.json").read_text())
    assert info["stages"]["select"]["reused"] is True
    assert (out / "selection.parquet").read_bytes() == before


def test_changed_config_computes_a_new_stage_beside_the_old(tmp_path, vectors):
    out = tmp_path / "run"
    base = ["run", "--embeddings", str(vectors), "--k", "10", "--budgets", "20", "--out", str(out), "--no-progress"]
    assert main(base) == 0
    assert main(base[:-1] + ["--overwrite", "--set", "cluster.niter=5", "--no-progress"]) == 0
    assert len(list((out / "select").iterdir())) == 2


def test_select_json_keeps_the_selection_time_and_the_report_shows_the_selection_to_tuning_ratio(tmp_path,
                                                                                                vectors):
    from ray_pipeline.finetune.metrics import selection_to_tuning
    from ray_pipeline.report import write_report

    out = tmp_path / "run"
    assert main(["run", "--embeddings", str(vectors), "--k", "10", "--budgets", "20", "--out", str(out),
                 "--no-progress"]) == 0
    info = json.loads((out / "run.json").read_text())
    select_s = json.loads((out / info["stages"]["select"]["dir"] / "select.json").read_text())["select_seconds"]
    assert 0 < select_s <= info["stages"]["select"]["seconds"]  # the selection alone, inside the stage's time
    # the tune stage records selection_to_tuning from select.json and the sweep's full trial; the
    # report reads it from run.json (a sweep is not run here: the ratio is the function's own)
    ratio = selection_to_tuning(select_s, [{"kind": "full", "status": "capped", "wall_s": 4 * select_s, "steps": 3}])
    info["stages"]["tune"] = {"selection_to_tuning": ratio}
    page = write_report(out, info, None).read_text()
    assert "selection / one full-pool fine-tune" in page
    assert f"0.25 ({select_s:.1f} s / {4 * select_s:.1f} s)" in page
