"""Stages 8-9 of METHOD.md: fine-tune every candidate under Ray Tune, stop the weak early, choose.

Three layers, as in Ray's ``train_tune_interop`` example: the per-worker training function
(``finetune.train_loop_per_worker``), a trial function that builds and fits one
``TorchTrainer`` for one candidate (:func:`_trial`), and the ``Tuner`` over all candidates with
the ASHA scheduler on the held-out ``score`` (:func:`run_sweep`). A trial that fails is
reported as failed; the sweep goes on.

The result, in the run directory: ``candidates.json`` (every trial: metric, steps, stopped
early or not, cost, learning curve), ``target/subset.parquet`` (the ids of the best selection
candidate) and ``target/model/`` (its tuned model; ``from_pretrained`` loads it).
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa

from .artifacts import write_json, write_parquet
from .config import Config, DataConfig
from .data import Pool, read_pool
from .errors import InputError

log = logging.getLogger(__name__)


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


def candidates_from_selection(selection: pa.Table, include_full: bool = True) -> list[Candidate]:
    """Every ``in_*`` column of selection.parquet as a candidate, plus the full pool."""
    out = []
    for col in selection.column_names:
        if not col.startswith("in_"):
            continue
        rows = np.flatnonzero(np.asarray(selection.column(col).to_numpy(zero_copy_only=False)))
        name = col[3:]
        rnd = re.fullmatch(r"random_m(\d+)_s(\d+)", name)
        sel = re.fullmatch(r"(?:(\w+?)_)?k(\d+)_m(\d+)", name)
        if rnd:
            out.append(Candidate(name, "random", rows, m=int(rnd[1]), seed=int(rnd[2])))
        elif sel:
            out.append(Candidate(name, "selection", rows, k=int(sel[2]), m=int(sel[3]),
                                 extra={"method": sel[1] or "kcenter"}))
    if include_full:
        out.append(Candidate("full", "full", np.arange(selection.num_rows)))
    return out


# ----------------------------------------------------------------------------------------------
# task data


def task_arrays(pool: Pool, cfg: Config, labels: Optional[list] = None) -> dict:
    """What the training function needs of a pool: texts + label indices (classification) or
    prompts + responses (instruction)."""
    ft = cfg.finetune
    if ft.task == "classification":
        if pool.labels is None:
            raise InputError("classification needs labels: set data.label_column (or data.labels_path)")
        if pool.texts is None:
            raise InputError("fine-tuning needs the samples' texts; give data.path, not only embeddings")
        labels = labels or sorted({str(v) for v in pool.labels})
        index = {v: i for i, v in enumerate(labels)}
        missing = sorted({str(v) for v in pool.labels} - set(index))
        if missing:
            raise InputError(f"the held-out set has label(s) {missing[:5]} that the pool does not have; "
                             f"a classifier cannot learn them")
        return {"texts": pool.texts.tolist(), "labels": np.array([index[str(v)] for v in pool.labels]),
                "label_names": labels}
    prompts, responses = pool.extra["prompts"], pool.extra["responses"]
    return {"prompts": list(prompts), "responses": list(responses)}


def read_task_pool(data: DataConfig, cfg: Config) -> Pool:
    """The pool (or held-out set) with what the task needs; for instruction tuning the prompt
    (``finetune.prompt_template``) and the response (``finetune.response_field``) per sample."""
    pool = read_pool(data)
    if cfg.finetune.task == "instruction":
        from .data import read_table

        table = read_table(data.path, data.format)
        if data.limit:
            table = table.slice(0, data.limit)
        rf = cfg.finetune.response_field
        if rf not in table.column_names:
            raise InputError(f"{data.path} has no response column {rf!r}; set finetune.response_field")
        cols = {c: table.column(c).to_pylist() for c in table.column_names}
        prompts = [cfg.finetune.prompt_template.format(**{c: ("" if v[i] is None else v[i]) for c, v in cols.items()})
                   for i in range(table.num_rows)]
        responses = ["" if v is None else str(v) for v in cols[rf]]
        pool.extra = {"prompts": np.array(prompts, dtype=object), "responses": np.array(responses, dtype=object)}
    return pool


def eval_data_config(cfg: Config) -> DataConfig:
    """The held-out set is read with the pool's column settings and its own path and limit."""
    if not cfg.finetune.eval_path:
        raise InputError("fine-tuning needs a held-out set: set finetune.eval_path (same columns as the pool)")
    d = cfg.data
    return DataConfig(path=cfg.finetune.eval_path, format="auto", text_column=d.text_column,
                      text_template=d.text_template, label_column=d.label_column, id_column=d.id_column,
                      limit=cfg.finetune.eval_limit)


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
    """A Tune callback that releases each ended trial's left-behind placement groups."""
    from ray.tune import Callback

    class ReleasePlacementGroups(Callback):
        def on_trial_complete(self, iteration, trials, trial, **info):  # finished or stopped by ASHA
            release_placement_groups(trials_dir / trial.config["candidate"]["name"] / PLACEMENT_GROUPS)

        on_trial_error = on_trial_complete

    return ReleasePlacementGroups()


