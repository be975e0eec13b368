"""The selection-to-tuning ratio (Data Whisperer, ACL 2025) that run.json's tune stage records:
the selection's wall time over one full-pool fine-tune's, by hand."""

from ray_pipeline.finetune.metrics import selection_to_tuning

TRIALS = [
    {"name": "k4_m8", "kind": "selection", "status": "capped", "wall_s": 30.0, "steps": 10},
    {"name": "random_m8_s0", "kind": "random", "status": "capped", "wall_s": 28.0, "steps": 10},
    {"name": "full", "kind": "full", "status": "capped", "wall_s": 80.0, "steps": 10},
]


def test_the_selection_over_the_full_trial_not_over_a_subset_trial():
    r = selection_to_tuning(2.0, TRIALS)
    assert r == {"ratio": 0.025, "select_s": 2.0, "full_finetune_s": 80.0, "full_status": "capped", "full_steps": 10}


def test_no_ratio_without_a_full_fine_tune_or_a_selection_time():
    assert selection_to_tuning(2.0, TRIALS[:2]) is None  # finetune.sweep.include_full: false
    assert selection_to_tuning(2.0, TRIALS[:2] + [dict(TRIALS[2], status="failed")]) is None
    assert selection_to_tuning(2.0, TRIALS[:2] + [dict(TRIALS[2], wall_s=0.0)]) is None  # no time recorded
    assert selection_to_tuning(None, TRIALS) is None  # a select stage from before select_seconds
