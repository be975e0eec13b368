"""Scores shared by the proxy, the fine-tuning loop and the report: pure functions over arrays."""

from __future__ import annotations

from typing import Optional

import numpy as np


def ratio_score(values: np.ndarray) -> float:
    """sum(num) / sum(den) of an (n, 2) array of per-sample (numerator, denominator) rows: the one
    score of a set of per-sample values (accuracy from (correct, 1); minus the token-weighted loss
    from (-loss summed over a sample's tokens, tokens)).

    Example:
        >>> ratio_score(np.array([[1.0, 1], [0.0, 1], [1.0, 1]]))  # 2 of 3 right
        0.6666666666666666
    """
    return float(values[:, 0].sum() / max(float(values[:, 1].sum()), 1e-12))


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> float:
    """Unweighted mean of per-class F1 over the classes present in y_true or y_pred.

    Example:
        >>> macro_f1(np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1]), 2)  # F1 2/3 and 4/5
        0.7333333333333334
    """
    f1s = []
    for c in range(n_classes):
        tp = int(((y_pred == c) & (y_true == c)).sum())
        fp = int(((y_pred == c) & (y_true != c)).sum())
        fn = int(((y_pred != c) & (y_true == c)).sum())
        if tp + fp + fn:
            f1s.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(f1s)) if f1s else 0.0


def spearman(a: list[float], b: list[float]) -> Optional[float]:
    """Rank correlation of two score lists (None with fewer than 3 pairs, or a constant list)."""
    if len(a) < 3:
        return None
    from scipy.stats import spearmanr

    rho = spearmanr(a, b).statistic
    return None if np.isnan(rho) else float(rho)


def selection_to_tuning(select_s: Optional[float], trials: list[dict]) -> Optional[dict]:
    """The selection-to-tuning ratio (Data Whisperer, ACL 2025): the selection's wall time over the
    wall time of one fine-tune on the full pool, the sweep's ``full`` trial. Below 1 the selection
    costs less than the fine-tune it is meant to spare. None where either is missing (no full trial,
    ``finetune.sweep.include_full: false``; the full trial failed; a select stage that did not
    record its time).

    Example:
        >>> selection_to_tuning(3.0, [{"kind": "full", "status": "capped", "wall_s": 120.0, "steps": 40}])
        {'ratio': 0.025, 'select_s': 3.0, 'full_finetune_s': 120.0, 'full_status': 'capped', 'full_steps': 40}
    """
    full = next((t for t in trials if t.get("kind") == "full" and t.get("status") != "failed"), None)
    if select_s is None or full is None or not full.get("wall_s"):
        return None
    return {"ratio": select_s / full["wall_s"], "select_s": select_s, "full_finetune_s": full["wall_s"],
            "full_status": full["status"], "full_steps": full.get("steps")}
