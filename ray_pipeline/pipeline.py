"""The job: pool -> vectors -> k-means per K -> key samples -> budgets -> greedy -> candidates ->
fine-tuning sweep -> report, in one run directory.

:func:`select_candidates` is the array-level core of the selection (no IO). The stages write
under keyed directories, the key a hash of the stage's inputs and config, so a rerun reuses a
complete stage and a changed config computes anew beside it::

    <out>/embeddings/<key>/   shard-*.parquet, manifest.json (marks it complete)
    <out>/select/<key>/       selection.parquet, clusters.parquet, select.json (marks it complete)
    <out>/tune/<key>/         candidates.json (marks it complete), target/, trials/, tune/, train/
    <out>/selection.parquet, clusters.parquet, candidates.json, target -> tune/<key>/target
    <out>/report.html, run.json (config, status of each stage, timings, versions)

``run.json`` is written when the run starts (``status: running``) and after every stage; a
directory whose run did not finish is continued only with ``resume``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)

from . import __version__, faults
from .artifacts import atomic_path, write_json, write_parquet
from .cluster import kmeans
from .config import Config
from .data import Pool, read_pool
from .device import faiss_gpus, torch_device
from .errors import ConfigError, InputError, OutputError
from .select import (
    center_and_key_samples,
    centroid_ranks,
    k_center_greedy,
    largest_remainder,
    outlier_mask,
    random_ranks,
)

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
    method: str = "kcenter"

    def name(self, m: int) -> str:
        """Candidate name: ``k{K}_m{M}`` for the method of METHOD.md, ``{method}_k{K}_m{M}`` else."""
        return f"k{self.k}_m{m}" if self.method == "kcenter" else f"{self.method}_k{self.k}_m{m}"

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
        out = [{"name": s.name(m), "kind": "selection", "method": s.method, "k": s.k, "m": m}
               for s in self.per_k for m in s.budgets]
        out += [{"name": f"random_m{m}_s{seed}", "kind": "random", "seed": seed, "m": m}
                for seed in self.random for m in self.budgets]
        return out


def select_candidates(x: np.ndarray, cfg: Config, *, rng: np.random.Generator,
                      labels: Optional[np.ndarray] = None) -> Selection:
    """Candidate subsets for every (K, M) of ``cfg.candidate_grid`` plus seeded random baselines.

    x: (n, d) float32, L2-normalised rows. rng: draws the random baselines (one child stream per
    seed in ``cfg.select.random_seeds``, so adding a seed does not change the others). labels:
    (n,) the pool's labels, used by ``select.stratify`` (``auto``: stratify when given). k-means runs once per distinct
    K; one greedy pass per K serves all of its budgets. With ``select.dedup_threshold`` the
    near-duplicates are removed first (:func:`select.semantic_duplicates`) and never selected;
    the random baselines still draw from the whole pool.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> x = rng.normal(size=(500, 16)).astype(np.float32)
        >>> x /= np.linalg.norm(x, axis=1, keepdims=True)
        >>> cfg = Config.from_dict({"cluster": {"k": [5]}, "select": {"budgets": [10, 50]}})
        >>> sel = select_candidates(x, cfg, rng=rng)
        >>> [int(sel.per_k[0].members(m).sum()) for m in (10, 50)]
        [10, 50]
    """
    n = len(x)
    budgets = cfg.select.resolve_budgets(n)
    grid = cfg.candidate_grid(n)
    if cfg.select.stratify == "label" and labels is None:
        raise ConfigError("select.stratify 'label' needs the pool's labels: set data.label_column (or "
                          "data.labels_path), or use select.stratify 'none'")
    rows = np.arange(n)
    dropped = 0
    if cfg.select.dedup_threshold is not None:
        rows = np.flatnonzero(~_near_duplicates(x, cfg))
        dropped = n - len(rows)
        if len(rows) < max(budgets):
            raise InputError(f"after removing {dropped} near-duplicates (select.dedup_threshold "
                             f"{cfg.select.dedup_threshold}) the pool holds {len(rows)} samples, fewer than the "
                             f"budget {max(budgets)}; raise the threshold or lower the budget")
        log.info("near-duplicates: %d of %d samples removed before clustering (cosine > %g)", dropped, n,
                 cfg.select.dedup_threshold)
    stratify = cfg.select.stratify == "label" or (cfg.select.stratify == "auto" and labels is not None)
    per_k = []
    for k in sorted({k for k, _ in grid}):
        ms = [m for kk, m in grid if kk == k]
        if stratify:
            per_k += _select_stratified(x, rows, np.asarray(labels)[rows], k, ms, cfg, n)
        else:
            per_k += [_lift(s, rows, n) for s in _select_k(x[rows] if dropped else x, k, ms, cfg)]
    children = rng.spawn(len(cfg.select.random_seeds))
    random = {seed: random_ranks(n, child) for seed, child in zip(cfg.select.random_seeds, children)}
    return Selection(n=n, budgets=budgets, per_k=per_k, random=random)


def _near_duplicates(x: np.ndarray, cfg: Config) -> np.ndarray:
    """(n,) bool, SemDeDup: k-means into sqrt(n) clusters, then per cluster the members within
    ``select.dedup_threshold`` cosine of a member farther from the centroid."""
    import torch

    from .select import semantic_duplicates

    k = max(1, int(round(np.sqrt(len(x)))))
    km = kmeans(x, k, seed=cfg.seed, niter=cfg.cluster.niter,
                max_points_per_centroid=cfg.cluster.max_points_per_centroid, gpus=faiss_gpus(cfg.cluster.gpu))
    device = torch_device(cfg.select.device)
    dup = semantic_duplicates(torch.from_numpy(x).to(device), torch.from_numpy(km.assign).to(device),
                              torch.from_numpy(km.sim).to(device), k, cfg.select.dedup_threshold)
    return dup.cpu().numpy()


def _select_k(x: np.ndarray, k: int, ms: list[int], cfg: Config) -> list[KSelection]:
    """One K on the rows of ``x``: k-means, key samples, budgets for each M in ``ms``, and one
    candidate order per method of ``select.method``."""
    import torch

    device = torch_device(cfg.select.device)
    x_t = torch.from_numpy(x).to(device)
    t0 = time.perf_counter()
    km = kmeans(x, k, seed=cfg.seed, niter=cfg.cluster.niter,
                max_points_per_centroid=cfg.cluster.max_points_per_centroid, gpus=faiss_gpus(cfg.cluster.gpu))
    t1 = time.perf_counter()
    faults.point("select:kmeans")
    assign_t = torch.from_numpy(km.assign).to(device)
    center, key = center_and_key_samples(x_t, assign_t, torch.from_numpy(km.sim).to(device), k)
    key_np = key.cpu().numpy()
    t2 = time.perf_counter()
    per_m, run_to, eligible = _budgets_and_eligible(km.assign, km.sim, k, key_np, ms, cfg)
    out = []
    for method in cfg.select.method:
        t3 = time.perf_counter()
        if method == "centroid":
            rank_np = _centroid_rank(km.assign, km.sim, k, eligible, run_to)
        else:
            rank = k_center_greedy(x_t, assign_t, torch.from_numpy(run_to).to(device), key,
                                   eligible=None if eligible.all() else torch.from_numpy(eligible).to(device))
            rank_np = rank.cpu().numpy()  # the one device-to-host copy of the greedy
        t4 = time.perf_counter()
        out.append(KSelection(
            k=k, assign=km.assign, center=center.cpu().numpy(), key=key_np, budgets=per_m, rank=rank_np,
            seconds={"kmeans": t1 - t0, "key_samples": t2 - t1, "greedy": t4 - t3}, method=method))
        log.info("K=%d (M=%s): k-means %.2fs, key samples %.2fs, %s %.2fs (%d empty clusters)", k,
                 ",".join(map(str, ms)), t1 - t0, t2 - t1, method, t4 - t3, int((km.sizes == 0).sum()))
    return out


def _lift(s: KSelection, rows: np.ndarray, n: int) -> KSelection:
    """A selection made on ``x[rows]`` as one on all ``n`` rows (the others: cluster -1, never chosen)."""
    if len(rows) == n:
        return s
    assign, rank = np.full(n, -1, dtype=np.int64), np.full(n, -1, dtype=np.int64)
    assign[rows], rank[rows] = s.assign, s.rank
    lift = lambda idx: np.where(idx >= 0, rows[np.maximum(idx, 0)], -1)  # noqa: E731
    return KSelection(k=s.k, assign=assign, center=lift(s.center), key=lift(s.key), budgets=s.budgets, rank=rank,
                      seconds=s.seconds, method=s.method)


def _select_stratified(x: np.ndarray, rows: np.ndarray, labels: np.ndarray, k: int, ms: list[int], cfg: Config,
                       n: int) -> list[KSelection]:
    """Label-stratified budgets: each M split over the labels by their share of the pool (largest
    remainder), K likewise (at least one cluster a label), and the method run inside each label.
    The clusters of all labels are numbered one after another."""
    values = np.array([str(v) for v in labels], dtype=object)
    names, code = np.unique(values, return_inverse=True)
    sizes = np.bincount(code, minlength=len(names))
    ks = np.maximum(1, np.minimum(sizes, largest_remainder(sizes, min(k, len(rows)), sizes)))
    share = {m: largest_remainder(sizes, m, sizes) for m in ms}
    parts: list[tuple[np.ndarray, list[KSelection], dict[int, int]]] = []
    for lab in range(len(names)):
        sub = rows[code == lab]
        local = {m: int(share[m][lab]) for m in ms}
        sels = _select_k(x[sub], int(ks[lab]), sorted(set(local.values())), cfg)
        parts.append((sub, sels, local))
    out = []
    for j, method in enumerate(cfg.select.method):
        assign, rank = np.full(n, -1, dtype=np.int64), np.full(n, -1, dtype=np.int64)
        center, key, per_m, offset = [], [], {m: [] for m in ms}, 0
        seconds: dict[str, float] = {}
        for sub, sels, local in parts:
            s = sels[j]
            assign[sub], rank[sub] = s.assign + offset, s.rank
            center.append(np.where(s.center >= 0, sub[np.maximum(s.center, 0)], -1))
            key.append(np.where(s.key >= 0, sub[np.maximum(s.key, 0)], -1))
            for m in ms:
                per_m[m].append(s.budgets[local[m]])
            offset += len(s.center)
            for name, v in s.seconds.items():
                seconds[name] = seconds.get(name, 0.0) + v
        out.append(KSelection(k=k, assign=assign, center=np.concatenate(center), key=np.concatenate(key),
                              budgets={m: np.concatenate(v) for m, v in per_m.items()}, rank=rank,
                              seconds=seconds, method=method))
    return out


def _budgets_and_eligible(assign: np.ndarray, sim: np.ndarray, k: int, key: np.ndarray, ms: list[int],
                          cfg: Config) -> tuple[dict[int, np.ndarray], np.ndarray, np.ndarray]:
    """Per budget M the (k,) per-cluster counts; how far each cluster's order must run; the (n,)
    rows that may be picked (all but the robust variant's outliers)."""
    eligible = outlier_mask(assign, sim, k, cfg.select.outlier_quantile, key)
    room = np.bincount(assign[eligible], minlength=k)
    sizes = np.bincount(assign, minlength=k)
    per_m = {m: largest_remainder(sizes, m, room) for m in ms}
    # Largest remainder is not monotone in M (the Alabama paradox): run each cluster to the most
    # any budget asks of it, so every candidate is a prefix of one order.
    run_to = np.max(np.stack(list(per_m.values())), axis=0)
    return per_m, run_to, eligible


def _centroid_rank(assign: np.ndarray, sim: np.ndarray, k: int, eligible: np.ndarray,
                   run_to: np.ndarray) -> np.ndarray:
    """The nearest-to-centroid order, cut at each cluster's ``run_to`` (-1 beyond and for outliers)."""
    rank = np.where(eligible, centroid_ranks(assign, sim, k), -1)
    return np.where(rank < run_to[assign], rank, -1)


# ----------------------------------------------------------------------------------------------
# tables


def selection_table(pool: Pool, sel: Selection) -> pa.Table:
    """One row per sample: id, label, per K its cluster and greedy rank, and a bool per candidate."""
    cols: dict[str, pa.Array] = {"id": pa.array(pool.ids.tolist(), pa.string())}
    if pool.labels is not None:
        cols["label"] = pa.array([None if v is None else str(v) for v in pool.labels], pa.string())
    for s in sel.per_k:
        cols[f"cluster_k{s.k}"] = pa.array(s.assign.astype(np.int32))
        cols["rank_" + s.name(0)[: -len("_m0")]] = pa.array(s.rank.astype(np.int32))
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
    for s in {s.k: s for s in sel.per_k}.values():  # one row set per K, whatever the methods
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


def _digest(*parts) -> str:
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, np.ndarray) and part.dtype != object:
            h.update(memoryview(np.ascontiguousarray(part)).cast("B"))  # no copy of a large array
        else:
            h.update(json.dumps(part, sort_keys=True, default=str).encode())
        h.update(b"\x00")
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# the run directory


