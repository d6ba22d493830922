"""Second-order unrolls in bounded memory (``InnerLoop(checkpoint=k)``): the exact meta-gradient
by recomputation.

A plain second-order unroll keeps every inner step's graph until the meta-backward, so its
memory grows with the steps. Here the steps run in segments of k: a segment is one autograd node
(``_Segment``) that takes its steps without a graph and keeps only its inputs (the weights, the
inner optimizer's state, the support data); the meta-backward rebuilds one segment's graph at a
time from them and backpropagates through it. Memory: T/k checkpoints plus k steps' graph;
time: one extra graph-free pass over the steps. The rebuilt steps are higher's, as in a plain
unroll, so every optimizer and rule higher differentiates is checkpointed the same way; the
graph-free pass of rules with a functional form (sgd, learned rules) applies the rule directly.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch.utils import _pytree as pytree

from diffopt.fastweights import FunctionalModel
from diffopt.models.norm import set_inner_step
from diffopt.optim.rule import init_on
from diffopt.unroll import (
    LoopSettings,
    UnrollInputs,
    batch_order,
    differentiable_optimizer,
    functional_steps,
    higher_step,
    take_steps,
)


def segment_length(checkpoint: int | str, steps: int) -> int:
    """Steps per segment: ``checkpoint``, or for ``'auto'`` ceil(sqrt(steps)) (memory ~ 2 sqrt(T)
    steps' worth); never more than ``steps``."""
    length = math.ceil(math.sqrt(steps)) if checkpoint == "auto" else int(checkpoint)
    return max(1, min(length, steps))


@dataclass
class _Plan:
    """What a segment's steps need besides its tensors: the loop's settings and the task."""

    loop: LoopSettings
    inputs: UnrollInputs
    """The whole unroll's (its ``steps``: ``InnerLoop.constant_gradient`` counts from its end)."""
    order: torch.Tensor | None
    start: int
    count: int
    state_spec: Any = None
    """The pytree structure of the input state, its non-tensor leaves in ``constants``."""
    constants: tuple = ()
    meta: tuple = ()
    """Meta-parameters the steps read directly: the rule's, and the proximal term's anchor."""
    out_spec: Any = None
    out_constants: tuple = ()

    def split(self, tensors):
        """(weights, state tensors, x) of a segment's flat inputs (the meta-parameters follow x)."""
        count = len(self.inputs.mask)
        state = len(tensors) - count - 1 - len(self.meta)
        return (list(tensors[:count]), list(tensors[count:count + state]), tensors[count + state])

    def steps(self, weights: list[torch.Tensor], state: list[torch.Tensor], x: torch.Tensor,
              track: bool, record: bool) -> tuple[list[list[torch.Tensor]], Any]:
        """Take the segment's steps from ``weights`` and ``state`` through higher: (the weights
        after each step, the optimizer's final state as a pytree); ``record``: append the inner
        losses to ``losses``."""
        loop, model, mask, inputs = self.loop, self.inputs.model, self.inputs.mask, self.inputs
        fmodel, per_step = loop.copies.monkeypatched(model, track)
        fmodel.update_params(weights)
        diffopt, _ = differentiable_optimizer(loop, model, fmodel, mask, track)
        anchor = list(model.parameters())
        if self.start > 0:  # the state the previous segment ended with
            saved = pytree.tree_unflatten(_merge(state, self.constants), self.state_spec)
            if loop.rule is not None:
                diffopt._rule_state, diffopt._step = saved, self.start
            else:
                for index, entry in enumerate(saved):
                    diffopt.state[0][index] = dict(entry)

        def step(number: int, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
            objective, loss = loop.objective(inputs.loss_fn, fmodel(xb), yb, list(fmodel.parameters()),
                                             anchor, mask)
            higher_step(diffopt, fmodel, objective, mask,
                        track and loop.constant_gradient(number, inputs.steps, inputs.detach_inner_grads))
            return loss

        segment = replace(inputs, x=x, losses=inputs.losses if record else None)
        numbers = range(self.start, self.start + self.count)
        after = [list(fmodel.parameters())
                 for _ in take_steps(segment, numbers, self.order, step, fmodel if per_step else None)]
        if loop.rule is not None:
            final = diffopt._rule_state
        else:
            final = [dict(diffopt.state[0][index]) for index in range(len(mask))]
        fmodel._fast_params = None  # drop higher's history (and the graph it holds)
        return after, final

    def functional_steps(self, weights: list[torch.Tensor], state: list[torch.Tensor], x: torch.Tensor,
                         create_graph: bool, record: bool) -> tuple[list[list[torch.Tensor]], Any]:
        """``steps`` for rules with a functional form (``functional_rule``: plain sgd, learned
        rules) by ``diffopt.unroll.functional_steps``, without higher's per-step machinery: the
        same operations, the same weights. ``create_graph``: the steps' graph, as
        ``steps(track=True)`` builds it; else none."""
        loop, rule = self.loop, self.loop.functional_rule
        if self.start == 0:
            index = loop.rule_index(self.inputs.mask) if rule is loop.rule else None
            rule_state = init_on(rule, weights, index)
        else:
            rule_state = pytree.tree_unflatten(_merge(state, self.constants), self.state_spec)
        inputs = replace(self.inputs, x=x, track=create_graph, losses=self.inputs.losses if record else None)
        steps = range(self.start, self.start + self.count)
        taken = list(functional_steps(loop, inputs, weights, rule_state, steps, self.order, vmappable=False))
        return [after for after, _ in taken], taken[-1][1]  # a segment takes a step at least


_TENSOR = object()
"""Marks where a tensor was among a pytree's other leaves."""


def _merge(tensors: list, constants: tuple) -> list:
    """The leaves of a pytree from its tensors and its other leaves (``_TENSOR`` marking a tensor)."""
    given = iter(tensors)
    return [next(given) if leaf is _TENSOR else leaf for leaf in constants]


def _flatten_state(state: Any) -> tuple[list[torch.Tensor], tuple, Any]:
    """(tensor leaves, every leaf with ``_TENSOR`` where a tensor was, spec) of an optimizer state."""
    leaves, spec = pytree.tree_flatten(state)
    tensors = [leaf for leaf in leaves if torch.is_tensor(leaf)]
    return tensors, tuple(_TENSOR if torch.is_tensor(leaf) else leaf for leaf in leaves), spec


def _leaf(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` detached, as a leaf autograd can differentiate with respect to."""
    return tensor.detach().requires_grad_(tensor.is_floating_point() or tensor.is_complex())


def _working(leaf: torch.Tensor) -> torch.Tensor:
    """A copy of ``leaf`` on its graph that optimizers may update in place (higher counts some
    steps in tensors, ``state['step'] += 1``), leaving the checkpoint as it was."""
    return leaf.clone() if leaf.requires_grad else leaf.clone().detach()


class _Segment(torch.autograd.Function):
    """``count`` inner steps as one autograd node: (weights, state, x, meta) -> (the weights after
    each step, the final state); the backward rebuilds the steps' graph from the inputs."""

    @staticmethod
    def forward(ctx, plan: _Plan, *tensors: torch.Tensor):
        weights, state, x = plan.split(tensors)
        weights, state = [_leaf(w) for w in weights], [s.detach().clone() for s in state]
        with torch.enable_grad():
            if plan.loop.functional_rule is not None:
                after, final = plan.functional_steps(weights, state, x.detach(), create_graph=False,
                                                     record=True)
            else:
                after, final = plan.steps(weights, state, x.detach(), track=False, record=True)
        final_tensors, plan.out_constants, plan.out_spec = _flatten_state(final)
        ctx.plan = plan
        ctx.save_for_backward(*tensors[:len(tensors) - len(plan.meta)])
        ctx.set_materialize_grads(False)
        return tuple(t.detach() for t in [*(w for ws in after for w in ws), *final_tensors])

    @staticmethod
    def backward(ctx, *grads: torch.Tensor | None):
        plan = ctx.plan
        weights, state, x = plan.split((*ctx.saved_tensors, *plan.meta))
        leaves = [_leaf(w) for w in weights] + [_leaf(s) for s in state]
        x_leaf = _leaf(x) if x.requires_grad else x.detach()
        buffers = [b.detach().clone() for b in plan.inputs.model.buffers()]
        with torch.enable_grad():  # a backward runs without grad mode
            adapted, working = leaves[:len(weights)], [_working(s) for s in leaves[len(weights):]]
            if plan.loop.functional_rule is not None:
                after, final = plan.functional_steps(adapted, working, x_leaf, True, record=False)
            else:
                after, final = plan.steps(adapted, working, x_leaf, track=True, record=False)
        # the graph-free pass already moved the running statistics; as batch norm's own update,
        # this leaves the version counters alone (a batch-norm node saves its running statistics)
        for buffer, saved in zip(plan.inputs.model.buffers(), buffers, strict=True):
            buffer.data.copy_(saved)
        outputs = [*(w for ws in after for w in ws), *_flatten_state(final)[0]]
        pairs = [(out, grad) for out, grad in zip(outputs, grads, strict=True)
                 if grad is not None and out.requires_grad]
        inputs = [*leaves, x_leaf, *plan.meta]  # in the order forward took them
        wanted = [i for i, t in enumerate(inputs) if t.requires_grad]
        found = torch.autograd.grad([out for out, _ in pairs], [inputs[i] for i in wanted],
                                    [grad for _, grad in pairs], allow_unused=True) if pairs else ()
        result: list[torch.Tensor | None] = [None] * len(inputs)
        for i, grad in zip(wanted, found, strict=True):
            result[i] = grad
        return (None, *result)


def checkpointed(loop: LoopSettings, inputs: UnrollInputs) -> Iterator[FunctionalModel]:
    """A second-order unroll in segments of ``segment_length(loop.checkpoint, steps)`` steps (see
    the module's docstring); the model after each step is yielded as a ``FunctionalModel``. A
    shorter segment, if any, comes first; the last one keeps its graph from the start, as a plain
    unroll does (its backward comes first, and would rebuild it at once)."""
    model, x, steps = inputs.model, inputs.x, inputs.steps
    names = [name for name, _ in model.named_parameters()]
    weights = list(model.parameters())
    set_inner_step(model, 0)
    yield FunctionalModel(model, names, weights)
    if steps == 0:
        return
    length = segment_length(loop.checkpoint, steps)
    order = batch_order(x, inputs.y, steps, loop.batch_size)
    meta = tuple(p for p in (loop.rule.parameters() if loop.rule is not None else ()) if p.requires_grad)
    if loop.proximal:
        meta += tuple(p for p in model.parameters() if p.requires_grad)
    state: list[torch.Tensor] = []
    spec, constants = None, ()
    first = steps % length or length
    for start in [0, *range(first, steps, length)]:
        count = first if start == 0 else length
        plan = _Plan(loop, inputs, order, start, count, spec, constants, meta)
        if start + count < steps:
            outputs = _Segment.apply(plan, *weights, *state, x, *meta)
            size = len(weights)
            after = [list(outputs[step * size:(step + 1) * size]) for step in range(count)]
            state, spec, constants = list(outputs[count * size:]), plan.out_spec, plan.out_constants
        elif loop.functional_rule is not None:
            after, _ = plan.functional_steps(weights, [s.clone() for s in state], x, create_graph=True,
                                             record=True)
        else:  # clones: an optimizer may count its steps in place, in a tensor
            after, _ = plan.steps(weights, [s.clone() for s in state], x, track=True, record=True)
        for step, weights in enumerate(after):
            set_inner_step(model, loop.query_row(start + step + 1))
            yield FunctionalModel(model, names, weights)
