"""The inner loop: adapt a model to one task by unrolling a differentiable optimizer with higher."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator
from typing import ClassVar

import higher
import torch
from torch import nn

from diffopt import recompute
from diffopt import unroll as unrolls
from diffopt.errors import DiffoptError, as_typed, unknown_name
from diffopt.fastweights import FunctionalModel, ModelCopies
from diffopt.optim import (
    INNER_OPTIMIZERS,
    SGD,
    UpdateRule,
    build_rule,
    check_inner_options,
    check_rule_name,
    first_order_twin,
    inner_rule_names,
)
from diffopt.options import Option, check_bool, check_float, check_int, check_name
from diffopt.unroll import LossFn, UnrollInputs, reduce_loss

LOSS_REDUCTIONS = ("mean", "sum", "class_sum")
"""How the inner loop reduces a batch's loss (``loss_fn`` gives the mean over examples): ``mean``;
``sum`` over examples (supervised-reptile: TF minimises the per-example vector, i.e. its sum);
``class_sum``, the mean times the number of classes (outputs), i.e. the sum over examples over
the shots (cbfinn/maml: cross-entropy / update_batch_size, summed by tf.gradients)."""


INNER_SOLVERS = ("gradient", "gauss_newton")
"""How an inner step is computed (``InnerLoop(solver=...)``)."""

INNER_PARAMS = ("all", "weights", "head", "body")
"""Which parameters the inner loop adapts (the others keep their meta-learned values through it):
``all``; ``weights``, those of convolution and linear layers (cbfinn/maml: not batch norm's);
``head``, the last linear layer's (ANIL); ``body``, all but those (BOIL); or name patterns
(``check_inner_params``)."""


def check_inner_params(which: object) -> None:
    """DiffoptError unless ``which`` is one of ``INNER_PARAMS`` or comma-separated glob patterns
    of parameter names (``fnmatch``: ``layers.3.*,head.weight``)."""
    if not isinstance(which, str) or not which.strip(" ,"):
        raise unknown_name("set of inner parameters", which, INNER_PARAMS)


def adapted_mask(model: nn.Module, which: str) -> list[bool]:
    """Per parameter of ``model``, in ``parameters()`` order, whether ``which`` (``INNER_PARAMS``,
    or name patterns, which must match some parameter) adapts it."""
    check_inner_params(which)
    if which == "all":
        return [True for _ in model.parameters()]
    if which not in INNER_PARAMS:
        names = [name for name, _ in model.named_parameters()]
        patterns = [pattern.strip() for pattern in which.split(",") if pattern.strip()]
        mask = [any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns) for name in names]
        if not any(mask):
            raise DiffoptError(
                f"--inner_params {which!r} is neither {', '.join(INNER_PARAMS)} nor name patterns "
                f"matching a parameter of the model; its parameters: {', '.join(names)}")
        return mask
    owners = {f"{prefix}.{name}" if prefix else name: module for prefix, module in model.named_modules()
              for name, _ in module.named_parameters(recurse=False)}
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    head = linears[-1] if linears else None
    keep = {"weights": lambda m: isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)),
            "head": lambda m: m is head,
            "body": lambda m: m is not head}[which]
    return [keep(owners[name]) for name, _ in model.named_parameters()]


INNER_STATES = ("reset", "persist")
"""What a stateful inner optimizer (Adam's moments and step count, momentum) starts a task from:
``reset``, a fresh state; ``persist``, the state the previous meta-training task ended with
(supervised-reptile: its Adam state is not among the variables reset after a task)."""
QUERY_NORM_ROWS = ("last_step", "steps_taken")
"""Which row of a per-step layer (``PerStepBatchNorm``) the model after k >= 1 inner steps reads
for data other than the next step's support forward (queries, evaluation): ``last_step`` row
k - 1, the row of the support forward of step k, as MAML++ (its query forward after update k
passes the step's index, few_shot_learning_system.py:217-243); ``steps_taken`` row k, the one the
next step would use. Support forwards always read row k (the steps taken)."""


def _is_step_count(value: object, steps: int) -> bool:
    return not isinstance(value, bool) and isinstance(value, int) and 1 <= value <= steps


class InnerLoop(nn.Module):
    """``steps`` steps of an inner update rule with (initial) step size ``lr``.

    Each step uses all the adaptation data, or with ``batch_size`` a mini-batch of it, drawn
    without replacement from a shuffle of the task's examples (``batch_order``: Reptile's
    inner mini-batches).

    ``optimizer``: a torch optimizer name (sgd, momentum, adam, ...; ``options``: its
    hyper-parameters, e.g. ``{"betas": (0.5, 0.9)}``, also a rule factory's keywords), a learned rule's name
    (``diffopt.optim.LEARNED_RULES``, or ``module:attribute``; ``model`` is then needed to size
    it), or an
    ``UpdateRule`` instance. A learned rule is a submodule (``self.rule``), so its parameters
    are meta-parameters: the outer optimizer updates them and the checkpoint saves them.

    ``query_norm_row`` (``QUERY_NORM_ROWS``): the per-step norm row the adapted model reads
    outside the inner steps. ``loss_reduction`` (``LOSS_REDUCTIONS``): the inner loss the steps
    descend (the losses reported are the means). ``proximal`` (lambda > 0): the steps descend
    that loss plus lambda/2 ||w - w0||^2 over the adapted tensors, w0 the weights the unroll
    started from (iMAML's proximal term; differentiable with respect to w0). ``state``
    (``INNER_STATES``): with ``persist``, an unroll called with ``carry_state`` (a meta-training
    task) leaves its torch optimizer's final state in ``carried_state``, which every later unroll
    starts from; other unrolls (evaluation tasks) start from it and leave it as it was, as
    supervised-reptile saves and restores its full state around an evaluation task.
    ``solver`` (``INNER_SOLVERS``): ``gradient``, the optimizer's steps; ``gauss_newton``, lr x
    the proximal problem's Gauss-Newton step (``unroll.gauss_newton_step``: sgd, a proximal term,
    no differentiated unroll; iMAML's solver). ``backtrack``: a step is taken only if it lowers
    that objective on its examples; a refused step halves the next one, a step taken doubles it
    back up to the full step (``unroll.backtrack``; loops that are not differentiated, on rules
    with a functional form: iMAML's solver). ``checkpoint`` (k, ``'auto'`` for ceil(sqrt(steps)),
    or None): second-order unrolls keep the weights and the optimizer's state every k steps and
    rebuild one segment's graph at a time in the meta-backward (``diffopt.recompute``): the same
    meta-gradient in memory that grows with steps / k + k instead of steps. ``backprop_steps``
    (k, or None: all): truncated backpropagation, second-order unrolls differentiate the last k
    steps alone, the inner gradients of the steps before them taken as constants (the weights
    entering step T - k differ from the initial ones by a constant: first order up to there).

    Example::

        inner = InnerLoop("adam", lr=0.01, steps=100, checkpoint="auto")
        for fmodel in inner.unroll(model, F.mse_loss, x, y):   # the model after each step
            ...
    """

    OPTIONS: ClassVar[dict[str, Option]] = {
        "query_norm_row": Option(
            str | None, "last_step", f"with --norm per_step_batch, the row the model after k inner steps "
            f"reads for its queries: {', '.join(QUERY_NORM_ROWS)} (last_step: row k - 1, that of step k's "
            "support forward, as MAML++; steps_taken: row k); default: last_step",
            before="steps_taken"),
        "inner_optimizer": Option(
            str | None, "sgd", f"inner-loop update rule: {', '.join(inner_rule_names())}, or "
            "module:attribute (an UpdateRule subclass or a factory (params, lr, steps) -> UpdateRule)",
            argument="optimizer"),
        "inner_lr": Option(float | None, 0.01, "inner-loop step size", argument="lr"),
        "inner_options": Option(
            dict | None, None, "hyper-parameters of the inner optimizer besides its step size, e.g. "
            "'{betas: [0.5, 0.9], eps: 1e-6}' (adam), '{momentum: 0.5}' (momentum), '{weight_decay: "
            "0.1}' (adamw); `diffopt train --inner_optimizer NAME --inner_options '{x: 1}'` lists a "
            "name's choices", argument="options"),
        "inner_steps": Option(int | None, 1, "inner-loop steps during meta-training", argument="steps"),
        "inner_batch_size": Option(
            int | None, None, "examples per inner step, cycling through the task's data (Reptile); "
            "default: all", argument="batch_size"),
        "inner_loss_reduction": Option(
            str | None, "mean", f"the loss the inner steps descend: {', '.join(LOSS_REDUCTIONS)} "
            "(class_sum: mean x classes, cbfinn/maml's; sum over examples: supervised-reptile's); "
            "default: the algorithm's original code on images, else mean",
            argument="loss_reduction", before="mean"),
        "inner_params": Option(
            str | None, "all", f"the parameters the inner loop adapts: {', '.join(INNER_PARAMS)} "
            "(weights: convolution and linear layers, not normalisation; head: the last linear layer, "
            "ANIL; body: the rest, BOIL), or comma-separated patterns of parameter names, e.g. "
            "'layers.3.*,head.*' (learned rules then carry parameters for those tensors alone); "
            "default: weights for maml and fomaml on images (cbfinn/maml), else all",
            argument="params", before="all"),
        "inner_proximal": Option(
            float | None, 0.0, "weight lambda of the proximal term lambda/2 ||w - phi||^2 the inner "
            "steps add to their loss (phi: the meta-learned initial weights); imaml needs it > 0 "
            "(default 1; Omniglot 2, imaml_dev's README; sinusoid 100, with Gauss-Newton steps); "
            "default for the others: 0 (none)",
            argument="proximal", before=0.0),
        "inner_backtrack": Option(
            bool | None, False, "imaml: take an inner step only if it lowers the proximal objective, "
            "halving the next step after a refused one and doubling it (up to --inner_lr) after a "
            "step taken, so the steps stay convergent as meta-training sharpens the loss; default "
            "False", argument="backtrack", before=False),
        "inner_solver": Option(
            str | None, "gradient", "imaml: how an inner step is computed: gradient (the "
            "--inner_optimizer's step) or gauss_newton (--inner_lr x the proximal problem's "
            "Gauss-Newton step, exact through a system of one row per prediction: well scaled however "
            "sharp the loss); default gradient", argument="solver", before="gradient"),
        "inner_checkpoint": Option(
            int | str | None, None, "second-order unrolls in bounded memory: keep the weights and the "
            "inner optimizer's state every K inner steps and rebuild one segment's graph at a time in "
            "the meta-backward (the same meta-gradient; memory ~ steps/K + K steps' graph instead of "
            "steps'; 1.1-1.2x the time on conv-4, about 1.45x on a small MLP); auto: K = "
            "ceil(sqrt(inner steps)); maml, anil and boil; default: off",
            argument="checkpoint", before=None),
        "inner_backprop_steps": Option(
            int | None, None, "truncated backpropagation: differentiate only the last K inner steps, "
            "taking the inner gradients of the steps before them as constants (an approximation "
            "between first-order and exact MAML, memory ~ K steps' graph); maml, anil and boil; "
            "default: all", argument="backprop_steps", before=None),
        "inner_state": Option(
            str | None, "reset", "what a stateful inner optimizer (adam's moments, momentum) starts "
            "each meta-training task from: reset (a fresh state) or persist (the previous task's "
            "final state, as supervised-reptile; evaluation tasks start from it and leave it "
            "unchanged); default: persist for Reptile on images, else reset",
            argument="state", before="reset"),
    }
    """The ``diffopt train`` options of the inner loop (``diffopt.options.Option``), each feeding
    the constructor keyword ``argument``: adding one here and to ``__init__`` is all it takes."""

    @staticmethod
    def check_arguments(optimizer: str | UpdateRule, lr: float, steps: int, batch_size: int | None,
                        state: str, loss_reduction: str, params: str, query_norm_row: str, proximal: float,
                        options: dict | None, backtrack: bool, solver: str, checkpoint: int | str | None,
                        backprop_steps: int | None) -> None:
        """DiffoptError naming the first bad constructor argument (as its ``--inner_*`` option):
        the checks of ``__init__``, which a config's validation runs before building anything."""
        if not isinstance(optimizer, UpdateRule):
            check_rule_name(optimizer)  # an unknown name says so first
            check_inner_options(optimizer, options or {})
        check_name("inner optimizer state", state, INNER_STATES)
        check_name("inner loss reduction", loss_reduction, LOSS_REDUCTIONS)
        check_inner_params(params)
        check_name("per-step norm row of queries", query_norm_row, QUERY_NORM_ROWS)
        check_int("inner_steps", steps, 0)
        if batch_size is not None:
            check_int("inner_batch_size", batch_size, 1)
        check_float("inner_lr", lr, positive=True)
        check_float("inner_proximal", proximal, positive=False)
        if checkpoint is not None and checkpoint != "auto" and not _is_step_count(checkpoint, steps):
            raise DiffoptError(f"--inner_checkpoint is auto or a whole number of inner steps per segment "
                               f"from 1 to --inner_steps ({steps}); got {as_typed(checkpoint)}")
        if backprop_steps is not None and not _is_step_count(backprop_steps, steps):
            raise DiffoptError(f"--inner_backprop_steps is the number of last inner steps differentiated, "
                               f"from 1 to --inner_steps ({steps}); got {as_typed(backprop_steps)}")
        check_name("inner solver", solver, INNER_SOLVERS)
        check_bool("inner_backtrack", backtrack)
        if solver != "gradient" and (optimizer != "sgd" or options):
            raise DiffoptError(f"--inner_solver {solver} computes its own steps: drop --inner_optimizer "
                               "and --inner_options")
        if solver == "gauss_newton" and not proximal > 0:
            raise DiffoptError("the gauss_newton inner solver needs a proximal term: proximal > 0 "
                               "(--inner_proximal)")

    def __init__(self, optimizer: str | UpdateRule = "sgd", lr: float = 0.01, steps: int = 1,
                 model: nn.Module | None = None, batch_size: int | None = None,
                 state: str = "reset", loss_reduction: str = "mean", params: str = "all",
                 query_norm_row: str = "last_step", proximal: float = 0.0,
                 options: dict | None = None, backtrack: bool = False,
                 solver: str = "gradient", checkpoint: int | str | None = None,
                 backprop_steps: int | None = None) -> None:
        super().__init__()
        self.check_arguments(optimizer, lr, steps, batch_size, state, loss_reduction, params, query_norm_row,
                             proximal, options, backtrack, solver, checkpoint, backprop_steps)
        self.checkpoint, self.backprop_steps = checkpoint, backprop_steps
        self.query_norm_row, self.params = query_norm_row, params
        self.proximal, self.backtrack, self.solver = float(proximal), backtrack, solver
        self.options = dict(options or {})
        self.lr, self.steps, self.batch_size, self.state = lr, steps, batch_size, state
        self.loss_reduction = loss_reduction
        self.carried_state: list[dict] | None = None
        """Per model parameter, the persisting torch optimizer's state (detached), or None."""
        self.rule_by_name = not isinstance(optimizer, UpdateRule)
        if not self.rule_by_name:
            self.optimizer, self.rule = type(optimizer).__name__, optimizer
            return
        self.optimizer = optimizer
        if model is None and optimizer not in INNER_OPTIMIZERS:
            raise DiffoptError(f"the learned rule {optimizer!r} is sized from the model: "
                               f"InnerLoop({optimizer!r}, lr, steps, model=model)")
        self.rule = self._build_rule(model)
        if backtrack and self.first_order_rule is None:
            raise DiffoptError(f"backtracking inner steps run without higher, which {optimizer!r} "
                               "needs: use sgd, adam or a diffopt rule")

    def _build_rule(self, model: nn.Module | None) -> UpdateRule | None:
        """The named rule, sized to the tensors of ``model`` the inner loop adapts."""
        adapted = [] if model is None else [p.detach() for p, keep in zip(
            model.parameters(), adapted_mask(model, self.params), strict=True) if keep]
        return build_rule(self.optimizer, adapted, self.lr, self.steps, self.options)

    def adapt_only(self, params: str, model: nn.Module) -> None:
        """Adapt ``params`` (``INNER_PARAMS`` or patterns) of ``model`` from now on; a rule built
        from its name is rebuilt for those tensors (ANIL, BOIL: the algorithm fixes them)."""
        check_inner_params(params)
        self.params = params
        if self.rule_by_name and self.rule is not None:
            self.rule = self._build_rule(model)

    @staticmethod
    def rule_index(mask: list[bool]) -> list[int] | None:
        """Positions of the adapted tensors, which a rule sees alone (None: all of them)."""
        return None if all(mask) else [i for i, keep in enumerate(mask) if keep]

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
        functional: bool = False,
        losses: list[torch.Tensor] | None = None,
        carry_state: bool = False,
    ) -> Iterator[higher.patch._MonkeyPatchBase | FunctionalModel]:
        """Yield the functional model before adaptation and after each of ``steps`` steps.

        x: [K, *x], y: [K, *y], the task's adaptation data. The functional model's parameters
        start as clones of ``model``'s parameters that stay on its graph, so with ``track_higher_grads`` the
        adapted weights stay differentiable with respect to ``model.parameters()``
        (second order); without it each step's result is detached (first order).
        ``detach_inner_grads`` keeps the updates on the graph but treats the inner gradients as
        constants (MAML++'s first-order mode: learned step sizes still receive gradients).
        The same functional model object is yielded each time, its weights updated in place,
        with per-step layers (``diffopt.models.norm``) told how many steps it has taken. Buffers
        are shared with ``model``: running statistics accumulate there.

        ``losses``: each step's inner loss (detached, before the step's update) is appended to it.
        ``carry_state``: under ``state='persist'``, keep the optimizer's final state for the next
        unroll (once the last step has been taken).

        ``functional``: run the same steps with ``torch.func`` instead of higher (for
        ``torch.func.vmap``; update rules only, see ``functional_rule``). Without
        ``track_higher_grads`` the weights then move by detached updates, so the adapted
        weights' derivative with respect to the initial ones is the identity (first order).

        First order (no ``track_higher_grads``, no ``detach_inner_grads``), the loop takes the
        same steps without higher where the rule has a functional form (``first_order_rule``):
        a copy of ``model`` whose weights are reset to ``model``'s, plain autograd, and the
        rule's update applied in place. The three paths: ``diffopt.unroll``.
        """
        steps = self.steps if steps is None else steps
        mask = adapted_mask(model, self.params)
        inputs = UnrollInputs(model, loss_fn, x, y, steps, mask, track_higher_grads, detach_inner_grads,
                              losses, carry_state)
        if self.solver == "gauss_newton":
            if track_higher_grads or detach_inner_grads:
                raise DiffoptError("the gauss_newton inner solver's steps are not differentiated: "
                                   "use it with imaml")
            functional = True  # its step is a torch.func function, vmapped or not
        if self.checkpoint is not None and track_higher_grads:
            if functional:
                raise DiffoptError("checkpointed unrolls loop over tasks (their segments are autograd "
                                   "nodes that torch.func.vmap cannot batch): vectorize='never'")
            return recompute.checkpointed(self, inputs)
        if functional:
            return unrolls.functional(self, inputs)
        if not track_higher_grads and not detach_inner_grads and self.first_order_rule is not None:
            return unrolls.first_order(self, inputs)
        return unrolls.through_higher(self, inputs)

    def constant_gradient(self, step: int, steps: int, detach_inner_grads: bool) -> bool:
        """Whether step ``step`` (0-based) of a ``steps``-step unroll takes its inner gradient as a
        constant: everywhere with ``detach_inner_grads``, before the last ``backprop_steps``."""
        return detach_inner_grads or (self.backprop_steps is not None
                                      and step < steps - self.backprop_steps)

    def objective(self, loss_fn: LossFn, prediction: torch.Tensor, y: torch.Tensor,
                  weights: list[torch.Tensor], anchor: list[torch.Tensor],
                  mask: list[bool]) -> tuple[torch.Tensor, torch.Tensor]:
        """(the loss an inner step descends: ``loss_reduction`` of ``loss_fn(prediction, y)``
        plus the proximal term of ``weights`` around ``anchor``; the mean loss)."""
        loss = loss_fn(prediction, y)
        return (reduce_loss(loss, prediction, self.loss_reduction)
                + self.proximal_term(weights, anchor, mask)), loss

    def proximal_term(self, weights: list[torch.Tensor], anchor: list[torch.Tensor],
                      mask: list[bool]) -> torch.Tensor | float:
        """lambda/2 sum over adapted tensors of ||w - w0||^2 (0 without ``proximal``)."""
        if not self.proximal:
            return 0.0
        squares = [((w - w0) ** 2).sum() for w, w0, adapted in zip(weights, anchor, mask, strict=True)
                   if adapted]
        return 0.5 * self.proximal * torch.stack(squares).sum()

    def query_row(self, steps_taken: int) -> int:
        """The per-step norm row the model after ``steps_taken`` steps reads for queries."""
        return max(steps_taken - 1, 0) if self.query_norm_row == "last_step" else steps_taken

    @property
    def functional_rule(self) -> UpdateRule | None:
        """The rule the functional unroll applies: the learned rule, SGD for plain 'sgd' (no
        momentum or weight decay in ``options``), else None."""
        if self.rule is not None:
            return self.rule
        return self.first_order_rule if isinstance(self.first_order_rule, SGD) else None

    @property
    def carries_state(self) -> bool:
        """Whether unrolls start from (and meta-training ones keep) ``carried_state``: a torch
        optimizer under ``state='persist'`` (a learned rule starts every task afresh)."""
        return self.state == "persist" and self.rule is None

    @property
    def first_order_rule(self) -> UpdateRule | None:
        """The rule first-order unrolls apply without higher: the learned rule, or the torch
        optimizer's functional twin (``diffopt.optim.first_order_twin``: sgd, adam), else None."""
        if self.rule is not None:
            return self.rule
        key = (self.optimizer, self.lr, repr(sorted(self.options.items())))
        twin = self.__dict__.get("_first_order_twin")
        if twin is None or twin[0] != key:
            twin = self.__dict__["_first_order_twin"] = (
                key, first_order_twin(self.optimizer, self.lr, self.options))
        return twin[1]

    @property
    def copies(self) -> ModelCopies:
        """This loop's cached working copies of models (not module state: dropped by copy and
        pickle, rebuilt on first use)."""
        copies = self.__dict__.get("_copies")
        if copies is None:
            copies = self.__dict__["_copies"] = ModelCopies()
        return copies

    def __getstate__(self) -> dict:
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__
        return {k: v for k, v in state.items() if k != "_copies"}

    def adapt(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        x: torch.Tensor,
        y: torch.Tensor,
        steps: int | None = None,
        *,
        track_higher_grads: bool = True,
        functional: bool = False,
        losses: list[torch.Tensor] | None = None,
        carry_state: bool = False,
    ) -> higher.patch._MonkeyPatchBase | FunctionalModel:
        """The functional model after ``steps`` steps (see ``unroll``)."""
        *_, adapted = self.unroll(model, loss_fn, x, y, steps, track_higher_grads=track_higher_grads,
                                  functional=functional, losses=losses, carry_state=carry_state)
        return adapted

    def extra_repr(self) -> str:
        batch = "" if self.batch_size is None else f", batch_size={self.batch_size}"
        state = "" if self.state == "reset" else f", state={self.state!r}"
        reduction = "" if self.loss_reduction == "mean" else f", loss_reduction={self.loss_reduction!r}"
        adapted = "" if self.params == "all" else f", params={self.params!r}"
        proximal = f", proximal={self.proximal}" if self.proximal else ""
        proximal += "" if self.checkpoint is None else f", checkpoint={self.checkpoint!r}"
        proximal += "" if self.backprop_steps is None else f", backprop_steps={self.backprop_steps}"
        options = f", options={self.options}" if self.options else ""
        return (f"optimizer={self.optimizer!r}, lr={self.lr}, steps={self.steps}"
                f"{options}{batch}{state}{reduction}{adapted}{proximal}")
