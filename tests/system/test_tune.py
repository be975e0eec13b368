"""Fine-tuning with Ray Train + DeepSpeed under Ray Tune, on CPU with the real MiniLM weights.

Four banking77 intents, 40 training samples each: small enough for CI, real enough that a
balanced subset learns and a one-intent subset clearly does not.
"""

import json
from pathlib import Path

import numpy as np
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from ray_pipeline.config import Config
from ray_pipeline.io.pool import read_pool
from ray_pipeline.finetune.infer import predict
from ray_pipeline.finetune.metrics import macro_f1
from ray_pipeline.finetune.heldout import read_parts, read_task_pool
from ray_pipeline.finetune.sweep import Candidate, run_sweep

pytestmark = pytest.mark.slow  # DeepSpeed training under Ray Train and Tune: not in the fast lane

INTENTS = ["activate_my_card", "card_arrival", "exchange_rate", "lost_or_stolen_card"]


@pytest.fixture(scope="module")
def files(shared_data, tmp_path_factory):
    d = tmp_path_factory.mktemp("bank4")
    for split, per in (("train", 40), ("test", 15)):
        t = pacsv.read_csv(shared_data / "banking77" / f"{split}.csv").to_pandas()
        t = t[t.category.isin(INTENTS)].groupby("category").head(per).reset_index(drop=True)
        t.to_csv(d / f"{split}.csv", index=False)
    return d


@pytest.fixture(scope="module")
def cfg(files, tmp_path_factory):
    return Config.from_dict({
        "data": {"path": str(files / "train.csv"), "label_column": "category"},
        "finetune": {"heldout": {"eval_path": str(files / "test.csv")},
                     "train": {"lr": 3e-4, "batch_size": 16, "max_steps": 12, "eval_every": 3, "max_length": 32},
                     "sweep": {"grace_period": 2, "max_concurrent_trials": 1},
                     "resources": {"threads_per_worker": 1}},
        "output_dir": str(tmp_path_factory.mktemp("run")),
    })


def test_macro_f1_by_hand():
    # class 0: tp 1, fp 1, fn 0 -> 2/3; class 1: tp 1, fp 0, fn 1 -> 2/3; class 2 absent: skipped
    assert macro_f1(np.array([0, 1, 1]), np.array([0, 0, 1]), 3) == pytest.approx(2 / 3)


