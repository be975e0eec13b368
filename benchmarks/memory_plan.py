"""The memory plan per GPU (``ray_pipeline.finetune.sizing``) for 0.5B, 8B and 70B causal LMs,
under the plans a user would try: full fine-tuning, LoRA, LoRA over ZeRO-3 workers, QLoRA.

The model shapes are the public configs of Qwen2.5-0.5B, Llama-3.1-8B and Llama-3.1-70B, written
out here (no hub is reached); the parameter counts come from empty "meta" models of them. Run as
``python -m benchmarks.memory_plan [--seq-len 2048] [--batch-size 1]``; prints a Markdown table.
"""

from __future__ import annotations

import argparse

from ray_pipeline.config import LoraSettings
from ray_pipeline.finetune.sizing import count_parameters, memory_plan

MODELS = {
    "Qwen2.5-0.5B": ("qwen2", dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                   num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                                   tie_word_embeddings=True)),
    "Llama-3.1-8B": ("llama", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                   num_attention_heads=32, num_key_value_heads=8, vocab_size=128256)),
    "Llama-3.1-70B": ("llama", dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                                    num_attention_heads=64, num_key_value_heads=8, vocab_size=128256)),
}
PLANS = [  # (name, use_lora, zero stage, workers, quantization)
    ("full, ZeRO-2, 1 GPU", False, 2, 1, "none"),
    ("full, ZeRO-3, 8 GPUs", False, 3, 8, "none"),
    ("LoRA r=16, 1 GPU", True, 2, 1, "none"),
    ("LoRA r=16, ZeRO-3, 8 GPUs", True, 3, 8, "none"),
    ("QLoRA r=16, 1 GPU", True, 2, 1, "4bit"),
]


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.memory_plan", description=__doc__.split("\n\n")[0])
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=1)
    args = p.parse_args()
    from transformers import AutoConfig

    sizes = {name: count_parameters(AutoConfig.for_model(kind, **kw), LoraSettings())
             for name, (kind, kw) in MODELS.items()}
    print(f"GB per GPU, bf16, gradient checkpointing on, micro-batch {args.batch_size} x {args.seq_len} tokens\n")
    print("| plan | " + " | ".join(f"{n} ({s.params / 1e9:.2f}B)" for n, s in sizes.items()) + " |")
    print("|---|" + "---:|" * len(sizes))
    for label, lora, zero, workers, quant in PLANS:
        cells = [memory_plan(s, precision="bf16", zero_stage=zero, workers=workers, batch_size=args.batch_size,
                             seq_len=args.seq_len, use_lora=lora, gradient_checkpointing=True,
                             quantization=quant)["total"] / 1e9 for s in sizes.values()]
        print(f"| {label} | " + " | ".join(f"{c:.1f}" for c in cells) + " |")


if __name__ == "__main__":
    main()
