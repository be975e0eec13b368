"""The devices of a run, decided once and passed down.

:func:`decide` looks at the machine once (as faiss's ``contrib/clustering.py`` turns ``ngpu=-1``
into ``faiss.get_num_gpus()`` and picks ``DatasetAssignGPU`` or ``DatasetAssign``) and returns a
small frozen :class:`Devices` that the stages receive whole; nothing below asks the hardware again.
Nothing here touches CUDA at import time: the CPU path imports and runs on a machine with no GPU
and no CUDA libraries.

Where work runs in Ray actors or tasks on other nodes (embedding actors, fine-tuning workers), the
resources they are *scheduled* with decide: a worker given a GPU uses it. That choice is made once
too, by the plans in ``embed.actor_plan`` and ``tune.plan_resources``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from ..config import Config
from ..errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Devices:
    """select: the torch device of the selection kernels (``"cpu"`` or ``"cuda"``).
    faiss_gpus: GPUs faiss k-means trains and assigns on (0: the CPU)."""

    select: str = "cpu"
    faiss_gpus: int = 0

    def torch(self):
        import torch

        return torch.device(self.select)


def decide(cfg: Config) -> Devices:
    """The driver's devices for this run, from ``select.device`` and ``cluster.gpu``.

    Example:
        >>> decide(Config.from_dict({"select": {"device": "cpu"}, "cluster": {"gpu": "never"}}))
        Devices(select='cpu', faiss_gpus=0)
    """
    devices = Devices(select=torch_device(cfg.select.device).type, faiss_gpus=faiss_gpus(cfg.cluster.gpu))
    log.debug("devices: %s", devices)
    return devices


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
