"""LoRA against full fine-tuning of SmolLM2-135M-Instruct: steps per second and peak memory.

The same model, optimizer (AdamW), batches (chat-template renderings of the Alpaca demo set as
conversations, loss on the assistant turns, ``ray_pipeline.finetune.task.CausalLM.batch``) and steps;
the one difference is ``finetune.lora`` (PEFT adapters on every linear layer, rank 16, the
default) against every weight trained. Each mode runs in its own process, so its peak resident
memory (CPU) or peak allocated GPU memory is its own. The training loop is the model's, without
Ray Train and DeepSpeed around it (ZeRO-0 on a CPU adds nothing to either figure).

    .venv/bin/python -m benchmarks.bench_lora                       # batch 8, 128 tokens, 10 steps
    .venv/bin/python -m benchmarks.bench_lora --batch-size 16 --max-length 256 --steps 20
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from benchmarks._common import machine, save

ROOT = Path(__file__).resolve().parents[1]  # the repository root: the child runs as -m benchmarks.bench_lora
SHARED = ROOT.parent / "shared" / "data"
LORA_DROPOUT = 0.0  # config.LoraSettings' default


def one_mode(mode: str, batch_size: int, max_length: int, steps: int, warmup: int, dropout: float) -> dict:
    import resource

    import torch

    from ray_pipeline.config import LoraSettings
    from ray_pipeline.finetune.task import CausalLM
    from ray_pipeline.io.models import smollm2_path

    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = json.loads((SHARED / "instruct" / "dataflex_alpaca_en_demo.json").read_text())
    chats = [[{"role": "user", "content": (r["instruction"] + "\n" + r["input"]).strip()},
              {"role": "assistant", "content": r["output"]}] for r in rows]
    task = CausalLM()
    model, tok = task.load(smollm2_path())
    if mode == "lora":
        model = task.with_lora(model, LoraSettings(lora_dropout=dropout))
    model.to(device).train()
    loaded = (torch.cuda.memory_allocated() / 2 ** 30 if device == "cuda"
              else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    data = {"chats": chats}
    times = []
    for step in range(warmup + steps):
        idx = [(step * batch_size + j) % len(chats) for j in range(batch_size)]
        batch = {k: v.to(device) for k, v in task.batch(tok, data, idx, max_length).items()}
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if step >= warmup:
            times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() / 2 ** 30 if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20)
    return {"mode": mode, "device": device, "seconds_per_step": sum(times) / len(times),
            "steps_per_s": len(times) / sum(times), "peak_gib": peak,
            "loaded_gib": loaded, "training_gib": peak - loaded, "peak_of": "GPU allocated" if device == "cuda"
            else "process RSS", "trainable_params": sum(p.numel() for p in params),
            "all_params": sum(p.numel() for p in model.parameters()), "last_loss": float(loss)}


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_lora", description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--dropout", type=float, default=LORA_DROPOUT, help="finetune.lora.lora_dropout")
    p.add_argument("--mode", choices=["full", "lora"], help=argparse.SUPPRESS)  # one mode, in a child process
    args = p.parse_args()
    if args.mode:
        print(json.dumps(one_mode(args.mode, args.batch_size, args.max_length, args.steps, args.warmup, args.dropout)))
        return
    results = {}
    for mode in ("full", "lora"):
        cmd = [sys.executable, "-m", "benchmarks.bench_lora", "--mode", mode, "--batch-size", str(args.batch_size),
               "--max-length", str(args.max_length), "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--dropout", str(args.dropout)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT).stdout
        results[mode] = json.loads(out.strip().splitlines()[-1])
        r = results[mode]
        print(f"{mode:5s}: {r['seconds_per_step']:.2f} s/step ({r['steps_per_s']:.3f} steps/s), peak {r['peak_gib']:.2f} "
              f"GiB ({r['peak_of']}; {r['training_gib']:.2f} GiB above the loaded model's {r['loaded_gib']:.2f}), "
              f"{r['trainable_params']:,} of {r['all_params']:,} weights trained", flush=True)
    full, lora = results["full"], results["lora"]
    print(f"\nLoRA / full: {lora['steps_per_s'] / full['steps_per_s']:.2f}x the steps per second, "
          f"{lora['peak_gib'] / full['peak_gib']:.2f}x the peak memory "
          f"({lora['training_gib'] / max(full['training_gib'], 1e-9):.2f}x the memory training adds), "
          f"{lora['trainable_params'] / full['trainable_params']:.4f}x the trained weights")
    print(f"wrote {save('lora', {'machine': machine(), 'args': vars(args), 'results': results})}")


if __name__ == "__main__":
    main()
