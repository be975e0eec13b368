"""The task interface (:class:`Task`) and what every task loads with: the tokenizer, the
``from_pretrained`` arguments of a precision or a 4-bit base, the size of a task's arrays."""

from __future__ import annotations

from typing import Optional

import numpy as np


# Keys of a task's arrays that are settings, not one value per sample.
SETTINGS = ("label_names", "max_seconds")


def size(data: dict) -> int:
    """How many samples a task's arrays hold (texts, prompts, chats, recordings or images)."""
    return len(next(data[k] for k in ("texts", "prompts", "chats", "audio", "image") if k in data))


def units(batch: dict) -> int:
    """What a batch holds, for throughput: its attention mask's sum (tokens; an audio model's
    frames or partials), else its samples."""
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else len(next(iter(batch.values())))


def take(data: dict, rows) -> dict:
    """The samples ``rows`` of a task's arrays, with its settings but ``label_names``.

    Example:
        >>> take({"texts": ["a", "b", "c"], "labels": np.array([0, 1, 0]), "label_names": ["x", "y"]}, [2, 0])
        {'texts': ['c', 'a'], 'labels': array([0, 0])}
    """
    return {k: (v if k in SETTINGS else np.asarray(v)[rows] if k == "labels" else [v[i] for i in rows])
            for k, v in data.items() if k != "label_names"}


def _tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def _load_kwargs(precision: str = "fp32", quantization: str = "none", trust_remote_code: bool = False) -> dict:
    """``from_pretrained`` arguments: the weights in ``precision`` (fp32, bf16, fp16), or the base
    in 4-bit NF4 (``quantization: 4bit``, bitsandbytes, CUDA only) with bf16 compute; remote code
    only with ``trust_remote_code``."""
    import torch

    kw = dict(dtype=torch_dtype(precision), trust_remote_code=trust_remote_code, use_safetensors=True)
    if quantization == "4bit":
        from transformers import BitsAndBytesConfig

        kw.update(dtype=torch.bfloat16, quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_use_double_quant=True))
    return kw


def label_tensor(data: dict, idx, labels: bool = True) -> dict:
    """``{"labels": (len(idx),) int64}`` of a classifier's arrays, or ``{}`` without ``labels``."""
    if not labels:
        return {}
    import torch

    return {"labels": torch.as_tensor(np.asarray(data["labels"], dtype=np.int64)[np.asarray(idx, dtype=np.int64)])}


def with_new_head(auto, path: str, label_names: Optional[list], **kw):
    """``auto.from_pretrained(path)`` (an ``AutoModelFor...Classification``) with a new head for
    ``label_names``; None: a tuned classifier, with its own labels."""
    if label_names is None:
        return auto.from_pretrained(path, **kw)
    return auto.from_pretrained(path, num_labels=len(label_names), id2label=dict(enumerate(label_names)),
                                label2id={v: i for i, v in enumerate(label_names)}, ignore_mismatched_sizes=True,
                                **kw)


def torch_dtype(precision: str):
    """The torch dtype of a precision name (``fp32``, ``bf16``, ``fp16``)."""
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


