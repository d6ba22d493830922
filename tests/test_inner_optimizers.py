"""The inner optimizers' updates themselves (their meta-gradients: tests/test_gradients.py): k steps
of every named inner optimizer through diffopt's InnerLoop, with torch's defaults and with every
hyper-parameter ``--inner_options`` takes set to another value, land where torch.optim lands on a
copy of the model (as higher's own tests/test_optim.py checks higher), or where the written-out
formula lands for the optimizers higher computes differently (Adam: the pre-1.5 torch formula) or
does not have (AdamW); and ``check_inner_options`` refuses the arguments higher ignores."""

from __future__ import annotations

import copy
import inspect
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from diffopt.errors import DiffoptError
from diffopt.inner import InnerLoop
from diffopt.optim import (
    _NOT_HYPERPARAMETERS,
    FIXED_RULES,
    HIGHER_NOTICES,
    INNER_OPTIMIZERS,
    check_inner_options,
    inner_hyperparameters,
)

STEPS, LR = 3, 0.05

TORCH = {  # name -> (torch optimizer, the name's presets): the reference, written independently
    "sgd": (torch.optim.SGD, {}),
    "momentum": (torch.optim.SGD, {"momentum": 0.9}),
    "nesterov": (torch.optim.SGD, {"momentum": 0.9, "nesterov": True}),
    "adagrad": (torch.optim.Adagrad, {}),
    "adadelta": (torch.optim.Adadelta, {}),
    "adamax": (torch.optim.Adamax, {}),
    "asgd": (torch.optim.ASGD, {}),
    "rmsprop": (torch.optim.RMSprop, {}),
    "rprop": (torch.optim.Rprop, {}),
}
FORMULA = {"adam": {}, "adam_beta1_0": {"betas": (0.0, 0.999)}, "adamw": {}}
"""Optimizers checked against ``hand_adam`` (higher's Adam, and diffopt's AdamW rule)."""

OPTIONS = {  # every hyper-parameter --inner_options takes, away from its default
    "sgd": {"momentum": 0.5, "dampening": 0.3, "weight_decay": 0.1, "nesterov": False},
    "momentum": {"momentum": 0.6, "dampening": 0.2, "weight_decay": 0.1, "nesterov": False},
    "nesterov": {"momentum": 0.7, "dampening": 0.0, "weight_decay": 0.1, "nesterov": True},
    "adam": {"betas": (0.5, 0.8), "eps": 1e-3, "weight_decay": 0.1, "amsgrad": True},
    "adam_beta1_0": {"betas": (0.0, 0.9), "eps": 1e-4, "weight_decay": 0.05, "amsgrad": True},
    "adagrad": {"lr_decay": 0.3, "weight_decay": 0.1, "initial_accumulator_value": 0.5, "eps": 1e-3},
    "adadelta": {"rho": 0.5, "eps": 1e-3, "weight_decay": 0.1},
    "adamax": {"betas": (0.5, 0.8), "eps": 1e-3, "weight_decay": 0.1},
    "asgd": {"lambd": 0.1, "alpha": 0.5, "t0": 1.0, "weight_decay": 0.1},
    "rmsprop": {"alpha": 0.5, "eps": 1e-3, "weight_decay": 0.1, "momentum": 0.5, "centered": True},
    "rprop": {"etas": (0.3, 1.5), "step_sizes": (1e-3, 0.02)},
    "adamw": {"betas": (0.5, 0.8), "eps": 1e-3, "weight_decay": 0.3},
}

NAMES = [*INNER_OPTIMIZERS, *FIXED_RULES]


def test_every_named_optimizer_and_each_of_its_hyperparameters_is_covered():
    assert sorted(NAMES) == sorted([*TORCH, *FORMULA])
    for name in NAMES:
        assert set(OPTIONS[name]) == set(inner_hyperparameters(name)), name


@pytest.fixture
def float64_scalars():
    """float64 throughout, torch's scalar optimizer state included: torch keeps Adagrad's step
    count and ASGD's step size as tensors of the default dtype, so under float32 they round lr
    to float32 (1.5e-8 relative: diffopt's adagrad, through higher, and torch's own ASGD differ
    from the float64 formula by that much). conftest restores the default dtype."""
    torch.set_default_dtype(torch.float64)


def task():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 5), nn.Tanh(), nn.Linear(5, 1)).double()
    x = torch.randn(8, 2, dtype=torch.float64)
    return model, x, torch.sin(x.sum(1, keepdim=True))


def torch_steps(name: str, options: dict, model: nn.Module, x, y) -> list[torch.Tensor]:
    cls, preset = TORCH[name]
    model = copy.deepcopy(model)
    optimizer = cls(model.parameters(), lr=LR, **{**preset, **options})
    for _ in range(STEPS):
        optimizer.zero_grad()
        F.mse_loss(model(x), y).backward()
        optimizer.step()
    return [p.detach() for p in model.parameters()]


