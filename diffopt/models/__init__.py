"""Model registry: a checkpoint stores a model's name and keyword arguments, not its class."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from diffopt.errors import DiffoptError, as_typed, unknown_name
from diffopt.models.conv4 import HEADS, INPUT_NORMS, PADDINGS, POOL_PADDINGS, Conv4
from diffopt.models.mlp import ACTIVATIONS, MLP
from diffopt.models.norm import NORMS, PerStepBatchNorm, ShiftBatchNorm, set_inner_step
from diffopt.models.resnet12 import RESNET12_DEFAULTS, ResNet12
from diffopt.options import Option, check_float, check_int, check_name
from diffopt.plugins import is_plugin, load_plugin

__all__ = ["ACTIVATIONS", "HEADS", "IMAGE_MODELS", "INITS", "INPUT_NORMS", "MLP", "MODELS", "NORMS",
           "PADDINGS", "POOL_PADDINGS", "Conv4", "PerStepBatchNorm", "ResNet12", "ShiftBatchNorm",
           "MODEL_OPTIONS", "build_model", "check_model_options", "initialize", "model_arguments",
           "model_defaults", "model_factory", "set_inner_step"]

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


MODEL_OPTIONS: dict[str, Option] = {
    "model": Option(
        str | None, "mlp", f"model: {', '.join(MODELS)}, or module:factory (called with the data's model "
        "keyword arguments); default: the dataset's (resnet12 brings its own widths, activation, norm, "
        "head, init)"),
    "hidden": Option(
        tuple[int, ...] | None, (40, 40), "hidden layer widths of the MLP, e.g. 40,40; conv4's filters or "
        "resnet12's widths: one or four"),
    "activation": Option(str | None, "relu", f"activation of the MLP and conv4: {', '.join(ACTIVATIONS)}"),
    "head": Option(
        str | None, "flatten", f"conv4's output layer reads: {', '.join(HEADS)} (mean: the last map "
        "averaged over positions, cbfinn/maml on Omniglot); default: the algorithm's original code",
        before="flatten"),
    "padding": Option(
        str | None, "same", f"conv4's padding: {', '.join(PADDINGS)} (same: TensorFlow's 'SAME', the odd "
        "pixel at the bottom/right, as the original MAML and Reptile code; symmetric: torch's "
        "padding=1); they differ for the strided convolutions on Omniglot only; default: same",
        before="symmetric"),
    "pool": Option(
        bool | None, None, "conv4: stride-1 convolutions each followed by 2x2 max-pooling (True: MAML on "
        "Mini-ImageNet, MAML++ on both datasets) or stride-2 convolutions (False: MAML and Reptile "
        "on Omniglot); default: the dataset's"),
    "pool_padding": Option(
        str | None, "valid", f"conv4's max-pooling of odd sizes: {', '.join(POOL_PADDINGS)} (valid drops "
        "the last row/column, as MAML and MAML++; same keeps it, as Reptile's Mini-ImageNet model); "
        "default: the algorithm's original code", before="valid"),
    "input_norm": Option(
        str | None, "none", f"conv4 standardises its input per channel: {', '.join(INPUT_NORMS)} "
        "(imagenet: MAML++ on Mini-ImageNet); default: none, as MAML and Reptile", before="none"),
    "norm_eps": Option(
        float | None, 1e-5, "epsilon of the normalisation layers (TF's 1e-3 for MAML and Reptile on "
        "images, as their original code; torch's 1e-5 elsewhere)", before=1e-5),
    "init": Option(
        str | None, "torch", f"weight initialisation: {', '.join(INITS)} (default: glorot on images, as the "
        "original MAML, Reptile and MAML++ code; torch elsewhere)", before="torch"),
    "norm": Option(
        str | None, "none", f"normalisation after each hidden layer: {', '.join(NORMS)} (MAML++: "
        "per_step_batch, per-inner-step running statistics, weights and biases)"),
}
"""The ``diffopt train`` options of the model (``diffopt.options.Option``)."""


def check_model_options(options: Any, dataset: str, model_io: dict[str, Any]) -> None:
    """DiffoptError naming the first bad model option of ``options`` (a config) for a dataset
    ``dataset`` whose loader gives ``model_io``."""
    model = options.model
    model_factory(model)
    check_name("activation", options.activation, ACTIVATIONS)
    check_name("norm", options.norm, NORMS)
    check_name("weight initialisation", options.init, INITS)
    check_name("head", options.head, HEADS)
    if options.head != "flatten" and model not in IMAGE_MODELS:
        raise DiffoptError(f"--head {options.head} applies to {' and '.join(IMAGE_MODELS)}; "
                           f"{model} has no head to choose")
    check_name("padding", options.padding, PADDINGS)
    if options.padding != "same" and model != "conv4":
        raise DiffoptError(f"--padding {options.padding} applies to conv4; {model} has no strided "
                           "convolutions")
    check_name("pool padding", options.pool_padding, POOL_PADDINGS)
    check_name("input norm", options.input_norm, INPUT_NORMS)
    if options.input_norm != "none" and model not in IMAGE_MODELS:
        raise DiffoptError(f"--input_norm {options.input_norm} applies to {' and '.join(IMAGE_MODELS)} "
                           "(images)")
    if options.pool is not None and (model != "conv4" or not isinstance(options.pool, bool)):
        raise DiffoptError(f"--pool takes True or False and applies to conv4; got "
                           f"{as_typed(options.pool)} with --model {model}")
    if not isinstance(options.hidden, tuple) or not options.hidden:
        raise DiffoptError(f"--hidden must list layer widths, e.g. 40,40; got {as_typed(options.hidden)}")
    for width in options.hidden:
        check_int("hidden", width, 1)
    if model in IMAGE_MODELS and len(options.hidden) not in (1, 4):
        example = "64 or 32,32,64,64" if model == "conv4" else "64 (64,160,320,640) or 2,3,4,5"
        raise DiffoptError(f"--hidden for {model} is one filter count or four, e.g. {example}; "
                           f"got {','.join(map(str, options.hidden))}")
    if model in IMAGE_MODELS and "in_channels" not in model_io:
        raise DiffoptError(f"--model {model} reads images; {dataset} has none")
    check_float("norm_eps", options.norm_eps, positive=True)


def model_arguments(options: Any, model_io: dict[str, Any], steps: int) -> dict[str, Any]:
    """``build_model``'s keyword arguments for the model ``options`` (a config) sets, on data whose
    loader gives ``model_io``, with ``steps`` inner steps (per-step layers)."""
    image = (dict(head=options.head, pool_padding=options.pool_padding, input_norm=options.input_norm)
             if options.model in IMAGE_MODELS else {})
    if options.model == "conv4":
        image["padding"] = options.padding
    io = dict(model_io, pool=options.pool) if options.pool is not None else dict(model_io)
    return dict(hidden=options.hidden, activation=options.activation, norm=options.norm,
                norm_eps=options.norm_eps, steps=steps, **image, **io)
