"""No silent hang: a request no node can hold stops the run with one line (exit 2) before the
stage asks Ray for it, and every wait on the cluster gives up after ``ray.wait_timeout_s``.

The two-node cluster is test_job_submit's (1 CPU per node, started and stopped by its pids): a
fine-tuning worker of 1.5 CPUs fits its 2 CPUs in total (the old check, against the totals,
passed it) but no node, and Ray would keep the trial pending for ever."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ray_pipeline.cli import main

from test_faults import tune_job
from test_job_submit import two_nodes  # noqa: F401  (the fixture)

CLI = [sys.executable, "-m", "ray_pipeline.cli"]


def test_an_unreachable_cluster_is_given_up_after_the_configured_wait(tmp_path, shared_data, capsys):
    with socket.socket() as s:  # a port bound and closed again: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = main(["embed", "--data", str(shared_data / "banking77" / "train.csv"), "--set", "data.limit=20",
                 "--engine", "ray", "--address", f"127.0.0.1:{port}", "--set", "ray.wait_timeout_s=1",
                 "--out", str(tmp_path / "out"), "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"ray-pipeline: error: cannot reach the Ray cluster at 127.0.0.1:{port} within 1s "
                              f"(ray.wait_timeout_s)"), err[-3:]


def _on_two_nodes(cluster, cfg: Path, out: Path, *sets: str) -> subprocess.CompletedProcess:
    env = {**cluster["env"], "RAY_ADDRESS": cluster["address"]}
    return subprocess.run(CLI + ["run", str(cfg), "--out", str(out), "--no-progress",
                                 "--set", "finetune.resources.cpus_per_worker=1.5", *sets],
                          env=env, capture_output=True, timeout=900)


@pytest.mark.slow
def test_a_worker_no_node_or_node_type_can_hold_is_refused_at_once(two_nodes, shared_data, tmp_path):  # noqa: F811
    types = tmp_path / "cluster.yaml"  # the autoscaler's node types: these two nodes, nothing bigger to add
    types.write_text(yaml.safe_dump({"head_node_type": "head", "available_node_types": {
        "head": {"resources": {"CPU": 1}, "node_config": {}},
        "worker": {"resources": {"CPU": 1}, "min_workers": 1, "max_workers": 1, "node_config": {}}}}))
    out = tmp_path / "out"
    proc = _on_two_nodes(two_nodes, tune_job(tmp_path, shared_data), out, "--set", f"ray.autoscaler_config={types}")
    err = proc.stderr.decode().strip().splitlines()
    assert proc.returncode == 2, "\n".join(err[-20:])
    assert err[-1].startswith("ray-pipeline: error: a fine-tuning worker (1 of 1 per trial) asks for {CPU: 1.5} but "
                              "no node can hold it: the nodes have {CPU: 1}, nor any node type the autoscaler can "
                              "add (head {CPU: 1}, worker {CPU: 1}); lower finetune.resources.cpus_per_worker"), err[-1]
    assert not list(out.glob("tune/*/trials/*"))  # refused before a trial was asked for


@pytest.mark.slow
def test_a_worker_no_node_holds_yet_is_waited_for_then_given_up(two_nodes, shared_data, tmp_path):  # noqa: F811
    """No node types known (no autoscaler config): the autoscaler, if any, is asked for a node,
    and the run waits for it, saying so, for ray.wait_timeout_s; then one line, exit 2."""
    proc = _on_two_nodes(two_nodes, tune_job(tmp_path, shared_data), tmp_path / "out",
                         "--set", "ray.wait_timeout_s=3")
    err = proc.stderr.decode().strip().splitlines()
    assert proc.returncode == 2, "\n".join(err[-20:])
    assert err[-1].startswith("ray-pipeline: error: no node that can hold a fine-tuning worker (1 of 1 per trial) "
                              "{CPU: 1.5} joined within 3s (ray.wait_timeout_s): check `ray status`"), err[-1]
    log = (tmp_path / "out" / "logs" / "run.log").read_text()
    assert "asking the autoscaler for a node and waiting up to 3s" in log
