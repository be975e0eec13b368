"""Workers lost: a trial that fails mid-way is run again from its last checkpoint and ends as an
undisturbed twin would; on a real two-node cluster, the worker node's raylet killed (as a spot
reclaim does) during the embedding and during a trial, and the run finishes with the same
selection bytes and a complete sweep, ``run.json`` saying what was retried.

The in-process test fails a trial after its second report (``TrialLoop.inject_failure``); the
cluster test kills the raylet of the node whose work it saw running (Ray's state API), never
on a guess of time."""

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from ray_pipeline.cli import main
from ray_pipeline.finetune.heldout import read_parts, read_task_pool
from ray_pipeline.finetune.sweep import Candidate, run_sweep

from test_faults import tune_job
from test_job_submit import add_node, cluster_head, kill_node
from test_tune import INTENTS, cfg, files  # noqa: F401  (the fixtures)

pytestmark = pytest.mark.slow  # DeepSpeed trials under Tune, and two-node clusters: not in the fast lane


@pytest.mark.parametrize("engine", ["trainer", "loop"])
def test_a_trial_lost_mid_way_resumes_from_its_checkpoint_as_its_twin(cfg, local_ray, tmp_path,  # noqa: F811
                                                                      engine):
    """Two selection candidates on the same rows; one fails after its step-6 report. It is run
    again from that checkpoint (its next report is step 9, not 3) and ends with the twin's scores
    at every step: same weights, optimizer, schedule and data order. Its record says so."""
    c = cfg.with_fields({"finetune.train.engine": engine, "finetune.sweep.early_stopping": False,
                         "output_dir": str(tmp_path / "out")})
    pool = read_task_pool(c.data, c)
    labels = pool.labels.astype(str)
    rows = np.concatenate([np.flatnonzero(labels == i)[:10] for i in INTENTS])
    candidates = [Candidate("twin", "selection", rows, k=4, m=40),
                  Candidate("lost", "selection", rows, k=8, m=40, extra={"inject_failure": 6})]
    result = run_sweep(candidates, pool, read_parts(c), c, c.output_dir)
    trials = {t["name"]: t for t in result["trials"]}
    lost, twin = trials["lost"], trials["twin"]
    assert lost["status"] == twin["status"] == "capped" and lost["steps"] == 12
    assert lost["retries"] == 1 and "injected failure in trial lost after step 6" in lost["retry_errors"][0]
    assert lost["resumed_from_step"] == 6 and twin["retries"] == 0 and twin["resumed_from_step"] == 0
    assert [h["step"] for h in lost["history"]] == [3, 6, 9, 12] and lost["evaluations"] == 4
    assert [h["score"] for h in lost["history"]] == pytest.approx([h["score"] for h in twin["history"]], abs=1e-6)
    assert lost["validation_score"] == pytest.approx(twin["validation_score"], abs=1e-6)
    assert result["summary"]["retried"] == {"lost": {"retries": 1, "errors": lost["retry_errors"],
                                                     "resumed_from_step": 6}}
    assert result["summary"]["failed"] == [] and result["summary"]["stopped_early"] == []


# ----------------------------------------------------------------------------------------------
# a real two-node cluster, its worker node lost twice


def _job(tmp_path: Path, shared: Path) -> Path:
    """test_faults' small sweep (2 trials of 8 steps, one at a time) over every training row of
    its 4 intents (about 500), embedded by Ray Data in small shards: an embedding that lasts long
    enough to be cut."""
    import pyarrow.csv as pacsv
    import yaml

    cfg = tune_job(tmp_path, shared)
    t = pacsv.read_csv(shared / "banking77" / "train.csv").to_pandas()
    t[t.category.isin(INTENTS)].to_csv(tmp_path / "train.csv", index=False)
    raw = yaml.safe_load(cfg.read_text())
    # one sample at a time, 2 to a shard: about 250 shard tasks, some 10 s of work after the first
    raw["embed"] = {"engine": "ray", "actors": 1, "threads_per_actor": 1, "shard_size": 2, "batch_size": 1}
    cfg.write_text(yaml.safe_dump(raw))
    return cfg


