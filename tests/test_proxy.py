"""The proxies that rank candidates before fine-tuning: held-out coverage (no labels) and the
linear probe; pruning to the top candidates; the pipeline scoring a chat pool's candidates."""

import json

import numpy as np
import pytest

from ray_pipeline.artifacts import Run
from ray_pipeline.config import Config, FinetuneConfig
from ray_pipeline.data import read_pool
from ray_pipeline.errors import ConfigError
from ray_pipeline.pipeline import embed_into, proxy_scores
from ray_pipeline.proxy import coverage, linear_probe, prune, score_coverage
from ray_pipeline.tune import Candidate


def unit(x):
    x = np.asarray(x, dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_coverage_by_hand():
    subset = unit([[1, 0, 0], [0, 1, 0]])
    held = unit([[1, 0, 0], [1, 1, 0], [0, 0, 1]])
    # highest cosines: 1 (itself), 1/sqrt(2) (either), 0 (orthogonal to both)
    assert coverage(subset, held) == pytest.approx((1 + 2 ** -0.5 + 0) / 3, abs=1e-6)


def test_coverage_against_a_loop_and_its_invariants():
    rng = np.random.default_rng(3)
    x = unit(rng.normal(size=(300, 12)))
    held = unit(rng.normal(size=(40, 12)))
    rows = rng.choice(300, 25, replace=False)
    slow = np.mean([max(float(h @ x[r]) for r in rows) for h in held])
    assert coverage(x[rows], held) == pytest.approx(slow, abs=1e-5)
    more = np.concatenate([rows, rng.choice(300, 25, replace=False)])
    assert coverage(x[more], held) >= coverage(x[rows], held) - 1e-6  # a superset covers at least as well
    assert coverage(np.concatenate([x[rows], held]), held) == pytest.approx(1.0, abs=1e-5)


def test_prune_keeps_the_top_scores_with_their_baselines():
    c = [Candidate("a", "selection", np.arange(5), k=5, m=5), Candidate("b", "selection", np.arange(9), k=9, m=9),
         Candidate("c", "selection", np.arange(9), k=4, m=9), Candidate("random_m5_s0", "random", np.arange(5), m=5),
         Candidate("random_m9_s0", "random", np.arange(9), m=9), Candidate("full", "full", np.arange(20))]
    scores = score_coverage(unit(np.eye(20)[:, :20]), {x.name: x.rows for x in c[:5]}, unit(np.eye(20)[:12]))
    assert scores["b"]["score"] == scores["b"]["coverage"] == pytest.approx(9 / 12)
    kept = [x.name for x in prune(c, scores, top=1)]
    assert kept[0] in ("b", "c") and kept[1:] == ["random_m9_s0", "full"]  # ties: either 9-row candidate
    assert [x.name for x in prune(c, scores, top=None)] == [x.name for x in c]


def test_linear_probe_by_hand_and_a_single_label_subset():
    x = unit([[1, 0.1], [1, -0.1], [-1, 0.1], [-1, -0.1]])
    r = linear_probe(x, np.array([0, 0, 1, 1]), unit([[1, 0], [-1, 0]]), np.array([0, 1]), 2)
    assert r["accuracy"] == 1.0
    one = linear_probe(x[:2], np.array([0, 0]), unit([[1, 0], [-1, 0]]), np.array([0, 1]), 2)
    assert one["accuracy"] == 0.5  # predicts its only label for everything


def test_proxy_kind_follows_the_task_and_probe_needs_labels():
    assert FinetuneConfig(task="classification").proxy_kind == "probe"
    assert FinetuneConfig(task="instruction").proxy_kind == "coverage"
    assert FinetuneConfig(task="instruction", proxy="none").proxy_kind is None
    with pytest.raises(ConfigError, match="coverage"):
        FinetuneConfig(task="instruction", proxy="probe")


def test_a_chat_pools_candidates_are_scored_by_coverage_of_the_validation_part(tmp_path):
    """The pipeline's own call: the pool and the validation part embedded by the embedding stage
    (MiniLM, local), every candidate but the full pool scored; the candidate made of the
    validation questions' topic covers it better than one of another topic."""
    topics = {"bank": ["How do I reset my card PIN?", "My card payment was declined", "Transfer money to savings"],
              "cook": ["How long to boil an egg?", "A recipe for tomato soup", "How to bake sourdough bread"]}
    rows = [{"id": f"{t}{i}", "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": "Sure."}]}
            for t, qs in topics.items() for i, q in enumerate(qs)]
    held = [{"id": "h0", "messages": [{"role": "user", "content": "Why was my card blocked?"},
                                      {"role": "assistant", "content": "Sure."}]}]
    for name, data in (("pool.jsonl", rows), ("held.jsonl", held)):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in data))
    cfg = Config.from_dict({"data": {"path": str(tmp_path / "pool.jsonl"), "id_column": "id"},
                            "embed": {"engine": "local", "device": "cpu"}, "output_dir": str(tmp_path / "run"),
                            "finetune": {"task": "instruction", "eval_path": str(tmp_path / "held.jsonl")}})
    run = Run(cfg)
    pool, _ = embed_into(read_pool(cfg.data), cfg, run.out, progress=False)
    held_pool = read_pool(cfg.data.__class__(path=str(tmp_path / "held.jsonl"), id_column="id"))
    cands = [Candidate("bank", "selection", np.arange(3), k=3, m=3), Candidate("cook", "selection", np.arange(3, 6), k=3, m=3),
             Candidate("full", "full", np.arange(6))]
    scores = proxy_scores(pool, held_pool, cands, cfg, run)
    assert set(scores) == {"bank", "cook"}
    assert scores["bank"]["coverage"] > scores["cook"]["coverage"]
