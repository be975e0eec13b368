"""The ``select`` job end to end: outputs, determinism, errors, and the real demo pool."""

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import unit_blobs
from ray_pipeline.cli import main


@pytest.fixture(scope="module")
def vectors(tmp_path_factory):
    p = tmp_path_factory.mktemp("vec") / "x.npy"
    np.save(p, unit_blobs(3000, 24, 15, 0))
    return p


def run(tmp_path, vectors, name="out", *extra):
    out = tmp_path / name
    rc = main(["select", "--embeddings", str(vectors), "--k", "10", "30", "--budgets", "1%", "60", "5%",
               "--out", str(out), "--no-progress", *extra])
    return rc, out


def test_outputs(tmp_path, vectors):
    rc, out = run(tmp_path, vectors)
    assert rc == 0
    sel = pq.read_table(out / "selection.parquet").to_pandas()
    clusters = pq.read_table(out / "clusters.parquet").to_pandas()
    info = json.loads((out / "run.json").read_text())
    meta = info["stages"]["select"]
    assert info["status"] == "complete" and set(info["stages"]) == {"read", "embed", "select"}
    assert len(sel) == 3000 and sel["id"].is_unique
    assert meta["budgets"] == [30, 60, 150] and meta["n"] == 3000 and meta["dim"] == 24
    for k in (10, 30):
        rows = clusters[clusters.k == k]
        assert len(rows) == k and rows["size"].sum() == 3000
        for m in (30, 60, 150):
            members = sel[f"in_k{k}_m{m}"]
            assert members.sum() == m
            assert rows[f"budget_m{m}"].sum() == m
            # every non-empty cluster with a budget contains its key sample
            keyed = rows[rows[f"budget_m{m}"] > 0]["key_id"]
            assert set(keyed) <= set(sel["id"][members])
        # candidates are nested: one greedy order serves every budget
        assert (sel[f"in_k{k}_m30"] <= sel[f"in_k{k}_m60"]).all()
        assert (sel[f"in_k{k}_m60"] <= sel[f"in_k{k}_m150"]).all()
    for seed in (0, 1, 2):
        assert sel[f"in_random_m60_s{seed}"].sum() == 60
    assert not list(out.glob(".*tmp*"))  # no temporary files left behind
    names = {c["name"] for c in meta["candidates"]}
    # 2 K x 3 M x 2 methods (kcenter, centroid) + 3 seeds x 3 M
    assert {"k10_m30", "centroid_k30_m150", "random_m30_s2"} <= names and len(names) == 2 * 3 * 2 + 3 * 3


def test_same_seed_byte_identical_outputs(tmp_path, vectors):
    _, a = run(tmp_path, vectors, "a")
    _, b = run(tmp_path, vectors, "b")
    for f in ("selection.parquet", "clusters.parquet"):
        assert (a / f).read_bytes() == (b / f).read_bytes()
    _, c = run(tmp_path, vectors, "c", "--seed", "1")
    assert (a / "selection.parquet").read_bytes() != (c / "selection.parquet").read_bytes()


def test_bad_input_exits_2_with_a_message(tmp_path, vectors, capsys):
    rc = main(["select", "--embeddings", str(tmp_path / "none.npy"), "--out", str(tmp_path / "o")])
    assert rc == 2 and "does not exist" in capsys.readouterr().err
    rc, out = run(tmp_path, vectors, "big", "--set", "cluster.k=[5000]")
    assert rc == 2 and "'cluster.k' has 5000 = 5000 clusters for a pool of 3000; choose K <= 3000" in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())  # nothing half-written
    rc = main(["select", "--embeddings", str(vectors), "--set", "cluster.bogus=1"])
    assert rc == 2 and "unknown config key" in capsys.readouterr().err


