"""Shared by the benchmarks: the machine's description, peak-memory sampling, result files."""

from __future__ import annotations

import json
import os
import platform
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import psutil

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    """CPU model, cores, memory, GPU (if torch sees one) and library versions."""
    import faiss
    import numpy
    import torch

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / 2 ** 30, 1),
            "gpu": gpu, "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "faiss": faiss.__version__, "numpy": numpy.__version__}


class PeakRSS:
    """Samples this process's resident memory every 5 ms; ``peak_gib`` after the block."""

    def __init__(self):
        self.peak = 0
        self._stop = threading.Event()

    def _run(self):
        proc = psutil.Process()
        while not self._stop.is_set():
            self.peak = max(self.peak, proc.memory_info().rss)
            time.sleep(0.005)

    def __enter__(self):
        self.peak = psutil.Process().memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    @property
    def peak_gib(self) -> float:
        return self.peak / 2 ** 30


@contextmanager
def timed(results: dict, name: str):
    """Time (s) and peak RSS (GiB) of the block into results[name + '_s'] / [name + '_peak_gib']."""
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        yield
        results[name + "_s"] = round(time.perf_counter() - t0, 4)
    results[name + "_peak_gib"] = round(mem.peak_gib, 3)


def save(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    tag = "gpu" if payload.get("machine", {}).get("gpu") else "cpu"
    path = RESULTS / f"{name}-{tag}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def embed_texts(texts, cfg, *, progress: bool = True):
    """The obvious alternative to the embedding stage: every text through one in-process
    ``TextEmbedder``, length-sorted batches, nothing written; (n, h) float32 rows in input order."""
    import numpy as np
    from tqdm.auto import tqdm

    from ray_pipeline.embed.encoders import TextEmbedder

    emb = TextEmbedder(cfg)
    out = np.empty((len(texts), emb.dim), dtype=np.float32)
    batches = length_sorted_batches(np.fromiter((len(t) for t in texts), np.int64, len(texts)), cfg.batch_size)
    for idx in tqdm(batches, desc="embed", unit="batch", disable=not progress):
        out[idx] = emb({"text": texts[idx]})["embedding"]
    return out


def length_sorted_batches(lengths, batch_size: int) -> list:
    """Row indices in batches of similar length (longest first), so padding is minimal."""
    import numpy as np

    order = np.argsort(-np.asarray(lengths), kind="stable")
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
