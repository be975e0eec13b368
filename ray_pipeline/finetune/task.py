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

import math
from typing import Optional

import numpy as np

from ..errors import InputError
from ..io.chat import chat_tokens
from ..io.models import check_model, loads_with
from .metrics import macro_f1


def size(data: dict) -> int:
    """How many samples a task's arrays hold (texts, prompts or chats)."""
    return len(next(data[k] for k in ("texts", "prompts", "chats") if k in data))


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


def torch_dtype(precision: str):
    """The torch dtype of a precision name (``fp32``, ``bf16``, ``fp16``)."""
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


class Task:
    """The interface; :class:`Classification` and :class:`CausalLM` fill it in.

    ``name``: the config's ``finetune.task``. ``default_model``: the packaged model of
    ``finetune.model: default``. ``default_proxy``: what ``finetune.proxy.kind: auto`` means.
    ``lora_by_default``: LoRA when ``finetune.lora.enabled`` is empty. ``metric``: the test
    score's name in the verdict; ``is_loss``: the score is minus a loss (shown as the loss).
    ``loss_takes_num_items``: the model's loss divides by the items of a whole accumulated step
    (``num_items_in_batch``, HF ``Trainer``) rather than averaging each micro-batch."""

    name: str
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


class Classification(Task):
    """A sequence classifier (``AutoModelForSequenceClassification``, a new head for the pool's
    labels); score = accuracy, also macro-F1 and loss. Test values: (correct, 1) per sample."""

    name = "classification"
    default_model = "minilm"
    default_proxy = "probe"
    lora_by_default = False
    lora_task_type = "SEQ_CLS"  # PEFT keeps the new head trainable
    metric, is_loss = "test accuracy", False
    loss_takes_num_items = False  # a sequence classifier's loss ignores it (it accepts **kwargs, though)

    def arrays(self, pool, label_names: Optional[list] = None) -> dict:
        if pool.labels is None:
            raise InputError("classification needs labels: set data.label_column (or data.labels_path)")
        if pool.texts is None:
            raise InputError("fine-tuning needs the samples' texts; give data.path, not only embeddings")
        names, codes = pool.label_codes(label_names)
        if (codes < 0).any():
            missing = sorted({str(v) for v in pool.labels[codes < 0]})
            raise InputError(f"the held-out set has label(s) {missing[:5]} that the pool does not have; "
                             f"a classifier cannot learn them")
        return {"texts": pool.texts.tolist(), "labels": codes, "label_names": names}

    def label_names(self, pool) -> Optional[list]:
        return None if pool.labels is None else pool.label_codes()[0]

    def check_heldout(self, pool, parts: dict) -> None:
        if pool.labels is None:
            raise InputError("classification needs the pool's labels: set data.label_column (or "
                             "data.labels_path), or finetune.task: instruction")
        known = {str(v) for v in pool.labels}
        for where, p in parts.items():
            theirs = {str(v) for v in p.labels}
            unknown = sorted(theirs - known)
            if unknown:
                none = " (none of its labels is in the pool)" if not known & theirs else ""
                raise InputError(f"the held-out {where} has {len(unknown)} label(s) the pool does not have, e.g. "
                                 f"{unknown[:3]}{none}; a classifier cannot learn them: remove those rows, or check "
                                 f"data.label_column")

    def batch(self, tok, data: dict, idx, max_length: int, *, labels: bool = True) -> dict:
        import torch

        enc = tok([data["texts"][i] for i in idx], padding=True, truncation=True, max_length=max_length,
                  return_tensors="pt")
        if labels:
            enc["labels"] = torch.as_tensor(np.asarray(data["labels"], dtype=np.int64)[np.asarray(idx, dtype=np.int64)])
        return enc

    def load(self, path: str, label_names: Optional[list] = None, *, precision: str = "fp32",
             quantization: str = "none", trust_remote_code: bool = False):
        from transformers import AutoModelForSequenceClassification

        tok = _tokenizer(path, trust_remote_code)
        kw = _load_kwargs(precision, quantization, trust_remote_code)
        if label_names is None:  # a tuned classifier, with its own labels
            return AutoModelForSequenceClassification.from_pretrained(path, **kw), tok
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=len(label_names), id2label=dict(enumerate(label_names)),
            label2id={v: i for i, v in enumerate(label_names)}, ignore_mismatched_sizes=True, **kw)
        model.config.pad_token_id = tok.pad_token_id
        return model, tok

    def check_model(self, config, model: str) -> None:
        """Any encoder or decoder that ``AutoModelForSequenceClassification`` has a head for (a new
        head is put on for the pool's labels)."""
        if not loads_with(config, "AutoModelForSequenceClassification"):
            raise InputError(f"finetune.model {model!r} (model_type {config.model_type!r}) has no sequence-"
                             f"classification model in transformers (AutoModelForSequenceClassification); name an "
                             f"encoder such as 'minilm' or BAAI/bge-small-en-v1.5, or a decoder such as "
                             f"Qwen/Qwen2.5-0.5B-Instruct, or set finetune.task: instruction")

    def eval_sums(self, out, batch: dict):
        n = len(batch["labels"])
        return float(out.loss) * n, n, out.logits.argmax(-1).cpu().numpy()

    def eval_metrics(self, loss, preds, trues, n_labels):
        acc = float((preds == trues).mean()) if len(trues) else 0.0
        return {"eval_loss": loss, "accuracy": acc, "macro_f1": macro_f1(trues, preds, n_labels), "score": acc}

    def sample_values(self, model, tok, data, lo, hi, max_length, device):
        batch = self.batch(tok, data, range(lo, hi), max_length, labels=False)
        pred = model(**{k: v.to(device) for k, v in batch.items()}).logits.argmax(-1).cpu().numpy()
        return np.stack([pred == np.asarray(data["labels"])[lo:hi], np.ones(len(pred))], axis=1)

    def predict(self, model, tok, chunk, max_length, max_new_tokens):
        enc = tok(list(chunk), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        p, i = model(**enc).logits.softmax(-1).max(-1)
        return [{"label": model.config.id2label[int(j)], "probability": float(q)} for q, j in zip(p, i)]

    def test_fields(self, score):
        return {"test_accuracy": score}


class CausalLM(Task):
    """A causal LM (``AutoModelForCausalLM``) tuned on responses: prompt + response pairs, or
    conversations rendered with the chat template (loss on the assistant turns). Score = minus
    the token-weighted response loss, also perplexity. Test values: (-loss summed over a sample's
    response tokens, tokens)."""

    name = "instruction"
    default_model, default_proxy = "smollm2", "coverage"
    lora_by_default, lora_task_type = True, "CAUSAL_LM"
    metric, is_loss = "test loss", True
    loss_takes_num_items = True  # token-weighted over the accumulated micro-batches

    def read(self, pool, data, ft):
        """Each sample's turns (a chat column: ``data.chat_column``, or ``messages`` /
        ``conversations``: trained on whatever is embedded), else its prompt
        (``finetune.instruction.prompt_template`` over the record's fields) and response
        (``finetune.instruction.response_field``)."""
        from dataclasses import replace

        from ..io.chat import chat_column, check_trainable
        from ..io.pool import read_chats

        table = pool.records
        if table is None:
            raise InputError("instruction tuning needs the samples' records; give data.path, not only embeddings")
        chat = chat_column(table.column_names, data.chat_column, has_text=False)
        if chat is not None:
            chats = read_chats(table, chat, str(data.path))
            for i, conv in enumerate(chats):
                check_trainable(conv, f"{data.path}, row {i} ({chat})")
            return replace(pool, extra={"chats": np.array(chats + [None], dtype=object)[:-1]})  # lists, not 2-d
        ins = ft.instruction
        if ins.response_field not in table.column_names:
            raise InputError(f"{data.path} has no response column {ins.response_field!r}; set "
                             f"finetune.instruction.response_field")
        cols = {c: table.column(c).to_pylist() for c in table.column_names}
        prompts = [ins.prompt_template.format(**{c: ("" if v[i] is None else v[i]) for c, v in cols.items()})
                   for i in range(table.num_rows)]
        responses = ["" if v is None else str(v) for v in cols[ins.response_field]]
        return replace(pool, extra={"prompts": np.array(prompts, dtype=object),
                                    "responses": np.array(responses, dtype=object)})

    def arrays(self, pool, label_names: Optional[list] = None) -> dict:
        if "chats" in pool.extra:
            return {"chats": list(pool.extra["chats"])}
        return {"prompts": list(pool.extra["prompts"]), "responses": list(pool.extra["responses"])}

    def batch(self, tok, data: dict, idx, max_length: int, *, labels: bool = True) -> dict:
        if "chats" in data:
            return padded(tok, [chat_tokens(tok, data["chats"][i], max_length) for i in idx])
        return instruction_batch(tok, [data["prompts"][i] for i in idx], [data["responses"][i] for i in idx],
                                 max_length)

    def load(self, path: str, label_names: Optional[list] = None, *, precision: str = "fp32",
             quantization: str = "none", trust_remote_code: bool = False):
        from transformers import AutoModelForCausalLM

        return (AutoModelForCausalLM.from_pretrained(path, **_load_kwargs(precision, quantization, trust_remote_code)),
                _tokenizer(path, trust_remote_code))

    def check_model(self, config, model: str) -> None:
        """A causal LM: a ``...ForCausalLM`` (or a base model whose type ``AutoModelForCausalLM``
        maps); a saved classifier cannot generate."""
        heads = [a for a in config.architectures or [] if a.endswith(CLASSIFIER_HEADS)]
        if heads:
            raise InputError(f"finetune.model {model!r} is a saved classifier ({heads[0]}), which cannot generate; "
                             f"finetune.task: instruction needs a causal LM (a ...ForCausalLM model, e.g. "
                             f"finetune.model: default or HuggingFaceTB/SmolLM2-135M-Instruct), or tune this one "
                             f"with finetune.task: classification")
        if not loads_with(config, "AutoModelForCausalLM"):
            raise InputError(f"finetune.model {model!r} (model_type {config.model_type!r}) is not a causal LM "
                             f"(AutoModelForCausalLM has no model for it); finetune.task: instruction needs one, "
                             f"e.g. finetune.model: default or Qwen/Qwen2.5-0.5B-Instruct")

    def eval_sums(self, out, batch: dict):
        tokens = int((batch["labels"][:, 1:] != -100).sum())
        return float(out.loss) * tokens, tokens, None

    def eval_metrics(self, loss, preds, trues, n_labels):
        return {"eval_loss": loss, "perplexity": math.exp(min(loss, 50.0)), "score": -loss}

    def sample_values(self, model, tok, data, lo, hi, max_length, device):
        import torch

        batch = self.batch(tok, data, range(lo, hi), max_length)
        logits = model(input_ids=batch["input_ids"].to(device),
                       attention_mask=batch["attention_mask"].to(device)).logits[:, :-1].float()
        labels = batch["labels"][:, 1:].to(device)
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100,
                                                reduction="none")  # (b, t-1), 0 where ignored
        tokens = (labels != -100).sum(dim=1)
        return np.stack([-nll.sum(dim=1).cpu().numpy(), tokens.cpu().numpy()], axis=1)

    def predict(self, model, tok, chunk, max_length, max_new_tokens):
        out = []
        for prompt in chunk:
            enc = tok(chat_prompt(tok, prompt), return_tensors="pt", add_special_tokens=False) \
                if isinstance(prompt, list) else tok(prompt, return_tensors="pt")
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
            out.append({"generation": tok.decode(gen[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)})
        return out

    def test_fields(self, score):
        return {"test_loss": -score}


# Heads of a saved model that are not a causal LM's: such a model cannot generate.
CLASSIFIER_HEADS = ("ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering",
                    "ForMultipleChoice")

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


# ----------------------------------------------------------------------------------------------
# causal-LM batches


def instruction_batch(tok, prompts: list, responses: list, max_length: int) -> dict:
    """Prompt + response + EOS, right-padded; labels -100 on prompt and padding, so the loss
    covers the response tokens only."""
    pairs = []
    for p, r in zip(prompts, responses):
        pi = tok(p, add_special_tokens=False)["input_ids"]
        ri = tok(r, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        pairs.append(((pi + ri)[:max_length], ([-100] * len(pi) + ri)[:max_length]))
    return padded(tok, pairs)


def padded(tok, pairs: list[tuple[list[int], list[int]]]) -> dict:
    """(ids, labels) per sample as right-padded tensors (labels -100 on the padding)."""
    import torch

    ids, labels = [p[0] for p in pairs], [p[1] for p in pairs]
    width = max(len(s) for s in ids)
    input_ids = torch.full((len(ids), width), tok.pad_token_id, dtype=torch.long)
    label_t = torch.full((len(ids), width), -100, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, (s, lab) in enumerate(zip(ids, labels)):
        input_ids[i, :len(s)] = torch.as_tensor(s)
        label_t[i, :len(lab)] = torch.as_tensor(lab)
        mask[i, :len(s)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": label_t}


def chat_prompt(tok, conv: list[dict]) -> str:
    """The conversation through its last user turn, rendered for the model to answer."""
    last = max((i for i, t in enumerate(conv) if t["role"] == "user"), default=None)
    if last is None:
        raise InputError("a conversation to answer needs a user turn")
    return tok.apply_chat_template(conv[:last + 1], tokenize=False, add_generation_prompt=True)
