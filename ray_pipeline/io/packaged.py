"""What the packaged encoders share in their Hugging Face form (``io.ge2e``, ``io.effnet``): the
classification head (a linear layer on the encoder's unit vector) and the cache directory each is
written to once."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn


def cached_model(name: str, write: Callable[[Path], None], cache: Optional[Path] = None) -> str:
    """The directory ``name`` under ``cache`` (``RAY_PIPELINE_CACHE``, else ``~/.cache/ray_pipeline``):
    made by ``write(tmp)`` into a temporary directory beside it the first time, then renamed, so a
    half-written model is never seen; reused afterwards."""
    cache = cache or Path(os.environ.get("RAY_PIPELINE_CACHE", Path.home() / ".cache" / "ray_pipeline"))
    out = cache / name
    if (out / "config.json").is_file():
        return str(out)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache))
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing half-written is left in the cache
        raise
    os.replace(tmp, out)
    return str(out)


class UnitVectorHead(nn.Module):
    """A linear layer on unit vectors (dim ``d``) scaled by sqrt(d), so that a freshly initialised
    head sees inputs of unit variance per dimension; cross-entropy loss when labels are given.
    ``scale`` is what ``Task.warm_start`` divides a probe's weights by.

    Example:
        >>> head = UnitVectorHead(4, 3)
        >>> logits, loss = head(torch.nn.functional.normalize(torch.ones(2, 4), dim=1), torch.tensor([0, 2]))
        >>> tuple(logits.shape), head.scale, loss.ndim
        ((2, 3), 2.0, 0)
    """

    def __init__(self, dim: int, num_labels: int):
        super().__init__()
        self.classifier = nn.Linear(dim, num_labels)
        self.scale = dim ** 0.5

    def forward(self, vectors: torch.Tensor, labels: Optional[torch.Tensor] = None):
        logits = self.classifier(vectors * self.scale)
        return logits, None if labels is None else nn.functional.cross_entropy(logits.float(), labels)
