"""The two training engines on the same data: Hugging Face ``Trainer`` inside Ray Train
(``finetune.train.engine: trainer``) against the hand-written DeepSpeed loop (``loop``).

SmolLM2-135M-Instruct with LoRA (the instruction task's defaults: rank 16 on every linear layer)
on the same 800 chat samples of GPTeacher's toolformer file in ../shared/data/instruct (MIT; each
record as a user turn, instruction + input, and an assistant turn, the output; loss on the
assistant turn), validated on 100 other samples of it. Each engine runs the project's real
per-worker function (``finetune.train.train_loop_per_worker``) in a one-worker ``TorchTrainer``
on the CPU (ZeRO-0, fp32) or a GPU (ZeRO-2, bf16), for the same steps, batch and seed, in one
Ray session; it evaluates once, after the last step. Figures per engine: steps/s of training (the
worker's own clock, from the first step to the end of the evaluation), the whole fit's wall time
(model loading and DeepSpeed's set-up included), the worker's peak resident memory, and the
validation loss after the steps. The engines draw their batches in different orders (the loop's
seeded permutation, the Trainer's seeded sampler), so equal validation losses are equal within
that noise, not to the last digit.

    .venv/bin/python -m benchmarks.bench_trainer                     # 16 steps of 4 x 128 tokens
    .venv/bin/python -m benchmarks.bench_trainer --steps 32 --batch-size 8
    .venv/bin/python -m benchmarks.bench_trainer --order trainer,loop   # the Trainer first
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks._common import machine, save

ROOT = Path(__file__).resolve().parents[1]
GPTEACHER = ROOT.parent / "shared" / "data" / "instruct" / "gpteacher_toolformer_dedupe.json"


def chats(n_train: int, n_val: int, seed: int) -> tuple[dict, dict]:
    """(train, validation) arrays of the instruction task (``{"chats": [...]}``): a seeded draw of
    disjoint records of the GPTeacher file, never its first rows."""
    rows = json.loads(GPTEACHER.read_text())
    pick = np.random.default_rng(seed).permutation(len(rows))[:n_train + n_val]
    conv = [[{"role": "user", "content": (rows[i]["instruction"] + "\n" + rows[i]["input"]).strip()},
             {"role": "assistant", "content": rows[i]["output"]}] for i in pick]
    return {"chats": conv[:n_train]}, {"chats": conv[n_train:]}


def one_engine(engine: str, train: dict, val: dict, args, use_gpu: bool, out: Path) -> dict:
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from ray_pipeline.config import FinetuneConfig, ResourceSettings, TrainSettings
    from ray_pipeline.finetune.train import TrialLoop, train_loop_per_worker
    from ray_pipeline.io.models import smollm2_path

    ft = FinetuneConfig(task="instruction", resources=ResourceSettings(threads_per_worker=args.threads),
                        train=TrainSettings(engine=engine, lr=2e-4, batch_size=args.batch_size, max_steps=args.steps,
                                            eval_every=args.steps, eval_batch_size=16, max_length=args.max_length,
                                            patience=1))
    loop = TrialLoop(finetune=ft, seed=args.seed, model_path=smollm2_path(), label_names=None, train=train, eval=val,
                     use_gpu=use_gpu, steps=args.steps, best_model_dir=str(out / engine / "best"))
    t0 = time.perf_counter()
    result = TorchTrainer(train_loop_per_worker, train_loop_config={"loop": loop},
                          scaling_config=ray.train.ScalingConfig(num_workers=1, use_gpu=use_gpu,
                                                                 resources_per_worker={"CPU": 1}),
                          torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
                          run_config=ray.train.RunConfig(name=engine, storage_path=str(out / "store"))).fit()
    wall = time.perf_counter() - t0
    m = result.metrics
    return {"engine": engine, "steps": int(m["step"]), "steps_per_s": m["step"] / m["train_seconds"],
            "train_seconds": m["train_seconds"], "fit_wall_s": wall, "peak_rss_gib": m["peak_rss_gib"],
            "eval_loss": m["eval_loss"], "train_loss": m["train_loss"], "tokens_per_s": m["tokens_per_s"]}


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_trainer", description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=800)
    p.add_argument("--validation", type=int, default=100)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--threads", type=int, default=1, help="torch threads in the worker")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--order", choices=["loop,trainer", "trainer,loop"], default="loop,trainer",
                   help="which engine runs first (on a loaded machine, to see the order's effect)")
    args = p.parse_args()

    import ray
    import torch

    use_gpu = torch.cuda.is_available()
    train, val = chats(args.samples, args.validation, args.seed)
    results = {}
    ray.init(num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory(prefix="bench-trainer-") as d:
            for engine in args.order.split(","):
                r = results[engine] = one_engine(engine, train, val, args, use_gpu, Path(d))
                print(f"{engine:8s}: {r['steps_per_s']:.3f} steps/s ({r['tokens_per_s']:.0f} tokens/s), fit "
                      f"{r['fit_wall_s']:.1f} s, peak RSS {r['peak_rss_gib']:.2f} GiB, validation loss "
                      f"{r['eval_loss']:.4f} after {r['steps']} steps", flush=True)
    finally:
        ray.shutdown()
    lo, hf = results["loop"], results["trainer"]
    print(f"\ntrainer / loop: {hf['steps_per_s'] / lo['steps_per_s']:.2f}x the steps per second, "
          f"{hf['fit_wall_s'] / lo['fit_wall_s']:.2f}x the fit's wall time, "
          f"{hf['peak_rss_gib'] / lo['peak_rss_gib']:.2f}x the peak RSS, validation loss "
          f"{hf['eval_loss']:.4f} vs {lo['eval_loss']:.4f} ({hf['eval_loss'] - lo['eval_loss']:+.4f})")
    print(f"wrote {save('trainer' if args.order == 'loop,trainer' else 'trainer-trainer-first', {'machine': machine(), 'args': vars(args), 'results': results})}")


if __name__ == "__main__":
    main()
