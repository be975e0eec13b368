"""Speech and video samples: decoding (streamed, cut), the pre-flight of bad files, the speech and
video encoders, and the shard stage on them (local engine; the Ray path is in the system tests)."""

import csv
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from media_files import bad_audio_files, tone, truncated, write_audio, write_clip, zero_frame_clip  # noqa: E402

from ray_pipeline.config import DataConfig, EmbedConfig  # noqa: E402
from ray_pipeline.config.schema import Config  # noqa: E402
from ray_pipeline.errors import ConfigError, InputError  # noqa: E402
from ray_pipeline.io.media import BadMedia, audio_blocks, load_audio, probe, video_frames  # noqa: E402
from ray_pipeline.io.pool import read_pool  # noqa: E402

pytest.importorskip("soundfile")
pytest.importorskip("av")


def _csv(path: Path, rows: list[dict]) -> Path:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("clips")
    pan = write_clip(d / "pan.mp4", "china.jpg", codec="libx264", motion="pan")
    zoom = write_clip(d / "zoom.webm", "flower.jpg", codec="libvpx-vp9", motion="zoom", audio=True)
    return {"pan": pan, "zoom": zoom, "zero": zero_frame_clip(d / "zero.avi"),
            "truncated": truncated(pan, d / "cut.mp4"), "truncated_webm": truncated(zoom, d / "cut.webm")}


# ----------------------------------------------------------------------------------------------
# decoding


@pytest.mark.parametrize("ext", ["wav", "flac", "ogg", "mp3"])
def test_every_audio_format_decodes_to_mono_at_the_encoders_rate(tmp_path, ext):
    stereo = np.stack([tone(1.0), tone(1.0, hz=330)], axis=1)
    path = write_audio(tmp_path / f"a.{ext}", stereo)
    wav = load_audio(str(path), 16000, 30.0)
    assert wav.ndim == 1 and wav.dtype == np.float32
    assert abs(len(wav) - 16000) <= 1200  # mp3 pads its first and last frames
    assert load_audio(path.read_bytes(), 16000, 30.0).shape == wav.shape  # bytes as the column's value


def test_max_seconds_cuts_a_long_file_while_streaming(tmp_path):
    path = write_audio(tmp_path / "long.wav", np.tile(tone(1.0), 600))  # 10 minutes
    blocks = list(audio_blocks(str(path), 16000, 30.0, block_seconds=10.0))
    assert len(blocks) == 3 and sum(map(len, blocks)) == 30 * 16000
    assert max(map(len, blocks)) <= 11 * 16000  # never more than about one block at a time


@pytest.mark.parametrize("reason", ["audio file missing", "not an audio file", "empty audio", "silent audio",
                                    "not an audio file "])
def test_bad_recordings_are_named_by_what_is_wrong(tmp_path, reason):
    assert probe(str(bad_audio_files(tmp_path)[reason]), "audio", 30.0) == reason.strip()


def test_frames_are_sampled_at_video_fps_up_to_video_frames(clips):
    assert len(video_frames(str(clips["pan"]), 2.0, 16, 30.0, 64)) == 6  # 3 s at 2 a second
    assert len(video_frames(str(clips["pan"]), 2.0, 4, 30.0, 64)) == 4
    assert len(video_frames(str(clips["pan"]), 2.0, 16, 1.0, 64)) == 3  # 0, 0.5 and 1.0 s
    assert len(video_frames(clips["zoom"].read_bytes(), 1.0, 16, 30.0, 32)) == 3


def test_bad_clips(clips):
    assert probe(str(clips["zero"]), "video", 30.0) == "video without frames"
    assert probe(str(clips["truncated"]), "video", 30.0) == "not a video file"  # mp4 index lost with the tail
    # a webm cut short still holds its first frames: they are used, the rest is not there
    assert 0 < len(video_frames(str(clips["truncated_webm"]), 10.0, 64, 30.0, 32)) < 30
    assert probe(str(clips["pan"]), "audio", 30.0) == "not an audio file"  # a clip without sound
    assert probe(str(clips["zoom"]), "audio", 30.0) is None  # its opus track decodes through PyAV


