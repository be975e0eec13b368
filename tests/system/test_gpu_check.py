"""scripts/gpu_check.sh --cpu-smoke: every part of the GPU check at tiny sizes on this CPU machine,
the GPU halves skipped with their reasons, one JSON file with every part's figures."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # seven processes that import torch, one of them pytest: about a minute

ROOT = Path(__file__).resolve().parents[2]
PARTS = {"kmeans", "kcenter", "embed", "train_lora", "train_qlora", "pytest_gpu"}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable}
    r = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--cpu-smoke", "--minilm", "random"],
                       env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads((out / "gpu_check.json").read_text()), r.stdout, out


def test_every_part_is_recorded_with_a_status(smoke):
    record, stdout, out = smoke
    assert record["check"] == "gpu_check" and record["mode"] == "cpu-smoke"
    assert set(record["parts"]) == PARTS
    assert record["machine"]["status"] == "ok" and record["machine"]["torch"]
    assert "skipped" in record["faiss_setup"]
    statuses = {name: part["status"] for name, part in record["parts"].items()}
    assert statuses == {"kmeans": "ok", "kcenter": "ok", "embed": "ok", "train_lora": "ok",
                        "train_qlora": "skipped", "pytest_gpu": "skipped"}, json.dumps(record["parts"], indent=1)
    assert all(isinstance(p["seconds"], (int, float)) for p in record["parts"].values())
    assert (out / "gpu_check.log").is_file()
    for name in PARTS:
        assert name in stdout  # the printed summary has a line per part


def test_cpu_halves_have_figures_and_gpu_halves_say_why_not(smoke):
    parts = smoke[0]["parts"]
    km = parts["kmeans"]
    assert km["cpu"]["seconds"] >= 0 and 0 < km["cpu"]["objective_mean_cos"] <= 1 and km["cpu"]["ari_vs_truth"] > 0.5
    assert "--cpu-smoke" in km["gpu"]["skipped"]
    for dtype in ("float32", "float64"):
        kc = parts["kcenter"][dtype]
        assert kc["cpu"]["greedy_s"] >= 0 and "--cpu-smoke" in kc["cuda"]["skipped"]
    emb = parts["embed"]
    assert "random weights" in emb["model"] and emb["cpu"]["dim"] == 384
    assert all(emb["cpu"][f"batch_{bs}"]["texts_per_s"] > 0 for bs in (4, 16))
    assert "--cpu-smoke" in emb["cuda"]["skipped"]
    lora = parts["train_lora"]
    assert lora["steps_per_s"] > 0 and lora["trainable_params"] < lora["all_params"]
    assert "random weights" in lora["model"]
    assert "CUDA" in parts["train_qlora"]["skipped"]


def test_the_gpu_tests_are_listed_by_name(smoke):
    tests = smoke[0]["parts"]["pytest_gpu"]["tests"]
    names = {t["test"] for t in tests}
    assert "tests.unit.test_kernels::test_greedy_cuda_matches_cpu" in names
    assert all(t["outcome"] == "skipped" for t in tests)  # no GPU here
