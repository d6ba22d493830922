"""Inner-loop update rules that higher can differentiate through.

Two kinds share one registry of names, and one path into higher (``get_diff_optim``):

- torch optimizers that higher differentiates itself: ``sgd``, ``momentum``, ``adam``;
- learned rules (``UpdateRule`` modules whose parameters are meta-learned), carried to higher
  by ``RuleOptimizer``: ``lslr``, ``meta_sgd``, ``meta_sgd_per_step``, ``meta_curvature``
  (with a fixed step size) and ``meta_curvature+lslr`` / ``meta_curvature+meta_sgd``.

A new rule is one short module: subclass ``UpdateRule`` (see examples/custom_rule.py), then
name it ``module:attribute`` wherever a rule name is taken (``diffopt.plugins``), or
``register_rule`` it under a name in this process (a notebook).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Sequence

import torch

from diffopt.errors import DiffoptError, unknown_name
from diffopt.optim.adam import Adam
from diffopt.optim.lslr import LSLR
from diffopt.optim.meta_curvature import MetaCurvature
from diffopt.optim.meta_sgd import MetaSGD
from diffopt.optim.rule import SGD, Chain, RuleOptimizer, UpdateRule
from diffopt.plugins import is_plugin, load_plugin

__all__ = ["HIGHER_NOTICES", "INNER_OPTIMIZERS", "LEARNED_RULES", "LSLR", "SGD", "Adam", "Chain",
           "MetaCurvature", "MetaSGD",
           "RuleOptimizer", "UpdateRule", "build_rule", "check_rule_name", "first_order_twin",
           "inner_rule_names", "make_inner_optimizer", "register_rule"]

OptimizerFactory = Callable[[Iterable[torch.Tensor], float], torch.optim.Optimizer]

INNER_OPTIMIZERS: dict[str, OptimizerFactory] = {
    "sgd": lambda params, lr: torch.optim.SGD(params, lr=lr),
    "momentum": lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9),
    # higher's differentiable Adam uses the pre-1.5 torch formula (eps before bias correction).
    "adam": lambda params, lr: torch.optim.Adam(params, lr=lr),
    # Nichol et al. 2018 (Reptile): inner Adam without momentum.
    "adam_beta1_0": lambda params, lr: torch.optim.Adam(params, lr=lr, betas=(0.0, 0.999)),
    # The rest of what higher 0.2.1 differentiates (higher.optim._opt_mapping), torch's defaults
    # but the step size. AdamW is not among them. Rprop steps by the gradient's sign: its
    # meta-gradient has no second-order part (exact, since the sign is piecewise constant);
    # higher warns that its RMSprop may be wrong, yet it matches finite differences wherever
    # the squared-gradient average is away from 0 (tests/test_gradients.py).
    "nesterov": lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True),
    "adagrad": lambda params, lr: torch.optim.Adagrad(params, lr=lr),
    "adadelta": lambda params, lr: torch.optim.Adadelta(params, lr=lr),
    "adamax": lambda params, lr: torch.optim.Adamax(params, lr=lr),
    "asgd": lambda params, lr: torch.optim.ASGD(params, lr=lr),
    "rmsprop": lambda params, lr: torch.optim.RMSprop(params, lr=lr),
    "rprop": lambda params, lr: torch.optim.Rprop(params, lr=lr),
}

HIGHER_NOTICES = r"Differentiable (RMSprop suffers|Rprop \(correctly\) yields)"
"""higher's warnings on every RMSprop / Rprop unroll, which the comment above answers."""

RuleFactory = Callable[[Sequence[torch.Tensor], float, int], UpdateRule]
"""(parameters to update, initial step size, inner steps) -> rule; a factory (or ``UpdateRule``
subclass) taking only the first two or the first one is called with those."""

_STEP_SIZES: dict[str, RuleFactory] = {
    "lslr": lambda params, lr, steps: LSLR(params, steps, lr),
    "meta_sgd": lambda params, lr, steps: MetaSGD(params, lr),
    "meta_sgd_per_step": lambda params, lr, steps: MetaSGD(params, lr, steps, per_step=True),
}

