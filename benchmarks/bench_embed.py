"""Embedding throughput: the Ray Data stage against a bare in-process loop, side by side.

Same model (the packaged MiniLM unless --model), same texts, same batch size and torch threads:

- ``bare loop``: ``_common.embed_texts`` (length-sorted batches, one process, nothing written);
- ``local engine``: the stage's shard callable in this process (shards written to Parquet);
- ``ray engine``: the stage through Ray Data actors (Ray already started; actor start-up and
  model load count, as the bare loop's model load does).

Prints samples/s of each and Ray's overhead against the bare loop; on a GPU also the share of
time the GPU was busy (nvidia-smi, sampled). Writes ``benchmarks/results/embed-{cpu,gpu}.json``.

    .venv/bin/python -m benchmarks.bench_embed                        # tweeteval_emoji, 10,000 tweets
    .venv/bin/python -m benchmarks.bench_embed --n 100000 --batch-size 512   # on a GPU
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from benchmarks._common import embed_texts, machine, save

from ray_pipeline.config import DataConfig, EmbedConfig
from ray_pipeline.io.pool import read_pool
from ray_pipeline.embed.stage import embed_pool

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
DATASETS = {
    "tweeteval_emoji": DataConfig(path=str(SHARED / "tweeteval_emoji" / "train_text.txt")),
    "20newsgroups": DataConfig(path=str(SHARED / "20newsgroups" / "20ng_bydate_train.jsonl")),
    "banking77": DataConfig(path=str(SHARED / "banking77" / "train.csv")),
}


class GpuBusy:
    """Mean GPU utilisation (%) over the block, sampled from nvidia-smi every 0.2 s."""

    def __init__(self):
        self.samples: list[float] = []
        self._stop = threading.Event()

    def _run(self):
        while not self._stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=5).stdout
                self.samples.append(float(out.split()[0]))
            except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
                return
            time.sleep(0.2)

    def __enter__(self):
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()

    @property
    def mean(self):
        return round(float(np.mean(self.samples)), 1) if self.samples else None


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_embed", description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="tweeteval_emoji", choices=sorted(DATASETS))
    p.add_argument("--n", type=int, default=10_000, help="samples (repeats the dataset if larger)")
    p.add_argument("--model", default="minilm")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--shard-size", type=int, default=2048)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    args = p.parse_args()

    import ray
    import torch

    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    pool = read_pool(DATASETS[args.dataset])
    reps = -(-args.n // len(pool))
    pool.texts = np.tile(pool.texts, reps)[: args.n]
    pool.ids = np.array([f"s{i}" for i in range(args.n)], dtype=object)
    cuda = torch.cuda.is_available()
    cfg = EmbedConfig(model=args.model, batch_size=args.batch_size, shard_size=args.shard_size,
                      threads_per_actor=threads)
    r = {"dataset": args.dataset, "n": args.n, "batch_size": args.batch_size, "shard_size": args.shard_size,
         "torch_threads": threads, "device": "cuda" if cuda else "cpu"}
    print(f"{args.n:,} texts from {args.dataset}, batch {args.batch_size}, {threads} torch threads, "
          f"{r['device']}", flush=True)

    tmp = Path(tempfile.mkdtemp(prefix="bench_embed_"))
    try:
        with GpuBusy() as gpu:
            t0 = time.perf_counter()
            embed_texts(pool.texts, cfg, progress=False)
            r["bare_loop_s"] = round(time.perf_counter() - t0, 2)
        r["bare_loop_gpu_busy_pct"] = gpu.mean
        t0 = time.perf_counter()
        embed_pool(pool, EmbedConfig(**{**cfg.__dict__, "engine": "local"}), tmp / "local", progress=False)
        r["local_engine_s"] = round(time.perf_counter() - t0, 2)
        ray.init(include_dashboard=False, log_to_driver=False)
        try:
            with GpuBusy() as gpu:
                t0 = time.perf_counter()
                m = embed_pool(pool, cfg, tmp / "ray", progress=False)
                r["ray_engine_s"] = round(time.perf_counter() - t0, 2)
            r["ray_engine_gpu_busy_pct"] = gpu.mean
            r["ray_actor_plan"] = m["actor_plan"]
        finally:
            ray.shutdown()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for k in ("bare_loop", "local_engine", "ray_engine"):
        r[f"{k}_samples_per_s"] = round(args.n / r[f"{k}_s"], 1)
    r["ray_overhead_vs_bare_pct"] = round(100 * (r["ray_engine_s"] / r["bare_loop_s"] - 1), 1)
    # Steady state: the time the actors spent on shards, without process start and model load.
    r["ray_in_actor_s"] = round(r["ray_actor_plan"]["shard_seconds"], 2)
    r["ray_steady_overhead_vs_bare_pct"] = round(100 * (r["ray_in_actor_s"] / r["bare_loop_s"] - 1), 1)
    r["ratio_ray_vs_bare_throughput"] = round(r["bare_loop_s"] / r["ray_engine_s"], 3)
    for k, v in r.items():
        print(f"  {k:34s} {v}")
    print(f"wrote {save('embed', {'machine': machine(), 'args': vars(args), 'result': r})}")


if __name__ == "__main__":
    main()
