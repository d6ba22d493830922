"""The higher-unrolled inner loop: update formulas, first vs second order, the cached functional model."""

from __future__ import annotations

import copy
import math
import pickle
import statistics

import higher
import pytest
import torch
import torch.nn.functional as F
from conftest import random_episode, small_algorithm

from diffopt.algorithms import build_algorithm
from diffopt.errors import DiffoptError
from diffopt.inner import InnerLoop
from diffopt.models import MLP
from diffopt.unroll import batch_order


def first_task(seed=0):
    return next(iter(random_episode(seed, tasks=1)))


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


def test_second_order_keeps_graph_first_order_does_not():
    algorithm = small_algorithm("maml", "sgd", 0.1, 2)
    task = first_task()
    tracked = algorithm.adapt(task.support_x, task.support_y, track_higher_grads=True)
    assert all(p.grad_fn is not None for p in tracked.parameters())
    untracked = algorithm.adapt(task.support_x, task.support_y, track_higher_grads=False)
    assert all(p.grad_fn is None and p.requires_grad for p in untracked.parameters())


def test_cached_functional_model_matches_a_fresh_monkeypatch():
    """Reusing one patched model must behave exactly like a new ``innerloop_ctx`` every time,
    across tracking modes and after the model's weights change in place (higher keeps a
    fast-weight history that a naive reuse reads stale)."""
    algorithm = small_algorithm("maml", "sgd", 0.2, 2)
    model = algorithm.model
    for round_, track in enumerate([True, False, True, False, False, True]):
        task = first_task(round_)
        with torch.no_grad():
            next(model.parameters()).add_(0.01 * (round_ + 1))  # outer step in place
        ours = algorithm.adapt(task.support_x, task.support_y, track_higher_grads=track)
        with higher.innerloop_ctx(model, torch.optim.SGD(model.parameters(), lr=0.2),
                                  copy_initial_weights=False, track_higher_grads=track) as (fm, opt):
            for _ in range(2):
                opt.step(F.mse_loss(fm(task.support_x), task.support_y))
        for a, b in zip(ours.parameters(), fm.parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        if track:  # first order takes the steps without higher (see the next test)
            assert len(ours._fast_params) == 3  # history of this unroll only


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adam_beta1_0", "lslr"])
def test_first_order_steps_without_higher_equal_highers(optimizer):
    """The first-order loop (a copy of the model, plain autograd, the rule's functional twin)
    gives bit for bit the weights higher's unroll does, through shuffled mini-batches too."""
    model = small_algorithm().model
    algorithm = build_algorithm("maml", model, InnerLoop(optimizer, 0.05, 4, model=model, batch_size=3),
                                F.mse_loss, "never")
    assert algorithm.inner.first_order_rule is not None
    for round_ in range(3):
        task = first_task(round_)
        with torch.no_grad():
            next(algorithm.model.parameters()).add_(0.01)  # the copy follows the model
        tracked = algorithm.adapt(task.support_x, task.support_y, track_higher_grads=True)
        tracked = [p.detach() for p in tracked.parameters()]
        fast = algorithm.adapt(task.support_x, task.support_y, track_higher_grads=False)
        assert not hasattr(fast, "_fast_params")  # not higher's
        for a, b in zip(tracked, fast.parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert small_algorithm("maml", "momentum").inner.first_order_rule is None  # higher takes it


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


@pytest.mark.parametrize("functional", [False, True])
def test_inner_mini_batches_are_the_shuffled_order(functional):
    """batch_size 3 over 5 examples: each step trains on the next 3 of a shuffle of the examples,
    reshuffled when they run out (a batch spans two shuffles), on both execution paths."""
    algorithm = small_algorithm("reptile", "sgd", 0.2, 3)
    algorithm.inner.batch_size = 3
    task = first_task()
    x, y = task.support_x, task.support_y
    order = batch_order(x, y, 3, 3)
    flat = order.flatten().tolist()
    assert sorted(flat[:5]) == [0, 1, 2, 3, 4] and len(set(flat[5:])) == 4
    assert not torch.equal(order, batch_order(x, y + 1, 3, 3))  # another task, another order
    adapted = algorithm.inner.adapt(algorithm.model, F.mse_loss, x, y, functional=functional)
    model = copy.deepcopy(algorithm.model)
    sgd = torch.optim.SGD(model.parameters(), lr=0.2)
    for index in order:
        sgd.zero_grad()
        F.mse_loss(model(x[index]), y[index]).backward()
        sgd.step()
    for a, b in zip(adapted.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_inner_mini_batches_of_a_class_sorted_task_mix_classes():
    """A 5-way task with 5 + 5 examples per class, grouped by class as torchmeta's ClassSplitter
    returns it: batches of 10 see as many classes as a uniform shuffle would, 5 * (1 - C(40,10) /
    C(50,10)) = 4.59 on average, not the 2 that consecutive runs give."""
    labels = torch.arange(5).repeat_interleave(10)
    classes = []
    for seed in range(40):
        x = torch.randn(50, 1, generator=torch.Generator().manual_seed(seed))
        classes += [len(set(labels[index].tolist())) for index in batch_order(x, labels, 5, 10)]
    expected = 5 * (1 - math.comb(40, 10) / math.comb(50, 10))
    assert abs(statistics.mean(classes) - expected) < 0.1, (statistics.mean(classes), expected)
    assert batch_order(x, labels, 5, None) is None and batch_order(x, labels, 5, 50) is None


def test_shuffled_mini_batches_cannot_be_vmapped():
    algorithm = small_algorithm("reptile", "sgd", 0.2, 3, vectorize="always")
    with pytest.raises(DiffoptError, match="inner_batch_size"):
        build_algorithm("reptile", algorithm.model, InnerLoop("sgd", 0.2, 3, batch_size=2),
                        F.mse_loss, "always")
    algorithm.inner.batch_size = 3  # set behind the check's back: the unroll refuses under vmap
    with pytest.raises(DiffoptError, match="vmap cannot"):
        algorithm.meta_gradient(random_episode(0))


@pytest.mark.parametrize("functional", [False, True])
def test_unroll_reports_each_steps_loss_before_its_update(functional):
    algorithm = small_algorithm("maml", "sgd", 0.3, 3)
    task = first_task()
    losses: list[torch.Tensor] = []
    expected = []
    for fmodel in algorithm.inner.unroll(algorithm.model, F.mse_loss, task.support_x, task.support_y,
                                         losses=losses, functional=functional):
        expected.append(float(F.mse_loss(fmodel(task.support_x), task.support_y).detach()))
    assert [float(loss) for loss in losses] == pytest.approx(expected[:-1], rel=1e-12)
    assert len(losses) == 3 and not any(loss.requires_grad for loss in losses)
    assert expected[0] > expected[-1]  # the steps did move the weights


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
