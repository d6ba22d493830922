"""The MAML++ training recipe (Antoniou et al. 2019, "How to Train Your MAML"): schedules that
MAML follows epoch by epoch (``MAML.on_epoch``, called by the training loop).

- multi-step loss (MSL): the meta-loss is a weighted sum of the query losses after every inner
  step; the weights start uniform and are annealed towards the last step over the first
  ``anneal_epochs`` epochs, after which only the last step's loss counts;
- derivative-order annealing (DA): first order for the first ``first_order_epochs`` epochs,
  second order after.

An epoch is ``iterations_per_epoch`` meta-iterations (500 in the paper's code) or, with
``--epochs E``, 1/E of the run (``diffopt.train.current_epoch``): the paper's 150 epochs, of
which MSL lasts the first 10, then scale to a wall-clock budget.
"""

from __future__ import annotations


def multi_step_loss_weights(steps: int, epoch: int, anneal_epochs: int) -> list[float]:
    """Per-step query-loss weights at ``epoch`` (as in the paper's code).

    Non-final weights decay linearly from 1/steps to a floor of 0.03/steps; the final weight
    grows by what they lose, up to 1 - (steps - 1) * floor.
    """
    decay = 1.0 / steps / anneal_epochs
    floor = 0.03 / steps
    weights = [max(1.0 / steps - epoch * decay, floor) for _ in range(steps - 1)]
    weights.append(min(1.0 / steps + epoch * (steps - 1) * decay, 1.0 - (steps - 1) * floor))
    return weights
