"""The selection job: pool -> vectors -> k-means per K -> key samples -> budgets -> greedy ->
candidate subsets, written to the run directory.

:func:`select_candidates` is the array-level core (no IO); :func:`run_select` reads the pool,
embeds it if needed, calls the core and writes ``selection.parquet``, ``clusters.parquet``,
``embeddings/<key>/`` (the embedding stage's shards, when it embedded) and ``run.json``.
"""

from __future__ import annotations

import logging
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa

from . import __version__
from .artifacts import check_output_dir, write_json, write_parquet
from .cluster import kmeans
from .config import Config
from .data import Pool, read_pool
from .device import faiss_gpus, torch_device
from .errors import InputError
from .select import center_and_key_samples, k_center_greedy, proportional_budgets, random_ranks

log = logging.getLogger(__name__)


@dataclass
class KSelection:
    """Everything selected for one K. assign: (n,) cluster of each sample; center, key: (k,) row
    indices (-1 for an empty cluster); budgets: M -> (k,) per-cluster counts; rank: (n,) greedy
    rank in its cluster (-1 if never chosen), run to the largest budget of each cluster."""

    k: int
    assign: np.ndarray
    center: np.ndarray
    key: np.ndarray
    budgets: dict[int, np.ndarray]
    rank: np.ndarray
    seconds: dict[str, float] = field(default_factory=dict)

    def members(self, m: int) -> np.ndarray:
        """(n,) bool: the candidate subset of size m."""
        return (self.rank >= 0) & (self.rank < self.budgets[m][self.assign])


@dataclass
class Selection:
    n: int
    budgets: tuple[int, ...]
    per_k: list[KSelection]
    random: dict[int, np.ndarray]  # seed -> (n,) random rank; the subset of size m is rank < m

    def candidates(self) -> list[dict]:
        out = [{"name": f"k{s.k}_m{m}", "kind": "selection", "k": s.k, "m": m} for s in self.per_k
               for m in self.budgets]
        out += [{"name": f"random_m{m}_s{seed}", "kind": "random", "seed": seed, "m": m}
                for seed in self.random for m in self.budgets]
        return out


def select_candidates(x: np.ndarray, cfg: Config, *, rng: np.random.Generator) -> Selection:
    """Candidate subsets for every (K, M) of ``cfg`` plus seeded random baselines.

    x: (n, d) float32, L2-normalised rows. rng: draws the random baselines (one child stream per
    seed in ``cfg.select.random_seeds``, so adding a seed does not change the others).

    Example:
        >>> rng = np.random.default_rng(0)
        >>> x = rng.normal(size=(500, 16)).astype(np.float32)
        >>> x /= np.linalg.norm(x, axis=1, keepdims=True)
        >>> cfg = Config.from_dict({"cluster": {"k": [5]}, "select": {"budgets": [10, 50]}})
        >>> sel = select_candidates(x, cfg, rng=rng)
        >>> [int(sel.per_k[0].members(m).sum()) for m in (10, 50)]
        [10, 50]
    """
    import torch

    n = len(x)
    budgets = cfg.select.resolve_budgets(n)
    for k in cfg.cluster.k:
        if k > n:
            raise InputError(f"cluster.k={k} is more than the pool's {n} samples; choose k <= {n}")
    device = torch_device(cfg.select.device)
    gpus = faiss_gpus(cfg.cluster.gpu)
    x_t = torch.from_numpy(x).to(device)
    per_k = []
    for k in cfg.cluster.k:
        t0 = time.perf_counter()
        km = kmeans(x, k, seed=cfg.seed, niter=cfg.cluster.niter,
                    max_points_per_centroid=cfg.cluster.max_points_per_centroid, gpus=gpus)
        t1 = time.perf_counter()
        assign_t = torch.from_numpy(km.assign).to(device)
        center, key = center_and_key_samples(x_t, assign_t, torch.from_numpy(km.sim).to(device), k)
        t2 = time.perf_counter()
        sizes = km.sizes
        per_m = {m: proportional_budgets(sizes, m) for m in budgets}
        # Largest remainder is not monotone in M (the Alabama paradox): run each cluster to the
        # most any budget asks of it, so every candidate is a prefix of one greedy order.
        run_to = np.max(np.stack(list(per_m.values())), axis=0)
        rank = k_center_greedy(x_t, assign_t, torch.from_numpy(run_to).to(device), key)
        rank_np = rank.cpu().numpy()  # the one device-to-host copy of the greedy
        t3 = time.perf_counter()
        per_k.append(KSelection(
            k=k, assign=km.assign, center=center.cpu().numpy(), key=key.cpu().numpy(),
            budgets=per_m, rank=rank_np,
            seconds={"kmeans": t1 - t0, "key_samples": t2 - t1, "greedy": t3 - t2}))
        log.info("K=%d: k-means %.2fs, key samples %.2fs, greedy %.2fs (%d empty clusters)",
                 k, t1 - t0, t2 - t1, t3 - t2, int((sizes == 0).sum()))
    children = rng.spawn(len(cfg.select.random_seeds))
    random = {seed: random_ranks(n, child) for seed, child in zip(cfg.select.random_seeds, children)}
    return Selection(n=n, budgets=budgets, per_k=per_k, random=random)


