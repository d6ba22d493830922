"""How a meta-batch runs: every task's inner loop at once (``torch.func.vmap``), or a loop over
tasks, several tasks at a time on threads.

``vmap`` over tasks runs the functional unroll (``InnerLoop.unroll(..., functional=True)``)
for a whole episode in one batched pass: several times faster than a loop over tasks for
small models. It is used only where its meta-gradients are proven right by the
finite-difference tests (tests/test_vectorize.py): models built from the modules in
``VMAP_SAFE_MODULES`` with no buffers, and inner rules with a functional form (sgd and every
``UpdateRule``). ``torch.func.vmap`` gives wrong meta-gradients through affine BatchNorm and
LayerNorm and refuses BatchNorm with running statistics, so those models take the loop.

Affine batch norm (``diffopt.models.norm.BatchStatNorm2d``, ``--norm batch``) is vmapped right
in the form it takes under transforms, but a whole vmapped meta-batch of it is slower than the
loop where each task has many query images (grouped convolutions; BENCHMARKS.md). Such models
run the support side of every task at once under vmap and each task's query side alone
(``over_support``; algorithms with ``batches_support``: MAML, BOIL): the same meta-gradient.

In the loop, MAML's differentiated unrolls take the same functional steps with plain autograd
where they can (``loops_functionally``), not higher's monkeypatched model. The loop
(``map_tasks``) runs ``task_threads`` tasks concurrently, each on its own thread with
its own functional copy of the model; the per-task results come back in task order, so the
summed meta-gradient is the same, bit for bit, for any number of threads. Whether that beats
one task at a time with torch's own intra-op threads depends on the CPU (BENCHMARKS.md: up to
1.2x on conv-4 on an AMD EPYC, no gain on an Intel Xeon); it keeps ``task_threads`` tasks'
graphs alive at once.
Models with buffers (running statistics, updated in place) or random layers (dropout) run one
task at a time, since their results would depend on the threads' interleaving.
"""

from __future__ import annotations

import warnings
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch
from torch import nn

from diffopt.data.episode import Episode, Task
from diffopt.errors import DiffoptError, as_typed
from diffopt.inner import InnerLoop, adapted_mask
from diffopt.memory import available_bytes, graph_bytes
from diffopt.models.conv4 import InputNorm, SameConv2d
from diffopt.models.norm import BatchStatNorm1d, BatchStatNorm2d, ShiftBatchNorm
from diffopt.optim import UpdateRule

VECTORIZE_MODES = ("auto", "always", "never")
RANDOM_MODULES: tuple[type[nn.Module], ...] = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
                                               nn.AlphaDropout, nn.FeatureAlphaDropout)
T = TypeVar("T")

VMAP_SAFE_MODULES: tuple[type[nn.Module], ...] = (
    nn.Sequential, nn.Linear, nn.Conv2d, nn.Flatten, nn.Identity, nn.MaxPool2d, nn.AvgPool2d,
    nn.AdaptiveAvgPool2d, nn.ReLU, nn.LeakyReLU, nn.ELU, nn.GELU, nn.Tanh, nn.Sigmoid, nn.Softplus,
    ShiftBatchNorm, SameConv2d, InputNorm,
)
"""Module types whose functional calls are checked under vmap by the gradient tests (plus
subclasses of ``nn.Sequential`` that keep its ``forward``, such as ``diffopt.models.MLP``)."""


SUPPORT_VMAP_MODULES: tuple[type[nn.Module], ...] = (*VMAP_SAFE_MODULES, BatchStatNorm1d, BatchStatNorm2d)
"""Module types proven right under vmap for the support side of a meta-batch (``over_support``):
``VMAP_SAFE_MODULES`` and affine batch norm, which vmap differentiates right in the form its
layers take under transforms, but which is slower vmapped on the query side too (BENCHMARKS.md:
the grouped convolutions of many query images)."""


def vmap_obstacle(model: nn.Module, inner: InnerLoop, support_side: bool = False) -> str | None:
    """Why the meta-batch of ``model`` adapted by ``inner`` cannot be vmapped (its support side
    alone, for ``over_support``), or None if it can."""
    listed = "SUPPORT_VMAP_MODULES" if support_side else "VMAP_SAFE_MODULES"
    modules = SUPPORT_VMAP_MODULES if support_side else VMAP_SAFE_MODULES
    unchecked = sorted({type(module).__name__ for module in model.modules()
                        if type(module) not in modules and not (
                            isinstance(module, nn.Sequential)
                            and type(module).forward is nn.Sequential.forward)})
    if unchecked:
        return (f"its {', '.join(unchecked)} layers are not proven right under torch.func.vmap "
                f"(diffopt.vectorize.{listed})")
    if any(True for _ in model.buffers()):
        return "the model keeps buffers (e.g. running statistics)"
    if inner.functional_rule is None:
        return f"the inner optimizer {inner.optimizer!r} has no functional form"
    if inner.batch_size is not None:
        return "inner mini-batches are shuffled per task (inner_batch_size)"
    if inner.checkpoint is not None:
        return "checkpointed unrolls run per task (inner_checkpoint: autograd nodes vmap cannot batch)"
    rule = inner.functional_rule
    adapted = [p for p, keep in zip(model.parameters(), adapted_mask(model, inner.params), strict=True)
               if keep or rule is not inner.rule]  # a learned rule sees the adapted tensors alone
    return rule_obstacle(rule, adapted)


