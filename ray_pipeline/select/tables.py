"""The selection stage's two tables (what ``pipeline`` writes as ``selection.parquet`` and
``clusters.parquet``): a :class:`~ray_pipeline.select.engine.Selection` over a pool, as Arrow."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from ..io.pool import Pool
from .engine import Selection


def selection_table(pool: Pool, sel: Selection) -> pa.Table:
    """One row per sample: id, label, per K its cluster and per family its rank, and a bool per
    candidate (``in_<name>``; ``select.json`` lists the candidates)."""
    cols: dict[str, pa.Array] = {"id": pa.array(pool.ids.tolist(), pa.string())}
    if pool.labels is not None:
        cols["label"] = pa.array([None if v is None else str(v) for v in pool.labels], pa.string())
    for s in sel.per_k:
        cols[f"cluster_k{s.k}"] = pa.array(s.assign.astype(np.int32))
        cols[f"rank_{s.family}"] = pa.array(s.rank.astype(np.int32))
        for m in s.budgets:
            cols[f"in_{s.name(m)}"] = pa.array(s.members(m))
    for seed, rank in sel.random.items():
        for m in sel.budgets:
            cols[f"in_random_m{m}_s{seed}"] = pa.array(rank < m)
    return pa.table(cols)


def clusters_table(pool: Pool, sel: Selection) -> pa.Table:
    """One row per (K, cluster): size, center and key sample ids, budget per M."""
    ids = pool.ids
    rows: dict[str, list] = {"k": [], "cluster": [], "size": [], "center_id": [], "key_id": []}
    for m in sel.budgets:
        rows[f"budget_m{m}"] = []
    per_k = {}
    for s in sel.per_k:  # one row set per K, whatever the methods: the selection with the most budgets
        if s.k not in per_k or len(s.budgets) > len(per_k[s.k].budgets):
            per_k[s.k] = s
    for s in per_k.values():
        sizes = np.bincount(s.assign[s.assign >= 0], minlength=len(s.center))
        for c in range(len(s.center)):
            rows["k"].append(s.k)
            rows["cluster"].append(c)
            rows["size"].append(int(sizes[c]))
            rows["center_id"].append(None if s.center[c] < 0 else str(ids[s.center[c]]))
            rows["key_id"].append(None if s.key[c] < 0 else str(ids[s.key[c]]))
            for m in sel.budgets:
                rows[f"budget_m{m}"].append(int(s.budgets[m][c]) if m in s.budgets else None)
    return pa.table(rows)
