"""The task strategy: what differs between fine-tuning a classifier (of texts or of recordings) and
a causal LM, decided once.

:func:`task_for` turns ``finetune.task`` into a :class:`Task` (``classification``: a sequence
classifier, score = accuracy; ``instruction``: a causal LM, loss on the response tokens, score =
minus the loss), as faiss's ``contrib/clustering.py`` picks ``DatasetAssign`` or
``DatasetAssignGPU`` once; :func:`saved_task` reads it back from a model a run saved. Everything
that branches on the task lives here: the arrays a trial trains on, batches, loading the model
and its LoRA adapters, the sums an evaluation all-reduces, the per-sample test values of
:mod:`~ray_pipeline.finetune.verdict`, and prediction. Nothing else in the package asks which
task it is.

The arrays (:meth:`Task.arrays`) are plain dicts of lists, so they travel to Ray Train workers
as they are: ``texts`` + ``labels`` (int indices into ``label_names``) for a classifier;
``prompts`` + ``responses``, or ``chats`` (lists of turns), for a causal LM; ``audio`` (the
recordings' sources) + ``labels`` + ``max_seconds`` for an audio classifier. A task is one of
``finetune.task`` on one kind of sample (``Pool.modality``): one module each, ``text``,
``causal``, ``audio``.
"""

from __future__ import annotations

from ...errors import InputError
from ...io.models import check_model
from .base import SETTINGS, Task, size, take, torch_dtype, units
from .audio import AudioClassification
from .causal import CLASSIFIER_HEADS, CausalLM, chat_prompt, instruction_batch, padded
from .image import ImageClassification
from .media import register_packaged
from .text import Classification

__all__ = ["Task", "Classification", "CausalLM", "AudioClassification", "ImageClassification", "SETTINGS", "size",
           "take", "units", "torch_dtype", "task_for", "check_base_model", "saved_task", "CLASSIFIER_HEADS", "chat_prompt",
           "instruction_batch", "padded"]

TASKS = {(t.name, t.modality): t for t in (Classification(), CausalLM(), AudioClassification(),
                                            ImageClassification())}


def task_for(name: str, modality: str = "text") -> Task:
    """The strategy of ``finetune.task`` on a pool of ``modality`` (``Pool.modality``); an
    InputError for a pair that cannot be tuned.

    Example:
        >>> task_for("instruction").metric, task_for("classification").default_proxy
        ('test loss', 'probe')
        >>> task_for("classification", "audio").default_model
        'ge2e'
    """
    if (name, modality) in TASKS:
        return TASKS[(name, modality)]
    if name == "instruction":
        raise InputError(f"finetune.task: instruction tunes a causal LM on text, and this pool's samples are "
                         f"{modality} only; give data.text_column (e.g. transcripts or captions), or set "
                         f"finetune.task: classification")
    raise InputError(f"fine-tuning a model on {modality} samples is not supported yet (text, speech and images "
                     f"are); run "
                     f"`ray-pipeline select` to embed and select them, or give data.text_column for a text model")


def check_base_model(ft, modality: str = "text") -> None:
    """Before any stage: the base model ``ft`` (``FinetuneConfig``) names resolves, holds a config,
    safetensors and a tokenizer or feature extractor (``io.models.check_model``) and fits the task
    (:meth:`Task.check_model`); no weights are read."""
    task = task_for(ft.task, modality)
    if task.processor != "tokenizer":
        register_packaged()
    check_model("finetune.model", ft.model, revision=ft.revision, trust_remote_code=ft.trust_remote_code,
                default=task.default_model, safetensors_only=True, processor=task.processor,
                fits=lambda config: task.check_model(config, ft.model))


def saved_task(model_dir: str, *, trust_remote_code: bool = False) -> Task:
    """The task of a model a run saved (``target/model``), read from its saved config: an audio
    or image classifier, a text classifier or a causal LM."""
    from pathlib import Path

    from transformers import AutoConfig

    from ...io.models import loads_with

    register_packaged()

    if not (Path(model_dir) / "config.json").is_file():
        raise InputError(f"model {model_dir!r} is not a model directory (no config.json); pass the "
                         f"target/model directory a tune run wrote")
    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    if not loads_with(config, "AutoModelForSequenceClassification"):
        for modality, auto in (("audio", "AutoModelForAudioClassification"),
                               ("image", "AutoModelForImageClassification")):
            if loads_with(config, auto):
                return TASKS[("classification", modality)]
    arch = " ".join(config.architectures or [])
    return TASKS[("classification" if "SequenceClassification" in arch else "instruction", "text")]
