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

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import faults
from .io.run_dir import Run, digest, link, publish, write_json, write_parquet
from .config import Config
from .io.pool import Pool, read_pool
from .runtime.devices import Devices, decide
from .errors import ConfigError, InputError
from .select.engine import InMemory, select_candidates
from .select.tables import clusters_table, selection_table

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# stages


def embed_into(pool: Pool, cfg: Config, out: Path, *, progress: bool = True) -> tuple[Pool, dict]:
    """Run the embedding stage into ``out/embeddings/<key>/`` and return the pool with its vectors
    (rows whose image could not be read, under ``on_bad_rows: skip``, dropped)."""
    from .embed.stage import embed_pool, load_stage

    manifest = embed_pool(pool, cfg.embed, out / "embeddings", progress=progress)
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
              key=manifest["key"], dir=run.relative(run.out / "embeddings" / manifest["key"]), rows=manifest["rows"],
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
    run.stage("select", seconds=time.perf_counter() - t0, reused=reused, key=key, dir=run.relative(d), **meta)
    return d


def _sharded_vectors(pool: Pool, cfg: Config, run: Run, devices: Devices):
    """``select.engine: ray``: the pool's vectors as the embedding stage's shards (this run's, or a
    stage directory given as ``data.embeddings``), their rows mapped to the pool's order."""
    from .select.sharded import Sharded

    stage = run.path_of("embed")
    if stage is None and cfg.data.embeddings and Path(cfg.data.embeddings).is_dir():
        stage = cfg.data.embeddings
    if stage is None:
        raise ConfigError("select.engine 'ray' reads the vectors from the embedding stage's shards; embed the "
                          "pool with this tool, or give data.embeddings as a directory the embedding stage wrote, "
                          "or use select.engine 'driver' for .npy / Parquet vectors")
    return Sharded.from_stage(stage, pool, cfg, devices)


def tune_stage(pool: Pool, parts, select_dir: Path, cfg: Config, run: Run, *, resume: bool = False) -> dict:
    """The fine-tuning sweep over every candidate into ``tune/<key>/``; target/ linked at the top.
    parts: the held-out parts (``heldout.Parts``), read and checked before the first stage."""
    from .finetune.proxy import prune, score_proxy
    from .finetune.sweep import candidates_from_selection, run_sweep
    from .finetune.task import task_for

    log.info("stage tune: start")
    t0 = time.perf_counter()
    ft = cfg.finetune
    selection = pq.read_table(select_dir / "selection.parquet")
    task = task_for(ft.task)
    task_pool = _in_selection_order(task.read(pool, cfg.data, ft), selection, cfg, parts)
    # keyed by the config as run.json holds it (locations absolute): the same key from any directory
    stored = run.info["config"]
    d = run.out / "tune" / digest(select_dir.name, stored["finetune"], stored["data"], cfg.seed)
    marker = d / "candidates.json"
    if marker.is_file():
        result, reused = json.loads(marker.read_text()), True
    else:
        listed = json.loads((select_dir / "select.json").read_text())["candidates"]
        candidates = candidates_from_selection(selection, listed, include_full=ft.sweep.include_full)
        proxy = None
        kind = task.proxy_kind(ft)
        if kind and pool.embeddings is not None:  # scored on the validation part only
            validation = None if kind == "base_loss" else embed_into(parts.validation, cfg, run.out, progress=False)[0]
            proxy = score_proxy(kind, pool, candidates, cfg, validation=validation, task_pool=task_pool)
            write_json(proxy, d / "proxy.json")
            candidates = prune(candidates, proxy, ft.proxy.top_candidates)
        result = run_sweep(candidates, task_pool, parts, cfg, d, resume=resume, proxy=proxy)
        if result["summary"]["target"]:
            _write_target_records(cfg, d / "target", result, task_pool)
            write_json(result, marker)  # the summary now names the records file
        reused = False
    publish(marker, run.out / "candidates.json")
    if (d / "proxy.json").is_file():
        publish(d / "proxy.json", run.out / "proxy.json")
    if (d / "target").is_dir():
        link(d / "target", run.out / "target")
    summary = result["summary"]
    run.stage("tune", seconds=time.perf_counter() - t0, reused=reused, key=d.name, dir=str(d),
              target=summary["target"], split=summary.get("split"), verdict=summary.get("verdict", {}).get("lines"),
              failed=summary["failed"], stopped_early=summary["stopped_early"],
              proxy_rank_correlation=summary.get("proxy_rank_correlation"))
    return result