# ----------------------------------------------------------------------------------------------
# tables


def selection_table(pool: Pool, sel: Selection) -> pa.Table:
    """One row per sample: id, label, per K its cluster and greedy rank, and a bool per candidate."""
    cols: dict[str, pa.Array] = {"id": pa.array(pool.ids.tolist(), pa.string())}
    if pool.labels is not None:
        cols["label"] = pa.array([None if v is None else str(v) for v in pool.labels], pa.string())
    for s in sel.per_k:
        cols[f"cluster_k{s.k}"] = pa.array(s.assign.astype(np.int32))
        cols[f"rank_k{s.k}"] = pa.array(s.rank.astype(np.int32))
        for m in sel.budgets:
            cols[f"in_k{s.k}_m{m}"] = pa.array(s.members(m))
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
    for s in sel.per_k:
        sizes = np.bincount(s.assign, minlength=s.k)
        for c in range(s.k):
            rows["k"].append(s.k)
            rows["cluster"].append(c)
            rows["size"].append(int(sizes[c]))
            rows["center_id"].append(None if s.center[c] < 0 else str(ids[s.center[c]]))
            rows["key_id"].append(None if s.key[c] < 0 else str(ids[s.key[c]]))
            for m in sel.budgets:
                rows[f"budget_m{m}"].append(int(s.budgets[m][c]))
    return pa.table(rows)


def embed_into(pool: Pool, cfg: Config, out: Path, *, progress: bool = True) -> tuple[Pool, dict]:
    """Run the embedding stage into ``out/embeddings/<key>/`` and return the pool with its vectors
    (rows whose image could not be read, under ``on_bad_rows: skip``, dropped)."""
    from .embed import embed_pool, load_stage

    manifest = embed_pool(pool, cfg.embed, out / "embeddings", progress=progress, ray_address=cfg.ray_address)
    keep, x = load_stage(out / "embeddings" / manifest["key"], pool.ids)
    pool = Pool(ids=pool.ids[keep], texts=None if pool.texts is None else pool.texts[keep],
                labels=None if pool.labels is None else pool.labels[keep], embeddings=x,
                source=pool.source, images=None if pool.images is None else pool.images[keep],
                skipped=pool.skipped)
    return pool, manifest


def versions() -> dict[str, str]:
    import faiss
    import torch

    return {"ray_pipeline": __version__, "python": platform.python_version(), "numpy": np.__version__,
            "torch": torch.__version__, "faiss": faiss.__version__, "pyarrow": pa.__version__}


# ----------------------------------------------------------------------------------------------
# the job


