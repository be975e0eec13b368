"""The video encoder of stage 2: a clip is the mean of its sampled frames' image vectors.

Frames are taken at ``embed.video_fps`` (default 2 a second, as NeMo Curator samples clips) from
the clip's start, at most ``embed.video_frames`` and none after ``embed.max_seconds``
(:func:`ray_pipeline.io.media.video_frames`), each through the image encoder
(:class:`~ray_pipeline.embed.encoders.ImageEmbedder`, the packaged EfficientNet-Lite0), and the
unit frame vectors averaged and normalised again: (1280,). With ``embed.video_audio`` the clip's
audio track also goes through the speech encoder and the two are fused (``[v, a] / sqrt(2)``;
a clip without sound keeps zeros in the audio part).
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from ..config import EmbedConfig
from ..io.media import BadMedia, load_audio, video_frames
from .audio import AudioEmbedder
from .encoders import ImageEmbedder, fuse, image_pixels


class VideoEmbedder:
    """Callable: ``{"video": (b,) paths or bytes, ...}`` -> plus ``"embedding"`` (b, dim) float32,
    unit rows; dim 1280, or 1280 + the speech encoder's with ``embed.video_audio``. Encoders may be
    passed in to share them with the image and audio columns of the same actor.

    Example:
        >>> import av, tempfile
        >>> path = tempfile.NamedTemporaryFile(suffix=".mp4").name
        >>> with av.open(path, "w") as out:
        ...     s = out.add_stream("mpeg4", rate=10); s.width = s.height = 64; s.pix_fmt = "yuv420p"
        ...     for i in range(10):
        ...         img = np.full((64, 64, 3), 25 * i, np.uint8)
        ...         out.mux(s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        ...     out.mux(s.encode())
        >>> emb = VideoEmbedder(EmbedConfig(device="cpu"))  # doctest: +ELLIPSIS
        Loaded pretrained weights for efficientnet-lite0
        >>> emb({"video": [path]})["embedding"].shape
        (1, 1280)
    """

    def __init__(self, cfg: EmbedConfig, image: Optional[ImageEmbedder] = None,
                 audio: Optional[AudioEmbedder] = None):
        self.cfg = cfg
        self.image = image or ImageEmbedder(cfg)
        self.audio = (audio or AudioEmbedder(cfg)) if cfg.video_audio else None
        self.dim = self.image.dim + (self.audio.dim if self.audio else 0)

    def embed_one(self, source) -> np.ndarray:
        """One clip -> (dim,) float32 unit vector; :class:`BadMedia` if it cannot be used."""
        cfg = self.cfg
        frames = video_frames(source, cfg.video_fps, cfg.video_frames, cfg.max_seconds, cfg.image_size)
        step = cfg.batch_size  # frames per forward pass: the activations of a batch, not of the clip
        vecs = np.concatenate([self.image.embed_pixels(np.stack([image_pixels(f) for f in frames[lo:lo + step]]))
                               for lo in range(0, len(frames), step)])
        v = vecs.mean(axis=0, keepdims=True)
        v /= max(float(np.linalg.norm(v)), 1e-12)
        if self.audio is None:
            return v[0]
        try:
            a = self.audio.embed_waves([load_audio(source, self.audio.rate, cfg.max_seconds)])
        except BadMedia:  # no audio track, or a silent one: the clip is its frames
            a = np.zeros((1, self.audio.dim), np.float32)
        return fuse(v, a)[0]

    def __call__(self, batch: dict) -> dict:
        return {**batch, "embedding": np.stack([self.embed_one(src) for src in batch["video"]])}
