"""Text encoders side by side: our embedding stage against sentence-transformers' own ways of
running the same model, on the same texts, in one run.

Same model (the packaged MiniLM, a sentence-transformers model), same texts, batch size and torch
threads; each leg loads its model inside its timing, as a user's run would:

- ``stage, local engine``: ``embed_pool`` in this process (shards written); its vectors are the
  reference of every cosine below;
- ``stage, Ray engine``: ``embed_pool`` through Ray Data actors (Ray already started; the actor's
  start, its imports and model load count; ``in-actor`` is the time inside the actor only);
- ``stage, bare AutoModel``: the stage on the same weights without ``modules.json``, i.e. the
  bare transformers path with ``embed.pooling: mean`` (what ``minilm`` ran through before);
- ``SentenceTransformer.encode``: one plain ``encode`` call over all texts (it sorts them by
  length and batches them itself);
- ``SentenceTransformer(backend="onnx")``: its ONNX backend, where it installs (it needs
  ``optimum-onnx``); otherwise the reason is recorded;
- ``ONNX Runtime, own export``: the model exported with ``torch.onnx.export`` (eager attention:
  traced with the default SDPA attention, the graph gave vectors up to 0.14 off in cosine here)
  and run by ``onnxruntime`` with mean pooling, where ``onnxruntime`` imports.

Every leg runs ``--rounds`` times, in turn; the fastest round is reported, every round's seconds
and the 1-minute load average beside it (other work shares the cores). Prints samples/s, the
ratio to the local engine and max |cosine - 1| to it; writes
``benchmarks/results/encoders-{cpu,gpu}.json`` with the machine.

    .venv/bin/python -m benchmarks.bench_encoders                  # banking77 train + test, tiled to 20,000
    .venv/bin/python -m benchmarks.bench_encoders --n 2000         # a quick look
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks._common import length_sorted_batches, machine, save

from ray_pipeline.config import EmbedConfig
from ray_pipeline.embed.stage import embed_pool, load_stage
from ray_pipeline.io.models import resolve
from ray_pipeline.io.pool import Pool

BANKING77 = Path(__file__).resolve().parents[2] / "shared" / "data" / "banking77"


def banking77_texts(n: int) -> np.ndarray:
    """train.csv + test.csv (13,083 texts), tiled to ``n``: (n,) object array."""
    import pandas as pd

    texts = np.concatenate([pd.read_csv(BANKING77 / f)["text"].astype(str).to_numpy(dtype=object)
                            for f in ("train.csv", "test.csv")])
    return np.tile(texts, -(-n // len(texts)))[:n]


def bare_copy(src: str, root: Path) -> str:
    """The model's files without ``modules.json``: a plain transformers directory."""
    out = root / "bare"
    out.mkdir()
    for f in Path(src).iterdir():
        if f.is_file() and f.name != "modules.json":
            (out / f.name).symlink_to(f)
    return str(out)


def stage_leg(pool: Pool, cfg: EmbedConfig, root: Path) -> tuple[float, np.ndarray, dict]:
    t0 = time.perf_counter()
    manifest = embed_pool(pool, cfg, root, progress=False)
    seconds = time.perf_counter() - t0
    _, x = load_stage(root / manifest["key"], pool.ids)
    return seconds, x, manifest


def st_leg(path: str, texts: list, batch_size: int, backend: str = "torch") -> tuple[float, np.ndarray]:
    from sentence_transformers import SentenceTransformer

    t0 = time.perf_counter()
    model = SentenceTransformer(path, device="cpu", backend=backend)
    x = model.encode(texts, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True,
                     show_progress_bar=False)
    return time.perf_counter() - t0, np.asarray(x, np.float32)


