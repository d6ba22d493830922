"""diffopt.unroll: the ways an inner loop takes its steps (through higher, first order without
higher, torch.func), its inner mini-batches and per-step losses."""

from __future__ import annotations

import copy
import math
import statistics

import higher
import pytest
import torch
import torch.nn.functional as F
from conftest import first_task, random_episode, small_algorithm

from diffopt.algorithms import build_algorithm
from diffopt.errors import DiffoptError
from diffopt.inner import InnerLoop
from diffopt.unroll import batch_order


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

