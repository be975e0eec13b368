"""The fine-tuning part of the run's config (``finetune:``), with its LoRA settings; ``config``
holds it in :class:`~ray_pipeline.config.Config` and re-exports both classes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from .typed import check_template, fail


@dataclass(frozen=True)
class LoraSettings:
    """LoRA adapters through PEFT (Hu et al. 2021): only low-rank updates of the ``target_modules``
    are trained. ``enabled`` empty: on for causal LMs (``finetune.task: instruction``), off for
    classification. ``rank`` r, ``alpha`` (the update is scaled by alpha / r), ``dropout`` on the
    adapters' input, ``target_modules``: module names, or ``all-linear`` (every linear layer but
    the output). The tuned model is saved merged (loads with ``from_pretrained``) and its adapter
    beside it in ``adapter/``."""

    enabled: Optional[bool] = None
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("all-linear",)

    def __post_init__(self) -> None:
        if self.rank < 1:
            fail("finetune.lora.rank", self.rank, "an int >= 1, e.g. 16")
        if not self.alpha > 0:
            fail("finetune.lora.alpha", self.alpha, "a number > 0, e.g. twice the rank")
        if not 0.0 <= self.dropout < 1.0:
            fail("finetune.lora.dropout", self.dropout, "a probability in [0, 1)")
        if not self.target_modules:
            fail("finetune.lora.target_modules", list(self.target_modules),
                 "module names such as [q_proj, v_proj], or [all-linear]")


@dataclass(frozen=True)
class FinetuneConfig:
    """Fine-tuning every candidate (Ray Tune over Ray Train + DeepSpeed).

    ``task``: ``classification`` (labels from data.label_column; score = held-out accuracy) or
    ``instruction`` (prompt from ``prompt_template`` over the record's fields, response from
    ``response_field``; loss on the response tokens; score = -held-out loss). ``model``:
    ``default`` (MiniLM for classification, SmolLM2-135M-Instruct for instruction), ``minilm``,
    ``smollm2`` or a local directory.

    The held-out set ``eval_path`` (same columns as the pool; ``eval_labels_path``: its labels, one
    per line, where the pool's come from data.labels_path) is cut, seeded and stratified by label,
    into a *validation* part (``validation_fraction`` of it: the proxy, ASHA, patience and the
    choice of the target use it and nothing else) and a *test* part (only reports); or give the
    test part yourself as ``test_path`` (then all of ``eval_path`` validates). ``eval_limit``
    draws a seeded, stratified sample of each file, never its first rows.

    Every trial, the random and full baselines too, trains until ``patience`` evaluations (one
    every ``eval_every`` steps) in a row did not improve its validation score, or its cap:
    ``max_epochs`` passes over its subset, at most ``max_steps`` steps. ASHA stops clearly worse
    *selection candidates* earlier; it never stops a baseline (``early_stopping: false``: no ASHA).
    ``proxy``: how every candidate is scored first, before any fine-tuning: ``probe`` (a linear
    probe on the frozen embeddings and the labels, scored on the validation part; classification),
    ``coverage`` (no labels needed: the mean over validation samples of the highest cosine to the
    subset), ``base_loss`` (instruction: the base model's mean response loss on the subset, higher
    first: more left to learn; read on a seeded sample of at most ``proxy_rows`` rows of each
    candidate, so it costs forward passes over at most that many rows a candidate), ``auto``
    (probe for classification, coverage for instruction: over two splits of
    ``benchmarks/quality_instruction.py`` it ranked a budget's candidates better than the base
    model's loss, Spearman's rho 0.40 against 0.10 on average, and the 3 it kept held a choice as
    good or better at every budget, at no cost; README), ``none``. ``top_candidates``: only this
    many selection candidates by proxy score, spread over the budgets (each budget's best first:
    ``proxy.prune``), with the random subsets of their sizes and the full pool, are fine-tuned
    (empty: all of them).
    ``zero_stage``/``precision`` empty/``auto``: ZeRO-2 + bf16 on GPU, ZeRO-0 + fp32 on CPU.
    ``lora``: :class:`LoraSettings` (on by default for causal LMs).
    """

    task: Literal["classification", "instruction"] = "classification"
    model: str = "default"
    eval_path: Optional[str] = None
    eval_labels_path: Optional[str] = None
    eval_limit: Optional[int] = 1000
    test_path: Optional[str] = None
    test_labels_path: Optional[str] = None
    validation_fraction: float = 0.5
    prompt_template: str = "{instruction}\n{input}\n"
    response_field: str = "output"
    lr: float = 1e-4
    batch_size: int = 16
    eval_batch_size: int = 64
    max_epochs: float = 10.0
    max_steps: int = 1000
    eval_every: int = 25
    patience: int = 3
    max_length: int = 64
    zero_stage: Optional[int] = None
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    device: Literal["auto", "cpu"] = "auto"
    num_workers: int = 1
    cpus_per_worker: float = 1.0
    threads_per_worker: Optional[int] = None
    max_concurrent_trials: Optional[int] = None
    proxy: Literal["auto", "probe", "coverage", "base_loss", "none"] = "auto"
    proxy_rows: Optional[int] = 256
    top_candidates: Optional[int] = 3
    early_stopping: bool = True
    asha_grace_period: int = 1
    asha_reduction_factor: int = 2
    include_full: bool = True
    lora: LoraSettings = field(default_factory=LoraSettings)

    @property
    def proxy_kind(self) -> Optional[str]:
        """The proxy that scores the candidates: ``probe``, ``coverage``, ``base_loss`` or None."""
        if self.proxy == "auto":
            return "probe" if self.task == "classification" else "coverage"
        return None if self.proxy == "none" else self.proxy

    @property
    def uses_lora(self) -> bool:
        """LoRA as configured, or by default for a causal LM."""
        return self.lora.enabled if self.lora.enabled is not None else self.task == "instruction"

    def __post_init__(self) -> None:
        for name in ("batch_size", "eval_batch_size", "max_steps", "eval_every", "patience", "num_workers",
                     "asha_grace_period"):
            if getattr(self, name) < 1:
                fail(f"finetune.{name}", getattr(self, name), "an int >= 1")
        check_template("finetune.prompt_template", self.prompt_template)
        if self.eval_every > self.max_steps:
            fail("finetune.eval_every", self.eval_every, f"at most finetune.max_steps ({self.max_steps})")
        if not self.max_epochs > 0:
            fail("finetune.max_epochs", self.max_epochs, "a number of passes over the subset > 0, e.g. 10")
        if not 0.0 < self.validation_fraction < 1.0:
            fail("finetune.validation_fraction", self.validation_fraction,
                 "a share in (0, 1) of the held-out set that chooses; the rest reports (e.g. 0.5)")
        if self.test_labels_path and not self.test_path:
            fail("finetune.test_labels_path", self.test_labels_path, "empty unless finetune.test_path is set")
        if not self.lr > 0:
            fail("finetune.lr", self.lr, "a learning rate > 0")
        if self.max_length < 8:
            fail("finetune.max_length", self.max_length, "an int >= 8 (tokens)")
        if self.zero_stage is not None and self.zero_stage not in (0, 1, 2, 3):
            fail("finetune.zero_stage", self.zero_stage, "empty (auto), 0, 1, 2 or 3")
        if not self.cpus_per_worker > 0:
            fail("finetune.cpus_per_worker", self.cpus_per_worker, "a number > 0")
        if self.asha_reduction_factor < 2:
            fail("finetune.asha_reduction_factor", self.asha_reduction_factor, "an int >= 2")
        if self.proxy == "probe" and self.task != "classification":
            fail("finetune.proxy", self.proxy, "'base_loss', 'coverage', 'auto' or 'none' for finetune.task "
                 "'instruction' (the linear probe needs class labels)")
        if self.proxy == "base_loss" and self.task != "instruction":
            fail("finetune.proxy", self.proxy, "'probe', 'coverage', 'auto' or 'none' for finetune.task "
                 "'classification' (base_loss reads a causal LM's loss on the responses)")
        if self.proxy_rows is not None and self.proxy_rows < 1:
            fail("finetune.proxy_rows", self.proxy_rows, "empty (every row of a candidate) or an int >= 1, e.g. 256")
        if self.top_candidates is not None and self.top_candidates < 1:
            fail("finetune.top_candidates", self.top_candidates, "empty (fine-tune all) or an int >= 1")
        if self.eval_limit is not None and self.eval_limit < 1:
            fail("finetune.eval_limit", self.eval_limit, "empty (the whole held-out set) or an int >= 1")
