"""The report draws scores in the task's own metric: a causal LM's score is minus its loss, and its
plots show the loss, labelled lower-is-better; a classifier's show accuracy."""

import matplotlib.pyplot as plt
import numpy as np
import pytest

from ray_pipeline.finetune.task import task_for
from ray_pipeline.report import curves_figure, score_vs_size_figure

# A hand-made sweep of an instruction run: scores are minus the loss, as the trials record them.
TRIALS = [
    {"name": "k4_m8", "kind": "selection", "method": "kcenter", "k": 4, "size": 8, "status": "capped",
     "test_score": -1.2, "history": [{"step": 2, "score": -1.9}, {"step": 4, "score": -1.6}]},
    {"name": "k4_m16", "kind": "selection", "method": "kcenter", "k": 4, "size": 16, "status": "stopped_early",
     "test_score": -1.1, "history": [{"step": 2, "score": -1.8}]},
    {"name": "random_m8_s0", "kind": "random", "size": 8, "status": "capped", "test_score": -1.3, "history": []},
    {"name": "random_m8_s1", "kind": "random", "size": 8, "status": "capped", "test_score": -1.5, "history": []},
    {"name": "full", "kind": "full", "size": 40, "status": "capped", "test_score": -1.0, "history": []},
]


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _lines(ax):
    return {line.get_label(): line for line in ax.get_lines()}


def test_an_instruction_runs_score_against_size_is_its_test_loss_lower_is_better():
    ax = score_vs_size_figure(TRIALS, task_for("instruction")).axes[0]
    assert ax.get_ylabel() == "test loss (lower is better)"
    lines = _lines(ax)
    assert list(lines["kcenter K=4"].get_xdata()) == [8, 16]
    assert np.allclose(lines["kcenter K=4"].get_ydata(), [1.2, 1.1])  # the loss, not minus it
    assert np.allclose(lines["full pool"].get_ydata(), [1.0, 1.0])
    random_mean = ax.containers[0].lines[0]  # the errorbar's line: mean of the seeds per size
    assert np.allclose(random_mean.get_ydata(), [1.4])


def test_an_instruction_runs_learning_curves_are_validation_losses():
    ax = curves_figure(TRIALS, task_for("instruction")).axes[0]
    assert ax.get_ylabel() == "validation loss (lower is better)"
    lines = _lines(ax)
    assert np.allclose(lines["k4_m8"].get_ydata(), [1.9, 1.6])
    assert lines["k4_m16"].get_linestyle() == "--"  # stopped early by ASHA


def test_a_classifiers_scores_are_drawn_as_they_are():
    trials = [dict(t, test_score=-t["test_score"] / 2, history=[dict(h, score=-h["score"] / 2) for h in t["history"]])
              for t in TRIALS]  # accuracies between 0.5 and 0.95
    ax = score_vs_size_figure(trials, task_for("classification")).axes[0]
    assert ax.get_ylabel() == "test accuracy (higher is better)"
    assert np.allclose(_lines(ax)["kcenter K=4"].get_ydata(), [0.6, 0.55])
    assert curves_figure(trials, task_for("classification")).axes[0].get_ylabel() == \
        "validation accuracy (higher is better)"
