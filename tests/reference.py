"""Slow, obvious versions of the selection kernels: Python loops over clusters and rows, numpy only.

The fast kernels in ``ray_pipeline.select.kernels`` are tested against these (the third layer of the
tests), and ``python -m benchmarks.bench_selection`` times the greedy against
:func:`k_center_greedy_reference`. Same contracts as the kernels they mirror, numpy in and out.
"""

from __future__ import annotations

import numpy as np


def center_and_key_reference(x: np.ndarray, assign: np.ndarray, sim: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per cluster: the member with the largest ``sim`` (center), then the other member with the
    largest dot product with the center (key; the center itself for a singleton); -1 for an empty
    cluster. Ties: the lowest row index."""
    center = np.full(k, -1, dtype=np.int64)
    key = np.full(k, -1, dtype=np.int64)
    for c in range(k):
        members = [i for i in range(len(x)) if assign[i] == c]
        if not members:
            continue
        best = members[0]
        for i in members:
            if sim[i] > sim[best]:
                best = i
        center[c] = best
        others = [i for i in members if i != best]
        if not others:
            key[c] = best
            continue
        near = others[0]
        for i in others:
            if float(x[i] @ x[best]) > float(x[near] @ x[best]):
                near = i
        key[c] = near
    return center, key


def centroid_ranks_reference(assign: np.ndarray, sim: np.ndarray, k: int) -> np.ndarray:
    """Each row's place in its cluster when the members are sorted by ``sim``, largest first
    (ties: lower index first)."""
    rank = np.empty(len(assign), dtype=np.int64)
    for c in range(k):
        members = sorted((i for i in range(len(assign)) if assign[i] == c), key=lambda i: (-sim[i], i))
        for r, i in enumerate(members):
            rank[i] = r
    return rank


def k_center_greedy_reference(x: np.ndarray, assign: np.ndarray, budgets: np.ndarray,
                              starts: np.ndarray, eligible: np.ndarray | None = None) -> np.ndarray:
    """The slow, obvious version of :func:`k_center_greedy`: a Python loop over clusters and picks
    (as DeepCore's and Google's active-learning k-center greedy do, per cluster).
    numpy arrays in and out."""
    rank = np.full(len(x), -1, dtype=np.int64)
    for c in range(len(budgets)):
        if budgets[c] == 0:
            continue
        members = np.flatnonzero(assign == c)
        xm = x[members]
        mind = np.full(len(members), np.inf, dtype=x.dtype)
        chosen = np.zeros(len(members), dtype=bool) if eligible is None else ~eligible[members]
        pick = int(np.flatnonzero(members == starts[c])[0])
        for t in range(int(budgets[c])):
            if t > 0:
                masked = np.where(chosen, -np.inf, mind)
                pick = int(np.argmax(masked))
            chosen[pick] = True
            rank[members[pick]] = t
            mind = np.minimum(mind, ((xm - xm[pick]) ** 2).sum(axis=1))
    return rank


def semantic_duplicates_reference(x: np.ndarray, assign: np.ndarray, sim: np.ndarray, threshold: float) -> np.ndarray:
    """The obvious double loop over pairs, for tests."""
    dup = np.zeros(len(x), dtype=bool)
    for i in range(len(x)):
        for j in range(len(x)):
            if i == j or assign[i] != assign[j]:
                continue
            before = (sim[j], j) < (sim[i], i)  # j is farther from the centroid, or equal and lower
            if before and float(x[i] @ x[j]) > threshold:
                dup[i] = True
    return dup




def boundary_picks_reference(margin: np.ndarray, assign: np.ndarray, taken: np.ndarray, need: int) -> list[int]:
    """One row at a time: the free row of smallest margin (lowest index on ties) in a cluster with
    no pick yet, while there is one; then the free row of smallest margin anywhere."""
    picked: list[int] = []
    used: set[int] = set()
    while len(picked) < need:
        free = [i for i in range(len(margin)) if not taken[i] and assign[i] >= 0 and i not in picked]
        fresh = [i for i in free if assign[i] not in used] or free
        best = min(fresh, key=lambda i: (margin[i], i))
        picked.append(best)
        used.add(int(assign[best]))
    return picked
