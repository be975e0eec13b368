"""The task strategy: what differs between fine-tuning a classifier and a causal LM, decided once.

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
``prompts`` + ``responses``, or ``chats`` (lists of turns), for a causal LM.
"""

from __future__ import annotations

from ...errors import InputError
from ...io.models import check_model
from .base import Task, size, torch_dtype
from .causal import CLASSIFIER_HEADS, CausalLM, chat_prompt, instruction_batch, padded
from .text import Classification

__all__ = ["Task", "Classification", "CausalLM", "size", "torch_dtype", "task_for", "check_base_model",
           "saved_task", "CLASSIFIER_HEADS", "chat_prompt", "instruction_batch", "padded"]

TASKS = {t.name: t for t in (Classification(), CausalLM())}


def task_for(name: str) -> Task:
    """The strategy of ``finetune.task``.

    Example:
        >>> task_for("instruction").metric, task_for("classification").default_proxy
        ('test loss', 'probe')
    """
    return TASKS[name]


def check_base_model(ft) -> None:
    """Before any stage: the base model ``ft`` (``FinetuneConfig``) names resolves, holds a config,
    safetensors and a tokenizer (``io.models.check_model``) and fits ``ft.task``
    (:meth:`Task.check_model`); no weights are read."""
    task = task_for(ft.task)
    config = check_model("finetune.model", ft.model, revision=ft.revision, trust_remote_code=ft.trust_remote_code,
                         default=task.default_model, safetensors_only=True)
    task.check_model(config, ft.model)


def saved_task(model_dir: str, *, trust_remote_code: bool = False) -> Task:
    """The task of a model a run saved (``target/model``), read from its saved architecture."""
    from pathlib import Path

    from transformers import AutoConfig

    if not (Path(model_dir) / "config.json").is_file():
        raise InputError(f"model {model_dir!r} is not a model directory (no config.json); pass the "
                         f"target/model directory a tune run wrote")
    arch = " ".join(AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code).architectures or [])
    return TASKS["classification" if "SequenceClassification" in arch else "instruction"]


