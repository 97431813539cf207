"""Model zoo: registry, builder, architectures and their published weights."""

from .pretrained import PretrainedCfg
from .registry import ModelEntry, ZooModel, get_entry, list_models, register_model

__all__ = ["PretrainedCfg", "ModelEntry", "ZooModel", "get_entry", "list_models", "register_model"]