def run_select(cfg: Config, *, overwrite: bool = False, progress: bool = True) -> Path:
    """Read, embed (unless vectors are given; resumable), select, write. Returns the output directory."""
    import torch

    out = Path(cfg.output_dir)
    check_output_dir(out, cfg.to_dict(), overwrite)
    if cfg.threads:
        import faiss

        torch.set_num_threads(cfg.threads)
        faiss.omp_set_num_threads(cfg.threads)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    pool = read_pool(cfg.data, skip_bad_rows=cfg.embed.on_bad_rows == "skip")
    timings["read"] = time.perf_counter() - t0
    embed_manifest = None
    if pool.embeddings is None:
        t0 = time.perf_counter()
        pool, embed_manifest = embed_into(pool, cfg, out, progress=progress)
        timings["embed"] = time.perf_counter() - t0
    x = pool.embeddings
    log.info("selecting from %d vectors of dimension %d", *x.shape)
    rng = np.random.default_rng(cfg.seed)
    t0 = time.perf_counter()
    sel = select_candidates(x, cfg, rng=rng)
    timings["select"] = time.perf_counter() - t0

    write_parquet(selection_table(pool, sel), out / "selection.parquet")
    write_parquet(clusters_table(pool, sel), out / "clusters.parquet")
    write_json({
        "config": cfg.to_dict(),
        "source": pool.source,
        "skipped_rows": {**pool.skipped, **({"unreadable image": embed_manifest["skipped_rows"]}
                                            if embed_manifest and embed_manifest["skipped_rows"] else {})},
        "embeddings": embed_manifest,
        "n": len(pool), "dim": int(x.shape[1]),
        "budgets": list(sel.budgets),
        "seeds": {"seed": cfg.seed, "random_seeds": list(cfg.select.random_seeds)},
        "candidates": sel.candidates(),
        "timings_s": timings,
        "per_k_timings_s": {str(s.k): s.seconds for s in sel.per_k},
        "device": {"select": str(torch_device(cfg.select.device)), "faiss_gpus": faiss_gpus(cfg.cluster.gpu)},
        "versions": versions(),
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpus": os.cpu_count()},
    }, out / "run.json")
    log.info("wrote %s (%d candidates)", out, len(sel.candidates()))
    return out


def run_embed(cfg: Config, *, progress: bool = True) -> Path:
    """Only the embedding stage, into ``<output_dir>/embeddings/<key>/``; returns that directory."""
    out = Path(cfg.output_dir)
    pool = read_pool(cfg.data, skip_bad_rows=cfg.embed.on_bad_rows == "skip")
    if pool.embeddings is not None:
        raise InputError("the pool already has embeddings (data.embeddings or an embedding column); "
                         "there is nothing to embed")
    from .embed import embed_pool

    manifest = embed_pool(pool, cfg.embed, out / "embeddings", progress=progress, ray_address=cfg.ray_address)
    return out / "embeddings" / manifest["key"]


def run_tune(cfg: Config, *, overwrite: bool = False, progress: bool = True) -> dict:
    """Selection (reusing the embedding stage when already complete), then the Tune sweep over
    every candidate, the random baselines and the full pool. Returns candidates.json's content."""
    import pyarrow.parquet as pq

    from .tune import candidates_from_selection, eval_data_config, read_task_pool, run_sweep

    eval_cfg = eval_data_config(cfg)  # fail on a missing held-out set before any work
    out = run_select(cfg, overwrite=overwrite, progress=progress)
    selection = pq.read_table(out / "selection.parquet")
    pool = read_task_pool(cfg.data, cfg)
    where = {v: i for i, v in enumerate(pool.ids)}
    order = np.array([where[v] for v in selection.column("id").to_pylist()], dtype=np.int64)
    pool = Pool(ids=pool.ids[order], texts=None if pool.texts is None else pool.texts[order],
                labels=None if pool.labels is None else pool.labels[order], embeddings=None, source=pool.source,
                extra={k: v[order] for k, v in pool.extra.items()})
    eval_pool = read_task_pool(eval_cfg, cfg)
    overlap = set(pool.ids) & set(eval_pool.ids) if cfg.data.id_column else set()
    if overlap:
        raise InputError(f"{len(overlap)} held-out id(s) are also in the pool, e.g. {sorted(overlap)[0]!r}; "
                         f"the held-out set must be disjoint from the pool")
    candidates = candidates_from_selection(selection, include_full=cfg.finetune.include_full)
    return run_sweep(candidates, pool, eval_pool, cfg, out, ray_address=cfg.ray_address)
