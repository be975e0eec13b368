"""The proxies that rank candidates before fine-tuning: the base model's loss and held-out
coverage (no labels), the linear probe; pruning to the top candidates; the pipeline scoring a chat
pool's candidates."""

import json

import numpy as np
import pytest

from ray_pipeline.io.run_dir import Run
from ray_pipeline.config import Config, FinetuneConfig, ProxySettings
from ray_pipeline.io.pool import read_pool
from ray_pipeline.errors import ConfigError
from ray_pipeline.pipeline import embed_into
from ray_pipeline.finetune.proxy import (coverage, linear_probe, prune, sample_rows, score_base_loss, score_coverage,
                                        score_proxy, token_mean_loss)
from ray_pipeline.finetune.sweep import Candidate


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


def test_prune_spreads_the_fine_tunes_over_the_budgets_against_a_loop():
    """A score that grows with size (as coverage does) still leaves every budget its best
    candidate; the order is: each budget's best, by score, then each budget's second best, ..."""
    rng = np.random.default_rng(5)
    for _ in range(50):
        sizes = sorted(rng.choice([10, 20, 50, 100], size=int(rng.integers(1, 4)), replace=False).tolist())
        cands = [Candidate(f"s{m}_{i}", "selection", np.arange(m), k=m, m=m) for m in sizes
                 for i in range(int(rng.integers(1, 4)))]
        cands += [Candidate(f"random_m{m}_s0", "random", np.arange(m), m=m) for m in sizes]
        scores = {c.name: {"score": c.m + float(rng.random())} for c in cands}
        top = int(rng.integers(1, 8))
        # the slow, obvious form: rounds over the budgets
        ranked = {m: sorted([c for c in cands if c.kind == "selection" and c.m == m],
                            key=lambda c: -scores[c.name]["score"]) for m in sizes}
        want = []
        for r in range(max(len(v) for v in ranked.values())):
            want += sorted([v[r] for v in ranked.values() if len(v) > r], key=lambda c: -scores[c.name]["score"])
        want = {c.name for c in want[:top]}
        kept = prune(cands, scores, top)
        assert {c.name for c in kept if c.kind == "selection"} == want
        assert {c.m for c in kept if c.kind == "random"} == {c.m for c in cands if c.name in want}
        if top >= len(sizes):
            assert {c.m for c in kept if c.kind == "selection"} == set(sizes)  # no budget left without a fine-tune


def test_linear_probe_by_hand_and_a_single_label_subset():
    x = unit([[1, 0.1], [1, -0.1], [-1, 0.1], [-1, -0.1]])
    r = linear_probe(x, np.array([0, 0, 1, 1]), unit([[1, 0], [-1, 0]]), np.array([0, 1]), 2)
    assert r["accuracy"] == 1.0
    one = linear_probe(x[:2], np.array([0, 0]), unit([[1, 0], [-1, 0]]), np.array([0, 1]), 2)
    assert one["accuracy"] == 0.5  # predicts its only label for everything


def test_proxy_kind_follows_the_task_and_probe_needs_labels():
    from ray_pipeline.finetune.task import task_for

    def kind(task, **proxy):
        return task_for(task).proxy_kind(FinetuneConfig(task=task, proxy=ProxySettings(**proxy)))

    assert kind("classification") == "probe"
    assert kind("instruction") == "coverage"  # measured to rank best (benchmarks/README.md)
    assert kind("instruction", kind="base_loss") == "base_loss"
    assert kind("instruction", kind="none") is None
    with pytest.raises(ConfigError, match="coverage"):
        FinetuneConfig(task="instruction", proxy=ProxySettings(kind="probe"))
    with pytest.raises(ConfigError, match="causal LM"):
        FinetuneConfig(task="classification", proxy=ProxySettings(kind="base_loss"))
    with pytest.raises(ConfigError, match=r"finetune\.proxy\.rows"):
        ProxySettings(rows=0)


def test_base_loss_scores_by_hand():
    # rows 2, 5, 7 scored; values are (-summed loss, tokens) per row
    rows = np.array([2, 5, 7])
    per_row = np.array([[-6.0, 3], [-2.0, 1], [-1.0, 2]])
    scores = score_base_loss(per_row, rows, {"a": np.array([2, 5]), "b": np.array([7]), "c": np.array([2, 5, 7])})
    assert scores["a"] == {"score": 2.0, "base_loss": 2.0, "rows_scored": 2}  # 8 nats / 4 tokens
    assert scores["b"]["score"] == 0.5 and scores["c"]["score"] == pytest.approx(9 / 6)
    assert token_mean_loss(per_row[[0]]) == 2.0
    with pytest.raises(ValueError, match="not scored"):
        score_base_loss(per_row, rows, {"d": np.array([3])})
    with pytest.raises(ValueError, match="not scored"):
        score_base_loss(per_row, rows, {"d": np.array([9])})


