"""Seconds per meta-step of diffopt's algorithms, looping over tasks versus vmapped, side by side.

    python benchmarks/meta_step.py                    # prints the table
    python benchmarks/meta_step.py --write BENCHMARKS.md

Workload W1: sinusoid 1-40-40-1 ReLU MLP, meta-batch 25, K=10 support and 10 query points,
float32. Every round times each configuration once, in turn (interleaved, so drift hits all
alike); the table reports the median over rounds after ``warmup`` rounds. Before timing, each
pair's meta-gradients are compared.
"""

from __future__ import annotations

import copy
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from diffopt.algorithms import build_algorithm
from diffopt.data import Episode
from diffopt.firecli import fire_checked
from diffopt.inner import InnerLoop
from diffopt.models import MLP
from diffopt.report import machine_description, write_section

CONFIGS = [  # (label, algorithm, inner rule, inner steps)
    ("MAML, sgd, 1 step", "maml", "sgd", 1),
    ("MAML, sgd, 5 steps", "maml", "sgd", 5),
    ("MAML, lslr, 1 step", "maml", "lslr", 1),
    ("MAML, meta_curvature, 1 step", "maml", "meta_curvature", 1),
    ("first-order MAML, sgd, 1 step", "fomaml", "sgd", 1),
    ("Reptile, sgd, 5 steps", "reptile", "sgd", 5),
]


def pair(algorithm: str, rule: str, steps: int):
    torch.manual_seed(0)
    model = MLP(1, 1, (40, 40), "relu")
    loop = build_algorithm(algorithm, model, InnerLoop(rule, 0.01, steps, model=model), F.mse_loss,
                           "never")
    vmapped = copy.deepcopy(loop)
    vmapped.vectorized = True
    return loop, vmapped


def timed(algorithm, episode) -> float:
    start = time.perf_counter()
    algorithm.zero_grad(set_to_none=True)
    algorithm.meta_gradient(episode)
    return time.perf_counter() - start


def main(rounds: int = 30, warmup: int = 5, threads: int = 2, write: str | None = None) -> None:
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    episode = Episode(*(torch.rand(25, 10, 1, generator=g) * 10 - 5 for _ in range(4)))
    pairs = [pair(a, r, s) for _, a, r, s in CONFIGS]
    agreement = []
    for loop, vmapped in pairs:
        timed(loop, episode)
        timed(vmapped, episode)
        agreement.append(max(((a.grad - b.grad).abs().max() / a.grad.abs().max()).item()
                             for a, b in zip(loop.parameters(), vmapped.parameters(), strict=True)))
    times = [([], []) for _ in pairs]
    for round_ in range(warmup + rounds):
        for (loop, vmapped), (loop_times, vmap_times) in zip(pairs, times, strict=True):
            for algorithm, sink in ((loop, loop_times), (vmapped, vmap_times)):
                seconds = timed(algorithm, episode)
                if round_ >= warmup:
                    sink.append(seconds)
    lines = ["| W1 configuration | loop over tasks (higher) | vmap over tasks | speed-up | "
             "gradient agreement (max rel. diff.) |", "|---|---|---|---|---|"]
    for (label, *_), (loop_times, vmap_times), diff in zip(CONFIGS, times, agreement, strict=True):
        loop_ms, vmap_ms = statistics.median(loop_times) * 1e3, statistics.median(vmap_times) * 1e3
        lines.append(f"| {label} | {loop_ms:.1f} ms | {vmap_ms:.1f} ms | {loop_ms / vmap_ms:.1f}x | "
                     f"{diff:.1e} |")
    body = "\n".join([
        f"Command: `python benchmarks/meta_step.py --rounds {rounds} --threads {threads}`. "
        f"{machine_description()}, {threads} torch threads, torch "
        f"{torch.__version__}, Python {platform.python_version()}; measured "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Median of {rounds} interleaved "
        f"rounds after {warmup} warm-up rounds; seconds per meta-gradient of one meta-batch "
        "(outer step excluded).",
        "", *lines,
    ])
    print(body)
    if write:
        write_section(write, "meta-step", "diffopt: loop over tasks vs vmap (W1)", body)


if __name__ == "__main__":
    fire_checked(main, name="meta_step")