class Run:
    """The run directory and its ``run.json``: the config, each stage's status and timings."""

    def __init__(self, cfg: Config, *, resume: bool = False, overwrite: bool = False):
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.path = self.out / "run.json"
        config = cfg.to_dict()
        previous = self._read()
        if previous and not overwrite:
            if previous.get("config") != config:
                raise OutputError(f"output directory {str(self.out)!r} holds a different run (its run.json has "
                                  f"another config); choose another --out, or pass --overwrite to replace it")
            if previous.get("status") != "complete" and not resume:
                raise OutputError(f"output directory {str(self.out)!r} holds a run that did not finish; pass "
                                  f"--resume to continue it, or --overwrite to start again")
        self.info = {"config": config, "status": "running", "stages": {},
                     "versions": versions(), "machine": {"platform": platform.platform(), "cpus": os.cpu_count()}}
        if previous and resume and previous.get("config") == config:
            self.info["stages"] = previous.get("stages", {})

    def start(self) -> None:
        """Mark the directory as holding this (running) run; called once the input checked out."""
        self._write()

    def _read(self) -> Optional[dict]:
        try:
            return json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def _write(self) -> None:
        write_json(self.info, self.path)

    def stage(self, name: str, **info) -> None:
        """Record a finished stage and log its time."""
        self.info["stages"][name] = {**self.info["stages"].get(name, {}), **info, "status": "complete"}
        self._write()
        log.info("stage %s done in %.1fs%s", name, info.get("seconds", 0.0),
                 " (reused)" if info.get("reused") else "")

    def finish(self, **info) -> None:
        self.info.update(info, status="complete")
        self._write()


