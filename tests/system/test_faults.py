"""Faults injected into real runs: the driver killed mid-stage, then --resume; outputs must be
identical to an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ray_pipeline.cli import main

pytestmark = pytest.mark.slow  # subprocess runs killed and resumed: not in the fast lane


def _config(tmp_path: Path, shared: Path) -> Path:
    cfg = tmp_path / "job.yaml"
    cfg.write_text(f"data:\n  path: {shared / 'banking77' / 'train.csv'}\n  label_column: category\n"
                   f"  limit: 1500\nembed:\n  engine: local\n  shard_size: 100\n  threads_per_actor: 1\n"
                   f"cluster:\n  k: [12]\nselect:\n  budgets: [30, 60]\n")
    return cfg


def _outputs(out: Path) -> dict:
    files = {f.name: f.read_bytes() for f in (out / "selection.parquet", out / "clusters.parquet")}
    stage = next((out / "embeddings").iterdir())
    files.update({f.name: f.read_bytes() for f in sorted(stage.glob("shard-*.parquet"))})
    return files


def test_driver_killed_during_embedding_resumes_to_identical_outputs(tmp_path, shared_data):
    cfg = _config(tmp_path, shared_data)
    assert main(["run", str(cfg), "--out", str(tmp_path / "clean"), "--no-progress"]) == 0

    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "ray_pipeline.cli", "run", str(cfg), "--out", str(killed),
                             "--no-progress"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list(killed.glob("embeddings/*/shard-00002.parquet")):
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.05)
    proc.kill()  # SIGKILL: no cleanup runs
    proc.wait()
    stage = next((killed / "embeddings").iterdir())
    done = len(list(stage.glob("shard-*.parquet")))
    assert 0 < done < 15 and not (stage / "manifest.json").exists()
    assert json.loads((killed / "run.json").read_text())["status"] == "running"

    assert main(["run", str(cfg), "--out", str(killed), "--no-progress"]) == 2  # unfinished: needs --resume
    assert main(["run", str(cfg), "--out", str(killed), "--no-progress", "--resume"]) == 0
    info = json.loads((killed / "run.json").read_text())
    assert info["status"] == "complete"
    assert info["stages"]["embed"]["dir"].endswith(stage.name)
    manifest = json.loads((stage / "manifest.json").read_text())
    assert manifest["shards_computed"] == 15 - done  # finished shards were not redone
    assert _outputs(killed) == _outputs(tmp_path / "clean")


@pytest.fixture(scope="module")
def vectors(tmp_path_factory):
    from conftest import unit_blobs

    p = tmp_path_factory.mktemp("vec") / "x.npy"
    np.save(p, unit_blobs(3000, 16, 12, 2))
    return p


def _select_outputs(out: Path) -> dict:
    files = {name: (out / name).read_bytes() for name in ("selection.parquet", "clusters.parquet")}
    stage = json.loads((out / "run.json").read_text())["stages"]["select"]
    files["select"] = {k: v for k, v in stage.items()
                       if k not in ("seconds", "kernel_seconds", "select_seconds", "reused", "dir")}
    return files


@pytest.mark.parametrize("point", ["select:kmeans", "select:written", "report"])
def test_driver_killed_during_select_or_report_resumes_to_identical_outputs(tmp_path, vectors, point):
    args = ["run", "--embeddings", str(vectors), "--k", "12", "40", "--budgets", "30", "90", "--no-progress"]
    assert main(args + ["--out", str(tmp_path / "clean")]) == 0
    killed = tmp_path / "killed"
    proc = subprocess.run([sys.executable, "-m", "ray_pipeline.cli", *args, "--out", str(killed)],
                          env={**os.environ, "RAY_PIPELINE_KILL_AT": point}, capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert json.loads((killed / "run.json").read_text())["status"] == "running"
    assert not list(killed.rglob("*.tmp-*")), "a half-written file was left under its final name's temp"
    if point != "report":
        assert not (killed / "selection.parquet").exists()  # published only when the stage completes
        assert not list(killed.glob("select/*/select.json"))
    assert main(args + ["--out", str(killed), "--resume"]) == 0
    info = json.loads((killed / "run.json").read_text())
    assert info["status"] == "complete" and (killed / "report.html").is_file()
    assert info["stages"]["select"]["reused"] is (point == "report")
    assert _select_outputs(killed) == _select_outputs(tmp_path / "clean")


def test_driver_killed_during_tune_resumes_to_the_same_sweep(tmp_path, shared_data, local_ray):
    """The sweep's driver is SIGKILLed while its first trial trains (the trial's actors die with it;
    the Ray cluster stays up); --resume restores the Tune experiment and finishes with the same
    trials, steps and scores as an uninterrupted sweep."""
    cfg = tune_job(tmp_path, shared_data)
    assert main(["run", str(cfg), "--out", str(tmp_path / "clean"), "--no-progress"]) == 0

    killed = tmp_path / "killed"
    env = {**os.environ, "RAY_ADDRESS": local_ray.get_runtime_context().gcs_address}
    proc = subprocess.Popen([sys.executable, "-m", "ray_pipeline.cli", "run", str(cfg), "--out", str(killed),
                             "--no-progress"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not list(killed.glob("tune/*/trials/*/best_model/config.json")):  # the first evaluation is in
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.1)
    proc.kill()
    proc.wait()
    assert not list(killed.glob("tune/*/candidates.json"))
    assert main(["run", str(cfg), "--out", str(killed), "--no-progress", "--resume"]) == 0

    def trials(out):
        got = json.loads((out / "candidates.json").read_text())
        return got["summary"]["target"]["name"], {
            t["name"]: (t["status"], t["steps"], t["validation_score"], [h["score"] for h in t["history"]])
            for t in got["trials"]}

    assert trials(killed) == trials(tmp_path / "clean")
    assert (killed / "target" / "model" / "config.json").is_file()


def tune_job(tmp_path: Path, shared_data: Path) -> Path:
    """A small sweep's job: 4 intents, 2 trials (k-center and random at 16), 8 steps each, one at a time."""
    import pyarrow.csv as pacsv

    intents = ["activate_my_card", "card_arrival", "exchange_rate", "lost_or_stolen_card"]
    for split, per in (("train", 40), ("test", 15)):
        t = pacsv.read_csv(shared_data / "banking77" / f"{split}.csv").to_pandas()
        t[t.category.isin(intents)].groupby("category").head(per).to_csv(tmp_path / f"{split}.csv", index=False)
    cfg = tmp_path / "job.yaml"
    cfg.write_text(f"data:\n  path: {tmp_path / 'train.csv'}\n  label_column: category\n"
                   f"embed:\n  engine: local\n  threads_per_actor: 1\ncluster:\n  k: [4]\n"
                   f"select:\n  budgets: [16]\n  random_seeds: [0]\n  method: [kcenter]\n"
                   f"finetune:\n  heldout:\n    eval_path: {tmp_path / 'test.csv'}\n"
                   f"  train:\n    max_steps: 8\n    eval_every: 2\n    batch_size: 8\n    max_length: 32\n"
                   f"    lr: 0.0003\n  resources:\n    threads_per_worker: 1\n"
                   f"  sweep:\n    max_concurrent_trials: 1\n    include_full: false\n    early_stopping: false\n")
    return cfg
