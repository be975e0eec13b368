"""The held-out set: seeded, label-stratified samples and the validation/test split."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ray_pipeline.config import Config
from ray_pipeline.errors import InputError
from ray_pipeline.finetune.heldout import read_parts, split, stratified_sample


def test_stratified_sample_by_hand():
    # 6 a, 3 b, 1 c; 5 of 10: shares 3, 1.5, 0.5 -> 3 a, then the larger remainder of b and c
    # (equal, 0.5 each; the larger weight wins: b) -> 3 a, 2 b, no c
    labels = np.array(list("aaaaaabbbc"))
    rows = stratified_sample(labels, 10, 5, np.random.default_rng(0))
    assert sorted(labels[rows].tolist()) == ["a", "a", "a", "b", "b"]
    assert len(set(rows.tolist())) == 5 and (np.diff(rows) > 0).all()


@given(counts=st.lists(st.integers(1, 30), min_size=1, max_size=8), data=st.data())
@settings(max_examples=100, deadline=None)
def test_stratified_sample_keeps_every_label_in_proportion(counts, data):
    labels = np.repeat(np.arange(len(counts)), counts)
    np.random.default_rng(0).shuffle(labels)  # a file's order must not matter
    size = data.draw(st.integers(1, len(labels)))
    rows = stratified_sample(labels, len(labels), size, np.random.default_rng(1))
    got = np.bincount(labels[rows], minlength=len(counts))
    assert got.sum() == size and len(set(rows.tolist())) == size
    assert (np.abs(got - size * np.array(counts) / len(labels)) < 1).all()  # within one of the exact share


def test_split_is_seeded_disjoint_and_covers_everything():
    labels = np.array(list("ab") * 50)
    v1, t1 = split(labels, 100, 0.3, np.random.default_rng(5))
    v2, _ = split(labels, 100, 0.3, np.random.default_rng(5))
    assert (v1 == v2).all() and len(v1) == 30 and len(t1) == 70
    assert not set(v1) & set(t1) and sorted([*v1, *t1]) == list(range(100))
    assert np.bincount((labels[v1] == "b").astype(int)).tolist() == [15, 15]


def test_a_limited_held_out_set_covers_every_label_not_the_first_rows(shared_data):
    """banking77's test.csv is sorted by label: its first 400 rows hold 10 of the 77 intents. A
    limit of 400 must draw all 77, about in proportion, in both parts."""
    cfg = Config.from_dict({"data": {"path": str(shared_data / "banking77" / "train.csv"), "label_column": "category"},
                            "finetune": {"heldout": {"eval_path": str(shared_data / "banking77" / "test.csv"),
                                                     "eval_limit": 400}}})
    val, test, info = (p := read_parts(cfg)).validation, p.test, p.info
    assert len(val) == 200 and len(test) == 200
    assert len(set(val.labels)) == 77 and len(set(test.labels)) == 77
    assert max(info["validation"]["labels"].values()) <= 4 and not set(val.ids) & set(test.ids)
    again = read_parts(cfg).validation
    assert (again.ids == val.ids).all()  # seeded


def test_a_held_out_set_of_one_row_cannot_be_split(tmp_path):
    (tmp_path / "pool.csv").write_text("text,label\na,x\nb,y\n")
    (tmp_path / "held.csv").write_text("text,label\nc,x\n")
    cfg = Config.from_dict({"data": {"path": str(tmp_path / "pool.csv"), "label_column": "label"},
                            "finetune": {"heldout": {"eval_path": str(tmp_path / "held.csv")}}})
    with pytest.raises(InputError, match="at least 2"):
        read_parts(cfg)
