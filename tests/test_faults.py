"""Faults injected into real runs: the driver killed mid-stage, then --resume; outputs must be
identical to an uninterrupted run."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ray_pipeline.cli import main


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