def test_training_function_alone_loss_goes_down(cfg, files, local_ray, tmp_path):
    """One worker, DeepSpeed on gloo, training on a fixed batch that is also the held-out set."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from ray_pipeline.config import FinetuneConfig, ResourceSettings, TrainSettings
    from ray_pipeline.finetune.train import TrialLoop, train_loop_per_worker
    from ray_pipeline.io.models import resolve

    pool = read_pool(cfg.data)
    labels = sorted(set(pool.labels))
    y = np.array([labels.index(v) for v in pool.labels])
    fixed = np.arange(0, 160, 10)  # 16 samples, 4 per intent
    batch = {"texts": pool.texts[fixed].tolist(), "labels": y[fixed]}
    ft = FinetuneConfig(train=TrainSettings(lr=3e-4, batch_size=16, eval_batch_size=16, max_steps=9, eval_every=3,
                                            patience=5, max_length=32, zero_stage=1, precision="fp32"),
                        resources=ResourceSettings(threads_per_worker=1))
    loop = TrialLoop(finetune=ft, seed=0, use_gpu=False, steps=9, model_path=resolve("minilm"), label_names=labels,
                     train=batch, eval=batch, best_model_dir=str(tmp_path / "best"))
    result = TorchTrainer(train_loop_per_worker, train_loop_config={"loop": loop},
                          scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
                          torch_config=TorchConfig(backend="gloo"),
                          run_config=ray.train.RunConfig(name="alone", storage_path=str(tmp_path / "store"))).fit()
    history = result.metrics_dataframe
    assert list(history["step"]) == [3, 6, 9]
    assert history["eval_loss"].iloc[-1] < history["eval_loss"].iloc[0] * 0.7
    assert (tmp_path / "best" / "config.json").is_file()


def test_sweep_stops_the_worse_never_a_baseline_survives_a_failure_and_judges_on_test(cfg, files, local_ray,
                                                                                       tmp_path):
    pool = read_task_pool(cfg.data, cfg)
    labels = pool.labels.astype(str)
    balanced = np.concatenate([np.flatnonzero(labels == c)[:10] for c in INTENTS])
    one_intent = np.flatnonzero(labels == INTENTS[0])[:40]
    candidates = [
        Candidate("k4_m40", "selection", balanced, k=4, m=40),
        Candidate("k2_m40", "selection", one_intent, k=2, m=40),  # clearly worse: one intent only
        Candidate("k8_m40", "selection", balanced, k=8, m=40, extra={"inject_failure": True}),
        Candidate("random_m40_s0", "random", np.arange(0, 160, 4), m=40, seed=0),
        # a baseline as bad as k2_m40: ASHA would cut it at the same rung, but a yardstick runs its course
        Candidate("random_m40_s1", "random", one_intent, m=40, seed=1),
    ]
    out = cfg.output_dir
    result = run_sweep(candidates, pool, read_parts(cfg), cfg, out)
    trials = {t["name"]: t for t in result["trials"]}
    assert trials["k4_m40"]["status"] in ("capped", "converged") and trials["k4_m40"]["steps"] == 12
    assert trials["k2_m40"]["status"] == "stopped_early"  # ASHA cut it at its first rung
    assert trials["k2_m40"]["steps"] < 12
    assert trials["k2_m40"]["validation_score"] < trials["k4_m40"]["validation_score"]
    assert trials["random_m40_s1"]["status"] != "stopped_early" and trials["random_m40_s1"]["steps"] > \
        trials["k2_m40"]["steps"]
    assert all(t["status"] != "stopped_early" for t in trials.values() if t["kind"] != "selection")
    assert trials["k8_m40"]["status"] == "failed" and "injected failure" in trials["k8_m40"]["error"]
    # run again finetune.sweep.max_retries (2) times, failing each time; no other trial retried
    assert trials["k8_m40"]["retries"] == 2 and all("injected failure" in e for e in trials["k8_m40"]["retry_errors"])
    assert [n for n, t in trials.items() if t["retries"]] == ["k8_m40"]
    assert trials["k4_m40"]["samples_seen"] == 12 * 16 and trials["k4_m40"]["epochs"] == pytest.approx(12 * 16 / 40)
    s = result["summary"]
    assert s["target"]["name"] == "k4_m40" and s["failed"] == ["k8_m40"]
    assert s["baselines"]["random"]["40"]["n"] == 2
    # every finished trial scored once on the test part; the verdict compares on it
    assert all(0 <= trials[n]["test_score"] <= 1 for n in ("k4_m40", "k2_m40", "random_m40_s0", "random_m40_s1"))
    assert s["target"]["test_score"] == trials["k4_m40"]["test_score"]
    assert s["verdict"]["vs_random"]["seeds"] == 2 and s["verdict"]["lines"][0].startswith("target k4_m40")
    assert s["split"]["validation"]["rows"] == 30 and s["split"]["test"]["rows"] == 30
    on_disk = json.loads((Path(out) / "candidates.json").read_text())
    assert on_disk["summary"]["target"]["name"] == "k4_m40"
    # the target model loads and classifies new samples into the pool's intents
    model = str(Path(out) / s["target"]["model"])  # relative to the run directory
    preds = predict(model, ["I still have not received my new card", "what's the euro rate?"])
    assert {p["label"] for p in preds} <= set(INTENTS)
    assert all(0 < p["probability"] <= 1 for p in preds)
    assert pq.read_table(Path(out) / "target" / "ids.parquet").num_rows == 40
    # and through the CLI: one JSON line per sample with its id and the predicted intent
    from ray_pipeline.cli import main

    rc = main(["predict", "--model", model, "--input", str(files / "test.csv"),
               "--output", str(tmp_path / "pred.jsonl")])
    lines = [json.loads(v) for v in (tmp_path / "pred.jsonl").read_text().splitlines()]
    assert rc == 0 and len(lines) == 60 and lines[0]["id"] == "row-0" and lines[0]["label"] in INTENTS


def test_the_test_part_cannot_change_the_choice(cfg, files, local_ray, tmp_path):
    """Two sweeps that differ only in the test part's labels (permuted) choose the same target with
    the same validation scores: only the reported test scores move."""
    import pandas as pd

    test = pd.read_csv(files / "test.csv")
    test.to_csv(tmp_path / "test_a.csv", index=False)
    test.assign(category=np.random.default_rng(0).permutation(test.category.values)).to_csv(tmp_path / "test_b.csv",
                                                                                            index=False)
    pool = read_task_pool(cfg.data, cfg)
    labels = pool.labels.astype(str)
    candidates = [Candidate("k4_m40", "selection", np.concatenate([np.flatnonzero(labels == c)[:10] for c in INTENTS]),
                            k=4, m=40),
                  Candidate("k2_m40", "selection", np.flatnonzero(labels == INTENTS[1])[:40], k=2, m=40)]
    runs = []
    for name in ("a", "b"):
        c = cfg.with_fields({"finetune.heldout.test_path": str(tmp_path / f"test_{name}.csv"),
                             "finetune.train.max_steps": 6, "finetune.sweep.early_stopping": False,
                             "output_dir": str(tmp_path / name)})
        runs.append(run_sweep(candidates, pool, read_parts(c), c, c.output_dir))
    a, b = ({t["name"]: t for t in r["trials"]} for r in runs)
    assert runs[0]["summary"]["target"]["name"] == runs[1]["summary"]["target"]["name"]
    assert {n: t["validation_score"] for n, t in a.items()} == {n: t["validation_score"] for n, t in b.items()}
    assert [h["score"] for h in a["k4_m40"]["history"]] == [h["score"] for h in b["k4_m40"]["history"]]
    assert a["k4_m40"]["test_score"] != b["k4_m40"]["test_score"]  # the permutation did reach the test part


def test_deepspeed_defaults_zero2_bf16_on_gpu_zero0_fp32_on_cpu():
    from ray_pipeline.config import FinetuneConfig, TrainSettings
    from ray_pipeline.finetune.train import deepspeed_config

    auto = FinetuneConfig(train=TrainSettings(batch_size=8))
    gpu, cpu = deepspeed_config(auto, on_gpu=True), deepspeed_config(auto, on_gpu=False)
    assert gpu["bf16"]["enabled"] and gpu["zero_optimization"]["stage"] == 2
    assert not cpu["bf16"]["enabled"] and not cpu["fp16"]["enabled"] and cpu["zero_optimization"]["stage"] == 0
    assert deepspeed_config(FinetuneConfig(train=TrainSettings(zero_stage=1)), on_gpu=True)["zero_optimization"]["stage"] == 1
    assert cpu["train_micro_batch_size_per_gpu"] == 8


def test_release_placement_groups_removes_what_a_trial_left_behind(local_ray, tmp_path):
    """Ray Train V2 in a Tune trial can leave the trial's worker placement group behind; with it
    still holding its CPU, the next trial's workers never start. The sweep removes a trial's
    recorded placement groups that are still there when it ends, and leaves removed ones alone."""
    from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group

    from ray_pipeline.finetune.sweep import release_placement_groups

    left, gone = placement_group([{"CPU": 1}]), placement_group([{"CPU": 1}])
    local_ray.get([left.ready(), gone.ready()])
    remove_placement_group(gone)
    record = tmp_path / "placement_groups.txt"
    record.write_text(f"{left.id.hex()}\n{gone.id.hex()}\n{left.id.hex()}\n")  # a retry records twice
    assert release_placement_groups(record, grace_s=0.5) == [left.id.hex()]
    assert placement_group_table(left)["state"] == "REMOVED" and not record.exists()
    assert release_placement_groups(record) == []  # nothing recorded: nothing to do
