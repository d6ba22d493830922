"""Inner-loop update rules that higher can differentiate through.

Two kinds share one registry of names, and one path into higher (``get_diff_optim``):

- torch optimizers that higher differentiates itself: ``sgd``, ``momentum``, ``adam``, ...
  (``INNER_OPTIMIZERS``), their hyper-parameters set by ``options`` (``--inner_options``);
- ``adamw``, an ``UpdateRule`` with nothing learned (``FIXED_RULES``: higher has no AdamW);
- learned rules (``UpdateRule`` modules whose parameters are meta-learned), carried to higher
  by ``RuleOptimizer``: ``lslr``, ``meta_sgd``, ``meta_sgd_per_step``, ``meta_curvature``
  (with a fixed step size) and ``meta_curvature+lslr`` / ``meta_curvature+meta_sgd``.

A new rule is one short module: subclass ``UpdateRule`` (see examples/custom_rule.py), then
name it ``module:attribute`` wherever a rule name is taken (``diffopt.plugins``), or
``register_rule`` it under a name in this process (a notebook).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch

from diffopt.errors import DiffoptError, unknown_name
from diffopt.optim.adam import Adam, AdamW
from diffopt.optim.lslr import LSLR
from diffopt.optim.meta_curvature import MetaCurvature
from diffopt.optim.meta_sgd import MetaSGD
from diffopt.optim.rule import SGD, Chain, RuleOptimizer, UpdateRule
from diffopt.plugins import is_plugin, load_plugin

__all__ = ["FIXED_RULES", "HIGHER_NOTICES", "INNER_OPTIMIZERS", "LEARNED_RULES", "LSLR", "SGD", "Adam",
           "AdamW", "Chain", "MetaCurvature", "MetaSGD",
           "RuleOptimizer", "UpdateRule", "build_rule", "check_inner_options", "check_rule_name",
           "first_order_twin", "inner_hyperparameters",
           "inner_rule_names", "make_inner_optimizer", "register_rule"]

OptimizerFactory = Callable[..., torch.optim.Optimizer]
"""(params, lr, **hyper-parameters) -> torch optimizer."""

_NOT_HYPERPARAMETERS = {"params", "lr", "foreach", "maximize", "capturable", "differentiable", "fused",
                        "decoupled_weight_decay"}
"""torch optimizer arguments that are not the update's hyper-parameters, or that higher 0.2.1
does not implement (it ignores them: a setting would silently not apply)."""


def _torch_optimizer(cls: type[torch.optim.Optimizer], **preset: Any) -> OptimizerFactory:
    """A factory of ``cls`` with ``preset`` hyper-parameters, which the caller's override."""
    def factory(params, lr, **options):
        return cls(params, lr=lr, **{**preset, **options})

    factory.hyperparameters = tuple(  # type: ignore[attr-defined]
        name for name in inspect.signature(cls).parameters if name not in _NOT_HYPERPARAMETERS)
    return factory


INNER_OPTIMIZERS: dict[str, OptimizerFactory] = {
    "sgd": _torch_optimizer(torch.optim.SGD),
    "momentum": _torch_optimizer(torch.optim.SGD, momentum=0.9),
    # higher's differentiable Adam uses the pre-1.5 torch formula (eps before bias correction).
    "adam": _torch_optimizer(torch.optim.Adam),
    # Nichol et al. 2018 (Reptile): inner Adam without momentum.
    "adam_beta1_0": _torch_optimizer(torch.optim.Adam, betas=(0.0, 0.999)),
    # The rest of what higher 0.2.1 differentiates (higher.optim._opt_mapping), torch's defaults
    # but the step size (``--inner_options`` sets the others). AdamW is not among them: see
    # ``adamw`` below. Rprop steps by the gradient's sign: its meta-gradient has no second-order
    # part (exact, since the sign is piecewise constant); higher warns that its RMSprop may be
    # wrong, yet it matches finite differences wherever the squared-gradient average is away
    # from 0 (tests/test_gradients.py).
    "nesterov": _torch_optimizer(torch.optim.SGD, momentum=0.9, nesterov=True),
    "adagrad": _torch_optimizer(torch.optim.Adagrad),
    "adadelta": _torch_optimizer(torch.optim.Adadelta),
    "adamax": _torch_optimizer(torch.optim.Adamax),
    "asgd": _torch_optimizer(torch.optim.ASGD),
    "rmsprop": _torch_optimizer(torch.optim.RMSprop),
    "rprop": _torch_optimizer(torch.optim.Rprop),
}

