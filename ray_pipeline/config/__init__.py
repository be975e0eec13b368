"""The run's one typed config, validated once at construction and passed down whole.

Owns: the schema (``schema``: data, embed, cluster, select; ``finetune``: the fine-tuning
sections) and the parsers of its values (``typed``). Imports only ``errors``; every other
subpackage may import this one.
"""

from .finetune import (  # noqa: F401
    FinetuneConfig,
    HeldoutSettings,
    InstructionSettings,
    LoraSettings,
    ProxySettings,
    ResourceSettings,
    SweepSettings,
    TrainSettings,
)
from .schema import ClusterConfig, Config, DataConfig, EmbedConfig, SelectConfig  # noqa: F401

__all__ = ["Config", "DataConfig", "EmbedConfig", "ClusterConfig", "SelectConfig", "FinetuneConfig", "HeldoutSettings",
           "InstructionSettings", "TrainSettings", "LoraSettings", "ProxySettings", "SweepSettings", "ResourceSettings"]
