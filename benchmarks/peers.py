"""The selectors a user would pick instead, side by side with the pipeline: quality, then cost.

Quality (linear probe of ``benchmarks/quality.py``: logistic regression on the subset's MiniLM
vectors, accuracy on the test half of the held-out set; the pipeline chooses on the other,
validation, half), budgets 1, 2, 5, 10, 20% of the pool:

- ``random``: uniform subsets, 5 seeds (mean ± std);
- ``apricot FL`` / ``apricot FL, per label``: apricot-select's ``FacilityLocationSelection``
  (``metric='cosine'``, its default lazy greedy) on the whole pool, and label by label with the
  pipeline's proportional budgets (``kernels.proportional_budgets``); one greedy run to the
  largest budget, the smaller ones its prefixes (as greedy orders are);
- ``submodlib FL`` / ``submodlib FL, per label``: submodlib-py's ``FacilityLocationFunction``
  (dense, cosine) lazy greedy, on the whole pool and label by label as apricot's;
- ``SemDeDup + random``: near-duplicates removed (the pipeline's ``semantic_duplicates``
  kernel: k-means into sqrt(N) clusters, cosine > 0.95, as Abbas et al. 2023), then uniform
  sampling of the rest, 3 seeds; our re-implementation (no library);
- ``kMQ``: k-means into sqrt(N) clusters, then random members of each cluster in proportion to
  its size (Yu et al. 2024, "Diversify and conquer"), 3 seeds; our re-implementation;
- ``ZCore-style``: a label-free coverage-minus-redundancy score (Griffin et al. 2024, zero-shot
  coreset selection), the top-M by score; our re-implementation (:func:`zcore_scores`);
- ``FL per label (apricot's greedy)``: the same per label through select/facility.py's dense
  greedy (no numba compile; O(sum n_l^2 b_l), too slow for a 9,000-row label: ``--peers``);
- ``facility K=M/8``, ``M/4``, ``M/2``: the pipeline's facility-location family alone
  (select/facility.py), label-stratified as the default is;
- ``pipeline``: the pipeline's own choice by its proxy among the default grid's candidates;
  ``pipeline + facility``, ``+ facility to M/8`` and ``every method at M/8-M``: the same among
  more candidates (:data:`PIPELINES`), all from one select_candidates call a budget.

A peer whose dense similarity would pass ``--max-gib`` is reported with its projected need, not
run. The datasets are quality.py's (tweeteval_emoji: 45,000 tweets), its embedding cache shared.

Cost: selection wall time and peak memory (RSS above the vectors already held) of each peer and
of the pipeline's default ``select`` (with and without the facility family) on 10k, 100k and 1M
synthetic clustered 384-d unit vectors at budgets 1, 2 and 5% (the default ``select.budgets``:
a peer's greedy or score order gives all three at once), each in a process of its own (an
allocator keeps what one selector freed, which would hide the next one's peak); a peer that cannot
run at a size (a dense N x N similarity over ``--max-gib``, or a time at the size below that, grown
by the peer's exponent of N, passes ``--max-seconds``) is given its projected need. Each cell also
gives the time over the pipeline's default ``select`` at that size.

    .venv/bin/python -m benchmarks.peers                                 # quality and cost
    .venv/bin/python -m benchmarks.peers --skip-cost --datasets banking77 20newsgroups
    .venv/bin/python -m benchmarks.peers --skip-cost --datasets tweeteval_emoji --peers apricot apricot-per-label
    .venv/bin/python -m benchmarks.peers --skip-quality --sizes 10000 100000

Writes ``benchmarks/results/peers-cpu.json`` and prints Markdown tables.
"""

from __future__ import annotations

import argparse
import gc
import time

import numpy as np

from benchmarks._common import PeakRSS, machine, save
from benchmarks.peer_methods import (apricot_fl, apricot_fl_per_label, fl_per_label, kmq, semdedup_random,
                                     submodlib_fl, submodlib_fl_per_label, top_by_score, zcore_scores)
from benchmarks.quality import DATASETS, coded, vectors