def _publish(src: Path, dst: Path) -> None:
    """A stage file copied to the run directory's top level, atomically."""
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def _link(target: Path, link: Path) -> None:
    """``link`` -> ``target`` (relative), replaced atomically."""
    tmp = link.with_name(f".{link.name}.tmp-{os.getpid()}")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(os.path.relpath(target, link.parent), tmp)
    os.replace(tmp, link)


# ----------------------------------------------------------------------------------------------
# stages


def embed_stage(pool: Pool, cfg: Config, run: Run, *, progress: bool = True) -> Pool:
    """Vectors for the pool: given ones as they are, or the embedding stage's (resumable)."""
    log.info("stage embed: start")
    t0 = time.perf_counter()
    if pool.embeddings is not None:
        run.stage("embed", seconds=time.perf_counter() - t0, source="given", dim=int(pool.embeddings.shape[1]))
        return pool
    pool, manifest = embed_into(pool, cfg, run.out, progress=progress)
    run.stage("embed", seconds=time.perf_counter() - t0, reused=manifest["shards_computed"] == 0,
              key=manifest["key"], dir=str(run.out / "embeddings" / manifest["key"]), rows=manifest["rows"],
              dim=manifest["dim"], skipped_rows=manifest["skipped_rows"], samples_per_s=manifest["samples_per_s"],
              actor_plan=manifest["actor_plan"])
    return pool