def _in_selection_order(task_pool: Pool, selection: pa.Table, cfg: Config, parts) -> Pool:
    """The task pool's rows in selection.parquet's order, checked: every selected id still in the
    pool, and (with ids of the user's) none of them in the held-out parts."""
    at = task_pool.positions(selection.column("id").to_pylist())
    if (at < 0).any():
        raise InputError(f"the pool in {cfg.data.path} no longer holds the selected sample "
                         f"{selection.column('id')[int(np.argmax(at < 0))].as_py()!r}; rerun the selection "
                         f"(--overwrite) after changing the pool")
    task_pool = task_pool.take(at)
    if cfg.data.id_column:
        overlap = set(task_pool.ids) & (set(parts.validation.ids) | set(parts.test.ids))
        if overlap:
            raise InputError(f"{len(overlap)} held-out id(s) are also in the pool, e.g. {sorted(overlap)[0]!r}; "
                             f"the held-out set must be disjoint from the pool")
    return task_pool


def _write_target_records(cfg: Config, target_dir: Path, result: dict, pool: Pool) -> None:
    """target/subset.<the pool's format>: the target's samples with every original field, for a
    trainer, from the records of ``pool`` as this command read it."""
    from .io.export import export_records, pool_format
    from .io.formats import SUFFIX

    ids = pq.read_table(target_dir / "ids.parquet").column("id").to_pylist()
    path = target_dir / f"subset{SUFFIX[pool_format(cfg.data)]}"
    export_records(cfg.data, ids, path, pool=pool)
    result["summary"]["target"]["subset"] = str(path.relative_to(target_dir.parent))


def report_stage(pool: Pool, run: Run) -> None:
    from .report import write_report

    t0 = time.perf_counter()
    log.info("stage report: start")
    faults.point("report")
    write_report(run.out, run.info, pool)
    run.stage("report", seconds=time.perf_counter() - t0, path=run.relative(run.out / "report.html"))


# ----------------------------------------------------------------------------------------------
# commands


def _read_and_embed(cfg: Config, run: Run, progress: bool, *, tune: bool = False):
    """Read and check the pool, the config against it and (``tune``) the held-out set and the model,
    then (and only then) start the run: bad input fails before anything is written. Returns the
    embedded pool and the held-out parts (None without ``tune``)."""
    t0 = time.perf_counter()
    log.info("stage read: start")
    pool = _read_pool(cfg)
    cfg.candidate_grid(len(pool))  # budgets or K above the pool: an error before any work
    parts = _check_held_out(cfg, pool) if tune else None
    _check_text_model(cfg, pool)
    run.start()
    run.stage("read", seconds=time.perf_counter() - t0, source=pool.source, rows=len(pool), skipped_rows=pool.skipped)
    return embed_stage(pool, cfg, run, progress=progress), parts


def _check_held_out(cfg: Config, pool: Pool):
    """The held-out parts read and fit for the task, the model found: before any stage. Returns
    the parts (``heldout.Parts``)."""
    from .finetune.heldout import read_parts
    from .finetune.task import task_for
    from .io.models import resolve

    task = task_for(cfg.finetune.task)
    resolve(cfg.finetune.model, task.default_model)
    parts = read_parts(cfg)
    ho = cfg.finetune.heldout
    task.check_heldout(pool, {f"validation part ({ho.eval_path})": parts.validation,
                              f"test part ({ho.test_path or ho.eval_path})": parts.test})
    return parts


