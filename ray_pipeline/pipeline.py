"""The job: read -> embed -> select -> tune -> report, as stages of one run directory, and the
commands that run them (``ray-pipeline select | embed | tune | run``).

Each stage wraps a module that holds its logic (:mod:`embed`, :mod:`select`, :mod:`tune`,
:mod:`report`), writes under a keyed directory (layout: :mod:`artifacts`) and records itself in
``run.json``. The devices are decided once per command and passed down; one Ray session serves
every stage of a command.
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pyarrow.parquet as pq

from . import faults
from .io.run_dir import Run, digest, link, publish, write_json, write_parquet
from .config import Config
from .io.pool import Pool, read_pool
from .runtime.devices import Devices, decide
from .errors import ConfigError, InputError
from .select.engine import InMemory, clusters_table, select_candidates, selection_table

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# stages


def embed_into(pool: Pool, cfg: Config, out: Path, *, progress: bool = True) -> tuple[Pool, dict]:
    """Run the embedding stage into ``out/embeddings/<key>/`` and return the pool with its vectors
    (rows whose image could not be read, under ``on_bad_rows: skip``, dropped)."""
    from .embed.stage import embed_pool, load_stage

    manifest = embed_pool(pool, cfg.embed, out / "embeddings", progress=progress, ray_address=cfg.ray_address)
    keep, x = load_stage(out / "embeddings" / manifest["key"], pool.ids)
    pool = pool.take(keep)
    pool.embeddings = x
    return pool, manifest


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


def select_stage(pool: Pool, cfg: Config, run: Run, devices: Devices, *, progress: bool = True) -> Path:
    """Candidates and random baselines into ``select/<key>/``: selection.parquet (a column per
    candidate), clusters.parquet, and select.json (the candidates as data; marks it complete)."""
    log.info("stage select: start")
    t0 = time.perf_counter()
    x = pool.embeddings
    key = digest(x, pool.ids.tolist(), cfg.to_dict()["cluster"], cfg.to_dict()["select"], cfg.seed)
    d = run.out / "select" / key
    marker = d / "select.json"
    if marker.is_file():
        meta = json.loads(marker.read_text())
        reused = True
    else:
        vectors = _sharded_vectors(pool, cfg, run, devices) if cfg.select.engine == "ray" else InMemory(x, cfg, devices)
        sel = select_candidates(vectors, cfg, rng=np.random.default_rng(cfg.seed), labels=pool.labels,
                                progress=progress)
        write_parquet(selection_table(pool, sel), d / "selection.parquet")
        faults.point("select:written")
        write_parquet(clusters_table(pool, sel), d / "clusters.parquet")
        meta = {"n": len(pool), "dim": int(x.shape[1]), "budgets": list(sel.budgets),
                "seeds": {"seed": cfg.seed, "random_seeds": list(cfg.select.random_seeds)},
                "candidates": sel.candidates(), "kernel_seconds": {s.family: s.seconds for s in sel.per_k},
                "engine": cfg.select.engine, "devices": {"select": devices.select, "faiss_gpus": devices.faiss_gpus}}
        write_json(meta, marker)
        reused = False
    publish(d / "selection.parquet", run.out / "selection.parquet")
    publish(d / "clusters.parquet", run.out / "clusters.parquet")
    run.stage("select", seconds=time.perf_counter() - t0, reused=reused, key=key, dir=str(d), **meta)
    return d


def _sharded_vectors(pool: Pool, cfg: Config, run: Run, devices: Devices):
    """``select.engine: ray``: the pool's vectors as the embedding stage's shards (this run's, or a
    stage directory given as ``data.embeddings``), their rows mapped to the pool's order."""
    from .select.sharded import Sharded, shard_paths

    stage = run.info["stages"].get("embed", {}).get("dir")
    if stage is None and cfg.data.embeddings and Path(cfg.data.embeddings).is_dir():
        stage = cfg.data.embeddings
    if stage is None:
        raise ConfigError("select.engine 'ray' reads the vectors from the embedding stage's shards; embed the "
                          "pool with this tool, or give data.embeddings as a directory the embedding stage wrote, "
                          "or use select.engine 'driver' for .npy / Parquet vectors")
    paths = shard_paths(stage)
    tables = [pq.read_table(f, columns=["id", "row"]) for f in paths]
    size = 1 + max((int(pa.compute.max(t.column("row")).as_py() or 0) for t in tables if len(t)), default=0)
    row_map = np.full(size, -1, dtype=np.int64)
    for t in tables:
        row_map[t.column("row").to_numpy()] = pool.positions(t.column("id").to_pylist())
    return Sharded(paths, len(pool), cfg, devices, row_map=row_map, groups=cfg.select.groups)