def hand_adam(options: dict, model: nn.Module, x, y, decoupled: bool) -> list[torch.Tensor]:
    """Adam as higher 0.2.1 computes it (torch before 1.5: eps added to sqrt(v) before the bias
    correction, weight decay an L2 term in the gradient, amsgrad's running max of v), or with
    ``decoupled`` diffopt's AdamW: that Adam without the L2 term, minus lr wd w (w before the
    step). Written out, element by element, in float64."""
    beta1, beta2 = options.get("betas", (0.9, 0.999))
    eps, decay, amsgrad = options.get("eps", 1e-8), options.get("weight_decay", 0.0), options.get("amsgrad")
    if decoupled:
        decay = options.get("weight_decay", 1e-2)  # AdamW's default
    weights = [p.detach().clone() for p in model.parameters()]
    m = [torch.zeros_like(w) for w in weights]
    v = [torch.zeros_like(w) for w in weights]
    v_max = [torch.zeros_like(w) for w in weights]
    names = [n for n, _ in model.named_parameters()]
    for t in range(1, STEPS + 1):
        live = [w.requires_grad_() for w in weights]
        out = torch.func.functional_call(model, dict(zip(names, live, strict=True)), (x,))
        grads = torch.autograd.grad(F.mse_loss(out, y), live)
        with torch.no_grad():
            for i, (w, g) in enumerate(zip(weights, grads, strict=True)):
                if not decoupled:
                    g = g + decay * w
                m[i] = beta1 * m[i] + (1 - beta1) * g
                v[i] = beta2 * v[i] + (1 - beta2) * g * g
                v_max[i] = torch.maximum(v_max[i], v[i])
                denominator = (v_max[i] if amsgrad else v[i]).sqrt() + eps
                size = LR * math.sqrt(1 - beta2**t) / (1 - beta1**t)
                step = -size * m[i] / denominator
                if decoupled:
                    step = step - LR * decay * w
                weights[i] = (w + step).detach()
    return weights


def expected(name: str, options: dict, model, x, y) -> list[torch.Tensor]:
    if name in TORCH:
        return torch_steps(name, options, model, x, y)
    return hand_adam({**FORMULA[name], **options}, model, x, y, decoupled=name == "adamw")


@pytest.mark.filterwarnings(f"ignore:{HIGHER_NOTICES}")
@pytest.mark.parametrize("order", ["second", "first"])
@pytest.mark.parametrize("with_options", [False, True], ids=["defaults", "options"])
@pytest.mark.parametrize("name", NAMES)
def test_k_inner_steps_land_where_the_reference_optimizer_does(name, with_options, order, float64_scalars):
    """Second order: higher's differentiable optimizer (or the rule); first order: the rule's or
    the torch optimizer's twin without higher where it has one (sgd, adam), else higher."""
    options = OPTIONS[name] if with_options else {}
    model, x, y = task()
    loop = InnerLoop(name, LR, STEPS, model=model, options=options)
    adapted = loop.adapt(model, F.mse_loss, x, y, track_higher_grads=order == "second")
    want = expected(name, options, model, x, y)
    start = [p.detach() for p in model.parameters()]
    assert all(not torch.equal(w, s) for w, s in zip(want, start, strict=True))  # they moved
    for got, reference in zip(adapted.parameters(), want, strict=True):
        torch.testing.assert_close(got.detach(), reference, rtol=1e-10, atol=1e-12)


def test_diffopts_adam_is_not_torchs_current_adam():
    """Where the two formulas differ (eps large against sqrt(v)), the test above compares with
    the formula higher uses, not torch.optim.Adam: this is the difference it would otherwise see."""
    model, x, y = task()
    options = {"eps": 1e-2}
    adapted = InnerLoop("adam", LR, STEPS, model=model, options=options).adapt(model, F.mse_loss, x, y)
    copy_ = copy.deepcopy(model)
    optimizer = torch.optim.Adam(copy_.parameters(), lr=LR, **options)
    for _ in range(STEPS):
        optimizer.zero_grad()
        F.mse_loss(copy_(x), y).backward()
        optimizer.step()
    assert any(not torch.allclose(a, b, rtol=1e-6, atol=0)
               for a, b in zip(adapted.parameters(), copy_.parameters(), strict=True))


@pytest.mark.parametrize("name", list(INNER_OPTIMIZERS))
def test_check_inner_options_refuses_what_higher_ignores(name):
    """Every argument of the torch optimizer that is not an update hyper-parameter, or that
    higher 0.2.1 does not implement (maximize, foreach, capturable, differentiable, fused,
    decoupled_weight_decay: higher's update would run without it), is refused by name."""
    cls = TORCH[name][0] if name in TORCH else torch.optim.Adam
    ignored = [key for key in inspect.signature(cls).parameters
               if key in _NOT_HYPERPARAMETERS and key not in ("params", "lr")]
    assert "maximize" in ignored and "foreach" in ignored
    for key in ignored:
        refused = f"unknown hyper-parameter of the inner optimizer {name} '{key}'"
        with pytest.raises(DiffoptError, match=refused):
            check_inner_options(name, {key: True})
        with pytest.raises(DiffoptError, match=f"'{key}'"):
            InnerLoop(name, LR, 1, options={key: True})
    check_inner_options(name, OPTIONS[name])  # what it takes passes
