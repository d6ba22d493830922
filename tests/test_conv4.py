"""Conv-4 (Omniglot's strided and Mini-ImageNet's pooled variants) with every algorithm and every
inner rule that algorithm accepts: one meta-iteration gives finite meta-gradients that reach
every meta-parameter (model weights, and a learned rule's own parameters under MAML)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from diffopt.algorithms import ALGORITHMS, build_algorithm
from diffopt.data import Episode
from diffopt.inner import InnerLoop
from diffopt.models import ShiftBatchNorm, build_model
from diffopt.models.conv4 import SameConv2d
from diffopt.optim import INNER_OPTIMIZERS, inner_rule_names

VARIANTS = {  # name -> (model options, image shape)
    "omniglot": (dict(in_channels=1, image_size=28, pool=False, hidden=(8,)), (1, 28, 28)),
    "miniimagenet": (dict(in_channels=3, image_size=84, pool=True, hidden=(4,)), (3, 84, 84)),
    # cbfinn/maml's Omniglot model: TF batch norm (shift, no scale, eps 1e-3), averaged last map
    "omniglot-cbfinn": (dict(in_channels=1, image_size=28, pool=False, hidden=(8,), norm="batch_shift",
                             norm_eps=1e-3, head="mean"), (1, 28, 28)),
}
BASE_OPTIMIZERS = ("sgd", "momentum", "adam", "adam_beta1_0")
"""Every algorithm runs with these; the other torch optimizers higher differentiates with MAML
(tests/test_gradients.py checks them all), ANIL and BOIL with sgd and lslr (test_anil.py)."""
COMBINATIONS = [(a, r) for a in ALGORITHMS for r in inner_rule_names()
                if (ALGORITHMS[a].learns_update_rule or r in INNER_OPTIMIZERS)
                and (a == "maml" or r in BASE_OPTIMIZERS or r not in INNER_OPTIMIZERS)
                and (a not in ("anil", "boil") or r in ("sgd", "lslr"))]


def image_episode(shape: tuple[int, ...], ways: int = 3, tasks: int = 2) -> Episode:
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(ways).repeat(tasks, 2)  # [tasks, 2 * ways]: 2 shots per class
    x = torch.rand(tasks, 2 * ways, *shape, generator=g)
    return Episode(x[:, :ways], labels[:, :ways], x[:, ways:], labels[:, ways:])


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("algorithm, rule", COMBINATIONS)
def test_conv4_meta_iteration_with_every_algorithm_and_rule(variant, algorithm, rule):
    options, shape = VARIANTS[variant]
    torch.manual_seed(0)
    model = build_model("conv4", out_features=3, activation="relu", steps=2, **{"norm": "batch", **options})
    inner = InnerLoop(rule, 0.1 if "adam" not in rule else 0.001, 2, model=model,
                      proximal=1.0 if algorithm == "imaml" else 0.0)
    meta = build_algorithm(algorithm, model, inner, F.cross_entropy)
    metrics = meta.meta_gradient(image_episode(shape))
    assert torch.isfinite(torch.tensor(metrics["loss"]))
    shift_free = biases_before_batch_norm(model)
    for name, parameter in meta.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
        if name not in shift_free:
            assert parameter.grad.abs().sum() > 0, name


def biases_before_batch_norm(model: torch.nn.Sequential) -> set[str]:
    """Names (as meta-parameters) of the conv biases that batch norm directly follows: batch norm
    removes a constant shift, so their true gradient is zero and a float32 one is 0 or rounding
    noise (which an inner Adam scales up to full steps): not a sign of a broken graph."""
    children = list(model.named_children())
    pairs = zip(children, children[1:], strict=False)
    return {f"model.{name}.bias" for (name, module), (_, following) in pairs
            if isinstance(module, torch.nn.Conv2d)
            and isinstance(following, (torch.nn.BatchNorm2d, ShiftBatchNorm))}


@pytest.mark.parametrize("dataset, algorithm, flags, pools, features", [
    ("omniglot", "maml", {}, 0, 64),  # cbfinn: strided, the last 2x2 map averaged
    ("omniglot", "reptile", {}, 0, 256),  # supervised-reptile: strided, 2x2x64 flattened
    ("miniimagenet", "maml", {}, 4, 800),  # cbfinn: 'VALID' pooling, 84-42-21-10-5
    ("miniimagenet", "reptile", {}, 4, 1152),  # supervised-reptile: 'same' pooling, 84-42-21-11-6
    # MAML++ on Omniglot: stride-1 convolutions, max-pooling (28-14-7-3-1), leaky ReLU
    ("omniglot", "maml", dict(pool=True, activation="leaky_relu", head="flatten"), 4, 64),
])
def test_each_protocol_builds_its_original_feature_map(dataset, algorithm, flags, pools, features):
    from diffopt.config import resolve_config
    from diffopt.train import build

    config = resolve_config(dataset=dataset, algorithm=algorithm, **flags)
    model = build(config).model
    assert sum(isinstance(m, torch.nn.MaxPool2d) for m in model.modules()) == pools
    assert [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1].in_features == features
    activation = torch.nn.LeakyReLU if flags.get("activation") == "leaky_relu" else torch.nn.ReLU
    assert sum(isinstance(m, activation) for m in model.modules()) == 4
    size = 28 if dataset == "omniglot" else 84
    channels = 1 if dataset == "omniglot" else 3
    assert model(torch.rand(2, channels, size, size)).shape == (2, 5)


def test_pool_applies_to_conv4_only():
    from diffopt.config import resolve_config
    from diffopt.errors import DiffoptError

    with pytest.raises(DiffoptError, match="--pool takes True or False and applies to conv4"):
        resolve_config(dataset="sinusoid", pool=True)
    with pytest.raises(DiffoptError, match="unknown pool padding 'full'"):
        resolve_config(dataset="miniimagenet", pool_padding="full")


@pytest.mark.parametrize("stride, size", [(2, 28), (2, 7), (2, 4), (1, 6), (1, 5)])
def test_turned_same_convolutions_compute_tensorflow_same(stride, size):
    """Two 'SAME' convolutions with the map turned 180 degrees between them (as Conv4 chains them:
    no padded copies) against TF's definition, the odd padding row and column at the bottom and
    right: the values and the first and second derivatives, in float64."""
    torch.manual_seed(0)
    first = SameConv2d(2, 3, stride, turned_output=True).double()
    last = SameConv2d(3, 4, stride, turned_input=True).double()
    x = torch.randn(5, 2, size, size, dtype=torch.double, requires_grad=True)

    def tf_same(conv: SameConv2d, h: torch.Tensor) -> torch.Tensor:
        n = h.shape[-1]
        total = max((math.ceil(n / stride) - 1) * stride + 3 - n, 0)
        return F.conv2d(F.pad(h, (total // 2, total - total // 2) * 2), conv.weight, conv.bias, stride)

    outputs = [last(torch.tanh(first(x))), tf_same(last, torch.tanh(tf_same(first, x)))]
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=1e-12)
    inputs = [x, first.weight, first.bias, last.weight]
    first_derivatives = [torch.autograd.grad(y.square().sum(), inputs, create_graph=True) for y in outputs]
    second_derivatives = [torch.autograd.grad(sum(g.square().sum() for g in grads), inputs)
                          for grads in first_derivatives]
    for turned, padded in [first_derivatives, second_derivatives]:
        for a, b in zip(turned, padded, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def test_conv4_turns_maps_between_its_strided_same_convolutions_only():
    def turns(**options):
        return [(m.turned_input, m.turned_output) for m in build_model("conv4", **options).modules()
                if isinstance(m, SameConv2d)]

    assert turns(in_channels=1, image_size=28, pool=False) == [
        (False, True), (True, True), (True, True), (True, False)]
    assert turns(in_channels=1, image_size=28, pool=False, padding="symmetric") == []
    assert turns(in_channels=3, image_size=84, pool=True) == []
