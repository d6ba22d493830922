"""The three ways ``InnerLoop.unroll`` takes its steps, each a generator of the model before
adaptation and after every step:

- ``through_higher``: higher's differentiable optimizer over a monkeypatched copy (every torch
  optimizer and rule; second order, MAML++'s detached inner gradients, or first order);
- ``first_order``: plain autograd on a copy, the rule's update applied in place (first order
  only, no graph kept across steps);
- ``functional``: ``torch.func`` on a list of weights, for ``torch.func.vmap`` (update rules).

``loop`` is the ``InnerLoop`` whose settings they follow (what they read of it: ``LoopSettings``,
so this module needs no import of ``diffopt.inner``); ``UnrollInputs`` what one unroll takes
(``mask`` marks the tensors it adapts).
All three (and ``diffopt.recompute``'s segments) run one loop, ``take_steps``, with their own step:
it numbers the steps, sets the per-step norms' row, draws the inner mini-batches (Reptile's) the
same way (``batch_order``, ``minibatch``) and logs the inner losses.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import higher
import torch
from torch import nn

from diffopt.errors import DiffoptError
from diffopt.fastweights import FunctionalModel, ModelCopies
from diffopt.models.norm import set_inner_step
from diffopt.optim import HIGHER_NOTICES, RuleOptimizer, UpdateRule, make_inner_optimizer
from diffopt.optim.rule import in_transform, init_on, update_on

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def reduce_loss(mean: torch.Tensor, prediction: torch.Tensor, reduction: str) -> torch.Tensor:
    """The inner loss under ``reduction`` from the mean loss of ``prediction`` [N, ..., C]."""
    if reduction == "sum":
        return mean * prediction.shape[0]
    if reduction == "class_sum":
        return mean * prediction.shape[-1]
    return mean


class LoopSettings(Protocol):
    """What the ways of stepping read of the ``InnerLoop`` they follow (``diffopt.inner``)."""

    optimizer: str
    lr: float
    options: dict
    batch_size: int | None
    loss_reduction: str
    proximal: float
    backtrack: bool
    solver: str
    checkpoint: int | str | None
    rule: UpdateRule | None
    carried_state: list[dict] | None

    @property
    def functional_rule(self) -> UpdateRule | None: ...
    @property
    def first_order_rule(self) -> UpdateRule | None: ...
    @property
    def carries_state(self) -> bool: ...
    @property
    def copies(self) -> ModelCopies: ...
    def rule_index(self, mask: list[bool]) -> list[int] | None: ...
    def constant_gradient(self, step: int, steps: int, detach_inner_grads: bool) -> bool: ...
    def query_row(self, steps_taken: int) -> int: ...
    def objective(self, loss_fn: LossFn, prediction: torch.Tensor, y: torch.Tensor,
                  weights: list[torch.Tensor], anchor: list[torch.Tensor],
                  mask: list[bool]) -> tuple[torch.Tensor, torch.Tensor]: ...


@dataclass
class UnrollInputs:
    """What one unroll takes besides the loop's settings (``InnerLoop.unroll``'s arguments)."""

    model: nn.Module
    loss_fn: LossFn
    x: torch.Tensor
    y: torch.Tensor
    steps: int
    mask: list[bool]
    """Per parameter of ``model``, whether the loop adapts it."""
    track: bool = True
    """Second order: the adapted weights stay differentiable with respect to the initial ones."""
    detach_inner_grads: bool = False
    losses: list | None = None
    """Each step's inner loss is appended to it."""
    carry_state: bool = False


