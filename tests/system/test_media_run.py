"""`ray-pipeline run` on pools without text: FSDD recordings embedded by GE2E, selected, and the
packaged GE2E fine-tuned with a classification head; photographs through EfficientNet-Lite0 the
same way: the same Ray Train trials, Tune sweep, validation/test split and verdict as text."""

import csv
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from media_files import write_photo_crops  # noqa: E402

from ray_pipeline.cli import main  # noqa: E402

pytest.importorskip("resemblyzer")
pytestmark = pytest.mark.slow


def _subset(src, dst, per_speaker):
    rows, seen = list(csv.DictReader(src.open())), {}
    keep = [r for r in rows if seen.setdefault(r["speaker"], []).append(r) or len(seen[r["speaker"]]) <= per_speaker]
    with dst.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows({**r, "audio": str(src.parent / r["audio"])} for r in keep)
    return dst


def test_a_speech_pool_is_fine_tuned_and_judged(tmp_path, shared_data):
    fsdd = shared_data / "fsdd"
    pool = _subset(fsdd / "train.csv", tmp_path / "train.csv", 20)  # 120 recordings, 6 speakers
    held = _subset(fsdd / "test.csv", tmp_path / "test.csv", 10)  # 60: 30 choose, 30 report
    out = tmp_path / "out"
    args = ["run", "configs/fsdd.yaml", "--data", str(pool), "--eval", str(held), "--k", "6", "--budgets", "12",
            "--set", "select.random_seeds=[0]", "--set", "finetune.proxy.top_candidates=1",
            "--set", "finetune.train.max_steps=4", "--set", "finetune.train.eval_every=2",
            "--set", "finetune.train.batch_size=8", "--set", "embed.shard_size=60", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "complete" and info["stages"]["embed"]["dim"] == 256
    tuned = json.loads(next((out / "tune").glob("*/candidates.json")).read_text())
    trials = {t["name"]: t for t in tuned["trials"]}
    assert {t["kind"] for t in trials.values()} == {"selection", "random", "full"}
    assert all(t["status"] in ("finished", "capped", "stopped_by_patience") and t["steps"] >= 2
               for t in trials.values()), {k: (t["status"], t.get("error")) for k, t in trials.items()}
    verdict = tuned["summary"]["verdict"]
    assert "test accuracy" in " ".join(verdict["lines"]) and {"vs_random", "vs_full"} <= set(verdict)
    from ray_pipeline.finetune.infer import load_tuned

    model, fe, task = load_tuned(str(out / "target" / "model"))
    assert task.modality == "audio" and model.config.num_labels == 6 and fe.sampling_rate == 16000
    # the tuned model on new recordings, as a user applies it
    preds = tmp_path / "p.jsonl"
    assert main(["predict", "--model", str(out / "target" / "model"), "--input", str(held), "--audio-column", "audio",
                 "--id-column", "id", "--output", str(preds)]) == 0
    said = [json.loads(line) for line in preds.read_text().splitlines()]
    assert len(said) == 60 and {s["label"] for s in said} <= set(model.config.id2label.values())
    assert main(["predict", "--model", str(out / "target" / "model"), "--input", str(held)]) == 2  # no --audio-column


def test_an_image_pool_is_fine_tuned_and_judged(tmp_path):
    rows = write_photo_crops(tmp_path, 24, size=64)  # 48 crops of two photographs
    pool, held = tmp_path / "pool.jsonl", tmp_path / "held.jsonl"
    pool.write_text("".join(json.dumps(r) + "\n" for r in rows[:16] + rows[24:40]))
    held.write_text("".join(json.dumps(r) + "\n" for r in rows[16:24] + rows[40:]))
    out = tmp_path / "out"
    assert main(["run", "--data", str(pool), "--image-column", "image", "--label-column", "photo", "--id-column", "id",
                 "--eval", str(held), "--k", "2", "--budgets", "4", "--set", "select.random_seeds=[0]",
                 "--set", "finetune.proxy.top_candidates=1", "--set", "finetune.train.max_steps=2",
                 "--set", "finetune.train.eval_every=1", "--set", "finetune.train.batch_size=4",
                 "--set", "finetune.sweep.include_full=false", "--engine", "local", "--out", str(out),
                 "--no-progress"]) == 0
    tuned = json.loads(next((out / "tune").glob("*/candidates.json")).read_text())
    assert {t["kind"] for t in tuned["trials"]} == {"selection", "random"}
    assert all(t["steps"] >= 1 for t in tuned["trials"]), [(t["name"], t.get("error")) for t in tuned["trials"]]
    assert "test accuracy" in " ".join(tuned["summary"]["verdict"]["lines"])
    preds = tmp_path / "p.jsonl"
    assert main(["predict", "--model", str(out / "target" / "model"), "--input", str(held), "--image-column", "image",
                 "--output", str(preds)]) == 0
    assert {json.loads(line)["label"] for line in preds.read_text().splitlines()} <= {"china", "flower"}
