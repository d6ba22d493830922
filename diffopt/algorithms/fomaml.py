"""First-order MAML (Finn et al. 2017, section 5.2): ignore the inner loop's second derivatives."""

from __future__ import annotations

import higher
import torch

from diffopt.algorithms.base import MetaAlgorithm, TaskGradient
from diffopt.data.episode import Episode, Task
from diffopt.fastweights import FunctionalModel
from diffopt.vectorize import over_tasks


class FOMAML(MetaAlgorithm):
    """The meta-gradient is the gradient of the query loss at the adapted weights.

    The inner loop runs without higher-order tracking (each step's result is detached), so it
    is cheaper than MAML; the gradient of the query loss with respect to the adapted weights is
    applied to the initial weights, averaged over the episode's tasks. Vectorized, the adapted
    weights are the initial ones plus detached updates, so one backward of the mean query loss
    delivers exactly that gradient.

    Constructor arguments (model, inner, loss_fn, vectorize, task_threads): see ``MetaAlgorithm``.
    """

    name = "fomaml"
    carries_inner_state = True

    def _adapted_query_loss(
        self, task: Task
    ) -> tuple[higher.patch._MonkeyPatchBase | FunctionalModel, torch.Tensor]:
        """(adapted model, query loss at the adapted weights)."""
        fmodel = self.adapt(task.support_x, task.support_y, track_higher_grads=False, carry_state=True)
        return fmodel, self.loss_fn(fmodel(task.query_x), task.query_y)

    def meta_gradient(self, episode: Episode) -> dict[str, float]:
        """Metrics: ``loss``, the mean post-adaptation query loss."""
        if self.vectorized:
            loss = over_tasks(lambda task: self._adapted_query_loss(task)[1], episode).mean()
            loss.backward()
            return {"loss": loss.item()}

        def task_gradient(task: Task) -> TaskGradient:
            fmodel, loss = self._adapted_query_loss(task)
            loss = loss / len(episode)
            return list(torch.autograd.grad(loss, fmodel.parameters())), loss.detach()

        return {"loss": self.accumulate_tasks(task_gradient, episode, list(self.model.parameters()))}
