"""The budget-aware candidate's kernels: prototypes first, then the samples near the boundaries
between labels. Pure functions over arrays, no IO, no config.

Small budgets are worth most spent on the most typical samples (the nearest-to-centroid
prototypes); larger ones on the hard samples near the boundaries between concepts (Sorscher et
al. 2022, "Beyond neural scaling laws"). The ``boundary`` candidate of size M holds both:

1. the prototypes: the nearest-to-centroid candidate of size M - h M;
2. then h M samples near a boundary: a linear probe (logistic regression) is fit on the
   prototypes and their labels, and the pool's samples it is least sure of (the smallest gap
   between its two most probable labels) are added, at most one per cluster while clusters last
   (so the hard samples are spread out, not a heap of near-duplicates on one boundary).

The hard share h = :func:`boundary_share` grows with M/N (2.5 M/N, at most one half): 2.5% of
the candidate at a 1% budget, 25% at 10%, 50% at 20% and above. Only the prototypes' labels are
read, as an active learner would. The quality benchmark (benchmarks/README.md) measures it against the other
methods; it is an option, not the default.
"""

from __future__ import annotations

import numpy as np


def boundary_share(m: int, n: int, *, slope: float = 2.5, cap: float = 0.5) -> float:
    """h: the share of a candidate of size m (from a pool of n) spent on boundary samples."""
    return min(cap, slope * m / max(1, n))


def fit_probe(x: np.ndarray, y: np.ndarray, *, c: float = 10.0, max_iter: int = 300):
    """A logistic regression fit on the rows x (n, d) float32 and their labels y (n,), any values;
    None when y holds a single label (there is no boundary to be near)."""
    from sklearn.linear_model import LogisticRegression

    if len(np.unique(y)) < 2:
        return None
    return LogisticRegression(C=c, max_iter=max_iter).fit(x, y)


def probe_margins(probe, x: np.ndarray, *, chunk_rows: int = 65_536) -> np.ndarray:
    """(n,) float32: for every row of x, the gap between the probe's two most probable labels
    (0: a coin toss between two labels; 1: sure); all 1 when ``probe`` is None. Rows are scored
    ``chunk_rows`` at a time, so memory is that many rows times the number of labels."""
    out = np.ones(len(x), np.float32)
    if probe is None:
        return out
    for lo in range(0, len(x), chunk_rows):
        p = probe.predict_proba(x[lo:lo + chunk_rows])
        top2 = np.partition(p, p.shape[1] - 2, axis=1)[:, -2:]
        out[lo:lo + chunk_rows] = top2[:, 1] - top2[:, 0]
    return out


def boundary_picks(margin: np.ndarray, assign: np.ndarray, taken: np.ndarray, need: int) -> np.ndarray:
    """``need`` row indices not yet ``taken``, by increasing ``margin``, at most one per cluster
    (``assign``) until every cluster with a free row has one, then the smallest margins left.

    margin: (n,) float; assign: (n,) int cluster of each row (-1: never picked); taken: (n,) bool.
    Returned in pick order; ties go to the lower row index.

    Example:
        >>> margin = np.array([0.1, 0.2, 0.3, 0.9, 0.05])
        >>> assign = np.array([0, 0, 1, 1, 2])
        >>> boundary_picks(margin, assign, np.array([False, False, False, False, True]), 3).tolist()
        [0, 2, 1]
    """
    free = np.flatnonzero(~taken & (assign >= 0))
    if need > len(free):
        raise ValueError(f"{need} boundary samples asked for, {len(free)} rows free")
    order = free[np.lexsort((free, margin[free]))]
    _, first = np.unique(assign[order], return_index=True)  # each cluster's smallest margin
    lead = np.zeros(len(order), bool)
    lead[first] = True
    return np.concatenate([order[lead], order[~lead]])[:need]  # a mask keeps margin order
