"""Speech and video embedding: throughput on real speech, and peak memory on long files.

- Throughput: FSDD recordings (``../shared/data/fsdd``) through the speech encoder as the
  embedding stage runs it (:class:`~ray_pipeline.embed.audio.AudioEmbedder`, mini-batches of
  64, one torch thread), recordings/s, decoding and resampling included.
- Peak memory: in a fresh process each, the encoders loaded and warmed up on the file's first
  2 s (``before``: lazy imports and first calls), then the long file embedded (``peak``: the
  process's peak RSS, ``ru_maxrss``): a 10-minute recording (FSDD
  speech repeated, 8 kHz) with ``embed.max_seconds`` 30 (the default) and 600 (the whole file),
  and a 5-minute 320x240 H.264 clip with the default frame sampling and with 2 frames a second
  over all of it (600 frames). The decoders stream: the whole file is never in memory.

    .venv/bin/python -m benchmarks.bench_media                 # both
    .venv/bin/python -m benchmarks.bench_media --recordings 300
    .venv/bin/python -m benchmarks.bench_media --recordings 0    # memory only: results/media-memory-cpu.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks._common import machine, save

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def throughput(n: int) -> dict:
    import csv

    import torch

    from ray_pipeline.config import EmbedConfig
    from ray_pipeline.embed.audio import AudioEmbedder

    torch.set_num_threads(1)
    rows = list(csv.DictReader((SHARED / "fsdd" / "train.csv").open()))
    files = [str(SHARED / "fsdd" / r["audio"]) for r in rows[::max(1, len(rows) // n)][:n]]
    emb = AudioEmbedder(EmbedConfig(device="cpu"))
    emb({"audio": files[:8]})  # warm up (first FFT plans, the LSTM's first call)
    t0 = time.perf_counter()
    for lo in range(0, len(files), 64):
        emb({"audio": files[lo:lo + 64]})
    s = time.perf_counter() - t0
    return {"recordings": len(files), "seconds": s, "recordings_per_s": len(files) / s}


def long_audio(path: Path, minutes: float) -> Path:
    import soundfile as sf

    speech = np.concatenate([sf.read(str(p), dtype="float32")[0]
                             for p in sorted((SHARED / "fsdd" / "recordings").glob("*_jackson_*.wav"))[:60]])
    with sf.SoundFile(str(path), "w", samplerate=8000, channels=1) as f:
        for _ in range(int(np.ceil(minutes * 60 * 8000 / len(speech)))):
            f.write(speech)  # written piece by piece: this process never holds the whole file either
    return path


def long_video(path: Path, minutes: float) -> Path:
    import av
    from sklearn.datasets import load_sample_image

    img = load_sample_image("china.jpg")
    n = int(minutes * 60 * 10)
    with av.open(str(path), "w") as out:
        s = out.add_stream("libx264", rate=10)
        s.width, s.height, s.pix_fmt = 320, 240, "yuv420p"
        for i in range(n):
            x0 = int((i % 300) / 300 * (640 - 320))
            frame = np.ascontiguousarray(img[90:330, x0:x0 + 320])
            out.mux(s.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        out.mux(s.encode())
    return path


CHILD = """
import json, resource, sys, time
import torch; torch.set_num_threads(1)
from ray_pipeline.config import EmbedConfig
kind, path, opts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
cfg = EmbedConfig(device="cpu", **opts)
if kind == "audio":
    from ray_pipeline.embed.audio import AudioEmbedder as E
else:
    from ray_pipeline.embed.video import VideoEmbedder as E
emb = E(cfg)
import dataclasses
emb.cfg = dataclasses.replace(cfg, max_seconds=2.0, video_frames=2)  # warm up: lazy imports, first calls
emb({kind: [path]})
emb.cfg = cfg
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
t0 = time.perf_counter()
x = emb({kind: [path]})["embedding"]
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"before_mib": before, "peak_mib": peak, "seconds": time.perf_counter() - t0, "dim": x.shape[1]}))
"""


def memory(minutes_audio: float, minutes_video: float) -> dict:
    out = {}
    with tempfile.TemporaryDirectory() as d:
        wav = long_audio(Path(d) / "long.wav", minutes_audio)
        mp4 = long_video(Path(d) / "long.mp4", minutes_video)
        cases = {f"audio {minutes_audio:g} min, max_seconds 30": ("audio", wav, {}),
                 f"audio {minutes_audio:g} min, max_seconds 600": ("audio", wav, {"max_seconds": 600}),
                 f"video {minutes_video:g} min, 2 fps, 16 frames": ("video", mp4, {}),
                 f"video {minutes_video:g} min, 2 fps, 600 frames": ("video", mp4, {"video_frames": 600,
                                                                                 "max_seconds": 600})}
        for name, (kind, path, opts) in cases.items():
            r = subprocess.run([sys.executable, "-c", CHILD, kind, str(path), json.dumps(opts)],
                               capture_output=True, text=True, check=True)
            out[name] = {**json.loads(r.stdout.strip().splitlines()[-1]), "file_mib": path.stat().st_size / 2**20}
            print(f"  {name}: file {out[name]['file_mib']:.1f} MiB, RSS {out[name]['before_mib']:.0f} MiB after "
                  f"loading -> peak {out[name]['peak_mib']:.0f} MiB ({out[name]['seconds']:.1f} s)", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_media", description=__doc__.split("\n\n")[0])
    p.add_argument("--recordings", type=int, default=600)
    p.add_argument("--audio-minutes", type=float, default=10)
    p.add_argument("--video-minutes", type=float, default=5)
    args = p.parse_args()
    r = {}
    if args.recordings:
        r["throughput"] = t = throughput(args.recordings)
        print(f"  speech encoder: {t['recordings']} FSDD recordings in {t['seconds']:.1f} s "
              f"= {t['recordings_per_s']:.1f} recordings/s", flush=True)
    r["memory"] = memory(args.audio_minutes, args.video_minutes)
    name = "media" if args.recordings else "media-memory"
    print(f"wrote {save(name, {'machine': machine(), 'args': vars(args), 'results': r})}")


if __name__ == "__main__":
    main()
