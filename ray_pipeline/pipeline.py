"""The job: read -> embed -> select -> tune -> report, as stages of one run directory, and the
commands that run them (``ray-pipeline select | embed | tune | run``).

Each stage wraps the subpackage that holds its logic (``embed``, ``select``, ``finetune``,
``report``), writes under a keyed directory (layout: ``io.run_dir``) and records itself in
``run.json``. Every input is read and checked before Ray starts or anything is written; the
devices are decided once per command and passed down; one Ray session serves every stage of a
command.
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
import pyarrow.parquet as pq

from . import faults
from .io.run_dir import Run, digest, link, publish, write_json, write_parquet
from .config import Config
from .io.pool import Pool, read_pool
from .runtime.devices import Devices, decide
from .runtime.console import Console
from .errors import ConfigError, InputError
from .select.engine import InMemory, select_candidates
from .select.tables import clusters_table, selection_table

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# stages


def embed_into(pool: Pool, cfg: Config, out: Path, *, progress: bool = True,
               ray_bars: bool = False) -> tuple[Pool, dict]:
    """Run the embedding stage into ``out/embeddings/<key>/`` and return the pool with its vectors
    (rows whose image could not be read, under ``on_bad_rows: skip``, dropped). progress: a bar
    over the shards; ray_bars: Ray Data's own bars instead (``Console.ray_bars``)."""
    from .embed.stage import embed_pool, load_stage

    manifest = embed_pool(pool, cfg.embed, out / "embeddings", progress=progress, ray_bars=ray_bars)
    keep, x = load_stage(out / "embeddings" / manifest["key"], pool.ids)
    pool = pool.take(keep)
    pool.embeddings = x
    return pool, manifest


def embed_stage(pool: Pool, cfg: Config, run: Run, *, console: Console) -> Pool:
    """Vectors for the pool: given ones as they are, or the embedding stage's (resumable)."""
    log.info("stage embed: start")
    t0 = time.perf_counter()
    if pool.embeddings is not None:
        run.stage("embed", seconds=time.perf_counter() - t0, source="given", dim=int(pool.embeddings.shape[1]))
        return pool
    pool, manifest = embed_into(pool, cfg, run.out, progress=console.progress, ray_bars=console.ray_bars)
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
        t1 = time.perf_counter()
        vectors = _sharded_vectors(pool, cfg, run, devices) if cfg.select.engine == "ray" else InMemory(x, cfg, devices)
        with _bounded_tasks(cfg):
            sel = select_candidates(vectors, cfg, rng=np.random.default_rng(cfg.seed), labels=pool.labels,
                                    progress=progress)
        select_s = time.perf_counter() - t1  # the selection itself, kept in select.json for a reuse
        write_parquet(selection_table(pool, sel), d / "selection.parquet")
        faults.point("select:written")
        write_parquet(clusters_table(pool, sel), d / "clusters.parquet")
        meta = {"n": len(pool), "dim": int(x.shape[1]), "budgets": list(sel.budgets),
                "seeds": {"seed": cfg.seed, "random_seeds": list(cfg.select.random_seeds)},
                "candidates": sel.candidates(), "select_seconds": select_s,
                "kernel_seconds": {s.family: s.seconds for s in sel.per_k},
                "engine": cfg.select.engine, "devices": {"select": devices.select, "faiss_gpus": devices.faiss_gpus}}
        write_json(meta, marker)
        reused = False
    publish(d / "selection.parquet", run.out / "selection.parquet")
    publish(d / "clusters.parquet", run.out / "clusters.parquet")
    run.stage("select", seconds=time.perf_counter() - t0, reused=reused, key=key, dir=run.relative(d), **meta)
    return d


def _bounded_tasks(cfg: Config):
    """``select.engine: ray``: a node with a free CPU checked for (the tasks ask for one each), and
    the tasks' wait for a node with room (a lost node's, where no other has one) bounded by
    ``ray.wait_timeout_s`` (``capacity.bounded_waits``); the driver engine: nothing."""
    if cfg.select.engine != "ray":
        return nullcontext()
    import ray

    from .runtime.capacity import Request, bounded_waits, ensure_fits
    from .runtime.retries import tasks_waiting

    change = "add a node with a free CPU, or set select.engine: driver (the selection in the driver's memory)"
    ensure_fits([Request("a selection task", {"CPU": 1}, change)])
    job = ray.get_runtime_context().get_job_id()
    return bounded_waits(lambda: tasks_waiting(job), "the selection tasks", change)


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


