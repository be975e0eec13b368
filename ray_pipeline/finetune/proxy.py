"""Cheap proxies for a candidate's fine-tuning score, so only the promising ones are fine-tuned.

- With labels, :func:`linear_probe`: logistic regression (scikit-learn) trained on the candidate
  subset's vectors and labels, scored on the held-out set's vectors; seconds per candidate
  instead of a fine-tune. Also each subset's label coverage (the share of the pool's labels it
  holds), which bounds what any learner can get from it.
- Without labels (instruction and chat pools), :func:`coverage`: how well the subset covers the
  held-out set in embedding space, the mean over held-out samples of the highest cosine to any
  subset member; or :func:`score_base_loss`: the base model's mean response loss on (a seeded
  sample of) the subset, higher first. ``benchmarks/quality_instruction.py`` measured both, and
  short fine-tuning runs, against the fine-tuned test loss (Spearman's rho; benchmarks/README.md): coverage
  ranked a budget's candidates best over two splits and costs nothing, so it is
  ``finetune.proxy.kind: auto`` for instruction; the base model's loss is an option.
"""

from __future__ import annotations

import logging
from typing import Optional

import numpy as np

from ..select.boundary import fit_probe
from .metrics import macro_f1, ratio_score

log = logging.getLogger(__name__)


def linear_probe(x_train: np.ndarray, y_train: np.ndarray, x_eval: np.ndarray, y_eval: np.ndarray,
                 n_classes: int, *, c: float = 10.0, max_iter: int = 300) -> dict:
    """Accuracy and macro-F1 on the held-out set of a logistic regression fit on the subset.

    x_*: (n, d) float32 unit vectors; y_*: (n,) int labels in [0, n_classes). A subset with a
    single label predicts that label for everything (no model can do better from it).
    """
    probe = fit_probe(x_train, y_train, c=c, max_iter=max_iter)
    pred = np.full(len(y_eval), y_train[0]) if probe is None else probe.predict(x_eval)
    return {"accuracy": float((pred == y_eval).mean()), "macro_f1": macro_f1(y_eval, pred, n_classes)}


def score_candidates(x: np.ndarray, y: np.ndarray, candidates: dict[str, np.ndarray], x_eval: np.ndarray,
                     y_eval: np.ndarray, n_classes: Optional[int] = None) -> dict[str, dict]:
    """Linear-probe accuracy, macro-F1 and label coverage of every candidate (name -> row indices)."""
    n_classes = n_classes or int(max(y.max(), y_eval.max()) + 1)
    pool_labels = len(np.unique(y))
    out = {}
    for name, rows in candidates.items():
        r = linear_probe(x[rows], y[rows], x_eval, y_eval, n_classes)
        r["label_coverage"] = float(len(np.unique(y[rows])) / pool_labels)
        r["score"] = r["accuracy"]
        out[name] = r
    return out


def coverage(x_subset: np.ndarray, x_eval: np.ndarray) -> float:
    """Mean over the held-out rows of their highest cosine to a subset row (both L2-normalised).

    Example:
        >>> s = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
        >>> e = np.array([[1.0, 0.0], [0.6, 0.8]], dtype=np.float32)
        >>> round(coverage(s, e), 6)  # (1.0 + max(0.6, 0.8)) / 2
        0.9
    """
    import faiss

    index = faiss.IndexFlatIP(x_subset.shape[1])
    index.add(np.ascontiguousarray(x_subset, dtype=np.float32))
    sims, _ = index.search(np.ascontiguousarray(x_eval, dtype=np.float32), 1)
    return float(sims[:, 0].mean())


def score_coverage(x: np.ndarray, candidates: dict[str, np.ndarray], x_eval: np.ndarray) -> dict[str, dict]:
    """Held-out coverage of every candidate (name -> row indices): ``{"score": ..., "coverage": ...}``."""
    return {name: {"score": (c := coverage(x[rows], x_eval)), "coverage": c} for name, rows in candidates.items()}


