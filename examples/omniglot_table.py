"""Omniglot 5-way 1-shot: MAML, first-order MAML and Reptile under one wall-clock budget.

    python examples/omniglot_table.py train     # the three runs side by side, 1 thread each
    python examples/omniglot_table.py report    # 600 test tasks each; table + plot into RESULTS.md

``train`` starts one ``diffopt train`` process per method at once (so machine load hits all
alike), each with ``--max_seconds BUDGET`` of training time, validation on 100 meta-val tasks
every ``--validate_every`` seconds (excluded from the budget) and a checkpoint every 100
meta-iterations. Re-running it resumes unfinished runs and skips finished ones. ``report``
scores every run on the same 600 meta-test tasks (evaluation seed 2017), transductively (batch
statistics over the query set, as MAML) and non-transductively (each query example with the
support set alone, the Reptile paper's protocol), after each method's evaluation steps (MAML and
first-order MAML: 10; Reptile: 50, as the papers), and plots the validation accuracy against
training time and against meta-iterations.

Each method takes its paper's Omniglot recipe (``diffopt.data``): MAML and first-order MAML
meta-batch 32, one inner SGD step of 0.4, Adam 1e-3; Reptile 10 examples per class, inner Adam
(beta1 = 0, lr 0.001) for 5 steps on mini-batches of 10, meta-batch 5, outer step 1 annealed to
0 over the budget.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import fire
import numpy as np
import torch

from diffopt.checkpoint import CHECKPOINT_NAME, load_checkpoint, write_json
from diffopt.data import get_dataset
from diffopt.evaluate import EVAL_SEED, evaluate, mean_ci95
from diffopt.plots import validation_curves
from diffopt.report import library_versions, machine_description, write_section
from diffopt.train import load_trained

METHODS = {"maml": "MAML", "fomaml": "first-order MAML", "reptile": "Reptile"}
EVAL_STEPS = {"maml": 10, "fomaml": 10, "reptile": 50}
PAPER = {  # 5-way 1-shot Omniglot, transductive / non-transductive where published
    "maml": ("98.7 +- 0.4", "-"),  # Finn et al. 2017, table 1
    "fomaml": ("98.3 +- 0.5", "-"),  # Finn et al. 2017, table 1
    "reptile": ("97.97", "95.32"),  # Nichol et al. 2018
}


def _methods(methods) -> tuple[str, ...]:
    methods = (methods,) if isinstance(methods, str) else tuple(methods)
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}")
    return methods


def train(
    budget: float = 4200.0,
    methods: tuple[str, ...] = tuple(METHODS),
    validate_every: float = 300.0,
    out: str = "runs/omniglot-5w1s",
    data_root: str = "data",
    seed: int = 0,
    validation_tasks: int = 100,
) -> None:
    """Meta-train every method for ``budget`` seconds of training time, side by side."""
    methods = _methods(methods)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    processes = {}
    for method in methods:
        run = Path(out) / method
        if (run / CHECKPOINT_NAME).exists():
            payload = load_checkpoint(run)
            if payload["train_seconds"] >= budget:
                print(f"{method}: finished ({payload['iteration']} iterations)")
                continue
            args = ["train", "--resume", str(run)]
        else:
            args = ["train", "--dataset", "omniglot", "--algorithm", method, "--data_root", data_root,
                    "--iterations", "100000", "--max_seconds", str(budget), "--seed", str(seed),
                    "--validate_every_seconds", str(validate_every), "--checkpoint_every", "100",
                    "--validation_tasks", str(validation_tasks),
                    "--run_dir", str(run)]
        run.parent.mkdir(parents=True, exist_ok=True)
        log = open(run.parent / f"{method}.log", "a")
        processes[method] = subprocess.Popen([sys.executable, "-m", "diffopt", *args, "--progress", "False"],
                                             env=env, stdout=log, stderr=subprocess.STDOUT)
    failed = [m for m, p in processes.items() if p.wait() != 0]
    if failed:
        raise SystemExit(f"{', '.join(failed)} failed; see {out}/<method>.log")


def _scores(run: Path, method: str, tasks: int, transductive: bool, iteration: int) -> np.ndarray:
    """Per-task test accuracy after the method's evaluation steps, cached in the run folder for
    the checkpoint at ``iteration`` (the model is loaded only to fill the cache)."""
    steps = EVAL_STEPS[method]
    cache = run / f"test-{tasks}-steps{steps}-{'trans' if transductive else 'nontrans'}.json"
    if cache.exists():
        saved = json.loads(cache.read_text())
        if saved["iteration"] == iteration:
            return np.asarray(saved["scores"])
    config, algorithm, payload = load_trained(run)
    spec = get_dataset("omniglot")
    evaluation = evaluate(algorithm, spec, shots=config.shots, test_shots=spec.eval_test_shots,
                          ways=config.ways, tasks=tasks, steps=(steps,), root=config.data_root,
                          transductive=transductive)
    write_json(cache, {"iteration": payload["iteration"], "scores": evaluation.scores[steps].tolist()})
    return evaluation.scores[steps]


def _interval(scores: np.ndarray) -> str:
    mean, ci = mean_ci95(np.asarray(scores) * 100)
    return f"{mean:.2f} +- {ci:.2f}"


def report(
    methods: tuple[str, ...] = tuple(METHODS),
    tasks: int = 600,
    out: str = "runs/omniglot-5w1s",
    results: str = "RESULTS.md",
    plot: str = "docs/figures/omniglot-5w1s.png",
) -> None:
    """Evaluate every run on the same test tasks; write the table and the plot."""
    methods = _methods(methods)
    torch.set_num_threads(1)
    rows, curves = [], {}
    for method in methods:
        run = Path(out) / method
        payload = load_checkpoint(run)
        metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        curves[method] = [json.loads(line) for line in (run / "validation.jsonl").read_text().splitlines()]
        transductive = _scores(run, method, tasks, True, payload["iteration"])
        inductive = _scores(run, method, tasks, False, payload["iteration"])
        paper = PAPER[method]
        rows.append(
            f"| {METHODS[method]} | {_interval(transductive)} | {paper[0]} | {_interval(inductive)} | "
            f"{paper[1]} | {EVAL_STEPS[method]} | {payload['iteration']} | "
            f"{payload['train_seconds'] / 60:.1f} | "
            f"{statistics.median(m['seconds'] for m in metrics):.2f} | "
            f"{100 * curves[method][-1]['accuracy']:.1f} |")
    validation_curves({METHODS[m]: [records] for m, records in curves.items()}, "accuracy", Path(plot),
                      title="Omniglot 5-way 1-shot, one CPU thread each, side by side", percent=True,
                      log_iterations=True)
    relative = os.path.relpath(plot, Path(results).parent)
    body = "\n".join([
        "Commands: `python examples/omniglot_table.py train` (the three runs side by side), then "
        f"`python examples/omniglot_table.py report` (runs in `{out}`).",
        "",
        f"Test accuracy (%) on the same {tasks} meta-test tasks (evaluation seed {EVAL_SEED}, 15 "
        "query images per class), mean +- 95% interval over tasks; training seed 0. Machine: "
        f"{machine_description()}; the three runs shared it, one torch thread each. "
        f"{library_versions()}. Written "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "",
        "| method | transductive | paper | non-transductive | paper | eval steps | meta-iterations |"
        " training minutes | s / meta-iter (median) | last meta-val accuracy |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"![meta-val accuracy against training time and meta-iterations]({relative})",
    ])
    print(body)
    if results != "none":
        write_section(results, "omniglot-table", "Omniglot 5-way 1-shot: MAML, first-order MAML, Reptile",
                      body)


if __name__ == "__main__":
    fire.Fire({"train": train, "report": report})
