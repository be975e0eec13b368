"""Speech and video pools through ``ray-pipeline select``: FSDD recordings through the Ray Data
actors (resumed, byte-identical), and a pool of clips written here."""

import json
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from media_files import write_clip  # noqa: E402

from ray_pipeline.cli import main  # noqa: E402

pytest.importorskip("av")
pytest.importorskip("resemblyzer")
pytestmark = pytest.mark.slow


def test_fsdd_select_through_ray_resumes_byte_identical(tmp_path, shared_data):
    out = tmp_path / "fsdd"
    args = ["select", "configs/fsdd.yaml", "--data", str(shared_data / "fsdd" / "train.csv"), "--set",
            "data.limit=120", "--set", "embed.shard_size=40", "--set", "embed.threads_per_actor=1",
            "--k", "4", "--budgets", "12", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    meta = json.loads((out / "run.json").read_text())["stages"]["embed"]
    assert meta["rows"] == 120 and meta["dim"] == 256
    stage = out / meta["dir"]
    first = {p.name: p.read_bytes() for p in sorted(stage.glob("shard-*.parquet"))}
    assert len(first) == 3
    (stage / "shard-00001.parquet").unlink()
    (stage / "manifest.json").unlink()
    assert main(args + ["--resume"]) == 0
    again = json.loads((out / "run.json").read_text())["stages"]["embed"]
    assert again["rows"] == 120 and (stage / "shard-00001.parquet").read_bytes() == first["shard-00001.parquet"]
    sel = pq.read_table(out / "selection.parquet").to_pandas()
    assert sel["in_k4_m12"].sum() == 12 and set(sel["label"]) <= {"george", "jackson", "lucas", "nicolas",
                                                                  "theo", "yweweler"}


def test_a_video_pool_runs_through_select(tmp_path):
    rows = []
    for i in range(8):
        photo, motion = ("china.jpg", "pan") if i % 2 else ("flower.jpg", "zoom")
        name = f"clip{i}.{'webm' if i % 3 == 0 else 'mp4'}"
        write_clip(tmp_path / name, photo, codec="libvpx-vp9" if name.endswith("webm") else "libx264",
                   motion=motion, seconds=1.0 + 0.25 * i, size=64)
        rows.append({"id": f"v{i}", "video": name, "caption": f"a {motion} over the {photo[:-4]}", "kind": photo})
    data = tmp_path / "clips.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    assert main(["select", "--data", str(data), "--video-column", "video", "--text-column", "caption",
                 "--label-column", "kind", "--id-column", "id", "--engine", "local", "--set", "embed.image_size=64",
                 "--k", "2", "--budgets", "4", "--out", str(out), "--no-progress"]) == 0
    meta = json.loads((out / "run.json").read_text())["stages"]["embed"]
    assert meta["rows"] == 8 and meta["dim"] == 384 + 1280
    sel = pq.read_table(out / "selection.parquet").to_pandas()
    assert sel["in_k2_m4"].sum() == 4