from ray_pipeline.config import Config
from ray_pipeline.config.typed import parse_k
from ray_pipeline.finetune.proxy import linear_probe
from ray_pipeline.select.engine import select_candidates

# The three sets whole, as quality.py reads them (tweeteval_emoji: all 45,000 training tweets and the
# first 10,000 test tweets), so the two benchmarks share one embedding cache.
PEER_DATA = {name: DATASETS[name] for name in ("banking77", "20newsgroups", "tweeteval_emoji")}
# The pipeline's candidates the quality table measures: one select_candidates call per budget with
# every K spec and method below; the pipeline rows are the proxy's choice among a subset of them.
KS, METHODS = ("M/8", "M/4", "M/2", "M"), ("kcenter", "centroid", "facility")
PIPELINES = {  # row -> the (method, K spec) candidates the proxy chooses among
    "pipeline": [(m, k) for m in ("kcenter", "centroid") for k in ("M/2", "M")],  # the default grid
    "pipeline + facility": [(m, k) for m in METHODS for k in ("M/2", "M")],
    "pipeline + facility to M/8": [(m, k) for m in ("kcenter", "centroid") for k in ("M/2", "M")]
    + [("facility", k) for k in KS],
    "pipeline, every method at M/8-M": [(m, k) for m in METHODS for k in KS],
}
SINGLE = [("facility", k) for k in ("M/8", "M/4", "M/2")]  # candidate families reported alone


# ----------------------------------------------------------------------------------------------
# quality


def load(name: str):
    train, held = PEER_DATA[name]
    x, labels = vectors(name, 0, train)
    y, xe, ye, val, test, classes = coded(labels, *vectors(name, 1, held))
    return x, labels, y, xe, ye, val, test, len(classes)


# peer -> bytes of the dense similarity it holds, from the pool's size n and its label sizes; a
# peer whose need is over --max-gib is reported with it instead of run.
DENSE_NEED = {
    "apricot FL": (lambda n, sizes: 8.0 * n * n, "a dense N x N float64 similarity"),
    # submodlib's dense mode held 46 bytes a pair at 10k (4.3 GiB), not a float32 matrix's 4
    "submodlib FL": (lambda n, sizes: 46.0 * n * n, "a dense N x N similarity (46 bytes a pair, as measured)"),
    "apricot FL, per label": (lambda n, sizes: 8.0 * float(sizes.max()) ** 2, "the largest label's dense float64"),
    "submodlib FL, per label": (lambda n, sizes: 46.0 * float(sizes.max()) ** 2, "the largest label's dense similarity"),
    "FL per label (apricot's greedy)": (lambda n, sizes: 8.0 * float(sizes.max()) ** 2,
                                        "the largest label's float32 similarity and its temporary"),
}


def pipeline_candidates(x, labels, m: int, probe, val, test, seed: int = 0) -> dict:
    """Every candidate of KS x METHODS at budget m (one select_candidates call with run seed
    ``seed``: k-means' sampling and initialisation; stratified by label as the default is), each
    scored on the validation and the test half: (method, K spec) -> {name, validation, test}."""
    cfg = Config.from_dict({"cluster": {"k": list(KS)}, "select": {"budgets": [m], "random_seeds": [],
                                                                     "method": list(METHODS)}, "seed": seed})
    sel = select_candidates(x, cfg, rng=np.random.default_rng(0), labels=labels)
    by = {(s.method, s.k): s for s in sel.per_k}
    out = {}
    for method in METHODS:
        for spec in KS:
            _, r = parse_k("cluster.k", spec)
            s = by[(method, max(1, int(round(r * m))))]  # as Config.candidate_grid turns a ratio into K
            rows = np.flatnonzero(s.members(m))
            out[(method, spec)] = {"name": s.name(m), "validation": probe(rows, val), "test": probe(rows, test)}
    return out


def proxy_choice(cands: dict, among: list) -> dict:
    """The proxy's choice among ``among`` (the best validation score, ties: the first listed),
    reported on test, with the best in hindsight and the regret."""
    pool = {cands[c]["name"]: cands[c] for c in among}
    chose = max(pool, key=lambda k: pool[k]["validation"])
    best = max(pool, key=lambda k: pool[k]["test"])
    return {"mean": pool[chose]["test"], "std": 0.0, "chose": chose, "best": best,
            "regret": pool[best]["test"] - pool[chose]["test"],
            "candidates": {k: {"validation": v["validation"], "test": v["test"]} for k, v in pool.items()}}


