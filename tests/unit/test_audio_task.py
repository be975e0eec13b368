"""Fine-tuning a speech pool: the packaged GE2E as a Hugging Face audio classifier, and the audio
task (``finetune.task: classification`` on recordings without text)."""

import csv

import numpy as np
import pytest

pytest.importorskip("resemblyzer")

from ray_pipeline.config import DataConfig  # noqa: E402
from ray_pipeline.errors import InputError  # noqa: E402
from ray_pipeline.finetune.task import AudioClassification, saved_task, size, take, task_for  # noqa: E402
from ray_pipeline.io.pool import read_pool  # noqa: E402


@pytest.fixture(scope="module")
def ge2e_dir(tmp_path_factory):
    from ray_pipeline.io.ge2e import ge2e_path

    return ge2e_path(tmp_path_factory.mktemp("cache"))


def _fsdd_rows(shared_data, n_per_speaker=2):
    rows = list(csv.DictReader((shared_data / "fsdd" / "train.csv").open()))
    seen: dict = {}
    return [r for r in rows if seen.setdefault(r["speaker"], []).append(r) or len(seen[r["speaker"]]) <= n_per_speaker]


def test_partials_by_hand():
    # 2.5 s of voice at 16 kHz = 250 frames; resemblyzer cuts 160-frame partials every 1/1.3 s (about
    # 123 frames), keeping the last only if it covers 75%: frames [0, 160) and [123, 283) -> two
    from ray_pipeline.io.ge2e import GE2EFeatureExtractor

    t = np.arange(40000) / 16000
    voice = (0.3 * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(2 * np.pi * 3 * t))).astype(np.float32)
    out = GE2EFeatureExtractor(trim_silence=False)([voice, voice[:8000]], sampling_rate=16000, return_tensors="np")
    assert out["input_features"].shape == (2, 2, 160, 40)
    assert out["attention_mask"].tolist() == [[1, 1], [1, 0]]
    assert not out["input_features"][1, 1].any()  # the padding partial is zeros
    with pytest.raises(ValueError, match="16000 Hz"):
        GE2EFeatureExtractor()([voice], sampling_rate=8000)


def test_the_hugging_face_ge2e_is_resemblyzers_own_embedding(ge2e_dir, shared_data):
    # the model fine-tuning starts from gives, recording for recording, the vector resemblyzer's own
    # VoiceEncoder.embed_utterance(preprocess_wav(...)) gives (librosa's resampler there, soxr here)
    import torch
    from resemblyzer import VoiceEncoder, preprocess_wav
    from transformers import AutoFeatureExtractor, AutoModel

    from ray_pipeline.io.media import load_audio

    files = [str(shared_data / "fsdd" / r["audio"]) for r in _fsdd_rows(shared_data, 1)]
    model, fe = AutoModel.from_pretrained(ge2e_dir), AutoFeatureExtractor.from_pretrained(ge2e_dir)
    with torch.inference_mode():
        ours = model(**fe([load_audio(f, 16000, 30) for f in files], sampling_rate=16000,
                          return_tensors="pt")).pooler_output.numpy()
    enc = VoiceEncoder(device="cpu", verbose=False)
    ref = np.stack([enc.embed_utterance(preprocess_wav(f)) for f in files])
    assert ours.shape == (6, 256) and (ours * ref).sum(axis=1).min() > 0.995


