"""Conv-4 (Omniglot's strided and Mini-ImageNet's pooled variants) with every algorithm and every
inner rule that algorithm accepts: one meta-iteration gives finite meta-gradients that reach
every meta-parameter (model weights, and a learned rule's own parameters under MAML)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from diffopt.algorithms import ALGORITHMS, build_algorithm
from diffopt.data import Episode
from diffopt.inner import InnerLoop
from diffopt.models import ShiftBatchNorm, build_model
from diffopt.optim import INNER_OPTIMIZERS, inner_rule_names

VARIANTS = {  # name -> (model options, image shape)
    "omniglot": (dict(in_channels=1, image_size=28, pool=False, hidden=(8,)), (1, 28, 28)),
    "miniimagenet": (dict(in_channels=3, image_size=84, pool=True, hidden=(4,)), (3, 84, 84)),
    # cbfinn/maml's Omniglot model: TF batch norm (shift, no scale, eps 1e-3), averaged last map
    "omniglot-cbfinn": (dict(in_channels=1, image_size=28, pool=False, hidden=(8,), norm="batch_shift",
                             norm_eps=1e-3, head="mean"), (1, 28, 28)),
}
COMBINATIONS = [(a, r) for a in ALGORITHMS for r in inner_rule_names()
                if ALGORITHMS[a].learns_update_rule or r in INNER_OPTIMIZERS]


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
    inner = InnerLoop(rule, 0.1 if "adam" not in rule else 0.001, 2, model=model)
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
