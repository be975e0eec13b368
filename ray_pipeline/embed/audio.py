"""The speech encoder of stage 2: a batch of recordings to L2-normalised vectors.

Two encoders, chosen once by ``embed.audio_model``:

- ``resemblyzer`` (default): the GE2E speaker encoder shipped inside the ``resemblyzer`` wheel
  (3-layer LSTM over 40 mel bands, 256-d, 16 kHz; Apache-2.0), offline. Each recording is
  volume-normalised and its long silences trimmed (resemblyzer's own ``preprocess_wav`` steps on
  the already resampled wave), cut into 1.6 s partials (1.3 a second), and the partials of the
  whole mini-batch run through the LSTM in one call; a recording's vector is the normalised mean
  of its partials' (``VoiceEncoder.embed_utterance``, batched). It encodes who speaks and how,
  more than what is said.
- any Hugging Face audio model by directory or Hub id (wav2vec2, HuBERT, WavLM, the Whisper
  encoder; resolved by :func:`~ray_pipeline.io.models.resolve`): ``AutoFeatureExtractor`` at the
  model's own rate, ``AutoModel``'s last hidden states (the encoder's, for an encoder-decoder)
  mean-pooled over time, one recording at a time (no padding enters the mean).

Recordings are decoded by :mod:`ray_pipeline.io.media` (streamed, cut at ``embed.max_seconds``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ..config import EmbedConfig
from ..errors import InputError
from ..io.media import load_audio
from ..io.speech import RATE, MelPartials, import_resemblyzer

log = logging.getLogger(__name__)

PACKAGED_AUDIO = "resemblyzer"
PARTIALS = 128  # 1.6 s partials per LSTM call: its states are (128, 160, 256) floats a layer, 21 MB


def check_audio_model(cfg: EmbedConfig) -> None:
    """Before any stage: ``embed.audio_model`` importable (resemblyzer) or resolvable to a directory
    with a ``config.json`` that ``AutoConfig`` loads and a feature extractor; reads no weights."""
    if cfg.audio_model == PACKAGED_AUDIO:
        import_resemblyzer()
        return
    from transformers import AutoConfig, AutoFeatureExtractor

    from ..io.models import resolve

    path = Path(resolve(cfg.audio_model, field="embed.audio_model"))
    shown = f"embed.audio_model {cfg.audio_model!r}"
    if not (path / "config.json").is_file():
        raise InputError(f"{shown} has no config.json in {path}; name 'resemblyzer' or a saved audio model")
    try:
        AutoConfig.from_pretrained(str(path), trust_remote_code=cfg.trust_remote_code)
        AutoFeatureExtractor.from_pretrained(str(path), trust_remote_code=cfg.trust_remote_code)
    except (ValueError, OSError, KeyError) as e:
        raise InputError(f"{shown} is not an audio model this stage can run (its config or feature extractor "
                         f"does not load: {' '.join(str(e).split())[:200]})") from None


class AudioEmbedder:
    """Callable: ``{"audio": (b,) paths or bytes, ...}`` -> plus ``"embedding"`` (b, dim) float32,
    unit rows. The model loads once here (once per Ray actor). ``rate``: the encoder's sampling
    rate, to which every recording is resampled. Raises :class:`~ray_pipeline.io.media.BadMedia`
    for a recording that cannot be used.

    Example:
        >>> from ray_pipeline.io.media import audio_blocks
        >>> emb = AudioEmbedder(EmbedConfig(device="cpu"))
        >>> t = np.arange(16000) / 16000
        >>> wave = (0.3 * np.sin(2 * np.pi * 220 * t) * np.sin(2 * np.pi * 3 * t)).astype(np.float32)
        >>> v = emb.embed_waves([wave])
        >>> v.shape, emb.rate, round(float(np.linalg.norm(v[0])), 4)
        ((1, 256), 16000, 1.0)
    """

    def __init__(self, cfg: EmbedConfig):
        from ..runtime.devices import torch_device

        self.cfg = cfg
        self.device = torch_device(cfg.device)
        if cfg.audio_model == PACKAGED_AUDIO:
            from resemblyzer import VoiceEncoder

            self.partials = MelPartials()  # imports resemblyzer, or says how to install it
            # The weights (resemblyzer/pretrained.pt) ship inside the wheel.
            self.model = VoiceEncoder(device=str(self.device), verbose=False)
            self.rate, self.dim, self.hf = RATE, 256, False
            return
        from transformers import AutoFeatureExtractor, AutoModel

        from ..io.models import resolve

        path = resolve(cfg.audio_model, field="embed.audio_model")
        self.extractor = AutoFeatureExtractor.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
        model = AutoModel.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
        if getattr(model.config, "is_encoder_decoder", False):
            model = model.get_encoder()  # Whisper: its encoder's states; the decoder needs text
        self.model = model.to(self.device).eval()
        self.rate = int(self.extractor.sampling_rate)
        config = model.config
        self.dim = int(getattr(config, "hidden_size", None) or getattr(config, "d_model"))
        self.hf = True

    def __call__(self, batch: dict) -> dict:
        waves = [load_audio(src, self.rate, self.cfg.max_seconds) for src in batch["audio"]]
        return {**batch, "embedding": self.embed_waves(waves)}

    def embed_waves(self, waves: list) -> np.ndarray:
        """Mono float32 waves at :attr:`rate` -> (b, dim) float32 unit rows."""
        return self._hf(waves) if self.hf else self._ge2e(waves)

    def _ge2e(self, waves: list) -> np.ndarray:
        import torch

        mels = [self.partials(wav) for wav in waves]  # (p, 160, 40) each
        owner = np.repeat(np.arange(len(waves)), [len(m) for m in mels])
        mels = np.concatenate(mels)
        with torch.inference_mode():  # the mini-batch's partials, PARTIALS at a time
            part = np.concatenate([self.model(torch.from_numpy(mels[lo:lo + PARTIALS]).to(self.device))
                                   .cpu().numpy() for lo in range(0, len(mels), PARTIALS)])
        out = np.zeros((len(waves), self.dim), np.float32)
        np.add.at(out, owner, part)
        out /= np.bincount(owner, minlength=len(waves))[:, None]
        return (out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)).astype(np.float32)

    def _hf(self, waves: list) -> np.ndarray:
        import torch

        out = np.zeros((len(waves), self.dim), np.float32)
        for j, wav in enumerate(waves):
            feats = self.extractor(wav, sampling_rate=self.rate, return_tensors="pt")
            feats = {k: v.to(self.device) for k, v in feats.items() if k in ("input_values", "input_features")}
            with torch.inference_mode():
                hidden = self.model(**feats).last_hidden_state  # (1, frames, dim)
            v = hidden[0].float().mean(dim=0)
            out[j] = torch.nn.functional.normalize(v, dim=0).cpu().numpy()
        return out
