"""A real two-node Ray cluster on this machine: `ray start --head` plus a second `ray start
--address`, the job submitted through Ray's job API, its outputs checked. Only the processes this
test started are stopped (never `ray stop`, which would stop every Ray of the user)."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import psutil
import pytest

pytestmark = pytest.mark.slow  # a two-node Ray cluster and the job API: not in the fast lane

RAY = str(Path(sys.executable).with_name("ray"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pids_of_cluster(marks: tuple[str, ...]) -> set:
    """Processes whose command line names this cluster (its GCS address or temp dir): never those
    of another Ray on the machine, such as the test session's own."""
    out = set()
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if any(m in cmd for m in marks):
            out.add(p.info["pid"])
    return out


def own_ports() -> list[str]:
    """Ports of a node's agents: another Ray on the machine (the test session's) holds Ray's defaults."""
    return [f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
            f"--runtime-env-agent-port={_free_port()}", f"--metrics-export-port={_free_port()}"]


MEMORY = ["--memory", str(2 * 2 ** 30), "--object-store-memory", str(500 * 2 ** 20)]  # each node claims the machine's


@contextmanager
def cluster_head(num_cpus: int = 1, env: Optional[dict] = None):
    """A head node started with `ray start --head` (dashboard on 127.0.0.1), stopped on exit by the
    pids of its cluster (:func:`stop_cluster`), nodes added later included. Yields the cluster:
    ``dashboard``, ``env`` (for the CLI and clients: the same RAY_AUTH_MODE everywhere), ``address``."""
    if not Path(RAY).exists():
        pytest.skip("the ray CLI is not installed beside this Python")
    temp = Path("/tmp") / f"rp-{os.getpid()}"  # short: Ray's socket paths must stay under 108 chars
    # Ray 2.60 turns token auth on once a token exists; head, worker and client must agree.
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", **(env or {})}
    port, dash = _free_port(), _free_port()
    marks = (f"127.0.0.1:{port}", str(temp))
    before = _pids_of_cluster(marks)
    try:
        subprocess.run([RAY, "start", "--head", f"--port={port}", f"--num-cpus={num_cpus}", "--include-dashboard=true",
                        "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--temp-dir={temp}", *MEMORY,
                        *own_ports()], env=env, check=True, capture_output=True, timeout=120)
        yield {"dashboard": f"http://127.0.0.1:{dash}", "env": env, "address": f"127.0.0.1:{port}"}
    finally:
        stop_cluster(marks, before, temp)


def add_node(cluster: dict, num_cpus: int = 1) -> psutil.Process:
    """A worker node joined to ``cluster`` (`ray start --address`); its raylet's process."""
    raylets = _raylets(cluster["address"])
    for attempt in (1, 2):  # a port picked free may be taken by the time the node binds it: once more
        proc = subprocess.run([RAY, "start", f"--address={cluster['address']}", f"--num-cpus={num_cpus}", *MEMORY,
                               *own_ports()], env=cluster["env"], capture_output=True, timeout=180)
        if proc.returncode == 0:
            break
        assert attempt == 1, f"ray start --address failed: {proc.stderr.decode()[-2000:]}"
        print(f"ray start --address failed once, trying again: {proc.stderr.decode()[-500:]}")
        time.sleep(2)
    new = _raylets(cluster["address"]) - raylets
    assert len(new) == 1, new
    return psutil.Process(new.pop())


def _raylets(address: str) -> set:
    """The raylets of the cluster at ``address`` (their command lines give the GCS by the node's IP)."""
    port = address.rsplit(":", 1)[1]
    gcs = re.compile(rf"--gcs-address=\S+:{port}\b")
    return {p.info["pid"] for p in psutil.process_iter(["pid", "name", "cmdline"])
            if p.info["name"] == "raylet" and gcs.search(" ".join(p.info["cmdline"] or []))}


def kill_node(raylet: psutil.Process) -> None:
    """The node of ``raylet`` lost as a reclaimed spot instance is: SIGKILL to its raylet and every
    process under it (its workers and agents) at once, nothing shut down."""
    procs = [raylet, *raylet.children(recursive=True)]
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=15)


@pytest.fixture(scope="module")
def two_nodes():
    with cluster_head() as cluster:
        add_node(cluster)
        yield cluster


def stop_cluster(marks: tuple[str, ...], before: set, temp: Path) -> None:
    """Stop the processes of the cluster ``marks`` names that were not there ``before``, and remove
    its temp dir: SIGTERM, then SIGKILL after 15 s."""
    procs = [psutil.Process(p) for p in _pids_of_cluster(marks) - before if psutil.pid_exists(p)]
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=15)
    for p in alive:
        p.kill()
    shutil.rmtree(temp, ignore_errors=True)


def test_submitted_job_runs_across_both_nodes(two_nodes, shared_data, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    os.environ["RAY_AUTH_MODE"] = "disabled"
    client = JobSubmissionClient(two_nodes["dashboard"])
    with urllib.request.urlopen(f"{two_nodes['dashboard']}/nodes?view=summary", timeout=30) as r:
        nodes = json.load(r)["data"]["summary"]
    assert len([n for n in nodes if n["raylet"]["state"] == "ALIVE"]) == 2
    work = tmp_path / "job"
    work.mkdir()
    out = tmp_path / "out"
    (work / "job.yaml").write_text(
        f"data:\n  path: {shared_data / 'banking77' / 'train.csv'}\n  label_column: category\n  limit: 240\n"
        f"embed:\n  engine: ray\n  actors: 2\n  threads_per_actor: 1\n  shard_size: 40\n"
        f"cluster:\n  k: [6]\nselect:\n  budgets: [24]\noutput_dir: {out}\n")
    for attempt in range(30):  # the head's job agent takes a few seconds to come up
        try:
            job = client.submit_job(entrypoint=f"{sys.executable} -m ray_pipeline.cli run job.yaml --no-progress",
                                    runtime_env={"working_dir": str(work), "env_vars": {"RAY_AUTH_MODE": "disabled"}})
            break
        except RuntimeError as e:
            if "No available agent" not in str(e) or attempt == 29:
                raise
            time.sleep(2)
    deadline = time.time() + 420
    while client.get_job_status(job) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        assert time.time() < deadline, client.get_job_logs(job)[-3000:]
        time.sleep(2)
    logs = client.get_job_logs(job)
    assert client.get_job_status(job) == JobStatus.SUCCEEDED, logs[-3000:]
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "complete"
    assert info["stages"]["embed"]["rows"] == 240
    assert info["stages"]["embed"]["actor_plan"]["actors"] == 2  # one actor per node's CPU
    assert (out / "report.html").is_file() and (out / "selection.parquet").is_file()