# ----------------------------------------------------------------------------------------------
# the pool's pre-flight


def test_pool_names_the_first_bad_row_in_one_line_or_skips_and_counts(tmp_path):
    bad = bad_audio_files(tmp_path / "bad")
    good = write_audio(tmp_path / "good.wav", tone(1.0))
    rows = [{"id": "g", "audio": good.name, "label": "a"}]
    rows += [{"id": f"b{i}", "audio": str(p.relative_to(tmp_path)), "label": "b"} for i, p in enumerate(bad.values())]
    data = _csv(tmp_path / "pool.csv", rows)
    with pytest.raises(InputError) as e:
        read_pool(DataConfig(path=str(data), audio_column="audio", label_column="label", id_column="id"))
    msg = str(e.value)
    assert "\n" not in msg and "row 1" in msg and "missing.wav" in msg and "on_bad_rows: skip" in msg
    pool = read_pool(DataConfig(path=str(data), audio_column="audio", label_column="label", id_column="id"),
                     skip_bad_rows=True)
    assert pool.ids.tolist() == ["g"] and pool.texts is None and pool.audios[0] == str(good)
    assert pool.skipped == {"audio file missing": 1, "not an audio file": 2, "empty audio": 1, "silent audio": 1}


def test_audio_bytes_in_a_parquet_pool(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    blobs = [write_audio(tmp_path / f"{i}.flac", tone(0.5, hz=200 + 100 * i)).read_bytes() for i in range(3)]
    pq.write_table(pa.table({"id": ["x", "y", "z"], "speech": blobs, "caption": ["one", "", "three"]}),
                   tmp_path / "p.parquet")
    pool = read_pool(DataConfig(path=str(tmp_path / "p.parquet"), audio_column="speech", text_column="caption",
                                id_column="id"))
    assert isinstance(pool.audios[0], bytes) and pool.texts.tolist() == ["one", "", "three"]


def test_new_fields_are_checked_with_one_line_errors():
    for field, value in [("max_seconds", 0), ("video_fps", -1), ("video_frames", 0), ("audio_model", " "),
                         ("video_audio", "yes"), ("max_seconds", "long")]:
        with pytest.raises(ConfigError) as e:
            Config.from_dict({"embed": {field: value}})
        assert f"embed.{field}" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="data.audio_column"):
        Config.from_dict({"data": {"audio_column": 3}})


# ----------------------------------------------------------------------------------------------
# encoders and the stage


@pytest.fixture(scope="module")
def speech():
    from ray_pipeline.embed.audio import AudioEmbedder

    return AudioEmbedder(EmbedConfig(device="cpu"))


def test_ge2e_matches_resemblyzers_own_pipeline_on_real_speech(speech, shared_data):
    from resemblyzer import preprocess_wav  # librosa's resampler and load; ours: soundfile and soxr

    files = [str(shared_data / "fsdd" / "recordings" / f"{d}_{who}_7.wav") for d, who in [(3, "lucas"), (8, "yweweler")]]
    ours = speech({"audio": files})["embedding"]
    ref = np.stack([speech.model.embed_utterance(preprocess_wav(f)) for f in files])
    assert ours.shape == (2, 256) and (ours * ref).sum(axis=1).min() > 0.995


def test_fsdd_speakers_sound_alike(speech, shared_data):
    fsdd = shared_data / "fsdd"
    rows = list(csv.DictReader((fsdd / "train.csv").open()))
    picked = [r for r in rows if r["speaker"] in ("george", "jackson") and r["digit"] in "0123"][::6]
    x = speech({"audio": [str(fsdd / r["audio"]) for r in picked]})["embedding"]
    who = np.array([r["speaker"] for r in picked])
    cos = x @ x.T
    same = cos[(who[:, None] == who[None]) & ~np.eye(len(who), dtype=bool)].mean()
    assert same > cos[who[:, None] != who[None]].mean() + 0.1