def test_a_tuned_classifier_saves_reloads_and_says_its_task(ge2e_dir, tmp_path, shared_data):
    import torch

    task = task_for("classification", "audio")
    rows = _fsdd_rows(shared_data, 2)  # 2 recordings of each of the 6 speakers
    small = tmp_path / "pool.csv"
    small.write_text("id,audio,speaker\n" + "".join(f"{r['id']},{shared_data / 'fsdd' / r['audio']},{r['speaker']}\n"
                                                     for r in rows))
    pool = read_pool(DataConfig(path=str(small), audio_column="audio", label_column="speaker", id_column="id"))
    names = task.label_names(pool)
    model, fe = task.load(ge2e_dir, names)
    data = task.arrays(pool, names)
    assert size(data) == 12 and len(names) == 6 and data["max_seconds"] == 30.0 and data["audio"][0].startswith("/")
    batch = task.batch(fe, take(data, [0, 5, 9]), range(3), 64)
    assert batch["input_features"].shape[:3] == (3, 1, 160)
    assert batch["labels"].tolist() == data["labels"][[0, 5, 9]].tolist()
    out = model(**batch)
    out.loss.backward()  # the encoder is trained too, not only the head
    assert model.ge2e.lstm.weight_ih_l0.grad.abs().sum() > 0
    model.save_pretrained(tmp_path / "m")
    fe.save_pretrained(tmp_path / "m")
    assert isinstance(saved_task(str(tmp_path / "m")), AudioClassification)
    again, fe2 = task.load(str(tmp_path / "m"))
    with torch.inference_mode():
        model.eval()
        assert torch.allclose(again(**task.batch(fe2, data, range(4), 64, labels=False)).logits,
                              model(**task.batch(fe, data, range(4), 64, labels=False)).logits, atol=1e-5)
    said = task.predict(again, fe2, data["audio"][:2], 64, 0)
    assert [set(p) for p in said] == [{"label", "probability"}] * 2 and said[0]["label"] in names


def test_which_task_each_pool_gets():
    assert task_for("classification").modality == "text"
    assert task_for("classification", "audio").default_model == "ge2e"
    with pytest.raises(InputError, match="instruction tunes a causal LM on text"):
        task_for("instruction", "audio")
    assert task_for("classification", "image").default_model == "efficientnet-lite0"
    with pytest.raises(InputError, match="video samples is not supported yet"):
        task_for("classification", "video")


def test_a_pool_says_what_its_samples_are():
    from ray_pipeline.io.pool import Pool

    one = np.array(["x"], dtype=object)
    make = lambda **kw: Pool(ids=one, labels=None, embeddings=None, source="t", **{"texts": None, **kw})  # noqa: E731
    assert make(texts=one, audios=one).modality == "text"  # recordings beside text: a text model is tuned
    assert make(audios=one).modality == "audio" and make(videos=one).modality == "video"
    assert make(images=one, audios=one).modality == "audio+image" and make().modality == "none"
    assert make(audios=one).take(np.array([0])).max_seconds == 30.0


@pytest.mark.parametrize("speakers", [6, 2, 1])
def test_the_warm_started_head_is_the_linear_probe(ge2e_dir, tmp_path, shared_data, speakers):
    # LP-FT: before any step the classifier predicts what the proxy's logistic regression fit on the
    # same frozen vectors predicts, recording for recording (two labels: sklearn's single logit,
    # split; one label: that label), and a label the samples lack is never predicted
    import torch

    from ray_pipeline.select.boundary import fit_probe

    task = task_for("classification", "audio")
    rows = _fsdd_rows(shared_data, 3)
    names = sorted({r["speaker"] for r in rows})
    mine = [r for r in rows if r["speaker"] in names[:speakers]]
    small = tmp_path / "pool.csv"
    small.write_text("id,audio,speaker\n" + "".join(f"{r['id']},{shared_data / 'fsdd' / r['audio']},{r['speaker']}\n"
                                                   for r in mine))
    pool = read_pool(DataConfig(path=str(small), audio_column="audio", label_column="speaker", id_column="id"))
    model, fe = task.load(ge2e_dir, names)
    data = task.arrays(pool, names)
    assert task.warm_start(model, fe, data, batch_size=4)
    others = [str(shared_data / "fsdd" / r["audio"]) for r in _fsdd_rows(shared_data, 6)[::2]]
    new = {"audio": others, "max_seconds": 30.0}
    with torch.no_grad():
        model.eval()
        batch = task.batch(fe, new, range(len(others)), 0, labels=False)
        pred = model(**batch).logits.argmax(-1).numpy()
        x = model.embed(**batch).numpy()
        x_train = model.embed(**task.batch(fe, data, range(size(data)), 0, labels=False)).numpy()
    probe = fit_probe(x_train, data["labels"])
    expect = np.full(len(others), data["labels"][0]) if probe is None else probe.predict(x)
    assert pred.tolist() == expect.tolist() and set(pred) <= set(range(speakers))
