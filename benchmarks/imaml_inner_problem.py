"""Does iMAML's inner loop solve its proximal problem on Omniglot? The residual by solver, step
size, steps and activation, on the same meta-batch.

    python benchmarks/imaml_inner_problem.py --data_root data

iMAML's implicit meta-gradient is the meta-gradient only at a solution of the proximal problem
min_w L(w) + lambda / 2 ||w - theta||^2; ``inner_residual`` (diffopt.algorithms.imaml) is
||grad L + lambda (w - theta)|| / (||grad L|| + lambda ||w - theta||), 0 at a solution. Each
configuration is iMAML at diffopt's Omniglot protocol (conv-4, batch norm with batch
statistics, lambda 2, 5-way 1-shot) but for the options in its row, from the same initial
weights, on the same tasks; the table prints the mean residual over the tasks and the seconds
one meta-gradient took (one torch thread).
"""

from __future__ import annotations

import time
import warnings

import torch

from diffopt.config import resolve_config
from diffopt.data import Episode, get_dataset
from diffopt.firecli import fire_checked
from diffopt.train import build

CONFIGURATIONS = [
    dict(inner_steps=16, inner_lr=0.1),  # imaml_dev's Omniglot run
    dict(inner_steps=100, inner_lr=0.03),
    dict(inner_steps=1000, inner_lr=0.01),
    dict(inner_steps=4000, inner_lr=0.001),
    dict(inner_solver="gauss_newton", inner_steps=3, inner_lr=1.0),
    dict(inner_solver="gauss_newton", inner_steps=10, inner_lr=1.0, inner_backtrack=True),
    dict(inner_steps=16, inner_lr=0.1, activation="softplus"),
    dict(inner_steps=100, inner_lr=0.01, activation="softplus"),
    dict(inner_steps=1000, inner_lr=0.003, activation="softplus"),
    dict(inner_solver="gauss_newton", inner_steps=5, inner_lr=1.0, inner_backtrack=True,
         activation="softplus"),
]


def main(data_root: str = "data", tasks: int = 2, seed: int = 0) -> None:
    """Print the residual table for ``tasks`` meta-training tasks (stream ``seed``)."""
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")  # iMAML warns of every unsolved problem: the table says it
    spec = get_dataset("omniglot")
    batch = next(iter(spec.loader("train", seed=seed, shots=1, test_shots=1, ways=5, batch_size=tasks,
                                  num_tasks=tasks, root=data_root)))
    episode = Episode.from_torchmeta(batch)
    print("| activation | solver | inner steps | inner lr | backtracking | residual | seconds |")
    print("|---|---|---|---|---|---|---|")
    for flags in CONFIGURATIONS:
        config = resolve_config(dataset="omniglot", algorithm="imaml", data_root=data_root, seed=seed,
                                **flags)
        algorithm = build(config)  # seeded by the config: the same initial weights in every row
        began = time.perf_counter()
        metrics = algorithm.meta_gradient(episode)
        print(f"| {config.activation} | {config.inner_solver} | {config.inner_steps} | {config.inner_lr:g} "
              f"| {config.inner_backtrack} | {metrics['inner_residual']:.3f} "
              f"| {time.perf_counter() - began:.1f} |", flush=True)


if __name__ == "__main__":
    fire_checked(main, name="imaml_inner_problem")