def _check_text_model(cfg: Config, pool: Pool) -> dict | None:
    """The text model found, and ``embed.pooling`` / ``embed.prompt_name`` fit it, before any stage
    (reads the model's small JSON files only); how it will embed, or None when no text is embedded."""
    if pool.texts is None or pool.embeddings is not None:
        return None
    from .embed.encoders import text_encoding

    return text_encoding(cfg.embed).describe()


def _read_pool(cfg: Config) -> Pool:
    """The pool ``cfg.data`` describes, read once per command; ``embed.on_bad_rows: skip`` drops
    (and counts) the rows with nothing to embed instead of refusing the pool."""
    return read_pool(cfg.data, skip_bad_rows=cfg.embed.on_bad_rows == "skip")


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
    pool = _read_pool(cfg)
    grid = cfg.candidate_grid(len(pool))
    found = {"samples": len(pool), "labels": None if pool.labels is None else len(pool.label_codes()[0]),
             "candidates (K, M)": grid, "output_dir": cfg.output_dir}
    text = _check_text_model(cfg, pool)
    if text is not None:
        found["text encoder"] = text
    if tune:
        parts = _check_held_out(cfg, pool)
        found.update(validation=len(parts.validation), test=len(parts.test))
    return found


def run_select(cfg: Config, *, overwrite: bool = False, resume: bool = False, progress: bool = True) -> Path:
    """Read, embed (unless vectors are given), select; returns the run directory."""
    devices = decide(cfg)
    run = Run(cfg, resume=resume, overwrite=overwrite)
    with _one_ray(cfg, _embeds_with_ray(cfg) or cfg.select.engine == "ray"):
        pool, _ = _read_and_embed(cfg, run, progress)
        select_stage(pool, cfg, run, devices, progress=progress)
    run.finish()
    return run.out


def run_embed(cfg: Config, *, progress: bool = True) -> Path:
    """Only the embedding stage, into ``<output_dir>/embeddings/<key>/``; returns that directory."""
    from .embed.stage import embed_pool

    pool = _read_pool(cfg)
    if pool.embeddings is not None:
        raise InputError("the pool already has embeddings (data.embeddings or an embedding column); "
                         "there is nothing to embed")
    with _one_ray(cfg, _embeds_with_ray(cfg)):
        manifest = embed_pool(pool, cfg.embed, Path(cfg.output_dir) / "embeddings", progress=progress)
    return Path(cfg.output_dir) / "embeddings" / manifest["key"]


def run_tune(cfg: Config, *, overwrite: bool = False, resume: bool = False, progress: bool = True) -> dict:
    """Selection, then the Tune sweep over every candidate, the random baselines and the full pool."""
    from .finetune.heldout import eval_data_config

    eval_data_config(cfg)  # no held-out set: fail before any work
    devices = decide(cfg)
    run = Run(cfg, resume=resume, overwrite=overwrite)
    with _one_ray(cfg, True):
        pool, parts = _read_and_embed(cfg, run, progress, tune=True)
        result = tune_stage(pool, parts, select_stage(pool, cfg, run, devices, progress=progress), cfg, run,
                            resume=resume)
    run.finish()
    return result


def run_all(cfg: Config, *, overwrite: bool = False, resume: bool = False, progress: bool = True) -> Path:
    """The whole job: embed -> select -> tune (when ``finetune.heldout.eval_path`` is set) -> report."""
    devices = decide(cfg)
    run = Run(cfg, resume=resume, overwrite=overwrite)
    tune = bool(cfg.finetune.heldout.eval_path)
    with _one_ray(cfg, _embeds_with_ray(cfg) or cfg.select.engine == "ray" or tune):
        pool, parts = _read_and_embed(cfg, run, progress, tune=tune)
        select_dir = select_stage(pool, cfg, run, devices, progress=progress)
        if tune:
            tune_stage(pool, parts, select_dir, cfg, run, resume=resume)
        else:
            log.info("stage tune: skipped (no finetune.heldout.eval_path)")
    report_stage(pool, run)
    run.finish()
    return run.out
