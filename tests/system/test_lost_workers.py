"""Workers lost: a trial that fails mid-way is run again from its last checkpoint and ends as an
undisturbed twin would. The test fails a trial after its second report (``TrialLoop.inject_failure``)."""

import numpy as np
import pytest

from ray_pipeline.finetune.heldout import read_parts, read_task_pool
from ray_pipeline.finetune.sweep import Candidate, run_sweep

from test_tune import INTENTS, cfg, files  # noqa: F401  (the fixtures)

pytestmark = pytest.mark.slow  # DeepSpeed trials under Tune: not in the fast lane


@pytest.mark.parametrize("engine", ["trainer", "loop"])
def test_a_trial_lost_mid_way_resumes_from_its_checkpoint_as_its_twin(cfg, local_ray, tmp_path,  # noqa: F811
                                                                      engine):
    """Two selection candidates on the same rows; one fails after its step-6 report. It is run
    again from that checkpoint (its next report is step 9, not 3) and ends with the twin's scores
    at every step: same weights, optimizer, schedule and data order. Its record says so."""
    c = cfg.with_fields({"finetune.train.engine": engine, "finetune.sweep.early_stopping": False,
                         "output_dir": str(tmp_path / "out")})
    pool = read_task_pool(c.data, c)
    labels = pool.labels.astype(str)
    rows = np.concatenate([np.flatnonzero(labels == i)[:10] for i in INTENTS])
    candidates = [Candidate("twin", "selection", rows, k=4, m=40),
                  Candidate("lost", "selection", rows, k=8, m=40, extra={"inject_failure": 6})]
    result = run_sweep(candidates, pool, read_parts(c), c, c.output_dir)
    trials = {t["name"]: t for t in result["trials"]}
    lost, twin = trials["lost"], trials["twin"]
    assert lost["status"] == twin["status"] == "capped" and lost["steps"] == 12
    assert lost["retries"] == 1 and "injected failure in trial lost after step 6" in lost["retry_errors"][0]
    assert lost["resumed_from_step"] == 6 and twin["retries"] == 0 and twin["resumed_from_step"] == 0
    assert [h["step"] for h in lost["history"]] == [3, 6, 9, 12] and lost["evaluations"] == 4
    assert [h["score"] for h in lost["history"]] == pytest.approx([h["score"] for h in twin["history"]], abs=1e-6)
    assert lost["validation_score"] == pytest.approx(twin["validation_score"], abs=1e-6)
    assert result["summary"]["retried"] == {"lost": {"retries": 1, "errors": lost["retry_errors"],
                                                     "resumed_from_step": 6}}
    assert result["summary"]["failed"] == [] and result["summary"]["stopped_early"] == []
