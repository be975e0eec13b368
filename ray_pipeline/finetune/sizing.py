"""How much GPU memory one fine-tuning worker needs, estimated before the sweep starts.

:func:`count_parameters` counts a model's parameters (all, and those LoRA would train) on an
empty "meta" model built from its ``config.json`` (``accelerate.init_empty_weights``: no weight is
read, an 8B model takes about 3 s); :func:`memory_plan` turns the counts, the training precision,
the ZeRO stage, the workers per trial, the micro-batch and the sequence length into bytes per GPU:

- weights: P x bytes per weight (4 fp32, 2 bf16/fp16, about 0.55 for a 4-bit base), divided over
  the workers under ZeRO-3;
- gradients: T x bytes per weight, divided over the workers from ZeRO-2;
- optimizer: T x 12 bytes with mixed precision (an fp32 master copy, Adam's two moments), T x 8
  in fp32; divided over the workers from ZeRO-1;
- activations: per layer and sample, about 34 s h bytes in 16-bit (Korthikanti et al. 2022,
  without the attention scores that fused attention does not keep), or 2 s h with gradient
  checkpointing (the layer inputs) plus one layer's full set; times 2 in fp32; and the logits,
  b s V x 4 bytes twice (the fp32 loss and its gradient);
- 1 GiB for the CUDA context and the allocator's slack.

P: all parameters, T: the trained ones (all, or the LoRA adapters and a classifier's head), s:
tokens per sample, b: samples per micro-batch, h: hidden size, V: vocabulary. An estimate, good
to tell 20 GB from 200 GB; the real peak depends on kernels and fragmentation.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Optional

from ..config import Config
from ..errors import InputError

log = logging.getLogger(__name__)

GiB = 1024 ** 3
BYTES = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "4bit": 0.55}


@dataclass(frozen=True)
class ModelSize:
    """params: all parameters; lora: those LoRA adapters would add (the ones trained with LoRA);
    head: a new classifier head's (trained whole under LoRA too); hidden, layers, vocab: from the
    model's config."""

    params: int
    lora: int
    head: int
    hidden: int
    layers: int
    vocab: int


