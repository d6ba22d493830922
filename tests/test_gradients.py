"""Meta-gradients: checked against finite differences, against a hand-written MAML, and by the
exact properties of first-order MAML, zero-step MAML and one-step Reptile."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import random_episode, small_algorithm
from hypothesis import assume, given, settings, target
from hypothesis import strategies as st
from torch.func import functional_call

from diffopt.algorithms import build_algorithm
from diffopt.errors import DiffoptError
from diffopt.gradcheck import check_meta_gradient
from diffopt.inner import InnerLoop
from diffopt.models import MLP


def inner_gradient_floor(algorithm, episode) -> float:
    """Smallest |element| of the first inner gradient over the episode's tasks."""
    floor = float("inf")
    for task in episode:
        loss = algorithm.loss_fn(algorithm.model(task.support_x), task.support_y)
        for grad in torch.autograd.grad(loss, list(algorithm.model.parameters())):
            floor = min(floor, grad.abs().min().item())
    return floor


@pytest.mark.slow
@settings(max_examples=settings.default.max_examples * 6 // 10)  # profile's, conftest.py
@given(
    hidden=st.lists(st.integers(2, 8), min_size=1, max_size=3),
    activation=st.sampled_from(["tanh", "softplus"]),
    optimizer=st.sampled_from(["sgd", "momentum", "adam"]),
    steps=st.integers(1, 3),
    lr=st.floats(1e-3, 0.3),
    shots=st.integers(1, 6),
    queries=st.integers(1, 6),
    tasks=st.integers(1, 2),
    seed=st.integers(0, 2**16),
    vmap=st.booleans(),
)
def test_maml_meta_gradient_matches_finite_differences(
    hidden, activation, optimizer, steps, lr, shots, queries, tasks, seed, vmap
):
    """Both paths: the loop over tasks (higher) and, for sgd, the vmapped meta-batch."""
    vectorize = "always" if vmap and optimizer == "sgd" else "never"
    algorithm = small_algorithm("maml", optimizer, lr, steps, tuple(hidden), activation, seed,
                                vectorize=vectorize)
    episode = random_episode(seed, tasks, shots, queries)
    if optimizer == "adam":
        # Adam's first step is close to lr * sign(g): where an inner-gradient element is near 0
        # the meta-loss curves on the scale of |g| and central differences with eps = 1e-6 lose
        # accuracy (their error was measured to shrink as eps^2 towards the analytic value).
        assume(inner_gradient_floor(algorithm, episode) > 1e-3)
    result = check_meta_gradient(algorithm, episode)
    target(result.max_rel_error)  # steer the search towards the worst cases
    assert result.max_rel_error < 1e-5, result.per_parameter


HIGHER_OPTIMIZERS = ["nesterov", "adagrad", "adadelta", "adamax", "asgd", "rmsprop", "rprop"]


@pytest.mark.parametrize("optimizer", HIGHER_OPTIMIZERS)
@settings(max_examples=4, deadline=None)
@given(steps=st.integers(1, 3), lr=st.floats(0.01, 0.2), seed=st.integers(0, 2**16))
def test_every_optimizer_higher_differentiates_matches_finite_differences(optimizer, steps, lr, seed):
    """The rest of higher 0.2.1's optimizers, torch's defaults but the step size (adam, sgd and
    momentum are in the test above). Adaptive rules divide by a running average of squared
    gradients, steep where it is near 0, and Rprop steps by the gradient's sign: as for Adam,
    the check runs where every inner-gradient element is away from 0."""
    algorithm = small_algorithm("maml", optimizer, lr, steps, (5,), "tanh", seed)
    episode = random_episode(seed, 2, 4, 4)
    assume(inner_gradient_floor(algorithm, episode) > 1e-3)
    result = check_meta_gradient(algorithm, episode)
    assert result.max_rel_error < 1e-5, result.per_parameter


SETTINGS = {  # hyper-parameters away from the defaults, each a branch of higher's update
    "adam": {"betas": (0.5, 0.9), "eps": 1e-4, "weight_decay": 0.1, "amsgrad": True},
    "momentum": {"momentum": 0.5, "dampening": 0.2, "weight_decay": 0.05},
    "nesterov": {"momentum": 0.7, "weight_decay": 0.05},
    "rmsprop": {"alpha": 0.9, "momentum": 0.5, "centered": True, "weight_decay": 0.01},
    "adagrad": {"lr_decay": 0.1, "initial_accumulator_value": 0.1},
    "adamw": {"betas": (0.8, 0.99), "weight_decay": 0.2},
}


@pytest.mark.parametrize("optimizer", [*SETTINGS, "adamw_defaults"])
@settings(max_examples=3, deadline=None)
@given(steps=st.integers(1, 3), lr=st.floats(0.01, 0.2), seed=st.integers(0, 2**16))
def test_inner_hyperparameters_are_differentiated_through(optimizer, steps, lr, seed):
    """``--inner_options``: the optimizers with settings other than their defaults, and AdamW (a
    diffopt rule: higher has none), checked where inner gradients are away from 0 (as above);
    the meta-gradient must differ from the defaults' (the settings reach the unroll)."""
    name, options = ("adamw", None) if optimizer == "adamw_defaults" else (optimizer, SETTINGS[optimizer])
    algorithm = small_algorithm("maml", name, lr, steps, (5,), "tanh", seed, options=options)
    episode = random_episode(seed, 2, 4, 4)
    assume(inner_gradient_floor(algorithm, episode) > 1e-3)
    result = check_meta_gradient(algorithm, episode)
    assert result.max_rel_error < 1e-5, result.per_parameter
    if options:
        default = meta_grads(small_algorithm("maml", name, lr, steps, (5,), "tanh", seed), episode)
        mine = meta_grads(algorithm, episode)
        assert any(not torch.allclose(a, b) for a, b in zip(mine, default, strict=True))


@pytest.mark.parametrize("options", [None, {"betas": (0.5, 0.9), "eps": 1e-3}])
def test_first_order_twin_follows_the_inner_options(options):
    """First-order unrolls of adam run diffopt's twin rule, not higher: with other betas and eps
    both paths must still take the same steps."""
    algorithm = small_algorithm("fomaml", "adam", 0.05, 3, (5,), "tanh", 2, options=options)
    task = next(iter(random_episode(2, 1, 4, 4)))
    twin = algorithm.adapt(task.support_x, task.support_y, track_higher_grads=False)
    assert not hasattr(twin, "fast_params")  # the higher-free path ran
    twin_weights = [p.detach().clone() for p in twin.parameters()]
    via_higher = algorithm.inner.unroll(algorithm.model, algorithm.loss_fn, task.support_x,
                                        task.support_y, track_higher_grads=False,
                                        detach_inner_grads=True)
    *_, adapted = via_higher
    for a, b in zip(twin_weights, adapted.parameters(), strict=True):
        torch.testing.assert_close(a, b.detach(), rtol=1e-12, atol=1e-14)
    if options:
        plain = small_algorithm("fomaml", "adam", 0.05, 3, (5,), "tanh", 2)
        other = plain.adapt(task.support_x, task.support_y, track_higher_grads=False)
        assert not torch.allclose(twin_weights[0], next(iter(other.parameters())).detach())


def test_rprop_meta_gradient_has_no_second_order_part():
    """Rprop's step is lr * sign(g) (scaled): the meta-gradient equals first-order MAML's."""
    episode = random_episode(5, 2, 4, 4)
    exact = meta_grads(small_algorithm("maml", "rprop", 0.05, 2, (5,), "tanh", 5), episode)
    first = meta_grads(small_algorithm("fomaml", "rprop", 0.05, 2, (5,), "tanh", 5), episode)
    for a, b in zip(exact, first, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


class WrongMAML(type(small_algorithm())):
    """Claims to be exact but drops the second-order terms (first-order MAML in disguise)."""

    def meta_gradient(self, episode):
        for task in episode:
            fmodel = self.adapt(task.support_x, task.support_y, track_higher_grads=False)
            loss = self.loss_fn(fmodel(task.query_x), task.query_y) / len(episode)
            for p, g in zip(self.model.parameters(), torch.autograd.grad(loss, fmodel.parameters()),
                            strict=True):
                p.grad = g if p.grad is None else p.grad + g
        return {}


def test_gradcheck_catches_a_wrong_meta_gradient():
    reference = small_algorithm("maml", "sgd", 0.3, 2)
    wrong = WrongMAML(reference.model, reference.inner, reference.loss_fn)
    result = check_meta_gradient(wrong, random_episode(0))
    assert result.max_rel_error > 1e-3
    assert not result.passed()
    assert check_meta_gradient(reference, random_episode(0)).passed()


@pytest.mark.parametrize("name", ["fomaml", "reptile"])
def test_gradcheck_refuses_approximate_algorithms(name):
    with pytest.raises(DiffoptError, match="finite differences cannot check it"):
        check_meta_gradient(small_algorithm(name), random_episode(0))


def test_gradcheck_leaves_the_algorithm_untouched():
    algorithm = small_algorithm(dtype=torch.float32)
    before = [p.detach().clone() for p in algorithm.parameters()]
    check_meta_gradient(algorithm, random_episode(0, dtype=torch.float32))
    assert all(p.dtype == torch.float32 and p.grad is None for p in algorithm.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, algorithm.parameters(), strict=True))


def sgd_adapt(params: dict, model, x, y, lr: float, steps: int, create_graph: bool) -> dict:
    """Hand-written inner loop: ``steps`` plain SGD steps with torch.func.functional_call."""
    for _ in range(steps):
        loss = F.mse_loss(functional_call(model, params, (x,)), y)
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=create_graph)
        params = {k: v - lr * g for (k, v), g in zip(params.items(), grads, strict=True)}
    return params