def select_stage(pool: Pool, cfg: Config, run: Run) -> Path:
    """k-means, key samples, budgets, greedy and random baselines into ``select/<key>/``."""
    log.info("stage select: start")
    t0 = time.perf_counter()
    x = pool.embeddings
    key = _digest(x, pool.ids.tolist(), cfg.to_dict()["cluster"], cfg.to_dict()["select"], cfg.seed)
    d = run.out / "select" / key
    marker = d / "select.json"
    if marker.is_file():
        meta = json.loads(marker.read_text())
        reused = True
    else:
        if cfg.select.engine == "ray":
            sel = _select_over_shards(pool, cfg, run)
        else:
            sel = select_candidates(x, cfg, rng=np.random.default_rng(cfg.seed), labels=pool.labels)
        write_parquet(selection_table(pool, sel), d / "selection.parquet")
        faults.point("select:written")
        write_parquet(clusters_table(pool, sel), d / "clusters.parquet")
        meta = {"n": len(pool), "dim": int(x.shape[1]), "budgets": list(sel.budgets),
                "seeds": {"seed": cfg.seed, "random_seeds": list(cfg.select.random_seeds)},
                "candidates": sel.candidates(), "per_k_seconds": {str(s.k): s.seconds for s in sel.per_k},
                "device": {"select": str(torch_device(cfg.select.device)), "faiss_gpus": faiss_gpus(cfg.cluster.gpu)}}
        write_json(meta, marker)
        reused = False
    _publish(d / "selection.parquet", run.out / "selection.parquet")
    _publish(d / "clusters.parquet", run.out / "clusters.parquet")
    run.stage("select", seconds=time.perf_counter() - t0, reused=reused, key=key, dir=str(d), **meta)
    return d


