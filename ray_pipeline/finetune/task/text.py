"""A sequence classifier over the samples' texts (``finetune.task: classification`` on a pool with text)."""

from __future__ import annotations

from typing import Optional

import numpy as np

from ...errors import InputError
from ...io.models import loads_with
from ..metrics import macro_f1
from .base import Task, _load_kwargs, _tokenizer, label_tensor, size, with_new_head


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

    def warm_start(self, model, fe, data: dict, batch_size: int) -> bool:
        """LP-FT (Kumar et al., ICLR 2022): the head starts as the logistic regression (the linear
        probe of ``finetune.proxy``) fit on the frozen encoder's vectors of the trial's own
        samples, so fine-tuning begins where the probe ends instead of distorting the features
        with a random head's gradients. For a model with an ``embed`` method and a
        ``UnitVectorHead`` (``io.packaged``: the packaged GE2E and EfficientNet-Lite0; a text model's
        head starts random); every rank fits the same probe from the same samples."""
        import torch

        from ...io.packaged import UnitVectorHead
        from ...select.boundary import fit_probe

        embed, head = getattr(model, "embed", None), getattr(model, "head", None)
        if embed is None or not isinstance(head, UnitVectorHead):
            return False
        scale, head = head.scale, head.classifier
        with torch.no_grad():
            x = np.concatenate([embed(**self.batch(fe, data, range(lo, min(lo + batch_size, size(data))), 0,
                                                   labels=False)).float().cpu().numpy()
                                for lo in range(0, size(data), batch_size)])
        y = np.asarray(data["labels"])
        w = np.zeros(tuple(head.weight.shape), np.float64)
        b = np.full(head.out_features, -20.0)  # a label the samples lack is never predicted
        probe = fit_probe(x, y)
        if probe is None:  # one label: predict it
            b[y[0]] = 0.0
        elif len(probe.classes_) == 2:  # sklearn's one logit z for the second class: split it +-z/2
            lo, hi = probe.classes_
            w[hi], w[lo] = probe.coef_[0] / 2, -probe.coef_[0] / 2
            b[hi], b[lo] = probe.intercept_[0] / 2, -probe.intercept_[0] / 2
        else:
            w[probe.classes_], b[probe.classes_] = probe.coef_, probe.intercept_
        with torch.no_grad():
            head.weight.copy_(torch.as_tensor(w / scale, dtype=head.weight.dtype))
            head.bias.copy_(torch.as_tensor(b, dtype=head.bias.dtype))
        return True

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
        enc = tok([data["texts"][i] for i in idx], padding=True, truncation=True, max_length=max_length,
                  return_tensors="pt")
        return {**enc, **label_tensor(data, idx, labels)}

    def load(self, path: str, label_names: Optional[list] = None, *, precision: str = "fp32",
             quantization: str = "none", trust_remote_code: bool = False):
        from transformers import AutoModelForSequenceClassification

        tok = _tokenizer(path, trust_remote_code)
        model = with_new_head(AutoModelForSequenceClassification, path, label_names,
                              **_load_kwargs(precision, quantization, trust_remote_code))
        if label_names is not None:
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
        return self.labelled(model, model(**enc).logits)

    @staticmethod
    def labelled(model, logits) -> list[dict]:
        """Each row's most probable label and its probability."""
        p, i = logits.softmax(-1).max(-1)
        return [{"label": model.config.id2label[int(j)], "probability": float(q)} for q, j in zip(p, i)]

    def test_fields(self, score):
        return {"test_accuracy": score}


