"""The verdict: differences with intervals, and words that say who won, on hand-made test values."""

import numpy as np
import pytest

from ray_pipeline.finetune.metrics import ratio_score as score
from ray_pipeline.finetune.task import task_for
from ray_pipeline.finetune.verdict import compare, judge


def hits(correct: int, n: int = 200, seed: int = 0) -> np.ndarray:
    """(n, 2) accuracy values with ``correct`` hits at shuffled places."""
    v = np.zeros(n)
    v[np.random.default_rng(seed).permutation(n)[:correct]] = 1
    return np.stack([v, np.ones(n)], axis=1)


def trial(name, kind, size, **kw):
    return {"name": name, "kind": kind, "size": size, "status": "capped", "cpu_seconds": 10.0,
            "samples_seen": 1000, **kw}


def test_score_and_compare_by_hand():
    a, b = hits(150), hits(100, seed=1)
    assert score(a) == 0.75 and score(b) == 0.5
    c = compare(a, [b], np.random.default_rng(0))
    assert c["diff"] == pytest.approx(0.25) and 0.1 < c["low"] < 0.25 < c["high"] < 0.4
    # a loss ratio: (-loss_sum, tokens) per sample, score = minus the loss per token
    loss = np.array([[-2.0, 4], [-6.0, 4]])
    assert score(loss) == -1.0


def test_the_verdict_says_lost_when_random_wins():
    values = {"k10_m40": hits(80), "random_m40_s0": hits(140, seed=1), "random_m40_s1": hits(136, seed=2),
              "full": hits(170, seed=3)}
    target = trial("k10_m40", "selection", 40)
    randoms = [trial("random_m40_s0", "random", 40), trial("random_m40_s1", "random", 40)]
    v = judge(task_for("classification"), target, values, randoms, trial("full", "full", 1000, cpu_seconds=100.0),
              np.random.default_rng(0))
    assert v["lost"] and not v["won"] and v["vs_random"]["word"] == "LOST TO"
    assert "LOST TO random" in v["lines"][1] and v["vs_random"]["high"] < 0
    assert "best" not in " ".join(v["lines"]).lower()
    assert v["vs_full"]["word"] == "fell short of" and v["vs_full"]["share_of_full_compute"] == pytest.approx(0.1)


def test_the_verdict_says_beat_and_no_clear_difference():
    values = {"t": hits(160), "r0": hits(100, seed=1), "r1": hits(104, seed=2), "f": hits(161, seed=3)}
    v = judge(task_for("classification"), trial("t", "selection", 40), values,
              [trial("r0", "random", 40), trial("r1", "random", 40)], trial("f", "full", 1000), np.random.default_rng(0))
    assert v["won"] and "BEAT random" in v["lines"][1]
    assert v["vs_full"]["word"] == "matched"  # 0.800 against 0.805 on 200 samples: no clear difference
    close = {"t": hits(101), "r0": hits(100, seed=1)}
    v = judge(task_for("classification"), trial("t", "selection", 40), close, [trial("r0", "random", 40)], None,
              np.random.default_rng(0))
    assert not v["won"] and not v["lost"] and "did not differ clearly" in v["lines"][1]


def test_instruction_differences_are_told_in_loss():
    lossy = lambda per_token, n=100: np.stack([np.full(n, -per_token * 5.0), np.full(n, 5.0)], axis=1)  # noqa: E731
    v = judge(task_for("instruction"), trial("t", "selection", 40), {"t": lossy(1.0), "r": lossy(1.5)},
              [trial("r", "random", 40)], None, np.random.default_rng(0))
    assert v["won"] and "test loss 1.0000" in v["lines"][0] and "-0.5000 in loss" in v["lines"][1]
