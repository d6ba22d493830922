"""Learned inner-loop update rules, and how higher differentiates through them.

An ``UpdateRule`` is an ``nn.Module`` whose parameters are meta-learned (step sizes, curvature
matrices). Like an optax gradient transformation it maps per-tensor directions to updates::

    state = rule.init(params)
    updates, state = rule.update(grads, state, params, step)   # new_params = params + updates

``Chain(a, b)`` feeds ``a``'s output to ``b``: ``Chain(MetaCurvature(...), LSLR(...))``
preconditions the gradient, then scales it by a learned step size. Entries may be None
(parameters that received no gradient); rules pass them through.

higher differentiates a rule through one mechanism: ``RuleOptimizer`` (a torch optimizer that
only carries the rule) is registered with ``DifferentiableRuleOptimizer``, so
``higher.optim.get_diff_optim`` unrolls it like any built-in optimizer, with the rule's
parameters on the autograd graph of every step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import higher
import torch
from torch import nn

Tensors = list[torch.Tensor | None]


def tensor_map(fn: Callable[..., torch.Tensor], index_tensors: Tensors, *rest: Sequence[Any]) -> Tensors:
    """``[fn(i, t, *others_i)]`` over tensors, keeping None entries as None."""
    return [None if t is None else fn(i, t, *(r[i] for r in rest)) for i, t in enumerate(index_tensors)]


def in_transform() -> bool:
    """Whether this runs inside a ``torch.func`` transform (``vmap`` over tasks, ``grad``)."""
    return torch._C._functorch.maybe_current_level() is not None


class UpdateRule(nn.Module):
    """Base class: override ``update`` (and ``init`` for rules with state)."""

    def init(self, params: Sequence[torch.Tensor]) -> Any:
        """Initial state for an unroll over ``params``; stateless rules return None."""
        return None

    def update(self, grads: Tensors, state: Any, params: Sequence[torch.Tensor],
               step: int) -> tuple[Tensors, Any]:
        """Map the directions ``grads`` at inner step ``step`` (0-based) to updates."""
        raise NotImplementedError


class Chain(UpdateRule):
    """Apply rules in order, each to the previous one's output."""

    def __init__(self, *rules: UpdateRule) -> None:
        super().__init__()
        self.rules = nn.ModuleList(rules)

    def init(self, params):
        return [rule.init(params) for rule in self.rules]

    def update(self, grads, state, params, step):
        states = []
        for rule, rule_state in zip(self.rules, state, strict=True):
            grads, rule_state = rule.update(grads, rule_state, params, step)
            states.append(rule_state)
        return grads, states


class SGD(UpdateRule):
    """Fixed step size: update = -lr * g (the last link of a chain that learns no step size)."""

    def __init__(self, lr: float) -> None:
        super().__init__()
        self.lr = lr

    def update(self, grads, state, params, step):
        return tensor_map(lambda i, g: -self.lr * g, grads), state

    def extra_repr(self) -> str:
        return f"lr={self.lr}"


def init_on(rule: UpdateRule, params: Sequence[torch.Tensor], index: Sequence[int] | None) -> Any:
    """``rule.init`` over the tensors at ``index`` (None: all): a rule sized to the tensors an
    inner loop adapts (``InnerLoop(params=...)``) sees those alone."""
    return rule.init(list(params) if index is None else [params[i] for i in index])


def update_on(rule: UpdateRule, grads: Tensors, state: Any, params: Sequence[torch.Tensor], step: int,
              index: Sequence[int] | None) -> tuple[Tensors, Any]:
    """``rule.update`` over the tensors at ``index`` (None: all); None (no update) for the others."""
    if index is None:
        return rule.update(grads, state, params, step)
    updates, state = rule.update([grads[i] for i in index], state, [params[i] for i in index], step)
    full: Tensors = [None] * len(params)
    for position, update in zip(index, updates, strict=True):
        full[position] = update
    return full, state


class RuleOptimizer(torch.optim.Optimizer):
    """Carries an ``UpdateRule`` to ``higher.optim.get_diff_optim``, applied to the parameters at
    ``index`` (None: all); it is never stepped itself."""

    def __init__(self, params, rule: UpdateRule, index: Sequence[int] | None = None) -> None:
        super().__init__(params, {})
        self.rule = rule  # attributes, not group settings: higher deep-copies the groups
        self.index = index

    def step(self, closure=None):
        raise RuntimeError("RuleOptimizer only parameterises a higher differentiable optimizer")


class DifferentiableRuleOptimizer(higher.optim.DifferentiableOptimizer):
    """Applies the rule to the inner gradients; counts steps for per-step rules."""

    def __init__(self, other: RuleOptimizer, reference_params, **kwargs) -> None:
        super().__init__(other, reference_params, **kwargs)
        self._rule, self._index = other.rule, other.index
        self._rule_state: Any = None
        self._step = 0

    def _update(self, grouped_grads, **kwargs) -> None:
        (group,), (grads,) = self.param_groups, grouped_grads
        params = group["params"]
        if self._step == 0:
            self._rule_state = init_on(self._rule, params, self._index)
        updates, self._rule_state = update_on(self._rule, list(grads), self._rule_state, params,
                                              self._step, self._index)
        group["params"] = [p if u is None else p + u for p, u in zip(params, updates, strict=True)]
        self._step += 1


higher.register_optim(RuleOptimizer, DifferentiableRuleOptimizer)
