"""Reptile (Nichol, Achiam & Schulman 2018), batched over a meta-batch."""

from __future__ import annotations

import torch

from diffopt.algorithms.base import MetaAlgorithm, TaskGradient, accumulate_grad
from diffopt.data.episode import Episode, Task
from diffopt.vectorize import over_tasks


class Reptile(MetaAlgorithm):
    """phi <- phi + eps * mean_i(W_i - phi), W_i = phi after the inner loop on task i.

    The inner loop trains on all of a task's meta-training data (support and query sets, as
    Reptile makes no train/test split within a task). ``meta_gradient`` stores the pseudo-
    gradient ``phi - mean_i W_i``; an outer SGD step with learning rate eps then performs the
    Reptile update, and annealing that learning rate linearly to a final value reproduces the
    paper's schedule.

    Constructor arguments (model, inner, loss_fn, vectorize, task_threads): see ``MetaAlgorithm``.
    """

    name = "reptile"
    carries_inner_state = True

    def _adapt_on_all(self, task: Task) -> tuple[list[torch.Tensor], torch.Tensor]:
        """(W, the last inner step's loss): the inner loop on support and query sets.

        The loss is a metric: the one the last step took its gradient of (free), not a further
        forward pass at W (which costs as much as a third of a one-step inner loop).
        """
        x = torch.cat([task.support_x, task.query_x])
        y = torch.cat([task.support_y, task.query_y])
        losses: list[torch.Tensor] = []
        fmodel = self.adapt(x, y, track_higher_grads=False, losses=losses, carry_state=True)
        if not losses:  # no inner steps: W is the initial model
            with torch.no_grad():
                losses.append(self.loss_fn(fmodel(x), y))
        return list(fmodel.parameters()), losses[-1]

    def meta_gradient(self, episode: Episode) -> dict[str, float]:
        """Metrics: ``loss``, the mean over tasks of the last inner step's loss."""
        initial = list(self.model.parameters())
        if self.vectorized:
            with torch.no_grad():  # torch.func.grad still computes the inner gradients
                adapted, losses = over_tasks(self._adapt_on_all, episode)
            accumulate_grad(initial, [phi - w.mean(0) for phi, w in zip(initial, adapted, strict=True)])
            return {"loss": losses.mean().item()}

        def task_gradient(task: Task) -> TaskGradient:
            adapted, loss = self._adapt_on_all(task)
            scale = 1 / len(episode)
            return [(phi - w).detach() * scale for phi, w in zip(initial, adapted, strict=True)], loss * scale

        return {"loss": self.accumulate_tasks(task_gradient, episode, initial)}