def run_quality(name: str, pcts: list[float], seeds: int, peers: tuple = ("apricot", "kernel-per-label"),
                max_gib: float = 3.0, partial=None, run_seed: int = 0) -> dict:
    """The quality table of one set; ``partial(result)`` is called after each budget with what
    is done so far (a long run keeps its small budgets)."""
    t0 = time.perf_counter()
    x, labels, y, xe, ye, val, test, n_cls = load(name)
    n = len(y)
    ms = [max(1, int(round(p / 100 * n))) for p in pcts]
    sizes = np.bincount(y)
    print(f"\n== {name}: pool {n:,}, validation {len(val):,}, test half {len(test):,}, {n_cls} labels", flush=True)

    def probe(rows, on=test):
        return linear_probe(x[rows], y[rows], xe[on], ye[on], n_cls)["accuracy"]

    subsets: dict[str, list[dict[int, np.ndarray]]] = {}  # row -> one {m: rows} per seed
    secs: dict[str, float] = {}
    not_run: dict[str, dict] = {}

    def add(label, fn):
        need = DENSE_NEED.get(label)
        if need is not None and need[0](n, sizes) / 2 ** 30 > max_gib:
            gib = need[0](n, sizes) / 2 ** 30
            not_run[label] = {"projected_gib": gib, "why": f"needs {gib:,.1f} GiB for {need[1]} (over --max-gib "
                                                          f"{max_gib:g})"}
            print(f"  {label}: not run, {not_run[label]['why']}", flush=True)
            return
        t = time.perf_counter()
        subsets[label] = fn()
        secs[label] = time.perf_counter() - t
        print(f"  {label}: {secs[label]:.1f}s", flush=True)

    prefix = lambda order: {m: order[:m] for m in ms}  # noqa: E731
    add("random", lambda: [prefix(np.random.default_rng(s).permutation(n)) for s in range(seeds)])
    if "apricot" in peers:
        add("apricot FL", lambda: [prefix(apricot_fl(x, max(ms)))])
    if "kernel-per-label" in peers:
        add("FL per label (apricot's greedy)", lambda: [fl_per_label(x, y, ms)])
    if "submodlib" in peers:
        add("submodlib FL", lambda: [prefix(submodlib_fl(x, max(ms)))])
    if "apricot-per-label" in peers:
        add("apricot FL, per label", lambda: [apricot_fl_per_label(x, y, ms)])
    if "submodlib-per-label" in peers:
        add("submodlib FL, per label", lambda: [submodlib_fl_per_label(x, y, ms)])
    add("SemDeDup + random", lambda: [prefix(semdedup_random(x, max(ms), np.random.default_rng(s))) for s in range(3)])
    add("kMQ", lambda: [kmq(x, ms, np.random.default_rng(s)) for s in range(3)])
    add("ZCore-style", lambda: [prefix(top_by_score(zcore_scores(x, np.random.default_rng(0), probes=20 * n)))])
    table: dict = {}
    for p, m in zip(pcts, ms):
        row = {}
        for label, per_seed in subsets.items():
            accs = [probe(s[m]) for s in per_seed]
            row[label] = {"mean": float(np.mean(accs)), "std": float(np.std(accs)), "seeds": accs}
        t = time.perf_counter()
        cands = pipeline_candidates(x, labels, m, probe, val, test, run_seed)
        secs[f"pipeline candidates {p:g}%"] = time.perf_counter() - t
        for method, spec in SINGLE:
            c = cands[(method, spec)]
            row[f"{method} K={spec}"] = {"mean": c["test"], "std": 0.0, "name": c["name"]}
        for label, among in PIPELINES.items():
            row[label] = proxy_choice(cands, among)
        table[f"{p:g}%"] = row
        if partial is not None:
            partial({"n": n, "labels": n_cls, "budgets": table, "peer_seconds": secs, "not_run": not_run,
                     "done": False})
        print(f"  {p:g}% (M={m}): " + "; ".join(f"{k} {100 * v['mean']:.1f}" for k, v in row.items()), flush=True)
    full = probe(np.arange(n))
    return {"n": n, "labels": n_cls, "full": full, "budgets": table, "peer_seconds": secs, "not_run": not_run,
            "seconds": time.perf_counter() - t0}