def sample_rows(candidates: dict[str, np.ndarray], cap: Optional[int],
                rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Each candidate's rows (name -> row indices), or a sample of ``cap`` of them drawn without
    replacement by ``rng``, sorted; every row where ``cap`` is empty or not smaller."""
    return {name: (np.sort(rows) if cap is None or len(rows) <= cap else np.sort(rng.choice(rows, cap, replace=False)))
            for name, rows in candidates.items()}


def token_mean_loss(values: np.ndarray) -> float:
    """The token-weighted mean loss of (n, 2) rows of (-loss summed over a sample's tokens, tokens),
    as :func:`ray_pipeline.finetune.infer.per_sample_values` gives them for a causal LM.

    Example:
        >>> token_mean_loss(np.array([[-6.0, 3], [-2.0, 1]]))  # 8 nats over 4 tokens
        2.0
    """
    return -ratio_score(values)


def score_base_loss(per_row: np.ndarray, rows: np.ndarray, sampled: dict[str, np.ndarray]) -> dict[str, dict]:
    """Every candidate's base-model loss: per_row (u, 2) are the values of ``rows`` (u sorted,
    distinct row indices), sampled: name -> the rows of the candidate that were scored, all among
    ``rows``. ``{"score": loss, "base_loss": loss, "rows_scored": n}``; a higher loss ranks first."""
    out = {}
    for name, r in sampled.items():
        at = np.searchsorted(rows, r)
        if (at >= len(rows)).any() or not np.array_equal(rows[at], r):
            raise ValueError(f"candidate {name!r} has rows that were not scored")
        loss = token_mean_loss(per_row[at])
        out[name] = {"score": loss, "base_loss": loss, "rows_scored": int(len(r))}
    return out


def prune(candidates: list, scores: dict[str, dict], top: Optional[int]) -> list:
    """The ``top`` selection candidates by proxy score, spread over the budgets, with the random
    subsets of their sizes and the full pool; every candidate when ``top`` is empty.

    Each budget's best candidate comes first (the best of those first), then each budget's second
    best, and so on: a score is compared with another budget's only to order them, so a proxy that
    grows with the subset's size (coverage) cannot spend every fine-tune on the largest budget, nor
    one that does not (the base model's loss) on an arbitrary one. candidates: objects with
    ``name``, ``kind`` and ``m`` (``tune.Candidate``).

    Example (budgets 5 and 9; the best of each first, then the better second):
        >>> from types import SimpleNamespace as C
        >>> cands = [C(name=n, kind="selection", m=m) for n, m in (("a", 5), ("b", 5), ("c", 9), ("d", 9))]
        >>> s = {"a": {"score": 0.1}, "b": {"score": 0.3}, "c": {"score": 0.9}, "d": {"score": 0.8}}
        >>> [c.name for c in prune(cands, s, top=3)]
        ['b', 'c', 'd']
    """
    if top is None:
        return candidates
    sel = sorted((c for c in candidates if c.kind == "selection"), key=lambda c: -scores[c.name]["score"])
    place, count = [], {}
    for c in sel:
        count[c.m] = count.get(c.m, 0) + 1
        place.append(count[c.m])  # 1: its budget's best
    order = [c for _, c in sorted(zip(place, sel), key=lambda t: t[0])]  # stable: by score within a place
    kept = {c.name for c in order[:top]}
    sizes = {c.m for c in order[:top]}
    return [c for c in candidates if c.name in kept or c.kind == "full" or (c.kind == "random" and c.m in sizes)]


def score_proxy(kind: str, pool, candidates: list, cfg, *, validation=None, task_pool=None) -> dict[str, dict]:
    """Every candidate's proxy score by ``kind`` (``Task.proxy_kind``): ``probe`` and
    ``coverage`` on the pool's and the embedded ``validation`` part's vectors (embedded by the same
    stage, so with the same encoder); ``base_loss`` on the candidates' rows of ``task_pool`` (the
    pool's prompts and responses or chats, in ``pool``'s row order). candidates: objects with
    ``name``, ``kind`` and ``rows`` (``sweep.Candidate``); the full pool is scored by the probe
    only (it covers all it can)."""
    import time

    t0 = time.perf_counter()
    scored = {c.name: c.rows for c in candidates if c.kind != "full" or kind == "probe"}
    if kind == "base_loss":
        scores = base_loss_scores(task_pool, scored, cfg)
    elif kind == "coverage":
        scores = score_coverage(pool.embeddings, scored, validation.embeddings)
    else:
        names, y = pool.label_codes()
        _, ye = validation.label_codes(names)
        known = ye >= 0  # a validation label the pool lacks: no probe can predict it
        scores = score_candidates(pool.embeddings, y, scored, validation.embeddings[known], ye[known], len(names))
    log.info("proxy: %d candidates scored by %s in %.1fs", len(scores),
             {"probe": "a linear probe", "coverage": "held-out coverage", "base_loss": "the base model's loss"}[kind],
             time.perf_counter() - t0)
    return scores


def base_loss_scores(task_pool, candidates: dict[str, np.ndarray], cfg) -> dict[str, dict]:
    """The base model's token-weighted response loss on a seeded sample of at most
    ``finetune.proxy.rows`` rows of each candidate (name -> rows of ``task_pool``); every
    distinct row is read once, on the driver (a GPU where ``finetune.device`` allows and the
    driver has one)."""
    from ..io.models import resolve
    from ..runtime.devices import torch_device
    from .infer import per_sample_values
    from .task import task_for

    ft = cfg.finetune
    task = task_for(ft.task)
    sampled = sample_rows(candidates, ft.proxy.rows, np.random.default_rng(cfg.seed))
    rows = np.unique(np.concatenate(list(sampled.values()) or [np.zeros(0, np.int64)]))
    device = torch_device(ft.device).type
    log.info("proxy: the base model's loss on %d rows (%d candidates, at most %s rows each) on %s", len(rows),
             len(sampled), ft.proxy.rows or "all", device)
    per_row = per_sample_values(resolve(ft.model, task.default_model, revision=ft.revision), ft,
                                task.arrays(task_pool.take(rows)), device=device)
    return score_base_loss(per_row, rows, sampled)
