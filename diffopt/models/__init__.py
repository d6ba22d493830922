"""Model registry: a checkpoint stores a model's name and keyword arguments, not its class."""

from __future__ import annotations

from typing import Any

from torch import nn

from diffopt.errors import unknown_name
from diffopt.models.conv4 import Conv4
from diffopt.models.mlp import ACTIVATIONS, MLP
from diffopt.models.norm import NORMS, PerStepBatchNorm, set_inner_step

__all__ = ["ACTIVATIONS", "MLP", "MODELS", "NORMS", "Conv4", "PerStepBatchNorm", "build_model",
           "set_inner_step"]

MODELS: dict[str, type[nn.Module]] = {"mlp": MLP, "conv4": Conv4}


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """Instantiate the registered model ``name`` with ``kwargs``."""
    if name not in MODELS:
        raise unknown_name("model", name, MODELS)
    return MODELS[name](**kwargs)