def rule_obstacle(rule: UpdateRule, params: list[torch.Tensor]) -> str | None:
    """Why ``rule`` cannot run under ``torch.func.vmap`` (e.g. it calls ``.item()``), found by
    running one update of it on two copies of ``params`` (the tensors it updates); None if it can."""
    params = [p.detach() for p in params]

    def one_update(*weights: torch.Tensor) -> list:
        weights = list(weights)
        updates, _ = rule.update(weights, rule.init(weights), weights, 0)
        return [u for u in updates if u is not None]

    try:
        with torch.no_grad():
            torch.func.vmap(one_update)(*(torch.stack([p, p]) for p in params))
    except Exception as error:  # noqa: BLE001 - whatever vmap refuses, the loop runs it
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        return (f"the inner rule {type(rule).__name__} cannot run under torch.func.vmap "
                f"({type(error).__name__}: {first_line[:120]})")
    return None


def resolve_vectorize(mode: str, model: nn.Module, inner: InnerLoop, support_vmapped: bool = False) -> bool:
    """Whether to vmap the meta-batch: ``mode`` is auto, always or never.

    ``auto`` vmaps where ``vmap_obstacle`` finds nothing and otherwise warns (``UserWarning``,
    filterable) that tasks run one by one, unless their support sides run at once all the same
    (``support_vmapped``: ``over_support``); ``always`` raises DiffoptError naming the obstacle.
    """
    if mode not in VECTORIZE_MODES:
        raise DiffoptError(f"vectorize must be one of {', '.join(VECTORIZE_MODES)}; got {as_typed(mode)}")
    if mode == "never":
        return False
    obstacle = vmap_obstacle(model, inner)
    if obstacle is None:
        return True
    if mode == "always":
        raise DiffoptError(f"cannot vectorize the meta-batch: {obstacle}; use vectorize='auto' "
                           "(--vectorize auto)")
    if not support_vmapped:
        warnings.warn(f"running the tasks of a meta-batch one by one, not all at once: {obstacle}",
                      UserWarning, stacklevel=2)
    return False


def loops_functionally(inner: InnerLoop, task_threads: int, model: nn.Module) -> bool:
    """Whether a loop over tasks may take its differentiated inner steps with ``torch.func``'s
    functional model and plain autograd (``InnerLoop.unroll(..., functional=True)`` outside vmap)
    instead of through higher: the same meta-gradient (tests/test_vectorize.py), 2-6% faster a
    conv-4 meta-step (BENCHMARKS.md), where the rule has a functional form (sgd, every
    ``UpdateRule``), steps are neither checkpointed nor solved, and tasks run one at a time (a
    per-step norm's step counter is the shared model's)."""
    return (inner.functional_rule is not None and inner.checkpoint is None and inner.solver == "gradient"
            and resolve_task_threads(task_threads, model) == 1)


def over_tasks(fn: Callable[[Task], object], episode: Episode):
    """``fn`` applied to every task of ``episode`` in one vmapped call; outputs stacked on dim 0."""
    batched = torch.func.vmap(lambda sx, sy, qx, qy: fn(Task(sx, sy, qx, qy)))
    return batched(episode.support_x, episode.support_y, episode.query_x, episode.query_y)


SMALL_SUPPORT = 4096
"""The most support-set input elements per task (5-way 1-shot Omniglot: 5 x 784 = 3,920) for
which MAML vmaps every task's inner loop by default (``over_support``). Measured on this CPU
(BENCHMARKS.md, ``benchmarks/second_order_levers.py support``; conv-4, one thread), the time
against whole tasks one at a time: meta-batch 8, 5 inner steps, 5 images of 28x28 a task 0.89x,
10 images 1.00x (at 4.4 times the memory), 25 1.17x, 50 1.30x; Mini-ImageNet's meta-batch 4
of 5 RGB 84x84 images 1.35x: grouped convolutions lose to plain ones once a task's batch is no
longer small."""


def small_support(episode: Episode) -> bool:
    """Whether ``episode``'s tasks have support sets small enough that vmapping their inner loops
    pays (``SMALL_SUPPORT``)."""
    return episode.support_x[0].numel() <= SMALL_SUPPORT


SUPPORT_MEMORY_SHARE = 0.25
"""The share of the memory free at the first meta-step (``diffopt.memory.available_bytes``) that
the support side's graphs, vmapped together, may take by default (``support_group_size``): a
quarter, because the held graph undercounts the backward's peak (conv-4 W2: 3.2 MB a task held,
about 9 MB a task at the peak; BENCHMARKS.md)."""


