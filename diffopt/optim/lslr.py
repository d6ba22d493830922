"""LSLR: learned per-layer, per-step step sizes (Antoniou et al. 2019, "How to Train Your MAML")."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from diffopt.optim.rule import UpdateRule, tensor_map


class LSLR(UpdateRule):
    """update_i = -alpha[i, step] * g_i: one learned step size per parameter tensor and step.

    ``alpha``: [tensors, steps], initialised to ``lr``, with the dtype and device of ``params``
    (the tensors it will update). Steps beyond the learned ones (e.g. more steps at evaluation
    than in training) use the last learned step size.
    """

    def __init__(self, params: Sequence[torch.Tensor], steps: int, lr: float) -> None:
        super().__init__()
        self.alpha = nn.Parameter(params[0].new_full((len(params), max(steps, 1)), float(lr)))

    def update(self, grads, state, params, step):
        column = min(step, self.alpha.shape[1] - 1)
        return tensor_map(lambda i, g: -self.alpha[i, column] * g, grads), state
