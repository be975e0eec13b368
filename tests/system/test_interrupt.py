"""A real signal (SIGINT as Ctrl-C sends, SIGTERM as `ray job stop` sends) to a real `ray-pipeline
run` at each stage: the run stops with 128 + the signal's number, run.json says interrupted (so a
plain rerun refuses the directory), nothing half done is taken as done, and --resume finishes with
the outputs of an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ray_pipeline.cli import main

from test_faults import _config, _outputs, _select_outputs, tune_job, vectors  # noqa: F401  (the SIGKILL tests' set-up)

pytestmark = pytest.mark.slow  # subprocess runs interrupted and resumed: not in the fast lane

CLI = [sys.executable, "-m", "ray_pipeline.cli"]


def _interrupted(out: Path, stage: str, sig: signal.Signals) -> dict:
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "interrupted" and info["interrupted"] == {"signal": sig.name, "stage": stage}
    assert stage not in info["stages"]  # the cut stage did not record itself
    assert not list(out.rglob("*.tmp-*")), "a half-written file was left under its final name's temp"
    return info


@pytest.mark.parametrize("sig,engine", [(signal.SIGINT, "local"), (signal.SIGTERM, "ray")])
def test_signal_during_embedding_stops_unfinished_and_resumes_to_identical_outputs(tmp_path, shared_data,
                                                                                    sig, engine):
    """SIGTERM with the Ray engine: ray.init's own SIGTERM handler (which exits at once) is the one
    this replaces."""
    cfg = _config(tmp_path, shared_data)
    args = ["run", str(cfg), "--no-progress", "--set", f"embed.engine={engine}"]
    assert main(args + ["--out", str(tmp_path / "clean")]) == 0

    cut = tmp_path / "cut"
    proc = subprocess.Popen(CLI + args + ["--out", str(cut)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not list(cut.glob("embeddings/*/shard-00002.parquet")):
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be interrupted"
        time.sleep(0.05)
    proc.send_signal(sig)
    err = proc.communicate()[1].decode()
    assert proc.returncode == 128 + sig, err[-2000:]
    assert f"interrupted by {sig.name} during the embed stage" in err.strip().splitlines()[-1]
    _interrupted(cut, "embed", sig)
    stage = next((cut / "embeddings").iterdir())
    done = len(list(stage.glob("shard-*.parquet")))
    assert 0 < done < 15 and not (stage / "manifest.json").exists()  # partial shards not taken as complete

    assert main(args + ["--out", str(cut)]) == 2  # unfinished: needs --resume
    assert main(args + ["--out", str(cut), "--resume"]) == 0
    info = json.loads((cut / "run.json").read_text())
    assert info["status"] == "complete"
    assert json.loads((stage / "manifest.json").read_text())["shards_computed"] <= 15 - done + 2  # in flight
    assert _outputs(cut) == _outputs(tmp_path / "clean")


@pytest.mark.parametrize("sig,point", [(signal.SIGINT, "select:kmeans"), (signal.SIGTERM, "select:written")])
def test_signal_during_select_stops_unfinished_and_resumes_to_identical_outputs(tmp_path, vectors, sig, point):  # noqa: F811
    args = ["run", "--embeddings", str(vectors), "--k", "12", "40", "--budgets", "30", "90", "--no-progress"]
    assert main(args + ["--out", str(tmp_path / "clean")]) == 0
    cut = tmp_path / "cut"
    proc = subprocess.run(CLI + args + ["--out", str(cut)], capture_output=True,
                          env={**os.environ, "RAY_PIPELINE_KILL_AT": point, "RAY_PIPELINE_KILL_WITH": sig.name})
    assert proc.returncode == 128 + sig, proc.stderr.decode()[-2000:]
    _interrupted(cut, "select", sig)
    assert not (cut / "selection.parquet").exists() and not list(cut.glob("select/*/select.json"))
    assert not (cut / "report.html").exists()
    assert main(args + ["--out", str(cut), "--resume"]) == 0
    info = json.loads((cut / "run.json").read_text())
    assert info["status"] == "complete" and "interrupted" not in info and (cut / "report.html").is_file()
    assert _select_outputs(cut) == _select_outputs(tmp_path / "clean")


def test_sigint_during_the_sweep_is_not_a_finished_sweep(tmp_path, shared_data, local_ray):
    """Ctrl-C while the first trial trains: Tune stops and saves its state, but no trial is
    reported stopped early, no target chosen, nothing exported, no report, run.json unfinished;
    --resume restores the Tune experiment and ends with the trials of an uninterrupted sweep."""
    from ray import tune

    cfg = tune_job(tmp_path, shared_data)
    assert main(["run", str(cfg), "--out", str(tmp_path / "clean"), "--no-progress"]) == 0

    cut = tmp_path / "cut"
    env = {**os.environ, "RAY_ADDRESS": local_ray.get_runtime_context().gcs_address}
    proc = subprocess.Popen(CLI + ["run", str(cfg), "--out", str(cut), "--no-progress"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 600
    while not list(cut.glob("tune/*/trials/*/best_model/config.json")):  # the first evaluation is in
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be interrupted"
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    err = proc.communicate()[1].decode()
    assert proc.returncode == 130, err[-3000:]
    _interrupted(cut, "tune", signal.SIGINT)
    for done in ("candidates.json", "report.html", "target"):
        assert not (cut / done).exists(), done
    assert not list(cut.glob("tune/*/candidates.json")) and not list(cut.glob("tune/*/target/model"))
    assert tune.Tuner.can_restore(str(next(cut.glob("tune/*/tune"))))  # Tune saved its state on the way out

    assert main(["run", str(cfg), "--out", str(cut), "--no-progress", "--resume"]) == 0

    def trials(out):
        got = json.loads((out / "candidates.json").read_text())
        return got["summary"]["target"]["name"], got["summary"]["stopped_early"], {
            t["name"]: (t["status"], t["steps"], t["validation_score"], [h["score"] for h in t["history"]])
            for t in got["trials"]}

    assert trials(cut) == trials(tmp_path / "clean")
    assert trials(cut)[1] == []  # early stopping is off: nothing may be reported stopped early
    assert json.loads((cut / "run.json").read_text())["status"] == "complete"