def _selection_bytes(out: Path) -> dict:
    """selection.parquet, clusters.parquet and the pool's embedding shards (run.json names their stage)."""
    files = {f.name: f.read_bytes() for f in (out / "selection.parquet", out / "clusters.parquet")}
    stage = out / "embeddings" / json.loads((out / "run.json").read_text())["stages"]["embed"]["key"]
    return {**files, **{f.name: f.read_bytes() for f in sorted(stage.glob("shard-*.parquet"))}}


def _wait_for(what: str, found, proc: subprocess.Popen, timeout: float = 600):
    """Poll ``found()`` until it returns something true; the run must still be going."""
    deadline = time.time() + timeout
    while True:
        got = found()
        if got:
            return got
        assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before {what}"
        assert time.time() < deadline, f"no {what} within {timeout:.0f}s"
        time.sleep(0.2)


def _cut_and_wait(args: list, env: dict, log: Path, cut) -> tuple[int, str, float]:
    """The CLI ``args`` run with stderr to ``log``; ``cut(proc)`` waits for its moment and kills the
    node; then the run is waited for. Returns its exit status, stderr and the seconds from the cut
    to its end."""
    with open(log, "wb") as stderr:
        proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            cut(proc)
            t0 = time.monotonic()
            proc.wait(timeout=300)
            waited = time.monotonic() - t0
        finally:
            if proc.poll() is None:
                proc.kill()
    return proc.returncode, log.read_text(), waited


def _assert_gave_up(code: int, err: str, waited: float, what: str, why: str) -> None:
    """The run waited ray.wait_timeout_s (20 s) for a node with room, saying so, then exit 2 naming
    ``what`` waited and ``why``, with --resume as the way on and no traceback."""
    assert code == 2, err[-4000:]
    last = err.strip().splitlines()[-1]
    assert f"{what} waited 20s (ray.wait_timeout_s) for a node with room" in last, err[-4000:]
    assert why in last and "--resume" in last and "Traceback" not in err
    assert "wait for a node with room" in err  # said when the wait began, not only at the end
    assert waited >= 20


def _alive_on(node_id: str, class_part: str, dashboard: str) -> bool:
    """Whether Ray's state API shows an actor whose class names ``class_part`` alive on node
    ``node_id`` (Ray Data's actor class is ``MapWorker(MapBatches(ShardEmbedder))``)."""
    from ray.util.state import list_actors

    alive = list_actors(address=dashboard, filters=[("state", "=", "ALIVE"), ("node_id", "=", node_id)],
                        limit=1000, raise_on_missing_output=False)
    return any(class_part in (a.class_name or "") for a in alive)


def _checkpointed(out: Path) -> bool:
    """Whether Ray Train's snapshot of some trial lists a checkpoint. A checkpoint directory
    appears first, while the workers upload it; a retried run is handed only what the snapshot
    lists, written once the controller has registered the report."""
    for f in out.glob("tune/*/train/*/checkpoint_manager_snapshot.json"):
        try:
            if json.loads(f.read_text()).get("checkpoint_results"):
                return True
        except json.JSONDecodeError:  # being written
            continue
    return False


def _node_id(raylet: psutil.Process) -> str:
    return next(a.split("=", 1)[1] for a in raylet.cmdline() if a.startswith("--node_id="))


