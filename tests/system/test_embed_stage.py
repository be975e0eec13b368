"""The embedding stage: the shard callable without Ray, then through Ray Data; resume, a killed
actor, text + image samples, bad rows."""

import json
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from ray_pipeline.config import DataConfig, EmbedConfig
from ray_pipeline.io.pool import read_pool
from ray_pipeline.embed.encoders import TextEmbedder, fuse
from ray_pipeline.embed.stage import ShardEmbedder, embed_pool, load_stage, plan_shards, shard_name
from ray_pipeline.errors import InputError

pytestmark = pytest.mark.slow  # Ray Data actor pools: not in the fast lane

# One torch thread everywhere: the vectors' bits then do not depend on the engine.
CFG = EmbedConfig(device="cpu", shard_size=40, batch_size=16, threads_per_actor=1)


@pytest.fixture(scope="module")
def pool(shared_data):
    return read_pool(DataConfig(path=str(shared_data / "banking77" / "train.csv"), limit=150))


def shard_bytes(stage: Path) -> dict:
    return {f.name: f.read_bytes() for f in sorted(stage.glob("shard-*.parquet"))}


def test_shard_plan_orders_by_length_and_covers_every_row():
    texts = np.array(["aa", "a", "aaaa", "aaa", "aaaaa"], dtype=object)
    shards = plan_shards(texts, 5, 2)
    assert [s.tolist() for s in shards] == [[4, 2], [3, 0], [1]]


def test_fusion_by_hand():
    t = np.array([[1.0, 0.0], [0.0, 0.0]], np.float32)
    i = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]], np.float32)
    f = fuse(t, i)
    np.testing.assert_allclose(f, [[2 ** -0.5, 0, 0, 2 ** -0.5, 0], [0, 0, 1, 0, 0]], rtol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(f, axis=1), 1.0, rtol=1e-6)


def test_shard_callable_without_ray(tmp_path, pool):
    """The callable on a plain dict: one file per shard, the same vectors as TextEmbedder."""
    emb = ShardEmbedder(CFG, str(tmp_path), threads=1)
    texts = pool.texts[:20].tolist()
    out = emb({"shard": np.array([3]), "rows": [list(range(20))], "ids": [pool.ids[:20].tolist()],
               "texts": [texts], "images": [[]]})
    assert out["shard"].tolist() == [3] and out["rows"].tolist() == [20] and out["skipped"].tolist() == [0]
    table = pq.read_table(tmp_path / shard_name(3))
    assert table.column("id").to_pylist() == pool.ids[:20].tolist()
    x = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
    ref = np.concatenate([TextEmbedder(CFG)({"text": np.array(texts[lo:lo + 16], dtype=object)})["embedding"]
                          for lo in (0, 16)])
    np.testing.assert_array_equal(x, ref)


def test_local_engine_resumes_without_redoing_finished_shards(tmp_path, pool):
    cfg = EmbedConfig(**{**CFG.__dict__, "engine": "local"})
    first = embed_pool(pool, cfg, tmp_path, progress=False)
    stage = tmp_path / first["key"]
    assert first["rows"] == 150 and first["shards"] == 4 and first["shards_computed"] == 4
    before = shard_bytes(stage)
    # An interrupted run: one shard and the manifest never written.
    (stage / shard_name(2)).unlink()
    (stage / "manifest.json").unlink()
    mtimes = {f: (stage / f).stat().st_mtime_ns for f in before if f != shard_name(2)}
    again = embed_pool(pool, cfg, tmp_path, progress=False)
    assert again["shards_computed"] == 1
    assert shard_bytes(stage) == before  # byte-identical
    assert all((stage / f).stat().st_mtime_ns == t for f, t in mtimes.items())  # untouched
    keep, x = load_stage(stage, pool.ids)
    assert keep.all() and x.shape == (150, 384)
    # A complete stage is not touched at all.
    assert embed_pool(pool, cfg, tmp_path, progress=False)["shards_computed"] == 1


def test_ray_data_engine_matches_local_byte_for_byte(tmp_path, pool, local_ray):
    local = embed_pool(pool, EmbedConfig(**{**CFG.__dict__, "engine": "local"}), tmp_path / "a", progress=False)
    remote = embed_pool(pool, CFG, tmp_path / "b", progress=False)
    assert remote["engine"] == "ray" and remote["actor_plan"]["actors"] == 1
    assert local["key"] == remote["key"]
    assert shard_bytes(tmp_path / "a" / local["key"]) == shard_bytes(tmp_path / "b" / remote["key"])


def test_one_or_two_actors_give_the_same_bytes(tmp_path, pool, local_ray):
    one = embed_pool(pool, EmbedConfig(**{**CFG.__dict__, "actors": 1}), tmp_path / "one", progress=False)
    two = embed_pool(pool, EmbedConfig(**{**CFG.__dict__, "actors": 2}), tmp_path / "two", progress=False)
    assert one["actor_plan"]["actors"] == 1 and two["actor_plan"]["actors"] == 2
    assert shard_bytes(tmp_path / "one" / one["key"]) == shard_bytes(tmp_path / "two" / two["key"])


