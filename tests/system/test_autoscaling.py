"""The autoscaler, on this machine: Ray's fake multi-node provider (what
``ray.cluster_utils.AutoscalingCluster`` starts) run from cluster.yaml's own node types, their
resources as cluster.yaml declares them (the GPU as a logical resource: no CUDA is touched). A job
that embeds on the GPU node type starts with no worker; the autoscaler adds GPU nodes while the
work waits for them and removes them once idle; the node counts come from Ray's state API.

What it proves: the pipeline plans for the GPUs the autoscaler can add (not the none that are up
at the start), asks for them, waits for them, and its actors are scheduled on the GPU node type
(``embed.actor_plan``: 1 GPU each). What it does not: CUDA work (torch here is CPU-only; an actor
holding a logical GPU embeds on the CPU), and the sweep on GPU workers (Train's NCCL backend needs
real GPUs), which the `-m gpu` lane would cover on a GPU cluster.

``AutoscalingCluster.start()`` itself is not used: it runs ``ray stop --force``, which would stop
every Ray on the machine (other users' too), and Ray 2.60's wheel lacks the ``example.yaml`` it
builds its config from. The cluster below is started and stopped by its own port and temp dir."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from test_job_submit import RAY, _free_port, _pids_of_cluster, stop_cluster

pytestmark = pytest.mark.slow  # a head, an autoscaler and nodes it adds and removes

CLUSTER_YAML = Path(__file__).resolve().parents[2] / "cluster.yaml"
GPU_TYPE = "ray.worker.gpu"
MAX_GPU_WORKERS = 2  # cluster.yaml allows 8; this machine has 2 cores


def _fake_config(port: int) -> dict:
    """cluster.yaml's node types and scaling fields on the fake provider; only max_workers is
    lowered (to what this machine holds) and idle_timeout_minutes shortened."""
    real = yaml.safe_load(CLUSTER_YAML.read_text())
    types = {}
    for name, t in real["available_node_types"].items():
        types[name] = {"resources": dict(t["resources"]), "node_config": {},
                       "min_workers": t.get("min_workers", 0),
                       "max_workers": 0 if name == real["head_node_type"] else min(t["max_workers"], MAX_GPU_WORKERS)}
    return {"cluster_name": "rp-autoscaling-test", "max_workers": MAX_GPU_WORKERS,
            "upscaling_speed": real["upscaling_speed"], "idle_timeout_minutes": 0.1,
            "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                         "disable_launch_config_check": True, "gcs_address": f"127.0.0.1:{port}"},
            "available_node_types": types, "head_node_type": real["head_node_type"], "auth": {}, "docker": {},
            "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
            "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
            "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
            "rsync_exclude": [], "rsync_filter": []}


@pytest.fixture
def autoscaling_cluster(tmp_path):
    temp = Path("/tmp") / f"rpa-{os.getpid()}"  # short: Ray's socket paths must stay under 108 chars
    port, dash = _free_port(), _free_port()
    config = _fake_config(port)
    path = tmp_path / "autoscaler.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "RAY_FAKE_CLUSTER": "1",
           "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
    marks = (f"127.0.0.1:{port}", str(temp))
    before = _pids_of_cluster(marks)
    head = config["available_node_types"][config["head_node_type"]]["resources"]
    ports = [f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
             f"--runtime-env-agent-port={_free_port()}", f"--metrics-export-port={_free_port()}"]
    subprocess.run([RAY, "start", "--head", f"--port={port}", f"--num-cpus={int(head.get('CPU', 0))}",
                    f"--num-gpus={int(head.get('GPU', 0))}", f"--autoscaling-config={path}",
                    "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
                    f"--temp-dir={temp}", "--memory", str(2 * 2 ** 30), "--object-store-memory", str(300 * 2 ** 20),
                    *ports], env=env, check=True, capture_output=True, timeout=180)
    try:
        yield {"address": f"127.0.0.1:{port}", "dashboard": f"http://127.0.0.1:{dash}", "env": env,
               "config": path}
    finally:
        stop_cluster(marks, before, temp)


def _gpu_nodes(dashboard: str) -> int:
    """Alive nodes holding a GPU, from Ray's state API."""
    from ray.util.state import list_nodes

    return sum(1 for n in list_nodes(address=dashboard, raise_on_missing_output=False)
               if n.state == "ALIVE" and n.resources_total.get("GPU", 0) >= 1)


def test_gpu_workers_are_added_for_the_embedding_and_removed_when_idle(autoscaling_cluster, shared_data, tmp_path):
    c = autoscaling_cluster
    os.environ["RAY_AUTH_MODE"] = "disabled"  # this process's state API client talks to that cluster
    deadline = time.time() + 120
    while True:  # the state API answers once the dashboard is up
        try:
            assert _gpu_nodes(c["dashboard"]) == 0  # no worker at the start (min_workers 0)
            break
        except Exception:  # noqa: BLE001  (the dashboard not up yet: ConnectionError, ServerUnavailable)
            assert time.time() < deadline, "the state API did not answer"
            time.sleep(1)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "ray_pipeline.cli", "select", "--data", str(shared_data / "banking77" / "train.csv"),
           "--label-column", "category", "--set", "data.limit=200", "--engine", "ray",
           "--set", "embed.shard_size=20", "--set", "embed.threads_per_actor=1", "--k", "4", "--budgets", "20",
           "--set", f"ray.autoscaler_config={c['config']}", "--set", "ray.wait_timeout_s=300",
           "--out", str(out), "--no-progress"]
    job = subprocess.Popen(cmd, env={**c["env"], "RAY_ADDRESS": c["address"]}, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE)
    seen = 0
    while job.poll() is None:
        seen = max(seen, _gpu_nodes(c["dashboard"]))
        time.sleep(1)
    err = job.stderr.read().decode()
    assert job.returncode == 0, err[-3000:]
    assert seen >= 1, "the autoscaler added no GPU node while the embedding waited"
    plan = json.loads((out / "run.json").read_text())["stages"]["embed"]["actor_plan"]
    assert plan["num_gpus"] == 1 and plan["actors"] == MAX_GPU_WORKERS  # planned for the GPUs it can add
    log = (out / "logs" / "run.log").read_text()
    assert f"asking the autoscaler for a node of type {GPU_TYPE}" in log

    deadline = time.time() + 300
    while _gpu_nodes(c["dashboard"]):  # idle_timeout_minutes: 0.1
        assert time.time() < deadline, "the idle GPU nodes were never removed"
        time.sleep(2)
