"""Stages 8-9 of METHOD.md: fine-tune every candidate under Ray Tune, choose on validation, report
on test, and say who won.

Three layers, as in Ray's ``train_tune_interop`` example: the per-worker training function
(``finetune.train_loop_per_worker``), a trial function that builds and fits one
``TorchTrainer`` for one candidate (:func:`_trial`), and the ``Tuner`` over all candidates
(:func:`run_sweep`). The rules that make the comparison honest:

- every trial (selection candidates, random subsets, the full pool) trains under one rule: until
  its *validation* score stops improving (patience) or its cap (``finetune.step_cap``);
- ASHA (:class:`CandidateASHA`) stops clearly worse *selection candidates* early and never a
  baseline: a yardstick runs its course whatever order the trials happen to run in;
- the target is the selection candidate with the best validation score; then every finished
  trial's best model is scored once on the *test* part, which took no part in any choice, and
  :func:`verdict.judge` compares the target with random and full there, with intervals and costs.

A trial that fails is reported as failed; the sweep goes on. The records, the test scoring and the
choice are :mod:`~ray_pipeline.finetune.outcome`'s. The result, in the run directory:
``candidates.json`` (every trial: validation and test scores, status, steps, epochs, samples
seen, cost, learning curve; the summary with the verdict), ``target/ids.parquet`` (the ids of
the target subset; the pipeline writes its records beside it as ``target/subset.<pool format>``) and ``target/model/`` (its tuned model; ``from_pretrained`` loads it).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa
from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from ..config import Config
from ..io.pool import Pool
from ..errors import InputError
from ..io.run_dir import write_json
from ..runtime.console import Console
from ..runtime.capacity import ensure_fits, gpus_to_grow_to
from ..runtime.interrupt import tune_fit
from .heldout import Parts
from .outcome import choose_and_write, score_on_test, trial_record
from .progress import SweepProgress
from .task import take, task_for
from .sizing import check_memory, trial_requests
from .trial import TrialLoop, check_device, remove_unfinished_saves

log = logging.getLogger(__name__)


class CandidateASHA(ASHAScheduler):
    """ASHA among the selection candidates only: a baseline trial (random, full) always continues
    and takes no place in the rungs, so it neither is stopped nor sets the bar for a candidate."""

    @staticmethod
    def _is_baseline(trial) -> bool:
        return trial.config["candidate"]["kind"] != "selection"

    def on_trial_result(self, tune_controller, trial, result):
        if self._is_baseline(trial):
            return TrialScheduler.CONTINUE
        return super().on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller, trial, result):
        if self._is_baseline(trial):
            self._trial_info.pop(trial.trial_id, None)
            return
        super().on_trial_complete(tune_controller, trial, result)


@dataclass
class Candidate:
    """One trial's training subset: rows of the pool."""

    name: str
    kind: str  # selection | random | full
    rows: np.ndarray
    k: Optional[int] = None
    m: Optional[int] = None
    seed: Optional[int] = None
    extra: dict = field(default_factory=dict)

    def describe(self) -> dict:
        return {"name": self.name, "kind": self.kind, "k": self.k, "m": self.m, "seed": self.seed,
                "size": int(len(self.rows)), **self.extra}


def candidates_from_selection(selection: pa.Table, listed: list[dict], include_full: bool = True) -> list[Candidate]:
    """The candidates ``select.json`` lists (``listed``), their rows from selection.parquet's
    ``in_<name>`` columns, plus the full pool."""
    out = []
    for c in listed:
        col = f"in_{c['name']}"
        if col not in selection.column_names:
            raise InputError(f"selection.parquet has no column {col!r} for the listed candidate {c['name']!r}; "
                             f"the select stage's files do not belong together: rerun it with --overwrite")
        rows = np.flatnonzero(np.asarray(selection.column(col).to_numpy(zero_copy_only=False)))
        extra = {"method": c["method"]} if c["kind"] == "selection" else {}
        out.append(Candidate(c["name"], c["kind"], rows, k=c.get("k"), m=c.get("m"), seed=c.get("seed"), extra=extra))
    if include_full:
        out.append(Candidate("full", "full", np.arange(selection.num_rows)))
    return out


# ----------------------------------------------------------------------------------------------
# the sweep

PLACEMENT_GROUPS = "placement_groups.txt"  # in a trial's directory: the worker groups' placement groups


