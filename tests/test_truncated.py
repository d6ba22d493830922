"""Truncated backpropagation (``InnerLoop(backprop_steps=k)``): the meta-gradient through the last
k inner steps, the earlier inner gradients constant; on every path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import random_episode
from test_recompute import graph_peak, largest_difference, meta_gradient, mlp_algorithm

from diffopt.algorithms import build_algorithm
from diffopt.errors import DiffoptError
from diffopt.inner import InnerLoop
from diffopt.models import MLP


def hand_truncated(model, x, y, xq, yq, lr: float, steps: int, kept: int) -> list[torch.Tensor]:
    """SGD: T - k steps without a graph, the weights then theta + a constant, k steps with one."""
    theta = list(model.parameters())
    names = [name for name, _ in model.named_parameters()]

    def loss_at(weights, inputs, targets):
        prediction = torch.func.functional_call(model, dict(zip(names, weights, strict=True)), (inputs,))
        return F.mse_loss(prediction, targets)

    weights = [w.detach().clone().requires_grad_() for w in theta]
    for _ in range(steps - kept):
        grads = torch.autograd.grad(loss_at(weights, x, y), weights)
        weights = [(w - lr * g).detach().requires_grad_() for w, g in zip(weights, grads, strict=True)]
    weights = [t + (w - t).detach() for t, w in zip(theta, weights, strict=True)]
    for _ in range(kept):
        grads = torch.autograd.grad(loss_at(weights, x, y), weights, create_graph=True)
        weights = [w - lr * g for w, g in zip(weights, grads, strict=True)]
    return list(torch.autograd.grad(loss_at(weights, xq, yq), theta))


@pytest.mark.parametrize("kept", [1, 3, 6])
def test_truncated_maml_equals_the_hand_written_truncation(kept):
    episode = random_episode(4, tasks=1, shots=5, queries=6)
    algorithm = mlp_algorithm("maml", "sgd", 6, None, backprop_steps=kept)
    (task,) = list(episode)
    expected = hand_truncated(algorithm.model, task.support_x, task.support_y, task.query_x,
                              task.query_y, 0.1, 6, kept)
    assert largest_difference(expected, meta_gradient(algorithm, episode)) < 1e-10


def test_truncated_to_every_step_is_exact_and_to_fewer_differs():
    episode = random_episode(5, tasks=2, shots=5, queries=6)
    exact = meta_gradient(mlp_algorithm("maml", "adam", 5, None), episode)
    assert largest_difference(exact, meta_gradient(mlp_algorithm("maml", "adam", 5, None, backprop_steps=5),
                                                   episode)) < 1e-12
    assert largest_difference(exact, meta_gradient(mlp_algorithm("maml", "adam", 5, None, backprop_steps=2),
                                                   episode)) > 1e-4


@pytest.mark.parametrize("optimizer", ["adam", "lslr", "momentum"])
def test_truncation_is_the_same_checkpointed(optimizer):
    episode = random_episode(6, tasks=2, shots=5, queries=6)
    plain = meta_gradient(mlp_algorithm("maml", optimizer, 7, None, backprop_steps=3), episode)
    checkpointed = meta_gradient(mlp_algorithm("maml", optimizer, 7, 2, backprop_steps=3), episode)
    assert largest_difference(plain, checkpointed) < 1e-10


def test_truncation_is_the_same_under_vmap():
    episode = random_episode(7, tasks=3, shots=5, queries=6)
    grads = []
    for vectorize in ("never", "always"):
        torch.manual_seed(0)
        model = MLP(1, 1, (8, 8), "tanh").double()
        loop = InnerLoop("lslr", 0.1, 5, model=model, backprop_steps=2)
        grads.append(meta_gradient(build_algorithm("maml", model, loop, F.mse_loss, vectorize), episode))
    assert largest_difference(*grads) < 1e-10


def test_a_truncated_unroll_keeps_the_graph_of_its_last_steps():
    """The steps before the last k keep no graph (their inner gradients are computed without one):
    the same peak at 8 and 72 steps as a 4-step unroll, a fraction of the plain 72-step one's."""
    four = graph_peak(4, None, "sgd")
    assert graph_peak(8, None, "sgd", backprop_steps=4) <= 1.02 * four
    assert graph_peak(72, None, "sgd", backprop_steps=4) <= 1.02 * four
    assert graph_peak(72, None, "sgd") > 10 * four


def test_truncated_maml_is_not_checked_as_exact():
    assert mlp_algorithm("maml", "sgd", 3, None).exact_meta_gradient
    assert not mlp_algorithm("maml", "sgd", 3, None, backprop_steps=1).exact_meta_gradient


@pytest.mark.parametrize("value", [0, -2, 4, 1.5, True])
def test_bad_truncations_are_one_line_errors(value):
    with pytest.raises(DiffoptError, match=r"--inner_backprop_steps .* from 1 to --inner_steps \(3\)"):
        InnerLoop("sgd", 0.1, 3, backprop_steps=value)


def test_first_order_algorithms_refuse_a_truncation():
    with pytest.raises(DiffoptError, match="nothing to truncate"):
        build_algorithm("fomaml", MLP(1, 1, (4,)), InnerLoop("sgd", 0.1, 3, backprop_steps=1), F.mse_loss)
