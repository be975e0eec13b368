"""How selection cost grows with N: k-means, key samples and greedy, with the growth exponent.

Random unit vectors, N = 1e4 .. 1e6 (1e7 with --max-n 10000000 where memory allows: 15 GiB of
float32 vectors at d=384), d = 384 and 768, K = N/1000 (at least 10), M = 1% of N, one run each.
Prints a table, fits time ~ N^b by least squares on log-log for each stage, and writes
``benchmarks/results/scaling-{cpu,gpu}.json``.

    .venv/bin/python -m benchmarks.bench_scaling
    .venv/bin/python -m benchmarks.bench_scaling --max-n 10000000 --dims 384    # on a large machine
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from benchmarks._common import machine, save, timed

from ray_pipeline.select.kmeans import kmeans
from ray_pipeline.select.kernels import center_and_key_samples, k_center_greedy, proportional_budgets


def run(n: int, d: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    k, m = max(10, n // 1000), max(1, n // 100)
    r = {"n": n, "d": d, "k": k, "m": m}
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with timed(r, "kmeans"):
        km = kmeans(x, k, seed=seed, gpus=torch.cuda.device_count() if dev.type == "cuda" else 0)
    xt, at = torch.from_numpy(x).to(dev), torch.from_numpy(km.assign).to(dev)
    with timed(r, "key_samples"):
        _, key = center_and_key_samples(xt, at, torch.from_numpy(km.sim).to(dev), k)
    budgets = torch.from_numpy(proportional_budgets(km.sizes, m)).to(dev)
    with timed(r, "greedy"):
        k_center_greedy(xt, at, budgets, key).cpu()
    r["total_s"] = round(r["kmeans_s"] + r["key_samples_s"] + r["greedy_s"], 3)
    print(f"  n={n:>10,} d={d} K={k:>6,} M={m:>7,}: k-means {r['kmeans_s']:8.2f}s  keys {r['key_samples_s']:6.2f}s"
          f"  greedy {r['greedy_s']:7.2f}s  total {r['total_s']:8.2f}s  peak {r['greedy_peak_gib']:.2f} GiB", flush=True)
    return r


def exponent(rows: list[dict], key: str) -> float:
    ns = np.log([r["n"] for r in rows])
    ts = np.log([max(r[key], 1e-4) for r in rows])
    return float(np.polyfit(ns, ts, 1)[0])


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_scaling", description=__doc__.split("\n\n")[0])
    p.add_argument("--max-n", type=int, default=1_000_000)
    p.add_argument("--dims", nargs="+", type=int, default=[384, 768])
    args = p.parse_args()
    ns = [n for n in (10_000, 100_000, 1_000_000, 10_000_000) if n <= args.max_n]
    out = {"machine": machine(), "runs": [], "exponents": {}}
    for d in args.dims:
        rows = [run(n, d) for n in ns]
        out["runs"] += rows
        out["exponents"][str(d)] = {s: round(exponent(rows, f"{s}_s"), 2) for s in ("kmeans", "key_samples", "greedy", "total")}
        print(f"  d={d}: time ~ N^b with b = {out['exponents'][str(d)]}", flush=True)
    print(f"wrote {save('scaling', out)}")


if __name__ == "__main__":
    main()