LEARNED_RULES: dict[str, RuleFactory] = {
    **_STEP_SIZES,
    "meta_curvature": lambda params, lr, steps: Chain(MetaCurvature(params), SGD(lr)),
    **{f"meta_curvature+{name}": (lambda f: lambda params, lr, steps: Chain(
        MetaCurvature(params), f(params, lr, steps)))(factory)
       for name, factory in _STEP_SIZES.items()},
}


def inner_rule_names() -> list[str]:
    """Every name ``--inner_optimizer`` accepts."""
    return [*INNER_OPTIMIZERS, *LEARNED_RULES]


def register_rule(name: str, factory: RuleFactory) -> None:
    """Make ``--inner_optimizer name`` (and ``InnerLoop(name, ...)``) build ``factory``'s rule in
    this process. Fresh processes (``compare``'s runs, a later ``evaluate``) do not see it: give
    them ``module:attribute`` instead."""
    if not isinstance(name, str) or not name or is_plugin(name):
        raise DiffoptError(f"a rule's name is a word without ':'; got {name!r}")
    if name in INNER_OPTIMIZERS or name in LEARNED_RULES:
        raise DiffoptError(f"inner optimizer {name!r} exists already; choose another name")
    if not callable(factory):
        raise DiffoptError(f"register_rule({name!r}, ...) takes a factory or an UpdateRule subclass")
    LEARNED_RULES[name] = factory


def _rule_factory(name: str) -> RuleFactory:
    if is_plugin(name):
        factory = load_plugin(name, "inner optimizer")
        if not callable(factory):
            raise DiffoptError(f"inner optimizer {name!r} is a {type(factory).__name__}, not a rule "
                               "factory or an UpdateRule subclass")
        return factory
    if name not in LEARNED_RULES:
        raise unknown_name("inner optimizer", name, inner_rule_names())
    return LEARNED_RULES[name]


def check_rule_name(name: object) -> None:
    """DiffoptError unless ``name`` is a registered rule or an importable ``module:attribute``."""
    if not isinstance(name, str):
        raise unknown_name("inner optimizer", name, inner_rule_names())
    if name not in INNER_OPTIMIZERS:
        _rule_factory(name)


def build_rule(name: str, params: Sequence[torch.Tensor], lr: float, steps: int) -> UpdateRule | None:
    """The learned rule ``name`` (registered, or ``module:attribute``) for ``params`` (their
    shapes, dtype, device); None for a torch optimizer."""
    if name in INNER_OPTIMIZERS:
        return None
    factory = _rule_factory(name)
    arguments = (params, lr, steps)
    try:
        signature = inspect.signature(factory)
        taken = len(signature.parameters)
        if not any(p.kind is p.VAR_POSITIONAL for p in signature.parameters.values()):
            arguments = arguments[:max(1, min(taken, 3))]
    except (TypeError, ValueError):  # no signature to read: the full one
        pass
    rule = factory(*arguments)
    if not isinstance(rule, UpdateRule):
        raise DiffoptError(f"inner optimizer {name!r} made a {type(rule).__name__}, not a "
                           "diffopt.optim.UpdateRule")
    return rule


def first_order_twin(name: str, lr: float) -> UpdateRule | None:
    """The ``UpdateRule`` that computes what the torch optimizer ``name`` does (plain SGD, Adam
    without weight decay or amsgrad, as higher differentiates it), for first-order unrolls; None
    where there is none (momentum)."""
    optimizer = make_inner_optimizer(name, [torch.zeros(1)], lr)
    group = optimizer.param_groups[0]
    if isinstance(optimizer, torch.optim.SGD) and not group["momentum"] and not group["weight_decay"]:
        return SGD(lr)
    if isinstance(optimizer, torch.optim.Adam) and not group["weight_decay"] and not group["amsgrad"]:
        return Adam(lr, group["betas"], group["eps"])
    return None


def make_inner_optimizer(name: str, params: Iterable[torch.Tensor], lr: float) -> torch.optim.Optimizer:
    """The torch optimizer ``name`` over ``params`` with step size ``lr``."""
    if name not in INNER_OPTIMIZERS:
        raise unknown_name("inner optimizer", name, inner_rule_names())
    return INNER_OPTIMIZERS[name](params, lr)