def test_hugging_face_audio_model_by_directory(tmp_path):
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

    from ray_pipeline.embed.audio import AudioEmbedder, check_audio_model

    cfg = Wav2Vec2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                         conv_dim=(16, 16), conv_stride=(5, 4), conv_kernel=(10, 8), num_feat_extract_layers=2)
    Wav2Vec2Model(cfg).save_pretrained(tmp_path / "w2v")
    Wav2Vec2FeatureExtractor(sampling_rate=16000).save_pretrained(tmp_path / "w2v")
    ecfg = EmbedConfig(device="cpu", audio_model=str(tmp_path / "w2v"))
    check_audio_model(ecfg)
    emb = AudioEmbedder(ecfg)
    x = emb({"audio": [str(write_audio(tmp_path / "a.wav", tone(1.0)))]})["embedding"]
    assert emb.rate == 16000 and x.shape == (1, 32) and abs(float(np.linalg.norm(x)) - 1) < 1e-5
    with pytest.raises(InputError, match="embed.audio_model"):
        check_audio_model(EmbedConfig(audio_model=str(tmp_path)))


def test_a_clip_is_nearer_its_own_photograph(clips, tmp_path):
    from PIL import Image
    from sklearn.datasets import load_sample_image

    from ray_pipeline.embed.encoders import ImageEmbedder
    from ray_pipeline.embed.video import VideoEmbedder

    cfg = EmbedConfig(device="cpu", image_size=96)
    image = ImageEmbedder(cfg)
    photos = []
    for name in ("china.jpg", "flower.jpg"):
        Image.fromarray(load_sample_image(name)).save(tmp_path / f"{name}.png")
        photos.append(str(tmp_path / f"{name}.png"))
    p = image({"image": photos})["embedding"]
    v = VideoEmbedder(cfg, image)({"video": [str(clips["pan"]), str(clips["zoom"])]})["embedding"]
    sim = v @ p.T
    assert sim[0, 0] > sim[0, 1] and sim[1, 1] > sim[1, 0]
    both = VideoEmbedder(EmbedConfig(device="cpu", image_size=96, video_audio=True), image)
    x = both({"video": [str(clips["pan"]), str(clips["zoom"])]})["embedding"]
    assert x.shape == (2, 1280 + 256) and np.abs(x[0, 1280:]).sum() == 0 and np.abs(x[1, 1280:]).sum() > 0
    assert np.allclose(np.linalg.norm(x, axis=1), 1, atol=1e-5)


def test_audio_stage_is_byte_identical_and_resumes(tmp_path):
    from ray_pipeline.embed.stage import embed_pool, load_stage, shard_name

    rows = [{"id": f"r{i}", "audio": write_audio(tmp_path / f"{i}.wav", tone(0.6 + 0.1 * i, hz=150 + 40 * i)).name,
             "text": "" if i % 2 else f"caption {i}"} for i in range(5)]
    data = _csv(tmp_path / "pool.csv", rows)
    pool = read_pool(DataConfig(path=str(data), audio_column="audio", text_column="text", id_column="id"))
    cfg = EmbedConfig(engine="local", device="cpu", shard_size=2, batch_size=2)
    a = embed_pool(pool, cfg, tmp_path / "a", progress=False)
    b = embed_pool(pool, cfg, tmp_path / "b", progress=False)
    assert a["key"] == b["key"] and a["dim"] == 384 + 256 and a["shards"] == 3
    da, db = tmp_path / "a" / a["key"], tmp_path / "b" / b["key"]
    assert all((da / shard_name(i)).read_bytes() == (db / shard_name(i)).read_bytes() for i in range(3))
    (db / shard_name(1)).unlink()
    (db / "manifest.json").unlink()
    again = embed_pool(pool, cfg, tmp_path / "b", progress=False)
    assert again["shards_computed"] == 1 and (db / shard_name(1)).read_bytes() == (da / shard_name(1)).read_bytes()
    keep, x = load_stage(da, pool.ids)
    assert keep.all() and np.allclose(np.linalg.norm(x, axis=1), 1, atol=1e-5)
    assert np.abs(x[1, :384]).sum() == 0  # no caption: the speech part alone, unscaled


