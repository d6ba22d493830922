"""The higher-unrolled inner loop: update formulas, first vs second order, the cached functional model."""

from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch
import torch.nn.functional as F
from conftest import first_task, small_algorithm

from diffopt.errors import DiffoptError
from diffopt.inner import InnerLoop
from diffopt.models import MLP


def trajectory(optimizer: str, lr: float, steps: int):
    """Parameters after each step of our inner loop, and the inner gradients seen at each step."""
    algorithm = small_algorithm("maml", optimizer, lr, steps)
    task = first_task()
    weights, grads = [], []
    for fmodel in algorithm.unroll(task.support_x, task.support_y, steps):
        params = [p.detach().clone() for p in fmodel.parameters()]
        weights.append(params)
        loss = F.mse_loss(fmodel(task.support_x), task.support_y)
        grads.append([g.detach() for g in torch.autograd.grad(loss, list(fmodel.parameters()))])
    return weights, grads


def test_sgd_step_formula():
    weights, grads = trajectory("sgd", 0.3, 2)
    for t in range(2):
        for w_next, w, g in zip(weights[t + 1], weights[t], grads[t], strict=True):
            torch.testing.assert_close(w_next, w - 0.3 * g, rtol=1e-12, atol=1e-14)


def test_momentum_step_formula():
    weights, grads = trajectory("momentum", 0.1, 3)
    buffers = [torch.zeros_like(g) for g in grads[0]]
    for t in range(3):
        for i, (w, g) in enumerate(zip(weights[t], grads[t], strict=True)):
            buffers[i] = g if t == 0 else 0.9 * buffers[i] + g
            torch.testing.assert_close(weights[t + 1][i], w - 0.1 * buffers[i], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("optimizer,beta1", [("adam", 0.9), ("adam_beta1_0", 0.0)])
def test_adam_step_follows_highers_formula(optimizer, beta1):
    # higher's differentiable Adam adds eps before the bias correction (pre-1.5 torch formula).
    lr, beta2, eps = 0.05, 0.999, 1e-8
    weights, grads = trajectory(optimizer, lr, 2)
    m = [torch.zeros_like(g) for g in grads[0]]
    v = [torch.zeros_like(g) for g in grads[0]]
    for t in range(2):
        step = t + 1
        for i, (w, g) in enumerate(zip(weights[t], grads[t], strict=True)):
            m[i] = beta1 * m[i] + (1 - beta1) * g
            v[i] = beta2 * v[i] + (1 - beta2) * g * g
            denom = v[i].sqrt() + eps
            step_size = lr * (1 - beta2**step) ** 0.5 / (1 - beta1**step)
            torch.testing.assert_close(weights[t + 1][i], w - step_size * m[i] / denom,
                                       rtol=1e-10, atol=1e-13)


def test_cache_is_not_state_and_survives_copy_and_pickle():
    algorithm = small_algorithm()
    task = first_task()
    before = [algorithm.adapt(task.support_x, task.support_y, track_higher_grads=track)
              for track in (True, False)]
    assert "_copies" in algorithm.inner.__dict__  # higher's and the first-order copies
    assert set(algorithm.state_dict()) == {f"model.{i}.{k}" for i in (0, 2, 4) for k in ("weight", "bias")}
    for clone in (copy.deepcopy(algorithm), pickle.loads(pickle.dumps(algorithm))):
        assert "_copies" not in clone.inner.__dict__
        for track, adapted in zip((True, False), before, strict=True):
            after = clone.adapt(task.support_x, task.support_y, track_higher_grads=track)
            for a, b in zip(adapted.parameters(), after.parameters(), strict=True):
                torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_unknown_inner_optimizer():
    with pytest.raises(DiffoptError, match="unknown inner optimizer 'rprop_v2'; choose one of: adadelta,"):
        InnerLoop("rprop_v2")


def test_class_sum_steps_are_ways_times_the_mean_steps_and_sum_is_examples_times():
    """cbfinn/maml's inner loss (class_sum) with lr a is the mean loss with lr C * a for plain
    SGD (C outputs); sum (supervised-reptile) is the mean times the batch's examples."""
    torch.manual_seed(0)
    model = MLP(1, 4, (5,), "tanh").double()
    x, y = torch.randn(6, 1, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)
    for reduction, scale in (("class_sum", 4), ("sum", 6)):
        scaled = InnerLoop("sgd", 0.05, 2, loss_reduction=reduction).adapt(model, F.mse_loss, x, y)
        plain = InnerLoop("sgd", 0.05 * scale, 2).adapt(model, F.mse_loss, x, y)
        for a, b in zip(scaled.parameters(), plain.parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    losses: list[torch.Tensor] = []
    InnerLoop("sgd", 0.05, 1, loss_reduction="sum").adapt(model, F.mse_loss, x, y, losses=losses)
    torch.testing.assert_close(losses[0], F.mse_loss(model(x), y).detach())  # reported: the mean
    with pytest.raises(DiffoptError, match="unknown inner loss reduction 'max'"):
        InnerLoop("sgd", loss_reduction="max")


def test_glorot_initialisations():
    from diffopt.models import Conv4, initialize

    torch.manual_seed(0)
    model = initialize(Conv4(1, 5, 64, 28, head="mean"), "glorot_normal_output")
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    for conv in convs:
        fan_in, fan_out = conv.weight[0].numel(), conv.weight.shape[0] * conv.weight[0, 0].numel()
        bound = math.sqrt(6 / (fan_in + fan_out))
        assert conv.weight.abs().max() <= bound and conv.weight.abs().max() > 0.9 * bound
        assert torch.count_nonzero(conv.bias) == 0
    head = model[-1]
    assert head.in_features == 64 and abs(head.weight.std().item() - 1) < 0.2
    glorot = initialize(Conv4(1, 5, 64, 28), "glorot")[-1]
    assert glorot.weight.abs().max() <= math.sqrt(6 / (256 + 5))
    with pytest.raises(DiffoptError, match="unknown weight initialisation"):
        initialize(model, "he")


@pytest.mark.parametrize("path", ["higher", "first_order", "functional"])
@pytest.mark.parametrize("which", ["weights", "head", "body"])
def test_inner_params_adapts_only_the_chosen_parameters(path, which):
    """cbfinn/maml adapts the conv and linear weights, not batch norm's shift; ANIL the head,
    BOIL the body. The others keep their meta-learned values through the inner loop, on every
    execution path."""
    from diffopt.models import Conv4

    torch.manual_seed(0)
    model = Conv4(1, 3, 4, 8, norm="batch_shift", head="mean").double()
    x, y = torch.rand(6, 1, 8, 8, dtype=torch.float64), torch.arange(3).repeat(2)
    inner = InnerLoop("sgd", 0.5, 2, params=which)
    adapted = inner.adapt(model, F.cross_entropy, x, y, track_higher_grads=path == "higher",
                          functional=path == "functional")
    names = [name for name, _ in model.named_parameters()]
    moved = {name for name, before, after in zip(names, model.parameters(), adapted.parameters(), strict=True)
             if not torch.equal(before, after)}
    expected = {"weights": {n for n in names if not n.startswith(("1.", "4.", "7.", "10."))},
                "head": {"14.weight", "14.bias"},
                "body": {n for n in names if not n.startswith("14.")}}[which]
    conv_biases = {f"{i}.bias" for i in (0, 3, 6, 9)}  # batch norm follows: gradient 0 or rounding noise
    assert moved <= expected and expected - moved <= conv_biases and not expected - conv_biases - moved
    with pytest.raises(DiffoptError, match="'neck' is neither all, weights, head, body nor name patterns"):
        InnerLoop("sgd", params="neck").adapt(model, F.cross_entropy, x, y)
    with pytest.raises(DiffoptError, match="unknown set of inner parameters 7"):
        InnerLoop("sgd", params=7)

