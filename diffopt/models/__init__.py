"""Model registry: a checkpoint stores a model's name and keyword arguments, not its class."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from diffopt.errors import DiffoptError, unknown_name
from diffopt.models.conv4 import HEADS, INPUT_NORMS, PADDINGS, POOL_PADDINGS, Conv4
from diffopt.models.mlp import ACTIVATIONS, MLP
from diffopt.models.norm import NORMS, PerStepBatchNorm, ShiftBatchNorm, set_inner_step
from diffopt.models.resnet12 import RESNET12_DEFAULTS, ResNet12
from diffopt.plugins import is_plugin, load_plugin

__all__ = ["ACTIVATIONS", "HEADS", "IMAGE_MODELS", "INITS", "INPUT_NORMS", "MLP", "MODELS", "NORMS",
           "PADDINGS", "POOL_PADDINGS", "Conv4", "PerStepBatchNorm", "ResNet12", "ShiftBatchNorm",
           "build_model", "initialize", "model_defaults", "model_factory", "set_inner_step"]

MODELS: dict[str, type[nn.Module]] = {"mlp": MLP, "conv4": Conv4, "resnet12": ResNet12}
IMAGE_MODELS = ("conv4", "resnet12")
"""The registered image models: they take the options ``head``, ``pool_padding`` and ``input_norm``."""
MODEL_DEFAULTS: dict[str, dict[str, Any]] = {"resnet12": RESNET12_DEFAULTS}
"""Training options a registered model starts from, over the dataset's and the algorithm's."""


def model_defaults(name: object) -> dict[str, Any]:
    """``MODEL_DEFAULTS`` of the model ``name`` (none for most models, and for a plugin)."""
    return dict(MODEL_DEFAULTS.get(name, {})) if isinstance(name, str) else {}


def model_factory(name: object) -> Callable[..., nn.Module]:
    """The registered model ``name``, or the factory ``module:attribute`` names."""
    if is_plugin(name):
        factory = load_plugin(name, "model")
        if not callable(factory):
            raise DiffoptError(f"model {name!r} is a {type(factory).__name__}, not a model factory")
        return factory
    if not isinstance(name, str) or name not in MODELS:
        raise unknown_name("model", name, MODELS, "my_models:wide_mlp")
    return MODELS[name]


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """The model ``name`` (registered, or ``module:attribute``: a factory taking the data's model
    keyword arguments, e.g. ``in_features``, ``out_features``, ``hidden``, ``activation``,
    ``norm``, ``norm_eps``, ``steps``; it may take ``**kwargs`` and ignore some) built with ``kwargs``."""
    factory = model_factory(name)
    try:
        model = factory(**kwargs)
    except TypeError as error:
        if not is_plugin(name):
            raise
        raise DiffoptError(f"model {name!r} cannot be built from the data's model options "
                           f"({', '.join(sorted(kwargs))}): {error}") from None
    if not isinstance(model, nn.Module):
        raise DiffoptError(f"model {name!r} made a {type(model).__name__}, not a torch.nn.Module")
    return model


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
