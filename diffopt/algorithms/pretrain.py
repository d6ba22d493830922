"""The pre-trained baseline of Finn et al. 2017: one network trained on all tasks jointly."""

from __future__ import annotations

import torch

from diffopt.algorithms.base import MetaAlgorithm
from diffopt.data.episode import Episode


class Pretrain(MetaAlgorithm):
    """Plain joint training: minimise the loss on every task's data, without adaptation.

    Meta-loss: the mean over the episode's tasks of the loss of the *unadapted* model on the
    task's support and query sets together. At evaluation the model is fine-tuned on each
    support set by the same inner loop as every other algorithm (``--inner_optimizer``,
    ``--inner_lr``), which is the baseline's "fine-tune on the support set".
    """

    name = "pretrain"
    exact_meta_gradient = True

    def meta_loss(self, episode: Episode, *, track_higher_grads: bool = True) -> torch.Tensor:
        x = torch.cat([episode.support_x, episode.query_x], 1)  # [B, K + Q, *x]
        y = torch.cat([episode.support_y, episode.query_y], 1)
        return torch.stack([self.loss_fn(self.model(xi), yi) for xi, yi in zip(x, y, strict=True)]).mean()

    def meta_gradient(self, episode: Episode) -> dict[str, float]:
        """Metrics: ``loss``, the joint loss before the step."""
        loss = self.meta_loss(episode)
        loss.backward()
        return {"loss": loss.item()}
