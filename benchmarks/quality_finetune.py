"""Does the selection beat random when the model is really fine-tuned? MiniLM (or, on speech, the
packaged GE2E) through the Tune stage, under the pipeline's own rules for an honest comparison.

banking77 (MiniLM embeddings from the quality benchmark's cache), budgets 2% and 10%; or with
``--dataset fsdd-digit`` / ``fsdd-speaker`` the FSDD recordings, GE2E vectors chosen from and GE2E
fine-tuned with a classification head (``finetune.task: classification`` on a speech pool). The held-out
set (``--eval-limit`` rows of test.csv, a seeded sample stratified by label) is split as the
pipeline splits it: the *validation* half chooses (the linear-probe proxy, ASHA among the
selection candidates, patience, the target), the *test* half only reports. Per budget the
pipeline's default grid (``cluster.k: [M/2, M]``, ``select.method: [kcenter, centroid]``, budgets
stratified by label) is ranked by the probe and its top candidate fine-tuned, beside ``--seeds``
random subsets of the same size and the full pool, every one by ``finetune.sweep.run_sweep`` (Ray Tune over
Ray Train + DeepSpeed) under one rule: until its validation score stops improving (patience 3) or
``--max-epochs`` passes, at most ``--max-steps`` steps. The sweep scores each trial's best model on
the test half and judges (``finetune.verdict.judge``). Writes ``benchmarks/results/quality-finetune-{cpu,gpu}.json``
(``quality-finetune-<budgets>-{cpu,gpu}.json`` for budgets other than 2%) and prints a Markdown
table with costs.

    .venv/bin/python -m benchmarks.quality_finetune                  # about 45 minutes on 2 cores
    .venv/bin/python -m benchmarks.quality_finetune --budgets 2 --seeds 2 --max-steps 100
    .venv/bin/python -m benchmarks.quality_finetune --dataset fsdd-digit --budgets 5
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import time
from pathlib import Path

import numpy as np

from benchmarks._common import machine, save
from benchmarks.quality import DATASETS, vectors

from ray_pipeline.config import Config
from ray_pipeline.io.pool import read_pool
from ray_pipeline.finetune.heldout import read_parts
from ray_pipeline.finetune.proxy import linear_probe
from ray_pipeline.select.engine import select_candidates
from ray_pipeline.finetune.sweep import Candidate, run_sweep
from ray_pipeline.finetune.task import task_for
from ray_pipeline.finetune.verdict import judge

WORK = Path(__file__).resolve().parent / ".cache" / "quality-finetune"
# Per dataset: the model fine-tuned, its batches and learning rate, the held-out rows read.
SETTINGS = {"banking77": {"model": "minilm", "lr": 2e-4, "batch_size": 32, "eval_limit": 800, "warmup_ratio": 0.0},
            **{f"fsdd-{label}": {"model": "default", "lr": 3e-4, "batch_size": 16, "eval_limit": None,
                                 "warmup_ratio": 0.1} for label in ("digit", "speaker")}}


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.quality_finetune", description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="banking77", choices=sorted(SETTINGS))
    p.add_argument("--budgets", nargs="+", type=float, default=[2, 10], help="percent of the pool")
    p.add_argument("--seeds", type=int, default=3, help="random subsets per budget")
    p.add_argument("--lr", type=float, help="default: the dataset's (SETTINGS)")
    p.add_argument("--max-epochs", type=float, default=40.0)
    p.add_argument("--max-steps", type=int, default=500, help="the cap every trial shares (the full pool reaches it)")
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--eval-limit", type=int, help="held-out rows: half validation, half test (default: the "
                                                  "dataset's; FSDD: all 300)")
    args = p.parse_args()
    name, settings = args.dataset, SETTINGS[args.dataset]
    args.lr = args.lr or settings["lr"]
    args.eval_limit = args.eval_limit or settings["eval_limit"]

    t0 = time.perf_counter()
    train_cfg, test_cfg = DATASETS[name]
    x, labels = vectors(name, 0, train_cfg)
    xe, _ = vectors(name, 1, test_cfg)
    pool = read_pool(train_cfg)
    task = task_for("classification", pool.modality)
    cfg = Config.from_dict({
        "data": {k: v for k, v in dataclasses.asdict(train_cfg).items() if v is not None and k != "limit"},
        "finetune": {"model": settings["model"], "heldout": {"eval_path": test_cfg.path, "eval_limit": args.eval_limit},
                     "train": {"lr": args.lr, "batch_size": settings["batch_size"], "max_epochs": args.max_epochs,
                               "max_steps": args.max_steps, "eval_every": args.eval_every, "patience": 3,
                               "max_length": 64, "eval_batch_size": 128, "warmup_ratio": settings["warmup_ratio"],
                               "lr_scheduler_type": "constant_with_warmup"},
                     "resources": {"threads_per_worker": 2}, "sweep": {"max_concurrent_trials": 1}},
        "output_dir": str(WORK), "seed": 0})
    parts = read_parts(cfg)
    val_pool, test_pool, split = parts.validation, parts.test, parts.info
    classes = sorted(set(labels))
    index = {c: i for i, c in enumerate(classes)}
    y = np.array([index[c] for c in labels])
    val_rows = read_pool(test_cfg).positions(val_pool.ids.tolist())  # xe is in test.csv's order
    yv = np.array([index[str(c)] for c in val_pool.labels])
    n = len(y)

    candidates, chosen = [], {}
    for pct in args.budgets:
        m = max(1, int(round(pct / 100 * n)))
        c = Config.from_dict({"select": {"budgets": [m], "random_seeds": list(range(args.seeds))}, "seed": 0})
        sel = select_candidates(x, c, rng=np.random.default_rng(0), labels=labels)  # stratified, as the pipeline
        subsets = {s.name(m): np.flatnonzero(s.members(m)) for s in sel.per_k}
        probe = {k: linear_probe(x[r], y[r], xe[val_rows], yv, len(classes))["accuracy"] for k, r in subsets.items()}
        pick = max(probe, key=probe.get)
        chosen[f"{pct:g}%"] = {"name": pick, "proxy_val": probe}
        s = next(s for s in sel.per_k if s.name(m) == pick)
        candidates.append(Candidate(pick, "selection", subsets[pick], k=s.k, m=m, extra={"method": s.method}))
        candidates += [Candidate(f"random_m{m}_s{seed}", "random", np.flatnonzero(rank < m), m=m, seed=seed)
                       for seed, rank in sel.random.items()]
        print(f"{pct:g}% (M={m}): the pipeline chose {pick} (probe on validation {probe[pick]:.3f})", flush=True)
    candidates.append(Candidate("full", "full", np.arange(n)))

    if WORK.exists():
        shutil.rmtree(WORK)
    WORK.mkdir(parents=True)
    print(f"fine-tuning {len(candidates)} trials ({settings['model']}, batch {settings['batch_size']}, patience 3, <= {args.max_epochs:g} epochs, "
          f"<= {args.max_steps} steps); validation {len(val_pool)}, test {len(test_pool)}", flush=True)
    result = run_sweep(candidates, pool, parts, cfg, WORK)
    trials = {t["name"]: {k: t.get(k) for k in ("m", "kind", "status", "steps", "epochs", "samples_seen",
                                                "validation_score", "test_score", "wall_s", "cpu_seconds")}
              for t in result["trials"]}
    for k, t in trials.items():
        print(f"  {k}: {t['status']}, {t['steps']} steps ({t['epochs']:.1f} epochs), validation "
              f"{t['validation_score']:.3f}, test {t['test_score']:.3f}, {t['cpu_seconds']:.0f} CPU-s", flush=True)
    full = trials["full"]
    table = {}
    for pct in args.budgets:
        m = max(1, int(round(pct / 100 * n)))
        rnd = [v for v in trials.values() if v["kind"] == "random" and v["m"] == m]
        pick = chosen[f"{pct:g}%"]["name"]
        sub = [c for c in candidates if c.name == pick or (c.kind == "random" and c.m == m) or c.kind == "full"]
        verdict = judge(task, next(t for t in result["trials"] if t["name"] == pick),
                        _values(WORK, cfg, test_pool, sub, task),
                        [t for t in result["trials"] if t["kind"] == "random" and t["m"] == m],
                        next(t for t in result["trials"] if t["kind"] == "full"), np.random.default_rng([0, 11]))
        table[f"{pct:g}%"] = {"pipeline": trials[pick]["test_score"], "chose": pick,
                              "random_mean": float(np.mean([r["test_score"] for r in rnd])),
                              "random_std": float(np.std([r["test_score"] for r in rnd])),
                              "pipeline_cpu_s": trials[pick]["cpu_seconds"],
                              "random_cpu_s": float(np.mean([r["cpu_seconds"] for r in rnd])),
                              "verdict": verdict}
        print("\n".join(verdict["lines"]), flush=True)
    print(f"\n| {name}, {settings['model']} fine-tuned (test half, {len(test_pool)} rows) | " + " | ".join(table) + " |")
    print("|---|" + "---|" * len(table))
    print("| pipeline's choice | " + " | ".join(f"{100 * r['pipeline']:.1f} ({r['chose']}, {r['pipeline_cpu_s']:.0f} CPU-s)"
                                                for r in table.values()) + " |")
    print("| random (mean ± std) | " + " | ".join(f"{100 * r['random_mean']:.1f} ± {100 * r['random_std']:.1f} "
                                                  f"({r['random_cpu_s']:.0f} CPU-s)" for r in table.values()) + " |")
    print("| choice minus random, 95% interval | " + " | ".join(
        f"{100 * r['verdict']['vs_random']['diff']:+.1f} ({100 * r['verdict']['vs_random']['low']:+.1f} to "
        f"{100 * r['verdict']['vs_random']['high']:+.1f})" for r in table.values()) + " |")
    print(f"| full pool ({full['status']}, {full['epochs']:.1f} epochs) | " + " | ".join(
        f"{100 * full['test_score']:.1f} ({full['cpu_seconds']:.0f} CPU-s)" for _ in table) + " |")
    out = {"machine": machine(), "args": vars(args), "split": split, "chosen": chosen, "trials": trials,
           "table": table, "seconds": time.perf_counter() - t0}
    tag = "" if args.budgets == [2] else "-" + "-".join(f"{b:g}pct" for b in args.budgets)  # 2%: the README's table
    tag = tag if name == "banking77" else f"-{name}{tag}"
    print(f"wrote {save('quality-finetune' + tag, out)}")


def _values(work: Path, cfg, test_pool, cands, task) -> dict:
    """Per-sample test values of the trials in ``cands`` (the sweep's verdict covers its target only)."""
    from ray_pipeline.finetune.infer import per_sample_values
    data = task.arrays(test_pool, read_pool(cfg.data).label_codes()[0])
    return {c.name: per_sample_values(str(work / "trials" / c.name / "best_model"), cfg.finetune, data)
            for c in cands if (work / "trials" / c.name / "best_model").is_dir()}


if __name__ == "__main__":
    main()