HIGHER_NOTICES = r"Differentiable (RMSprop suffers|Rprop \(correctly\) yields)"
"""higher's warnings on every RMSprop / Rprop unroll, which the comment above answers."""

RuleFactory = Callable[[Sequence[torch.Tensor], float, int], UpdateRule]
"""(parameters to update, initial step size, inner steps) -> rule; a factory (or ``UpdateRule``
subclass) taking only the first two or the first one is called with those."""

def _adamw(params: Sequence[torch.Tensor], lr: float, steps: int, **options: Any) -> UpdateRule:
    return AdamW(lr, **options)


_adamw.hyperparameters = ("betas", "eps", "weight_decay")  # type: ignore[attr-defined]

_STEP_SIZES: dict[str, RuleFactory] = {
    "lslr": lambda params, lr, steps: LSLR(params, steps, lr),
    "meta_sgd": lambda params, lr, steps: MetaSGD(params, lr),
    "meta_sgd_per_step": lambda params, lr, steps: MetaSGD(params, lr, steps, per_step=True),
}

FIXED_RULES: dict[str, RuleFactory] = {
    # AdamW (Loshchilov & Hutter 2019) as an UpdateRule (higher has no differentiable AdamW):
    # higher's Adam formula plus the decoupled weight decay -lr wd w; nothing meta-learned.
    "adamw": _adamw,
}
"""Optimizers diffopt writes as rules (higher does not differentiate them); nothing is learned."""

LEARNED_RULES: dict[str, RuleFactory] = {
    **_STEP_SIZES,
    "meta_curvature": lambda params, lr, steps: Chain(MetaCurvature(params), SGD(lr)),
    **{f"meta_curvature+{name}": (lambda f: lambda params, lr, steps: Chain(
        MetaCurvature(params), f(params, lr, steps)))(factory)
       for name, factory in _STEP_SIZES.items()},
}


def inner_rule_names() -> list[str]:
    """Every name ``--inner_optimizer`` accepts."""
    return [*INNER_OPTIMIZERS, *FIXED_RULES, *LEARNED_RULES]


def register_rule(name: str, factory: RuleFactory) -> None:
    """Make ``--inner_optimizer name`` (and ``InnerLoop(name, ...)``) build ``factory``'s rule in
    this process. Fresh processes (``compare``'s runs, a later ``evaluate``) do not see it: give
    them ``module:attribute`` instead."""
    if not isinstance(name, str) or not name or is_plugin(name):
        raise DiffoptError(f"a rule's name is a word without ':'; got {name!r}")
    if name in inner_rule_names():
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
    factory = FIXED_RULES.get(name) or LEARNED_RULES.get(name)
    if factory is None:
        raise unknown_name("inner optimizer", name, inner_rule_names(), "my_rules:ScaledSignSGD")
    return factory


def check_rule_name(name: object) -> None:
    """DiffoptError unless ``name`` is a registered rule or an importable ``module:attribute``."""
    if not isinstance(name, str):
        raise unknown_name("inner optimizer", name, inner_rule_names(), "my_rules:ScaledSignSGD")
    if name not in INNER_OPTIMIZERS:
        _rule_factory(name)


