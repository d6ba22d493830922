"""ANIL (Raghu et al. 2020) and BOIL (Oh et al. 2021): MAML whose inner loop adapts part of the model.

ANIL adapts the head (the last linear layer) alone; the body gets its meta-gradient through the
adapted head. BOIL adapts the body alone; the head is meta-learned but frozen in the inner loop.
Both are ``InnerLoop(params="head" | "body")`` under MAML (``--inner_params``, which any algorithm
takes); these names fix it, and a dataset's MAML protocol applies to them too.
"""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from diffopt.algorithms.maml import MAML
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

    Constructor arguments: see ``MAML``; ``inner``'s params become ``head``."""

    name = "anil"
    adapts = "head"


class BOIL(_PartialMAML):
    """MAML whose inner loop adapts everything but the last linear layer (Body Only update in
    the Inner Loop). Constructor arguments: see ``MAML``; ``inner``'s params become ``body``."""

    name = "boil"
    adapts = "body"