def test_refuses_to_mix_runs_in_one_directory(tmp_path, vectors, capsys):
    assert run(tmp_path, vectors, "same")[0] == 0
    rc, out = run(tmp_path, vectors, "same")  # the same run again reuses its complete stages
    assert rc == 0 and json.loads((out / "run.json").read_text())["stages"]["select"]["reused"]
    rc, _ = run(tmp_path, vectors, "same", "--seed", "9")
    assert rc == 2 and "holds a different run" in capsys.readouterr().err
    assert run(tmp_path, vectors, "same", "--seed", "9", "--overwrite")[0] == 0
    # a run that did not finish is continued only when asked
    info = json.loads((out / "run.json").read_text())
    (out / "run.json").write_text(json.dumps({**info, "status": "running"}))
    rc, _ = run(tmp_path, vectors, "same", "--seed", "9")
    assert rc == 2 and "did not finish; pass --resume" in capsys.readouterr().err
    assert run(tmp_path, vectors, "same", "--seed", "9", "--resume")[0] == 0


def test_config_file_and_flags(tmp_path, vectors):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data:\n  embeddings: {vectors}\ncluster:\n  k: [7]\nselect:\n  budgets: [20]\n"
                   f"  random_seeds: [4]\noutput_dir: {tmp_path / 'fromyaml'}\n")
    assert main(["select", str(cfg), "--no-progress", "--k", "8"]) == 0  # the flag wins
    sel = pq.read_table(tmp_path / "fromyaml" / "selection.parquet")
    assert "in_k8_m20" in sel.column_names and "in_random_m20_s4" in sel.column_names


def test_real_pool_embedded_with_minilm(tmp_path, shared_data):
    out = tmp_path / "bank"
    rc = main(["select", "--data", str(shared_data / "banking77" / "train.csv"), "--label-column", "category",
               "--set", "data.limit=400", "--set", "select.stratify=none", "--engine", "local", "--k", "8", "--budgets", "40", "--out", str(out),
               "--no-progress"])
    assert rc == 0
    sel = pq.read_table(out / "selection.parquet").to_pandas()
    meta = json.loads((out / "run.json").read_text())["stages"]
    stage = out / meta["embed"]["dir"]  # relative to the run directory
    assert meta["embed"]["rows"] == 400 and meta["embed"]["dim"] == 384
    assert sel["in_k8_m40"].sum() == 40 and sel["label"].notna().all()
    # the stage's shards feed a second run without the encoder, with the same selection
    rc = main(["select", "--embeddings", str(stage), "--k", "8", "--budgets", "40",
               "--out", str(tmp_path / "again"), "--no-progress"])
    again = pq.read_table(tmp_path / "again" / "selection.parquet").to_pandas()
    assert rc == 0 and (again["in_k8_m40"] == sel["in_k8_m40"]).all()


def test_embed_command_writes_a_stage_that_select_reads(tmp_path, shared_data, capsys):
    rc = main(["embed", "--data", str(shared_data / "banking77" / "train.csv"), "--set", "data.limit=60",
               "--engine", "local", "--out", str(tmp_path / "e"), "--no-progress"])
    assert rc == 0
    stage = Path(capsys.readouterr().out.strip().split(" to ")[-1])
    assert (stage / "manifest.json").is_file()
    assert main(["select", "--embeddings", str(stage), "--k", "3", "--budgets", "6",
                 "--out", str(tmp_path / "s"), "--no-progress"]) == 0


def test_several_methods_give_their_own_candidates(tmp_path, vectors):
    from ray_pipeline.finetune.sweep import candidates_from_selection

    out = tmp_path / "methods"
    assert main(["select", "--embeddings", str(vectors), "--k", "M", "--budgets", "30", "--out", str(out),
                 "--set", "select.method=[kcenter, centroid]", "--set", "select.random_seeds=[0]",
                 "--no-progress"]) == 0
    sel = pq.read_table(out / "selection.parquet")
    assert {"in_k30_m30", "in_centroid_k30_m30", "rank_k30", "rank_centroid_k30"} <= set(sel.column_names)
    listed = json.loads((out / "select" / json.loads((out / "run.json").read_text())["stages"]["select"]["key"]
                         / "select.json").read_text())["candidates"]
    cands = {c.name: c for c in candidates_from_selection(sel, listed)}
    assert cands["centroid_k30_m30"].extra["method"] == "centroid" and cands["k30_m30"].k == 30
    assert cands["random_m30_s0"].seed == 0 and len(cands["full"].rows) == 3000
    assert len(cands["centroid_k30_m30"].rows) == 30
