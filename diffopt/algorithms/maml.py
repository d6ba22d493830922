"""MAML (Finn et al. 2017): backpropagate the query loss through the unrolled inner loop."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from diffopt.algorithms.base import MetaAlgorithm, TaskGradient
from diffopt.algorithms.mamlpp import multi_step_loss_weights
from diffopt.data.episode import Episode, Task
from diffopt.fastweights import FunctionalModel
from diffopt.inner import InnerLoop, LossFn
from diffopt.options import Option, check_int
from diffopt.vectorize import loops_functionally, over_support, over_tasks, small_support, support_group_size

_RECIPE = "part of the MAML++ recipe and needs --algorithm maml"


class MAML(MetaAlgorithm):
    """Second-order MAML.

    Meta-loss: the mean over the episode's tasks of the query loss of the model adapted on the
    task's support set. Its gradient flows through every inner step (second order) into the
    initial weights and any learned inner-rule parameters. Looping over tasks, one backward per
    task keeps only one task's graph alive at a time (``task_threads`` of them with threads).

    Two settings, which the MAML++ recipe (``diffopt.algorithms.mamlpp``) sets every epoch
    (``on_epoch``) from ``multi_step_loss_epochs`` and ``first_order_epochs`` (0: off):
    ``step_weights`` (one per inner step) makes the meta-loss the weighted sum of the query
    losses after every step; ``first_order`` detaches the inner gradients, so the initial weights
    get the first-order gradient while learned step sizes still get theirs. Its inner loop's
    ``checkpoint`` computes the same meta-gradient in bounded memory; its ``backprop_steps``
    truncates it to the last steps (``InnerLoop``).

    Constructor arguments (model, inner, loss_fn, vectorize, task_threads): see ``MetaAlgorithm``.

    Example::

        learner = MAML(model, InnerLoop("sgd", lr=0.4, steps=5, checkpoint="auto"), F.cross_entropy)
        learner.meta_gradient(episode)   # into .grad of learner.parameters()
    """

    name = "maml"
    batches_support = True
    learns_update_rule = True
    differentiates_unroll = True
    OPTIONS = {
        "multi_step_loss_epochs": Option(
            int, 0, "MAML++ multi-step loss: weight the query loss after every inner step, annealed to "
            "the last step over this many epochs (0: off; maml only)", unset=0, belongs=_RECIPE),
        "first_order_epochs": Option(
            int, 0, "MAML++ derivative-order annealing: first order for this many epochs, then second "
            "order (0: off; maml only)", unset=0, belongs=_RECIPE),
        "support_vmap_tasks": Option(
            int, 0, "affine batch norm (--norm batch), whose query side loops over tasks: how many "
            "tasks' inner loops one torch.func.vmap runs at once, their graphs held until the "
            "group's backward (3-5x the memory of a task at a time on conv-4: BENCHMARKS.md); 0: "
            "where a task's support set is small, as 5-way 1-shot Omniglot's "
            "(diffopt.vectorize.SMALL_SUPPORT), the whole meta-batch, or as many tasks as fit in a "
            "quarter of the free memory, else whole tasks one at a time; 1: whole tasks one at a "
            "time, the least memory; maml only",
            unset=0, belongs="how many tasks maml's support side vmaps at once"),
    }

    def __init__(self, model: nn.Module, inner: InnerLoop, loss_fn: LossFn, vectorize: str = "auto",
                 task_threads: int = 1, multi_step_loss_epochs: int = 0, first_order_epochs: int = 0,
                 support_vmap_tasks: int = 0) -> None:
        self.check_options(multi_step_loss_epochs, first_order_epochs, support_vmap_tasks)
        super().__init__(model, inner, loss_fn, vectorize=vectorize, task_threads=task_threads)
        self.multi_step_loss_epochs, self.first_order_epochs = multi_step_loss_epochs, first_order_epochs
        self.support_vmap_tasks = support_vmap_tasks
        self._support_groups: dict[tuple, int] = {}  # support_group's measured choice per shape
        self.support_vmapped = self.support_vmapped and support_vmap_tasks != 1
        self.step_weights: list[float] | None = None
        self.first_order = False

    @classmethod
    def check_options(cls, multi_step_loss_epochs: int = 0, first_order_epochs: int = 0,
                      support_vmap_tasks: int = 0) -> None:
        check_int("multi_step_loss_epochs", multi_step_loss_epochs, 0)
        check_int("first_order_epochs", first_order_epochs, 0)
        check_int("support_vmap_tasks", support_vmap_tasks, 0)

    def on_epoch(self, epoch: int) -> None:
        """The MAML++ recipe at ``epoch``: the multi-step loss's weights, the derivative order."""
        steps = self.inner.steps
        annealing = steps > 0 and epoch < self.multi_step_loss_epochs
        self.step_weights = (multi_step_loss_weights(steps, epoch, self.multi_step_loss_epochs)
                             if annealing else None)
        self.first_order = epoch < self.first_order_epochs

    def iteration_record(self) -> dict[str, Any]:
        return {"first_order": self.first_order}

    @property
    def functional_loop(self) -> bool:
        """Whether the loop over tasks unrolls without higher (``loops_functionally``)."""
        return not self.vectorized and loops_functionally(self.inner, self.task_threads, self.model)

    @property
    def exact_meta_gradient(self) -> bool:  # type: ignore[override]
        return not self.first_order and self.inner.backprop_steps is None

    def query_loss(self, task: Task, *, track_higher_grads: bool = True) -> torch.Tensor:
        """Query loss after adapting on the support set (or the weighted per-step sum); a scalar."""
        return self.adapted_query_loss(self.model, task, track_higher_grads)

    def adapted_query_loss(self, model: nn.Module, task: Task, track_higher_grads: bool) -> torch.Tensor:
        """``query_loss`` with the inner loop adapting ``model`` (the whole model, or ANIL's head
        on features computed once)."""
        weights = self.step_weights
        total = None
        unrolled = self.inner.unroll(model, self.loss_fn, task.support_x, task.support_y,
                                     track_higher_grads=track_higher_grads,
                                     detach_inner_grads=self.first_order,
                                     functional=self.vectorized or self.functional_loop)
        for step, fmodel in enumerate(unrolled):
            if weights is not None and step > 0:
                loss = weights[step - 1] * self.loss_fn(fmodel(task.query_x), task.query_y)
                total = loss if total is None else total + loss
        return total if weights is not None else self.loss_fn(fmodel(task.query_x), task.query_y)

    def meta_loss(self, episode: Episode, *, track_higher_grads: bool = True) -> torch.Tensor:
        if self.vectorized:
            return over_tasks(
                lambda task: self.query_loss(task, track_higher_grads=track_higher_grads), episode
            ).mean()
        return torch.stack(
            [self.query_loss(task, track_higher_grads=track_higher_grads) for task in episode]
        ).mean()

    def meta_gradient(self, episode: Episode) -> dict[str, float]:
        """Metrics: ``loss``, the meta-loss (mean post-adaptation query loss)."""
        if self.vectorized:  # one batched graph for the whole episode
            loss = self.meta_loss(episode)
            loss.backward()
            return {"loss": loss.item()}
        if self.vmaps_support(episode):
            return {"loss": self.meta_gradient_over_support(episode).item()}
        params = [p for p in self.parameters() if p.requires_grad]

        def task_gradient(task: Task) -> TaskGradient:
            loss = self.query_loss(task) / len(episode)
            return list(torch.autograd.grad(loss, params, allow_unused=True)), loss.detach()

        return {"loss": self.accumulate_tasks(task_gradient, episode, params)}

    def support_group(self, episode: Episode) -> int:
        """How many of ``episode``'s tasks ``meta_gradient`` runs the inner loops of at once under
        vmap (1: whole tasks one at a time): ``support_vmap_tasks`` where given; by default all,
        or as many as fit in memory, where the support sets are small (``support_group_size``)."""
        if not self.support_vmapped:
            return 1
        if self.support_vmap_tasks:
            return self.support_vmap_tasks
        if not small_support(episode):
            return 1
        key = (tuple(episode.support_x.shape), str(episode.support_x.device))
        if key not in self._support_groups:
            params = [p for p in self.parameters() if p.requires_grad]
            self._support_groups[key] = support_group_size(self._adapt_support, episode, params)
        return self._support_groups[key]

    def vmaps_support(self, episode: Episode) -> bool:
        """Whether ``meta_gradient`` runs ``episode``'s inner loops under vmap, each query side
        alone (``support_group``)."""
        return self.support_group(episode) > 1

    def meta_batch_path(self, episode: Episode) -> str:
        if self.vmaps_support(episode):
            return "inner loops under vmap, query sides one task at a time"
        return super().meta_batch_path(episode)

    def _adapt_support(self, support_x: torch.Tensor, support_y: torch.Tensor) -> list[torch.Tensor]:
        """One task's weights after the last inner step (after every step, for the multi-step loss)."""
        steps = [list(fmodel.parameters()) for fmodel in self.inner.unroll(
            self.model, self.loss_fn, support_x, support_y, detach_inner_grads=self.first_order,
            functional=True)]
        return [w for step in (steps[1:] if self.step_weights is not None else steps[-1:]) for w in step]

    def meta_gradient_over_support(self, episode: Episode) -> torch.Tensor:
        """``meta_gradient`` with the support side under vmap (``over_support``) in groups of
        ``support_group`` tasks: the unroll's weights, then each task's (weighted) query losses at
        them. Returns the meta-loss (detached)."""
        names = [name for name, _ in self.model.named_parameters()]
        weights = self.step_weights

        def query_loss(task: Task, adapted: list[torch.Tensor]) -> torch.Tensor:
            per_step = [adapted[i:i + len(names)] for i in range(0, len(adapted), len(names))]
            losses = [self.loss_fn(FunctionalModel(self.model, names, step)(task.query_x), task.query_y)
                      for step in per_step]
            if weights is None:
                return losses[-1]
            return sum(w * loss for w, loss in zip(weights, losses, strict=True))

        return over_support(self._adapt_support, query_loss, episode, self.support_group(episode))
