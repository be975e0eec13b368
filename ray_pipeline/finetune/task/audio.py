"""An audio classifier: ``finetune.task: classification`` on a pool of recordings without text.

The pretrained speech encoder with a classification head, through
``AutoModelForAudioClassification``: the packaged GE2E (``finetune.model: default``,
:mod:`ray_pipeline.io.ge2e`) or any Hugging Face audio model by directory or Hub id (wav2vec2,
HuBERT, WavLM, Whisper's encoder, AST), its own feature extractor in place of a tokenizer. The
recordings travel to the trial workers as their sources (paths or bytes) and are decoded in each
batch, at the extractor's sampling rate and cut at ``embed.max_seconds`` (``Pool.max_seconds``):
a sweep never holds the pool's waves. Labels, score, loss and test values are the text
classifier's.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from ...errors import InputError
from ...io.media import load_audio
from ...io.models import loads_with
from .base import _load_kwargs, size
from .text import Classification


class AudioClassification(Classification):
    """``AutoModelForAudioClassification`` with a new head for the pool's labels, over
    ``AutoFeatureExtractor`` batches (``attention_mask`` where the extractor gives one)."""

    modality, processor = "audio", "feature_extractor"
    default_model = "ge2e"

    def arrays(self, pool, label_names: Optional[list] = None) -> dict:
        if pool.audios is None:
            raise InputError("fine-tuning a speech model needs the recordings: set data.audio_column")
        names, codes = self.codes(pool, label_names)
        return {"audio": list(pool.audios), "labels": codes, "label_names": names, "max_seconds": pool.max_seconds}

    def batch(self, fe, data: dict, idx, max_length: int, *, labels: bool = True) -> dict:
        import torch

        rate = int(fe.sampling_rate)
        waves = [load_audio(data["audio"][i], rate, data["max_seconds"]) for i in idx]
        enc = dict(fe(waves, sampling_rate=rate, padding=True, return_attention_mask=True, return_tensors="pt"))
        if labels:
            enc["labels"] = torch.as_tensor(np.asarray(data["labels"], dtype=np.int64)[np.asarray(idx, dtype=np.int64)])
        return enc

    def load(self, path: str, label_names: Optional[list] = None, *, precision: str = "fp32",
             quantization: str = "none", trust_remote_code: bool = False):
        from transformers import AutoFeatureExtractor, AutoModelForAudioClassification

        from ...io import ge2e  # noqa: F401  (registers the packaged model with the Auto classes)

        fe = AutoFeatureExtractor.from_pretrained(path, trust_remote_code=trust_remote_code)
        kw = _load_kwargs(precision, quantization, trust_remote_code)
        if label_names is None:  # a tuned classifier, with its own labels
            return AutoModelForAudioClassification.from_pretrained(path, **kw), fe
        return AutoModelForAudioClassification.from_pretrained(
            path, num_labels=len(label_names), id2label=dict(enumerate(label_names)),
            label2id={v: i for i, v in enumerate(label_names)}, ignore_mismatched_sizes=True, **kw), fe

    def warm_start(self, model, fe, data: dict, batch_size: int) -> bool:
        """LP-FT (Kumar et al., ICLR 2022): the head starts as the logistic regression (the linear
        probe of ``finetune.proxy``) fit on the frozen encoder's vectors of the trial's own
        samples, so fine-tuning begins where the probe ends instead of distorting the features
        with a random head's gradients. For a model that says what its head reads (``embed``,
        ``head_scale``: the packaged GE2E); every rank fits the same probe from the same samples."""
        import torch

        from ...select.boundary import fit_probe

        embed, head = getattr(model, "embed", None), getattr(model, "classifier", None)
        if embed is None or not isinstance(head, torch.nn.Linear):
            return False
        with torch.no_grad():
            x = np.concatenate([embed(**self.batch(fe, data, range(lo, min(lo + batch_size, size(data))), 0,
                                                   labels=False)).float().cpu().numpy()
                                for lo in range(0, size(data), batch_size)])
        y = np.asarray(data["labels"])
        w = np.zeros(tuple(head.weight.shape), np.float64)
        b = np.full(head.out_features, -20.0)  # a label the samples lack is never predicted
        probe = fit_probe(x, y)
        if probe is None:  # one label: predict it
            b[y[0]] = 0.0
        elif len(probe.classes_) == 2:  # sklearn's one logit z for the second class: split it +-z/2
            lo, hi = probe.classes_
            w[hi], w[lo] = probe.coef_[0] / 2, -probe.coef_[0] / 2
            b[hi], b[lo] = probe.intercept_[0] / 2, -probe.intercept_[0] / 2
        else:
            w[probe.classes_], b[probe.classes_] = probe.coef_, probe.intercept_
        with torch.no_grad():
            head.weight.copy_(torch.as_tensor(w / model.head_scale, dtype=head.weight.dtype))
            head.bias.copy_(torch.as_tensor(b, dtype=head.bias.dtype))
        return True

    def check_model(self, config, model: str) -> None:
        """A model ``AutoModelForAudioClassification`` has a head for (a new one is put on)."""
        if not loads_with(config, "AutoModelForAudioClassification"):
            raise InputError(f"finetune.model {model!r} (model_type {config.model_type!r}) has no audio-"
                             f"classification model in transformers (AutoModelForAudioClassification), and this "
                             f"pool's samples are recordings; name a speech model such as 'default' (the packaged "
                             f"GE2E) or facebook/wav2vec2-base, or give data.text_column to tune a text model")

    def predict(self, model, fe, chunk, max_length, max_new_tokens):
        """``chunk``: recordings (paths or bytes), each read up to 30 s."""
        enc = self.batch(fe, {"audio": list(chunk), "max_seconds": 30.0}, range(len(chunk)), max_length, labels=False)
        p, i = model(**enc).logits.softmax(-1).max(-1)
        return [{"label": model.config.id2label[int(j)], "probability": float(q)} for q, j in zip(p, i)]