def _trial(config: dict, shared: dict) -> None:
    """One Tune trial: build and fit a TorchTrainer for one candidate; metrics flow to Tune through
    TuneReportCallback."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from .finetune import train_loop_per_worker

    cand = config["candidate"]
    rows = shared["rows"][cand["name"]]
    train = {k: (np.asarray(v)[rows] if k == "labels" else [v[i] for i in rows])
             for k, v in shared["train"].items() if k != "label_names"}
    loop = dict(shared["loop"], train=train, name=cand["name"], inject_failure=cand.get("inject_failure", False),
                best_model_dir=str(Path(shared["trials_dir"]) / cand["name"] / "best_model"),
                placement_group_file=str(Path(shared["trials_dir"]) / cand["name"] / PLACEMENT_GROUPS))
    use_gpu = shared["use_gpu"]
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop,
        scaling_config=ray.train.ScalingConfig(num_workers=shared["num_workers"], use_gpu=use_gpu,
                                               resources_per_worker=shared["resources_per_worker"]),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=ray.train.RunConfig(
            name=cand["name"], storage_path=shared["train_storage"], callbacks=[TuneReportCallback()],
            # A trial whose workers cannot start (e.g. resources never freed) fails after a few
            # tries and is reported, instead of retrying forever (Ray's default).
            failure_config=ray.train.FailureConfig(max_failures=0, controller_failure_limit=3)),
    )
    trainer.fit()


def plan_resources(cpus: float, gpus: float, cfg: Config) -> dict:
    """Workers per trial and what each asks for; trials at once from the cluster's totals."""
    ft = cfg.finetune
    use_gpu = gpus >= 1 and ft.device != "cpu"
    per_worker = {"CPU": ft.cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
    need_cpu = ft.num_workers * ft.cpus_per_worker + 0.1  # + the trial driver's 0.1 CPU
    fits = int(gpus // ft.num_workers) if use_gpu else int(cpus // need_cpu)
    if fits < 1:
        raise InputError(f"one trial needs {ft.num_workers} worker(s) x {ft.cpus_per_worker} CPU "
                         f"{'and 1 GPU ' if use_gpu else ''}but the cluster has {cpus:g} CPU / {gpus:g} GPU; "
                         f"lower finetune.num_workers or finetune.cpus_per_worker")
    return {"use_gpu": use_gpu, "resources_per_worker": per_worker,
            "max_concurrent_trials": min(ft.max_concurrent_trials or fits, fits)}


def run_sweep(candidates: list[Candidate], pool: Pool, eval_pool: Pool, cfg: Config, out: Path, *,
              ray_address: Optional[str] = None, resume: bool = False, proxy: Optional[dict] = None) -> dict:
    """Fine-tune every candidate under Tune with ASHA; write candidates.json and target/.

    With ``resume`` and an interrupted sweep in ``out/tune``, Tune restores it: finished trials
    are kept, unfinished ones run again from their start."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from .finetune import resolve_model
    from .runtime import ray_session

    ft = cfg.finetune
    out = Path(out).resolve()
    train = task_arrays(pool, cfg)
    ev = task_arrays(eval_pool, cfg, labels=train.get("label_names"))
    ev.pop("label_names", None)
    loop = {"task": ft.task, "model_path": resolve_model(ft.model, ft.task), "labels": train.get("label_names"),
            "num_labels": len(train.get("label_names") or []), "eval": ev, "lr": ft.lr, "batch_size": ft.batch_size,
            "eval_batch_size": ft.eval_batch_size, "max_steps": ft.max_steps, "eval_every": ft.eval_every,
            "patience": ft.patience, "max_length": ft.max_length, "zero_stage": ft.zero_stage,
            "precision": ft.precision, "seed": cfg.seed, "threads": ft.threads_per_worker}
    max_t = math.ceil(ft.max_steps / ft.eval_every)
    with ray_session(ray_address) as res:
        plan = plan_resources(res.cpus, res.gpus, cfg)
        # Rows and data travel once through the object store (tune.with_parameters); the param
        # space holds only each candidate's description.
        shared = {"train": train, "loop": loop, "trials_dir": str(out / "trials"), "num_workers": ft.num_workers,
                  "train_storage": str(out / "train"), "rows": {c.name: c.rows for c in candidates}, **plan}
        log.info("Tune: %d candidates, %d at a time, %d worker(s) each (%s), ASHA over %d evaluations",
                 len(candidates), plan["max_concurrent_trials"], ft.num_workers,
                 "GPU" if plan["use_gpu"] else "CPU", max_t)
        specs = [c.describe() for c in candidates]
        trainable = tune.with_resources(tune.with_parameters(_trial, shared=shared), {"cpu": 0.1})
        experiment = out / "tune"
        if resume and tune.Tuner.can_restore(str(experiment)):
            log.info("Tune: restoring the interrupted sweep in %s", experiment)
            tuner = tune.Tuner.restore(str(experiment), trainable=trainable, resume_unfinished=True,
                                       resume_errored=False, restart_errored=False)
        else:
            if experiment.exists():  # a sweep that did not finish, not resumed: start it again
                shutil.rmtree(experiment)
            tuner = tune.Tuner(
                trainable,
                param_space={"candidate": tune.grid_search(specs)},
                tune_config=tune.TuneConfig(
                    metric="score", mode="max",
                    scheduler=ASHAScheduler(time_attr="training_iteration", max_t=max_t,
                                            grace_period=min(ft.asha_grace_period, max_t),
                                            reduction_factor=ft.asha_reduction_factor)
                    if ft.early_stopping else FIFOScheduler(),
                    max_concurrent_trials=plan["max_concurrent_trials"],
                    trial_name_creator=lambda t: t.config["candidate"]["name"],
                    trial_dirname_creator=lambda t: t.config["candidate"]["name"],
                ),
                run_config=tune.RunConfig(name="tune", storage_path=str(out), verbose=1,
                                          failure_config=tune.FailureConfig(max_failures=0),
                                          callbacks=[_release_callback(out / "trials")]),
            )
        t0 = time.perf_counter()
        grid = tuner.fit()
        sweep_s = time.perf_counter() - t0
    trials = [_trial_record(r, ft, max_t, plan) for r in grid]
    for t in trials:
        if proxy and t["name"] in proxy:
            t["proxy_accuracy"] = proxy[t["name"]]["accuracy"]
            t["label_coverage"] = proxy[t["name"]]["label_coverage"]
    return _choose_and_write(trials, candidates, pool, out, sweep_s, plan)


def _trial_record(result, ft, max_t: int, plan: dict) -> dict:
    rec = {k: v for k, v in result.config["candidate"].items() if k != "inject_failure"}
    df = result.metrics_dataframe
    history = []
    if df is not None and len(df) and "step" in df:
        cols = [c for c in ("step", "score", "eval_loss", "accuracy", "train_loss") if c in df]
        # A trial restarted after a crash (or a resumed sweep) reports its steps again: the later
        # report of a step is the one the trial's final state comes from.
        history = sorted({r["step"]: r for r in df[cols].to_dict("records")}.values(), key=lambda r: r["step"])
    last = result.metrics or {}
    if result.error is not None:
        rec["status"] = "failed"
        rec["error"] = str(result.error).strip().splitlines()[-1][:300]
    elif last.get("stopped_by_patience"):
        rec["status"] = "stopped_no_improvement"
    elif last.get("step", 0) < ft.max_steps:
        rec["status"] = "stopped_early"  # by ASHA
    else:
        rec["status"] = "completed"
    wall = float(last.get("time_total_s") or 0.0)
    device_s = wall * ft.num_workers * (1 if plan["use_gpu"] else ft.cpus_per_worker)
    rec.update(steps=int(last.get("step", 0)), evaluations=len(history),
               best_score=last.get("best_score"), final_score=last.get("score"),
               accuracy=last.get("accuracy"), macro_f1=last.get("macro_f1"), eval_loss=last.get("eval_loss"),
               tokens_per_s=last.get("tokens_per_s"), wall_s=wall,
               **{("gpu_seconds" if plan["use_gpu"] else "cpu_seconds"): device_s},
               history=history, max_evaluations=max_t)
    return rec


def _choose_and_write(trials: list[dict], candidates: list[Candidate], pool: Pool, out: Path,
                      sweep_s: float, plan: dict) -> dict:
    ok = [t for t in trials if t["status"] != "failed" and t["best_score"] is not None]
    selected = [t for t in ok if t["kind"] == "selection"]
    target = max(selected, key=lambda t: (t["best_score"], -t["size"])) if selected else None
    baselines: dict = {"random": {}, "full": None}
    for t in ok:
        if t["kind"] == "random":
            baselines["random"].setdefault(str(t["m"]), []).append(t["best_score"])
        if t["kind"] == "full":
            baselines["full"] = t["best_score"]
    baselines["random"] = {m: {"mean": float(np.mean(v)), "std": float(np.std(v)), "n": len(v)}
                           for m, v in baselines["random"].items()}
    from .proxy import spearman

    with_proxy = [t for t in ok if t.get("proxy_accuracy") is not None]
    summary = {"target": None, "baselines": baselines, "sweep_seconds": sweep_s, "plan": plan,
               "proxy_rank_correlation": spearman([t["proxy_accuracy"] for t in with_proxy],
                                                  [t["best_score"] for t in with_proxy]),
               "failed": [t["name"] for t in trials if t["status"] == "failed"],
               "stopped_early": [t["name"] for t in trials if t["status"] == "stopped_early"]}
    if target is not None:
        cand = next(c for c in candidates if c.name == target["name"])
        src = out / "trials" / target["name"] / "best_model"
        dst = out / "target" / "model"
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(src, dst)
        write_parquet(pa.table({"id": pa.array(pool.ids[cand.rows].tolist(), pa.string())}),
                      out / "target" / "subset.parquet")
        rnd = baselines["random"].get(str(target["m"]))
        summary["target"] = {"name": target["name"], "k": target["k"], "m": target["m"], "score": target["best_score"],
                             "random_same_size": rnd, "full": baselines["full"], "model": str(dst),
                             "subset": str(out / "target" / "subset.parquet")}
    write_json({"summary": summary, "trials": trials}, out / "candidates.json")
    return {"summary": summary, "trials": trials}
