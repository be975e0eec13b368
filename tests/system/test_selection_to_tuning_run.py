"""A tuned `ray-pipeline run` records the selection-to-tuning ratio (Data Whisperer, ACL 2025):
select.json's selection time over the sweep's full-pool trial's wall time, in run.json's tune
stage and in the report's summary."""

import json

import pytest

from ray_pipeline.cli import main

from test_faults import tune_job

pytestmark = pytest.mark.slow  # a real sweep: MiniLM fine-tuned through Ray Train, three trials


def test_a_tuned_run_records_selection_time_over_the_full_fine_tune(tmp_path, shared_data, local_ray):
    cfg = tune_job(tmp_path, shared_data)
    cfg.write_text(cfg.read_text().replace("include_full: false", "include_full: true"))
    out = tmp_path / "run"
    assert main(["run", str(cfg), "--out", str(out), "--no-progress"]) == 0
    info = json.loads((out / "run.json").read_text())
    ratio = info["stages"]["tune"]["selection_to_tuning"]
    select_s = json.loads((out / info["stages"]["select"]["dir"] / "select.json").read_text())["select_seconds"]
    full = next(t for t in json.loads((out / "candidates.json").read_text())["trials"] if t["kind"] == "full")
    assert ratio["select_s"] == select_s > 0 and ratio["full_finetune_s"] == full["wall_s"] > 0
    assert ratio["ratio"] == pytest.approx(select_s / full["wall_s"])
    assert ratio["full_steps"] == full["steps"] == 8
    assert "selection / one full-pool fine-tune" in (out / "report.html").read_text()