def proxy_scores(pool: Pool, eval_pool: Pool, candidates: list, cfg: Config, run: Run, *,
                 task_pool: Optional[Pool] = None) -> dict:
    """Every candidate's proxy score (``finetune.proxy_kind``): a linear probe on the labels or the
    held-out set's coverage, both on the held-out set's embeddings (embedded by the same stage, so
    with the same encoder); or the base model's loss on the candidate's rows of ``task_pool`` (the
    pool's prompts and responses or chats, in ``pool``'s row order)."""
    from .finetune.proxy import score_candidates, score_coverage

    t0 = time.perf_counter()
    kind = cfg.finetune.proxy_kind
    scored = [c for c in candidates if c.kind != "full" or kind == "probe"]  # the full pool covers all it can
    if kind != "base_loss":  # the embedding proxies read the held-out set's vectors
        eval_pool, _ = embed_into(eval_pool, cfg, run.out, progress=False)
    if kind == "base_loss":
        if task_pool is None:
            raise ValueError("the base_loss proxy needs the task pool")
        scores = _base_loss_scores(task_pool, scored, cfg)
    elif kind == "coverage":
        scores = score_coverage(pool.embeddings, {c.name: c.rows for c in scored}, eval_pool.embeddings)
    else:
        labels = sorted({str(v) for v in pool.labels})
        index = {v: i for i, v in enumerate(labels)}
        y = np.array([index[str(v)] for v in pool.labels])
        known = np.array([str(v) in index for v in eval_pool.labels])
        ye = np.array([index[str(v)] for v in eval_pool.labels[known]])
        scores = score_candidates(pool.embeddings, y, {c.name: c.rows for c in scored},
                                  eval_pool.embeddings[known], ye, len(labels))
    log.info("proxy: %d candidates scored by %s in %.1fs", len(scores),
             {"probe": "a linear probe", "coverage": "held-out coverage", "base_loss": "the base model's loss"}[kind],
             time.perf_counter() - t0)
    return scores


def _base_loss_scores(task_pool: Pool, candidates: list, cfg: Config) -> dict:
    """The base model's token-weighted response loss on a seeded sample of at most
    ``finetune.proxy_rows`` rows of each candidate; every distinct row is read once, on the
    driver (a GPU where ``finetune.device`` allows and the driver has one)."""
    from .runtime.devices import torch_device
    from .finetune.train import per_sample_values
    from .finetune.heldout import task_arrays
    from .io.models import resolve
    from .finetune.proxy import sample_rows, score_base_loss

    ft = cfg.finetune
    sampled = sample_rows({c.name: c.rows for c in candidates}, ft.proxy_rows, np.random.default_rng(cfg.seed))
    rows = np.unique(np.concatenate(list(sampled.values()) or [np.zeros(0, np.int64)]))
    device = torch_device(ft.device).type
    log.info("proxy: the base model's loss on %d rows (%d candidates, at most %s rows each) on %s", len(rows),
             len(sampled), ft.proxy_rows or "all", device)
    per_row = per_sample_values(resolve(ft.model, ft.task), ft, task_arrays(task_pool.take(rows), cfg), device=device)
    return score_base_loss(per_row, rows, sampled)