def _select_over_shards(pool: Pool, cfg: Config, run: Run) -> Selection:
    """``select.engine: ray``: the selection as Ray tasks over the embedding stage's shards (this
    run's, or a stage directory given as ``data.embeddings``)."""
    import pyarrow.parquet as pq

    from .distributed import select_candidates_sharded, shard_paths

    stage = run.info["stages"].get("embed", {}).get("dir")
    if stage is None and cfg.data.embeddings and Path(cfg.data.embeddings).is_dir():
        stage = cfg.data.embeddings
    if stage is None:
        raise ConfigError("select.engine 'ray' reads the vectors from the embedding stage's shards; embed the "
                          "pool with this tool, or give data.embeddings as a directory the embedding stage wrote, "
                          "or use select.engine 'driver' for .npy / Parquet vectors")
    paths = shard_paths(stage)
    where = {v: i for i, v in enumerate(pool.ids.tolist())}
    tables = [pq.read_table(f, columns=["id", "row"]) for f in paths]
    size = 1 + max((int(pa.compute.max(t.column("row")).as_py() or 0) for t in tables if len(t)), default=0)
    row_map = np.full(size, -1, dtype=np.int64)
    for t in tables:
        row_map[t.column("row").to_numpy()] = [where.get(v, -1) for v in t.column("id").to_pylist()]
    with _one_ray(cfg, True):
        return select_candidates_sharded(paths, len(pool), cfg, rng=np.random.default_rng(cfg.seed),
                                         row_map=row_map, groups=cfg.select.groups)