def test_killed_actor_is_restarted_and_output_is_identical(tmp_path, pool, local_ray):
    """The actor process dies (os._exit) in its first call; Ray restarts it and retries."""
    marker = tmp_path / "died-once"

    class DiesOnce(ShardEmbedder):  # defined here so Ray ships it by value to the worker
        def __call__(self, batch):
            if not marker.exists():
                marker.touch()
                os._exit(1)
            return super().__call__(batch)

    import ray_pipeline.embed.stage as embed_mod

    clean = embed_pool(pool, CFG, tmp_path / "clean", progress=False)
    original = embed_mod.ShardEmbedder
    embed_mod.ShardEmbedder = DiesOnce
    try:
        crashed = embed_pool(pool, CFG, tmp_path / "crash", progress=False)
    finally:
        embed_mod.ShardEmbedder = original
    assert marker.exists()  # the actor really died
    assert crashed["rows"] == 150
    assert shard_bytes(tmp_path / "clean" / clean["key"]) == shard_bytes(tmp_path / "crash" / crashed["key"])


# ---------------------------------------------------------------------------------------------
# images


@pytest.fixture(scope="module")
def image_pool_file(tmp_path_factory):
    from PIL import Image
    from sklearn.datasets import load_digits, load_sample_image

    d = tmp_path_factory.mktemp("img")
    china, flower = load_sample_image("china.jpg"), load_sample_image("flower.jpg")
    Image.fromarray(china).save(d / "china.png")
    Image.fromarray(china).resize((320, 213)).save(d / "china_small.png")
    Image.fromarray(flower).save(d / "flower.png")
    digit = (load_digits().images[0] * 16).astype(np.uint8)
    Image.fromarray(digit).save(d / "digit.png")
    (d / "broken.png").write_bytes(b"this is not a png")
    rows = [{"id": "a", "text": "a temple in china", "image": "china.png"},
            {"id": "b", "text": "the same temple, smaller", "image": "china_small.png"},
            {"id": "c", "text": "a flower", "image": "flower.png"},
            {"id": "d", "text": "", "image": "digit.png"},
            {"id": "e", "text": "no picture here", "image": None}]
    path = d / "pool.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_text_and_image_samples(tmp_path, image_pool_file):
    pool = read_pool(DataConfig(path=str(image_pool_file), image_column="image", id_column="id"))
    cfg = EmbedConfig(**{**CFG.__dict__, "engine": "local"})
    manifest = embed_pool(pool, cfg, tmp_path, progress=False)
    keep, x = load_stage(tmp_path / manifest["key"], pool.ids)
    assert keep.all() and x.shape == (5, 384 + 1280)
    assert manifest["modalities"] == {"text": True, "image": True, "audio": False, "video": False}
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
    img = x[:, 384:]
    # the same photo at two sizes is closer than two different photos
    cos = lambda u, v: float(u @ v / np.linalg.norm(u) / np.linalg.norm(v))  # noqa: E731
    assert cos(img[0], img[1]) > 0.8 > cos(img[0], img[2])
    assert np.abs(x[3, :384]).sum() == 0 and np.abs(x[4, 384:]).sum() == 0  # image-only, text-only


def test_unreadable_image_errors_or_is_skipped_and_counted(tmp_path, image_pool_file):
    lines = image_pool_file.read_text().splitlines()
    lines.append(json.dumps({"id": "z", "text": "broken", "image": "broken.png"}))
    bad = image_pool_file.with_name("bad.jsonl")
    bad.write_text("\n".join(lines) + "\n")
    pool = read_pool(DataConfig(path=str(bad), image_column="image", id_column="id"))
    cfg = EmbedConfig(**{**CFG.__dict__, "engine": "local"})
    with pytest.raises(InputError, match="cannot read .*broken.png.* as an image"):
        embed_pool(pool, cfg, tmp_path / "err", progress=False)
    assert not list((tmp_path / "err").glob("*/shard-*.parquet"))  # nothing half-written
    skip = EmbedConfig(**{**cfg.__dict__, "on_bad_rows": "skip"})
    manifest = embed_pool(pool, skip, tmp_path / "skip", progress=False)
    assert manifest["rows"] == 5 and manifest["skipped_rows"] == 1 and manifest["skipped_ids"] == ["z"]


def test_missing_image_file_is_caught_before_embedding(image_pool_file):
    bad = image_pool_file.with_name("missing.jsonl")
    bad.write_text(json.dumps({"id": "q", "text": "t", "image": "nowhere.png"}) + "\n"
                   + json.dumps({"id": "r", "text": "fine", "image": "flower.png"}) + "\n")
    with pytest.raises(InputError, match="image file missing, first at row 0.*nowhere.png"):
        read_pool(DataConfig(path=str(bad), image_column="image", id_column="id"))
    pool = read_pool(DataConfig(path=str(bad), image_column="image", id_column="id"), skip_bad_rows=True)
    assert pool.ids.tolist() == ["r"] and pool.skipped == {"image file missing": 1}
