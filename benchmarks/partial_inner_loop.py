"""Seconds per meta-gradient of MAML, ANIL and BOIL on Omniglot's conv-4, side by side.

    python benchmarks/partial_inner_loop.py [--inner_steps 5] [--rounds 12] [--threads 1]

cbfinn/maml's Omniglot model and settings (diffopt's defaults), meta-batch 32, 5-way 1-shot
with one query per class, vmapped over tasks; every round times each algorithm once, in turn,
and the medians after two warm-up rounds are printed with their ratios to MAML's.
"""

from __future__ import annotations

import statistics
import time

import torch

from diffopt.config import resolve_config
from diffopt.data import Episode
from diffopt.firecli import fire_checked
from diffopt.train import build


def main(inner_steps: int = 5, rounds: int = 12, threads: int = 1) -> None:
    """Median seconds per meta-gradient of maml, anil and boil (printed with ratios to maml)."""
    torch.set_num_threads(threads)
    algorithms = {name: build(resolve_config(dataset="omniglot", algorithm=name, inner_steps=inner_steps))
                  for name in ("maml", "anil", "boil")}
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(32, 10, 1, 28, 28, generator=g), torch.arange(5).repeat(32, 2)
    episode = Episode(x[:, :5], y[:, :5], x[:, 5:], y[:, 5:])
    seconds: dict[str, list[float]] = {name: [] for name in algorithms}
    for _ in range(rounds):
        for name, algorithm in algorithms.items():
            algorithm.zero_grad(set_to_none=True)
            start = time.perf_counter()
            algorithm.meta_gradient(episode)
            seconds[name].append(time.perf_counter() - start)
    median = {name: statistics.median(values[2:]) for name, values in seconds.items()}
    for name, value in median.items():
        print(f"{name:5} {value:.3f} s  ({value / median['maml']:.2f}x maml)")


if __name__ == "__main__":
    import sys

    fire_checked(main, sys.argv[1:], name="partial_inner_loop")