def tune_stage(pool: Pool, select_dir: Path, cfg: Config, run: Run, *, resume: bool = False) -> dict:
    """The fine-tuning sweep over every candidate into ``tune/<key>/``; target/ linked at the top."""
    from .finetune.heldout import read_parts, read_task_pool
    from .finetune.proxy import prune
    from .finetune.sweep import candidates_from_selection, run_sweep

    log.info("stage tune: start")
    t0 = time.perf_counter()
    task_pool = read_task_pool(cfg.data, cfg)
    val_pool, test_pool, split = read_parts(cfg)
    selection = pq.read_table(select_dir / "selection.parquet")
    meta = json.loads((select_dir / "select.json").read_text())
    at = task_pool.positions(selection.column("id").to_pylist())
    if (at < 0).any():
        raise InputError(f"the pool in {cfg.data.path} no longer holds the selected sample "
                         f"{selection.column('id')[int(np.argmax(at < 0))].as_py()!r}; rerun the selection "
                         f"(--overwrite) after changing the pool")
    task_pool = task_pool.take(at)  # in the selection's order
    if cfg.data.id_column:
        overlap = set(task_pool.ids) & (set(val_pool.ids) | set(test_pool.ids))
        if overlap:
            raise InputError(f"{len(overlap)} held-out id(s) are also in the pool, e.g. {sorted(overlap)[0]!r}; "
                             f"the held-out set must be disjoint from the pool")
    d = run.out / "tune" / digest(select_dir.name, cfg.to_dict()["finetune"], cfg.to_dict()["data"], cfg.seed)
    marker = d / "candidates.json"
    if marker.is_file():
        result, reused = json.loads(marker.read_text()), True
    else:
        candidates = candidates_from_selection(selection, meta["candidates"], include_full=cfg.finetune.include_full)
        proxy = None
        if cfg.finetune.proxy_kind and pool.embeddings is not None:
            proxy = proxy_scores(pool, val_pool, candidates, cfg, run, task_pool=task_pool)  # validation part only
            write_json(proxy, d / "proxy.json")
            candidates = prune(candidates, proxy, cfg.finetune.top_candidates)
        result = run_sweep(candidates, task_pool, val_pool, cfg, d, test_pool=test_pool, ray_address=cfg.ray_address,
                           resume=resume, proxy=proxy, split=split)
        if result["summary"]["target"]:
            _write_target_records(cfg, d / "target", result)
            write_json(result, marker)  # the summary now names the records file
        reused = False
    publish(marker, run.out / "candidates.json")
    if (d / "proxy.json").is_file():
        publish(d / "proxy.json", run.out / "proxy.json")
    if (d / "target").is_dir():
        link(d / "target", run.out / "target")
    run.stage("tune", seconds=time.perf_counter() - t0, reused=reused, key=d.name, dir=str(d),
              target=result["summary"]["target"], split=result["summary"].get("split"),
              verdict=result["summary"].get("verdict", {}).get("lines"), failed=result["summary"]["failed"],
              stopped_early=result["summary"]["stopped_early"],
              proxy_rank_correlation=result["summary"].get("proxy_rank_correlation"))
    return result


def _write_target_records(cfg: Config, target_dir: Path, result: dict) -> None:
    """target/subset.<the pool's format>: the target's samples with every original field, for a trainer."""
    from .io.export import export_records, pool_format
    from .io.formats import SUFFIX

    ids = pq.read_table(target_dir / "ids.parquet").column("id").to_pylist()
    path = target_dir / f"subset{SUFFIX[pool_format(cfg)]}"
    export_records(cfg, ids, path)
    result["summary"]["target"]["subset"] = str(path)


def report_stage(pool: Pool, run: Run) -> None:
    from .report import write_report

    t0 = time.perf_counter()
    log.info("stage report: start")
    faults.point("report")
    write_report(run.out, run.info, pool)
    run.stage("report", seconds=time.perf_counter() - t0, path=str(run.out / "report.html"))


# ----------------------------------------------------------------------------------------------
# commands


def _read_and_embed(cfg: Config, run: Run, progress: bool, *, tune: bool = False) -> Pool:
    """Read and check the pool, the config against it and (``tune``) the held-out set and the model,
    then (and only then) start the run: bad input fails before anything is written."""
    t0 = time.perf_counter()
    log.info("stage read: start")
    pool = read_pool(cfg.data, skip_bad_rows=cfg.embed.on_bad_rows == "skip")
    cfg.candidate_grid(len(pool))  # budgets or K above the pool: an error before any work
    if tune:
        _check_held_out(cfg, pool)
    run.start()
    run.stage("read", seconds=time.perf_counter() - t0, source=pool.source, rows=len(pool), skipped_rows=pool.skipped)
    return embed_stage(pool, cfg, run, progress=progress)


def _check_held_out(cfg: Config, pool: Pool) -> tuple[Pool, Pool]:
    """The held-out parts read, their labels known to the pool, the model found: before any stage.
    Returns the (validation, test) parts."""
    from .finetune.heldout import read_parts
    from .io.models import resolve

    resolve(cfg.finetune.model, cfg.finetune.task)
    val, test, _ = read_parts(cfg)
    if cfg.finetune.task != "classification":
        return val, test
    if pool.labels is None:
        raise InputError("classification needs the pool's labels: set data.label_column (or data.labels_path), or "
                         "finetune.task: instruction")
    known = {str(v) for v in pool.labels}
    for part, p in (("validation", val), ("test", test)):
        unknown = sorted({str(v) for v in p.labels} - known)
        if unknown:
            where = cfg.finetune.test_path if part == "test" and cfg.finetune.test_path else cfg.finetune.eval_path
            raise InputError(f"the held-out {part} part ({where}) has {len(unknown)} label(s) the pool does not have, "
                             f"e.g. {unknown[:3]}{' (none of its labels is in the pool)' if not known & {str(v) for v in p.labels} else ''}; "
                             f"a classifier cannot learn them: remove those rows, or check data.label_column")
    return val, test