def proxy_scores(pool: Pool, eval_pool: Pool, candidates: list, cfg: Config, run: Run) -> dict:
    """Linear-probe score of every candidate on the held-out set's embeddings (embedded by the same
    stage, so with the same encoder)."""
    from .proxy import score_candidates

    t0 = time.perf_counter()
    eval_pool, _ = embed_into(eval_pool, cfg, run.out, progress=False)
    labels = sorted({str(v) for v in pool.labels})
    index = {v: i for i, v in enumerate(labels)}
    y = np.array([index[str(v)] for v in pool.labels])
    known = np.array([str(v) in index for v in eval_pool.labels])
    ye = np.array([index[str(v)] for v in eval_pool.labels[known]])
    scores = score_candidates(pool.embeddings, y, {c.name: c.rows for c in candidates},
                              eval_pool.embeddings[known], ye, len(labels))
    log.info("proxy: %d candidates scored by a linear probe in %.1fs", len(scores), time.perf_counter() - t0)
    return scores


def prune_by_proxy(candidates: list, proxy: dict, top: Optional[int]) -> list:
    """The ``top`` selection candidates by proxy accuracy, the random subsets of their sizes, the
    full pool; everything when ``top`` is empty."""
    if top is None:
        return candidates
    sel = sorted((c for c in candidates if c.kind == "selection"), key=lambda c: -proxy[c.name]["accuracy"])[:top]
    sizes = {c.m for c in sel}
    kept = {c.name for c in sel}
    return [c for c in candidates if c.name in kept or c.kind == "full" or (c.kind == "random" and c.m in sizes)]


def tune_stage(pool: Pool, select_dir: Path, cfg: Config, run: Run, *, resume: bool = False) -> dict:
    """The fine-tuning sweep over every candidate into ``tune/<key>/``; target/ linked at the top."""
    import pyarrow.parquet as pq

    from .tune import candidates_from_selection, eval_data_config, read_task_pool, run_sweep

    log.info("stage tune: start")
    t0 = time.perf_counter()
    eval_cfg = eval_data_config(cfg)
    task_pool = read_task_pool(cfg.data, cfg)
    eval_pool = read_task_pool(eval_cfg, cfg)
    selection = pq.read_table(select_dir / "selection.parquet")
    where = {v: i for i, v in enumerate(task_pool.ids)}
    order = np.array([where[v] for v in selection.column("id").to_pylist()], dtype=np.int64)
    task_pool = Pool(ids=task_pool.ids[order], texts=None if task_pool.texts is None else task_pool.texts[order],
                     labels=None if task_pool.labels is None else task_pool.labels[order], embeddings=None,
                     source=task_pool.source, extra={k: v[order] for k, v in task_pool.extra.items()})
    if cfg.data.id_column:
        overlap = set(task_pool.ids) & set(eval_pool.ids)
        if overlap:
            raise InputError(f"{len(overlap)} held-out id(s) are also in the pool, e.g. {sorted(overlap)[0]!r}; "
                             f"the held-out set must be disjoint from the pool")
    d = run.out / "tune" / _digest(select_dir.name, cfg.to_dict()["finetune"], cfg.to_dict()["data"], cfg.seed)
    marker = d / "candidates.json"
    if marker.is_file():
        result, reused = json.loads(marker.read_text()), True
    else:
        candidates = candidates_from_selection(selection, include_full=cfg.finetune.include_full)
        proxy = None
        if cfg.finetune.task == "classification" and pool.embeddings is not None:
            proxy = proxy_scores(pool, eval_pool, candidates, cfg, run)
            write_json(proxy, d / "proxy.json")
            candidates = prune_by_proxy(candidates, proxy, cfg.finetune.top_candidates)
        result = run_sweep(candidates, task_pool, eval_pool, cfg, d, ray_address=cfg.ray_address, resume=resume,
                           proxy=proxy)
        reused = False
    _publish(marker, run.out / "candidates.json")
    if (d / "proxy.json").is_file():
        _publish(d / "proxy.json", run.out / "proxy.json")
    if (d / "target").is_dir():
        _link(d / "target", run.out / "target")
    run.stage("tune", seconds=time.perf_counter() - t0, reused=reused, key=d.name, dir=str(d),
              target=result["summary"]["target"], failed=result["summary"]["failed"],
              stopped_early=result["summary"]["stopped_early"],
              proxy_rank_correlation=result["summary"].get("proxy_rank_correlation"))
    return result


