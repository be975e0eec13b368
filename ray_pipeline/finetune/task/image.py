"""An image classifier: ``finetune.task: classification`` on a pool of images without text.

The pretrained image encoder with a classification head, through
``AutoModelForImageClassification``: the packaged EfficientNet-Lite0 (``finetune.model:
default``, :mod:`ray_pipeline.io.effnet`) or any Hugging Face image model by directory or Hub id
(ViT, ConvNeXt, ResNet, DINOv2, ...), its own image processor in place of a tokenizer. The images
are decoded in each batch.
"""

from __future__ import annotations

from .base import label_tensor
from .media import MediaClassification


def open_image(source):
    """A path or encoded bytes -> an RGB ``PIL.Image``."""
    import io

    from PIL import Image

    return Image.open(io.BytesIO(source) if isinstance(source, bytes) else source).convert("RGB")


class ImageClassification(MediaClassification):
    """``AutoModelForImageClassification`` over ``AutoImageProcessor`` batches (``pixel_values``)."""

    modality, processor, default_model = "image", "image_processor", "efficientnet-lite0"
    kind, sources, noun = "image", "images", "images"
    auto_model, auto_processor = "AutoModelForImageClassification", "AutoImageProcessor"
    examples = "'default' (the packaged EfficientNet-Lite0) or google/vit-base-patch16-224"

    def batch(self, proc, data: dict, idx, max_length: int, *, labels: bool = True) -> dict:
        pixels = proc(images=[open_image(data["image"][i]) for i in idx], return_tensors="pt")["pixel_values"]
        return {"pixel_values": pixels, **label_tensor(data, idx, labels)}
