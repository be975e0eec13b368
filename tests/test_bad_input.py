"""Malformed input of every kind ends in one of the documented errors (exit 2, a message),
never a traceback, and leaves nothing behind."""

import json

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ray_pipeline.cli import main
from ray_pipeline.config import Config
from ray_pipeline.data import read_pool
from ray_pipeline.config import DataConfig
from ray_pipeline.errors import PipelineError

scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 10**6), st.floats(allow_nan=True),
                    st.text(max_size=8), st.lists(st.integers(-3, 3), max_size=3))
keys = st.sampled_from(["k", "niter", "budgets", "method", "outlier_quantile", "random_seeds", "pooling",
                        "batch_size", "engine", "lr", "max_steps", "eval_every", "task", "bogus", "seed"])
sections = st.sampled_from(["data", "embed", "cluster", "select", "finetune", "seed", "threads", "nonsense"])


@given(st.dictionaries(sections, st.one_of(scalars, st.dictionaries(keys, scalars, max_size=4)), max_size=4))
@settings(max_examples=300, deadline=None)
def test_random_configs_are_valid_or_a_config_error(raw):
    try:
        cfg = Config.from_dict(raw)
    except PipelineError:
        return
    try:  # a valid config resolves against a pool, or says why (budgets or K above it)
        grid = cfg.candidate_grid(10**6)
    except PipelineError:
        return
    assert grid and all(1 <= k <= 10**6 and 1 <= m <= 10**6 for k, m in grid)


records = st.lists(st.dictionaries(st.sampled_from(["id", "text", "label", "extra"]),
                                   st.one_of(st.none(), st.integers(), st.text(max_size=5),
                                             st.lists(st.integers(), max_size=2))), max_size=6)


@given(records)
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_random_records_read_or_fail_with_an_input_error(tmp_path_factory, rows):
    p = tmp_path_factory.mktemp("rec") / "pool.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    try:
        pool = read_pool(DataConfig(path=str(p), id_column="id", label_column="label"))
    except PipelineError:
        return
    assert len(pool) == len(set(pool.ids)) > 0 and all(t.strip() for t in pool.texts)


@given(st.sampled_from(["nan", "inf", "zero", "1d", "int", "ok"]), st.integers(1, 4))
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_cli_on_bad_vectors_exits_2_and_writes_nothing(tmp_path_factory, kind, k):
    d = tmp_path_factory.mktemp("cli")
    x = np.random.default_rng(0).normal(size=(20, 4))
    x = {"nan": np.where(np.eye(20, 4) > 0, np.nan, x), "inf": np.where(np.eye(20, 4) > 0, np.inf, x),
         "zero": np.vstack([np.zeros((1, 4)), x[1:]]), "1d": x[:, 0], "int": (x * 10).astype(int), "ok": x}[kind]
    np.save(d / "x.npy", x)
    rc = main(["select", "--embeddings", str(d / "x.npy"), "--k", str(k * 10), "--budgets", "5",
               "--out", str(d / "out"), "--no-progress"])
    if kind == "ok" and k * 10 <= 20:
        assert rc == 0
    else:
        assert rc == 2 and not (d / "out").exists()
