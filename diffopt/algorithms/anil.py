"""ANIL (Raghu et al. 2020) and BOIL (Oh et al. 2021): MAML whose inner loop adapts part of the model.

ANIL adapts the head (the last linear layer) alone; the body gets its meta-gradient through the
adapted head. BOIL adapts the body alone; the head is meta-learned but frozen in the inner loop.
Both are ``InnerLoop(params="head" | "body")`` under MAML (``--inner_params``, which any algorithm
takes); these names fix it, and a dataset's MAML protocol applies to them too.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from diffopt.algorithms.maml import MAML
from diffopt.data.episode import Task
from diffopt.errors import DiffoptError
from diffopt.inner import InnerLoop, LossFn


class _PartialMAML(MAML):
    adapts: ClassVar[str]
    protocol_of = "maml"

    def __init__(self, model: nn.Module, inner: InnerLoop, loss_fn: LossFn, vectorize: str = "auto",
                 task_threads: int = 1) -> None:
        if inner.params not in ("all", self.adapts):  # 'all' is InnerLoop's default: set it here
            raise DiffoptError(f"{self.name} adapts the {self.adapts} in the inner loop, not "
                               f"{inner.params!r}; use maml with --inner_params {inner.params}")
        if inner.params != self.adapts:
            inner.adapt_only(self.adapts, model)  # a learned rule then sized to those tensors
        super().__init__(model, inner, loss_fn, vectorize=vectorize, task_threads=task_threads)


class ANIL(_PartialMAML):
    """MAML whose inner loop adapts the last linear layer alone (Almost No Inner Loop).

    The body does not change in the inner loop, so where the model is a plain ``nn.Sequential``
    ending in its head (MLP, conv4) and has no per-step layers, the body runs once on the support
    set and once on the queries and the inner loop adapts the head on those features (the same
    meta-gradient, up to rounding: tests/test_anil.py); elsewhere the whole model runs every
    inner step. Constructor arguments: see ``MAML``; ``inner``'s params become ``head``."""

    name = "anil"
    adapts = "head"
    batches_support = False  # its query loss computes the body's features once

    def body_and_head(self) -> tuple[nn.Module, nn.Module] | None:
        """(the model without its last layer, that layer) where the model's output is the head
        of the body's output and the body is the same at every inner step; else None."""
        model = self.model
        if not isinstance(model, nn.Sequential) or type(model).forward is not nn.Sequential.forward:
            return None
        layers = list(model.children())
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        if not layers or not linears or layers[-1] is not linears[-1]:
            return None
        if any(hasattr(m, "inner_step") for m in model.modules()):
            return None
        return nn.Sequential(*layers[:-1]), layers[-1]

    def query_loss(self, task: Task, *, track_higher_grads: bool = True) -> torch.Tensor:
        split = self.body_and_head()
        if split is None:
            return super().query_loss(task, track_higher_grads=track_higher_grads)
        body, head = split
        features = Task(body(task.support_x), task.support_y, body(task.query_x), task.query_y)
        return self.adapted_query_loss(head, features, track_higher_grads)


class BOIL(_PartialMAML):
    """MAML whose inner loop adapts everything but the last linear layer (Body Only update in
    the Inner Loop). Constructor arguments: see ``MAML``; ``inner``'s params become ``body``."""

    name = "boil"
    adapts = "body"
