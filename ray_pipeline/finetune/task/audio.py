"""An audio classifier: ``finetune.task: classification`` on a pool of recordings without text.

The pretrained speech encoder with a classification head, through
``AutoModelForAudioClassification``: the packaged GE2E (``finetune.model: default``,
:mod:`ray_pipeline.io.ge2e`) or any Hugging Face audio model by directory or Hub id (wav2vec2,
HuBERT, WavLM, Whisper's encoder, AST), its own feature extractor in place of a tokenizer. The
recordings are decoded in each batch, at the extractor's sampling rate and cut at
``embed.max_seconds`` (``Pool.max_seconds``): a sweep never holds the pool's waves.
"""

from __future__ import annotations

from ...io.media import load_audio
from .base import label_tensor
from .media import MediaClassification


class AudioClassification(MediaClassification):
    """``AutoModelForAudioClassification`` over ``AutoFeatureExtractor`` batches (with the
    ``attention_mask`` where the extractor gives one)."""

    modality, processor, default_model = "audio", "feature_extractor", "ge2e"
    kind, sources, noun = "audio", "audios", "recordings"
    auto_model, auto_processor = "AutoModelForAudioClassification", "AutoFeatureExtractor"
    examples = "'default' (the packaged GE2E) or facebook/wav2vec2-base"

    def settings(self, pool) -> dict:
        return {"max_seconds": 30.0 if pool is None else pool.max_seconds}  # predict: 30 s of each

    def batch(self, fe, data: dict, idx, max_length: int, *, labels: bool = True) -> dict:
        rate = int(fe.sampling_rate)
        waves = [load_audio(data["audio"][i], rate, data["max_seconds"]) for i in idx]
        enc = dict(fe(waves, sampling_rate=rate, padding=True, return_attention_mask=True, return_tensors="pt"))
        return {**enc, **label_tensor(data, idx, labels)}
