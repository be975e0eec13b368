"""The sweep's outcome, from Tune's results to ``candidates.json``: one record per trial
(:func:`trial_record`: status, steps, scores, cost, learning curve), every finished trial's best
model scored once on the test part (:func:`score_on_test`), the target chosen on validation and
judged against the baselines (:func:`choose_and_write`). :mod:`~ray_pipeline.finetune.sweep`
runs the trials and calls these; nothing here starts Ray.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa

from ..config import Config
from ..io.pool import Pool
from ..io.run_dir import write_json, write_parquet
from .metrics import ratio_score
from .trial import HISTORY_FIELDS
from .task import task_for

log = logging.getLogger(__name__)


def trial_record(result, ft, plan: dict, retries: list, history_file: Optional[Path] = None) -> dict:
    """One trial's record from its Tune ``Result``: status (``failed``, ``converged``,
    ``stopped_early`` by ASHA, ``capped``), steps, scores, cost and learning curve. ``retries``:
    its failed attempts (``sweep.RETRIES``), each run again; the cost counts them too, and a trial
    that finished after a retry is judged by the attempt that finished, never as stopped early.
    history_file: the evaluations its workers wrote (``trial.report``), every attempt's; else the
    curve comes from Tune's results, which after a restored sweep hold only the last attempt's."""
    rec = {k: v for k, v in result.config["candidate"].items() if k != "inject_failure"}
    df = result.metrics_dataframe
    rows = []
    if history_file is not None and history_file.is_file():
        rows = [json.loads(v) for v in history_file.read_text().splitlines() if v.strip()]
    elif df is not None and len(df) and "step" in df:
        rows = df[[c for c in HISTORY_FIELDS if c in df]].to_dict("records")
    # A trial run again after a failure (or in a resumed sweep) reports steps again: the later
    # report of a step is the one the trial's final state comes from.
    history = sorted({r["step"]: r for r in rows}.values(), key=lambda r: r["step"])
    last = result.metrics or {}
    if result.error is not None:
        rec["status"] = "failed"
        rec["error"] = str(result.error).strip().splitlines()[-1][:300]
    elif last.get("stopped_by_patience"):
        rec["status"] = "converged"  # patience: the validation score stopped improving
    elif last.get("step", 0) < rec["steps"]:
        rec["status"] = "stopped_early"  # by ASHA (selection candidates only)
    else:
        rec["status"] = "capped"  # reached max_epochs / max_steps
    # Tune's clock starts again with each attempt: the failed ones' seconds are added
    wall = float(last.get("time_total_s") or 0.0) + sum(r["attempt_s"] or 0.0 for r in retries)
    device_s = wall * ft.resources.num_workers * (1 if plan["use_gpu"] else ft.resources.cpus_per_worker)
    rec.update(step_cap=rec.pop("steps"), steps=int(last.get("step", 0)), evaluations=len(history),
               samples_seen=int(last.get("samples_seen", 0)), epochs=float(last.get("epochs", 0.0)),
               validation_score=last.get("best_score"), final_validation_score=last.get("score"),
               accuracy=last.get("accuracy"), macro_f1=last.get("macro_f1"), eval_loss=last.get("eval_loss"),
               tokens_per_s=last.get("tokens_per_s"), wall_s=wall, retries=len(retries),
               retry_errors=[r["error"] for r in retries], resumed_from_step=last.get("resumed_from_step"),
               **{("gpu_seconds" if plan["use_gpu"] else "cpu_seconds"): device_s}, history=history)
    return rec


def score_on_test(trials: list[dict], out: Path, cfg: Config, test_pool: Pool, label_names) -> dict:
    """Each finished trial's best model (best on validation) scored once on the test part: trial
    name -> (n, 2) values (``verdict``), also saved as ``trials/<name>/test_values.npy``. The test
    part is read here and nowhere before."""
    from .infer import per_sample_values

    task = task_for(cfg.finetune.task, test_pool.modality)
    data = task.arrays(test_pool, label_names)
    values = {}
    t0 = time.perf_counter()
    for t in trials:
        model = out / "trials" / t["name"] / "best_model"
        if t["status"] == "failed" or not (model / "config.json").is_file():
            continue
        v = per_sample_values(str(model), cfg.finetune, data)
        values[t["name"]] = v
        np.save(out / "trials" / t["name"] / "test_values.npy", v)  # per test sample, for later analysis
        t["test_score"] = ratio_score(v)
        t.update(task.test_fields(t["test_score"]))
    log.info("test part: %d trials scored on %d samples in %.1fs", len(values), len(test_pool),
             time.perf_counter() - t0)
    return values


def choose_and_write(trials: list[dict], values: dict, candidates: list, pool: Pool, out: Path,
                      cfg: Config, sweep_s: float, plan: dict, split: Optional[dict]) -> dict:
    from .metrics import spearman
    from .verdict import judge

    ok = [t for t in trials if t["status"] != "failed" and t["validation_score"] is not None]
    selected = [t for t in ok if t["kind"] == "selection"]
    # The choice: validation only, ties to the smaller subset.
    target = max(selected, key=lambda t: (t["validation_score"], -t["size"])) if selected else None
    baselines: dict = {"random": {}, "full": None}
    for t in ok:
        if t["kind"] == "random":
            baselines["random"].setdefault(str(t["m"]), []).append(t)
        if t["kind"] == "full":
            baselines["full"] = {"validation": t["validation_score"], "test": t.get("test_score"),
                                 "status": t["status"], "epochs": t["epochs"]}
    baselines["random"] = {m: spread(v) for m, v in baselines["random"].items()}
    with_proxy = [t for t in ok if t.get("proxy_score") is not None]
    summary = {"target": None, "baselines": baselines, "sweep_seconds": sweep_s, "plan": plan, "split": split,
               "choice": "the selection candidate with the highest validation score",
               "proxy_rank_correlation": spearman([t["proxy_score"] for t in with_proxy],
                                                  [t["validation_score"] for t in with_proxy]),
               "failed": [t["name"] for t in trials if t["status"] == "failed"],
               "retried": {t["name"]: {"retries": t["retries"], "errors": t["retry_errors"],
                                       "resumed_from_step": t["resumed_from_step"]}
                           for t in trials if t["retries"]},
               "stopped_early": [t["name"] for t in trials if t["status"] == "stopped_early"]}
    if target is not None:
        cand = next(c for c in candidates if c.name == target["name"])
        src = out / "trials" / target["name"] / "best_model"
        dst = out / "target" / "model"
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(src, dst)
        write_parquet(pa.table({"id": pa.array(pool.ids[cand.rows].tolist(), pa.string())}),
                      out / "target" / "ids.parquet")
        summary["target"] = {"name": target["name"], "k": target["k"], "m": target["m"], "size": target["size"],
                             "validation_score": target["validation_score"], "test_score": target.get("test_score"),
                             "random_same_size": baselines["random"].get(str(target["m"])),
                             "full": baselines["full"], "model": str(dst.relative_to(out)),
                             "ids": str((out / "target" / "ids.parquet").relative_to(out))}
        if target["name"] in values:
            randoms = [t for t in ok if t["kind"] == "random" and t["m"] == target["m"] and t["name"] in values]
            full = next((t for t in ok if t["kind"] == "full" and t["name"] in values), None)
            summary["verdict"] = judge(task_for(cfg.finetune.task), target, values, randoms, full,
                                       np.random.default_rng([cfg.seed, 11]))
    write_json({"summary": summary, "trials": trials}, out / "candidates.json")
    return {"summary": summary, "trials": trials}


def spread(trials: list[dict]) -> dict:
    val = [t["validation_score"] for t in trials]
    test = [t["test_score"] for t in trials if t.get("test_score") is not None]
    out = {"mean": float(np.mean(val)), "std": float(np.std(val)), "n": len(val)}
    if test:
        out.update(test_mean=float(np.mean(test)), test_std=float(np.std(test)))
    return out
