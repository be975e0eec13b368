"""Malformed input of every kind ends in one of the documented errors (exit 2, a message),
never a traceback, and leaves nothing behind."""

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ray_pipeline.cli import main
from ray_pipeline.config import Config
from ray_pipeline.io.pool import read_pool
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


# ---------------------------------------------------------------------------------------------
# run, tune, export and predict: every input each command takes, good or bad in random mixes.
# Each call ends in exit 0 or in exit 2 with a message, never a traceback, and an exit 2 writes
# nothing. run/tune go through --check: every check a run makes before its first stage.

@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    rows = [{"text": f"sample {i}", "label": f"l{i % 3}", "q": f"q{i}"} for i in range(60)]
    pacsv.write_csv(pa.Table.from_pylist(rows), d / "pool.csv")
    pacsv.write_csv(pa.Table.from_pylist(rows[:20]), d / "held.csv")
    pacsv.write_csv(pa.Table.from_pylist([{**r, "label": "unseen"} for r in rows[:6]]), d / "alien.csv")
    pacsv.write_csv(pa.Table.from_pylist([{"text": r["text"]} for r in rows[:6]]), d / "nolabel.csv")
    pacsv.write_csv(pa.Table.from_pylist(rows[:1]), d / "one.csv")
    (d / "broken.jsonl").write_text('{"text": "a"\n')
    (d / "empty.csv").write_text("")
    (d / "a_file").write_text("not a directory")
    (d / "empty_dir").mkdir()
    np.save(d / "x.npy", np.random.default_rng(0).normal(size=(60, 8)))
    assert main(["select", "--data", str(d / "pool.csv"), "--embeddings", str(d / "x.npy"), "--label-column",
                 "label", "--k", "4", "--budgets", "8", "--out", str(d / "run"), "--no-progress"]) == 0
    from ray_pipeline.finetune.task import Classification
    from ray_pipeline.io.models import resolve

    model, tok = Classification().load(resolve("minilm"), ["l0", "l1", "l2"])
    model.save_pretrained(d / "model")
    tok.save_pretrained(d / "model")
    return d


def _listing(d: Path) -> set:
    return {str(p.relative_to(d)) for p in d.rglob("*")}


FILES = ["pool.csv", "held.csv", "alien.csv", "nolabel.csv", "one.csv", "broken.jsonl", "empty.csv", "missing.csv",
         "empty_dir", "a_file"]


@given(cmd=st.sampled_from(["run", "tune", "select"]), data=st.sampled_from(FILES), held=st.sampled_from(FILES),
       out=st.sampled_from(["new", "a_file", "run"]), template=st.sampled_from([None, "{text} {q}", "{text", "{0}",
                                                                                "{nope}", "{text:d}"]),
       label=st.sampled_from(["label", "nope", None]), key=keys, value=scalars)
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_run_and_tune_inputs_exit_0_or_2_and_write_nothing(inputs, cmd, data, held, out, template, label, key, value):
    before = _listing(inputs)
    args = [cmd, "--data", str(inputs / data), "--out", str(inputs / out), "--budgets", "6", "--k", "3", "--check"]
    args += ["--text-template", template] if template else []
    args += ["--label-column", label] if label else []
    args += [] if cmd == "select" else ["--eval", str(inputs / held)]
    args += ["--set", f"finetune.train.{key}={json.dumps(value)}"]
    rc = main(args)
    assert rc in (0, 2)
    assert _listing(inputs) == before  # --check writes nothing, and neither does a refusal


@given(run=st.sampled_from(["run", "missing", "a_file", "empty_dir"]),
       candidate=st.sampled_from(["k4_m8", "target", "full", "random_m8_s1", "bogus", ""]),
       output=st.sampled_from(["o.jsonl", "o.csv", "o.parquet", "o.txt", "o.json", "o.xyz", "empty_dir"]),
       fmt=st.sampled_from(["auto", "jsonl", "csv", "parquet", "text", "json"]), order=st.sampled_from(["pool", "greedy"]))
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_export_inputs_exit_0_or_2(inputs, run, candidate, output, fmt, order):
    target = inputs / output
    existed = target.exists()
    rc = main(["export", str(inputs / run), "--candidate", candidate, "--output", str(target), "--format", fmt,
               "--order", order])
    assert rc in (0, 2)
    if rc == 2 and not existed:
        assert not target.exists()
    if rc == 0:
        target.unlink()


@given(model=st.sampled_from(["model", "missing", "a_file", "empty_dir"]), data=st.sampled_from(FILES),
       output=st.sampled_from(["p.jsonl", "empty_dir"]))
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_predict_inputs_exit_0_or_2(inputs, model, data, output):
    rc = main(["predict", "--model", str(inputs / model), "--input", str(inputs / data), "--output",
               str(inputs / output)])
    assert rc in (0, 2)
    if rc == 0:
        assert (inputs / output).is_file()
        (inputs / output).unlink()
    else:
        assert not (inputs / "p.jsonl").exists()


def test_the_good_inputs_pass_those_checks_and_the_bad_ones_name_the_fix(inputs, capsys):
    """The random tests above would pass if every call failed: here the good mix passes each command."""
    base = ["--data", str(inputs / "pool.csv"), "--label-column", "label", "--budgets", "6", "--k", "3"]
    assert main(["run", *base, "--eval", str(inputs / "held.csv"), "--out", str(inputs / "new"), "--check"]) == 0
    assert "validation 10; test 10" in capsys.readouterr().out
    assert main(["export", str(inputs / "run"), "--candidate", "k4_m8", "--output", str(inputs / "ok.jsonl")]) == 0
    assert main(["predict", "--model", str(inputs / "model"), "--input", str(inputs / "held.csv"), "--output",
                 str(inputs / "ok-pred.jsonl")]) == 0
    capsys.readouterr()
    for args, says in [(["--eval", str(inputs / "alien.csv")], "label(s) the pool does not have"),
                       (["--eval", str(inputs / "one.csv")], "at least 2"),
                       (["--eval", str(inputs / "held.csv"), "--text-template", "{text"], "does not parse"),
                       (["--eval", str(inputs / "held.csv"), "--out", str(inputs / "a_file")], "is an existing file")]:
        out = [] if "--out" in args else ["--out", str(inputs / "new")]
        assert main(["run", *base, *args, *out, "--check"]) == 2
        assert says in capsys.readouterr().err
    assert not (inputs / "new").exists()