def meta_grads(algorithm, episode) -> list[torch.Tensor]:
    algorithm.zero_grad(set_to_none=True)
    algorithm.meta_gradient(episode)
    return [p.grad.clone() for p in algorithm.model.parameters()]


@pytest.mark.parametrize("steps", [1, 3])
def test_maml_equals_hand_written_second_order_maml(steps):
    algorithm = small_algorithm("maml", "sgd", 0.2, steps)
    episode = random_episode(1, tasks=3)
    model = algorithm.model
    total = 0
    for task in episode:
        params = dict(model.named_parameters())
        adapted = sgd_adapt(params, model, task.support_x, task.support_y, 0.2, steps, True)
        total = total + F.mse_loss(functional_call(model, adapted, (task.query_x,)), task.query_y)
    expected = torch.autograd.grad(total / len(episode), list(model.parameters()))
    for got, want in zip(meta_grads(algorithm, episode), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_fomaml_gradient_is_query_gradient_at_adapted_weights():
    algorithm = small_algorithm("fomaml", "sgd", 0.2, 2)
    episode = random_episode(2, tasks=3)
    model = algorithm.model
    expected = [torch.zeros_like(p) for p in model.parameters()]
    for task in episode:
        params = {k: v.detach() for k, v in model.named_parameters()}
        adapted = sgd_adapt({k: v.requires_grad_() for k, v in params.items()}, model,
                            task.support_x, task.support_y, 0.2, 2, False)
        adapted = {k: v.detach().requires_grad_() for k, v in adapted.items()}
        loss = F.mse_loss(functional_call(model, adapted, (task.query_x,)), task.query_y)
        for e, g in zip(expected, torch.autograd.grad(loss, list(adapted.values())), strict=True):
            e += g / len(episode)
    for got, want in zip(meta_grads(algorithm, episode), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    # and it is not the exact (second-order) gradient
    exact = meta_grads(small_algorithm("maml", "sgd", 0.2, 2), episode)
    assert max((a - b).abs().max() for a, b in zip(exact, expected, strict=True)) > 1e-4


@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "adam"])
def test_maml_with_zero_steps_is_the_plain_gradient(optimizer):
    algorithm = small_algorithm("maml", optimizer, 0.1, 0)
    episode = random_episode(3, tasks=2)
    model = algorithm.model
    loss = sum(F.mse_loss(model(t.query_x), t.query_y) for t in episode) / len(episode)
    expected = torch.autograd.grad(loss, list(model.parameters()))
    for got, want in zip(meta_grads(algorithm, episode), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


def test_reptile_one_sgd_step_moves_phi_by_eps_alpha_grad():
    alpha, eps = 0.05, 0.7
    algorithm = small_algorithm("reptile", "sgd", alpha, 1)
    episode = random_episode(4, tasks=3)
    model = algorithm.model
    phi = [p.detach().clone() for p in model.parameters()]
    grads = [torch.zeros_like(p) for p in phi]
    for task in episode:  # Reptile's inner loop uses all of the task's data, full batch
        x, y = torch.cat([task.support_x, task.query_x]), torch.cat([task.support_y, task.query_y])
        for acc, g in zip(grads, torch.autograd.grad(F.mse_loss(model(x), y),
                                                     list(model.parameters())), strict=True):
            acc += g / len(episode)
    outer = torch.optim.SGD(model.parameters(), lr=eps)
    outer.zero_grad()
    algorithm.meta_gradient(episode)
    outer.step()
    for new, old, g in zip(model.parameters(), phi, grads, strict=True):
        torch.testing.assert_close(new.detach() - old, -eps * alpha * g, rtol=1e-9, atol=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("which", ["head", "body"])
@pytest.mark.parametrize("vectorize", ["always", "never"])
@settings(max_examples=4, deadline=None)
@given(steps=st.integers(1, 3), lr=st.floats(0.01, 0.3), seed=st.integers(0, 2**16))
def test_anil_and_boil_meta_gradients_match_finite_differences(which, vectorize, steps, lr, seed):
    """ANIL (the inner loop adapts the last linear layer alone) and BOIL (all but it): the other
    parameters get their meta-gradient through the adapted ones, on both execution paths."""
    torch.manual_seed(seed)
    model = MLP(1, 1, (6, 5), "tanh").double()
    algorithm = build_algorithm("maml", model, InnerLoop("sgd", lr, steps, params=which), F.mse_loss,
                                vectorize)
    episode = random_episode(seed, 2, 4, 4)
    result = check_meta_gradient(algorithm, episode)
    assert result.max_rel_error < 1e-5, result.per_parameter
    # and it is not MAML's: the inner loop really left the other parameters alone
    full = build_algorithm("maml", model, InnerLoop("sgd", lr, steps), F.mse_loss, vectorize)
    differ = [not torch.allclose(a, b) for a, b in
              zip(meta_grads(algorithm, episode), meta_grads(full, episode), strict=True)]
    assert any(differ)
