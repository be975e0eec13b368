"""How the sweep shows itself on the console: a Tune callback, in place of Tune's status tables.

:class:`SweepProgress` logs a line per trial that ends (failed ones as warnings) and each result
at DEBUG (the run's log, and the console with ``--verbose``); with ``bars``, it draws a bar of the
trials ended out of all and one per running trial over its steps, from the ``step`` each result
reports, of the trial's cap. Tune calls it in the driver, so the bars are the console's own.
"""

from __future__ import annotations

import logging
from typing import Optional

from ray.tune import Callback

from .task import Task

log = logging.getLogger(__name__)


class SweepProgress(Callback):
    """bars: draw the bars (``Console.bars``); the lines are logged either way. task: the sweep's
    :class:`~.task.Task`, whose metric the lines give (a causal LM's score is minus its loss)."""

    def __init__(self, bars: bool, task: Task):
        self.bars = bars
        self.metric = task.metric.removeprefix("test ")
        self.sign = -1.0 if task.is_loss else 1.0
        self.trials_bar = None
        self.running: dict = {}  # trial id -> its bar of steps

    def setup(self, total_num_samples: Optional[int] = None, **info):
        from tqdm.auto import tqdm

        self.trials_bar = tqdm(total=total_num_samples, desc="tune trials", unit="trial", disable=not self.bars)

    def on_trial_start(self, iteration, trials, trial, **info):
        from tqdm.auto import tqdm

        cand = trial.config["candidate"]
        self.running[trial.trial_id] = tqdm(total=cand["steps"], desc=f"  {cand['name']}", unit="step",
                                            leave=False, disable=not self.bars)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if result.get("score") is not None:
            log.debug("trial %s: step %s, validation %s %.4f", trial.config["candidate"]["name"],
                      result.get("step"), self.metric, self.sign * result["score"])
        bar = self.running.get(trial.trial_id)
        if bar is not None and "step" in result:
            bar.update(int(result["step"]) - bar.n)

    def on_step_end(self, iteration, trials, **info):
        # counted rather than incremented, so that a restored sweep's finished trials count too
        ended = sum(t.status in ("TERMINATED", "ERROR") for t in trials)
        if ended != self.trials_bar.n:
            self.trials_bar.update(ended - self.trials_bar.n)

    def _ended(self, trial, how: str) -> None:
        bar = self.running.pop(trial.trial_id, None)
        if bar is not None:
            bar.close()
        last = trial.last_result or {}
        best = last.get("best_score")
        log.log(logging.WARNING if how == "failed" else logging.INFO, "trial %s %s at step %s%s",
                trial.config["candidate"]["name"], how, last.get("step", 0),
                "" if best is None else f" (best validation {self.metric} {self.sign * best:.4f})")

    def on_trial_complete(self, iteration, trials, trial, **info):  # finished, or stopped by ASHA
        self._ended(trial, "ended")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._ended(trial, "failed")

    def on_experiment_end(self, trials, **info):
        for bar in self.running.values():
            bar.close()
        self.on_step_end(0, trials)
        self.trials_bar.close()
