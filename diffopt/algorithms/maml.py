"""MAML (Finn et al. 2017): backpropagate the query loss through the unrolled inner loop."""

from __future__ import annotations

import torch

from diffopt.algorithms.base import MetaAlgorithm
from diffopt.data.episode import Episode, Task


class MAML(MetaAlgorithm):
    """Second-order MAML.

    Meta-loss: the mean over the episode's tasks of the query loss of the model adapted on the
    task's support set. Its gradient flows through every inner step (second order) into the
    initial weights. One backward per task keeps only one task's graph alive at a time.
    """

    name = "maml"
    exact_meta_gradient = True
    learns_update_rule = True

    def query_loss(self, task: Task, *, track_higher_grads: bool = True) -> torch.Tensor:
        """Query loss after adapting on the support set; a scalar."""
        fmodel = self.adapt(task.support_x, task.support_y, track_higher_grads=track_higher_grads)
        return self.loss_fn(fmodel(task.query_x), task.query_y)

    def meta_loss(self, episode: Episode, *, track_higher_grads: bool = True) -> torch.Tensor:
        return torch.stack(
            [self.query_loss(task, track_higher_grads=track_higher_grads) for task in episode]
        ).mean()

    def meta_gradient(self, episode: Episode) -> dict[str, float]:
        """Metrics: ``loss``, the meta-loss (mean post-adaptation query loss)."""
        total = 0.0
        for task in episode:
            loss = self.query_loss(task) / len(episode)
            loss.backward()
            total += loss.item()
        return {"loss": total}
