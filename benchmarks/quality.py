"""Does the selection beat random? A linear-probe quality benchmark on real data.

For banking77, 20newsgroups and tweeteval_emoji (MiniLM embeddings through the pipeline's own
embedding stage, cached under benchmarks/.cache/quality), and FSDD speech (``fsdd-speaker``,
``fsdd-digit``: GE2E vectors of the recordings, labelled by speaker or digit), at budgets of 1, 2, 5, 10 and 20% of
the pool and the full pool, every method's subset trains a logistic regression on the frozen
embeddings, scored on held-out data:

- ``random``: uniform subsets, 5 seeds (mean ± std);
- ``kcenter K=M/4``, ``K=M/2``, ``K=M``: the method of METHOD.md with K relative to the budget;
- ``kcenter K=100``: a fixed K (about sqrt(N) for banking77), as in the issue's table;
- ``centroid K=M``: the members nearest each centroid (the nearest-to-centroid variant);
- ``robust K=M/2``: k-center with the 10% of each cluster farthest from its centroid left out;
- ``global k-center``: one cluster, farthest-first over the whole pool (DeepCore / Google style);
- ``dedup K=M``: near-duplicates (cosine > 0.95, SemDeDup) removed before clustering;
- ``stratified K=M`` / ``stratified centroid K=M``: label-stratified budgets (the labels known);
- ``kcenter K=M, hierarchical`` / ``centroid K=M, hierarchical``: the same as ``kcenter K=M`` /
  ``centroid K=M`` with multi-level k-means (``cluster.algorithm: hierarchical``, the default tree);
  ``kcenter K=M, tree B/L`` / ``centroid K=M, tree B/L``: with ``branching: B, leaf: L`` instead;
- ``boundary K=M`` / ``stratified boundary K=M``: the budget-aware candidate (module
  ``ray_pipeline.select.boundary``): prototypes, then the samples a probe fit on them is least sure of,
  a share 2.5 M/N (at most half) of the budget;
- ``pipeline, not stratified``: the same with ``select.stratify: none``; ``pipeline with
  boundary``: the same with the boundary candidates among those the proxy chooses from;
- ``pipeline``: the pipeline's own choice, no oracle: the candidates of the default config
  (``cluster.k: [M/2, M]``, ``select.method: [kcenter, centroid]``, ``select.stratify:
  auto``, which stratifies by label as the labels are known), of which the one with the
  best probe score on a *validation* half of the official test set is reported on the other half
  (``test``), which no choice ever sees. Its *regret* is the best of those candidates on ``test``
  (in hindsight) minus the one chosen, in points.

Every number in the tables is accuracy on the ``test`` half. Label coverage (share of the pool's
labels in the subset) is reported beside. Writes ``benchmarks/results/quality-cpu.json`` and
prints Markdown tables.

    .venv/bin/python -m benchmarks.quality                      # all three datasets
    .venv/bin/python -m benchmarks.quality --datasets banking77 --budgets 1 2 5
    .venv/bin/python -m benchmarks.quality --datasets fsdd-speaker fsdd-digit --name quality-fsdd --threads 1
    .venv/bin/python -m benchmarks.quality --methods "kcenter K=M" "kcenter K=M, hierarchical"
    .venv/bin/python -m benchmarks.quality --methods "centroid K=M" "centroid K=M, hierarchical" --cluster-seeds 3

``--cluster-seeds N`` runs each method row with the run seeds 0..N-1 (k-means' sampling and
initialisation; the probe and the held-out halves stay fixed) and reports mean ± std, so that a
difference between two clusterings can be read against the seed-to-seed spread of either. The
pipeline rows too: each run seed makes its own candidates and its own choice on the validation
half, and the row reports the chosen candidates' mean ± std on test and the mean regret.

    .venv/bin/python -m benchmarks.quality --methods "centroid K=M" "stratified centroid K=M" --cluster-seeds 3 --name quality-seeds
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from benchmarks._common import machine, save

from ray_pipeline.config import Config, DataConfig, EmbedConfig
from ray_pipeline.io.pool import read_pool
from ray_pipeline.embed.stage import embed_pool, load_stage
from ray_pipeline.select.engine import select_candidates
from ray_pipeline.finetune.proxy import linear_probe

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
CACHE = Path(__file__).resolve().parent / ".cache" / "quality"
TWEET = SHARED / "tweeteval_emoji"
DATASETS = {
    "banking77": (DataConfig(path=str(SHARED / "banking77" / "train.csv"), label_column="category"),
                  DataConfig(path=str(SHARED / "banking77" / "test.csv"), label_column="category")),
    "20newsgroups": (DataConfig(path=str(SHARED / "20newsgroups" / "20ng_bydate_train.jsonl"), label_column="label"),
                     DataConfig(path=str(SHARED / "20newsgroups" / "20ng_bydate_test.jsonl"), label_column="label")),
    "tweeteval_emoji": (DataConfig(path=str(TWEET / "train_text.txt"), labels_path=str(TWEET / "train_labels.txt")),
                        # the first 10,000 of the 50,000 test tweets: enough for +-1 point
                        DataConfig(path=str(TWEET / "test_text.txt"), labels_path=str(TWEET / "test_labels.txt"),
                                   limit=10_000)),
}
# Speech: FSDD recordings through the packaged GE2E speaker encoder, labelled by speaker or by digit
# (one embedding stage for both: the stage's key is the recordings and the encoder, not the labels).
FSDD = SHARED / "fsdd"
for _label in ("speaker", "digit"):
    DATASETS[f"fsdd-{_label}"] = tuple(DataConfig(path=str(FSDD / f), audio_column="audio", id_column="id",
                                                  label_column=_label) for f in ("train.csv", "test.csv"))
STAGE_ROOT = {"fsdd-speaker": "fsdd", "fsdd-digit": "fsdd"}
# (name, cluster.k, select options): the K grid and the variants; "pipeline" picks among DEFAULT_GRID.
METHODS = [
    ("kcenter K=M/4", ["M/4"], {}),
    ("kcenter K=M/2", ["M/2"], {}),
    ("kcenter K=M", ["M"], {}),
    ("kcenter K=100", [100], {}),
    ("centroid K=M", ["M"], {"method": "centroid"}),
    ("robust K=M/2", ["M/2"], {"outlier_quantile": 0.1}),
    ("global k-center", [1], {}),
    ("dedup K=M", ["M"], {"dedup_threshold": 0.95}),
    ("stratified K=M", ["M"], {"stratify": "label"}),
    ("stratified centroid K=M", ["M"], {"stratify": "label", "method": "centroid"}),
    ("kcenter K=M, hierarchical", ["M"], {"cluster": {"algorithm": "hierarchical"}}),
    ("centroid K=M, hierarchical", ["M"], {"method": "centroid", "cluster": {"algorithm": "hierarchical"}}),
    ("boundary K=M", ["M"], {"method": "boundary"}),
    ("stratified boundary K=M", ["M"], {"method": "boundary", "stratify": "label"}),
]
# other tree shapes (branching, leaf) against the default tree, for the table of shapes: run only when named
TREE_SHAPES = [(f"{name} K=M, tree {b}/{leaf}", ["M"], {**extra, "cluster": {"algorithm": "hierarchical", "branching": b, "leaf": leaf}})
               for b, leaf in [(16, 16), (32, 32), (64, 64), (16, 4)]
               for name, extra in [("kcenter", {}), ("centroid", {"method": "centroid"})]]
METHODS += TREE_SHAPES
OPT_IN = {t[0] for t in TREE_SHAPES}


def vectors(name: str, split: int, data: DataConfig) -> tuple[np.ndarray, np.ndarray]:
    """MiniLM (or, for a speech pool, GE2E) vectors and integer-coded labels (as strings) of a
    dataset split, via the stage."""
    pool = read_pool(data)
    stage_root = CACHE / f"{STAGE_ROOT.get(name, name)}-{'train' if split == 0 else 'test'}"
    manifest = embed_pool(pool, EmbedConfig(engine="local"), stage_root, progress=True)
    keep, x = load_stage(stage_root / manifest["key"], pool.ids)
    return x, np.array([str(v) for v in pool.labels[keep]], dtype=object)


def coded(labels: np.ndarray, xe: np.ndarray, labels_e: np.ndarray):
    """The pool's labels as ints; the held-out rows of a label the pool has, their int labels; the
    held-out set's validation and test halves (one fixed permutation); the sorted label names."""
    classes = sorted(set(labels))
    index = {c: i for i, c in enumerate(classes)}
    y = np.array([index[c] for c in labels])
    keep_e = np.array([c in index for c in labels_e])
    xe, ye = xe[keep_e], np.array([index[c] for c in labels_e[keep_e]])
    half = np.random.default_rng(0).permutation(len(ye))
    return y, xe, ye, half[: len(ye) // 2], half[len(ye) // 2:], classes


def run_dataset(name: str, budgets_pct: list[float], seeds: int, only: tuple = (), cluster_seeds: int = 1) -> dict:
    t0 = time.perf_counter()
    x, labels = vectors(name, 0, DATASETS[name][0])
    y, xe, ye, val, test, classes = coded(labels, *vectors(name, 1, DATASETS[name][1]))
    n = len(y)
    print(f"\n== {name}: pool {n:,}, held-out {len(ye):,} (validation {len(val):,} / test {len(test):,}), "
          f"{len(classes)} labels; embedded in {time.perf_counter() - t0:.0f}s", flush=True)

    def probe(rows, on):
        return linear_probe(x[rows], y[rows], xe[on], ye[on], len(classes))["accuracy"]

    def coverage(rows):
        return len(np.unique(y[rows])) / len(classes)

    table: dict = {}
    full = probe(np.arange(n), test)
    for pct in budgets_pct:
        m = max(1, int(round(pct / 100 * n)))
        row: dict = {}
        rnd = [np.random.default_rng(s).choice(n, m, replace=False) for s in range(seeds)]
        accs = [probe(r, test) for r in rnd]
        row["random"] = {"mean": float(np.mean(accs)), "std": float(np.std(accs)),
                         "coverage": float(np.mean([coverage(r) for r in rnd]))}
        for label, k, opts in METHODS:
            if (label == "kcenter K=100" and 100 > n) or (only and label not in only) \
                    or (not only and label in OPT_IN):
                continue
            opts = dict(opts)
            accs, covs, t1 = [], [], time.perf_counter()
            for seed in range(cluster_seeds):  # the run's seed: k-means' sampling and initialisation
                cfg = Config.from_dict({"cluster": {"k": k, **opts.get("cluster", {})},
                                        "select": {"budgets": [m], "random_seeds": [], "stratify": "none",
                                                   **{o: v for o, v in opts.items() if o != "cluster"}},
                                        "seed": seed})
                sel = select_candidates(x, cfg, rng=np.random.default_rng(0), labels=labels)
                rows = np.flatnonzero(sel.per_k[0].members(m))
                accs.append(probe(rows, test))
                covs.append(coverage(rows))
            row[label] = {"mean": float(np.mean(accs)), "std": float(np.std(accs)), "seeds": accs,
                          "coverage": float(np.mean(covs)), "select_s": (time.perf_counter() - t1) / cluster_seeds}
        # The pipeline as it ships: the default grid, chosen by the proxy on the validation half;
        # and the same without label-stratified budgets (the default before the stratified one won).
        for label, extra in (("pipeline", {}), ("pipeline, not stratified", {"stratify": "none"}),
                             ("pipeline with boundary", {"method": ["kcenter", "centroid", "boundary"]})):
            runs = [pipeline_choice(x, labels, m, extra, seed, lambda rows: probe(rows, val),
                                    lambda rows: probe(rows, test)) for seed in range(cluster_seeds)]
            accs = [r["test"] for r in runs]
            row[label] = {"mean": float(np.mean(accs)), "std": float(np.std(accs)), "seeds": accs,
                          "coverage": float(np.mean([coverage(r["rows"]) for r in runs])),
                          "chose": runs[0]["chose"], "best": runs[0]["best"],
                          "regret": float(np.mean([r["regret"] for r in runs])),
                          "chose_per_seed": [r["chose"] for r in runs],
                          "regret_per_seed": [r["regret"] for r in runs],
                          "candidates_per_seed": [r["candidates"] for r in runs]}
        table[f"{pct:g}%"] = row
        print(f"  {pct:g}% (M={m:,}): random {row['random']['mean']:.3f}±{row['random']['std']:.3f}; "
              + "; ".join(f"{k} {v['mean']:.3f}" for k, v in row.items() if k not in ("random",))
              + f" [pipeline chose {row['pipeline']['chose']}]", flush=True)
    print(f"  full pool: {full:.3f}", flush=True)
    return {"n": n, "labels": len(classes), "held_out": len(ye), "full": full, "budgets": table,
            "seconds": time.perf_counter() - t0}


def pipeline_choice(x, labels, m: int, extra: dict, seed: int, on_val, on_test) -> dict:
    """The pipeline's own choice at budget m with run seed ``seed``: the default grid (with
    ``extra`` select options), the candidate with the best validation score, reported on test,
    and its regret (the best candidate on test, in hindsight, minus the one chosen)."""
    cfg = Config.from_dict({"select": {"budgets": [m], "random_seeds": [], **extra}, "seed": seed})
    sel = select_candidates(x, cfg, rng=np.random.default_rng(0), labels=labels)
    subsets = {s.name(m): np.flatnonzero(s.members(m)) for s in sel.per_k}
    val_scores = {name: on_val(rows) for name, rows in subsets.items()}
    test_scores = {name: on_test(rows) for name, rows in subsets.items()}
    choice = max(val_scores, key=val_scores.get)
    best = max(test_scores, key=test_scores.get)
    return {"test": test_scores[choice], "rows": subsets[choice], "chose": choice, "best": best,
            "regret": test_scores[best] - test_scores[choice],
            "candidates": {name: {"validation": val_scores[name], "test": test_scores[name]} for name in subsets}}


def markdown(name: str, r: dict) -> str:
    budgets = list(r["budgets"])
    methods = ["pipeline", "pipeline with boundary", "pipeline, not stratified", "random"] + [m[0] for m in METHODS]
    head = f"| {name}, {r['n']:,} samples, {r['labels']} labels | " + " | ".join(budgets) + " | full |"
    lines = [head, "|" + "---|" * (len(budgets) + 2)]
    for meth in methods:
        cells = []
        for b in budgets:
            v = r["budgets"][b].get(meth)
            if v is None:
                cells.append("–")
            elif meth == "random" or v.get("std"):
                cells.append(f"{100 * v['mean']:.1f} ± {100 * v['std']:.1f} ({100 * v['coverage']:.0f}%)")
            else:
                cells.append(f"{100 * v['mean']:.1f} ({100 * v['coverage']:.0f}%)")
        full = f"{100 * r['full']:.1f}" if meth == "pipeline" else ""
        lines.append(f"| {meth} | " + " | ".join(cells) + f" | {full} |")
    chose = ", ".join(f"{b}: {'/'.join(r['budgets'][b]['pipeline'].get('chose_per_seed') or [r['budgets'][b]['pipeline']['chose']])}"
                      for b in budgets)
    return ("\n".join(lines) + f"\n\nThe pipeline chose (on the validation half; per run seed): {chose}.\n\n"
            + summary(name, r, "pipeline") + "\n" + summary(name, r, "pipeline with boundary"))


def summary(name: str, r: dict, which: str) -> str:
    """The issue's yardsticks per budget: a pipeline row against random's mean (and its spread),
    against nearest-to-centroid, as a share of the full pool, and the proxy's regret. With
    ``--cluster-seeds`` above 1 the pipeline's figures are means over the run seeds (its own std
    after ±), and ``chosen`` / ``best in hindsight`` are run seed 0's."""
    budgets = list(r["budgets"])
    rows = {"− random's mean (random's std)": [], "− centroid K=M": [], "% of the full pool": [],
            "regret (best candidate in hindsight − chosen)": [], "chosen": [], "best in hindsight": []}
    for b in budgets:
        row = r["budgets"][b]
        p, rnd = row[which], row["random"]
        spread = f" ± {100 * p['std']:.1f}" if len(p.get("seeds", [])) > 1 else ""
        rows["− random's mean (random's std)"].append(
            f"{100 * (p['mean'] - rnd['mean']):+.1f}{spread} ({100 * rnd['std']:.1f})")
        cen = row.get("centroid K=M")
        rows["− centroid K=M"].append("–" if cen is None else f"{100 * (p['mean'] - cen['mean']):+.1f}")
        rows["% of the full pool"].append(f"{100 * p['mean'] / r['full']:.1f}")
        rows["regret (best candidate in hindsight − chosen)"].append(f"{100 * p.get('regret', 0.0):.1f}")
        rows["chosen"].append(p["chose"])
        rows["best in hindsight"].append(p.get("best", "–"))
    lines = [f"| {name}: {which} | " + " | ".join(budgets) + " |", "|" + "---|" * (len(budgets) + 1)]
    lines += [f"| {k} | " + " | ".join(v) + " |" for k, v in rows.items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    p.add_argument("--budgets", nargs="+", type=float, default=[1, 2, 5, 10, 20], help="percent of the pool")
    p.add_argument("--seeds", type=int, default=5, help="random subsets per budget")
    p.add_argument("--methods", nargs="+", default=[], choices=[m[0] for m in METHODS],
                   help="only these rows of the method table (the results go to quality-methods-*.json)")
    p.add_argument("--cluster-seeds", type=int, default=1,
                   help="the method rows over this many run seeds (k-means' own randomness): mean ± std")
    p.add_argument("--name", default="", help="results file benchmarks/results/NAME-{cpu,gpu}.json "
                   "(default: quality, or quality-methods with --methods)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (1 is faster on a loaded 2-core machine)")
    args = p.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    results = {d: run_dataset(d, args.budgets, args.seeds, tuple(args.methods), args.cluster_seeds) for d in args.datasets}
    print()
    for d, r in results.items():
        print(markdown(d, r))
    name = args.name or ("quality-methods" if args.methods else "quality")
    print(f"wrote {save(name, {'machine': machine(), 'args': vars(args), 'results': results})}")


if __name__ == "__main__":
    main()
