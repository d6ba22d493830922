"""How well a trained iMAML run's inner steps solve its proximal problem.

    python examples/imaml_residual.py runs/imaml-a runs/imaml-b

For each run folder: the mean query loss and ``inner_residual`` (0: the inner problem solved,
so the implicit gradient is the meta-gradient; near 1: the steps barely moved) of one
meta-batch of held-out tasks at the trained weights, with the run's own inner loop.
"""

from __future__ import annotations

import sys
import warnings

from diffopt.algorithms import IMAML
from diffopt.data import Episode, get_dataset
from diffopt.errors import DiffoptError
from diffopt.firecli import fire_checked
from diffopt.train import load_trained


def residual_of(run: str, tasks: int = 25, seed: int = 7) -> dict[str, float]:
    """{"loss", "inner_residual"} of run folder ``run`` on ``tasks`` test tasks (``seed``)."""
    config, algorithm, _ = load_trained(run)
    if not isinstance(algorithm, IMAML):
        raise DiffoptError(f"{run} trained {config.algorithm}, not imaml")
    loader = get_dataset(config.dataset).loader(
        "test", seed=seed, shots=config.shots, test_shots=config.test_shots, ways=config.ways,
        batch_size=tasks, num_tasks=tasks, **config.data_options())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the residual is what this script reports
        return algorithm.meta_gradient(Episode.from_torchmeta(next(iter(loader))))


def main(*runs: str, tasks: int = 25, seed: int = 7) -> None:
    """Print each run's inner_residual and query loss."""
    if not runs:
        raise DiffoptError("name one or more iMAML run folders")
    for run in runs:
        metrics = residual_of(run, tasks, seed)
        print(f"{run}: inner_residual {metrics['inner_residual']:.3f}, query loss {metrics['loss']:.3f}")


if __name__ == "__main__":
    fire_checked(main, sys.argv[1:], name="imaml_residual")