def is_peer(row: str) -> bool:
    """A peer's row, not the pipeline's (its choice, or one of its candidate families alone)."""
    return not row.startswith("pipeline") and row not in {f"{m} K={k}" for m, k in SINGLE}


def quality_markdown(name: str, r: dict) -> str:
    """The set's table, bold where a row is at or above the best peer at that budget."""
    budgets = list(r["budgets"])
    rows = list(next(iter(r["budgets"].values())))
    lines = [f"| {name}, {r['n']:,} samples, {r['labels']} labels | " + " | ".join(budgets) + " |",
             "|" + "---|" * (len(budgets) + 1)]
    for meth in rows:
        cells = []
        for b in budgets:
            v = r["budgets"][b][meth]
            best = max(u["mean"] for k, u in r["budgets"][b].items() if is_peer(k))
            cell = f"{100 * v['mean']:.1f}" + (f" ± {100 * v['std']:.1f}" if len(v.get("seeds", [])) > 1 else "")
            cells.append(f"**{cell}**" if v["mean"] >= best else cell)
        lines.append(f"| {meth} | " + " | ".join(cells) + " |")
    for meth, v in r.get("not_run", {}).items():
        lines.append(f"| {meth} | not run: {v['why']} |" + " |" * (len(budgets) - 1))
    lines.append(f"| full pool | {100 * r['full']:.1f} |" + " |" * (len(budgets) - 1))
    chose = "\n".join(f"- `{label}`: " + ", ".join(f"{b}: {r['budgets'][b][label]['chose']}" for b in budgets)
                      for label in PIPELINES)
    return "\n".join(lines) + f"\n\nThe proxy chose (on the validation half):\n\n{chose}\n"


# ----------------------------------------------------------------------------------------------
# cost


