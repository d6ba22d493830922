"""Meta-SGD (Li et al. 2017): a learned step size for every parameter element."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from diffopt.optim.rule import UpdateRule, tensor_map


class MetaSGD(UpdateRule):
    """update = -alpha * g element-wise; ``alpha`` is shaped like its parameter (and of its dtype
    and device), initialised to ``lr``.

    With ``per_step`` there is one ``alpha`` per inner step ([steps, *shape]); steps beyond the
    learned ones reuse the last.
    """

    def __init__(self, params: Sequence[torch.Tensor], lr: float, steps: int = 1,
                 per_step: bool = False) -> None:
        super().__init__()
        lead = (max(steps, 1),) if per_step else ()
        self.per_step = per_step
        self.alpha = nn.ParameterList(
            nn.Parameter(p.new_full((*lead, *p.shape), float(lr))) for p in params)

    def update(self, grads, state, params, step):
        def scale(i, g):
            alpha = self.alpha[i]
            return -(alpha[min(step, alpha.shape[0] - 1)] if self.per_step else alpha) * g

        return tensor_map(scale, grads), state
