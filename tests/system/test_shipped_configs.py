"""The configs the README tells a user to run pass the pre-flight as shipped, from the project's
root (their data paths are relative to it): the pool is read, the models resolve, nothing starts."""

import json
from pathlib import Path

import pytest

from ray_pipeline.cli import main

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["example.yaml", pytest.param("chat.yaml", marks=pytest.mark.slow)])
def test_a_shipped_config_passes_the_check(name, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    assert main(["run", str(ROOT / "configs" / name), "--check", "--out", str(tmp_path / "run")]) == 0
    assert not (tmp_path / "run").exists()  # the check writes nothing


def test_the_chat_demo_pool_is_what_its_source_note_says():
    demo = ROOT / "examples" / "gpteacher_chat"
    pool = [json.loads(line) for line in (demo / "chats.jsonl").read_text().splitlines()]
    held = [json.loads(line) for line in (demo / "held_out.jsonl").read_text().splitlines()]
    assert (len(pool), len(held)) == (400, 100)
    assert not {r["id"] for r in pool} & {r["id"] for r in held}  # held out means not in the pool
    assert all([m["role"] for m in r["messages"]] == ["user", "assistant"] for r in pool + held)
    assert "MIT License" in (demo / "LICENSE").read_text()
