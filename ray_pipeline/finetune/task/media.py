"""What the classifiers of samples without text share (recordings: :mod:`.audio`, images:
:mod:`.image`): the samples travel to the trial workers as their sources (paths or bytes) and are
decoded in each batch; the model is an ``AutoModelFor...Classification`` with a new head, its
processor (feature extractor, image processor) in place of a tokenizer; the packaged encoders
(``io.ge2e``, ``io.effnet``) are registered with transformers' Auto classes before loading."""

from __future__ import annotations

from typing import Optional

from ...errors import InputError
from ...io.models import loads_with
from .base import _load_kwargs, with_new_head
from .text import Classification


def register_packaged() -> None:
    """The packaged speech and image models (GE2E, EfficientNet-Lite0) in transformers' Auto
    classes, so that their configs and tuned copies load in this process."""
    from ...io import effnet, ge2e  # noqa: F401  (each registers itself when imported)


class MediaClassification(Classification):
    """``kind``: the arrays' key for the sources and the ``data.<kind>_column`` that holds them;
    ``sources``: the ``Pool`` field; ``noun``: what they are, in errors; ``auto_model`` / ``auto_processor``: the transformers Auto
    classes; ``examples``: models to name in an error. Subclasses make the batches."""

    kind: str
    sources: str
    noun: str
    auto_model: str
    auto_processor: str
    examples: str

    def settings(self, pool) -> dict:
        """What the batches need of the pool beside its samples (``SETTINGS``)."""
        return {}

    def arrays(self, pool, label_names: Optional[list] = None) -> dict:
        sources = getattr(pool, self.sources)
        if sources is None:
            raise InputError(f"fine-tuning a model of {self.noun} needs them: set data.{self.kind}_column")
        names, codes = self.codes(pool, label_names)
        return {self.kind: list(sources), "labels": codes, "label_names": names, **self.settings(pool)}

    def load(self, path: str, label_names: Optional[list] = None, *, precision: str = "fp32",
             quantization: str = "none", trust_remote_code: bool = False):
        import transformers

        register_packaged()
        proc = getattr(transformers, self.auto_processor).from_pretrained(path, trust_remote_code=trust_remote_code)
        return with_new_head(getattr(transformers, self.auto_model), path, label_names,
                             **_load_kwargs(precision, quantization, trust_remote_code)), proc

    def check_model(self, config, model: str) -> None:
        """A model ``auto_model`` has a head for (a new one is put on)."""
        if not loads_with(config, self.auto_model):
            raise InputError(f"finetune.model {model!r} (model_type {config.model_type!r}) has no {self.modality}-"
                             f"classification model in transformers ({self.auto_model}), and this pool's samples "
                             f"are {self.noun}; name a model such as {self.examples}, or give data.text_column "
                             f"to tune a text model")

    def predict(self, model, proc, chunk, max_length, max_new_tokens):
        """``chunk``: samples (paths or bytes)."""
        data = {self.kind: list(chunk), **self.settings(None)}
        return self.labelled(model, model(**self.batch(proc, data, range(len(chunk)), 0, labels=False)).logits)