def tune_stage(pool: Pool, parts, select_dir: Path, cfg: Config, run: Run, *, resume: bool = False,
               console: Console = Console()) -> dict:
    """The fine-tuning sweep over every candidate into ``tune/<key>/``; target/ linked at the top.
    parts: the held-out parts (``heldout.Parts``), read and checked before the first stage.
    console: what the sweep shows (Tune's tables, or a bar of trials)."""
    from .finetune.metrics import selection_to_tuning
    from .finetune.proxy import prune, score_proxy
    from .finetune.sweep import candidates_from_selection, run_sweep
    from .finetune.task import task_for

    log.info("stage tune: start")
    t0 = time.perf_counter()
    ft = cfg.finetune
    selection = pq.read_table(select_dir / "selection.parquet")
    task = task_for(ft.task, pool.modality)
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
        result = run_sweep(candidates, task_pool, parts, cfg, d, resume=resume, proxy=proxy, console=console)
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
    # selection time over one full-pool fine-tune (Data Whisperer's ratio); None without a full trial
    ratio = selection_to_tuning(json.loads((select_dir / "select.json").read_text()).get("select_seconds"),
                                result["trials"])
    run.stage("tune", seconds=time.perf_counter() - t0, reused=reused, key=d.name, dir=str(d),
              selection_to_tuning=ratio,
              target=summary["target"], split=summary.get("split"), verdict=summary.get("verdict", {}).get("lines"),
              failed=summary["failed"], stopped_early=summary["stopped_early"], retried=summary.get("retried", {}),
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


def _read_and_check(cfg: Config, *, tune: bool = False):
    """Read and check the pool, the config against it, the encoder and (``tune``) the held-out set
    and the model: before Ray starts and before anything is written. Returns the pool, the
    held-out parts (None without ``tune``) and the seconds it took."""
    t0 = time.perf_counter()
    log.info("stage read: start")
    pool = _read_pool(cfg)
    cfg.candidate_grid(len(pool))  # budgets or K above the pool: an error before any work
    _check_encoder(cfg, pool)
    parts = _check_held_out(cfg, pool) if tune else None
    return pool, parts, time.perf_counter() - t0


def _start_and_embed(pool: Pool, read_s: float, cfg: Config, run: Run, console: Console) -> Pool:
    """The input checked out: start the run (run.json, the log file) and embed the pool."""
    run.start()
    console.announce()
    run.stage("read", seconds=read_s, source=pool.source, rows=len(pool), skipped_rows=pool.skipped)
    return embed_stage(pool, cfg, run, console=console)


def _check_encoder(cfg: Config, pool: Pool) -> Optional[dict]:
    """``embed.model`` found and fit for the text encoder, and ``embed.pooling`` /
    ``embed.prompt_name`` fit it, where the pool's texts are to be embedded (reads the model's
    small files only); how it will embed, or None when no text is embedded. The speech encoder
    too, where recordings (or, with ``embed.video_audio``, clips' sound) are to be embedded."""
    if pool.embeddings is None and (pool.audios is not None or (pool.videos is not None and cfg.embed.video_audio)):
        from .embed.audio import check_audio_model

        check_audio_model(cfg.embed)
    if pool.embeddings is not None or pool.texts is None:
        return None
    from .embed.encoders import text_encoding
    from .io.models import check_encoder

    check_encoder(cfg.embed)
    return text_encoding(cfg.embed).describe()


def _check_held_out(cfg: Config, pool: Pool):
    """The held-out parts read and fit for the task, the base model found and fit for it: before
    any stage. Returns the parts (``heldout.Parts``)."""
    from .finetune.heldout import read_parts
    from .finetune.task import check_base_model, task_for
    from .io.models import resolve

    ft = cfg.finetune
    task = task_for(ft.task, pool.modality)  # a pair that cannot be tuned: one line here
    check_base_model(ft, pool.modality)
    model_path = resolve(ft.model, task.default_model, revision=ft.revision)
    parts = read_parts(cfg)
    ho = ft.heldout
    task.check_heldout(pool, {f"validation part ({ho.eval_path})": parts.validation,
                              f"test part ({ho.test_path or ho.eval_path})": parts.test})
    _check_trial_device(cfg, pool, model_path)
    return parts


def _check_trial_device(cfg: Config, pool: Pool, model_path: str) -> None:
    """The trials' device needs and GPU memory plan, where they can be known before Ray starts:
    on this machine (no cluster to join: its GPUs are the trials'), with ``finetune.device: cpu``,
    or against ``finetune.resources.gpu_memory_gb``. The sweep checks again on the cluster."""
    import os

    from .finetune.sizing import check_memory
    from .finetune.task import task_for
    from .finetune.train import check_device
    from .runtime.devices import torch_device

    ft = cfg.finetune
    local = not (cfg.ray_address or os.environ.get("RAY_ADDRESS"))
    on_gpu = ft.device != "cpu" and torch_device("auto").type == "cuda"
    if local or ft.device == "cpu":
        check_device(ft, on_gpu)
    if ft.resources.gpu_memory_gb or (local and on_gpu):
        names = task_for(ft.task, pool.modality).label_names(pool)
        check_memory(cfg, model_path, None if names is None else len(names), on_gpu=True, modality=pool.modality)


def _read_pool(cfg: Config) -> Pool:
    """The pool ``cfg.data`` describes, read once per command; ``embed.on_bad_rows: skip`` drops
    (and counts) the rows with nothing to embed instead of refusing the pool."""
    return read_pool(cfg.data, skip_bad_rows=cfg.embed.on_bad_rows == "skip", max_seconds=cfg.embed.max_seconds)


def _one_ray(cfg: Config, needed: bool, console: Console):
    """One Ray session for a whole command: stages that use Ray join it instead of starting and
    stopping their own (Ray Train does not survive a second ray.init in one process). console:
    where Ray's output goes (``runtime.session.Console``)."""
    from .runtime.session import ray_session

    return ray_session(cfg.ray_address, console=console, settings=cfg.ray) if needed else nullcontext()


def _embeds_with_ray(cfg: Config) -> bool:
    return cfg.embed.engine == "ray" and cfg.data.embeddings is None


def check(cfg: Config, *, tune: bool, overwrite: bool = False, resume: bool = False) -> dict:
    """Every check a run makes before its first stage (config, pool, grid, output directory, encoder,
    held-out set, model), and nothing written; what was found. ``ray-pipeline run --check``."""
    from .finetune.heldout import eval_data_config

    if tune:
        eval_data_config(cfg)
    decide(cfg)
    Run(cfg, resume=resume, overwrite=overwrite)  # a different or unfinished run in the way: an error
    pool = _read_pool(cfg)
    grid = cfg.candidate_grid(len(pool))
    text = _check_encoder(cfg, pool)
    found = {"samples": len(pool), "labels": None if pool.labels is None else len(pool.label_codes()[0]),
             "candidates (K, M)": grid, "output_dir": cfg.output_dir}
    if text is not None:
        found["text encoder"] = text
    if tune:
        parts = _check_held_out(cfg, pool)
        found.update(validation=len(parts.validation), test=len(parts.test))
    return found


def run_select(cfg: Config, *, overwrite: bool = False, resume: bool = False, console: Console = Console()) -> Path:
    """Read, embed (unless vectors are given), select; returns the run directory. console: what the
    terminal shows (the CLI's policy; the default leaves Ray's and the libraries' output as it is)."""
    devices = decide(cfg)
    run = Run(cfg, resume=resume, overwrite=overwrite)
    pool, _, read_s = _read_and_check(cfg)
    with _one_ray(cfg, _embeds_with_ray(cfg) or cfg.select.engine == "ray", console):
        pool = _start_and_embed(pool, read_s, cfg, run, console)
        select_stage(pool, cfg, run, devices, progress=console.progress)
    run.finish()
    return run.out


def run_embed(cfg: Config, *, console: Console = Console()) -> Path:
    """Only the embedding stage, into ``<output_dir>/embeddings/<key>/``; returns that directory."""
    from .embed.stage import embed_pool

    pool = _read_pool(cfg)
    if pool.embeddings is not None:
        raise InputError("the pool already has embeddings (data.embeddings or an embedding column); "
                         "there is nothing to embed")
    _check_encoder(cfg, pool)
    console.announce()
    with _one_ray(cfg, _embeds_with_ray(cfg), console):
        manifest = embed_pool(pool, cfg.embed, Path(cfg.output_dir) / "embeddings", progress=console.progress,
                              ray_bars=console.ray_bars)
    return Path(cfg.output_dir) / "embeddings" / manifest["key"]


def run_tune(cfg: Config, *, overwrite: bool = False, resume: bool = False, console: Console = Console()) -> dict:
    """Selection, then the Tune sweep over every candidate, the random baselines and the full pool."""
    from .finetune.heldout import eval_data_config

    eval_data_config(cfg)  # no held-out set: fail before any work
    devices = decide(cfg)
    run = Run(cfg, resume=resume, overwrite=overwrite)
    pool, parts, read_s = _read_and_check(cfg, tune=True)
    with _one_ray(cfg, True, console):
        pool = _start_and_embed(pool, read_s, cfg, run, console)
        result = tune_stage(pool, parts, select_stage(pool, cfg, run, devices, progress=console.progress), cfg, run,
                            resume=resume, console=console)
    run.finish()
    return result


def run_all(cfg: Config, *, overwrite: bool = False, resume: bool = False, console: Console = Console()) -> Path:
    """The whole job: embed -> select -> tune (when ``finetune.heldout.eval_path`` is set) -> report."""
    devices = decide(cfg)
    run = Run(cfg, resume=resume, overwrite=overwrite)
    tune = bool(cfg.finetune.heldout.eval_path)
    pool, parts, read_s = _read_and_check(cfg, tune=tune)
    with _one_ray(cfg, _embeds_with_ray(cfg) or cfg.select.engine == "ray" or tune, console):
        pool = _start_and_embed(pool, read_s, cfg, run, console)
        select_dir = select_stage(pool, cfg, run, devices, progress=console.progress)
        if tune:
            tune_stage(pool, parts, select_dir, cfg, run, resume=resume, console=console)
        else:
            log.info("stage tune: skipped (no finetune.heldout.eval_path)")
    report_stage(pool, run)
    run.finish()
    return run.out
