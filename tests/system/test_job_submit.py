"""A real two-node Ray cluster on this machine: `ray start --head` plus a second `ray start
--address`, the job submitted through Ray's job API, its outputs checked. Only the processes this
test started are stopped (never `ray stop`, which would stop every Ray of the user)."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

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


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    if not Path(RAY).exists():
        pytest.skip("the ray CLI is not installed beside this Python")
    temp = Path("/tmp") / f"rp-{os.getpid()}"  # short: Ray's socket paths must stay under 108 chars
    # Ray 2.60 turns token auth on once a token exists; head, worker and client must agree.
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    port, dash = _free_port(), _free_port()
    marks = (f"127.0.0.1:{port}", str(temp))
    before = _pids_of_cluster(marks)
    mem = ["--memory", str(2 * 2 ** 30), "--object-store-memory", str(500 * 2 ** 20)]

    def own_ports():  # another Ray on the machine (the test session's) holds Ray's default agent ports
        return [f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
                f"--runtime-env-agent-port={_free_port()}", f"--metrics-export-port={_free_port()}"]

    subprocess.run([RAY, "start", "--head", f"--port={port}", "--num-cpus=1", "--include-dashboard=true",
                    "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--temp-dir={temp}", *mem,
                    *own_ports()], env=env, check=True, capture_output=True, timeout=120)
    try:
        subprocess.run([RAY, "start", f"--address=127.0.0.1:{port}", "--num-cpus=1", *mem, *own_ports()],
                       env=env, check=True, capture_output=True, timeout=120)
        yield {"dashboard": f"http://127.0.0.1:{dash}", "env": env, "address": f"127.0.0.1:{port}"}
    finally:
        stop_cluster(marks, before, temp)


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