def batch_order(x: torch.Tensor, y: torch.Tensor, steps: int, size: int | None) -> torch.Tensor | None:
    """[steps, size] indices of the examples each inner step trains on, or None (all of them).

    As supervised-reptile's ``_mini_batches`` (reptile.py): the examples are shuffled, taken
    ``size`` at a time, and reshuffled whenever they run out (a batch may span two shuffles).
    The shuffles are seeded by a fingerprint of (x, y), so a task's batches are a function of
    its data alone: of (seed, i) for task i of a loader, whatever process or worker built it,
    and the same at every evaluation. Loaders return a task's examples grouped by class
    (torchmeta's ``ClassSplitter``), so consecutive runs would each see one or two classes.
    """
    count = x.shape[0]
    if size is None or size >= count or steps == 0:
        return None
    if torch._C._functorch.is_batchedtensor(x):
        raise DiffoptError("inner mini-batches are shuffled per task, which torch.func.vmap cannot "
                           "do: loop over tasks (vectorize='never')")
    digest = hashlib.blake2b(digest_size=8)
    for tensor in (x, y):
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    generator = torch.Generator().manual_seed(int.from_bytes(digest.digest(), "little") >> 1)
    passes = -(-steps * size // count)  # ceil
    order = torch.cat([torch.randperm(count, generator=generator) for _ in range(passes)])
    return order[: steps * size].view(steps, size).to(x.device)


def minibatch(x: torch.Tensor, y: torch.Tensor, order: torch.Tensor | None, step: int):
    """The examples of inner step ``step`` under ``order`` (``batch_order``): all of them if None."""
    if order is None:
        return x, y
    return x[order[step]], y[order[step]]


def take_steps(inputs: UnrollInputs, steps: Iterable[int], order: torch.Tensor | None,
               step: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor],
               norm_model: nn.Module | None = None) -> Iterator[int]:
    """The inner loop every way of stepping shares: for each step number of ``steps``, the
    inner-step row of ``norm_model``'s per-step norms (MAML++; None: no such norms), the step's
    examples (``minibatch`` of ``inputs.x``, ``inputs.y`` under ``order``), the step itself,
    ``step(number, xb, yb)`` (through higher, first order in place, or functional: gradient or
    Gauss-Newton, backtracking or not), which returns the mean inner loss it started from, logged
    to ``inputs.losses``; yields the step's number once it is taken."""
    for number in steps:
        if norm_model is not None:
            set_inner_step(norm_model, number)
        xb, yb = minibatch(inputs.x, inputs.y, order, number)
        loss = step(number, xb, yb)
        if inputs.losses is not None:
            inputs.losses.append(loss.detach())
        yield number


def keep_adapted(grads, mask: list[bool]) -> list:
    """The gradients of adapted parameters; None (no update) for the others."""
    return [g if adapted else None for g, adapted in zip(grads, mask, strict=True)]


def _detach_all(grads):
    return [None if g is None else g.detach() for g in grads]


ROUNDING = 8
"""``backtrack`` takes a step whose objective is above the current one by at most this many
units of rounding (machine epsilon x |objective|)."""