def release_placement_groups(path: Path, grace_s: float = 5.0) -> list[str]:
    """Remove the placement groups listed in ``path`` (hex ids, one per line) that are still there
    ``grace_s`` seconds after the trial ended; the ids removed. The file is consumed.

    Why: in Ray 2.60, Train V2 inside a Tune trial sometimes leaves the trial's worker placement
    group (its CPUs or GPUs) in place when the trial ends. Its ``PlacementGroupCleaner`` removes it
    only once the state API answers (never without the dashboard), and until then the next trial
    cannot start its workers: on 2 CPUs, an endless ``WorkerGroupStartupTimeoutError``."""
    import ray
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    if not path.is_file():
        return []
    ids = list(dict.fromkeys(path.read_text().split()))
    path.unlink()
    removed, deadline = [], time.monotonic() + grace_s
    for hex_id in ids:
        pg = PlacementGroup(PlacementGroupID(bytes.fromhex(hex_id)))
        while ray.util.placement_group_table(pg).get("state") not in (None, "REMOVED"):
            if time.monotonic() >= deadline:
                remove_placement_group(pg)
                removed.append(hex_id)
                break
            time.sleep(0.2)
    if removed:
        log.info("released %d placement group(s) Ray Train left behind: %s", len(removed), removed)
    return removed


def _release_callback(trials_dir: Path):
    """A Tune callback that releases the left-behind placement groups of each trial that ended,
    or failed and is to run again: when a node is lost, Ray moves the failed attempt's workers'
    group to another node (seen here: onto the replacement node, whose room the retried attempt's
    own group then waited for, for ever)."""
    from ray.tune import Callback

    class ReleasePlacementGroups(Callback):
        def on_trial_complete(self, iteration, trials, trial, **info):  # finished or stopped by ASHA
            release_placement_groups(trials_dir / trial.config["candidate"]["name"] / PLACEMENT_GROUPS)

        on_trial_error = on_trial_recover = on_trial_complete

    return ReleasePlacementGroups()


RETRIES = "retries.json"  # in the sweep's directory: every retry of a trial, kept across a resumed sweep
HISTORY = "history.jsonl"  # in a trial's directory: its evaluations, every attempt's (trial.report)


def _retry_callback(path: Path):
    """A Tune callback that logs and records in ``path`` each retry of a trial (trial name ->
    ``[{"error", "attempt_s", "last_step"}]``: the error's last line, the failed attempt's
    seconds, the last step it reported)."""
    import json

    from ray.tune import Callback

    class RetryLog(Callback):
        def __init__(self):
            self.retries = json.loads(path.read_text()) if path.is_file() else {}
            self.started: dict = {}

        def on_trial_start(self, iteration, trials, trial, **info):
            self.started[trial.trial_id] = time.monotonic()

        on_trial_restore = on_trial_start

        def on_trial_recover(self, iteration, trials, trial, **info):  # failed, and to run again
            name = trial.config["candidate"]["name"]
            error = "unknown error"
            if trial.error_file and Path(trial.error_file).is_file():  # every failure, appended
                lines = [v for v in Path(trial.error_file).read_text().splitlines() if v.strip()]
                error = lines[-1].strip()[:300] if lines else error
            t0 = self.started.get(trial.trial_id)
            self.retries.setdefault(name, []).append({
                "error": error, "attempt_s": time.monotonic() - t0 if t0 is not None else None,
                "last_step": (trial.last_result or {}).get("step")})
            self.started[trial.trial_id] = time.monotonic()
            log.warning("trial %s failed (%s); retry %d of %d, from its last checkpoint where it has one", name,
                        error, len(self.retries[name]), trial.max_failures)
            write_json(self.retries, path)

    return RetryLog()


@contextmanager
def _tune_output(tables: bool):
    """Tune's own console output for the block: its status tables, or (not ``tables``) none. At
    ``verbose=0`` Tune's newer output still prints the experiment's configuration table; the older
    one, chosen by ``RAY_AIR_NEW_OUTPUT=0`` when ``fit`` starts, prints nothing."""
    before = os.environ.get("RAY_AIR_NEW_OUTPUT")
    if not tables:
        os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("RAY_AIR_NEW_OUTPUT", None)
        else:
            os.environ["RAY_AIR_NEW_OUTPUT"] = before


@dataclass(frozen=True)
class SweepData:
    """What every trial of a sweep shares, sent once through the object store
    (``tune.with_parameters``); the param space holds only each candidate's description.

    loop: the trial loop without its per-trial fields (train, steps, name, paths). train: the
    task's arrays of the whole pool, in the selection's order. rows: candidate name -> its rows.
    trials_dir / train_storage: the trials' model directories and Ray Train's storage. plan:
    :func:`plan_resources`'s. wait_s: the longest a trial's workers wait for room to start
    (``ray.wait_timeout_s``: a replacement node, after one was lost)."""

    loop: TrialLoop
    train: dict
    rows: dict
    trials_dir: str
    train_storage: str
    plan: dict
    wait_s: float = 600.0


