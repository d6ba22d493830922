"""The interface every meta-learning algorithm implements."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, ClassVar

import higher
import torch
from torch import nn

from diffopt.data.episode import Episode, Task
from diffopt.errors import DiffoptError
from diffopt.fastweights import FunctionalModel
from diffopt.inner import InnerLoop, LossFn
from diffopt.options import Option
from diffopt.vectorize import (
    loops_functionally,
    map_tasks,
    resolve_task_threads,
    resolve_vectorize,
    vmap_obstacle,
)

ALGORITHMS: dict[str, type[MetaAlgorithm]] = {}
"""The registered algorithms by name (filled by ``diffopt.algorithms``)."""

TaskGradient = tuple[list[torch.Tensor | None], torch.Tensor]
"""One task's contribution: a gradient per meta-parameter (None: none) and its loss (a scalar)."""


class MetaAlgorithm(nn.Module):
    """A model plus the inner loop that adapts it; ``parameters()`` are the meta-parameters.

    ``meta_gradient(episode)`` adds the algorithm's meta-gradient for one meta-batch to the
    ``.grad`` of every meta-parameter; the training loop then takes the outer step. Algorithms
    whose meta-gradient is the exact gradient of ``meta_loss`` set ``exact_meta_gradient``, and
    ``diffopt.gradcheck`` verifies it against finite differences.

    Args:
        model: the network whose initial weights are meta-learned (``nn.Module``; its
            parameters and buffers are the algorithm's ``model.*``).
        inner: the ``InnerLoop`` that adapts it to a task (update rule, step size, steps); a
            learned rule's parameters are meta-parameters too (``inner.rule.*``).
        loss_fn: (prediction [N, ...], target [N, ...]) -> scalar loss, used in the inner loop
            and for the query loss (e.g. ``torch.nn.functional.cross_entropy``).
        vectorize: 'auto', 'always' or 'never': whether a meta-batch runs as one
            ``torch.func.vmap`` over tasks (``self.vectorized``; see ``diffopt.vectorize``:
            only models and rules proven right under vmap) or as a loop over tasks.
        task_threads: tasks the loop runs at once, on threads (0: as many as torch's threads,
            see ``diffopt.vectorize.resolve_task_threads``); the result does not depend on it.
    """

    name: ClassVar[str]
    exact_meta_gradient: ClassVar[bool] = False
    learns_update_rule: ClassVar[bool] = False
    """Whether ``meta_gradient`` reaches a learned inner rule's parameters."""
    gradient_at_optimum: ClassVar[bool] = False
    """Whether ``meta_gradient`` is the gradient of ``meta_loss`` once the inner loop has converged
    (iMAML's implicit gradient): ``diffopt.gradcheck`` checks it with a converged inner loop."""
    protocol_of: ClassVar[str | None] = None
    """The registered algorithm whose per-dataset defaults this one takes (ANIL, BOIL: maml's);
    None: its own name's."""
    adapts: ClassVar[str | None] = None
    """The ``InnerLoop`` params setting the algorithm fixes (ANIL: 'head'), or None."""
    differentiates_unroll: ClassVar[bool] = False
    """Whether ``meta_gradient`` backpropagates through the inner steps (MAML and its partial
    variants), the only unrolls a checkpointed inner loop (``InnerLoop(checkpoint=k)``) changes."""
    carries_inner_state: ClassVar[bool] = False
    """Whether meta-training may carry the inner optimizer's state from task to task
    (``InnerLoop(state='persist')``): first-order algorithms, whose meta-gradient is not the
    gradient of a function of the meta-parameters that a carried state would change."""
    batches_support: ClassVar[bool] = False
    """Whether, where the meta-batch cannot be vmapped whole, the algorithm may still run every
    task's inner loop at once under vmap and each query side alone (``support_vmapped``; MAML and
    BOIL; not ANIL, whose query loss adapts the head on features computed once)."""
    solves_inner_problem: ClassVar[bool] = False
    """Whether the inner loop only has to reach its problem's solution and is never differentiated
    (iMAML): it may then take Gauss-Newton or backtracking steps (``InnerLoop(solver=...,
    backtrack=...)``)."""
    OPTIONS: ClassVar[dict[str, Option]] = {}
    """The algorithm's own ``diffopt train`` options (``diffopt.options.Option``, each a constructor
    keyword); a class's own, not inherited: every other algorithm refuses them."""
    inner_defaults: ClassVar[dict[str, Any]] = {}
    """Defaults the algorithm gives other components' options (iMAML: a proximal term), under a
    dataset's protocol."""

    def __init__(self, model: nn.Module, inner: InnerLoop, loss_fn: LossFn,
                 vectorize: str = "auto", task_threads: int = 1) -> None:
        super().__init__()
        if inner.learned and not self.learns_update_rule:
            raise DiffoptError(
                f"{self.name} does not meta-learn the parameters of the inner rule "
                f"{inner.optimizer!r}; use maml, or a fixed rule (sgd, momentum, adam)"
            )
        self.check_inner(inner, task_threads)
        self.model, self.inner, self.loss_fn = model, inner, loss_fn
        support = (self.batches_support and vectorize != "never"
                   and loops_functionally(inner, task_threads, model)
                   and vmap_obstacle(model, inner, support_side=True) is None)
        self.vectorized = resolve_vectorize(vectorize, model, inner, support_vmapped=support)
        self.support_vmapped = support and not self.vectorized
        """Whether the loop over tasks runs every task's inner loop at once under vmap and each
        query side alone (``diffopt.vectorize.over_support``): ``batches_support`` algorithms on
        models vmap is proven right for on the support side only (affine batch norm)."""
        resolve_task_threads(task_threads, model)  # a bad request fails here, not mid-training
        self.task_threads = task_threads

    @classmethod
    def check_inner(cls, inner: Any, task_threads: int) -> None:
        """DiffoptError unless the algorithm takes an inner loop set up as ``inner`` (an
        ``InnerLoop``, or anything with its ``state``, ``checkpoint``, ``backprop_steps``,
        ``solver``, ``backtrack`` and ``proximal``) with ``task_threads``: checked when built, and
        by a config's validation before anything is built."""
        if inner.state == "persist" and not cls.carries_inner_state:
            raise DiffoptError(f"--inner_state persist is for algorithms that carry the inner state "
                               f"from task to task ({_having('carries_inner_state')}); use --inner_state "
                               f"reset with {cls.name}")
        if inner.state == "persist" and task_threads != 1:
            raise DiffoptError("--inner_state persist runs tasks in order, one at a time: use "
                               "--task_threads 1")
        for given, flag, what in [(inner.checkpoint, "--inner_checkpoint", "checkpoint"),
                                  (inner.backprop_steps, "--inner_backprop_steps", "truncate")]:
            if given is not None and not cls.differentiates_unroll:
                raise DiffoptError(f"{cls.name} does not backpropagate through the inner steps, so "
                                   f"there is nothing to {what}: drop {flag} (it is for "
                                   f"{_having('differentiates_unroll')})")
        for given, flag in [(inner.solver != "gradient", f"--inner_solver {inner.solver}"),
                            (inner.backtrack is True, "--inner_backtrack")]:
            if given and not cls.solves_inner_problem:
                raise DiffoptError(f"{flag} is for {_having('solves_inner_problem')}, whose inner steps "
                                   f"are not differentiated; drop it for --algorithm {cls.name}")

    @classmethod
    def own_options(cls) -> dict[str, Option]:
        """The options this class declares itself (``OPTIONS`` in its body, not inherited)."""
        return dict(cls.__dict__.get("OPTIONS", {}))

    @classmethod
    def check_options(cls, **options: Any) -> None:
        """DiffoptError unless ``options`` (the ``own_options``' constructor keywords) are valid:
        checked when built, and by a config's validation before anything is built."""

    def on_epoch(self, epoch: int) -> None:
        """Called before every meta-iteration with its epoch (0-based; ``diffopt.train``): the
        place for schedules over training (MAML's MAML++ recipe)."""

    def iteration_record(self) -> dict[str, Any]:
        """What the metrics log records about the algorithm's state at a meta-iteration besides
        the metrics ``meta_gradient`` returns (MAML: whether it ran first order)."""
        return {}

    def unroll(
        self, x: torch.Tensor, y: torch.Tensor, steps: int | None = None, *,
        track_higher_grads: bool = False, detach_inner_grads: bool = False,
    ) -> Iterator[higher.patch._MonkeyPatchBase | FunctionalModel]:
        """The model before and after each inner step on (x [K, *x], y [K, *y])."""
        return self.inner.unroll(
            self.model, self.loss_fn, x, y, steps, track_higher_grads=track_higher_grads,
            detach_inner_grads=detach_inner_grads, functional=self.vectorized,
        )

    def adapt(
        self, x: torch.Tensor, y: torch.Tensor, steps: int | None = None, *,
        track_higher_grads: bool = False, losses: list[torch.Tensor] | None = None,
        carry_state: bool = False,
    ) -> higher.patch._MonkeyPatchBase | FunctionalModel:
        """The model adapted to (x, y) by the inner loop (``losses``, ``carry_state``: see
        ``InnerLoop.unroll``; meta-training tasks carry the state, evaluation tasks do not)."""
        return self.inner.adapt(self.model, self.loss_fn, x, y, steps, track_higher_grads=track_higher_grads,
                                functional=self.vectorized, losses=losses, carry_state=carry_state)

    def meta_gradient(self, episode: Episode) -> dict[str, float]:
        """Accumulate the meta-gradient of ``episode`` into ``.grad``; return logged metrics."""
        raise NotImplementedError

    def meta_batch_path(self, episode: Episode) -> str:
        """How ``meta_gradient`` runs ``episode``'s tasks, in words (``diffopt gradcheck`` says it)."""
        return "vmap over tasks" if self.vectorized else "loop over tasks"

    def meta_loss(self, episode: Episode, *, track_higher_grads: bool = True) -> torch.Tensor:
        """The scalar whose gradient ``meta_gradient`` computes (exact algorithms only)."""
        raise NotImplementedError(f"{self.name} has no meta-loss whose gradient it computes")

    def accumulate_tasks(self, task_gradient: Callable[[Task], TaskGradient], episode: Episode,
                         params: list[torch.Tensor]) -> float:
        """Add ``task_gradient(task)``'s gradients, for every task of ``episode``, into the
        ``.grad`` of ``params`` in task order (so the sum does not depend on the threads that
        computed them: ``task_threads``); return the summed loss."""
        threads = resolve_task_threads(self.task_threads, self.model)
        total = 0.0
        for grads, loss in map_tasks(task_gradient, episode, threads):
            accumulate_grad(params, grads)
            total += loss.item()
        return total


def _having(flag: str) -> str:
    """The registered algorithms whose class variable ``flag`` is true, for messages."""
    return ", ".join(name for name, cls in ALGORITHMS.items() if getattr(cls, flag)) or "none"


def accumulate_grad(params: Iterable[torch.Tensor], grads: Iterable[torch.Tensor | None]) -> None:
    """``p.grad += g`` for each pair, creating ``p.grad`` where it is None; a None ``g`` adds nothing."""
    for param, grad in zip(params, grads, strict=True):
        if grad is None:
            continue
        if param.grad is None:
            param.grad = grad.detach().clone()
        else:
            param.grad.add_(grad.detach())
