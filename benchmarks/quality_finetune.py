"""Does the selection beat random when the model is really fine-tuned? MiniLM through the Tune stage.

banking77 (MiniLM embeddings from the quality benchmark's cache), budgets 2% and 10%. The held-out
test set is split in two halves, as in ``quality.py``: the *validation* half is the fine-tune's
``eval_path`` (the pipeline's proxy choice, early stopping and best checkpoint all see only it);
the *test* half scores each trial's best model afterwards, and no choice ever sees it.

Per budget: the pipeline's own choice among the default grid's candidates (``cluster.k: [M/2, M]``,
``select.method: [kcenter, centroid]``, budgets stratified by label as ``select.stratify: auto`` does
when labels are known, best linear probe on the validation half) and ``--seeds``
random subsets of the same size, every one fine-tuned by ``tune.run_sweep`` (Ray Tune over Ray Train
+ DeepSpeed, FIFO so every trial runs its full schedule). Writes
``benchmarks/results/quality-finetune-{cpu,gpu}.json`` and prints a Markdown table.

    .venv/bin/python benchmarks/quality_finetune.py                  # about 30 minutes on 2 cores
    .venv/bin/python benchmarks/quality_finetune.py --budgets 2 --seeds 2 --max-steps 60
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, save  # noqa: E402
from quality import DATASETS, vectors  # noqa: E402

from ray_pipeline.config import Config  # noqa: E402
from ray_pipeline.data import Pool, read_pool  # noqa: E402
from ray_pipeline.finetune import predict  # noqa: E402
from ray_pipeline.pipeline import select_candidates  # noqa: E402
from ray_pipeline.proxy import linear_probe  # noqa: E402
from ray_pipeline.tune import Candidate, run_sweep  # noqa: E402

WORK = Path(__file__).resolve().parent / ".cache" / "quality-finetune"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budgets", nargs="+", type=float, default=[2, 10], help="percent of the pool")
    p.add_argument("--seeds", type=int, default=3, help="random subsets per budget")
    p.add_argument("--max-steps", type=int, default=200)
    p.add_argument("--eval-every", type=int, default=40)
    args = p.parse_args()

    t0 = time.perf_counter()
    name = "banking77"
    train_cfg, test_cfg = DATASETS[name]
    x, labels = vectors(name, 0, train_cfg)
    xe, labels_e = vectors(name, 1, test_cfg)
    pool, held = read_pool(train_cfg), read_pool(test_cfg)
    classes = sorted(set(labels))
    index = {c: i for i, c in enumerate(classes)}
    y = np.array([index[c] for c in labels])
    ye = np.array([index[c] for c in labels_e])
    half = np.random.default_rng(0).permutation(len(ye))  # the same halves as quality.py
    val, test = half[: len(ye) // 2], half[len(ye) // 2:]
    n = len(y)

    candidates, chosen = [], {}
    for pct in args.budgets:
        m = max(1, int(round(pct / 100 * n)))
        cfg = Config.from_dict({"select": {"budgets": [m], "random_seeds": list(range(args.seeds))}, "seed": 0})
        sel = select_candidates(x, cfg, rng=np.random.default_rng(0), labels=labels)  # stratified, as the pipeline
        subsets = {s.name(m): np.flatnonzero(s.members(m)) for s in sel.per_k}
        probe = {k: linear_probe(x[r], y[r], xe[val], ye[val], len(classes))["accuracy"] for k, r in subsets.items()}
        pick = max(probe, key=probe.get)
        chosen[f"{pct:g}%"] = {"name": pick, "proxy_val": probe}
        s = next(s for s in sel.per_k if s.name(m) == pick)
        candidates.append(Candidate(pick, "selection", subsets[pick], k=s.k, m=m, extra={"method": s.method}))
        candidates += [Candidate(f"random_m{m}_s{seed}", "random", np.flatnonzero(rank < m), m=m, seed=seed)
                       for seed, rank in sel.random.items()]
        print(f"{pct:g}% (M={m}): the pipeline chose {pick} (probe on validation {probe[pick]:.3f})", flush=True)

    if WORK.exists():
        shutil.rmtree(WORK)
    WORK.mkdir(parents=True)
    val_ids = set(held.ids[val].tolist())
    keep = np.array([i in val_ids for i in held.ids])
    eval_pool = Pool(ids=held.ids[keep], texts=held.texts[keep], labels=held.labels[keep], embeddings=None,
                     source=held.source)
    cfg = Config.from_dict({
        "data": {"path": train_cfg.path, "label_column": train_cfg.label_column},
        "finetune": {"eval_path": test_cfg.path, "model": "minilm", "lr": 1e-4, "batch_size": 32,
                     "max_steps": args.max_steps, "eval_every": args.eval_every, "patience": 3, "max_length": 64,
                     "eval_batch_size": 128, "early_stopping": False, "include_full": False,
                     "threads_per_worker": 2, "max_concurrent_trials": 1},
        "output_dir": str(WORK), "seed": 0})
    task_pool = Pool(ids=pool.ids, texts=pool.texts, labels=pool.labels, embeddings=None, source=pool.source)
    print(f"fine-tuning {len(candidates)} candidates (MiniLM, {args.max_steps} steps, batch 32)...", flush=True)
    result = run_sweep(candidates, task_pool, eval_pool, cfg, WORK)

    test_texts = held.texts[~keep].tolist()
    test_labels = [str(v) for v in held.labels[~keep]]
    trials = {}
    for t in result["trials"]:
        model = WORK / "trials" / t["name"] / "best_model"
        preds = predict(str(model), test_texts, max_length=64, batch_size=128) if model.is_dir() else []
        acc = float(np.mean([p["label"] == y_ for p, y_ in zip(preds, test_labels)])) if preds else None
        trials[t["name"]] = {"m": t["m"], "kind": t["kind"], "val": t["best_score"], "test": acc,
                             "steps": t["steps"], "status": t["status"], "wall_s": t["wall_s"]}
        print(f"  {t['name']}: validation {t['best_score']:.3f}, test {acc:.3f}", flush=True)
    table = {}
    for pct in args.budgets:
        m = max(1, int(round(pct / 100 * n)))
        rnd = [v["test"] for k, v in trials.items() if v["kind"] == "random" and v["m"] == m]
        pick = chosen[f"{pct:g}%"]["name"]
        table[f"{pct:g}%"] = {"pipeline": trials[pick]["test"], "chose": pick,
                              "random_mean": float(np.mean(rnd)), "random_std": float(np.std(rnd)), "random": rnd}
    print("\n| banking77, MiniLM fine-tuned (test half) | " + " | ".join(table) + " |")
    print("|---|" + "---|" * len(table))
    print("| pipeline | " + " | ".join(f"{100 * r['pipeline']:.1f} ({r['chose']})" for r in table.values()) + " |")
    print("| random | " + " | ".join(f"{100 * r['random_mean']:.1f} ± {100 * r['random_std']:.1f}"
                                      for r in table.values()) + " |")
    out = {"machine": machine(), "args": vars(args), "chosen": chosen, "trials": trials, "table": table,
           "seconds": time.perf_counter() - t0}
    print(f"wrote {save('quality-finetune', out)}")


if __name__ == "__main__":
    main()
