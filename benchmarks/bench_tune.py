"""The fine-tuning sweep on real data: each candidate's held-out accuracy against random and the
full pool, tokens/s per device, and what ASHA's early stopping saves, in one run.

The same candidates (selection for each K and M, random subsets of each M, the full pool) are
swept twice: with ASHA, and with every trial run to its end (FIFO). The benchmark prints each
trial's score, the compute (CPU- or GPU-seconds) of both sweeps, the share ASHA saved, and
whether both sweeps choose the same target. Writes ``benchmarks/results/tune-{cpu,gpu}.json``.

    .venv/bin/python -m benchmarks.bench_tune                       # banking77, MiniLM, CPU-sized
    .venv/bin/python -m benchmarks.bench_tune --max-steps 300 --budgets 2% 10%   # on a GPU
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from benchmarks._common import machine, save

from ray_pipeline.config import Config
from ray_pipeline.pipeline import run_tune
from ray_pipeline.runtime.console import Console

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_tune", description=__doc__.split("\n\n")[0])
    p.add_argument("--k", nargs="+", type=int, default=[50, 100])
    p.add_argument("--budgets", nargs="+", default=["1%", "2%"])
    p.add_argument("--random-seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--max-steps", type=int, default=60)
    p.add_argument("--eval-every", type=int, default=15)
    p.add_argument("--eval-limit", type=int, default=500)
    p.add_argument("--lr", type=float, default=2e-4)
    args = p.parse_args()

    base = {
        "data": {"path": str(SHARED / "banking77" / "train.csv"), "label_column": "category"},
        "embed": {"engine": "local"},
        "cluster": {"k": args.k},
        "select": {"budgets": args.budgets, "random_seeds": args.random_seeds},
        "finetune": {"heldout": {"eval_path": str(SHARED / "banking77" / "test.csv"), "eval_limit": args.eval_limit},
                     "train": {"max_steps": args.max_steps, "eval_every": args.eval_every, "lr": args.lr,
                               "max_length": 48, "patience": 100}},
    }
    tmp = Path(tempfile.mkdtemp(prefix="bench_tune_"))
    runs = {}
    try:
        for mode in ("asha", "fifo"):
            cfg = Config.from_dict({**base, "output_dir": str(tmp / mode),
                                    "finetune": {**base["finetune"], "sweep": {"early_stopping": mode == "asha"}}})
            if mode == "fifo":  # reuse the ASHA run's embeddings: same samples, same key
                shutil.copytree(tmp / "asha" / "embeddings", tmp / mode / "embeddings")
            runs[mode] = run_tune(cfg, console=Console(progress=False))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    cost_key = "gpu_seconds" if runs["asha"]["summary"]["plan"]["use_gpu"] else "cpu_seconds"
    table = []
    fifo = {t["name"]: t for t in runs["fifo"]["trials"]}
    print(f"\n{'candidate':22s} {'size':>6s} {'ASHA status':>15s} {'ASHA acc':>9s} {'full-run acc':>12s} {'tok/s':>8s}")
    for t in sorted(runs["asha"]["trials"], key=lambda t: (t["kind"], t.get("m") or 0, t["name"])):
        f = fifo[t["name"]]
        row = {"name": t["name"], "kind": t["kind"], "k": t["k"], "m": t["m"], "size": t["size"],
               "asha_status": t["status"], "asha_steps": t["steps"], "asha_best_accuracy": t["validation_score"],
               "full_run_best_accuracy": f["validation_score"], "tokens_per_s": t["tokens_per_s"],
               "asha_cost": t[cost_key], "full_run_cost": f[cost_key]}
        table.append(row)
        print(f"{t['name']:22s} {t['size']:6d} {t['status']:>15s} {t['validation_score'] or 0:9.4f} "
              f"{f['validation_score'] or 0:12.4f} {t['tokens_per_s'] or 0:8.0f}")
    asha_cost = sum(r["asha_cost"] for r in table)
    fifo_cost = sum(r["full_run_cost"] for r in table)
    # Steps do not depend on what else the machine is doing; seconds do.
    asha_steps = sum(t["steps"] for t in runs["asha"]["trials"])
    fifo_steps = sum(t["steps"] for t in runs["fifo"]["trials"])
    failed = [t["name"] for t in runs["asha"]["trials"] + runs["fifo"]["trials"] if t["status"] == "failed"]
    result = {
        "trials": table, "cost_unit": cost_key, "failed_trials": failed,
        "asha_total_steps": asha_steps, "full_run_total_steps": fifo_steps,
        "steps_saved_pct": round(100 * (1 - asha_steps / fifo_steps), 1) if fifo_steps else None,
        "asha_total_cost": asha_cost, "full_run_total_cost": fifo_cost,
        "compute_saved_pct": round(100 * (1 - asha_cost / fifo_cost), 1) if fifo_cost else None,
        "asha_target": runs["asha"]["summary"]["target"], "full_run_target": runs["fifo"]["summary"]["target"],
        "same_target": (runs["asha"]["summary"]["target"] or {}).get("name")
        == (runs["fifo"]["summary"]["target"] or {}).get("name"),
        "baselines_full_run": runs["fifo"]["summary"]["baselines"],
    }
    print(f"\n{cost_key}: ASHA {asha_cost:.0f} vs every trial to the end {fifo_cost:.0f} "
          f"({result['compute_saved_pct']}% saved); training steps {asha_steps} vs {fifo_steps} "
          f"({result['steps_saved_pct']}% saved); failed trials: {failed or 'none'}; "
          f"same target: {result['same_target']} "
          f"({result['asha_target']['name'] if result['asha_target'] else None})")
    print(f"wrote {save('tune', {'machine': machine(), 'args': vars(args), 'result': result})}")


if __name__ == "__main__":
    main()
