"""Tasks on threads (``task_threads``): the meta-gradient is the same, bit for bit, as one task at a
time, it passes the finite-difference check, and models it would make nondeterministic are refused."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
import torch.nn.functional as F
from conftest import random_episode
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from diffopt.algorithms import build_algorithm
from diffopt.data import Episode
from diffopt.errors import DiffoptError
from diffopt.gradcheck import check_meta_gradient
from diffopt.inner import InnerLoop
from diffopt.models import MLP, Conv4
from diffopt.vectorize import map_tasks, resolve_task_threads


def image_episode(seed: int, tasks: int, size: int = 12, dtype=torch.float32) -> Episode:
    """``tasks`` 3-way 1-shot tasks of random ``size``x``size`` images, 2 queries per class."""
    g = torch.Generator().manual_seed(seed)
    return Episode(torch.rand(tasks, 3, 1, size, size, generator=g, dtype=dtype),
                   torch.arange(3).expand(tasks, -1).clone(),
                   torch.rand(tasks, 6, 1, size, size, generator=g, dtype=dtype),
                   torch.arange(3).repeat_interleave(2).expand(tasks, -1).clone())


def meta_gradient(algorithm, episode):
    algorithm.zero_grad(set_to_none=True)
    loss = algorithm.meta_gradient(episode)["loss"]
    return loss, [p.grad.clone() for p in algorithm.parameters()]


@pytest.mark.parametrize("name,rule,steps", [("maml", "sgd", 1), ("maml", "lslr", 2),
                                             ("maml", "meta_curvature", 1), ("fomaml", "sgd", 2),
                                             ("reptile", "sgd", 3)])
def test_threads_give_the_same_meta_gradient_bit_for_bit(name, rule, steps):
    torch.manual_seed(0)
    model = Conv4(1, 3, 4, 12)  # batch norm without running statistics: thread-safe
    one = build_algorithm(name, model, InnerLoop(rule, 0.3, steps, model=model), F.cross_entropy,
                          "never", task_threads=1)
    three = copy.deepcopy(one)
    three.task_threads = 3
    episode = image_episode(0, tasks=7)
    loss_one, grads_one = meta_gradient(one, episode)
    loss_three, grads_three = meta_gradient(three, episode)
    assert loss_one == loss_three
    for a, b in zip(grads_one, grads_three, strict=True):
        assert torch.equal(a, b)
    assert all(g.abs().max() > 0 for g in grads_three)


@pytest.mark.slow
@settings(max_examples=5)
@given(seed=st.integers(0, 2**16), steps=st.integers(1, 2), rule=st.sampled_from(["sgd", "lslr"]))
def test_threaded_maml_matches_finite_differences_through_batch_norm(seed, steps, rule):
    torch.manual_seed(seed)
    model = Conv4(1, 3, 2, 6).double()
    algorithm = build_algorithm("maml", model, InnerLoop(rule, 0.1, steps, model=model),
                                F.cross_entropy, "never", task_threads=2)
    episode = image_episode(seed, tasks=2, size=6, dtype=torch.float64)
    result = check_meta_gradient(algorithm, episode, eps=(1e-6, 1e-7))
    assert result.passed(1e-4), result.per_parameter


def test_tasks_really_run_concurrently_and_in_order():
    barrier = threading.Barrier(2, timeout=10)  # breaks (an error) unless two tasks overlap
    episode = random_episode(0, tasks=4)

    def fn(task):
        barrier.wait()
        return float(task.support_x.sum())

    assert list(map_tasks(fn, episode, threads=2)) == [float(t.support_x.sum()) for t in episode]


def test_task_threads_end_with_the_call():
    """Idle pool threads that ran OpenMP regions slow the caller's later work (libgomp stops
    spin-waiting once it counts more threads than cores), so none may outlive ``map_tasks``."""
    def task_threads():
        return [t for t in threading.enumerate() if t.name.startswith("diffopt-task")]

    seen = list(map_tasks(lambda task: len(task_threads()), random_episode(0, tasks=4), threads=2))
    assert max(seen) >= 1  # the tasks did run on pool threads
    assert task_threads() == []


def test_tasks_run_under_the_callers_grad_mode():
    x = torch.ones(1, requires_grad=True)
    with torch.no_grad():
        flags = list(map_tasks(lambda task: (x * 2).requires_grad, random_episode(0, tasks=4), 2))
    assert flags == [False] * 4


def test_models_with_buffers_or_dropout_run_one_task_at_a_time():
    """Auto (0) gives torch's thread count where tasks may share threads and 1 where not; the
    count is set to 3 here (conftest restores it) so the two answers differ: under one thread
    (OMP_NUM_THREADS=1, or a test that leaked it) both would be 1."""
    torch.set_num_threads(3)
    with_stats = nn.Sequential(nn.Linear(1, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
    with_dropout = nn.Sequential(nn.Linear(1, 4), nn.Dropout(0.1), nn.Linear(4, 1))
    assert resolve_task_threads(0, with_stats) == 1
    assert resolve_task_threads(0, with_dropout) == 1
    assert resolve_task_threads(0, MLP(1, 1, (4,), "relu")) == 3
    with pytest.raises(DiffoptError, match="running statistics.*--task_threads 1"):
        build_algorithm("maml", with_stats, InnerLoop("sgd"), F.mse_loss, "never", task_threads=2)
    with pytest.raises(DiffoptError, match="dropout.*--task_threads 1"):
        resolve_task_threads(4, with_dropout)
