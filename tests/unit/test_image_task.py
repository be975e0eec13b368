"""Fine-tuning an image pool: the packaged EfficientNet-Lite0 as a Hugging Face image classifier,
and the image task (``finetune.task: classification`` on images without text)."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from media_files import write_photo_crops  # noqa: E402

from ray_pipeline.config import DataConfig, EmbedConfig  # noqa: E402
from ray_pipeline.finetune.task import ImageClassification, saved_task, size, task_for  # noqa: E402
from ray_pipeline.io.pool import read_pool  # noqa: E402


@pytest.fixture(scope="module")
def effnet_dir(tmp_path_factory):
    from ray_pipeline.io.effnet import effnet_path

    return effnet_path(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    d = tmp_path_factory.mktemp("photos")
    rows = write_photo_crops(d, 4)
    (d / "pool.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return read_pool(DataConfig(path=str(d / "pool.jsonl"), image_column="image", label_column="photo",
                                id_column="id"))


def test_the_hugging_face_efficientnet_is_the_embedding_stages_encoder(effnet_dir, photos):
    import torch
    from transformers import AutoImageProcessor, AutoModel

    from ray_pipeline.embed.encoders import ImageEmbedder, load_image

    model, proc = AutoModel.from_pretrained(effnet_dir).eval(), AutoImageProcessor.from_pretrained(effnet_dir)
    task = task_for("classification", "image")
    with torch.inference_mode():
        ours = model(**task.batch(proc, task.arrays(photos), range(len(photos)), 0, labels=False)).pooler_output
    ref = ImageEmbedder(EmbedConfig(device="cpu")).embed_pixels(np.stack([load_image(s, 224) for s in photos.images]))
    assert photos.modality == "image" and np.abs(ours.numpy() - ref).max() < 1e-4


def test_an_image_classifier_warm_starts_trains_saves_and_predicts(effnet_dir, photos, tmp_path):
    import torch

    from ray_pipeline.select.boundary import fit_probe

    task = task_for("classification", "image")
    names = task.label_names(photos)
    model, proc = task.load(effnet_dir, names)
    data = task.arrays(photos, names)
    assert size(data) == 8 and names == ["china", "flower"]
    assert task.warm_start(model, proc, data, batch_size=4)
    model.eval()
    with torch.no_grad():
        batch = task.batch(proc, data, range(8), 0)
        x = model.embed(**batch).numpy()
        assert model(**batch).logits.argmax(-1).tolist() == fit_probe(x, data["labels"]).predict(x).tolist()
    model.train()
    out = model(**task.batch(proc, data, [0, 5], 0))
    out.loss.backward()
    assert model.effnet.net._conv_stem.weight.grad.abs().sum() > 0  # the encoder is tuned, not only the head
    model.save_pretrained(tmp_path / "m")
    proc.save_pretrained(tmp_path / "m")
    assert isinstance(saved_task(str(tmp_path / "m")), ImageClassification)
    again, proc2 = task.load(str(tmp_path / "m"))
    said = task.predict(again.eval(), proc2, data["image"][:3], 0, 0)
    assert [p["label"] for p in said] == [names[i] for i in data["labels"][:3]]
