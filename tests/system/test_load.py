"""Load and soak: 1M precomputed vectors within this machine's memory; 20 runs in one Ray session
with no growth in memory and no leaked processes, actors or resources; credentials from the
environment never written anywhere."""

import json
import logging
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest

from conftest import unit_blobs
from ray_pipeline.cli import main

pytestmark = pytest.mark.slow  # a million vectors and a 20-run soak: not in the fast lane


def test_one_million_vectors_select_within_memory(tmp_path):
    n, d = 1_000_000, 384
    rng = np.random.default_rng(0)
    x = np.lib.format.open_memmap(tmp_path / "x.npy", mode="w+", dtype=np.float32, shape=(n, d))
    for lo in range(0, n, 100_000):  # written in pieces: the test process never holds all of it
        block = rng.standard_normal((100_000, d), dtype=np.float32)
        x[lo:lo + 100_000] = block / np.linalg.norm(block, axis=1, keepdims=True)
    x.flush()
    del x
    args = ["select", "--embeddings", str(tmp_path / "x.npy"), "--k", "300", "--budgets", "1%", "--set",
            "select.random_seeds=[0]", "--set", "select.method=[kcenter]", "--out", str(tmp_path / "run"),
            "--no-progress"]
    # The child reports its own high-water mark (VmHWM, reset at exec): rusage of a child counts
    # the pages it shared with this (large) test process at fork.
    code = ("import sys, re; from ray_pipeline.cli import main; rc = main(sys.argv[1:]); "
            "hwm = re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1); "
            "print('VmHWM', hwm, file=sys.stderr); sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    err = proc.stderr.decode()
    peak_gib = int(err.rsplit("VmHWM", 1)[1].split()[0]) / 2 ** 20  # KiB
    print(f"1M x 384 select: peak RSS {peak_gib:.2f} GiB")
    assert (tmp_path / "run" / "run.json").is_file(), err[-2000:]
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["status"] == "complete"
    # x is 1.43 GiB and the run holds it once (it was 3.2 GiB when loading copied it twice and the
    # stage key hashed a bytes copy); torch, faiss and pyarrow add about 0.5 GiB
    assert peak_gib < 2.6, f"peak RSS {peak_gib:.2f} GiB"
    import pyarrow.parquet as pq

    t = pq.read_table(tmp_path / "run" / "selection.parquet", columns=["in_k300_m10000", "in_random_m10000_s0"])
    assert t.num_rows == n
    assert sum(t.column("in_k300_m10000").to_pylist()) == 10_000


SESSION_ACTORS = {"PlacementGroupCleaner", "ActorLocationTracker", "_StatsActor", "_AutoscalingCoordinatorActor"}


def _ray_worker_processes() -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "default_worker.py" in cmd or cmd.startswith("ray::"):
            out.append(p)
    return out


@pytest.fixture(scope="module")
def bank4(shared_data, tmp_path_factory):
    import pyarrow.csv as pacsv

    d = tmp_path_factory.mktemp("bank4")
    intents = ["activate_my_card", "card_arrival", "exchange_rate", "lost_or_stolen_card"]
    for split, per in (("train", 30), ("test", 10)):
        t = pacsv.read_csv(shared_data / "banking77" / f"{split}.csv").to_pandas()
        t[t.category.isin(intents)].groupby("category").head(per).to_csv(d / f"{split}.csv", index=False)
    return d


def test_soak_twenty_full_runs_in_one_ray_session(tmp_path, bank4, local_ray):
    """The pool embedded once through Ray Data, then 20 runs of read -> select (Ray tasks over the
    embedding's shards) -> report in one process and one Ray session (the Tune stage is left out,
    at about a minute a run here; the placement groups it can leave behind have their own test in
    test_tune): after each run none of its actors is alive and every CPU is free again; from the
    5th run to the 20th the driver's memory and the number of Ray worker processes do not grow,
    and every run gives the same selection, byte for byte."""
    import ray
    from ray.util.state import list_actors

    base = (f"data:\n  path: {bank4 / 'train.csv'}\n  label_column: category\n"
            f"embed:\n  engine: ray\n  shard_size: 40\n  threads_per_actor: 1\n")
    (tmp_path / "embed.yaml").write_text(base)
    assert main(["embed", str(tmp_path / "embed.yaml"), "--out", str(tmp_path / "emb"), "--no-progress"]) == 0
    stage = next((tmp_path / "emb" / "embeddings").iterdir())
    cfg = tmp_path / "job.yaml"
    cfg.write_text(f"data:\n  path: {bank4 / 'train.csv'}\n  label_column: category\n  embeddings: {stage}\n"
                   f"cluster:\n  k: [4, 8]\nselect:\n  budgets: [12, 24]\n  random_seeds: [0]\n  engine: ray\n"
                   f"  groups: 2\n")
    from collections import Counter

    before = Counter(a["class_name"] for a in list_actors(filters=[("state", "=", "ALIVE")]))  # earlier tests'
    me = psutil.Process()
    rss, workers, outputs = [], [], set()
    for i in range(20):
        out = tmp_path / f"run{i}"
        assert main(["run", str(cfg), "--out", str(out), "--no-progress"]) == 0
        outputs.add((out / "selection.parquet").read_bytes())
        alive = Counter(a["class_name"] for a in list_actors(filters=[("state", "=", "ALIVE")]))
        # Ray Data and Train keep one of each of their service actors per session (stats, location
        # tracker, autoscaling coordinator, placement-group cleaner); nothing of a run may stay
        new = alive - before
        assert not [a for a in new if a not in SESSION_ACTORS], f"run {i}: actors left alive: {dict(new)}"
        assert all(alive[a] <= max(1, before[a]) for a in SESSION_ACTORS), f"run {i}: service actors multiply"
        deadline = time.time() + 30  # placement groups and workers are released asynchronously
        while ray.available_resources().get("CPU") != ray.cluster_resources()["CPU"] and time.time() < deadline:
            time.sleep(0.5)
        assert ray.available_resources().get("CPU") == ray.cluster_resources()["CPU"], f"run {i}: CPUs still held"
        rss.append(me.memory_info().rss / 2 ** 20)
        workers.append(len(_ray_worker_processes()))
    print(f"soak: driver RSS {rss[4]:.0f} -> {rss[-1]:.0f} MiB; Ray worker processes {workers}")
    assert len(outputs) == 1  # the same selection, byte for byte, every time
    assert rss[-1] - rss[4] < 100, f"driver memory grew {rss[-1] - rss[4]:.0f} MiB over 15 runs: {rss}"
    assert max(workers[4:]) <= workers[4] + 2, f"Ray worker processes accumulate: {workers}"


SECRETS = {"AWS_ACCESS_KEY_ID": "AKIASENTINEL0000XYZ", "AWS_SECRET_ACCESS_KEY": "sentinel/secret+value/123",
           "HF_TOKEN": "hf_sentinelTokenValue", "AZURE_STORAGE_KEY": "sentinel-azure-key=="}


def test_credentials_from_the_environment_are_never_written(tmp_path, monkeypatch, caplog, capsys):
    for k, v in SECRETS.items():
        monkeypatch.setenv(k, v)
    np.save(tmp_path / "x.npy", unit_blobs(600, 8, 4, 0))
    caplog.set_level(logging.DEBUG)
    out = tmp_path / "run"
    assert main(["run", "--embeddings", str(tmp_path / "x.npy"), "--k", "4", "--budgets", "20", "--out", str(out),
                 "--no-progress"]) == 0
    captured = capsys.readouterr()
    logs = caplog.text + captured.out + captured.err
    written = b"".join(f.read_bytes() for f in out.rglob("*") if f.is_file())
    for v in SECRETS.values():
        assert v not in logs and v.encode() not in written


def test_a_uri_with_credentials_is_refused_without_echoing_them(tmp_path, caplog, capsys):
    caplog.set_level(logging.DEBUG)
    rc = main(["run", "--set", "data.path=s3://AKIAEXAMPLE:sup3rS3cret@bucket/pool.jsonl", "--out",
               str(tmp_path / "run"), "--no-progress"])
    captured = capsys.readouterr()
    text = caplog.text + captured.out + captured.err
    assert rc == 2
    assert "carries credentials" in text and "AWS_SECRET_ACCESS_KEY" in text
    assert "sup3rS3cret" not in text and "AKIAEXAMPLE" not in text
    assert not (tmp_path / "run").exists()