def _one_ray(cfg: Config, needed: bool):
    """One Ray session for a whole command: stages that use Ray join it instead of starting and
    stopping their own (Ray Train does not survive a second ray.init in one process)."""
    from .runtime.session import ray_session

    return ray_session(cfg.ray_address) if needed else nullcontext()


def _embeds_with_ray(cfg: Config) -> bool:
    return cfg.embed.engine == "ray" and cfg.data.embeddings is None


def check(cfg: Config, *, tune: bool, overwrite: bool = False, resume: bool = False) -> dict:
    """Every check a run makes before its first stage (config, pool, grid, output directory, held-out
    set, model), and nothing written; what was found. ``ray-pipeline run --check``."""
    from .finetune.heldout import eval_data_config

    if tune:
        eval_data_config(cfg)
    decide(cfg)
    Run(cfg, resume=resume, overwrite=overwrite)  # a different or unfinished run in the way: an error
    pool = read_pool(cfg.data, skip_bad_rows=cfg.embed.on_bad_rows == "skip")
    grid = cfg.candidate_grid(len(pool))
    found = {"samples": len(pool), "labels": None if pool.labels is None else len({str(v) for v in pool.labels}),
             "candidates (K, M)": grid, "output_dir": cfg.output_dir}
    if tune:
        val, test = _check_held_out(cfg, pool)
        found.update(validation=len(val), test=len(test))
    return found


def run_select(cfg: Config, *, overwrite: bool = False, resume: bool = False, progress: bool = True) -> Path:
    """Read, embed (unless vectors are given), select; returns the run directory."""
    devices = decide(cfg)
    run = Run(cfg, resume=resume, overwrite=overwrite)
    with _one_ray(cfg, _embeds_with_ray(cfg) or cfg.select.engine == "ray"):
        pool = _read_and_embed(cfg, run, progress)
        select_stage(pool, cfg, run, devices, progress=progress)
    run.finish()
    return run.out


def run_embed(cfg: Config, *, progress: bool = True) -> Path:
    """Only the embedding stage, into ``<output_dir>/embeddings/<key>/``; returns that directory."""
    from .embed.stage import embed_pool

    pool = read_pool(cfg.data, skip_bad_rows=cfg.embed.on_bad_rows == "skip")
    if pool.embeddings is not None:
        raise InputError("the pool already has embeddings (data.embeddings or an embedding column); "
                         "there is nothing to embed")
    manifest = embed_pool(pool, cfg.embed, Path(cfg.output_dir) / "embeddings", progress=progress,
                          ray_address=cfg.ray_address)
    return Path(cfg.output_dir) / "embeddings" / manifest["key"]


def run_tune(cfg: Config, *, overwrite: bool = False, resume: bool = False, progress: bool = True) -> dict:
    """Selection, then the Tune sweep over every candidate, the random baselines and the full pool."""
    from .finetune.heldout import eval_data_config

    eval_data_config(cfg)  # no held-out set: fail before any work
    devices = decide(cfg)
    run = Run(cfg, resume=resume, overwrite=overwrite)
    with _one_ray(cfg, True):
        pool = _read_and_embed(cfg, run, progress, tune=True)
        result = tune_stage(pool, select_stage(pool, cfg, run, devices, progress=progress), cfg, run, resume=resume)
    run.finish()
    return result


def run_all(cfg: Config, *, overwrite: bool = False, resume: bool = False, progress: bool = True) -> Path:
    """The whole job: embed -> select -> tune (when ``finetune.eval_path`` is set) -> report."""
    devices = decide(cfg)
    run = Run(cfg, resume=resume, overwrite=overwrite)
    with _one_ray(cfg, _embeds_with_ray(cfg) or cfg.select.engine == "ray" or bool(cfg.finetune.eval_path)):
        pool = _read_and_embed(cfg, run, progress, tune=bool(cfg.finetune.eval_path))
        select_dir = select_stage(pool, cfg, run, devices, progress=progress)
        if cfg.finetune.eval_path:
            tune_stage(pool, select_dir, cfg, run, resume=resume)
        else:
            log.info("stage tune: skipped (no finetune.eval_path)")
    report_stage(pool, run)
    run.finish()
    return run.out
