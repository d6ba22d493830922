"""Meta-step memory against inner steps: MAML keeps every step's graph, iMAML none.

    python benchmarks/imaml_memory.py              # steps 5, 10, 20, 40
    python benchmarks/imaml_memory.py --steps 5,80

Peak growth of the resident set during one meta-gradient over what the process held before it
(``diffopt.memory.StepMemory``; the second of two steps, allocator pools warm), for a 1-512-1
tanh MLP on one task of 4096 support points (large activations, so the graphs dominate), inner
SGD 0.01, iMAML with lambda 1 and 5 CG iterations; seconds per meta-gradient beside it.
"""

from __future__ import annotations

import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from diffopt import IMAML, MAML, Episode, InnerLoop
from diffopt.firecli import fire_checked
from diffopt.memory import StepMemory


def measure(cls: type, steps: int, episode: Episode) -> tuple[float, float]:
    """(peak growth in MB, seconds) of a meta-gradient of ``cls`` with ``steps`` inner steps."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 512), nn.Tanh(), nn.Linear(512, 1))
    algorithm = cls(model, InnerLoop("sgd", 0.01, steps, proximal=1.0), F.mse_loss, vectorize="never")
    memory = StepMemory("cpu")
    for _ in range(2):
        with memory.measured():
            start = time.perf_counter()
            algorithm.meta_gradient(episode)
            seconds = time.perf_counter() - start
    return memory.peak_growth_mb, seconds


def main(steps: tuple[int, ...] = (5, 10, 20, 40)) -> None:
    """Print a table of memory and time per inner-step count."""
    steps = (steps,) if isinstance(steps, int) else tuple(steps)
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    episode = Episode(torch.randn(1, 4096, 1, generator=g), torch.randn(1, 4096, 1, generator=g),
                      torch.randn(1, 64, 1, generator=g), torch.randn(1, 64, 1, generator=g))
    print("| inner steps | MAML MB | MAML s | iMAML MB | iMAML s |")
    print("|---|---|---|---|---|")
    for count in steps:
        maml, imaml = measure(MAML, count, episode), measure(IMAML, count, episode)
        print(f"| {count} | {maml[0]:.0f} | {maml[1]:.3f} | {imaml[0]:.0f} | {imaml[1]:.3f} |")


if __name__ == "__main__":
    fire_checked(main, sys.argv[1:], name="imaml_memory")
