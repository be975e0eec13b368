"""Distributed selection: Ray tasks over shards against the driver path, on the same data.

Random unit vectors (default 1M x 384, K = 1000, M = 1%) are written as Parquet shards in the
embedding stage's layout, in shuffled order. Then, in one run:

- the driver path: every vector in the driver's memory, ``select.engine.select_candidates``;
- the shard path: ``select_candidates`` over ``select.sharded.Sharded`` on a local multi-node Ray
  cluster (``ray.cluster_utils.Cluster``: ``--nodes`` raylets with their own object stores,
  ``--cpus`` each), the driver holding only per-row ints and the k-means sample;

and checks the two selections agree index for index. Wall time per stage and the driver's peak
RSS of each are printed and written to ``benchmarks/results/distributed-{cpu,gpu}.json``.

    .venv/bin/python -m benchmarks.bench_distributed
    .venv/bin/python -m benchmarks.bench_distributed --n 200000 --k 300
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks._common import machine, save, timed

from ray_pipeline.io.run_dir import write_parquet
from ray_pipeline.config import Config
from ray_pipeline.runtime.devices import Devices
from ray_pipeline.select.sharded import Sharded
from ray_pipeline.embed.stage import shard_table
from ray_pipeline.select.engine import select_candidates


def write_shards(n: int, d: int, shard_rows: int, folder: Path, seed: int = 0) -> list[str]:
    """n random unit vectors as shuffled shards; returns the paths (the vectors are not kept)."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    paths = []
    for i, lo in enumerate(range(0, n, shard_rows)):
        rows = np.sort(perm[lo:lo + shard_rows])
        x = np.random.default_rng([seed, i]).standard_normal((len(rows), d), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        path = folder / f"shard-{i:05d}.parquet"
        write_parquet(shard_table([str(r) for r in rows], rows.tolist(), x, "float32", []), path)
        paths.append(str(path))
    return paths


def load_all(paths: list[str], n: int, d: int) -> np.ndarray:
    from ray_pipeline.select.sharded import read_shard

    x = np.empty((n, d), dtype=np.float32)
    for p in paths:
        rows, xs = read_shard(p)
        x[rows] = xs
    return x


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_distributed", description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--d", type=int, default=384)
    p.add_argument("--k", type=int, default=1000)
    p.add_argument("--m", default="1%")
    p.add_argument("--shard-rows", type=int, default=50_000)
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--cpus", type=int, default=1, help="CPUs per node")
    args = p.parse_args()

    import ray
    from ray.cluster_utils import Cluster

    cfg = Config.from_dict({"cluster": {"k": [args.k]}, "select": {"budgets": [args.m], "method": ["kcenter"],
                                                                   "random_seeds": [0]}})
    out = {"machine": machine(), "n": args.n, "d": args.d, "k": args.k, "m": args.m, "nodes": args.nodes,
           "cpus_per_node": args.cpus}
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        t0 = time.perf_counter()
        paths = write_shards(args.n, args.d, args.shard_rows, Path(tmp))
        print(f"wrote {len(paths)} shards of {args.n:,} x {args.d} in {time.perf_counter() - t0:.1f}s", flush=True)

        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": args.cpus, "include_dashboard": False,
                                                                "object_store_memory": 3 << 30})
        for _ in range(args.nodes - 1):
            cluster.add_node(num_cpus=args.cpus, object_store_memory=3 << 30)
        ray.init(address=cluster.address, log_to_driver=False)
        sharded: dict = {}
        with timed(sharded, "select"):
            b = select_candidates(Sharded(paths, args.n, cfg, Devices()), cfg, rng=np.random.default_rng(0))
        sharded.update({k: round(v, 3) for k, v in b.per_k[0].seconds.items()})
        ray.shutdown()
        cluster.shutdown()
        print(f"shard path ({args.nodes} nodes x {args.cpus} CPU): select {sharded['select_s']:.1f}s ({sharded}), "
              f"driver peak RSS {sharded['select_peak_gib']:.2f} GiB", flush=True)
        driver: dict = {}
        with timed(driver, "load"):
            x = load_all(paths, args.n, args.d)
        with timed(driver, "select"):
            a = select_candidates(x, cfg, rng=np.random.default_rng(0))
        driver.update({k: round(v, 3) for k, v in a.per_k[0].seconds.items()})
        del x
        print(f"driver path: load {driver['load_s']:.1f}s, select {driver['select_s']:.1f}s "
              f"({driver}), peak RSS {driver['select_peak_gib']:.2f} GiB", flush=True)

    same = all((sa.rank == sb.rank).all() and (sa.assign == sb.assign).all() and (sa.key == sb.key).all()
               for sa, sb in zip(a.per_k, b.per_k))
    print(f"same selection index for index: {same}; shard/driver time "
          f"{sharded['select_s'] / driver['select_s']:.2f}x; driver memory "
          f"{sharded['select_peak_gib']:.2f} vs {max(driver['load_peak_gib'], driver['select_peak_gib']):.2f} GiB")
    out.update(driver_path=driver, shard_path=sharded, identical=bool(same),
               time_ratio_shard_over_driver=round(sharded["select_s"] / driver["select_s"], 3))
    print(f"wrote {save('distributed', out)}")
    if not same:
        raise SystemExit("the shard path's selection differs from the driver path's")


if __name__ == "__main__":
    main()