def test_sample_rows_draws_at_most_cap_of_each_candidates_rows_seeded():
    cands = {"small": np.array([9, 1, 4]), "big": np.arange(100, 200)}
    a = sample_rows(cands, 10, np.random.default_rng(0))
    assert a["small"].tolist() == [1, 4, 9]  # fewer than the cap: all, sorted
    assert len(a["big"]) == 10 and len(set(a["big"])) == 10 and set(a["big"]) <= set(cands["big"].tolist())
    assert np.all(np.diff(a["big"]) > 0)
    b = sample_rows(cands, 10, np.random.default_rng(0))
    assert all(np.array_equal(a[k], b[k]) for k in cands)  # the rng decides, nothing else
    assert np.array_equal(sample_rows(cands, None, np.random.default_rng(0))["big"], cands["big"])


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
                            "finetune": {"task": "instruction", "heldout": {"eval_path": str(tmp_path / "held.jsonl")}}})
    run = Run(cfg)
    pool, _ = embed_into(read_pool(cfg.data), cfg, run.out, progress=False)
    held_pool = read_pool(cfg.data.__class__(path=str(tmp_path / "held.jsonl"), id_column="id"))
    cands = [Candidate("bank", "selection", np.arange(3), k=3, m=3), Candidate("cook", "selection", np.arange(3, 6), k=3, m=3),
             Candidate("full", "full", np.arange(6))]
    held_pool, _ = embed_into(held_pool, cfg, run.out, progress=False)
    scores = score_proxy("coverage", pool, cands, cfg, validation=held_pool)
    assert set(scores) == {"bank", "cook"}
    assert scores["bank"]["coverage"] > scores["cook"]["coverage"]


@pytest.mark.slow
def test_base_loss_through_the_pipeline_against_each_candidate_alone(tmp_path):
    """The pipeline's call with the packaged SmolLM2 on a chat pool: each candidate's score equals
    the base model's loss on that candidate's sampled rows scored alone (no union, no lookup), and
    replies the model finds natural score lower than random letters (more left to learn there)."""
    from ray_pipeline.finetune.heldout import read_task_pool
    from ray_pipeline.finetune.infer import per_sample_values
    from ray_pipeline.finetune.task import CausalLM
    from ray_pipeline.io.models import resolve

    natural = [("What is 2 + 2?", "2 + 2 is 4."), ("What colour is the sky?", "The sky is blue."),
               ("Say hello.", "Hello!"), ("Name a fruit.", "An apple.")]
    rng = np.random.default_rng(0)
    noise = [(q, " ".join("".join(rng.choice(list("qxzjvkw"), 5)) for _ in range(4))) for q, _ in natural]
    rows = [{"id": f"r{i}", "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for i, (q, a) in enumerate(natural + noise)]
    (tmp_path / "pool.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = Config.from_dict({"data": {"path": str(tmp_path / "pool.jsonl"), "id_column": "id"},
                            "output_dir": str(tmp_path / "run"), "seed": 3,
                            "finetune": {"task": "instruction", "heldout": {"eval_path": str(tmp_path / "pool.jsonl")},
                                         "proxy": {"kind": "base_loss", "rows": 3},
                                         "train": {"eval_batch_size": 3, "max_length": 64}}})
    task_pool = read_task_pool(cfg.data, cfg)
    cands = [Candidate("natural", "selection", np.arange(4), k=4, m=4),
             Candidate("noise", "selection", np.arange(4, 8), k=4, m=4),
             Candidate("random_m4_s0", "random", np.array([0, 5, 6, 3]), m=4), Candidate("full", "full", np.arange(8))]
    scores = score_proxy("base_loss", None, cands, cfg, task_pool=task_pool)
    assert set(scores) == {"natural", "noise", "random_m4_s0"}  # the full pool is not scored
    assert scores["noise"]["score"] > scores["natural"]["score"] > 0
    sampled = sample_rows({c.name: c.rows for c in cands[:3]}, 3, np.random.default_rng(3))
    for name, r in sampled.items():
        alone = per_sample_values(resolve("smollm2"), cfg.finetune, CausalLM().arrays(task_pool.take(r)))
        assert scores[name]["rows_scored"] == 3
        assert scores[name]["base_loss"] == pytest.approx(token_mean_loss(alone), rel=1e-4)
