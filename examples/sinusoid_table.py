"""Reproduce the Meta-Curvature paper's sinusoid table (MSE after 1 inner step) with diffopt.

    python examples/sinusoid_table.py                      # 70,000 meta-iterations, as the paper
    python examples/sinusoid_table.py --iterations 2000 --results none   # a quick look

Trains MAML, Meta-SGD, Meta-Curvature, LSLR, Meta-Curvature with Meta-SGD step sizes, Reptile,
ANIL, BOIL and iMAML at K = 5 and 10 on torchmeta's Sinusoid
(amplitude [0.1, 5], phase [0, pi]) through ``diffopt.compare``: the same training seed and
task stream, the same budget, and the same held-out evaluation tasks for every method. Then
writes the table, diffopt's numbers beside the paper's, into RESULTS.md (between the
``sinusoid-table`` markers). Finished runs are kept in ``--out`` and not run again, and an
interrupted run resumes from its last checkpoint (every 500 meta-iterations), so a
reproduction continues where it stopped.

Setup as Finn et al.: 1-40-40-1 ReLU MLP, meta-batch 25, Adam 1e-3, one inner step of initial
size 0.01 while meta-training (Reptile: its own recipe, see diffopt.data; iMAML: 3
backtracking Gauss-Newton steps on the proximal problem, lambda 100, and 5 CG iterations).
Meta-SGD learns one step size per weight, LSLR one per tensor, Meta-Curvature a
Kronecker-factored preconditioner per weight with the step size fixed at 0.01.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from diffopt.compare import ComparisonRow, compare, run_name
from diffopt.evaluate import EVAL_SEED, EvaluationProtocol
from diffopt.firecli import fire_checked
from diffopt.report import library_versions, machine_description, write_section
from diffopt.runfolder import RunFolder

PAPER = {  # Park & Oliva 2019, table 1 (MAML and Meta-SGD as reported by Li et al. 2017)
    "maml": {5: "0.69 +- 0.07", 10: "0.44 +- 0.04"},
    "meta_sgd": {5: "0.48 +- 0.06", 10: "0.26 +- 0.03"},
    "meta_curvature": {5: "0.41 +- 0.05", 10: "0.20 +- 0.02"},
}

CONFIGS = {
    "maml": {"algorithm": "maml", "inner_optimizer": "sgd"},
    "meta_sgd": {"algorithm": "maml", "inner_optimizer": "meta_sgd"},
    "meta_curvature": {"algorithm": "maml", "inner_optimizer": "meta_curvature"},
    "lslr": {"algorithm": "maml", "inner_optimizer": "lslr"},
    "meta_curvature+meta_sgd": {"algorithm": "maml", "inner_optimizer": "meta_curvature+meta_sgd"},
    "reptile": {"algorithm": "reptile"},
    "anil": {"algorithm": "anil", "inner_optimizer": "sgd"},
    "boil": {"algorithm": "boil", "inner_optimizer": "sgd"},
    # iMAML: lambda 100 = 1 / the protocol's inner lr (a weight with no curvature moves as one
    # MAML step would); 3 backtracking Gauss-Newton steps (gradient steps, fixed or backtracking,
    # fall behind as meta-training sharpens the loss, and the run collapses); 5 CG steps
    "imaml": {"algorithm": "imaml", "inner_optimizer": "sgd", "inner_solver": "gauss_newton",
              "inner_steps": 3, "inner_lr": 1.0, "inner_proximal": 100.0, "inner_backtrack": True},
}


def paper_bound(text: str) -> float:
    """Upper end of a 'mean +- interval' string."""
    mean, interval = (float(v) for v in text.split("+-"))
    return mean + interval


def summary(row: ComparisonRow, steps: int) -> str:
    """'mean +- interval' after ``steps``, or how many tasks diverged (a rule learned for 1 step,
    run for 10)."""
    if row.diverged[steps]:
        return f"diverges on {row.diverged[steps]} of {row.scored} tasks"
    return f"{row.mean[steps]:.3f} +- {row.ci95_tasks[steps]:.3f}"


def main(
    iterations: int = 70000,
    methods: tuple[str, ...] = tuple(CONFIGS),
    shots: tuple[int, ...] = (5, 10),
    seed: int = 0,
    eval_tasks: int = 1000,
    eval_test_shots: int = 100,
    threads: int = 1,
    out: str = "runs/sinusoid-table",
    results: str = "RESULTS.md",
    section: str = "sinusoid-table",
    train: bool = True,
    progress: bool = False,
) -> None:
    """Train and evaluate every method; write the table into ``results`` (``none``: only print)
    between the ``section`` markers (another section: a table of the methods named).
    ``train=False``: tabulate the runs already finished in ``out``, naming the others."""
    methods = (methods,) if isinstance(methods, str) else tuple(methods)
    shots = (shots,) if isinstance(shots, int) else tuple(shots)
    unknown = sorted(set(methods) - set(CONFIGS))
    if unknown:
        raise SystemExit(f"unknown method {unknown[0]!r}; choose from {', '.join(CONFIGS)}")
    torch.set_num_threads(threads)
    started = time.time()
    protocol = EvaluationProtocol(eval_tasks, (0, 1, 10), eval_test_shots, EVAL_SEED)
    finished = {(m, k) for m in methods for k in shots
                if RunFolder(Path(out) / "runs" / run_name(m, k, seed)).comparison_record() is not None}
    pending = [] if train else [(m, k) for k in shots for m in methods if (m, k) not in finished]
    groups = [(methods, shots)] if not pending else [
        ([m for m in methods if (m, k) in finished], (k,)) for k in shots]
    rows = [row for chosen, ks in groups if chosen for row in compare(
        dataset="sinusoid", configs={m: CONFIGS[m] for m in chosen}, shots=ks, seeds=(seed,),
        iterations=iterations, protocol=protocol, out=Path(out), progress=progress)]
    lines = [
        "| method | K | paper (1 step) | diffopt (1 step) | diffopt (10 steps) | within paper's bound |"
        " train wall time | s / meta-iter |",
        "|---|---|---|---|---|---|---|---|",
    ]
    means = {}
    for row in sorted(rows, key=lambda r: (r.shots, methods.index(r.label))):
        one = row.mean[1]
        means[row.label, row.shots] = one
        paper = PAPER.get(row.label, {}).get(row.shots)
        within = "-" if paper is None else ("yes" if one <= paper_bound(paper) else "**no**")
        lines.append(f"| {row.label} | {row.shots} | {paper or '-'} | {summary(row, 1)} | "
                     f"{summary(row, 10)} | {within} | {row.train_seconds / 60:.1f} min | "
                     f"{row.seconds_per_iteration:.4f} |")
    order = []
    for k in shots:
        trio = [means.get((m, k)) for m in ("meta_curvature", "meta_sgd", "maml")]
        if None not in trio:
            holds = trio[0] < trio[1] < trio[2]
            order.append(f"K={k}: Meta-Curvature < Meta-SGD < MAML {'holds' if holds else '**fails**'} "
                         f"({trio[0]:.3f} < {trio[1]:.3f} < {trio[2]:.3f})")
    command = f"python examples/sinusoid_table.py --iterations {iterations}"
    if section != "sinusoid-table":
        command += f" --methods {','.join(methods)} --section {section}"
    body = "\n".join([
        f"Command: `{command}` (runs in `{out}`; finished runs are reused).",
        "",
        f"{iterations} meta-iterations per run, meta-batch 25, training seed {seed}; MSE on "
        f"{eval_tasks} held-out tasks (evaluation seed {EVAL_SEED}, {eval_test_shots} query points "
        "each), mean +- 95% interval. Machine: "
        f"{machine_description()}, {threads} torch thread(s), {library_versions()}. "
        f"Finished {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; this invocation took "
        f"{(time.time() - started) / 60:.1f} min.",
        "",
        *lines,
        "",
        *[f"- {line}" for line in order],
        *[f"- not finished yet: {m} K={k} (the command without --train False trains it)"
          for m, k in pending],
    ])
    print(body)
    if results != "none":
        title = ("Sinusoid: the Meta-Curvature table" if section == "sinusoid-table" else
                 f"Sinusoid: the Meta-Curvature table's protocol, {', '.join(methods)}")
        write_section(results, section, title, body)


if __name__ == "__main__":
    fire_checked(main, sys.argv[1:], name="sinusoid_table")