def backtrack(objective_at, params: list[torch.Tensor], updates: list, before: torch.Tensor,
              scale: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """One step of ``InnerLoop(backtrack=True)`` (a "bold driver"): the weights ``params`` moved
    by ``scale`` x ``updates`` if that lowers the inner objective below ``before`` (its value at
    ``params``; ``objective_at``: weights -> objective; ties within ``ROUNDING`` count as lower),
    else left where they are; the scale
    doubles (up to 1) after a step taken and halves after one refused. (new weights, new scale);
    elementwise, so under vmap each task keeps its own scale."""
    trial = [p if u is None else p + scale * u for p, u in zip(params, updates, strict=True)]
    # not higher, within rounding: near the solution a step's decrease (~ residual^2) is below
    # the objective's precision, and a strict test would refuse every step from there on
    taken = objective_at(trial) <= before + ROUNDING * torch.finfo(before.dtype).eps * before.abs()
    moved = [p if u is None else torch.where(taken, t, p)
             for p, t, u in zip(params, trial, updates, strict=True)]
    return moved, torch.where(taken, torch.clamp(2 * scale, max=1.0), scale / 2)


def gauss_newton_step(loop: LoopSettings, model: nn.Module, names: list[str], loss_fn: LossFn,
                      weights: list[torch.Tensor], anchor: list[torch.Tensor], mask: list[bool],
                      x: torch.Tensor, y: torch.Tensor) -> tuple[list, torch.Tensor, torch.Tensor]:
    """``InnerLoop(solver="gauss_newton")``'s step: lr x d over the adapted tensors w, where
    d = -(G + lambda I)^-1 (grad L(w) + lambda (w - w0)) solves the proximal problem's Gauss-Newton
    model: G = J^T H_o J, J [m, n] the Jacobian of the m = x.shape[0] x outputs predictions in w,
    H_o [m, m] the inner loss's Hessian in the predictions. Exact through an m x m system (push-
    through identity: (lambda I + A J)^-1 = (I - A (lambda I + J A)^-1 J) / lambda with
    A = J^T H_o), so the step stays well scaled however sharp the loss is: the predictions' m
    directions are fitted, the rest of w moves by -grad / lambda. Needs lambda > 0. Pure
    ``torch.func``, vmappable. (per-tensor updates, None where not adapted; the objective, loss
    plus proximal term, at w; the mean loss at w)."""
    lam = loop.proximal
    adapted = [w for w, keep in zip(weights, mask, strict=True) if keep]

    def predictions(chosen: list[torch.Tensor]) -> torch.Tensor:
        given = iter(chosen)
        full = [next(given) if keep else w for w, keep in zip(weights, mask, strict=True)]
        return FunctionalModel(model, names, full)(x)

    prediction, pullback = torch.func.vjp(predictions, adapted)
    shape, count = prediction.shape, prediction.numel()

    def inner_loss(flat: torch.Tensor) -> torch.Tensor:
        return reduce_loss(loss_fn(flat.view(shape), y), flat.view(shape), loop.loss_reduction)

    flat = prediction.reshape(-1)
    basis = torch.eye(count, dtype=flat.dtype, device=flat.device).view(count, *shape)
    (rows,) = torch.func.vmap(pullback)(basis)  # per prediction, its gradient in each tensor
    jacobian = torch.cat([j.reshape(count, -1) for j in rows], 1)
    # reverse over reverse, not torch.func.hessian's forward over reverse: m is small, and forward
    # mode's first use in a process has torch script its jvp rules (a FutureWarning to the user)
    hessian = torch.func.jacrev(torch.func.jacrev(inner_loss))(flat)
    moved = torch.cat([(w - w0).reshape(-1) for w, w0, keep in zip(weights, anchor, mask, strict=True)
                       if keep])
    rhs = -(jacobian.T @ torch.func.grad(inner_loss)(flat) + lam * moved)
    a = jacobian.T @ hessian
    system = lam * torch.eye(count, dtype=flat.dtype, device=flat.device) + jacobian @ a
    direction = (rhs - a @ torch.linalg.solve(system, jacobian @ rhs)) / lam
    updates, start = [], 0
    for w, keep in zip(weights, mask, strict=True):
        if keep:
            updates.append(loop.lr * direction[start:start + w.numel()].view(w.shape))
            start += w.numel()
        else:
            updates.append(None)
    objective, loss = loop.objective(loss_fn, prediction, y, weights, anchor, mask)
    return updates, objective, loss


def differentiable_optimizer(loop: LoopSettings, model: nn.Module, fmodel: higher.patch._MonkeyPatchBase,
                             mask: list[bool], track: bool, carried: list[dict] | None = None):
    """(higher's differentiable optimizer stepping ``fmodel`` as ``loop`` says, the torch optimizer
    it was made from), to be stepped by ``higher_step`` (which says per step which inner gradients
    reach which tensors); ``carried``: a torch optimizer's state per model parameter to start from."""
    if loop.rule is not None:
        template = RuleOptimizer(model.parameters(), loop.rule, loop.rule_index(mask))
    else:
        template = make_inner_optimizer(loop.optimizer, model.parameters(), loop.lr, loop.options)
        for param, saved in zip(model.parameters(), carried or (), strict=bool(carried)):
            template.state[param] = saved  # higher copies it

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=HIGHER_NOTICES)
        return higher.optim.get_diff_optim(
            template, model.parameters(), fmodel=fmodel, track_higher_grads=track), template


def higher_step(diffopt, fmodel: higher.patch._MonkeyPatchBase, objective: torch.Tensor, mask: list[bool],
                constant: bool) -> None:
    """``diffopt.step(objective)`` on the adapted tensors. With ``constant`` inner gradients they
    are computed without a graph and handed to higher through a surrogate whose gradient they are:
    higher differentiates with create_graph, which would keep the step's forward graph alive."""
    if constant:
        params = [p for p in fmodel.parameters() if p.requires_grad]
        grads = torch.autograd.grad(objective, params, allow_unused=True)
        objective = sum(((p * g).sum() for p, g in zip(params, grads, strict=True) if g is not None),
                        objective.detach() * 0)
    diffopt.step(objective, grad_callback=inner_grad_callback(mask, constant))


