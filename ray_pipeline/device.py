"""The device, decided once per process.

Nothing here touches CUDA at import time: the CPU path must import and run on a machine with
no GPU and no CUDA libraries.
"""

from __future__ import annotations

import logging

from .errors import ConfigError

log = logging.getLogger(__name__)


def torch_device(requested: str = "auto"):
    """``"auto"`` -> ``cuda`` where torch sees a GPU, else ``cpu``; ``"cuda"`` with none is an error."""
    import torch

    if requested == "cpu":
        return torch.device("cpu")
    has_cuda = torch.cuda.is_available()
    if requested == "cuda" and not has_cuda:
        raise ConfigError("device 'cuda' was asked for but torch sees no GPU; use 'auto' or 'cpu'")
    return torch.device("cuda" if has_cuda else "cpu")


def faiss_gpus(requested: str = "auto") -> int:
    """How many GPUs faiss k-means should use: faiss's own count under ``"auto"``, 0 for ``"never"``.

    faiss-gpu imports on a CPU machine and reports 0 GPUs; faiss-cpu has no
    ``get_num_gpus`` at all in some builds.
    """
    if requested == "never":
        return 0
    import faiss

    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get is not None else 0
