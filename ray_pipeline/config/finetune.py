"""The fine-tuning part of the run's config (``finetune:``), in sections a reader can scan:
``heldout`` (the split that chooses and the one that reports), ``instruction`` (prompt and
response), ``train`` (one trial), ``lora``, ``proxy`` (scoring before fine-tuning), ``sweep``
(Ray Tune) and ``resources`` (per trial). :class:`~ray_pipeline.config.Config` holds it.

The keys of the flat layout before these sections (``finetune.eval_path``, ``finetune.lr``,
``finetune.proxy: coverage``, ...) are refused with a message naming their new place
(:data:`MOVED`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from ..errors import ConfigError
from .typed import check_revision, check_template, fail


@dataclass(frozen=True)
class HeldoutSettings:
    """The held-out set ``eval_path`` (same columns as the pool; ``eval_labels_path``: its labels,
    one per line, where the pool's come from data.labels_path) is cut, seeded and stratified by
    label, into a *validation* part (``validation_fraction`` of it: the proxy, ASHA, patience and
    the choice of the target use it and nothing else) and a *test* part (only reports); or give
    the test part yourself as ``test_path`` (then all of ``eval_path`` validates). ``eval_limit``
    draws a seeded, stratified sample of each file, never its first rows."""

    eval_path: Optional[str] = None
    eval_labels_path: Optional[str] = None
    eval_limit: Optional[int] = 1000
    test_path: Optional[str] = None
    test_labels_path: Optional[str] = None
    validation_fraction: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 < self.validation_fraction < 1.0:
            fail("finetune.heldout.validation_fraction", self.validation_fraction,
                 "a share in (0, 1) of the held-out set that chooses; the rest reports (e.g. 0.5)")
        if self.test_labels_path and not self.test_path:
            fail("finetune.heldout.test_labels_path", self.test_labels_path,
                 "empty unless finetune.heldout.test_path is set")
        if self.eval_limit is not None and self.eval_limit < 1:
            fail("finetune.heldout.eval_limit", self.eval_limit, "empty (the whole held-out set) or an int >= 1")


@dataclass(frozen=True)
class InstructionSettings:
    """How an instruction record becomes a prompt (``prompt_template`` over the record's fields)
    and a response (the field ``response_field``); a chat pool trains on its turns instead."""

    prompt_template: str = "{instruction}\n{input}\n"
    response_field: str = "output"

    def __post_init__(self) -> None:
        check_template("finetune.instruction.prompt_template", self.prompt_template)


@dataclass(frozen=True)
class TrainSettings:
    """One trial. Every trial, the random and full baselines too, trains until ``patience``
    evaluations (one every ``eval_every`` optimizer steps) in a row did not improve its validation
    score, or its cap: ``max_epochs`` passes over its subset, at most ``max_steps`` steps.

    The fields a Hugging Face ``TrainingArguments`` user knows keep its names: a step takes
    ``gradient_accumulation_steps`` micro-batches of ``batch_size`` samples per worker (the
    effective batch is their product times the workers); ``lr`` follows ``lr_scheduler_type``
    (``transformers.get_scheduler``: linear, cosine, constant, constant_with_warmup, ...) after
    ``warmup_ratio`` of the trial's steps of linear warm-up; AdamW with ``weight_decay``;
    ``gradient_checkpointing`` recomputes activations in the backward pass (less memory, about a
    third more compute). ``zero_stage``/``precision`` empty/``auto``: ZeRO-2 + bf16 on GPU, ZeRO-0 +
    fp32 on CPU; the weights are loaded in the training precision (bf16/fp16 halve their memory);
    fp16 needs a GPU. ZeRO-3 (``zero_stage: 3``, trainer engine only) shards the weights over the
    workers from the moment they load, and gathers them whole when the tuned model is saved.
    ``quantization: 4bit``: QLoRA, the frozen base in 4-bit NF4 through bitsandbytes (CUDA only,
    LoRA only). ``engine``: ``trainer`` (the default: Hugging Face ``Trainer`` inside Ray Train,
    the DeepSpeed config passed through ``TrainingArguments(deepspeed=...)``; needed for ZeRO-3
    and ``training_args``) or ``loop`` (the hand-written DeepSpeed loop, which
    benchmarks/bench_trainer.py did not measure as better: the same steps/s in one of two runs).
    ``training_args``: any other ``TrainingArguments`` field, passed through as it is (e.g.
    ``{adam_beta2: 0.95, max_grad_norm: 0.5}``; trainer engine only); the fields this section owns
    are refused there with the key to use instead. ``head_init``: ``auto`` starts a speech
    classifier's new head as the linear probe of its encoder's vectors on the trial's own samples
    (LP-FT, Kumar et al. 2022; the packaged GE2E; not under ZeRO-3), ``random`` as transformers
    initialises it (a text classifier's head always)."""

    lr: float = 1e-4
    batch_size: int = 16
    gradient_accumulation_steps: int = 1
    eval_batch_size: int = 64
    max_epochs: float = 10.0
    max_steps: int = 1000
    eval_every: int = 25
    patience: int = 3
    max_length: int = 64
    lr_scheduler_type: Literal["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts",
                               "polynomial", "inverse_sqrt"] = "constant_with_warmup"
    warmup_ratio: float = 0.0
    weight_decay: float = 0.01
    gradient_checkpointing: bool = False
    zero_stage: Optional[int] = None
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    quantization: Literal["none", "4bit"] = "none"
    engine: Literal["trainer", "loop"] = "trainer"
    training_args: dict[str, Any] = field(default_factory=dict)
    head_init: Literal["auto", "random"] = "auto"

    def __post_init__(self) -> None:
        for name in ("batch_size", "gradient_accumulation_steps", "eval_batch_size", "max_steps", "eval_every",
                     "patience"):
            if getattr(self, name) < 1:
                fail(f"finetune.train.{name}", getattr(self, name), "an int >= 1")
        if self.eval_every > self.max_steps:
            fail("finetune.train.eval_every", self.eval_every, f"at most finetune.train.max_steps ({self.max_steps})")
        if not self.max_epochs > 0:
            fail("finetune.train.max_epochs", self.max_epochs, "a number of passes over the subset > 0, e.g. 10")
        if not self.lr > 0:
            fail("finetune.train.lr", self.lr, "a learning rate > 0")
        if self.max_length < 8:
            fail("finetune.train.max_length", self.max_length, "an int >= 8 (tokens)")
        if self.zero_stage == 3 and self.engine != "trainer":
            fail("finetune.train.zero_stage", self.zero_stage, "empty (auto), 0, 1 or 2 with finetune.train.engine: "
                 "loop (it cannot save a model from ZeRO-3 shards); use finetune.train.engine: trainer for ZeRO-3")
        if self.zero_stage is not None and self.zero_stage not in (0, 1, 2, 3):
            fail("finetune.train.zero_stage", self.zero_stage, "empty (auto), 0, 1, 2 or 3")
        if self.training_args and self.engine != "trainer":
            fail("finetune.train.training_args", self.training_args, "empty with finetune.train.engine: loop "
                 "(TrainingArguments are the trainer engine's)")
        check_training_args(self.training_args)
        if not 0.0 <= self.warmup_ratio < 1.0:
            fail("finetune.train.warmup_ratio", self.warmup_ratio, "a share of the trial's steps in [0, 1), e.g. 0.05")
        if self.weight_decay < 0:
            fail("finetune.train.weight_decay", self.weight_decay, "a number >= 0, e.g. 0.01")


# TrainingArguments fields the project sets itself, and the key that sets each.
OWNED_TRAINING_ARGS = {
    "output_dir": "the run's output_dir", "deepspeed": "finetune.train.zero_stage and precision",
    "max_steps": "finetune.train.max_steps", "num_train_epochs": "finetune.train.max_epochs",
    "per_device_train_batch_size": "finetune.train.batch_size",
    "per_device_eval_batch_size": "finetune.train.eval_batch_size",
    "gradient_accumulation_steps": "finetune.train.gradient_accumulation_steps", "learning_rate": "finetune.train.lr",
    "lr_scheduler_type": "finetune.train.lr_scheduler_type", "warmup_steps": "finetune.train.warmup_ratio",
    "weight_decay": "finetune.train.weight_decay",
    **{k: "finetune.train.gradient_checkpointing" for k in ("gradient_checkpointing", "gradient_checkpointing_kwargs",
                                                             "activation_checkpointing",
                                                             "activation_checkpointing_kwargs")},
    "bf16": "finetune.train.precision", "fp16": "finetune.train.precision", "use_cpu": "finetune.device",
    "seed": "the run's seed", "data_seed": "the run's seed", "eval_strategy": "finetune.train.eval_every",
    "eval_steps": "finetune.train.eval_every", "logging_steps": "finetune.train.eval_every",
    "save_strategy": "finetune.train.patience (the best model is kept by the sweep)",
    "report_to": "nothing: metrics go to Ray Tune", "remove_unused_columns": "nothing: the task makes the batches",
}


def check_training_args(args: dict) -> None:
    """Each key of ``finetune.train.training_args`` is a ``TrainingArguments`` field
    (``dataclasses.fields``) that the project does not set itself (:data:`OWNED_TRAINING_ARGS`).
    transformers is imported only when the mapping is not empty."""
    if not args:
        return
    import dataclasses

    from transformers import TrainingArguments

    names = {f.name for f in dataclasses.fields(TrainingArguments) if f.init}
    for key in args:
        if key in OWNED_TRAINING_ARGS:
            raise ConfigError(f"config field 'finetune.train.training_args.{key}' is set by the project; use "
                              f"{OWNED_TRAINING_ARGS[key]} instead")
        if key not in names:
            raise ConfigError(f"config field 'finetune.train.training_args.{key}' is not a field of transformers' "
                              f"TrainingArguments; see its documentation for the fields")


@dataclass(frozen=True)
class LoraSettings:
    """LoRA adapters through PEFT (Hu et al. 2021): only low-rank updates of the ``target_modules``
    are trained. The fields keep PEFT's ``LoraConfig`` names. ``enabled`` empty: on for causal LMs
    (``finetune.task: instruction``), off for classification. ``r`` the rank, ``lora_alpha`` (the
    update is scaled by lora_alpha / r), ``lora_dropout`` on the adapters' input,
    ``target_modules``: module names, or ``all-linear`` (every linear layer but the output). The
    tuned model is saved merged (loads with ``from_pretrained``) and its adapter beside it in
    ``adapter/``."""

    enabled: Optional[bool] = None
    r: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] = ("all-linear",)

    def __post_init__(self) -> None:
        if self.r < 1:
            fail("finetune.lora.r", self.r, "an int >= 1, e.g. 16")
        if not self.lora_alpha > 0:
            fail("finetune.lora.lora_alpha", self.lora_alpha, "a number > 0, e.g. twice r")
        if not 0.0 <= self.lora_dropout < 1.0:
            fail("finetune.lora.lora_dropout", self.lora_dropout, "a probability in [0, 1)")
        if not self.target_modules:
            fail("finetune.lora.target_modules", list(self.target_modules),
                 "module names such as [q_proj, v_proj], or [all-linear]")


@dataclass(frozen=True)
class ProxySettings:
    """How every candidate is scored first, before any fine-tuning. ``kind``: ``probe`` (a linear
    probe on the frozen embeddings and the labels, scored on the validation part;
    classification), ``coverage`` (no labels needed: the mean over validation samples of the
    highest cosine to the subset), ``base_loss`` (instruction: the base model's mean response loss
    on the subset, higher first: more left to learn; read on a seeded sample of at most ``rows``
    rows of each candidate), ``auto`` (probe for classification, coverage for instruction: over
    two splits of ``benchmarks/quality_instruction.py`` it ranked a budget's candidates better
    than the base model's loss, Spearman's rho 0.40 against 0.10 on average; benchmarks/README.md),
    ``none``. ``top_candidates``: only this many selection candidates by proxy score, spread over
    the budgets (each budget's best first: ``proxy.prune``), with the random subsets of their sizes
    and the full pool, are fine-tuned (empty: all of them)."""

    kind: Literal["auto", "probe", "coverage", "base_loss", "none"] = "auto"
    rows: Optional[int] = 256
    top_candidates: Optional[int] = 3

    def __post_init__(self) -> None:
        if self.rows is not None and self.rows < 1:
            fail("finetune.proxy.rows", self.rows, "empty (every row of a candidate) or an int >= 1, e.g. 256")
        if self.top_candidates is not None and self.top_candidates < 1:
            fail("finetune.proxy.top_candidates", self.top_candidates, "empty (fine-tune all) or an int >= 1")


@dataclass(frozen=True)
class SweepSettings:
    """Ray Tune over the candidates. ``early_stopping``: ASHA (``grace_period``,
    ``reduction_factor``, in evaluations) stops clearly worse *selection candidates* earlier; it
    never stops a baseline (false: no ASHA). ``include_full``: also fine-tune the full pool.
    ``max_concurrent_trials`` empty: as many as the cluster holds. ``max_retries``: how many times a
    trial that fails (a worker or node lost, as when a spot instance is reclaimed; an error) is
    run again, from its last checkpoint where it reported one; 0: a failure is final."""

    early_stopping: bool = True
    grace_period: int = 1
    reduction_factor: int = 2
    include_full: bool = True
    max_concurrent_trials: Optional[int] = None
    max_retries: int = 2

    def __post_init__(self) -> None:
        if self.grace_period < 1:
            fail("finetune.sweep.grace_period", self.grace_period, "an int >= 1 (evaluations)")
        if self.reduction_factor < 2:
            fail("finetune.sweep.reduction_factor", self.reduction_factor, "an int >= 2")
        if self.max_concurrent_trials is not None and self.max_concurrent_trials < 1:
            fail("finetune.sweep.max_concurrent_trials", self.max_concurrent_trials, "empty or an int >= 1")
        if self.max_retries < 0:
            fail("finetune.sweep.max_retries", self.max_retries, "an int >= 0 (0: a failed trial is not run again)")


@dataclass(frozen=True)
class ResourceSettings:
    """What one trial asks of the cluster: ``num_workers`` Ray Train workers of
    ``cpus_per_worker`` CPUs (and a GPU each where the cluster has them and ``finetune.device``
    allows); ``threads_per_worker``: torch's threads in a worker (empty: torch's default).
    ``gpu_memory_gb``: the memory of one worker's GPU, against which the sweep's memory plan
    (``finetune.sizing``) is checked before any trial, in ``--check`` too (empty: the driver's
    GPU where it has one, else the plan is printed and not checked)."""

    num_workers: int = 1
    cpus_per_worker: float = 1.0
    threads_per_worker: Optional[int] = None
    gpu_memory_gb: Optional[float] = None

    def __post_init__(self) -> None:
        if self.num_workers < 1:
            fail("finetune.resources.num_workers", self.num_workers, "an int >= 1")
        if not self.cpus_per_worker > 0:
            fail("finetune.resources.cpus_per_worker", self.cpus_per_worker, "a number > 0")
        if self.threads_per_worker is not None and self.threads_per_worker < 1:
            fail("finetune.resources.threads_per_worker", self.threads_per_worker, "empty or an int >= 1")
        if self.gpu_memory_gb is not None and not self.gpu_memory_gb > 0:
            fail("finetune.resources.gpu_memory_gb", self.gpu_memory_gb, "empty or the GB of one GPU, e.g. 48")


@dataclass(frozen=True)
class FinetuneConfig:
    """Fine-tuning every candidate (Ray Tune over Ray Train + DeepSpeed).

    ``task``: ``classification`` (labels from data.label_column; score = held-out accuracy) or
    ``instruction`` (loss on the response tokens; score = -held-out loss). ``model``:
    ``default`` (MiniLM for classification, the packaged GE2E on a pool of recordings,
    SmolLM2-135M-Instruct for instruction), ``minilm``, ``smollm2``, ``ge2e``, a local directory or
    a Hugging Face Hub id ``ORG/NAME`` (a causal LM for instruction; for classification any model
    with a sequence-classification head, or on recordings an audio-classification one), at
    ``revision`` (a Hub id's branch, tag or commit); ``trust_remote_code``: let it run the code its
    repository ships (off unless set). ``device``: ``auto`` (a GPU where a trial is given one) or
    ``cpu``. The sections: :class:`HeldoutSettings`, :class:`InstructionSettings`,
    :class:`TrainSettings`, :class:`LoraSettings`, :class:`ProxySettings`,
    :class:`SweepSettings`, :class:`ResourceSettings`.
    """

    task: Literal["classification", "instruction"] = "classification"
    model: str = "default"
    revision: Optional[str] = None
    trust_remote_code: bool = False
    device: Literal["auto", "cpu"] = "auto"
    heldout: HeldoutSettings = field(default_factory=HeldoutSettings)
    instruction: InstructionSettings = field(default_factory=InstructionSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    lora: LoraSettings = field(default_factory=LoraSettings)
    proxy: ProxySettings = field(default_factory=ProxySettings)
    sweep: SweepSettings = field(default_factory=SweepSettings)
    resources: ResourceSettings = field(default_factory=ResourceSettings)

    def __post_init__(self) -> None:
        check_revision("finetune.revision", self.revision)
        needs = PROXY_NEEDS.get(self.proxy.kind)
        if needs and needs[0] != self.task:
            fail("finetune.proxy.kind", self.proxy.kind, f"one of {PROXY_FOR[self.task]} for finetune.task "
                 f"{self.task!r} ({needs[1]})")


# The proxies that only one task can use (the task strategy decides what ``auto`` means).
PROXY_NEEDS = {"probe": ("classification", "the linear probe needs class labels"),
               "base_loss": ("instruction", "base_loss reads a causal LM's loss on the responses")}
PROXY_FOR = {"classification": "'probe', 'coverage', 'auto', 'none'",
             "instruction": "'base_loss', 'coverage', 'auto', 'none'"}


# The flat keys before the sections, and where each went.
MOVED = {
    **{k: f"heldout.{k}" for k in ("eval_path", "eval_labels_path", "eval_limit", "test_path", "test_labels_path",
                                   "validation_fraction")},
    **{k: f"instruction.{k}" for k in ("prompt_template", "response_field")},
    **{k: f"train.{k}" for k in ("lr", "batch_size", "eval_batch_size", "max_epochs", "max_steps", "eval_every",
                                 "patience", "max_length", "zero_stage", "precision")},
    "proxy_rows": "proxy.rows", "top_candidates": "proxy.top_candidates",
    "early_stopping": "sweep.early_stopping", "asha_grace_period": "sweep.grace_period",
    "asha_reduction_factor": "sweep.reduction_factor", "include_full": "sweep.include_full",
    "max_concurrent_trials": "sweep.max_concurrent_trials",
    **{k: f"resources.{k}" for k in ("num_workers", "cpus_per_worker", "threads_per_worker")},
}


LORA_RENAMED = {"rank": "r", "alpha": "lora_alpha", "dropout": "lora_dropout"}  # to PEFT's names


def refuse_moved(raw: Any) -> None:
    """A ``finetune:`` mapping in the flat layout: a :class:`ConfigError` naming the new place of
    its first moved key (``proxy: coverage`` as a string is ``proxy.kind`` now)."""
    if not isinstance(raw, dict):
        return
    if "proxy" in raw and not isinstance(raw["proxy"], dict):
        raise ConfigError(f"config field 'finetune.proxy' is now a section: write finetune.proxy.kind: "
                          f"{raw['proxy']!r} (finetune.proxy_rows and finetune.top_candidates moved beside it)")
    for key in raw:
        if key in MOVED:
            raise ConfigError(f"config field 'finetune.{key}' moved to 'finetune.{MOVED[key]}'; write it there")
    lora = raw.get("lora")
    for key in lora if isinstance(lora, dict) else ():
        if key in LORA_RENAMED:
            raise ConfigError(f"config field 'finetune.lora.{key}' is 'finetune.lora.{LORA_RENAMED[key]}' now "
                              f"(PEFT's LoraConfig name); write it there")
