"""Model registry: a checkpoint stores a model's name and keyword arguments, not its class."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from diffopt.errors import unknown_name
from diffopt.models.conv4 import HEADS, INPUT_NORMS, PADDINGS, POOL_PADDINGS, Conv4
from diffopt.models.mlp import ACTIVATIONS, MLP
from diffopt.models.norm import NORMS, PerStepBatchNorm, ShiftBatchNorm, set_inner_step

__all__ = ["ACTIVATIONS", "HEADS", "INITS", "INPUT_NORMS", "MLP", "MODELS", "NORMS", "PADDINGS",
           "POOL_PADDINGS", "Conv4", "PerStepBatchNorm", "ShiftBatchNorm", "build_model", "initialize",
           "set_inner_step"]

MODELS: dict[str, type[nn.Module]] = {"mlp": MLP, "conv4": Conv4}


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """Instantiate the registered model ``name`` with ``kwargs``."""
    if name not in MODELS:
        raise unknown_name("model", name, MODELS)
    return MODELS[name](**kwargs)


def _glorot(model: nn.Module) -> None:
    """TF's defaults, which the original MAML, Reptile and MAML++ code use: Glorot-uniform
    weights (fans counting the kernel's receptive field) and zero biases for every convolution
    and linear layer; normalisation layers keep their ones and zeros."""
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


def _glorot_normal_output(model: nn.Module) -> None:
    """``_glorot``, but the output layer (the last linear layer) drawn from N(0, 1), as cbfinn/maml's
    Omniglot head (maml.py: ``tf.random_normal`` for w5 after global average pooling)."""
    _glorot(model)
    output = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    nn.init.normal_(output.weight)


INITS: dict[str, Callable[[nn.Module], None] | None] = {
    "torch": None, "glorot": _glorot, "glorot_normal_output": _glorot_normal_output}
"""Weight initialisations by name: ``torch`` keeps the layers' own (Kaiming-uniform), ``glorot``,
``glorot_normal_output``."""


def initialize(model: nn.Module, init: str) -> nn.Module:
    """Re-initialise ``model``'s weights in place as ``init`` (``INITS``) says; return it."""
    if init not in INITS:
        raise unknown_name("weight initialisation", init, INITS)
    if INITS[init] is not None:
        INITS[init](model)
    return model