# ----------------------------------------------------------------------------------------------
# commands


def _read_and_embed(cfg: Config, run: Run, progress: bool) -> Pool:
    """Read and check the pool and the config against it, then (and only then) start the run."""
    t0 = time.perf_counter()
    log.info("stage read: start")
    pool = read_pool(cfg.data, skip_bad_rows=cfg.embed.on_bad_rows == "skip")
    cfg.candidate_grid(len(pool))  # budgets or K above the pool: an error before any work
    run.start()
    run.stage("read", seconds=time.perf_counter() - t0, source=pool.source, rows=len(pool), skipped_rows=pool.skipped)
    return embed_stage(pool, cfg, run, progress=progress)


def run_select(cfg: Config, *, overwrite: bool = False, resume: bool = False, progress: bool = True) -> Path:
    """Read, embed (unless vectors are given), select; returns the run directory."""
    run = Run(cfg, resume=resume, overwrite=overwrite)
    embeds_with_ray = cfg.embed.engine == "ray" and cfg.data.embeddings is None
    with _one_ray(cfg, embeds_with_ray or cfg.select.engine == "ray"):
        pool = _read_and_embed(cfg, run, progress)
        select_stage(pool, cfg, run)
    run.finish()
    return run.out


def run_embed(cfg: Config, *, progress: bool = True) -> Path:
    """Only the embedding stage, into ``<output_dir>/embeddings/<key>/``; returns that directory."""
    from .embed import embed_pool

    pool = read_pool(cfg.data, skip_bad_rows=cfg.embed.on_bad_rows == "skip")
    if pool.embeddings is not None:
        raise InputError("the pool already has embeddings (data.embeddings or an embedding column); "
                         "there is nothing to embed")
    manifest = embed_pool(pool, cfg.embed, Path(cfg.output_dir) / "embeddings", progress=progress,
                          ray_address=cfg.ray_address)
    return Path(cfg.output_dir) / "embeddings" / manifest["key"]


def _one_ray(cfg: Config, needed: bool):
    """One Ray session for a whole command: stages that use Ray join it instead of starting and
    stopping their own (Ray Train does not survive a second ray.init in one process)."""
    from contextlib import nullcontext

    from .runtime import ray_session

    return ray_session(cfg.ray_address) if needed else nullcontext()


def run_tune(cfg: Config, *, overwrite: bool = False, resume: bool = False, progress: bool = True) -> dict:
    """Selection, then the Tune sweep over every candidate, the random baselines and the full pool."""
    from .tune import eval_data_config

    eval_data_config(cfg)  # no held-out set: fail before any work
    run = Run(cfg, resume=resume, overwrite=overwrite)
    with _one_ray(cfg, True):
        pool = _read_and_embed(cfg, run, progress)
        result = tune_stage(pool, select_stage(pool, cfg, run), cfg, run, resume=resume)
    run.finish()
    return result


def run_all(cfg: Config, *, overwrite: bool = False, resume: bool = False, progress: bool = True) -> Path:
    """The whole job: embed -> select -> tune (when ``finetune.eval_path`` is set) -> report."""
    from .report import write_report

    run = Run(cfg, resume=resume, overwrite=overwrite)
    embeds_with_ray = cfg.embed.engine == "ray" and cfg.data.embeddings is None
    with _one_ray(cfg, embeds_with_ray or cfg.select.engine == "ray" or bool(cfg.finetune.eval_path)):
        pool = _read_and_embed(cfg, run, progress)
        select_dir = select_stage(pool, cfg, run)
        if cfg.finetune.eval_path:
            tune_stage(pool, select_dir, cfg, run, resume=resume)
        else:
            log.info("stage tune: skipped (no finetune.eval_path)")
    t0 = time.perf_counter()
    log.info("stage report: start")
    faults.point("report")
    write_report(run.out, run.info, pool)
    run.stage("report", seconds=time.perf_counter() - t0, path=str(run.out / "report.html"))
    run.finish()
    return run.out
