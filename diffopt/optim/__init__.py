"""Inner-loop update rules that higher can differentiate through.

A rule is a torch optimizer class; ``higher.optim.get_diff_optim`` turns an instance of it into
a differentiable optimizer whose steps stay on the autograd graph. ``make_inner_optimizer``
builds the (never stepped) torch optimizer that carries the rule's hyper-parameters.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from diffopt.errors import unknown_name

OptimizerFactory = Callable[[Iterable[torch.Tensor], float], torch.optim.Optimizer]

INNER_OPTIMIZERS: dict[str, OptimizerFactory] = {
    "sgd": lambda params, lr: torch.optim.SGD(params, lr=lr),
    "momentum": lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9),
    # higher's differentiable Adam uses the pre-1.5 torch formula (eps before bias correction).
    "adam": lambda params, lr: torch.optim.Adam(params, lr=lr),
}


def make_inner_optimizer(name: str, params: Iterable[torch.Tensor], lr: float) -> torch.optim.Optimizer:
    """The torch optimizer ``name`` over ``params`` with step size ``lr``."""
    if name not in INNER_OPTIMIZERS:
        raise unknown_name("inner optimizer", name, INNER_OPTIMIZERS)
    return INNER_OPTIMIZERS[name](params, lr)