def count_parameters(config, lora=None, num_labels: Optional[int] = None) -> ModelSize:
    """The parameter counts of the model ``config`` (a transformers ``PretrainedConfig``) describes,
    a causal LM, or a sequence classifier of ``num_labels`` labels; ``lora``: LoRA settings
    (``config.LoraSettings``) whose adapters are counted, on every linear layer but the output
    (``all-linear``) or on the named ``target_modules``."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    with init_empty_weights():
        if num_labels is None:
            model = AutoModelForCausalLM.from_config(config)
        else:
            config = copy.deepcopy(config)
            config.num_labels = num_labels
            model = AutoModelForSequenceClassification.from_config(config)
    model.tie_weights()  # tied input and output embeddings are one tensor (not tied on meta by itself)
    out_names = {"lm_head", "score", "classifier"}
    targets = None if lora is None or tuple(lora.target_modules) == ("all-linear",) else set(lora.target_modules)
    adapters = head = 0
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in out_names or name.startswith("classifier") or name.startswith("score"):
            head += sum(p.numel() for p in module.parameters(recurse=False)) if num_labels is not None else 0
            continue
        if lora is not None and isinstance(module, torch.nn.Linear) and (targets is None or leaf in targets):
            adapters += lora.r * (module.in_features + module.out_features)
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", 0)
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", 0)
    return ModelSize(params=sum(p.numel() for p in model.parameters()), lora=adapters, head=head, hidden=hidden,
                     layers=layers, vocab=getattr(config, "vocab_size", 0))


def memory_plan(size: ModelSize, *, precision: str, zero_stage: int, workers: int, batch_size: int,
                seq_len: int, use_lora: bool, gradient_checkpointing: bool, quantization: str = "none",
                causal: bool = True) -> dict:
    """Bytes per GPU of one worker, by part (``weights``, ``gradients``, ``optimizer``,
    ``activations``, ``overhead``) and ``total``; see the module docstring for the formulas.

    Example (a 1B-parameter model, full fine-tuning in bf16 on one GPU, ZeRO-2):
        >>> s = ModelSize(params=10**9, lora=0, head=0, hidden=2048, layers=16, vocab=32000)
        >>> p = memory_plan(s, precision="bf16", zero_stage=2, workers=1, batch_size=1, seq_len=1024,
        ...                 use_lora=False, gradient_checkpointing=True)
        >>> round(p["weights"] / 10**9), round(p["optimizer"] / 10**9)
        (2, 12)
    """
    weight_bytes = BYTES["4bit"] if quantization == "4bit" else BYTES[precision]
    grad_bytes = BYTES[precision]
    trained = (size.lora + size.head) if use_lora else size.params
    shard = lambda from_stage: workers if zero_stage >= from_stage else 1  # noqa: E731
    weights = size.params * weight_bytes / shard(3)
    gradients = trained * grad_bytes / shard(2)
    optimizer = trained * (8.0 if precision == "fp32" else 12.0) / shard(1)
    per_layer = 34.0 * seq_len * size.hidden * (2.0 if precision == "fp32" else 1.0)
    if gradient_checkpointing:
        act = batch_size * (size.layers * 2.0 * seq_len * size.hidden + per_layer)
    else:
        act = batch_size * size.layers * per_layer
    logits = 2.0 * batch_size * seq_len * size.vocab * 4.0 if causal else 0.0
    parts = {"weights": weights, "gradients": gradients, "optimizer": optimizer, "activations": act + logits,
             "overhead": float(GiB)}
    return {**parts, "total": sum(parts.values())}


def describe(plan: dict) -> str:
    """One line: each part and the total, in GB."""
    parts = ", ".join(f"{k} {plan[k] / 1e9:.1f}" for k in ("weights", "gradients", "optimizer", "activations",
                                                            "overhead"))
    return f"{plan['total'] / 1e9:.1f} GB per GPU ({parts})"


def fixes(size: ModelSize, *, use_lora: bool, zero_stage: int, gradient_checkpointing: bool,
          quantization: str) -> list[str]:
    """What would shrink the plan, most effective first, leaving out what is already on."""
    out = []
    if not use_lora:
        out.append("finetune.lora.enabled: true (trains adapters only: no full gradients or optimizer state)")
    if zero_stage < 2:
        out.append("finetune.train.zero_stage: 2 with more finetune.resources.num_workers (shards the gradients and "
                   "optimizer state)")
    if zero_stage < 3:
        out.append("finetune.train.zero_stage: 3 with more finetune.resources.num_workers (shards the weights too, "
                   "from the moment they load; finetune.train.engine: trainer)")
    if not gradient_checkpointing:
        out.append("finetune.train.gradient_checkpointing: true")
    if use_lora and quantization == "none":
        out.append("finetune.train.quantization: 4bit (QLoRA, CUDA)")
    out.append("a smaller finetune.train.max_length or batch_size (with more gradient_accumulation_steps)")
    return out


def check_memory(cfg: Config, model_path: str, n_labels: Optional[int], *, on_gpu: bool,
                 modality: str = "text") -> Optional[dict]:
    """The memory plan of one trial worker's GPU (``finetune.sizing``), logged; a plan that cannot
    fit ``finetune.resources.gpu_memory_gb`` (else the driver's GPU) is an InputError saying what to
    change. None on CPUs (host memory is not planned). n_labels: a classifier's labels, None for
    a causal LM. modality: the pool's (``Pool.modality``); only text models are planned."""
    from transformers import AutoConfig

    from .task import task_for
    from .trial import precision_of, zero_stage_of

    if not on_gpu:
        return None
    ft, tr = cfg.finetune, cfg.finetune.train
    task = task_for(ft.task, modality)
    if task.modality != "text":
        log.info("memory plan: not made for a %s model (the formulas are a transformer's over tokens)", modality)
        return None
    lora = task.uses_lora(ft)
    config = AutoConfig.from_pretrained(model_path, trust_remote_code=ft.trust_remote_code)
    size = count_parameters(config, ft.lora if lora else None, n_labels)
    zero = zero_stage_of(ft, on_gpu)
    plan = memory_plan(size, precision=precision_of(ft, on_gpu), zero_stage=zero, workers=ft.resources.num_workers,
                       batch_size=tr.batch_size, seq_len=tr.max_length, use_lora=lora,
                       gradient_checkpointing=tr.gradient_checkpointing, quantization=tr.quantization,
                       causal=n_labels is None)
    cap = ft.resources.gpu_memory_gb
    if cap is None:
        import torch

        cap = torch.cuda.get_device_properties(0).total_memory / 1e9 if torch.cuda.is_available() else None
    log.info("memory plan: %.2fB parameters (%s trained), ZeRO-%d over %d worker(s): %s%s", size.params / 1e9,
             f"{(size.lora + size.head) / 1e6:.1f}M LoRA" if lora else "all", zero, ft.resources.num_workers,
             describe(plan), f" of {cap:.0f} GB" if cap else " (GPU memory unknown: not checked)")
    if cap and plan["total"] > cap * 1e9:
        raise InputError(f"one trial worker needs about {describe(plan)}, more than its GPU's {cap:g} GB; to fit, "
                         f"set {'; or '.join(fixes(size, use_lora=lora, zero_stage=zero, gradient_checkpointing=tr.gradient_checkpointing, quantization=tr.quantization))}")
    return {k: round(v / 1e9, 3) for k, v in plan.items()}


def trial_requests(plan: dict, cfg: Config) -> list:
    """What one trial asks of the cluster (``runtime.capacity.Request``): its driver (Tune's
    function trainable, 0.1 CPU) and each of its workers (``plan_resources``'s)."""
    from ..runtime.capacity import Request

    res = cfg.finetune.resources
    return [Request("a trial's driver", {"CPU": 0.1}, "free a tenth of a CPU on some node"),
            Request(f"a fine-tuning worker (1 of {res.num_workers} per trial)", plan["resources_per_worker"],
                    "lower finetune.resources.cpus_per_worker" + (" or set finetune.device: cpu"
                                                                  if plan["use_gpu"] else ""))]