def ort_leg(path: str, texts: np.ndarray, batch_size: int, threads: int, root: Path) -> tuple[float, float, np.ndarray]:
    """(export seconds, run seconds including the session's creation, vectors)."""
    import onnxruntime as ort
    import torch
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    t0 = time.perf_counter()
    model = AutoModel.from_pretrained(path, attn_implementation="eager").eval()

    class Hidden(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.m(input_ids=input_ids, attention_mask=attention_mask,
                          token_type_ids=token_type_ids).last_hidden_state

    names = ["input_ids", "attention_mask", "token_type_ids"]
    example = tok(["a short one", "and a somewhat longer example sentence"], padding=True, return_tensors="pt")
    onnx_path = root / "model.onnx"
    torch.onnx.export(Hidden(model), tuple(example[k] for k in names), str(onnx_path), input_names=names,
                      output_names=["hidden"], dynamic_axes={k: {0: "batch", 1: "tokens"} for k in names + ["hidden"]},
                      opset_version=17, dynamo=False)
    export_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    session = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    out = np.empty((len(texts), model.config.hidden_size), np.float32)
    for idx in length_sorted_batches(np.fromiter((len(t) for t in texts), np.int64, len(texts)), batch_size):
        enc = tok([texts[i] for i in idx], padding=True, truncation=True, max_length=256, return_tensors="np")
        hidden = session.run(None, {k: enc[k].astype(np.int64) for k in names})[0]
        m = enc["attention_mask"][..., None].astype(np.float32)
        v = (hidden * m).sum(1) / np.maximum(m.sum(1), 1)
        out[idx] = v / np.linalg.norm(v, axis=1, keepdims=True)
    return export_s, time.perf_counter() - t0, out


def leg(seconds: float, x: np.ndarray, **extra) -> dict:
    """One leg's result, with the machine's 1-minute load average as it ended (others share the cores)."""
    import os

    return {"seconds": seconds, "x": x, "load": round(os.getloadavg()[0], 2), **extra}


def max_cos_dev(x: np.ndarray, ref: np.ndarray) -> float:
    cos = (x * ref).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(ref, axis=1)
    return float(np.abs(cos - 1).max())


def one_round(pool: Pool, cfg: EmbedConfig, path: str, batch_size: int, threads: int, root: Path) -> dict:
    """Every leg once, in this order, into fresh directories under ``root``: {name: leg}."""
    import ray

    root.mkdir(parents=True)
    texts = pool.texts
    legs: dict[str, dict] = {}
    seconds, x, _ = stage_leg(pool, EmbedConfig(**{**cfg.__dict__, "engine": "local"}), root / "local")
    legs["stage, local engine"] = leg(seconds, x)
    ray.init(include_dashboard=False, log_to_driver=False)
    try:
        seconds, x, manifest = stage_leg(pool, cfg, root / "ray")
        legs["stage, Ray engine"] = leg(seconds, x, in_actor_s=round(manifest["actor_plan"]["shard_seconds"], 2),
                                        actor_plan=manifest["actor_plan"])
    finally:
        ray.shutdown()
    bare = EmbedConfig(**{**cfg.__dict__, "engine": "local", "model": bare_copy(path, root)})
    seconds, x, _ = stage_leg(pool, bare, root / "bare")
    legs["stage, bare AutoModel (mean pooling, 128 tokens)"] = leg(seconds, x)
    legs["SentenceTransformer.encode"] = leg(*st_leg(path, list(texts), batch_size))
    try:
        legs["SentenceTransformer(backend='onnx')"] = leg(*st_leg(path, list(texts), batch_size, backend="onnx"))
    except (ImportError, OSError, ValueError, RuntimeError) as e:  # recorded, not hidden
        legs["SentenceTransformer(backend='onnx')"] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0]}"}
    try:
        import onnxruntime

        export_s, seconds, x = ort_leg(path, texts, batch_size, threads, root)
        legs[f"ONNX Runtime {onnxruntime.__version__}, own export"] = leg(seconds, x, export_s=round(export_s, 2))
    except ImportError as e:
        legs["ONNX Runtime, own export"] = {"error": f"ImportError: {e}"}
    print("  round: " + ", ".join(f"{k} {v['seconds']:.1f} s" for k, v in legs.items() if "seconds" in v), flush=True)
    return legs


def best_of(runs: list[dict]) -> dict:
    """A leg over the rounds: its fastest round (the cores are shared: the others were slowed by
    other work), every round's seconds and load beside it; the vectors of the first round."""
    if "error" in runs[0]:
        return runs[0]
    best = min(runs, key=lambda r: r["seconds"])
    return {**best, "x": runs[0]["x"], "seconds_per_round": [round(r["seconds"], 2) for r in runs],
            "load_per_round": [r["load"] for r in runs]}


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_encoders", description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=20_000, help="texts (banking77 train + test, tiled)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--shard-size", type=int, default=4096)
    p.add_argument("--threads", type=int, default=None, help="torch / onnxruntime threads (default: all cores)")
    p.add_argument("--rounds", type=int, default=2, help="every leg this many times, in turn; the fastest is reported")
    args = p.parse_args()

    import torch

    import sentence_transformers  # noqa: F401  imported once, before any timing (tens of seconds on a loaded CPU)

    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    texts = banking77_texts(args.n)
    pool = Pool(ids=np.array([f"s{i}" for i in range(args.n)], dtype=object), labels=None, embeddings=None,
                texts=texts, source="banking77 train + test")
    path = resolve("minilm")
    cfg = EmbedConfig(batch_size=args.batch_size, shard_size=args.shard_size, threads_per_actor=threads, device="cpu")
    print(f"{args.n:,} banking77 texts ({len(set(texts)):,} distinct), MiniLM, batch {args.batch_size}, "
          f"{threads} threads", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="bench_encoders_"))
    try:
        rounds = [one_round(pool, cfg, path, args.batch_size, threads, tmp / f"round{r}") for r in range(args.rounds)]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    legs = {name: best_of([r[name] for r in rounds]) for name in rounds[0]}

    base = legs["stage, local engine"]["seconds"]
    rows = {}
    print(f"\n{'':52s} {'seconds':>8s} {'samples/s':>10s} {'vs local':>9s} {'max|cos-1|':>11s}")
    for name, r in legs.items():
        if "error" in r:
            rows[name] = {"error": r["error"]}
            print(f"  {name:50s} {r['error']}")
            continue
        row = {"seconds": round(r["seconds"], 2), "samples_per_s": round(args.n / r["seconds"], 1),
               "speed_vs_local_engine": round(base / r["seconds"], 3),
               "max_abs_cos_minus_1": max_cos_dev(r["x"], legs["stage, local engine"]["x"])}
        row.update({k: v for k, v in r.items() if k not in ("seconds", "x", "load")})
        rows[name] = row
        print(f"  {name:50s} {row['seconds']:8.1f} {row['samples_per_s']:10.1f} {row['speed_vs_local_engine']:8.2f}x "
              f"{row['max_abs_cos_minus_1']:11.1e}  rounds {row['seconds_per_round']} s, load {row['load_per_round']}")
    payload = {"machine": machine(), "args": vars(args), "texts": "banking77 train.csv + test.csv (13,083), tiled to n",
               "distinct_texts": len(set(texts)), "legs": rows}
    print(f"wrote {save('encoders', payload)}")
    print(json.dumps({k: v.get("samples_per_s", v.get("error")) for k, v in rows.items()}, indent=1))


if __name__ == "__main__":
    main()
