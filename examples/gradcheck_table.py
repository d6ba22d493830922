"""Check MAML's meta-gradient for every inner rule, both execution paths and 1-3 inner steps.

    python examples/gradcheck_table.py                 # writes the table into RESULTS.md
    python examples/gradcheck_table.py --results none  # only prints it

Each cell is the worst relative error over all meta-parameters (initial weights, learned step
sizes, curvature matrices, per-step batch-norm weights) of ``diffopt.check_meta_gradient``:
float64, central finite differences, 1-8-8-1 tanh MLP on 2 Sinusoid tasks of 5 + 5 points,
inner lr 0.1. Learned rules are first moved off their initial values (as training would).
"""

from __future__ import annotations

import sys
import time
import warnings

import torch

from diffopt import Episode, check_meta_gradient, get_dataset
from diffopt.config import resolve_config
from diffopt.errors import DiffoptError
from diffopt.firecli import fire_checked
from diffopt.optim import FIXED_RULES, INNER_OPTIMIZERS
from diffopt.report import write_section
from diffopt.train import build

RULES = (*INNER_OPTIMIZERS, *FIXED_RULES, "lslr", "meta_sgd", "meta_curvature", "meta_curvature+lslr")
"""Every torch optimizer higher differentiates, AdamW, and the learned rules."""

OPTIONS = {"adam": {"betas": (0.5, 0.9), "eps": 1e-4, "weight_decay": 0.1, "amsgrad": True},
           "rmsprop": {"alpha": 0.9, "momentum": 0.5, "centered": True},
           "adamw": {"betas": (0.8, 0.99), "weight_decay": 0.2}}
"""``--inner_options`` rows: hyper-parameters away from the defaults."""


def worst_error(rule: str, steps: int, vectorize: str, norm: str = "none",
                eps: tuple[float, ...] = (1e-6,), seed: int = 0, algorithm: str = "maml",
                **options) -> float:
    """The worst relative error; ``options``: further ``diffopt train`` options."""
    config = resolve_config(algorithm=algorithm, inner_optimizer=rule, inner_lr=0.1, inner_steps=steps,
                            hidden=(8, 8),
                            activation="tanh", norm=norm, vectorize=vectorize, shots=5, test_shots=5,
                            meta_batch_size=2, seed=seed, **options)
    algorithm = build(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in algorithm.inner.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g) * p.abs().mean())
    loader = get_dataset("sinusoid").loader("train", seed=seed, shots=5, test_shots=5, batch_size=2,
                                            num_tasks=2)
    episode = Episode.from_torchmeta(next(iter(loader)))
    return check_meta_gradient(algorithm, episode, eps=eps).max_rel_error


def cell(rule: str, steps: int, vectorize: str, **options) -> str:
    """The error, or '(loops)' where the meta-batch cannot be vmapped (no functional form)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        try:
            return f"{worst_error(rule, steps, vectorize, **options):.1e}"
        except DiffoptError:
            if vectorize == "always":
                return "(loops)"
            raise


def main(results: str = "RESULTS.md") -> None:
    """Print (and write) the table."""
    started = time.time()
    lines = ["| inner rule | loop, 1 step | loop, 3 steps | vmap, 1 step | vmap, 3 steps |",
             "|---|---|---|---|---|"]
    for rule in RULES:
        cells = [cell(rule, steps, vectorize) for vectorize in ("never", "always") for steps in (1, 3)]
        lines.append(f"| {rule} | " + " | ".join(cells) + " |")
    for rule, options in OPTIONS.items():
        cells = [cell(rule, steps, vectorize, inner_options=options)
                 for vectorize in ("never", "always") for steps in (1, 3)]
        settings = ", ".join(f"{key} {value}" for key, value in options.items())
        lines.append(f"| {rule} with {settings} | " + " | ".join(cells) + " |")
    norm_cells = [f"{worst_error('lslr', steps, 'never', 'per_step_batch', (1e-6, 1e-7)):.1e}"
                  for steps in (1, 3)]
    lines.append(f"| lslr + per-step batch norm (eps 1e-6 and 1e-7) | {norm_cells[0]} | "
                 f"{norm_cells[1]} | (loops) | (loops) |")
    for algorithm, adapted in (("anil", "head"), ("boil", "body")):
        cells = [f"{worst_error('sgd', steps, vectorize, algorithm=algorithm):.1e}"
                 for vectorize in ("never", "always") for steps in (1, 3)]
        lines.append(f"| sgd, {algorithm.upper()} (the inner loop adapts the {adapted}) | "
                     + " | ".join(cells) + " |")
    for rule in ("sgd", "meta_sgd"):
        cells = [cell(rule, steps, vectorize, inner_params="0.*,4.weight")
                 for vectorize in ("never", "always") for steps in (1, 3)]
        lines.append(f"| {rule}, `--inner_params '0.*,4.weight'` | " + " | ".join(cells) + " |")
    implicit = ["| iMAML, adapting | loop | vmap |", "|---|---|---|"]
    for adapted in ("all", "head", "body"):
        cells = [cell("sgd", 100, vectorize, algorithm="imaml", inner_proximal=5.0, cg_steps=100,
                      inner_params=adapted, inner_solver="gradient", inner_backtrack=False)
                 for vectorize in ("never", "always")]
        implicit.append(f"| {adapted} | " + " | ".join(cells) + " |")
    body = "\n".join([
        "Command: `python examples/gradcheck_table.py`. Worst relative error over all "
        "meta-parameters (bound in the tests: 1e-5); float64, central differences with eps 1e-6, "
        "1-8-8-1 tanh MLP, 2 Sinusoid tasks of 5 + 5 points, inner lr 0.1, learned rules moved "
        f"off their initial values. torch {torch.__version__}; "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {time.time() - started:.0f} s.",
        "", *lines, "",
        "iMAML's meta-gradient is the derivative of the query loss at the inner loop's result "
        "once the inner problem is solved: 100 inner steps of 0.1 with lambda 5 (the proximal "
        "problem contracts about 0.5x a step), CG to a residual 1e-10 of the gradient (loop) or "
        "100 iterations (vmap, 97 unknowns):",
        "", *implicit,
    ])
    print(body)
    if results != "none":
        write_section(results, "gradcheck-table", "Gradient checks: every rule, both paths", body)


if __name__ == "__main__":
    fire_checked(main, sys.argv[1:], name="gradcheck_table")