def synthetic(n: int, d: int = 384, k: int = 200, labels: int = 50, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n float32 unit vectors around k random directions (the pipeline's test blobs, 384-d), and a
    label per vector: its blob's id modulo ``labels``. Built in pieces, so at 1M the peak is x."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, d)).astype(np.float32) * 0.5
    z = rng.integers(0, k, n)
    x = np.empty((n, d), np.float32)
    for lo in range(0, n, 100_000):
        hi = min(n, lo + 100_000)
        part = centers[z[lo:hi]] + rng.normal(size=(hi - lo, d)).astype(np.float32) * 0.1
        x[lo:hi] = part / np.linalg.norm(part, axis=1, keepdims=True)
    return x, (z % labels).astype(str).astype(object)


COST_BUDGETS = (1, 2, 5)  # percent: select.budgets' default, asked of every selector


def pipeline_select(x, labels, extra):
    cfg = Config.from_dict({"select": {"random_seeds": [], "budgets": [f"{p}%" for p in COST_BUDGETS], **extra}})
    return select_candidates(x, cfg, rng=np.random.default_rng(0), labels=labels)


COST_PEERS = {
    # name: (run(x, labels, ms): the subsets of every budget in ms (a greedy or score order: its
    # prefixes), the exponent of n its time grows with: dense facility location n^2 (the
    # similarity), label by label n^3 (50 labels: n_l^2 pairs times a share b_l that grows with n),
    # k-means into sqrt(n) clusters n^1.5 (every row against every centroid), the rest about n).
    # Memory projections: DENSE_NEED's, with synthetic()'s 50 equal labels.
    "apricot FL": (lambda x, lab, ms: apricot_fl(x, max(ms)), 2.0),
    "FL per label (apricot's greedy)": (lambda x, lab, ms: fl_per_label(x, lab, ms), 3.0),
    "apricot FL, per label": (lambda x, lab, ms: apricot_fl_per_label(x, lab, ms), 2.0),
    "submodlib FL": (lambda x, lab, ms: submodlib_fl(x, max(ms)), 2.0),
    "submodlib FL, per label": (lambda x, lab, ms: submodlib_fl_per_label(x, lab, ms), 2.0),
    "SemDeDup + random": (lambda x, lab, ms: semdedup_random(x, max(ms), np.random.default_rng(0)), 1.5),
    "kMQ": (lambda x, lab, ms: kmq(x, ms, np.random.default_rng(0)), 1.5),
    "ZCore-style": (lambda x, lab, ms: top_by_score(zcore_scores(x, np.random.default_rng(0), probes=20 * len(x))),
                    1.0),
    # the pipeline: the same budgets, each for every candidate of its grid
    "pipeline select (default)": (lambda x, lab, ms: pipeline_select(x, lab, {}), 1.0),
    "pipeline select + facility": (lambda x, lab, ms: pipeline_select(x, lab, {"method": ["kcenter", "centroid",
                                                                                           "facility"]}), 1.0),
}


def _measure_child(name: str, n: int, threads: int, conn) -> None:
    """One selector at one size in a fresh process (multiprocessing spawn): the vectors built, then
    the selector timed and its peak RSS above the process with the vectors taken. A process of its
    own, because an allocator keeps what an earlier selector freed: measured in one process, a later
    selector's peak hides inside the heap an earlier one left."""
    import psutil
    import torch

    torch.set_num_threads(threads)
    x, lab = synthetic(n)
    ms = [max(1, round(n * pct / 100)) for pct in COST_BUDGETS]
    gc.collect()
    base = psutil.Process().memory_info().rss
    with PeakRSS() as mem:
        t = time.perf_counter()
        res = COST_PEERS[name][0](x, lab, ms)
        sec = time.perf_counter() - t
    row = {"ran": True, "seconds": sec, "peak_gib": (mem.peak - base) / 2 ** 30,
           "vectors_gib": x.nbytes / 2 ** 30}
    if hasattr(res, "per_k"):  # the pipeline: each step's seconds, summed over K, per method
        steps: dict = {}
        for s in res.per_k:
            for step, v in s.seconds.items():
                key = f"{s.method} {step}" if step == "greedy" else step
                steps[key] = steps.get(key, 0.0) + v / (1 if step == "greedy" else
                                                         sum(1 for u in res.per_k if u.k == s.k))
        row["steps_s"] = steps
    conn.send(row)


def measure(name: str, n: int, threads: int) -> dict:
    """:func:`_measure_child` in a spawned process; its row (or why it did not finish)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    here, there = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_measure_child, args=(name, n, threads, there), daemon=True)
    proc.start()
    there.close()
    try:
        row = here.recv()
    except EOFError:  # the child died: killed for memory, or an error it printed
        row = None
    proc.join()
    return row or {"ran": False, "why": f"the process ended with code {proc.exitcode} before it finished"}


def run_cost(sizes: list[int], max_gib: float, max_seconds: float, names: list[str], save_to: str = "",
             threads: int = 2) -> dict:
    """Each selector at each size (the budgets :data:`COST_BUDGETS`) in a process of its own (:func:`measure`). A
    selector whose projected memory passes ``max_gib``, or whose time at the size below, grown by
    its exponent, passes ``max_seconds``, is reported with that projection instead."""
    out: dict = {}
    last: dict = {}  # name -> (n, seconds) of its last run
    for n in sizes:
        out[str(n)] = {}
        for name in names:
            _, grow = COST_PEERS[name]
            need = DENSE_NEED.get(name)
            gib = need[0](n, np.array([n / 50])) / 2 ** 30 if need else 0.0  # synthetic(): 50 equal labels
            if gib > max_gib:
                out[str(n)][name] = {"ran": False, "projected_gib": gib, "why": f"{need[1]} of {gib:,.0f} GiB"}
                continue
            if name in last:
                was_n, was_s = last[name]
                projected = was_s * (n / was_n) ** grow
                if projected > max_seconds:
                    out[str(n)][name] = {"ran": False, "projected_s": projected,
                                         "why": f"about {projected:,.0f} s projected (n^{grow:g} from "
                                                f"{was_s:.1f} s at {was_n:,})"}
                    continue
            row = measure(name, n, threads)
            out[str(n)][name] = row
            if row["ran"]:
                last[name] = (n, row["seconds"])
                print(f"  cost n={n:,} {name}: {row['seconds']:.1f}s, +{row['peak_gib']:.2f} GiB"
                      + (f"; steps {row['steps_s']}" if "steps_s" in row else ""), flush=True)
            else:
                print(f"  cost n={n:,} {name}: {row['why']}", flush=True)
            if save_to:
                save(save_to, {"machine": machine(), "cost": out})
    return out


def cost_markdown(c: dict) -> str:
    sizes = list(c)
    lines = ["| selector | " + " | ".join(f"{int(s):,}" for s in sizes) + " |", "|" + "---|" * (len(sizes) + 1)]
    for name in COST_PEERS:
        cells = []
        for s in sizes:
            v = c[s].get(name)
            if v is None:
                cells.append("–")
            elif v["ran"]:
                ours = c[s].get("pipeline select (default)", {})
                ratio = (f" ({v['seconds'] / ours['seconds']:.2g}x ours)" if ours.get("ran") and
                         name != "pipeline select (default)" else "")
                cells.append(f"{v['seconds']:.1f} s{ratio}, +{v['peak_gib']:.2f} GiB")
            else:
                cells.append(f"not run: {v['why']}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.peers", description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", nargs="+", default=["banking77"], choices=list(PEER_DATA))
    p.add_argument("--budgets", nargs="+", type=float, default=[1, 2, 5, 10, 20], help="percent of the pool")
    p.add_argument("--seeds", type=int, default=5, help="random subsets per budget")
    p.add_argument("--sizes", nargs="+", type=int, default=[10_000, 100_000, 1_000_000])
    p.add_argument("--max-gib", type=float, default=3.0, help="a peer needing more (projected) is not run")
    p.add_argument("--max-seconds", type=float, default=600.0, help="a peer whose time at the size below, grown "
                   "by its exponent of n, passes this is not run (its projection is reported)")
    p.add_argument("--peers", nargs="*", default=["apricot", "kernel-per-label"],
                   choices=["apricot", "submodlib", "apricot-per-label", "submodlib-per-label", "kernel-per-label"],
                   help="the facility-location peers of the quality table: apricot on the whole pool, submodlib, "
                   "apricot label by label (apricot compiles numba code per fit: seconds a label), and the same "
                   "per label through select/facility.py's dense greedy (no compile, but O(sum n_l^2 b_l): "
                   "hours for a 9,000-row label; apricot's lazy greedy is the one for large labels)")
    p.add_argument("--cost-peers", nargs="*", default=list(COST_PEERS), choices=list(COST_PEERS))
    p.add_argument("--skip-quality", action="store_true")
    p.add_argument("--skip-cost", action="store_true")
    p.add_argument("--name", default="peers")
    p.add_argument("--run-seed", type=int, default=0, help="the pipeline's run seed (its k-means); the peers' "
                   "rows do not depend on it")
    p.add_argument("--threads", type=int, default=2, help="torch threads (1 is faster on a loaded 2-core machine)")
    args = p.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    results: dict = {"machine": machine(), "args": vars(args)}
    if not args.skip_quality:
        results["quality"] = {}
        for d in args.datasets:  # saved after each budget: a long run keeps what it finished
            def partial(r, d=d):
                results["quality"][d] = r
                save(args.name, results)
            partial(run_quality(d, args.budgets, args.seeds, tuple(args.peers), args.max_gib, partial,
                                args.run_seed))
    if not args.skip_cost:
        results["cost"] = run_cost(args.sizes, args.max_gib, args.max_seconds, args.cost_peers, args.name,
                                   args.threads)
    print()
    for d, r in results.get("quality", {}).items():
        print(quality_markdown(d, r))
    if "cost" in results:
        print(cost_markdown(results["cost"]))
    print(f"wrote {save(args.name, results)}")


if __name__ == "__main__":
    main()
