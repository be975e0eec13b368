"""Does the selection beat random on instruction data? SmolLM2-135M-Instruct with LoRA, fine-tuned
on chosen, random and full pools of four instruction sources; held-out response loss per source.

The pool is the four instruction files in ../shared/data/instruct (Alpaca demo, GSM8K, GPTeacher
Toolformer, Alpaca seed tasks; about 16k samples), each turned into a ``messages`` conversation
(user: instruction + input, assistant: output), the chat form the pipeline trains with its chat
template and assistant-only loss. Held out first, seeded: ``--held-out-per-source`` samples of
each source, half *validation* (chooses) and half *test* (only reports), so every source weighs
the same; the rest is the pool (``--pool-size``: a seeded sample of it, stratified by source, for
machines that cannot fine-tune on all of it).

Per budget (``--budgets``, percent of the pool) and per embedder (``--embedders``: ``minilm``,
the pipeline's default; ``smollm2``: the mean-pooled hidden states of the causal LM being tuned,
RDS+ of Ivison et al. 2025), the pipeline's default grid (``cluster.k: [M/2, M]``,
``select.method: [kcenter, centroid]``) gives the candidates; ``--seeds`` random subsets of the
same size and the full pool are the baselines. Every trial is fine-tuned by ``finetune.sweep.run_sweep``
(Ray Tune over Ray Train + DeepSpeed, LoRA) under one rule: until its validation loss has not
improved for ``--patience`` evaluations, or ``--max-epochs`` passes, at most ``--max-steps``.
No ASHA, so every candidate's final loss is known and the proxies can be ranked against it.

Label-free proxies, each scored against the fine-tuned *test* loss by Spearman's rho over the
trials of a budget (selection candidates and random subsets):

- ``coverage``: the mean over validation samples of the highest cosine (MiniLM) to the subset;
- ``short run``: the validation loss at a trial's first evaluation (``--eval-every`` steps: a
  short LoRA run, as successive halving sees it);
- ``base loss``: the base model's mean response loss on the subset (higher: more to learn).

The pipeline's choice per budget and embedder: the selection candidate with the best
*validation* loss (no oracle; the pipeline with ``finetune.proxy.top_candidates`` empty), and
the pipeline as it ships (``finetune.proxy.kind: auto``, coverage here;
``ray_pipeline.finetune.proxy.prune`` keeps 3 of the embedder's candidates over all budgets,
each budget's best first, and validation chooses among those kept at a budget), and the same
with the base model's loss keeping 3; reported on the test part
against random's mean and spread and against the full pool, with each trial's cost (CPU-seconds
or GPU-seconds, samples seen). Writes ``benchmarks/results/NAME-{cpu,gpu}.json`` (``--name``,
default ``quality-instruction``) and prints Markdown tables; ``--retable FILE`` recomputes the
tables of a stored run from its trials (no fine-tuning).

    .venv/bin/python -m benchmarks.quality_instruction                       # the issue's settings (a GPU)
    .venv/bin/python -m benchmarks.quality_instruction --pool-size 1600 --held-out-per-source 40 \
        --max-length 128 --max-epochs 2 --max-steps 100                       # a 2-core CPU: about 90 minutes
    .venv/bin/python -m benchmarks.quality_instruction --pool-size 1600 --held-out-per-source 40 \
        --max-length 128 --max-epochs 2 --max-steps 100 --embedders minilm --no-full \
        --seed 1 --name quality-instruction-seed1                              # a repetition: another split
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from benchmarks._common import embed_texts, machine, save

from ray_pipeline.io.chat import embed_text
from ray_pipeline.config import Config, DataConfig, EmbedConfig
from ray_pipeline.finetune.infer import per_sample_values
from ray_pipeline.finetune.heldout import Parts, read_task_pool, stratified_sample
from ray_pipeline.finetune.metrics import spearman
from ray_pipeline.io.models import resolve
from ray_pipeline.finetune.proxy import coverage, prune, score_base_loss, token_mean_loss
from ray_pipeline.select.engine import select_candidates
from ray_pipeline.finetune.sweep import Candidate, run_sweep
from ray_pipeline.finetune.task import CausalLM

INSTRUCT = Path(__file__).resolve().parents[2] / "shared" / "data" / "instruct"
CACHE = Path(__file__).resolve().parent / ".cache" / "quality-instruction"
SOURCES = {"alpaca_demo": "dataflex_alpaca_en_demo.json", "gsm8k": "gsm8k_train_alpacafmt.json",
           "toolformer": "gpteacher_toolformer_dedupe.json", "seed_tasks": "alpaca_seed_tasks.jsonl"}
EMBEDDERS = {"minilm": "MiniLM (the default encoder)", "smollm2": "RDS+ (SmolLM2 mean-pooled hidden states)"}


def load_records() -> list[dict]:
    """Every sample of the four files as {id, source, messages}; a seed task is its first instance."""
    out = []
    for source, name in SOURCES.items():
        path = INSTRUCT / name
        rows = ([json.loads(line) for line in path.read_text().splitlines() if line.strip()]
                if path.suffix == ".jsonl" else json.loads(path.read_text()))
        for i, r in enumerate(rows):
            if "instances" in r:
                r = {"instruction": r["instruction"], **r["instances"][0]}
            user = r["instruction"].strip() + (f"\n\n{r['input'].strip()}" if (r.get("input") or "").strip() else "")
            if not user or not (r.get("output") or "").strip():
                continue
            out.append({"id": f"{source}-{i}", "source": source,
                        "messages": [{"role": "user", "content": user},
                                     {"role": "assistant", "content": r["output"].strip()}]})
    return out


def split(records: list[dict], per_source: int, pool_size: int, rng: np.random.Generator) -> dict[str, list]:
    """validation / test: per_source // 2 and the rest of per_source of each source; pool: the
    others, a sample of pool_size stratified by source when pool_size is set."""
    sources = np.array([r["source"] for r in records])
    val, test, pool = [], [], []
    for s in SOURCES:
        rows = rng.permutation(np.flatnonzero(sources == s))
        val += rows[:per_source // 2].tolist()
        test += rows[per_source // 2:per_source].tolist()
        pool += rows[per_source:].tolist()
    pool = np.sort(np.array(pool))
    if pool_size and pool_size < len(pool):
        pool = pool[stratified_sample(sources[pool], len(pool), pool_size, rng)]
    return {"pool": [records[i] for i in pool], "validation": [records[i] for i in sorted(val)],
            "test": [records[i] for i in sorted(test)]}


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def vectors(model: str, rows: list[dict], max_length: int) -> np.ndarray:
    """(n, d) embeddings of the conversations (the text the pipeline embeds, ``chat_text: all``),
    cached by model, rows and length."""
    texts = np.array([embed_text(r["messages"], "all") for r in rows], dtype=object)
    key = hashlib.sha256(json.dumps([model, max_length, [r["id"] for r in rows]]).encode()).hexdigest()[:16]
    path = CACHE / f"{model}-{key}.npy"
    if not path.is_file():
        CACHE.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        x = embed_texts(texts, EmbedConfig(model=model, max_length=max_length, batch_size=32, device="cpu"))
        np.save(path, x)
        print(f"embedded {len(rows)} rows with {model} in {time.perf_counter() - t0:.0f}s", flush=True)
    return np.load(path)


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.quality_instruction", description=__doc__.split("\n\n")[0])
    p.add_argument("--budgets", nargs="+", type=float, default=[1, 5], help="percent of the pool")
    p.add_argument("--embedders", nargs="+", default=list(EMBEDDERS), choices=list(EMBEDDERS))
    p.add_argument("--seeds", type=int, default=3, help="random subsets per budget")
    p.add_argument("--pool-size", type=int, default=0, help="a stratified sample of the pool (0: all of it)")
    p.add_argument("--held-out-per-source", type=int, default=100, help="half validation, half test")
    p.add_argument("--embed-max-length", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=192, help="tokens per conversation in training")
    p.add_argument("--max-epochs", type=float, default=3.0)
    p.add_argument("--max-steps", type=int, default=150, help="the cap every trial shares (the full pool reaches it)")
    p.add_argument("--eval-every", type=int, default=5)
    p.add_argument("--patience", type=int, default=3)
    p.add_argument("--no-full", action="store_true", help="leave out the full pool")
    p.add_argument("--seed", type=int, default=0, help="the held-out split, the pool's sample and the selection's "
                                                     "seed (another seed: an independent repetition)")
    p.add_argument("--stratify-source", action="store_true",
                   help="split each budget over the four sources, as the pipeline does with data.label_column: source")
    p.add_argument("--name", default="quality-instruction", help="results file: benchmarks/results/NAME-cpu.json")
    p.add_argument("--retable", type=Path, help="recompute and print the tables of a results file from its stored "
                                              "trials (no fine-tuning), and write it back")
    args = p.parse_args()
    if args.retable:
        return retable(args.retable)

    t_start = time.perf_counter()
    parts = split(load_records(), args.held_out_per_source, args.pool_size, np.random.default_rng(args.seed))
    work = CACHE / "run"
    if work.exists():
        shutil.rmtree(work)
    (work / "data").mkdir(parents=True)
    paths = {k: write_jsonl(v, work / "data" / f"{k}.jsonl") for k, v in parts.items()}
    n = len(parts["pool"])
    print(f"pool {n} ({_counts(parts['pool'])}), validation {len(parts['validation'])}, "
          f"test {len(parts['test'])}", flush=True)

    cfg = Config.from_dict({
        "data": {"path": str(paths["pool"]), "id_column": "id"},
        "finetune": {"task": "instruction", "model": "default",
                     "heldout": {"eval_path": str(paths["validation"]), "test_path": str(paths["test"]),
                                 "eval_limit": None},
                     "train": {"lr": args.lr, "batch_size": args.batch_size, "eval_batch_size": 16,
                               "max_length": args.max_length, "max_epochs": args.max_epochs,
                               "max_steps": args.max_steps, "eval_every": args.eval_every, "patience": args.patience},
                     "sweep": {"early_stopping": False, "max_concurrent_trials": 1},
                     "resources": {"threads_per_worker": os.cpu_count()}, "proxy": {"top_candidates": None}},
        "output_dir": str(work), "seed": args.seed})
    data_cfg = lambda path: DataConfig(path=str(path), id_column="id")  # noqa: E731
    pool = read_task_pool(data_cfg(paths["pool"]), cfg)
    val_pool = read_task_pool(data_cfg(paths["validation"]), cfg)
    test_pool = read_task_pool(data_cfg(paths["test"]), cfg)

    x = {e: vectors(e, parts["pool"], args.embed_max_length) for e in args.embedders}
    x_val = vectors("minilm", parts["validation"], args.embed_max_length)
    x_cov = x["minilm"] if "minilm" in x else vectors("minilm", parts["pool"], args.embed_max_length)

    budgets = {pct: max(1, int(round(pct / 100 * n))) for pct in args.budgets}
    pool_sources = np.array([r["source"] for r in parts["pool"]], dtype=object) if args.stratify_source else None
    candidates = []
    for m in budgets.values():
        cfg_m = Config.from_dict({"select": {"budgets": [m], "random_seeds": list(range(args.seeds))},
                                  "seed": args.seed})
        for i, e in enumerate(args.embedders):
            sel = select_candidates(x[e], cfg_m, rng=np.random.default_rng(args.seed),
                                    labels=pool_sources)  # the default grid for M (stratify: auto)
            candidates += [Candidate(f"{e}_{s.name(m)}", "selection", np.flatnonzero(s.members(m)), k=s.k, m=m,
                                     extra={"method": s.method, "embedder": e}) for s in sel.per_k]
            if i == 0:  # the random subsets depend on the rng alone: the same for every embedder
                candidates += [Candidate(f"random_m{m}_s{seed}", "random", np.flatnonzero(rank < m), m=m, seed=seed)
                               for seed, rank in sel.random.items()]
    if not args.no_full:
        candidates.append(Candidate("full", "full", np.arange(n)))

    t0 = time.perf_counter()
    proxies = {c.name: {"coverage": coverage(x_cov[c.rows], x_val)} for c in candidates}
    coverage_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    subset_rows = np.unique(np.concatenate([c.rows for c in candidates if c.kind != "full"]))
    base = per_sample_values(resolve("smollm2"), cfg.finetune, CausalLM().arrays(pool.take(subset_rows)))
    for name, r in score_base_loss(base, subset_rows, {c.name: np.sort(c.rows) for c in candidates
                                                       if c.kind != "full"}).items():
        proxies[name]["base_loss"] = r["base_loss"]  # every row of the candidate, as proxy_rows empty
    base_s = time.perf_counter() - t0
    print(f"proxies: coverage of {len(candidates)} candidates in {coverage_s:.1f}s; base-model loss on "
          f"{len(subset_rows)} rows in {base_s:.0f}s", flush=True)

    print(f"fine-tuning {len(candidates)} trials (SmolLM2-135M-Instruct + LoRA, batch {args.batch_size}, "
          f"{args.max_length} tokens, patience {args.patience} x {args.eval_every} steps, <= {args.max_epochs:g} "
          f"epochs, <= {args.max_steps} steps)", flush=True)
    sweep_dir = work / "sweep"
    result = run_sweep(candidates, pool, Parts(val_pool, test_pool, {"how": "given"}), cfg, sweep_dir)
    sources = np.array([r["source"] for r in parts["test"]])
    trials = {}
    for t in result["trials"]:
        path = sweep_dir / "trials" / t["name"] / "test_values.npy"
        if not path.is_file():
            print(f"  {t['name']}: {t['status']} (no test values)", flush=True)
            continue
        v = np.load(path)
        hist = t.get("history") or []
        cost_key = "gpu_seconds" if "gpu_seconds" in t else "cpu_seconds"
        trials[t["name"]] = {
            **{k: t.get(k) for k in ("kind", "m", "k", "method", "embedder", "size", "status", "steps", "epochs",
                                     "samples_seen", "wall_s")},
            "cost_s": t[cost_key], "cost_unit": cost_key,
            "validation_loss": -t["validation_score"], "test_loss": token_mean_loss(v),
            "test_loss_by_source": {s: token_mean_loss(v[sources == s]) for s in SOURCES},
            "short_run_loss": hist[0]["eval_loss"] if hist else None, **proxies[t["name"]]}
        r = trials[t["name"]]
        print(f"  {t['name']}: {r['status']}, {r['steps']} steps ({r['epochs']:.1f} epochs), validation "
              f"{r['validation_loss']:.4f}, test {r['test_loss']:.4f}, {r['cost_s']:.0f} {cost_key}", flush=True)

    table = {f"{pct:g}%": _budget_row(trials, m, args.embedders) for pct, m in budgets.items()}
    out = {"machine": machine(), "args": vars(args), "pool": {"rows": n, "by_source": _counts(parts["pool"])},
           "validation_rows": len(parts["validation"]), "test_rows": len(parts["test"]), "budgets": budgets,
           "trials": trials, "table": table, "full": trials.get("full"),
           "proxy_seconds": {"coverage": coverage_s, "base_loss": base_s},
           "sweep_seconds": result["summary"]["sweep_seconds"], "seconds": time.perf_counter() - t_start}
    _print_tables(out)
    print(f"wrote {save(args.name, out)}")


def retable(path: Path) -> None:
    """The tables of a stored run recomputed from its trials, e.g. after the shipped proxy changed."""
    out = json.loads(path.read_text())
    embedders = out["args"]["embedders"]
    out["table"] = {f"{float(pct):g}%": _budget_row(out["trials"], m, embedders) for pct, m in out["budgets"].items()}
    _print_tables(out)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(out, indent=2) + "\n")  # as save() writes it
    tmp.replace(path)
    print(f"rewrote {path}")


def _counts(rows: list[dict]) -> dict[str, int]:
    return {s: sum(r["source"] == s for r in rows) for s in SOURCES}


def _budget_row(trials: dict, m: int, embedders: list[str]) -> dict:
    """One budget: random's spread, each embedder's choice (best validation loss), proxies' rho."""
    here = {k: v for k, v in trials.items() if v["m"] == m and v["kind"] in ("selection", "random")}
    rnd = [v for v in here.values() if v["kind"] == "random"]
    row = {"m": m, "random": {"mean": float(np.mean([r["test_loss"] for r in rnd])),
                              "std": float(np.std([r["test_loss"] for r in rnd])), "n": len(rnd),
                              "by_source": {s: float(np.mean([r["test_loss_by_source"][s] for r in rnd]))
                                            for s in SOURCES},
                              "cost_s": float(np.mean([r["cost_s"] for r in rnd]))}}
    full = trials.get("full")
    for e in embedders:
        mine = {k: v for k, v in here.items() if v.get("embedder") == e}
        if not mine:
            continue
        name = min(mine, key=lambda k: (mine[k]["validation_loss"], mine[k]["size"]))
        best = min(mine, key=lambda k: mine[k]["test_loss"])
        c = mine[name]
        row[e] = {"choice": name, "test_loss": c["test_loss"], "by_source": c["test_loss_by_source"],
                  "minus_random": c["test_loss"] - row["random"]["mean"],
                  "random_stds": (c["test_loss"] - row["random"]["mean"]) / max(row["random"]["std"], 1e-12),
                  "regret": c["test_loss"] - mine[best]["test_loss"], "best_in_hindsight": best,
                  "cost_s": c["cost_s"], "all_candidates_cost_s": float(sum(v["cost_s"] for v in mine.values())),
                  "candidates": {k: v["test_loss"] for k, v in mine.items()}}
        if full:
            row[e]["over_full_pct"] = 100 * (c["test_loss"] / full["test_loss"] - 1)
            row[e]["cost_share_of_full"] = c["cost_s"] / full["cost_s"]
        # As the pipeline ships (finetune.proxy.kind: auto -> coverage, proxy.top_candidates: 3), and
        # with the base model's loss: proxy.prune keeps 3 of this embedder's candidates over all budgets,
        # each budget's best first; the best validation loss among those kept here is chosen.
        everywhere = {k: v for k, v in trials.items() if v["kind"] == "selection" and v.get("embedder") == e}
        cands = [SimpleNamespace(name=k, kind="selection", m=v["m"]) for k, v in sorted(everywhere.items())]
        for key, proxy in (("shipped", "coverage"), ("base_loss_keeps_3", "base_loss")):
            kept = [c.name for c in prune(cands, {k: {"score": v[proxy]} for k, v in everywhere.items()}, 3)]
            top = [k for k in kept if k in mine]
            if not top:
                row[e][key] = {"fine_tuned": [], "choice": None, "proxy": proxy}
                continue
            pick = min(top, key=lambda k: (mine[k]["validation_loss"], mine[k]["size"]))
            row[e][key] = {"proxy": proxy, "fine_tuned": top, "choice": pick, "test_loss": mine[pick]["test_loss"],
                           "minus_random": mine[pick]["test_loss"] - row["random"]["mean"],
                           "cost_s": float(sum(mine[k]["cost_s"] for k in top))}
    # Proxies: rank correlation of each proxy's "goodness" with -test loss over this budget's trials.
    good = [-v["test_loss"] for v in here.values()]
    row["proxy_rho"] = {
        "coverage": spearman([v["coverage"] for v in here.values()], good),
        "short_run": spearman([-v["short_run_loss"] for v in here.values()], good),
        "base_loss": spearman([v["base_loss"] for v in here.values()], good),
        "validation_loss": spearman([-v["validation_loss"] for v in here.values()], good),
        "trials": len(here)}
    return row