def inner_grad_callback(mask: list[bool], constant: bool):
    """higher's ``grad_callback``: the adapted tensors' inner gradients, detached if ``constant``."""
    def callback(grads):
        return keep_adapted(_detach_all(grads) if constant else grads, mask)
    return callback


def through_higher(loop: LoopSettings, inputs: UnrollInputs) -> Iterator[higher.patch._MonkeyPatchBase]:
    """higher's differentiable optimizer over a monkeypatched copy of ``model``; the same object is
    yielded each time, its weights updated."""
    model, loss_fn, steps, mask, track = inputs.model, inputs.loss_fn, inputs.steps, inputs.mask, inputs.track
    if loop.backtrack:
        raise DiffoptError("backtracking inner steps run without higher: an update rule with a "
                           "functional form (sgd or a diffopt rule) and no differentiated unroll")
    fmodel, per_step = loop.copies.monkeypatched(model, track)
    carried = loop.carried_state if loop.carries_state else None
    diffopt, template = differentiable_optimizer(loop, model, fmodel, mask, track, carried)
    anchor = list(model.parameters())
    if per_step:
        set_inner_step(fmodel, 0)
    yield fmodel

    def step(number: int, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        objective, loss = loop.objective(loss_fn, fmodel(xb), yb, list(fmodel.parameters()), anchor, mask)
        higher_step(diffopt, fmodel, objective, mask,
                    track and loop.constant_gradient(number, steps, inputs.detach_inner_grads))
        return loss

    order = batch_order(inputs.x, inputs.y, steps, loop.batch_size)
    for number in take_steps(inputs, range(steps), order, step, fmodel if per_step else None):
        if per_step:
            set_inner_step(fmodel, loop.query_row(number + 1))
        yield fmodel
    if inputs.carry_state and loop.carries_state:
        (group,) = diffopt.state  # one parameter group, in model.parameters() order
        loop.carried_state = [{key: value.detach().clone() if torch.is_tensor(value) else value
                               for key, value in group[index].items()}
                              for index in range(len(template.param_groups[0]["params"]))]


def first_order(loop: LoopSettings, inputs: UnrollInputs) -> Iterator[nn.Module]:
    """First order without higher: a copy of ``model`` (``ModelCopies.plain``) whose weights are
    reset to ``model``'s, plain autograd, and ``loop.first_order_rule``'s update applied in place;
    the copy is yielded."""
    model, loss_fn, x, mask = inputs.model, inputs.loss_fn, inputs.x, inputs.mask
    rule = loop.first_order_rule
    learner, per_step = loop.copies.plain(model)
    params = list(learner.parameters())
    with torch.no_grad():
        for mine, theirs in zip(params, model.parameters(), strict=True):
            mine.copy_(theirs)
    if per_step:
        set_inner_step(learner, 0)
    yield learner
    index = loop.rule_index(mask) if rule is loop.rule else None  # twins: per model tensor
    carried = loop.carries_state and loop.carried_state is not None
    state = loop.carried_state if carried else init_on(rule, params, index)
    anchor = [p.detach() for p in model.parameters()]
    names = [name for name, _ in learner.named_parameters()]
    scale = torch.ones((), dtype=x.dtype, device=x.device)  # backtracking: each task's step scale

    def step(number: int, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        nonlocal state, scale
        objective, loss = loop.objective(loss_fn, learner(xb), yb, params, anchor, mask)
        grads = keep_adapted(torch.autograd.grad(objective, params, allow_unused=True), mask)
        with torch.no_grad():
            updates, state = update_on(rule, list(grads), state, params, number, index)
            if loop.backtrack:
                def objective_at(weights):
                    prediction = FunctionalModel(learner, names, weights)(xb)
                    return loop.objective(loss_fn, prediction, yb, weights, anchor, mask)[0]
                moved, scale = backtrack(objective_at, params, updates, objective.detach(), scale)
                for param, new in zip(params, moved, strict=True):
                    param.copy_(new)
            else:
                for param, update in zip(params, updates, strict=True):
                    if update is not None:
                        param.add_(update)
        return loss

    order = batch_order(x, inputs.y, inputs.steps, loop.batch_size)
    for number in take_steps(inputs, range(inputs.steps), order, step, learner if per_step else None):
        if per_step:
            set_inner_step(learner, loop.query_row(number + 1))
        yield learner
    if inputs.carry_state and loop.carries_state and state is not None:
        loop.carried_state = state


def functional(loop: LoopSettings, inputs: UnrollInputs) -> Iterator[FunctionalModel]:
    """``torch.func`` steps on a list of weights (``loop.functional_rule``), each yielded as a
    ``FunctionalModel`` of ``model``; vmappable."""
    model, x, y, steps, mask = inputs.model, inputs.x, inputs.y, inputs.steps, inputs.mask
    rule = loop.functional_rule
    if rule is None:
        raise DiffoptError(f"the inner optimizer {loop.optimizer!r} has no functional form; "
                           "use sgd or a learned rule, or vectorize='never'")
    names = [name for name, _ in model.named_parameters()]
    params = list(model.parameters())
    set_inner_step(model, 0)
    yield FunctionalModel(model, names, params)
    state = init_on(rule, params, loop.rule_index(mask) if rule is loop.rule else None)
    order = batch_order(x, y, steps, loop.batch_size)
    taken = functional_steps(loop, inputs, params, state, range(steps), order)
    for step, (params, _) in enumerate(taken):
        set_inner_step(model, loop.query_row(step + 1))
        yield FunctionalModel(model, names, params)


def functional_steps(loop: LoopSettings, inputs: UnrollInputs, params: list[torch.Tensor], state: Any,
                     steps: range, order: torch.Tensor | None,
                     vmappable: bool | None = None) -> Iterator[tuple[list[torch.Tensor], Any]]:
    """The steps numbered ``steps`` of the ``inputs.steps``-step unroll with
    ``loop.functional_rule``, from the weights ``params`` and the rule's ``state``: yields
    (weights, state) after each. The one
    step loop of the functional unroll (vmappable) and of the checkpointed one's segments
    (``diffopt.recompute``). ``track``: the steps' graph, the inner gradients of
    ``constant_gradient`` steps taken as constants; else the updates are detached.
    ``vmappable``: inner gradients by ``torch.func.grad`` (under ``torch.func.vmap``); False: by
    plain autograd, several times faster per step on a small model; None: by plain autograd where
    a differentiated step runs outside any ``torch.func`` transform (a loop over tasks), else by
    ``torch.func.grad``."""
    model, loss_fn, x, mask, total, track = (inputs.model, inputs.loss_fn, inputs.x, inputs.mask,
                                             inputs.steps, inputs.track)
    rule = loop.functional_rule
    names = [name for name, _ in model.named_parameters()]
    anchor = list(model.parameters())

    def objective(weights: list[torch.Tensor], xb: torch.Tensor, yb: torch.Tensor):
        return loop.objective(loss_fn, FunctionalModel(model, names, weights)(xb), yb, weights,
                              anchor, mask)

    index = loop.rule_index(mask) if rule is loop.rule else None
    scale = torch.ones((), dtype=x.dtype, device=x.device)

    def step(number: int, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        nonlocal params, state, scale
        constant = loop.constant_gradient(number, total, inputs.detach_inner_grads) or not track
        if loop.solver == "gauss_newton":
            updates, before, loss = gauss_newton_step(loop, model, names, loss_fn, _detach_all(params),
                                                      anchor, mask, xb, yb)
        else:
            by_func = vmappable
            if by_func is None:
                by_func = constant or in_transform()
            if by_func:
                grads, (before, loss) = torch.func.grad_and_value(objective, has_aux=True)(
                    _detach_all(params) if constant else params, xb, yb)
            else:
                before, loss = objective(params, xb, yb)
                grads = torch.autograd.grad(before, params, create_graph=not constant, allow_unused=True)
            updates, state = update_on(rule, keep_adapted(grads, mask), state, params, number, index)
        if not track:
            updates = _detach_all(updates)
        if loop.backtrack:
            params, scale = backtrack(lambda w: objective(w, xb, yb)[0], params, updates, before.detach(),
                                      scale)
        else:
            params = [p if u is None else p + u for p, u in zip(params, updates, strict=True)]
        return loss

    for _ in take_steps(inputs, steps, order, step, model):
        yield params, state
