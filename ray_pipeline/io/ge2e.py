"""The packaged speech model, GE2E, as a Hugging Face model that fine-tunes like any other.

resemblyzer ships the weights of a GE2E speaker encoder (Wan et al. 2018; a 3-layer LSTM over 40
mel bands, a linear layer to 256, ReLU, unit length) inside its wheel (``pretrained.pt``,
Apache-2.0). Here it takes the Hugging Face form, so that ``finetune.model: default`` on a speech
pool is loaded, tuned, saved and reloaded by the same calls as a wav2vec2 or HuBERT from the Hub:

- :class:`GE2EConfig` (``model_type: ge2e``);
- :class:`GE2EFeatureExtractor`: a 16 kHz recording -> resemblyzer's volume normalisation and
  long-silence trimming -> 40-band power mel frames -> 1.6 s partials (1.3 a second), as
  ``VoiceEncoder.embed_utterance`` cuts them; a batch is ``input_features`` (b, partials, 160, 40)
  and ``attention_mask`` (b, partials);
- :class:`GE2EModel`: each partial's embedding, averaged over a recording's partials, unit length
  (``embed_utterance`` exactly: the vectors the embedding stage computed);
- :class:`GE2EForAudioClassification`: a linear head on that vector.

:func:`register` adds them to ``AutoConfig``, ``AutoFeatureExtractor``, ``AutoModel`` and
``AutoModelForAudioClassification`` (in every process that loads one: import this module), and
:func:`ge2e_path` writes the packaged weights once as a safetensors directory under
``~/.cache/ray_pipeline`` (``RAY_PIPELINE_CACHE``). The mel partials are :mod:`.speech`'s, the
embedding stage's own (``embed.audio``), so the two never drift apart.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn
from transformers import (AutoConfig, AutoFeatureExtractor, AutoModel, AutoModelForAudioClassification, BatchFeature,
                          PretrainedConfig, PreTrainedModel, SequenceFeatureExtractor)
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPooling, SequenceClassifierOutput

from .packaged import UnitVectorHead, cached_model
from .speech import N_MELS, PARTIAL_FRAMES, RATE, MelPartials, import_resemblyzer

class GE2EConfig(PretrainedConfig):
    model_type = "ge2e"

    def __init__(self, n_mels: int = N_MELS, hidden_size: int = 256, num_hidden_layers: int = 3,
                 embedding_size: int = 256, initializer_range: float = 0.02, **kwargs):
        self.n_mels, self.hidden_size, self.num_hidden_layers = n_mels, hidden_size, num_hidden_layers
        self.embedding_size, self.initializer_range = embedding_size, initializer_range
        super().__init__(**kwargs)


class GE2EFeatureExtractor(SequenceFeatureExtractor):
    """Recordings (mono float waves at 16 kHz) -> ``input_features`` (b, p, 160, 40), the mel
    partials of each padded with zero partials to the batch's most, and ``attention_mask`` (b, p):
    1 on a recording's own partials.

    Example:
        >>> fe = GE2EFeatureExtractor()
        >>> t = np.arange(40000) / 16000
        >>> out = fe([np.sin(2 * np.pi * 220 * t).astype(np.float32) * 0.3, np.zeros(8000, np.float32) + 0.1],
        ...          sampling_rate=16000, return_tensors="np")
        >>> out["input_features"].shape, out["attention_mask"].tolist()
        ((2, 2, 160, 40), [[1, 1], [1, 0]])
    """

    model_input_names = ["input_features", "attention_mask"]

    def __init__(self, feature_size: int = N_MELS, sampling_rate: int = RATE, padding_value: float = 0.0,
                 trim_silence: bool = True, **kwargs):
        super().__init__(feature_size=feature_size, sampling_rate=sampling_rate, padding_value=padding_value,
                         **kwargs)
        self.trim_silence = trim_silence
        self._partials: Optional[MelPartials] = None

    def to_dict(self) -> dict:
        out = super().to_dict()
        out.pop("_partials", None)
        return out

    def __call__(self, raw_speech, sampling_rate: Optional[int] = None, return_tensors: Optional[str] = None,
                 **kwargs) -> BatchFeature:
        if sampling_rate is not None and sampling_rate != self.sampling_rate:
            raise ValueError(f"GE2E reads {self.sampling_rate} Hz audio; this is {sampling_rate} Hz: resample it first")
        if isinstance(raw_speech, np.ndarray) and raw_speech.ndim == 1:
            raw_speech = [raw_speech]
        if self._partials is None:
            self._partials = MelPartials(self.trim_silence)
        parts = [self._partials(np.asarray(w, dtype=np.float32)) for w in raw_speech]
        most = max(len(p) for p in parts)
        feats = np.zeros((len(parts), most, PARTIAL_FRAMES, self.feature_size), np.float32)
        mask = np.zeros((len(parts), most), np.int64)
        for i, p in enumerate(parts):
            feats[i, :len(p)], mask[i, :len(p)] = p, 1
        return BatchFeature({"input_features": feats, "attention_mask": mask}, tensor_type=return_tensors)


class GE2EPreTrainedModel(PreTrainedModel):
    config_class = GE2EConfig
    base_model_prefix = "ge2e"
    main_input_name = "input_features"

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, nn.LSTM):  # torch's own LSTM initialisation
            k = module.hidden_size ** -0.5
            for p in module.parameters():
                init.uniform_(p, a=-k, b=k)


class GE2EModel(GE2EPreTrainedModel):
    """``pooler_output``: (b, 256) unit vectors, each the mean of its recording's partial
    embeddings (``attention_mask``), normalised; partials run through the LSTM together."""

    def __init__(self, config: GE2EConfig):
        super().__init__(config)
        self.lstm = nn.LSTM(config.n_mels, config.hidden_size, config.num_hidden_layers, batch_first=True)
        self.linear = nn.Linear(config.hidden_size, config.embedding_size)
        self.relu = nn.ReLU()
        self.post_init()

    def forward(self, input_features: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                **kwargs) -> BaseModelOutputWithPooling:
        b, p = input_features.shape[:2]
        mask = (torch.ones((b, p), device=input_features.device) if attention_mask is None
                else attention_mask.to(input_features.dtype))
        _, (hidden, _) = self.lstm(input_features.reshape(b * p, *input_features.shape[2:]))
        raw = self.relu(self.linear(hidden[-1]))  # (b * p, 256), as VoiceEncoder.forward
        partial = nn.functional.normalize(raw, dim=1, eps=1e-12).reshape(b, p, -1)
        mean = (partial * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        return BaseModelOutputWithPooling(last_hidden_state=partial, pooler_output=nn.functional.normalize(mean, dim=1))


class GE2EForAudioClassification(GE2EPreTrainedModel):
    """A linear head (:class:`~ray_pipeline.io.packaged.UnitVectorHead`) on GE2E's unit vector;
    ``embed``: the vectors it reads (the embedding stage's)."""

    def __init__(self, config: GE2EConfig):
        super().__init__(config)
        self.ge2e = GE2EModel(config)
        self.head = UnitVectorHead(config.embedding_size, config.num_labels)
        self.post_init()

    def embed(self, input_features: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
              **kwargs) -> torch.Tensor:
        return self.ge2e(input_features, attention_mask).pooler_output

    def forward(self, input_features: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None, **kwargs) -> SequenceClassifierOutput:
        logits, loss = self.head(self.embed(input_features, attention_mask), labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)


def register() -> None:
    """GE2E in the Auto classes (idempotent), so ``from_pretrained`` of a ``ge2e`` directory works
    in this process."""
    try:
        AutoConfig.register("ge2e", GE2EConfig)
    except ValueError:  # registered already
        return
    AutoFeatureExtractor.register(GE2EConfig, GE2EFeatureExtractor)
    AutoModel.register(GE2EConfig, GE2EModel)
    AutoModelForAudioClassification.register(GE2EConfig, GE2EForAudioClassification)


def ge2e_path(cache: Optional[Path] = None) -> str:
    """The packaged GE2E as a Hugging Face directory (config, safetensors, feature extractor),
    written from resemblyzer's ``pretrained.pt`` once and reused."""

    def write(tmp: Path) -> None:
        resemblyzer = import_resemblyzer()
        state = torch.load(Path(resemblyzer.__file__).parent / "pretrained.pt", map_location="cpu")["model_state"]
        model = GE2EModel(GE2EConfig(architectures=["GE2EModel"]))
        loaded = model.load_state_dict({k: v for k, v in state.items() if not k.startswith("similarity_")})
        assert not loaded.missing_keys and not loaded.unexpected_keys, loaded
        model.save_pretrained(tmp, safe_serialization=True)
        GE2EFeatureExtractor().save_pretrained(tmp)

    return cached_model("ge2e", write, cache)


register()
