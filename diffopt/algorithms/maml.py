"""MAML (Finn et al. 2017): backpropagate the query loss through the unrolled inner loop."""

from __future__ import annotations

import torch
from torch import nn

from diffopt.algorithms.base import MetaAlgorithm, TaskGradient
from diffopt.data.episode import Episode, Task
from diffopt.inner import InnerLoop, LossFn
from diffopt.vectorize import over_tasks


class MAML(MetaAlgorithm):
    """Second-order MAML.

    Meta-loss: the mean over the episode's tasks of the query loss of the model adapted on the
    task's support set. Its gradient flows through every inner step (second order) into the
    initial weights and any learned inner-rule parameters. Looping over tasks, one backward per
    task keeps only one task's graph alive at a time (``task_threads`` of them with threads).

    Two settings (the MAML++ recipe sets them per iteration, see ``mamlpp``):
    ``step_weights`` (one per inner step) makes the meta-loss the weighted sum of the query
    losses after every step; ``first_order`` detaches the inner gradients, so the initial weights
    get the first-order gradient while learned step sizes still get theirs. Its inner loop's
    ``checkpoint`` computes the same meta-gradient in bounded memory; its ``backprop_steps``
    truncates it to the last steps (``InnerLoop``).

    Constructor arguments (model, inner, loss_fn, vectorize, task_threads): see ``MetaAlgorithm``.
    """

    name = "maml"
    learns_update_rule = True
    differentiates_unroll = True

    def __init__(self, model: nn.Module, inner: InnerLoop, loss_fn: LossFn, vectorize: str = "auto",
                 task_threads: int = 1) -> None:
        super().__init__(model, inner, loss_fn, vectorize=vectorize, task_threads=task_threads)
        self.step_weights: list[float] | None = None
        self.first_order = False

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
                                     detach_inner_grads=self.first_order, functional=self.vectorized)
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
        params = [p for p in self.parameters() if p.requires_grad]

        def task_gradient(task: Task) -> TaskGradient:
            loss = self.query_loss(task) / len(episode)
            return list(torch.autograd.grad(loss, params, allow_unused=True)), loss.detach()

        return {"loss": self.accumulate_tasks(task_gradient, episode, params)}
