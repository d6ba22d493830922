"""Vectorising the meta-batch: every task's inner loop at once with ``torch.func.vmap``.

``vmap`` over tasks runs the functional unroll (``InnerLoop.unroll(..., functional=True)``)
for a whole episode in one batched pass: several times faster than a loop over tasks for
small models. It is used only where its meta-gradients are proven right by the
finite-difference tests (tests/test_vectorize.py): models built from the modules in
``VMAP_SAFE_MODULES`` with no buffers, and inner rules with a functional form (sgd and every
``UpdateRule``). ``torch.func.vmap`` gives wrong meta-gradients through affine BatchNorm and
LayerNorm and refuses BatchNorm with running statistics, so those models take the loop.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
from torch import nn

from diffopt.data.episode import Episode, Task
from diffopt.errors import DiffoptError
from diffopt.inner import InnerLoop

VECTORIZE_MODES = ("auto", "always", "never")

VMAP_SAFE_MODULES: tuple[type[nn.Module], ...] = (
    nn.Sequential, nn.Linear, nn.Conv2d, nn.Flatten, nn.Identity, nn.MaxPool2d, nn.AvgPool2d,
    nn.ReLU, nn.LeakyReLU, nn.ELU, nn.GELU, nn.Tanh, nn.Sigmoid, nn.Softplus,
)
"""Module types whose functional calls are checked under vmap by the gradient tests (plus
subclasses of ``nn.Sequential`` that keep its ``forward``, such as ``diffopt.models.MLP``)."""


def vmap_obstacle(model: nn.Module, inner: InnerLoop) -> str | None:
    """Why the meta-batch of ``model`` adapted by ``inner`` cannot be vmapped, or None if it can."""
    for name, module in model.named_modules():
        plain_sequential = isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward
        if type(module) not in VMAP_SAFE_MODULES and not plain_sequential:
            return f"module {name or 'model'} ({type(module).__name__}) is not checked under vmap"
    if any(True for _ in model.buffers()):
        return "the model has buffers (e.g. running statistics)"
    if inner.functional_rule is None:
        return f"the inner optimizer {inner.optimizer!r} has no functional form"
    return None


def resolve_vectorize(mode: str, model: nn.Module, inner: InnerLoop) -> bool:
    """Whether to vmap the meta-batch: ``mode`` is auto, always or never.

    ``auto`` vmaps where ``vmap_obstacle`` finds nothing and otherwise prints a one-line notice;
    ``always`` raises DiffoptError naming the obstacle.
    """
    if mode not in VECTORIZE_MODES:
        raise DiffoptError(f"--vectorize must be one of {', '.join(VECTORIZE_MODES)}; got {mode!r}")
    if mode == "never":
        return False
    obstacle = vmap_obstacle(model, inner)
    if obstacle is None:
        return True
    if mode == "always":
        raise DiffoptError(f"cannot vectorize the meta-batch: {obstacle}; use --vectorize auto")
    print(f"diffopt: looping over tasks, not vectorizing: {obstacle}", file=sys.stderr)
    return False


def over_tasks(fn: Callable[[Task], object], episode: Episode):
    """``fn`` applied to every task of ``episode`` in one vmapped call; outputs stacked on dim 0."""
    batched = torch.func.vmap(lambda sx, sy, qx, qy: fn(Task(sx, sy, qx, qy)))
    return batched(episode.support_x, episode.support_y, episode.query_x, episode.query_y)
