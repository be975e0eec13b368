"""``report.html``: what the run chose and what it cost, in one self-contained file.

Plots are drawn with matplotlib (Agg) and embedded as PNG data URIs, so the page opens offline
and can be mailed around. Sections: summary, cluster sizes, a 2-D map of the pool (PCA of a
sample) with the chosen subset marked, score against subset size for selection / random / full,
every trial's learning curve (early-stopped trials marked), the cost of each stage, the subset.
Scores are drawn in the task's own metric (:func:`score_axis`): accuracy, or the loss for a causal
LM, whose score is minus the loss.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from .finetune.task import Task, task_for
from .io.run_dir import atomic_path, select_listing

log = logging.getLogger(__name__)

MAP_POINTS = 5000  # points drawn in the 2-D map (a seeded sample of the pool)


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _figure(w: float = 7.0, h: float = 3.6):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(w, h))


def pca_2d(x: np.ndarray) -> np.ndarray:
    """(n, d) -> (n, 2): the two leading principal components (SVD of the centred sample)."""
    xc = x - x.mean(axis=0)
    _, _, vt = np.linalg.svd(xc, full_matrices=False)
    return xc @ vt[:2].T


def _plot_cluster_sizes(clusters) -> str:
    fig, ax = _figure()
    for k in sorted(clusters["k"].unique()):
        sizes = np.sort(clusters[clusters.k == k]["size"].to_numpy())[::-1]
        ax.plot(np.arange(1, len(sizes) + 1), sizes, marker=".", lw=1, label=f"K={k}")
    ax.set_xlabel("cluster (largest first)")
    ax.set_ylabel("samples")
    ax.set_yscale("log")
    ax.set_title("Cluster sizes")
    ax.legend()
    return _png(fig)


def _plot_map(x: np.ndarray, selection, name: str, key_ids: set) -> str:
    rng = np.random.default_rng(0)
    n = len(x)
    chosen = np.flatnonzero(selection[f"in_{name}"].to_numpy())
    others = rng.choice(n, min(n, MAP_POINTS), replace=False)
    idx = np.unique(np.concatenate([others, chosen]))
    xy = pca_2d(x[idx])
    pos = {v: i for i, v in enumerate(idx)}
    fig, ax = _figure(7, 5)
    ax.scatter(xy[:, 0], xy[:, 1], s=3, c="#c8c8c8", label=f"pool (sample of {len(idx):,})")
    sel_xy = xy[[pos[i] for i in chosen]]
    ax.scatter(sel_xy[:, 0], sel_xy[:, 1], s=14, c="#d62728", label=f"{name} ({len(chosen):,})")
    ids = selection["id"].to_numpy()
    keys = [pos[i] for i in chosen if ids[i] in key_ids]
    if keys:
        ax.scatter(xy[keys, 0], xy[keys, 1], s=40, facecolors="none", edgecolors="k", label="key samples")
    ax.set_title("The pool in 2-D (PCA) with the chosen subset")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(loc="best", fontsize=8)
    return _png(fig)


def score_axis(task: Task) -> tuple[float, str]:
    """How the task's scores are drawn: (sign, metric), the value shown being ``sign * score``.
    A causal LM's score is minus the loss: it is shown as the loss, and said to be lower-better.

    Example:
        >>> score_axis(task_for("instruction")), score_axis(task_for("classification"))
        ((-1.0, 'loss (lower is better)'), (1.0, 'accuracy (higher is better)'))
    """
    metric = task.metric.removeprefix("test ")
    return (-1.0, f"{metric} (lower is better)") if task.is_loss else (1.0, f"{metric} (higher is better)")


def score_vs_size_figure(trials: list[dict], task: Task):
    """Each trial's test score (in the task's metric) against its subset size: a line per selection
    family, random subsets as mean ± std per size, the full pool as a level. Returns the figure."""
    sign, metric = score_axis(task)
    fig, ax = _figure()
    sel = [t for t in trials if t["kind"] == "selection" and t.get("test_score") is not None]
    for fam in sorted({(t.get("method", "kcenter"), t["k"]) for t in sel}):
        pts = sorted((t["size"], sign * t["test_score"]) for t in sel if (t.get("method", "kcenter"), t["k"]) == fam)
        ax.plot(*zip(*pts), marker="o", label=f"{fam[0]} K={fam[1]}")
    rnd: dict = {}
    for t in trials:
        if t["kind"] == "random" and t.get("test_score") is not None:
            rnd.setdefault(t["size"], []).append(sign * t["test_score"])
    if rnd:
        sizes = sorted(rnd)
        mean = np.array([np.mean(rnd[s]) for s in sizes])
        std = np.array([np.std(rnd[s]) for s in sizes])
        ax.errorbar(sizes, mean, yerr=std, marker="s", ls="--", c="gray", capsize=3, label="random (mean ± std)")
    full = [sign * t["test_score"] for t in trials if t["kind"] == "full" and t.get("test_score") is not None]
    if full:
        ax.axhline(full[0], c="k", ls=":", label="full pool")
    ax.set_xscale("log")
    ax.set_xlabel("subset size")
    ax.set_ylabel(f"test {metric}")
    ax.set_title("Test-part score against subset size (each trial's model of best validation score)")
    ax.legend(fontsize=8)
    return fig


def curves_figure(trials: list[dict], task: Task):
    """Each trial's validation score (in the task's metric) at every evaluation; a trial ASHA
    stopped early is dashed, with an x at its last point. Returns the figure."""
    sign, metric = score_axis(task)
    fig, ax = _figure(7, 4)
    for t in trials:
        h = t.get("history") or []
        if not h:
            continue
        steps = [r["step"] for r in h]
        scores = [sign * r["score"] for r in h]
        stopped = t["status"] == "stopped_early"  # by ASHA
        (line,) = ax.plot(steps, scores, ls="--" if stopped else "-", lw=1, label=t["name"])
        if stopped:
            ax.plot(steps[-1], scores[-1], marker="x", c=line.get_color(), ms=8)
    ax.set_xlabel("step")
    ax.set_ylabel(f"validation {metric}")
    ax.set_title("Learning curves on the validation part (dashed, x: stopped early by ASHA)")
    ax.legend(fontsize=6, ncol=2)
    return fig


def _plot_costs(stages: dict) -> str:
    names = [n for n in ("read", "embed", "select", "tune") if n in stages]
    secs = [stages[n].get("seconds", 0.0) for n in names]
    fig, ax = _figure(6, 2.4)
    ax.barh(names[::-1], secs[::-1], color="#1f77b4")
    for i, v in enumerate(secs[::-1]):
        ax.text(v, i, f" {v:.1f}s", va="center", fontsize=8)
    ax.set_xlabel("seconds (reused stages: the time to check them)")
    ax.set_title("Cost of each stage")
    return _png(fig)


def _table(rows: list[dict], columns: list[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(c)))}</td>" for c in columns) + "</tr>"
                   for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def write_report(out: Path, run_info: dict, pool) -> Path:
    """Build ``out/report.html`` from the run directory's files and the pool (ids, texts, vectors).
    The candidates and their facts come from the select stage's ``select.json``, never from names."""
    selection = pq.read_table(out / "selection.parquet").to_pandas()
    clusters = pq.read_table(out / "clusters.parquet").to_pandas()
    listing = select_listing(out, run_info)
    cand_path = out / "candidates.json"
    tuned = json.loads(cand_path.read_text()) if cand_path.is_file() else None
    stages = run_info.get("stages", {})
    selected = [c["name"] for c in listing["candidates"] if c["kind"] == "selection"]
    target = (tuned or {}).get("summary", {}).get("target") if tuned else None
    shown = target["name"] if target else (selected[-1] if selected else None)  # the subset drawn and listed
    task = task_for(run_info["config"]["finetune"]["task"])
    sign, metric = score_axis(task)
    in_metric = lambda v: None if v is None else sign * v  # noqa: E731  (a score, as the task's metric)

    parts = [f"<h1>ray_pipeline run</h1><p class=muted>{html.escape(str(out.resolve()))}</p>"]
    facts = {"samples": len(selection), "dimension": listing["dim"],
             "K": ", ".join(str(k) for k in sorted(clusters["k"].unique())),
             "budgets M": ", ".join(str(m) for m in listing["budgets"]), "candidates": len(selected)}
    summary = (tuned or {}).get("summary", {})
    if target:
        rnd = target.get("random_same_size") or {}
        full = target.get("full") or {}
        facts.update({"target subset": f"{target['name']} (K={target['k']}, M={target['m']})",
                      f"target: validation / test, {metric}": f"{_fmt(in_metric(target.get('validation_score')))} / "
                                                              f"{_fmt(in_metric(target.get('test_score')))}",
                      "random, same size (test)": (f"{sign * rnd['test_mean']:.4f} ± {rnd['test_std']:.4f} "
                                                   f"({rnd['n']} seeds)" if "test_mean" in rnd else "–"),
                      "full pool (test)": f"{_fmt(in_metric(full.get('test')))} ({full.get('status', '–')})"})
    ratio = stages.get("tune", {}).get("selection_to_tuning")
    if ratio:  # Data Whisperer's selection-to-tuning ratio: below 1, the selection costs less than one fine-tune
        facts["selection / one full-pool fine-tune"] = (f"{ratio['ratio']:.3g} ({ratio['select_s']:.1f} s / "
                                                        f"{ratio['full_finetune_s']:.1f} s)")
    parts.append("<h2>Summary</h2>" + _table([facts], list(facts)))
    if summary.get("verdict"):
        parts.append("<h2>Verdict (test part)</h2><p>" + "<br>".join(html.escape(v) for v in summary["verdict"]["lines"])
                     + "</p>")
    if summary.get("split"):
        sp = summary["split"]
        parts.append(f"<p class=muted>Held-out set: {sp['validation']['rows']} validation rows (the proxy, ASHA, "
                     f"patience and the choice of the target use them) and {sp['test']['rows']} test rows (only these "
                     f"scores are reported as the result): {html.escape(sp['how'])}.</p>")
    parts.append(f"<h2>Clusters</h2><img src='{_plot_cluster_sizes(clusters)}'>")
    if shown and pool is not None and pool.embeddings is not None:
        keys = set(clusters["key_id"].dropna())
        parts.append(f"<h2>The pool and the chosen subset</h2><img src='{_plot_map(pool.embeddings, selection, shown, keys)}'>")
    if tuned:
        trials = tuned["trials"]
        parts.append(f"<h2>Score against subset size</h2><img src='{_png(score_vs_size_figure(trials, task))}'>")
        parts.append(f"<h2>Learning curves</h2><img src='{_png(curves_figure(trials, task))}'>")
        cols = ["name", "kind", "size", "status", "steps", "epochs", "samples_seen", "validation_score", "test_score",
                "proxy_score", "proxy_accuracy", "proxy_coverage", "proxy_base_loss", "label_coverage", "wall_s", "cpu_seconds",
                "gpu_seconds", "error"]
        cols = [c for c in cols if any(c in t for t in trials)]
        rho = tuned["summary"].get("proxy_rank_correlation")
        if rho is not None:
            parts.append(f"<p>Proxy (a linear probe with labels; the base model's loss or held-out coverage without) against "
                         f"fine-tuned score: Spearman rank correlation "
                         f"<b>{rho:.2f}</b> over the trials that ran.</p>")
        proxy_path = out / "proxy.json"
        if proxy_path.is_file():
            proxy = json.loads(proxy_path.read_text())
            prow = [{"candidate": k, **v} for k, v in sorted(proxy.items(), key=lambda kv: -kv[1]["score"])]
            pcols = [c for c in ("accuracy", "macro_f1", "label_coverage", "coverage", "base_loss", "rows_scored")
                     if any(c in r for r in prow)]
            parts.append("<h2>Every candidate's proxy score</h2>" + _table(prow, ["candidate", *pcols]))
        parts.append("<h2>Trials</h2>" + _table(sorted(trials, key=lambda t: -(t.get("validation_score") or -1e9)), cols))
    parts.append(f"<h2>Cost</h2><img src='{_plot_costs(stages)}'>")
    if shown:
        chosen = selection[selection[f"in_{shown}"]]
        texts = {} if pool is None or pool.texts is None else dict(zip(pool.ids, pool.texts))
        rows = [{"id": r.id, "label": getattr(r, "label", None), "text": (texts.get(r.id) or "")[:160]}
                for r in chosen.head(100).itertuples()]
        parts.append(f"<h2>The subset {html.escape(shown)} ({len(chosen):,} samples; first 100)</h2>"
                     + _table(rows, ["id", "label", "text"]))
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>ray_pipeline report</title><style>"
            "body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;color:#222}"
            "table{border-collapse:collapse;font-size:13px;margin:.5em 0}td,th{border:1px solid #ddd;"
            "padding:3px 6px;text-align:left}th{background:#f4f4f4}.muted{color:#888}img{max-width:100%}"
            "</style></head><body>" + "\n".join(parts) + "</body></html>")
    path = out / "report.html"
    with atomic_path(path) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return path
