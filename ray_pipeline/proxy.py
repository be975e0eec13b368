"""Cheap proxies for a candidate's fine-tuning score, so only the promising ones are fine-tuned.

- With labels, :func:`linear_probe`: logistic regression (scikit-learn) trained on the candidate
  subset's vectors and labels, scored on the held-out set's vectors; seconds per candidate
  instead of a fine-tune. Also each subset's label coverage (the share of the pool's labels it
  holds), which bounds what any learner can get from it.
- Without labels (instruction and chat pools), :func:`coverage`: how well the subset covers the
  held-out set in embedding space, the mean over held-out samples of the highest cosine to any
  subset member. ``benchmarks/quality_instruction.py`` measured it against short fine-tuning runs
  and the base model's loss (Spearman's rho with the fine-tuned test loss; README).
"""

from __future__ import annotations

import logging
from typing import Optional

import numpy as np

from .metrics import macro_f1

log = logging.getLogger(__name__)


def linear_probe(x_train: np.ndarray, y_train: np.ndarray, x_eval: np.ndarray, y_eval: np.ndarray,
                 n_classes: int, *, c: float = 10.0, max_iter: int = 300) -> dict:
    """Accuracy and macro-F1 on the held-out set of a logistic regression fit on the subset.

    x_*: (n, d) float32 unit vectors; y_*: (n,) int labels in [0, n_classes). A subset with a
    single label predicts that label for everything (no model can do better from it).
    """
    from sklearn.linear_model import LogisticRegression

    classes = np.unique(y_train)
    if len(classes) == 1:
        pred = np.full(len(y_eval), classes[0])
    else:
        clf = LogisticRegression(C=c, max_iter=max_iter)
        pred = clf.fit(x_train, y_train).predict(x_eval)
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


def prune(candidates: list, scores: dict[str, dict], top: Optional[int]) -> list:
    """The ``top`` selection candidates by proxy score, the random subsets of their sizes and the
    full pool; every candidate when ``top`` is empty. candidates: objects with ``name``, ``kind``
    and ``m`` (``tune.Candidate``)."""
    if top is None:
        return candidates
    sel = sorted((c for c in candidates if c.kind == "selection"), key=lambda c: -scores[c.name]["score"])[:top]
    sizes = {c.m for c in sel}
    kept = {c.name for c in sel}
    return [c for c in candidates if c.name in kept or c.kind == "full" or (c.kind == "random" and c.m in sizes)]
