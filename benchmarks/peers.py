"""Second-order MAML meta-step: diffopt against the hand-written loop and naive higher, side by side.

    python benchmarks/peers.py                          # W1, W2, W3; prints the table
    python benchmarks/peers.py --workloads W2 --rounds 10 --write BENCHMARKS.md

Workloads (random data of the real shapes, float32):
W1 sinusoid 1-40-40-1 ReLU MLP, meta-batch 25, K=10 support + 10 query, 1 inner step (lr 0.01);
W2 Omniglot conv-4 (64 filters, batch norm), 5-way 1-shot, 15 queries per class, meta-batch 32,
1 inner step (lr 0.4); W3 the same conv-4, meta-batch 8, 5 inner steps.

Implementations: diffopt's MAML (``--vectorize auto``: vmap where proven correct, else a loop
with one backward per task); the hand-written loop (``torch.func.functional_call`` and
``torch.autograd.grad(create_graph=True)`` over the tasks, one backward of the summed
meta-loss); naive higher (a new ``innerloop_ctx`` per task, backward per task). Before timing,
every implementation's meta-gradient is compared with diffopt's. Each round times every
implementation once, in turn; the table reports the median over rounds after ``warmup``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import fire
import higher
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from diffopt.algorithms import MAML
from diffopt.data import Episode
from diffopt.inner import InnerLoop
from diffopt.models import MLP, Conv4
from diffopt.report import library_versions, machine_description, write_section

WORKLOADS = {  # name -> (description, model factory, episode factory, inner lr, steps, loss)
    "W1": ("sinusoid MLP 1-40-40-1, meta-batch 25, K=10, 1 step",
           lambda: MLP(1, 1, (40, 40), "relu"),
           lambda g: Episode(*(torch.rand(25, 10, 1, generator=g) * 10 - 5 for _ in range(4))),
           0.01, 1, F.mse_loss),
    "W2": ("Omniglot conv-4 5-way 1-shot, 15 query, meta-batch 32, 1 step",
           lambda: Conv4(1, 5, 64, 28, pool=False),
           lambda g: _images(g, 32, 5, 1, 15, (1, 28, 28)), 0.4, 1, F.cross_entropy),
    "W3": ("same conv-4, meta-batch 8, 5 steps",
           lambda: Conv4(1, 5, 64, 28, pool=False),
           lambda g: _images(g, 8, 5, 1, 15, (1, 28, 28)), 0.4, 5, F.cross_entropy),
}


def _images(g: torch.Generator, tasks: int, ways: int, shots: int, queries: int, shape) -> Episode:
    support_y = torch.arange(ways).repeat_interleave(shots).expand(tasks, -1)
    query_y = torch.arange(ways).repeat_interleave(queries).expand(tasks, -1)
    return Episode(torch.rand(tasks, ways * shots, *shape, generator=g), support_y.clone(),
                   torch.rand(tasks, ways * queries, *shape, generator=g), query_y.clone())


def diffopt_maml(model: nn.Module, lr: float, steps: int, loss_fn) -> Callable[[Episode], None]:
    learner = MAML(model, InnerLoop("sgd", lr, steps), loss_fn)
    return learner.meta_gradient


def hand_written(model: nn.Module, lr: float, steps: int, loss_fn) -> Callable[[Episode], None]:
    def meta_gradient(episode: Episode) -> None:
        initial = dict(model.named_parameters())
        total = 0.0
        for task in episode:
            params = initial
            for _ in range(steps):
                loss = loss_fn(functional_call(model, params, (task.support_x,)), task.support_y)
                grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
                params = {n: p - lr * g for (n, p), g in zip(params.items(), grads, strict=True)}
            total = total + loss_fn(functional_call(model, params, (task.query_x,)), task.query_y)
        (total / len(episode)).backward()

    return meta_gradient


def naive_higher(model: nn.Module, lr: float, steps: int, loss_fn) -> Callable[[Episode], None]:
    inner = torch.optim.SGD(model.parameters(), lr=lr)

    def meta_gradient(episode: Episode) -> None:
        for task in episode:
            with higher.innerloop_ctx(model, inner, copy_initial_weights=False) as (fmodel, diffopt):
                for _ in range(steps):
                    diffopt.step(loss_fn(fmodel(task.support_x), task.support_y))
                (loss_fn(fmodel(task.query_x), task.query_y) / len(episode)).backward()

    return meta_gradient


IMPLEMENTATIONS = {"diffopt MAML": diffopt_maml, "hand-written loop": hand_written,
                   "higher (naive)": naive_higher}


def _grads(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in model.parameters()]


def main(workloads: tuple[str, ...] = ("W1", "W2", "W3"), rounds: int = 10, warmup: int = 2,
         threads: int = 2, write: str | None = None) -> None:
    """Time every implementation on every workload; print (and optionally write) the table."""
    workloads = (workloads,) if isinstance(workloads, str) else tuple(workloads)
    torch.set_num_threads(threads)
    lines = ["| workload | " + " | ".join(f"{name} (s)" for name in IMPLEMENTATIONS)
             + " | diffopt vs hand-written | max meta-gradient difference |",
             "|---|" + "---|" * (len(IMPLEMENTATIONS) + 2)]
    for name in workloads:
        description, make_model, make_episode, lr, steps, loss_fn = WORKLOADS[name]
        episode = make_episode(torch.Generator().manual_seed(0))
        models, steps_of = {}, {}
        for label, build in IMPLEMENTATIONS.items():
            torch.manual_seed(0)
            models[label] = make_model()
            steps_of[label] = build(models[label], lr, steps, loss_fn)
        reference = None
        worst = 0.0
        for label, step in steps_of.items():  # the meta-gradients agree before anything is timed
            models[label].zero_grad(set_to_none=True)
            step(episode)
            grads = _grads(models[label])
            if reference is None:
                reference = grads
            else:
                scale = max(float(g.abs().max()) for g in reference)
                worst = max(worst, max(float((a - b).abs().max()) for a, b in zip(grads, reference,
                                                                                   strict=True)) / scale)
        times: dict[str, list[float]] = {label: [] for label in IMPLEMENTATIONS}
        for round_ in range(warmup + rounds):
            for label, step in steps_of.items():
                models[label].zero_grad(set_to_none=True)
                start = time.perf_counter()
                step(episode)
                if round_ >= warmup:
                    times[label].append(time.perf_counter() - start)
        medians = {label: statistics.median(t) for label, t in times.items()}
        ratio = medians["hand-written loop"] / medians["diffopt MAML"]
        lines.append(f"| {name}: {description} | "
                     + " | ".join(f"{medians[label]:.4f}" for label in IMPLEMENTATIONS)
                     + f" | {ratio:.2f}x | {worst:.1e} (relative to the largest) |")
        print(lines[-1], flush=True)
    body = "\n".join([
        f"Command: `python benchmarks/peers.py --workloads {','.join(workloads)} --rounds {rounds} "
        f"--threads {threads}`. Median seconds per second-order MAML meta-step over {rounds} "
        f"interleaved rounds after {warmup} warm-up rounds. Machine: {machine_description()}, "
        f"{threads} torch threads, {library_versions(('higher',))}; measured "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "",
        *lines,
    ])
    print(body)
    if write:
        write_section(write, "peers", "MAML meta-step: diffopt, the hand-written loop, naive higher", body)


if __name__ == "__main__":
    fire.Fire(main)
