"""A sequence classifier over the samples' texts (``finetune.task: classification`` on a pool with text)."""

from __future__ import annotations

from typing import Optional

import numpy as np

from ...errors import InputError
from ...io.models import loads_with
from ..metrics import macro_f1
from .base import Task, _load_kwargs, _tokenizer


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
        if pool.texts is None:
            raise InputError("fine-tuning needs the samples' texts; give data.path, not only embeddings")
        names, codes = self.codes(pool, label_names)
        return {"texts": pool.texts.tolist(), "labels": codes, "label_names": names}

    @staticmethod
    def codes(pool, label_names: Optional[list] = None) -> tuple[list, np.ndarray]:
        """(label names, the pool's labels as indices into them); every label must be one of them."""
        if pool.labels is None:
            raise InputError("classification needs labels: set data.label_column (or data.labels_path)")
        names, codes = pool.label_codes(label_names)
        if (codes < 0).any():
            missing = sorted({str(v) for v in pool.labels[codes < 0]})
            raise InputError(f"the held-out set has label(s) {missing[:5]} that the pool does not have; "
                             f"a classifier cannot learn them")
        return names, codes

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