class Task:
    """The interface; :class:`Classification` and :class:`CausalLM` fill it in.

    ``name``: the config's ``finetune.task``; ``modality``: what the samples are (``Pool.modality``:
    text, audio, image); ``processor``: what turns them into model inputs (``tokenizer``, an audio
    model's ``feature_extractor``, an image model's ``image_processor``). ``default_model``: the packaged model of
    ``finetune.model: default``. ``default_proxy``: what ``finetune.proxy.kind: auto`` means.
    ``lora_by_default``: LoRA when ``finetune.lora.enabled`` is empty. ``metric``: the test
    score's name in the verdict; ``is_loss``: the score is minus a loss (shown as the loss).
    ``loss_takes_num_items``: the model's loss divides by the items of a whole accumulated step
    (``num_items_in_batch``, HF ``Trainer``) rather than averaging each micro-batch."""

    name: str
    modality: str = "text"
    processor: str = "tokenizer"
    default_model: str
    default_proxy: str
    lora_by_default: bool
    lora_task_type: str
    metric: str
    is_loss: bool
    loss_takes_num_items: bool

    def label_names(self, pool) -> Optional[list]:
        """The labels a classifier head is made for (None: the task has no head)."""
        return None

    def proxy_kind(self, ft) -> Optional[str]:
        """The proxy that scores the candidates (``finetune.proxy.kind``, ``auto`` decided here):
        ``probe``, ``coverage``, ``base_loss`` or None."""
        kind = self.default_proxy if ft.proxy.kind == "auto" else ft.proxy.kind
        return None if kind == "none" else kind

    def uses_lora(self, ft) -> bool:
        """LoRA as ``finetune.lora.enabled`` says, or the task's default when it is empty."""
        return self.lora_by_default if ft.lora.enabled is None else ft.lora.enabled

    def read(self, pool, data, ft):
        """``pool`` (read by ``io.pool.read_pool`` from ``data``, a ``DataConfig``) with what this
        task trains on in ``pool.extra``; ``ft``: the run's ``FinetuneConfig``."""
        return pool

    def arrays(self, pool, label_names: Optional[list] = None) -> dict:
        """What a trial needs of a task pool (:meth:`read`)."""
        raise NotImplementedError

    def batch(self, tok, data: dict, idx, max_length: int, *, labels: bool = True) -> dict:
        """The samples ``idx`` of ``data`` as tensors (``labels``: with the training targets)."""
        raise NotImplementedError

    def load(self, path: str, label_names: Optional[list] = None, *, precision: str = "fp32",
             quantization: str = "none", trust_remote_code: bool = False):
        """(model, tokenizer) to fine-tune from ``path``: weights in ``precision`` (or a 4-bit
        base), safetensors, no remote code unless ``trust_remote_code``
        (``finetune.trust_remote_code``)."""
        raise NotImplementedError

    def check_model(self, config, model: str) -> None:
        """Before any stage: whether the base model ``model`` (``finetune.model``; ``config``: its
        ``transformers`` config, from ``io.models.check_model``) fits this task; an
        :class:`InputError` naming the fix if not."""
        raise NotImplementedError

    def with_lora(self, model, lora):
        """``model`` wrapped in PEFT LoRA adapters as ``lora`` (``config.LoraSettings``) sets them."""
        from peft import LoraConfig, get_peft_model

        targets = "all-linear" if tuple(lora.target_modules) == ("all-linear",) else list(lora.target_modules)
        return get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.lora_alpha, lora_dropout=lora.lora_dropout,
                                                target_modules=targets, task_type=self.lora_task_type))

    def warm_start(self, model, tok, data: dict, batch_size: int) -> bool:
        """Start the new head from what the trial's samples ``data`` (its arrays) say, before any
        step (``finetune.train.head_init: auto``); False where this task does not (the head as
        transformers initialised it)."""
        return False

    def check_heldout(self, pool, parts: dict) -> None:
        """Before any stage: what this task needs of the pool and the held-out parts (``parts``:
        a name such as ``validation part (file)`` -> its task pool)."""

    def eval_sums(self, out, batch: dict) -> tuple[float, float, Optional[np.ndarray]]:
        """One evaluation batch's (loss summed, count it is over, predictions or None)."""
        raise NotImplementedError

    def eval_metrics(self, loss: float, preds: Optional[np.ndarray], trues: Optional[np.ndarray],
                     n_labels: int) -> dict:
        """The validation metrics from the all-reduced mean loss (and gathered predictions);
        ``score``: higher is better."""
        raise NotImplementedError

    def sample_values(self, model, tok, data: dict, lo: int, hi: int, max_length: int, device) -> np.ndarray:
        """(hi - lo, 2) test values of samples lo..hi for :mod:`~ray_pipeline.finetune.verdict`:
        a numerator and a denominator per sample, the score is their sums' ratio."""
        raise NotImplementedError

    def predict(self, model, tok, chunk: list, max_length: int, max_new_tokens: int) -> list[dict]:
        """What the tuned model says of each item of ``chunk``."""
        raise NotImplementedError

    def test_fields(self, score: float) -> dict:
        """The trial record's fields for its test score (``test_accuracy`` or ``test_loss``)."""
        raise NotImplementedError