def test_worker_node_lost_mid_embedding_and_mid_trial_the_run_finishes_the_same(shared_data, tmp_path):
    """The head holds no CPU (as cluster.yaml's GPU work runs only on its spot workers), so all
    work runs on the worker node. Its raylet and everything under it is killed once shards are
    being embedded there, and a replacement node joins (what the autoscaler does for a reclaimed
    spot node); then again once a trial has reported a checkpoint there. The run exits 0 with the
    selection bytes of an undisturbed run (the embedding is byte-identical on either engine), every
    trial finished, and run.json naming the retries."""
    cfg = _job(tmp_path, shared_data)
    assert main(["select", str(cfg), "--engine", "local", "--out", str(tmp_path / "undisturbed"),
                 "--no-progress"]) == 0
    # the GCS gives a silent node up after 3 missed 1 s health checks, not Ray's default 5 x 3 s
    with cluster_head(num_cpus=0, env={"RAY_health_check_period_ms": "1000",
                                        "RAY_health_check_failure_threshold": "3"}) as cluster:
        first = add_node(cluster, num_cpus=2)
        out = tmp_path / "out"
        log = open(tmp_path / "run.log", "wb")
        proc = subprocess.Popen([sys.executable, "-m", "ray_pipeline.cli", "run", str(cfg), "--out", str(out),
                                 "--no-progress"], env={**cluster["env"], "RAY_ADDRESS": cluster["address"]},
                                stdout=log, stderr=subprocess.STDOUT)
        try:
            # shards written, the stage not done, the embedding actor alive on the worker node
            _wait_for("a shard embedded on the worker node", lambda: list(out.glob("embeddings/*/shard-00001.parquet"))
                      and _alive_on(_node_id(first), "ShardEmbedder", cluster["dashboard"]), proc)
            assert not list(out.glob("embeddings/*/manifest.json"))
            kill_node(first)
            second = add_node(cluster, num_cpus=2)
            # a trial's checkpoint registered (Ray Train's snapshot lists it: what a retry gets), its
            # worker still training on the new node
            _wait_for("a trial's checkpoint", lambda: _checkpointed(out)
                      and _alive_on(_node_id(second), "RayTrainWorker", cluster["dashboard"]), proc)
            assert not list(out.glob("tune/*/candidates.json"))
            kill_node(second)
            add_node(cluster, num_cpus=2)
            assert proc.wait(timeout=900) == 0, (tmp_path / "run.log").read_text()[-4000:]
        finally:
            if proc.poll() is None:
                proc.kill()
            log.close()
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "complete"
    retried = info["stages"]["embed"]["actor_plan"]["retried"]
    assert retried["actor_restarts"] >= 1 and retried["tasks_retried"] >= 1, retried
    tune = info["stages"]["tune"]
    assert tune["failed"] == [] and tune["stopped_early"] == []
    assert len(tune["retried"]) == 1, tune["retried"]  # the trial that trained when its node went
    (name, what), = tune["retried"].items()
    assert what["retries"] >= 1 and what["resumed_from_step"] > 0, what  # from its checkpoint
    trials = {t["name"]: t for t in json.loads((out / "candidates.json").read_text())["trials"]}
    assert len(trials) == 2 and all(t["status"] in ("capped", "converged") and t["steps"] == 8 for t in trials.values())
    assert [h["step"] for h in trials[name]["history"]] == [2, 4, 6, 8]
    assert _selection_bytes(out) == _selection_bytes(tmp_path / "undisturbed")