def _trial(config: dict, shared: SweepData) -> None:
    """One Tune trial: build and fit a TorchTrainer for one candidate; metrics flow to Tune through
    TuneReportCallback."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from .train import train_loop_per_worker

    cand = config["candidate"]
    rows = shared.rows[cand["name"]]
    train = take(shared.train, rows)
    trial_dir = Path(shared.trials_dir) / cand["name"]
    loop = replace(shared.loop, train=train, steps=cand["steps"], name=cand["name"],
                   inject_failure=cand.get("inject_failure", False), best_model_dir=str(trial_dir / "best_model"),
                   placement_group_file=str(trial_dir / PLACEMENT_GROUPS), history_file=str(trial_dir / HISTORY))
    use_gpu = shared.plan["use_gpu"]
    # Ray Train gives up on its workers' placement group after 60 s and tries again, a few times;
    # a retried trial waits for a replacement node, which a cloud takes minutes to boot. Wait as
    # long as every other wait on the cluster (read here, in the trial's process; Train passes it on).
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = str(shared.wait_s)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"loop": loop},
        scaling_config=ray.train.ScalingConfig(num_workers=loop.finetune.resources.num_workers, use_gpu=use_gpu,
                                               resources_per_worker=shared.plan["resources_per_worker"]),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=ray.train.RunConfig(
            name=cand["name"], storage_path=shared.train_storage, callbacks=[TuneReportCallback()],
            # A trial whose workers cannot start (e.g. resources never freed) fails after a few
            # tries and is reported, instead of retrying forever (Ray's default). A lost worker fails
            # the fit; Tune then runs the trial again (finetune.sweep.max_retries), and this run, of
            # the same name and storage, hands the workers its latest checkpoint (Train's snapshot).
            failure_config=ray.train.FailureConfig(max_failures=0, controller_failure_limit=3),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1)),
    )
    trainer.fit()


def plan_resources(cpus: float, gpus: float, cfg: Config) -> dict:
    """Workers per trial and what each asks for; trials at once from the cluster's totals."""
    ft, res = cfg.finetune, cfg.finetune.resources
    use_gpu = gpus >= 1 and ft.device != "cpu"
    per_worker = {"CPU": res.cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
    need_cpu = res.num_workers * res.cpus_per_worker + 0.1  # + the trial driver's 0.1 CPU
    fits = int(gpus // res.num_workers) if use_gpu else int(cpus // need_cpu)
    if fits < 1:
        raise InputError(f"one trial needs {res.num_workers} worker(s) x {res.cpus_per_worker} CPU "
                         f"{'and 1 GPU ' if use_gpu else ''}but the cluster has {cpus:g} CPU / {gpus:g} GPU; "
                         f"lower finetune.resources.num_workers or finetune.resources.cpus_per_worker")
    check_device(ft, use_gpu)
    return {"use_gpu": use_gpu, "resources_per_worker": per_worker,
            "max_concurrent_trials": min(ft.sweep.max_concurrent_trials or fits, fits)}


def run_sweep(candidates: list[Candidate], pool: Pool, parts: Parts, cfg: Config, out: Path, *,
              resume: bool = False, proxy: Optional[dict] = None, console: Console = Console()) -> dict:
    """Fine-tune every candidate under Tune, choose the target on the validation part of
    ``parts``, score every finished trial on its test part and judge; write candidates.json and
    target/. pool: the task pool (``heldout.read_task_pool``) in the selection's row order.
    proxy: candidate name -> its proxy scores, recorded beside its trial. console: Tune's status
    tables (``ray_bars``), or our bars of trials and steps (``bars``).

    With ``resume`` and an interrupted sweep in ``out/tune``, Tune restores it: finished trials
    are kept, unfinished ones go on from their last checkpoint (from their start where it holds no
    training state). A trial that fails (a lost worker or node, an error) is run again up to
    ``finetune.sweep.max_retries`` times, from its last checkpoint; each retry is in
    ``retries.json`` and in the trial's record."""
    from ray import tune
    from ray.tune.schedulers import FIFOScheduler

    from ..io.models import resolve
    from ..runtime.session import ray_session
    from .trial import step_cap

    ft = cfg.finetune
    task = task_for(ft.task, pool.modality)
    out = Path(out).resolve()
    train = task.arrays(pool)
    ev = task.arrays(parts.validation, train.get("label_names"))
    ev.pop("label_names", None)
    specs = [dict(c.describe(), steps=step_cap(ft, len(c.rows))) for c in candidates]
    max_t = max(math.ceil(s["steps"] / ft.train.eval_every) for s in specs)  # evaluations of the longest trial
    with ray_session(cfg.ray_address, settings=cfg.ray) as res:
        plan = plan_resources(res.cpus, gpus_to_grow_to(res.gpus), cfg)  # an autoscaler's GPUs count
        ensure_fits(trial_requests(plan, cfg))  # one node holds each: no trial pending forever
        model_path = resolve(ft.model, task.default_model, revision=ft.revision)
        plan["memory_gb_per_gpu"] = check_memory(cfg, model_path, len(train.get("label_names") or []) or None,
                                                 on_gpu=plan["use_gpu"], modality=pool.modality)
        loop = TrialLoop(finetune=ft, seed=cfg.seed, model_path=model_path, modality=task.modality,
                         label_names=train.get("label_names"), train={}, eval=ev, use_gpu=plan["use_gpu"], steps=0,
                         best_model_dir="")
        shared = SweepData(loop=loop, train=train, rows={c.name: c.rows for c in candidates},
                           trials_dir=str(out / "trials"), train_storage=str(out / "train"), plan=plan,
                           wait_s=cfg.ray.wait_timeout_s)
        log.info("Tune: %d candidates, %d at a time, %d worker(s) each (%s); every trial until patience or "
                 "%g epochs / %d steps; ASHA among the selection candidates only", len(candidates),
                 plan["max_concurrent_trials"], ft.resources.num_workers, "GPU" if plan["use_gpu"] else "CPU",
                 ft.train.max_epochs, ft.train.max_steps)
        trainable = tune.with_resources(tune.with_parameters(_trial, shared=shared), {"cpu": 0.1})
        experiment = out / "tune"
        if resume and tune.Tuner.can_restore(str(experiment)):
            log.info("Tune: restoring the interrupted sweep in %s", experiment)
            tuner = tune.Tuner.restore(str(experiment), trainable=trainable, resume_unfinished=True,
                                       resume_errored=False, restart_errored=False)
        else:
            # a sweep that did not finish, not resumed: start it again; Ray Train would hand its
            # checkpoints to trials of the same name, and its retries are not this sweep's
            for stale in (experiment, out / "train", out / RETRIES, *(out / "trials").glob(f"*/{HISTORY}")):
                if stale.is_dir():
                    shutil.rmtree(stale)
                elif stale.exists():
                    stale.unlink()
            sw = ft.sweep
            tuner = tune.Tuner(
                trainable,
                param_space={"candidate": tune.grid_search(specs)},
                tune_config=tune.TuneConfig(
                    metric="score", mode="max",
                    # in evaluations the trial reports itself: a retried trial's count goes on from
                    # its checkpoint, where Tune's training_iteration would start again at 1
                    scheduler=CandidateASHA(time_attr="evaluation", max_t=max_t,
                                            grace_period=min(sw.grace_period, max_t),
                                            reduction_factor=sw.reduction_factor)
                    if sw.early_stopping else FIFOScheduler(),
                    max_concurrent_trials=plan["max_concurrent_trials"],
                    trial_name_creator=lambda t: t.config["candidate"]["name"],
                    trial_dirname_creator=lambda t: t.config["candidate"]["name"],
                ),
                run_config=tune.RunConfig(name="tune", storage_path=str(out), verbose=1 if console.ray_bars else 0,
                                          failure_config=tune.FailureConfig(max_failures=sw.max_retries),
                                          callbacks=[_release_callback(out / "trials"), _retry_callback(out / RETRIES),
                                                     SweepProgress(console.bars, task)]),
            )
        t0 = time.perf_counter()
        try:
            with _tune_output(console.ray_bars), tune_fit():  # an interrupt: Tune stops, then Interrupted
                grid = tuner.fit()
        finally:  # a worker stopped mid-save (an interrupt) leaves a temporary model directory
            remove_unfinished_saves(out / "trials")
        sweep_s = time.perf_counter() - t0
    retries = json.loads((out / RETRIES).read_text()) if (out / RETRIES).is_file() else {}
    trials = [trial_record(r, ft, plan, retries.get(r.config["candidate"]["name"], []),
                           out / "trials" / r.config["candidate"]["name"] / HISTORY) for r in grid]
    for t in trials:
        if proxy and t["name"] in proxy:
            t["proxy_score"] = proxy[t["name"]]["score"]
            for k, name in (("accuracy", "proxy_accuracy"), ("label_coverage", "label_coverage"),
                            ("coverage", "proxy_coverage"), ("base_loss", "proxy_base_loss")):
                if k in proxy[t["name"]]:
                    t[name] = proxy[t["name"]][k]
    values = score_on_test(trials, out, cfg, parts.test, train.get("label_names"))
    return choose_and_write(trials, values, candidates, pool, out, cfg, sweep_s, plan, parts.info)