def test_a_text_pools_key_ignores_the_speech_and_video_settings():
    from ray_pipeline.embed.stage import stage_key

    ids, texts = np.array(["a", "b"], dtype=object), np.array(["x", "y"], dtype=object)
    keys = {stage_key(ids, texts, None, EmbedConfig(**kw))
            for kw in ({}, {"audio_model": "org/other"}, {"max_seconds": 5.0}, {"video_fps": 1.0})}
    assert len(keys) == 1
    audios = np.array(["/a.wav", "/b.wav"], dtype=object)
    assert stage_key(ids, texts, None, EmbedConfig(), audios=audios) != keys.pop()
    assert (stage_key(ids, None, None, EmbedConfig(), audios=audios)
            != stage_key(ids, None, None, EmbedConfig(max_seconds=5.0), audios=audios))


def test_bad_clip_in_the_stage_errors_or_is_skipped(clips, tmp_path):
    from ray_pipeline.embed.stage import ShardEmbedder

    batch = {"shard": [0], "rows": [[0, 1]], "ids": [["p", "t"]], "texts": [[]], "images": [[]], "audios": [[]],
             "videos": [[str(clips["pan"]), str(clips["truncated"])]]}
    cfg = EmbedConfig(device="cpu", image_size=64)
    with pytest.raises(BadMedia, match="shard 0.*on_bad_rows: skip"):
        ShardEmbedder(cfg, str(tmp_path / "e"), text=False, video=True)(batch)
    skip = EmbedConfig(device="cpu", image_size=64, on_bad_rows="skip")
    out = ShardEmbedder(skip, str(tmp_path / "s"), text=False, video=True)(batch)
    assert out["rows"].tolist() == [1] and out["skipped"].tolist() == [1]


def test_cli_refuses_a_bad_recording_before_any_work(tmp_path, capsys):
    from ray_pipeline.cli import main

    good = write_audio(tmp_path / "good.wav", tone(1.0))
    silent = write_audio(tmp_path / "quiet.wav", np.zeros(4000, np.float32))
    data = _csv(tmp_path / "pool.csv", [{"id": "a", "audio": good.name}, {"id": "b", "audio": silent.name}])
    out = tmp_path / "out"
    rc = main(["select", "--data", str(data), "--audio-column", "audio", "--id-column", "id", "--out", str(out),
               "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and any("silent audio" in line and "row 1" in line for line in err)
    assert not (out / "embeddings").exists()


def test_run_on_a_speech_pool_passes_the_preflight_with_the_packaged_speech_model(tmp_path, capsys, shared_data):
    from ray_pipeline.cli import main

    args = ["run", "configs/fsdd.yaml", "--data", str(shared_data / "fsdd" / "train.csv"), "--eval",
            str(shared_data / "fsdd" / "test.csv"), "--budgets", "4", "8",
            "--out", str(tmp_path / "out"), "--check"]
    assert main(args) == 0
    assert "input checked, nothing written" in capsys.readouterr().out + capsys.readouterr().err
    # a text model for recordings, or a causal LM: one line each, exit 2, before anything is written
    assert main(args + ["--set", "finetune.model=minilm"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("ray-pipeline: error:") and "AutoModelForAudioClassification" in err and "recordings" in err
    assert main(args + ["--set", "finetune.task=instruction", "--set", "finetune.proxy.kind=coverage"]) == 2
    assert "instruction tunes a causal LM on text" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