def test_a_lost_node_with_no_replacement_is_exit_2_after_the_wait_and_resume_finishes(shared_data, tmp_path):
    """The worker node lost mid-embedding and none joins (no autoscaler, or no capacity): Ray
    Data would wait for room for its restarting actor without end. The run waits
    ``ray.wait_timeout_s`` (20 s here), saying so, then exits 2 naming what waited and what to
    check; the shards embedded are kept, the run is unfinished, and once a node is back
    ``--resume`` finishes it with an undisturbed run's selection bytes."""
    cfg = _job(tmp_path, shared_data)
    assert main(["select", str(cfg), "--engine", "local", "--out", str(tmp_path / "undisturbed"),
                 "--no-progress"]) == 0
    args = [sys.executable, "-m", "ray_pipeline.cli", "select", str(cfg), "--out", str(tmp_path / "out"),
            "--no-progress", "--set", "ray.wait_timeout_s=20"]
    out = tmp_path / "out"
    with cluster_head(num_cpus=0, env={"RAY_health_check_period_ms": "1000",
                                        "RAY_health_check_failure_threshold": "3"}) as cluster:
        first = add_node(cluster, num_cpus=2)
        env = {**cluster["env"], "RAY_ADDRESS": cluster["address"]}
        def cut(proc):
            _wait_for("a shard embedded on the worker node", lambda: list(out.glob("embeddings/*/shard-00001.parquet"))
                      and _alive_on(_node_id(first), "ShardEmbedder", cluster["dashboard"]), proc)
            kill_node(first)

        _assert_gave_up(*_cut_and_wait(args, env, tmp_path / "run.err", cut), "the embedding actors", "restarting")
        stage = next((out / "embeddings").iterdir())
        assert list(stage.glob("shard-*.parquet")) and not (stage / "manifest.json").exists()
        assert json.loads((out / "run.json").read_text())["status"] == "running"  # unfinished: --resume continues it
        add_node(cluster, num_cpus=2)
        again = subprocess.run(args + ["--resume"], env=env, capture_output=True, timeout=600)
        assert again.returncode == 0, again.stderr.decode()[-4000:]
    assert json.loads((out / "run.json").read_text())["status"] == "complete"
    assert _selection_bytes(out) == _selection_bytes(tmp_path / "undisturbed")


def test_the_select_tasks_node_lost_with_no_replacement_is_exit_2_after_the_wait_and_resume_finishes(
        shared_data, tmp_path):
    """``select.engine: ray``: the only CPU node lost after the first K's k-means (the driver
    paused there by ``faults.point``, SIGSTOP, while the node is killed). The shard tasks to run
    again, and the pieces rebuilt from the lost node's objects, have no node: Ray keeps them
    pending without end. The run waits ``ray.wait_timeout_s`` (20 s), saying so, then exits 2
    naming the selection tasks; once a node is back ``--resume`` selects what the driver engine
    selects, byte for byte."""
    import yaml

    cfg = _job(tmp_path, shared_data)
    raw = yaml.safe_load(cfg.read_text())
    raw["embed"]["shard_size"] = 64  # about 8 shards: as many tasks per pass of the shard engine
    cfg.write_text(yaml.safe_dump(raw))
    assert main(["select", str(cfg), "--engine", "local", "--out", str(tmp_path / "undisturbed"),
                 "--no-progress"]) == 0
    out = tmp_path / "out"
    args = [sys.executable, "-m", "ray_pipeline.cli", "select", str(cfg), "--out", str(out), "--no-progress",
            "--set", "ray.wait_timeout_s=20", "--set", "select.engine=ray"]
    with cluster_head(num_cpus=0, env={"RAY_health_check_period_ms": "1000",
                                        "RAY_health_check_failure_threshold": "3"}) as cluster:
        first = add_node(cluster, num_cpus=2)
        env = {**cluster["env"], "RAY_ADDRESS": cluster["address"],
               "RAY_PIPELINE_KILL_AT": "select:kmeans", "RAY_PIPELINE_KILL_WITH": "SIGSTOP"}
        def cut(proc):
            driver = psutil.Process(proc.pid)
            _wait_for("the driver paused after k-means", lambda: driver.status() == psutil.STATUS_STOPPED, proc)
            kill_node(first)
            driver.resume()

        _assert_gave_up(*_cut_and_wait(args, env, tmp_path / "run.err", cut), "the selection tasks",
                        "waiting for a node, none running")
        assert json.loads((out / "run.json").read_text())["status"] == "running"  # unfinished: --resume continues it
        add_node(cluster, num_cpus=2)
        env = {k: v for k, v in env.items() if not k.startswith("RAY_PIPELINE_KILL")}
        again = subprocess.run(args + ["--resume"], env=env, capture_output=True, timeout=600)
        assert again.returncode == 0, again.stderr.decode()[-4000:]
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "complete"
    assert _selection_bytes(out) == _selection_bytes(tmp_path / "undisturbed")