def _print_tables(out: dict) -> None:
    table, full = out["table"], out["full"]
    budgets = list(table)
    unit = "GPU-s" if out["machine"]["gpu"] else "CPU-s"
    print(f"\n| test response loss (lower is better), pool {out['pool']['rows']} | " + " | ".join(budgets) + " |")
    print("|---|" + "---|" * len(budgets))
    print("| random (mean ± std) | " + " | ".join(
        f"{r['random']['mean']:.4f} ± {r['random']['std']:.4f} ({r['random']['cost_s']:.0f} {unit})"
        for r in table.values()) + " |")
    for e, label in EMBEDDERS.items():
        if all(e in r for r in table.values()):
            print(f"| pipeline, {label} | " + " | ".join(
                f"{r[e]['test_loss']:.4f} ({r[e]['minus_random']:+.4f}, {r[e]['random_stds']:+.1f} std; "
                f"{r[e]['choice']}; {r[e]['cost_s']:.0f} {unit})" for r in table.values()) + " |")
            for key, what in (("shipped", "as shipped: coverage keeps 3"),
                              ("base_loss_keeps_3", "the base model's loss keeps 3")):
                print(f"| pipeline {what} ({label}), validation chooses | " + " | ".join(
                    "no candidate kept" if r[e][key]["choice"] is None else
                    f"{r[e][key]['test_loss']:.4f} ({r[e][key]['minus_random']:+.4f}; {r[e][key]['choice']})"
                    for r in table.values()) + " |")
            if full:
                print(f"| {label}: over full, cost share of full | " + " | ".join(
                    f"{r[e]['over_full_pct']:+.1f}%, {r[e]['cost_share_of_full']:.2f}x" for r in table.values()) + " |")
            print(f"| {label}: regret (vs best candidate in hindsight) | " + " | ".join(
                f"{r[e]['regret']:+.4f}" for r in table.values()) + " |")
    if full:
        print(f"| full pool ({full['status']}, {full['steps']} steps, {full['epochs']:.2f} epochs) | " + " | ".join(
            f"{full['test_loss']:.4f} ({full['cost_s']:.0f} {unit})" for _ in budgets) + " |")
    print("\n| Spearman's rho with the fine-tuned test loss (higher: ranks better) | " + " | ".join(budgets) + " |")
    print("|---|" + "---|" * len(budgets))
    for k in ("coverage", "short_run", "base_loss", "validation_loss"):
        print(f"| {k} | " + " | ".join("–" if r["proxy_rho"][k] is None else f"{r['proxy_rho'][k]:+.2f}"
                                       for r in table.values()) + " |")
    print("\n| test loss by source | " + " | ".join(f"{b} {w}" for b in budgets for w in ("random", "pipeline"))
          + (" | full |" if full else " |"))
    print("|---|" + "---|" * (2 * len(budgets) + bool(full)))
    first = next((e for e in EMBEDDERS if all(e in r for r in table.values())), None)
    for s in SOURCES:
        cells = [f"{r['random']['by_source'][s]:.4f}" if w == "random" else
                 (f"{r[first]['by_source'][s]:.4f}" if first else "–")
                 for r in table.values() for w in ("random", "pipeline")]
        if full:
            cells.append(f"{full['test_loss_by_source'][s]:.4f}")
        print(f"| {s} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
