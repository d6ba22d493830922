"""The inner loop: adapt a model to one task by unrolling a differentiable optimizer with higher."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator

import higher
import torch
from torch import nn

from diffopt.errors import DiffoptError
from diffopt.optim import LEARNED_RULES, RuleOptimizer, UpdateRule, build_rule, make_inner_optimizer

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _detach_all(grads):
    return [None if g is None else g.detach() for g in grads]


class InnerLoop(nn.Module):
    """``steps`` full-batch steps of an inner update rule with (initial) step size ``lr``.

    ``optimizer``: a torch optimizer name (sgd, momentum, adam), a learned rule's name
    (``diffopt.optim.LEARNED_RULES``; ``model`` is then needed to size it), or an
    ``UpdateRule`` instance. A learned rule is a submodule (``self.rule``), so its parameters
    are meta-parameters: the outer optimizer updates them and the checkpoint saves them.
    """

    def __init__(self, optimizer: str | UpdateRule = "sgd", lr: float = 0.01, steps: int = 1,
                 model: nn.Module | None = None) -> None:
        super().__init__()
        self.lr, self.steps = lr, steps
        if isinstance(optimizer, UpdateRule):
            self.optimizer, self.rule = type(optimizer).__name__, optimizer
            return
        self.optimizer = optimizer
        if model is None and optimizer in LEARNED_RULES:
            raise DiffoptError(f"the learned rule {optimizer!r} is sized from the model: "
                               f"InnerLoop({optimizer!r}, lr, steps, model=model)")
        params = [] if model is None else [p.detach() for p in model.parameters()]
        self.rule = build_rule(optimizer, params, lr, steps)

    @property
    def learned(self) -> bool:
        """Whether the rule has meta-learned parameters."""
        return any(True for _ in self.parameters())

    def unroll(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        x: torch.Tensor,
        y: torch.Tensor,
        steps: int | None = None,
        *,
        track_higher_grads: bool = True,
        detach_inner_grads: bool = False,
    ) -> Iterator[higher.patch._MonkeyPatchBase]:
        """Yield the functional model before adaptation and after each of ``steps`` steps.

        x: [K, *x], y: [K, *y], the task's adaptation data. The functional model's parameters
        start as clones of ``model``'s parameters that stay on its graph, so with ``track_higher_grads`` the
        adapted weights stay differentiable with respect to ``model.parameters()``
        (second order); without it each step's result is detached (first order).
        ``detach_inner_grads`` keeps the updates on the graph but treats the inner gradients as
        constants (MAML++'s first-order mode: learned step sizes still receive gradients).
        The same functional model object is yielded each time, its weights updated in place.
        """
        steps = self.steps if steps is None else steps
        if self.rule is not None:
            template = RuleOptimizer(model.parameters(), self.rule)
        else:
            template = make_inner_optimizer(self.optimizer, model.parameters(), self.lr)
        fmodel = self._functional(model, track_higher_grads)
        diffopt = higher.optim.get_diff_optim(
            template, model.parameters(), fmodel=fmodel, track_higher_grads=track_higher_grads,
            grad_callback=_detach_all if detach_inner_grads else None,
        )
        yield fmodel
        for _ in range(steps):
            diffopt.step(loss_fn(fmodel(x), y))
            yield fmodel

    def _functional(self, model: nn.Module, track: bool) -> higher.patch._MonkeyPatchBase:
        """``higher.monkeypatch(model, copy_initial_weights=False)``, built once per model.

        Building the functional model dominates a small model's inner loop, so it is cached
        (outside the module tree) and reset here exactly as ``monkeypatch`` initialises it:
        empty fast-weight history, fast weights that are clones of the current parameters,
        buffers copied, and the train/eval mode of ``model``. One unroll per model may be in
        progress at a time.
        """
        key = [id(p) for p in model.parameters()]
        cached = self.__dict__.get("_functional_cache")
        if cached is None or cached[0]() is not model or cached[1] != key:
            fmodel = higher.monkeypatch(
                model, copy_initial_weights=False, track_higher_grads=track
            )
            self.__dict__["_functional_cache"] = (weakref.ref(model), key, fmodel)
            return fmodel
        fmodel = cached[2]
        # A fresh monkeypatch starts with no fast-weight history; higher appends to it while
        # tracking and reads its last entry, so a stale history would leak graphs and weights.
        # Same order as monkeypatch: first weights set while tracking, then the mode.
        fmodel._fast_params = None
        fmodel.track_higher_grads = True
        fmodel.train(model.training)
        higher.patch.buffer_sync(model, fmodel)
        fmodel.update_params([p.clone() for p in model.parameters()])
        fmodel.track_higher_grads = track
        return fmodel

    def __getstate__(self) -> dict:
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__
        return {k: v for k, v in state.items() if k != "_functional_cache"}

    def adapt(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        x: torch.Tensor,
        y: torch.Tensor,
        steps: int | None = None,
        *,
        track_higher_grads: bool = True,
    ) -> higher.patch._MonkeyPatchBase:
        """The functional model after ``steps`` steps (see ``unroll``)."""
        *_, adapted = self.unroll(model, loss_fn, x, y, steps, track_higher_grads=track_higher_grads)
        return adapted

    def extra_repr(self) -> str:
        return f"optimizer={self.optimizer!r}, lr={self.lr}, steps={self.steps}"