def support_group_size(adapt: Callable[[torch.Tensor, torch.Tensor], list[torch.Tensor]],
                       episode: Episode, params: list[torch.Tensor]) -> int:
    """How many of ``episode``'s tasks ``over_support`` may vmap at once: all of them where their
    graphs fit in ``SUPPORT_MEMORY_SHARE`` of the free memory, else as many as fit (at least 1),
    one task's graph measured by running its ``adapt`` (``diffopt.memory.graph_bytes``)."""
    free = available_bytes(episode.support_x.device)
    if free is None:
        return len(episode)
    one_task = graph_bytes(torch.func.vmap(adapt)(episode.support_x[:1], episode.support_y[:1]), params)
    return max(1, min(len(episode), int(SUPPORT_MEMORY_SHARE * free) // max(one_task, 1)))


def over_support(adapt: Callable[[torch.Tensor, torch.Tensor], list[torch.Tensor]],
                 query_loss: Callable[[Task, list[torch.Tensor]], torch.Tensor],
                 episode: Episode, tasks_at_once: int | None = None) -> torch.Tensor:
    """Backpropagate the mean over ``episode``'s tasks of ``query_loss(task, adapt(support_x,
    support_y))`` with ``tasks_at_once`` tasks' ``adapt`` at once under ``torch.func.vmap`` (None:
    all) and the query side one task at a time; returns that mean (detached).

    Each task's query loss is differentiated to its own adapted weights alone (its graph freed at
    once), and one backward per group carries those gradients through the group's batched inner
    loops into what ``adapt`` depends on: the same gradient as a backward per task, with the
    support side's small batches grouped over the tasks and each task's query batch run alone, as
    it runs fastest (BENCHMARKS.md). The groups' inner-loop graphs are held at once, so memory
    grows with ``tasks_at_once``. ``adapt`` returns tensors (one per weight; every step's, for a
    per-step loss).
    """
    size = len(episode) if tasks_at_once is None else tasks_at_once
    tasks = list(episode)
    total = torch.zeros((), dtype=episode.query_x.dtype, device=episode.query_x.device)
    for start in range(0, len(tasks), size):
        group = slice(start, start + size)
        adapted = torch.func.vmap(adapt)(episode.support_x[group], episode.support_y[group])
        to_adapted = [torch.zeros_like(weights) for weights in adapted]
        for index, task in enumerate(tasks[group]):
            leaves = [weights[index].detach().requires_grad_() for weights in adapted]
            loss = query_loss(task, leaves) / len(episode)
            for buffer, grad in zip(to_adapted, torch.autograd.grad(loss, leaves, allow_unused=True),
                                    strict=True):
                if grad is not None:
                    buffer[index] = grad
            total += loss.detach()
        differentiable = [(weights, grad) for weights, grad in zip(adapted, to_adapted, strict=True)
                          if weights.requires_grad]
        if differentiable:
            torch.autograd.backward(*map(list, zip(*differentiable, strict=True)))
    return total


def thread_obstacle(model: nn.Module) -> str | None:
    """Why tasks of ``model`` cannot run on concurrent threads, or None if they can."""
    if any(True for _ in model.buffers()):
        return "the model has buffers (running statistics would be updated from several threads)"
    if any(isinstance(module, RANDOM_MODULES) for module in model.modules()):
        return "the model has random layers (dropout would draw in the threads' interleaving)"
    if any(p.device.type != "cpu" for p in model.parameters()):
        return "the model is not on the CPU"
    return None


def resolve_task_threads(requested: int, model: nn.Module) -> int:
    """Tasks to run at once: ``requested``, or with 0 (auto) torch's intra-op thread count where
    ``thread_obstacle`` finds nothing and otherwise 1. DiffoptError if ``requested`` > 1 is unsafe."""
    if requested == 1:  # nothing to check: a walk over the model saved on every meta-step
        return 1
    obstacle = thread_obstacle(model)
    if requested == 0:
        return 1 if obstacle else torch.get_num_threads()
    if requested > 1 and obstacle:
        raise DiffoptError(f"cannot run tasks on {requested} threads: {obstacle}; use task_threads=1 "
                           "(--task_threads 1)")
    return requested


def map_tasks(fn: Callable[[Task], T], episode: Episode, threads: int = 1) -> Iterator[T]:
    """``fn(task)`` for every task of ``episode``, in task order, ``threads`` tasks at a time
    (the next tasks start while the caller consumes a result).

    ``fn`` runs under the caller's grad mode (thread-local in torch) and must not share mutable
    state between tasks (``InnerLoop`` keeps one functional model per thread).
    """
    if threads <= 1 or len(episode) <= 1:
        yield from map(fn, episode)
        return
    grad_enabled = torch.is_grad_enabled()

    def run(task: Task) -> T:
        with torch.set_grad_enabled(grad_enabled):
            return fn(task)

    # A pool per call, its threads ending with it: idle threads that have run OpenMP regions
    # leave libgomp counting more threads than cores, so it stops spin-waiting, which slowed the
    # caller's later single-threaded work by half (benchmarks: a hand-written loop, 0.76 -> 1.19 s).
    with ThreadPoolExecutor(threads, thread_name_prefix="diffopt-task") as pool:
        pending: deque = deque()  # at most ``threads`` results wait: memory as for ``threads`` tasks
        for task in episode:
            pending.append(pool.submit(run, task))
            if len(pending) == threads:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
