"""Working copies of a model for inner-loop unrolls: higher's monkeypatched model, a plain copy
for first-order steps, and ``FunctionalModel`` for ``torch.func``; built once and reset per unroll."""

from __future__ import annotations

import copy
import threading
import weakref

import higher
import torch
from torch import nn
from torch.func import functional_call


def deepcopy_model(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose parameters are leaves of their own (not on any graph)."""
    with torch.no_grad():
        return copy.deepcopy(model)


def share_buffers(module: nn.Module, fmodule: nn.Module) -> None:
    """Make ``fmodule``'s buffers the very tensors of ``module`` (higher copies them), so running
    statistics updated during an unroll accumulate in the model, as in ordinary training."""
    fmodule._buffers.update(module._buffers)
    for name, child in module._modules.items():
        share_buffers(child, fmodule._modules[name])


class FunctionalModel:
    """``model`` evaluated with the weights ``params`` (``torch.func.functional_call``).

    What ``InnerLoop.unroll(..., functional=True)`` yields: pure functions of tensors, so an
    unroll can run under ``torch.func.vmap`` (one task per batch entry).
    """

    def __init__(self, model: nn.Module, names: list[str], params: list[torch.Tensor]) -> None:
        self.model, self.names, self.params = model, names, params

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.model, dict(zip(self.names, self.params, strict=True)), (x,))

    def parameters(self) -> list[torch.Tensor]:
        return self.params


class ModelCopies:
    """Per-thread caches of a model's working copies (one model at a time per thread and kind:
    ``diffopt.vectorize.map_tasks`` runs tasks on threads)."""

    def __init__(self) -> None:
        self._monkeypatched = threading.local()
        self._plain = threading.local()

    def monkeypatched(self, model: nn.Module, track: bool) -> tuple[higher.patch._MonkeyPatchBase, bool]:
        """(``higher.monkeypatch(model, copy_initial_weights=False)``, built once per model; whether
        it has per-step layers (``set_inner_step``)).

        Building the functional model dominates a small model's inner loop, so it is cached
        (outside the module tree, one per thread: ``diffopt.vectorize.map_tasks``) and reset here
        exactly as ``monkeypatch`` initialises it: empty fast-weight history, fast weights that
        are clones of the current parameters, and the train/eval mode of ``model``; buffers are
        shared with ``model`` (not copied). One unroll per model and thread may be in progress
        at a time.
        """
        key = [id(p) for p in model.parameters()]
        per_thread = self._monkeypatched
        cached = getattr(per_thread, "entry", None)
        if cached is None or cached[0]() is not model or cached[1] != key:
            fmodel = higher.monkeypatch(
                model, copy_initial_weights=False, track_higher_grads=track
            )
            share_buffers(model, fmodel)
            has_buffers = any(True for _ in model.buffers())
            per_step = any(hasattr(module, "inner_step") for module in fmodel.modules())
            per_thread.entry = (weakref.ref(model), key, fmodel, has_buffers, per_step)
            return fmodel, per_step
        _, _, fmodel, has_buffers, per_step = cached
        # A fresh monkeypatch starts with no fast-weight history; higher appends to it while
        # tracking and reads its last entry, so a stale history would leak graphs and weights.
        # Same order as monkeypatch: first weights set while tracking, then the mode.
        fmodel._fast_params = None
        fmodel.track_higher_grads = True
        fmodel.train(model.training)
        if has_buffers:  # re-shared: model.to(...) replaces its buffer tensors
            share_buffers(model, fmodel)
        fmodel.update_params([p.clone() for p in model.parameters()])
        fmodel.track_higher_grads = track
        return fmodel, per_step

    def plain(self, model: nn.Module) -> tuple[nn.Module, bool]:
        """(a copy of ``model`` for first-order unrolls, cached per model and thread like
        ``monkeypatched``'s, in ``model``'s mode and sharing its buffers; whether it has per-step
        layers). Its weights are ``model``'s only once ``InnerLoop``'s first-order unroll has reset them."""
        key = [(id(p), p.dtype, p.device, p.shape) for p in model.parameters()]
        per_thread = self._plain
        cached = getattr(per_thread, "entry", None)
        if cached is None or cached[0]() is not model or cached[1] != key:
            learner = deepcopy_model(model)
            per_step = any(hasattr(module, "inner_step") for module in learner.modules())
            cached = per_thread.entry = (weakref.ref(model), key, learner, per_step)
        _, _, learner, per_step = cached
        learner.train(model.training)
        share_buffers(model, learner)  # re-shared: model.to(...) replaces its buffer tensors
        return learner, per_step
