"""The selection at the default grid, as N grows: flat against multi-level k-means, side by side.

What ``ray-pipeline select --embeddings X --budgets P%`` runs by default (K in {M/2, M}, the
k-center greedy and the nearest-to-centroid candidates, one greedy pass per K), on 384-d
clustered unit vectors (N/100 random directions plus noise), at budgets 1% and 5%, for N from
100k to 2M: once with the shipped default, ``cluster.algorithm: auto`` (it records what it chose
per K: multi-level k-means, at most ``branching`` children a node down to leaves of at most
``leaf`` clusters, wherever K >= 1000 (and > leaf) and N K >= 1e8, which is every run here but
K = 500 at 100k), and once with ``flat`` (one k-means into K
clusters, N K d work per iteration: quadratic in N when K is a share of N). Flat runs only where
N M <= ``--flat-max-nm`` (its cost grows with N M; the default 2e9 is 400k at 1% and 200k at 5%,
about 100 s each on 2 cores); beyond, the table prints its time projected from its fitted exponent,
marked as projected. Per run: seconds of the whole selection, of k-means, peak RSS; per algorithm
and budget: the growth exponent b of time ~ N^b (least squares on log-log). Writes
``benchmarks/results/clustering-{cpu,gpu}.json``.

    .venv/bin/python -m benchmarks.bench_clustering
    .venv/bin/python -m benchmarks.bench_clustering --ns 100000 200000 400000 --budgets 1
"""

from __future__ import annotations

import argparse

import numpy as np

from benchmarks._common import machine, save, timed

from ray_pipeline.config import Config
from ray_pipeline.runtime.devices import decide
from ray_pipeline.select.engine import select_candidates


def vectors(n: int, d: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((max(10, n // 100), d), dtype=np.float32)
    x = centers[rng.integers(0, len(centers), n)] * 2.0
    x += rng.standard_normal((n, d), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def run(x: np.ndarray, pct: float, algorithm: str, tree: dict, gpu: bool) -> dict:
    cfg = Config.from_dict({"cluster": {"algorithm": algorithm, **tree, "gpu": "auto" if gpu else "never"},
                            "select": {"budgets": [f"{pct:g}%"], "random_seeds": [], "stratify": "none",
                                       "device": "auto" if gpu else "cpu"}})
    r = {"n": len(x), "budget_pct": pct, "algorithm": algorithm}
    with timed(r, "select"):
        sel = select_candidates(x, cfg, rng=np.random.default_rng(0), devices=decide(cfg))  # --gpu: faiss there
    r["kmeans_s"] = round(sum(s.seconds["kmeans"] for s in sel.per_k if s.method == "kcenter"), 3)
    r["k"] = sorted({s.k for s in sel.per_k})
    r["chosen"] = {k: cfg.cluster.algorithm_for(len(x), k) for k in r["k"]}
    print(f"  n={len(x):>9,} {pct:g}% {algorithm:5s} K={r['k']} ({'/'.join(sorted(set(r['chosen'].values())))}): select {r['select_s']:8.1f}s "
          f"(k-means {r['kmeans_s']:7.1f}s), peak {r['select_peak_gib']:.2f} GiB", flush=True)
    return r


def exponent(rows: list[dict]) -> float:
    return float(np.polyfit(np.log([r["n"] for r in rows]), np.log([r["select_s"] for r in rows]), 1)[0])


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_clustering", description=__doc__.split("\n\n")[0])
    p.add_argument("--ns", nargs="+", type=int, default=[100_000, 200_000, 400_000, 1_000_000, 2_000_000])
    p.add_argument("--budgets", nargs="+", type=float, default=[1, 5], help="percent of the pool")
    p.add_argument("--flat-max-nm", type=float, default=2e9, help="flat runs where N * M <= this")
    p.add_argument("--gpu", action="store_true", help="faiss and the greedy on the GPU where there is one")
    p.add_argument("--branching", type=int, help="cluster.branching (default: the config's)")
    p.add_argument("--leaf", type=int, help="cluster.leaf (default: the config's)")
    p.add_argument("--dim", type=int, default=384)
    args = p.parse_args()
    out = {"machine": machine(), "args": vars(args), "runs": [], "exponents": {}}
    tree = {k: v for k, v in (("branching", args.branching), ("leaf", args.leaf)) if v is not None}
    for n in args.ns:
        x = vectors(n, args.dim)
        for pct in args.budgets:
            for algorithm in ("auto", "flat"):
                if algorithm == "flat" and n * n * pct / 100 > args.flat_max_nm:
                    continue
                out["runs"].append(run(x, pct, algorithm, tree, args.gpu))
        del x
    print("\n| N | budget | flat (s) | default, auto (s) | flat / default | peak RSS, default |\n|---|---|---|---|---|---|")
    for pct in args.budgets:
        rows = {a: [r for r in out["runs"] if r["algorithm"] == a and r["budget_pct"] == pct]
                for a in ("flat", "auto")}
        b = {a: exponent(v) if len(v) > 1 else None for a, v in rows.items()}
        out["exponents"][f"{pct:g}%"] = b
        flat_at = {r["n"]: r["select_s"] for r in rows["flat"]}
        for r in rows["auto"]:
            if r["n"] in flat_at:
                f, note = flat_at[r["n"]], ""
            elif b["flat"] is not None:  # projected from the largest flat run and its exponent
                last = max(rows["flat"], key=lambda v: v["n"])
                f, note = last["select_s"] * (r["n"] / last["n"]) ** b["flat"], " (projected)"
            else:
                f, note = float("nan"), ""
            print(f"| {r['n']:,} | {pct:g}% | {f:.1f}{note} | {r['select_s']:.1f} | {f / r['select_s']:.1f}x{note} | {r['select_peak_gib']:.2f} GiB |")
        print(f"growth at {pct:g}%: flat N^{b['flat'] or float('nan'):.2f}, default (auto) "
              f"N^{b['auto'] or float('nan'):.2f}", flush=True)
    print(f"wrote {save('clustering', out)}")


if __name__ == "__main__":
    main()