def inner_hyperparameters(name: str) -> tuple[str, ...]:
    """The hyper-parameters ``--inner_options`` may set for the inner optimizer ``name``: a torch
    optimizer's (betas, eps, momentum, ...), or the keyword arguments its rule's factory takes."""
    factory = INNER_OPTIMIZERS[name] if name in INNER_OPTIMIZERS else _rule_factory(name)
    if hasattr(factory, "hyperparameters"):
        return factory.hyperparameters
    try:
        parameters = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return ()
    return tuple(p.name for p in parameters if p.kind is p.KEYWORD_ONLY or (
        p.kind is p.POSITIONAL_OR_KEYWORD and p.name not in ("self", "params", "lr", "steps")))


def check_inner_options(name: str, options: Mapping[str, Any] | None) -> None:
    """DiffoptError unless every key of ``options`` is a hyper-parameter of ``name`` whose value
    the optimizer accepts."""
    if not options:
        return
    if not isinstance(options, Mapping):
        raise DiffoptError(f"--inner_options takes name: value pairs, e.g. '{{momentum: 0.5}}'; "
                           f"got {options!r}")
    known = inner_hyperparameters(name)
    for key in options:
        if key not in known:
            raise unknown_name(f"hyper-parameter of the inner optimizer {name}", key, known or ("none",))
    try:
        if name in INNER_OPTIMIZERS:
            make_inner_optimizer(name, [torch.zeros(1)], 0.1, options)
        else:
            build_rule(name, [torch.zeros(1)], 0.1, 1, options)
    except (TypeError, ValueError) as error:
        raise DiffoptError(f"--inner_options {dict(options)} do not suit the inner optimizer {name} "
                           f"({error})") from None


def build_rule(name: str, params: Sequence[torch.Tensor], lr: float, steps: int,
               options: Mapping[str, Any] | None = None) -> UpdateRule | None:
    """The learned rule ``name`` (registered, or ``module:attribute``) for ``params`` (their
    shapes, dtype, device), its factory given the keyword arguments ``options``; None for a
    torch optimizer."""
    if name in INNER_OPTIMIZERS:
        return None
    factory = _rule_factory(name)
    arguments = (params, lr, steps)
    try:
        signature = inspect.signature(factory)
        taken = len([p for p in signature.parameters.values() if p.name not in (options or {})
                     and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)])
        if not any(p.kind is p.VAR_POSITIONAL for p in signature.parameters.values()):
            arguments = arguments[:max(1, min(taken, 3))]
    except (TypeError, ValueError):  # no signature to read: the full one
        pass
    rule = factory(*arguments, **(options or {}))
    if not isinstance(rule, UpdateRule):
        raise DiffoptError(f"inner optimizer {name!r} made a {type(rule).__name__}, not a "
                           "diffopt.optim.UpdateRule")
    return rule


def first_order_twin(name: str, lr: float,
                     options: Mapping[str, Any] | None = None) -> UpdateRule | None:
    """The ``UpdateRule`` that computes what the torch optimizer ``name`` with hyper-parameters
    ``options`` does (plain SGD, Adam without weight decay or amsgrad, as higher differentiates
    it), for first-order unrolls; None where there is none (momentum)."""
    optimizer = make_inner_optimizer(name, [torch.zeros(1)], lr, options)
    group = optimizer.param_groups[0]
    if isinstance(optimizer, torch.optim.SGD) and not group["momentum"] and not group["weight_decay"]:
        return SGD(lr)
    if isinstance(optimizer, torch.optim.Adam) and not group["weight_decay"] and not group["amsgrad"]:
        return Adam(lr, group["betas"], group["eps"])
    return None


def make_inner_optimizer(name: str, params: Iterable[torch.Tensor], lr: float,
                         options: Mapping[str, Any] | None = None) -> torch.optim.Optimizer:
    """The torch optimizer ``name`` over ``params`` with step size ``lr`` and the
    hyper-parameters ``options`` (the name's presets otherwise, then torch's defaults)."""
    if name not in INNER_OPTIMIZERS:
        raise unknown_name("inner optimizer", name, inner_rule_names(), "my_rules:ScaledSignSGD")
    return INNER_OPTIMIZERS[name](params, lr, **(options or {}))
