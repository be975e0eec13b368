"""What a user reads: the run's own lines and one bar per stage on the console, Ray's and the
libraries' output in ``<out>/logs/run.log``, everything on the console with ``--verbose``.

Captured at the file-descriptor level (``capfd``): Ray writes from other processes and from C++.
"""

import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import unit_blobs
from ray_pipeline.cli import main

ROOT = Path(__file__).resolve().parents[2]
FIRST_LINE = " (Ray, its workers, Tune and the libraries write there; --verbose shows them here)"
# What Ray, Ray Data and transformers print by themselves on a run with the Ray engine.
RAY_NOISE = ("Started a local Ray instance", "Token authentication", "Starting execution of Dataset",
             "Execution plan of Dataset", "Running Dataset", "Progress will be logged", "Loading weights", " pid=")


def _select(shared_data, out, *extra):
    return ["select", "--data", str(shared_data / "banking77" / "train.csv"), "--text-column", "text",
            "--label-column", "category", "--set", "data.limit=60", "--engine", "ray", "--k", "3", "--budgets", "6",
            "--out", str(out), *extra]


def test_the_run_says_where_the_log_is_once_it_started_and_verbose_adds_our_debug_lines(tmp_path, capfd):
    np.save(tmp_path / "x.npy", unit_blobs(600, 8, 4, 0))
    out = tmp_path / "run"
    args = ["run", "--embeddings", str(tmp_path / "x.npy"), "--k", "4", "--budgets", "20", "--out", str(out),
            "--no-progress"]
    assert main(args) == 0
    cap = capfd.readouterr()
    lines = cap.err.splitlines()
    where = f"log file: {out / 'logs' / 'run.log'}{FIRST_LINE}"
    said = [i for i, line in enumerate(lines) if line.endswith(where)]
    select = [i for i, line in enumerate(lines) if line.endswith(" stage select: start")]
    assert len(said) == 1 and select and said[0] < select[0]  # said once the run started, before its stages
    assert "INFO" not in cap.err and "DEBUG" not in cap.err  # brief lines: the time and the message
    assert cap.out.strip() == f"report: {out / 'report.html'}"
    log = (out / "logs" / "run.log").read_text()
    assert "INFO ray_pipeline.pipeline: stage select: start" in log
    assert "DEBUG ray_pipeline.runtime.devices: devices:" in log  # our detail: in the file, not on the console
    assert main(args + ["--verbose"]) == 0  # the same run again, reused: the log is appended to
    assert "DEBUG ray_pipeline.runtime.devices: devices:" in capfd.readouterr().err
    assert (out / "logs" / "run.log").read_text().count("log file:") == 2


@pytest.mark.slow  # Ray Data actors load MiniLM twice
def test_a_ray_data_embedding_keeps_ray_off_the_console_unless_verbose(tmp_path, shared_data, local_ray, capfd):
    assert main(_select(shared_data, tmp_path / "quiet")) == 0
    err = capfd.readouterr().err
    assert sum(line.endswith(FIRST_LINE) for line in err.splitlines()) == 1
    assert " stage embed: start" in err and " Ray Data wrote 1 shards" in err
    assert "embed shards: 100%" in err  # our bar over the shards, in place of Ray Data's
    for noise in RAY_NOISE:
        assert noise not in err, noise
    log = (tmp_path / "quiet" / "logs" / "run.log").read_text()
    assert "INFO ray.data._internal.execution.streaming_executor: Starting execution of Dataset" in log
    assert "INFO ray_pipeline.embed.stage: Ray Data wrote 1 shards" in log

    assert main(_select(shared_data, tmp_path / "verbose", "--verbose")) == 0
    err = capfd.readouterr().err
    assert "Starting execution of Dataset" in err and "DEBUG ray_pipeline.select.engine" in err
    assert "embed shards" not in err  # Ray Data's own progress instead


@pytest.mark.slow  # a Ray of its own, in a process of its own (a second Ray in this one would break Ray Train)
def test_a_fresh_ray_prints_its_workers_lines_to_the_log_not_the_console(tmp_path, shared_data, capfd):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "ray_pipeline.cli", *_select(shared_data, out)], env=env,
                          timeout=900)
    cap = capfd.readouterr()
    assert done.returncode == 0, cap.err
    assert " started a local Ray" in cap.err and " stage select done" in cap.err
    for noise in RAY_NOISE:
        assert noise not in cap.err + cap.out, noise
    log = (out / "logs" / "run.log").read_text()
    assert "INFO ray._private.worker: Started a local Ray instance" in log
    assert "INFO ray_workers: (MapWorker(MapBatches(ShardEmbedder)) pid=" in log  # what the actor printed
    assert "Loading weights" in log


def test_the_sweeps_bars_count_trials_and_steps_and_a_line_names_each_end(tmp_path, local_ray, capfd, caplog):
    from ray import tune

    from ray_pipeline.finetune.progress import SweepProgress
    from ray_pipeline.finetune.task import task_for

    def trial(config):
        cand = config["candidate"]
        for step in range(1, cand["steps"] + 1):
            if cand["name"] == "broken" and step == 2:
                raise ValueError("a trial that breaks")
            tune.report({"step": step, "score": -2.0 / step, "best_score": -2.0 / step})

    tuner = tune.Tuner(
        tune.with_resources(trial, {"cpu": 0.5}),
        param_space={"candidate": tune.grid_search([{"name": "good", "steps": 3}, {"name": "broken", "steps": 3}])},
        tune_config=tune.TuneConfig(max_concurrent_trials=1),
        run_config=tune.RunConfig(storage_path=str(tmp_path), verbose=0, failure_config=tune.FailureConfig(max_failures=0),
                                  callbacks=[SweepProgress(True, task_for("instruction"))]))
    with caplog.at_level(logging.DEBUG, logger="ray_pipeline.finetune.progress"):
        tuner.fit()
    err = capfd.readouterr().err
    assert "tune trials: 100%" in err and "| 2/2 [" in err
    # the running trial's bar over the steps of its cap (cleared when the trial ends: its last frame
    # may show an earlier step)
    assert "\r  good:   0%|          | 0/3 [" in err
    said = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert ("DEBUG", "trial good: step 2, validation loss 1.0000") in said  # the loss: minus the score
    assert ("INFO", "trial good ended at step 3 (best validation loss 0.6667)") in said
    assert ("WARNING", "trial broken failed at step 1 (best validation loss 2.0000)") in said
