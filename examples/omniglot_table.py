"""Omniglot tables: every run under one wall-clock budget, scored on the same test tasks.

    python examples/omniglot_table.py train                 # the methods table, two runs at a time
    python examples/omniglot_table.py report                # 600 test tasks each; table + plot
    python examples/omniglot_table.py train --table goal    # 95% in 35 minutes, lever by lever
    python examples/omniglot_table.py report --table goal

The tables (``TABLES``), 5-way unless said:

- ``methods``: MAML, first-order MAML, Reptile and the MAML++ recipe, 1-shot and 5-shot, each
  with its original code's Omniglot settings (``diffopt.data``'s defaults; MAML++'s flags from
  docs/protocols.md, section 4), ``--parallel 2`` runs side by side on one torch thread each, so
  machine load hits all alike;
- ``goal``: 1-shot towards 95% in 35 minutes (``--budget 2100``), one row per lever, each row the
  previous one plus its lever;
- ``family``: ANIL, BOIL and iMAML at the methods table's budget;
- ``paper``: two hours each, MAML with every lever and a cosine meta-step, Reptile 5-shot and
  1-shot with its paper's protocol, each with a test-accuracy curve from snapshots kept every 10
  minutes and the minutes to 95, 97 and 98% read off it;
- ``horizon``: 25 inner steps, exact and approximate meta-gradients;
- ``twenty``: 20-way 1-shot MAML and Reptile with their papers' 20-way protocols.

``train`` starts ``diffopt train`` processes with ``--max_seconds BUDGET`` of training time
(validation on ``--validation_tasks`` meta-val tasks every ``--validate_every`` seconds, excluded
from the budget) and a checkpoint every 100 meta-iterations. Re-running it resumes unfinished
runs and skips finished ones. ``report`` scores every run on the same test tasks (evaluation
seed 2017, 15 query images per class) transductively (batch statistics over the query set, as
MAML) and, for the methods, family, paper and twenty tables, non-transductively too (each query
image with the support set alone, the Reptile paper's protocol), after the method's evaluation
steps (Reptile: on mini-batches of its --eval-batch), and plots the validation accuracy against
training time and meta-iterations.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import numpy as np
import torch

from diffopt.atomic import write_json
from diffopt.data import get_dataset
from diffopt.evaluate import EVAL_SEED, evaluate, mean_ci95
from diffopt.firecli import fire_checked
from diffopt.plots import validation_curves
from diffopt.report import library_versions, machine_description, write_section
from diffopt.runfolder import RunFolder, load_checkpoint
from diffopt.train import load_trained

MAMLPP = dict(
    algorithm="maml", inner_optimizer="lslr", inner_lr=0.1, inner_steps=5, norm="per_step_batch",
    norm_eps=1e-5, inner_loss_reduction="mean", inner_params="all", head="flatten", init="glorot",
    pool=True, activation="leaky_relu",
    meta_batch_size=8, test_shots=1, epochs=100, multi_step_loss_epochs=10, meta_lr_schedule="cosine",
    meta_lr_final=1e-5)
"""MAML++ on Omniglot (HowToTrainYourMAMLPytorch's omniglot_maml++ config, docs/protocols.md
section 4): LSLR from 0.1, 5 inner steps, per-step batch norm, mean loss, meta-batch 8, one query
image per class, 100 epochs (here: 1/100 of the budget each, ``--epochs``) with the multi-step
loss over the first 10, cosine annealing to 1e-5. Its released
configs use second order from the start (no derivative-order annealing). Their model: stride-1
convolutions with 2x2 max-pooling and leaky ReLU (protocols.md, difference 19)."""


@dataclass(frozen=True)
class Method:
    label: str
    flags: dict
    """``diffopt train`` options besides the dataset, shots, budget and run folder."""
    eval_steps: int
    """Inner steps before scoring a test task (the paper's)."""
    paper: dict = field(default_factory=dict)
    """shots -> (transductive, non-transductive) published accuracy, '-' where none."""
    eval_options: dict = field(default_factory=dict)
    """Options of the test-time adaptation besides the training's (Reptile: its --eval-batch)."""
    curve_transductive: bool = True
    """How the paper table's test curve scores the method: as its paper's headline number does
    (Reptile's: non-transductive)."""


METHODS = {
    "maml": Method("MAML", dict(algorithm="maml"), 10,
                   {1: ("98.7 +- 0.4", "-"), 5: ("99.9 +- 0.1", "-")}),  # Finn et al. 2017, table 1
    "fomaml": Method("first-order MAML", dict(algorithm="fomaml"), 10,
                     {1: ("98.3 +- 0.5", "-"), 5: ("99.2 +- 0.2", "-")}),  # Finn et al. 2017, table 1
    "reptile": Method("Reptile", dict(algorithm="reptile"), 50,
                      {1: ("97.97", "95.32"), 5: ("99.48", "98.90")},  # Nichol et al. 2018, table 1
                      {"inner_batch_size": 5}, curve_transductive=False),  # README: --eval-batch 5
    "mamlpp": Method("MAML++ recipe", MAMLPP, 5,
                     {1: ("99.47", "-"), 5: ("99.85", "-")}),  # Antoniou et al. 2019, table 1
}

FAMILY = {
    # ANIL, BOIL: MAML's Omniglot protocol with the inner loop adapting the head / the body.
    "anil": Method("ANIL", dict(algorithm="anil"), 10),
    "boil": Method("BOIL", dict(algorithm="boil"), 10),
    # imaml_dev's settings (diffopt.data.IMAML_OMNIGLOT); 16 inner steps at test, as its README.
    "imaml": Method("iMAML", dict(algorithm="imaml"), 16, {1: ("99.16 +- 0.35", "-")}),
}
"""The rest of the MAML family, 5-way 1-shot, at the methods table's budget (its MAML row is
their reference); published numbers under the table (``FAMILY_NOTES``)."""


@dataclass(frozen=True)
class Run:
    name: str
    label: str
    method: Method
    shots: int
    extra: dict = field(default_factory=dict)
    """Options on top of the method's (the goal table's levers, cumulative)."""
    ways: int = 5
    threads: int | None = None
    """Torch threads of a run that has the machine to itself (``train`` starts it alone); None: the
    ``train`` command's ``threads``, ``parallel`` runs at a time."""

    def flags(self) -> dict:
        return {**self.method.flags, **self.extra, "shots": self.shots,
                **({"ways": self.ways} if self.ways != 5 else {})}


GOAL_LEVERS: list[tuple[str, str, dict]] = [
    ("cbfinn", "MAML as cbfinn/maml (diffopt's defaults)", {}),
    ("mean-loss", "+ inner step on the mean loss (a 5x smaller step)", {"inner_loss_reduction": "mean"}),
    ("torch-init", "+ torch's initialisation, the last map flattened (256 features)",
     {"init": "torch", "head": "flatten"}),
    ("affine-norm", "+ batch norm with a scale, eps 1e-5, adapted in the inner loop",
     {"norm": "batch", "norm_eps": 1e-5, "inner_params": "all"}),
    ("queries", "+ 15 query images per class, meta-batch 8", {"test_shots": 15, "meta_batch_size": 8}),
]
"""The goal table: (name, what the row adds, its options); each row has every earlier row's
options too, and all run one torch thread each, two side by side (``--parallel 2``)."""


def _goal_runs() -> list[Run]:
    runs, options = [], {}
    for name, label, extra in GOAL_LEVERS:
        options = {**options, **extra}
        runs.append(Run(f"goal-{name}", label, METHODS["maml"], 1, dict(options)))
    return runs


GOAL_RECIPE = {k: v for _, _, lever in GOAL_LEVERS for k, v in lever.items()}
"""The goal table's last row: every lever."""

PAPER_MAML = {**GOAL_RECIPE, "meta_lr_schedule": "cosine", "meta_lr_final": 1e-5}
"""The paper table's MAML recipe: the goal table's last row with a cosine meta-step."""

PAPER_MAML_LSLR = {**PAPER_MAML, "inner_optimizer": "lslr", "class_split": "vinyals_trainval"}
"""The paper table's MAML recipe with learned per-tensor step sizes (MAML++'s LSLR), meta-trained on
Vinyals' training and validation characters (1200)."""

PAPER_RUNS = [
    Run("paper-maml-1shot", "MAML, the goal recipe with a cosine meta-step to 1e-5", METHODS["maml"], 1,
        PAPER_MAML),
    Run("paper-maml-lslr-1shot", "MAML, as above with LSLR step sizes and 1200 training characters",
        METHODS["maml"], 1, PAPER_MAML_LSLR),
    Run("paper-maml-lslr-1shot-2threads", "MAML, as above on two torch threads (the machine to itself)",
        METHODS["maml"], 1, PAPER_MAML_LSLR, threads=2),
    Run("paper-reptile-5shot", "Reptile, its paper's protocol", METHODS["reptile"], 5),
    Run("paper-reptile-1shot", "Reptile, its paper's protocol", METHODS["reptile"], 1),
]
"""The paper-level table, two hours each: MAML with the goal table's last row (every lever), its
outer learning rate annealed over the budget (``--meta_lr_schedule cosine``), towards its paper's
98.7%, and the same with learned per-tensor step sizes (MAML++'s LSLR) meta-trained on Vinyals'
training and validation characters (1200, as many as MAML's paper), on one thread beside another
run and on two threads alone (1.6x the meta-iterations); Reptile with its paper's
protocol (supervised-reptile's settings, diffopt's defaults), 5-shot towards Reptile-Pytorch's
98.10 and the paper's 98.90 non-transductive, 1-shot beside. The side-by-side references of the
MAML rows: ``benchmarks/time_to_accuracy.py --methods maml-paper`` and ``maml-paper-lslr`` (with
``--threads 2`` for the two-thread row)."""

TWENTY_WAY = {
    # Finn et al. 2017, appendix A.1 and table 1: 20-way, meta-batch 16, 5 inner steps of 0.1
    "maml": Method("MAML", dict(algorithm="maml", meta_batch_size=16, inner_lr=0.1, inner_steps=5), 10,
                   {1: ("95.8 +- 0.3", "-")}),
    # Nichol et al. 2018, table 1 and the supervised-reptile README's 20-way commands: mini-batches
    # of 20, 10 inner steps of 0.0005; at test mini-batches of 10
    "reptile": Method("Reptile", dict(algorithm="reptile", inner_batch_size=20, inner_steps=10,
                                      inner_lr=0.0005), 50, {1: ("89.43 +- 0.14", "88.14 +- 0.15")},
                      {"inner_batch_size": 10}, curve_transductive=False),
}
"""Omniglot 20-way 1-shot with each paper's 20-way protocol (docs/guide.md's commands)."""

FAMILY_NOTES = [
    "- Meta-step memory: the largest growth of the resident set during a meta-step over what the "
    "process held before it (diffopt.memory.StepMemory), over the run. MAML, same budget and "
    "tasks: the methods table above (its runs predate the batch-norm speed-up; "
    "`python benchmarks/partial_inner_loop.py` measures ANIL's and BOIL's meta-step against "
    "MAML's on today's code, BENCHMARKS.md).",
    "- Published numbers, none in this setting but iMAML's: ANIL (Raghu et al. 2020, table 2) "
    "Omniglot 20-way 1-shot 96.2 +- 0.5 (MAML 93.7 +- 0.7), Mini-ImageNet 5-way 1-shot 46.7 +- "
    "0.4 (MAML 46.9 +- 0.2); BOIL (Oh et al. 2021, table 2, 4conv) Mini-ImageNet 5-way 1-shot "
    "49.61 +- 0.16, 5-shot 66.45 +- 0.37, no Omniglot; iMAML (Rajeswaran et al. 2019, table 2, "
    "the GD variant, 16 inner steps, lambda 2) Omniglot 5-way 1-shot 99.16 +- 0.35, Mini-ImageNet "
    "5-way 1-shot 49.30 +- 1.88. Their budgets: tens of thousands of meta-iterations on a GPU.",
    "- iMAML follows the paper where its released code differs (the proximal term in every inner "
    "step, the undamped linear system, the proximal term at test time too): docs/protocols.md "
    "section 6.",
]
"""Lines under the family table: what its columns mean and the published numbers."""

HORIZON_NOTES = [
    "- Meta-step memory: as in the family table (diffopt.memory.StepMemory). The exact 25-step runs "
    "keep about sqrt(25) = 5 steps' graphs at a time (`--inner_checkpoint auto`); the plain unroll "
    "would keep all 25.",
]
NOTES = {"family": FAMILY_NOTES, "horizon": HORIZON_NOTES}
"""Lines under a table, by table."""

LONG = dict(inner_steps=25)
HORIZON_RUNS = [
    Run("horizon-maml-1step", "MAML, 1 inner step (the goal recipe)", METHODS["maml"], 1, GOAL_RECIPE),
    Run("horizon-mamlpp-5step", "MAML++ recipe, 5 inner steps", METHODS["mamlpp"], 1),
    Run("horizon-maml-25step-exact", "MAML, 25 steps, exact meta-gradient (checkpointed)",
        Method("MAML", dict(algorithm="maml"), 25), 1, {**GOAL_RECIPE, **LONG, "inner_checkpoint": "auto"}),
    Run("horizon-maml-25step-last5", "MAML, 25 steps, the last 5 differentiated (truncated)",
        Method("MAML", dict(algorithm="maml"), 25), 1, {**GOAL_RECIPE, **LONG, "inner_backprop_steps": 5}),
    Run("horizon-fomaml-25step", "first-order MAML, 25 steps", Method("first-order MAML",
        dict(algorithm="fomaml"), 25), 1, {**GOAL_RECIPE, **LONG}),
    Run("horizon-mamlpp-25step-exact", "MAML++ recipe, 25 steps, exact meta-gradient (checkpointed)",
        Method("MAML++ recipe", MAMLPP, 25), 1, {**LONG, "inner_checkpoint": "auto"}),
]
"""The horizon table (issue 27): 25 inner steps, the exact meta-gradient against its approximations,
beside the 1- and 5-step protocols, 5-way 1-shot, every run under the same training-time budget;
scored after as many inner steps as each was trained with (1-step MAML: its protocol's 10)."""

BUDGETS = {"methods": 1200.0, "goal": 2100.0, "family": 1200.0, "paper": 7200.0, "horizon": 900.0,
           "twenty": 1200.0}
SNAPSHOT_EVERY = {"paper": 600.0}
"""Seconds of training time between kept checkpoints, by table: ``report`` scores each on the test
tasks for a curve of test accuracy against training time."""
TABLES = {
    "methods": [Run(f"{key}-{shots}shot", method.label, method, shots)
                for shots in (1, 5) for key, method in METHODS.items()],
    "goal": _goal_runs(),
    "family": [Run(f"{key}-1shot", method.label, method, 1) for key, method in FAMILY.items()],
    "paper": PAPER_RUNS,
    "horizon": HORIZON_RUNS,
    "twenty": [Run(f"{key}-20way-1shot", method.label, method, 1, ways=20)
               for key, method in TWENTY_WAY.items()],
}


def _runs(table: str, runs) -> list[Run]:
    if table not in TABLES:
        raise SystemExit(f"unknown table {table!r}; choose from {', '.join(TABLES)}")
    chosen = TABLES[table]
    if runs is None:
        return chosen
    names = tuple(runs.split(",")) if isinstance(runs, str) else tuple(runs)
    unknown = sorted(set(names) - {run.name for run in chosen})
    if unknown:
        raise SystemExit(f"unknown run {unknown[0]!r} in table {table}; choose from "
                         f"{', '.join(run.name for run in chosen)}")
    by_name = {run.name: run for run in chosen}
    return [by_name[name] for name in dict.fromkeys(names)]  # in the order named


def _command(run: Run, folder: Path, budget: float, data_root: str, seed: int, validate_every: float,
             validation_tasks: int, snapshot_every: float | None) -> list[str]:
    if RunFolder(folder).has_checkpoint():
        return ["train", "--resume", str(folder)]
    args = ["train", "--dataset", "omniglot", "--data_root", data_root, "--iterations", "1000000",
            "--max_seconds", str(budget), "--seed", str(seed), "--validate_every_seconds",
            str(validate_every), "--checkpoint_every", "100", "--validation_tasks", str(validation_tasks),
            "--run_dir", str(folder)]
    if snapshot_every is not None:
        args += ["--snapshot_every_seconds", str(snapshot_every)]
    for key, value in run.flags().items():
        args += [f"--{key}", ",".join(map(str, value)) if isinstance(value, tuple) else str(value)]
    return args


def thread_environment(threads: int) -> dict[str, str]:
    """A child process's environment with ``threads`` OpenMP and MKL threads (torch's intra-op
    pool) and unbuffered output, so its log shows each line as it is written."""
    return dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")


def train(
    table: str = "methods",
    budget: float | None = None,
    runs=None,
    parallel: int = 2,
    threads: int = 1,
    validate_every: float = 120.0,
    out: str | None = None,
    data_root: str = "data",
    seed: int = 0,
    validation_tasks: int = 100,
    snapshot_every: float | None = None,
) -> None:
    """Meta-train the table's runs for ``budget`` seconds of training time each (default
    ``BUDGETS``: 20 minutes for the methods, 35 for the goal), ``parallel``
    at a time with ``threads`` torch threads each; ``snapshot_every``: seconds of training between
    kept checkpoints (default ``SNAPSHOT_EVERY``: the paper table's curves)."""
    chosen = _runs(table, runs)
    budget = BUDGETS[table] if budget is None else budget
    out_path = Path(out or f"runs/omniglot-{table}")
    out_path.mkdir(parents=True, exist_ok=True)
    pending = []
    for run in chosen:
        folder = out_path / run.name
        if RunFolder(folder).has_checkpoint() and load_checkpoint(folder)["train_seconds"] >= budget:
            print(f"{run.name}: finished")
            continue
        pending.append(run)
    running: dict[str, tuple[subprocess.Popen, IO, Run]] = {}  # run -> (process, its log, run)
    failed = []
    while pending or running:
        while pending and len(running) < parallel:
            if running and any(run.threads for run in (pending[0], *(r for _, _, r in running.values()))):
                break  # a run with threads of its own has the machine to itself
            run = pending.pop(0)
            folder = out_path / run.name
            count = run.threads or threads
            args = _command(run, folder, budget, data_root, seed, validate_every, validation_tasks,
                            snapshot_every or SNAPSHOT_EVERY.get(table))
            log = open(out_path / f"{run.name}.log", "a")
            print(f"{run.name}: training ({count} thread{'s' * (count != 1)})", flush=True)
            running[run.name] = (subprocess.Popen(
                [sys.executable, "-m", "diffopt", *args, "--progress", "False"],
                env=thread_environment(count), stdout=log, stderr=subprocess.STDOUT), log, run)
        time.sleep(1.0)
        for name, (process, log, _) in list(running.items()):
            if process.poll() is not None:
                del running[name]
                log.close()
                if process.returncode != 0:
                    failed.append(name)
    if failed:
        raise SystemExit(f"{', '.join(failed)} failed; see {out_path}/<run>.log")


def _scores(folder: Path, steps: int, tasks: int, transductive: bool, iteration: int,
            eval_options: dict | None = None, checkpoint: Path | None = None) -> np.ndarray:
    """Per-task test accuracy after ``steps`` inner steps (with ``eval_options``), cached in the
    run folder for the checkpoint at ``iteration`` (the model is loaded only to fill the cache);
    ``checkpoint``: a snapshot of the run rather than its last checkpoint."""
    options = "".join(f"-{key}{value}" for key, value in sorted((eval_options or {}).items()))
    mode = "trans" if transductive else "nontrans"
    cache = folder / f"test-{tasks}-steps{steps}-{mode}{options}.json"
    if checkpoint is not None:
        cache = cache.with_name(f"{cache.stem}-at{iteration}.json")
    if cache.exists():
        saved = json.loads(cache.read_text())
        if saved["iteration"] == iteration:
            return np.asarray(saved["scores"])
    config, algorithm, payload = load_trained(checkpoint or folder, **(eval_options or {}))
    spec = get_dataset("omniglot")
    evaluation = evaluate(algorithm, spec, shots=config.shots, test_shots=spec.eval_test_shots,
                          ways=config.ways, tasks=tasks, steps=(steps,), **config.data_options(),
                          transductive=transductive)
    write_json(cache, {"iteration": payload["iteration"], "scores": evaluation.scores[steps].tolist()})
    return evaluation.scores[steps]


def _test_curve(run: Run, folder: Path, tasks: int) -> list[tuple[float, float]]:
    """(training seconds, test accuracy) at each snapshot of the run and at its end, on the first
    ``tasks`` test tasks, scored as the method's paper scores (``Method.curve_transductive``)."""
    points = []
    for snapshot in RunFolder(folder, writer=False).snapshots():
        payload = load_checkpoint(snapshot)
        scores = _scores(folder, run.method.eval_steps, tasks, run.method.curve_transductive,
                         payload["iteration"], run.method.eval_options, snapshot)
        points.append((float(payload["train_seconds"]), float(np.mean(scores))))
    return points


def time_to(curve: list[tuple[float, float]], target: float, chance: float) -> float | None:
    """Training seconds at which ``curve`` first reaches ``target`` accuracy, linear between its
    points (from ``chance`` at 0 s); None if it never does."""
    previous = (0.0, chance)
    for seconds, accuracy in curve:
        if accuracy >= target:
            t0, a0 = previous
            return seconds if accuracy == a0 else t0 + (seconds - t0) * (target - a0) / (accuracy - a0)
        previous = (seconds, accuracy)
    return None


TARGETS = (0.95, 0.97, 0.98)
"""The accuracies whose training time the paper table reads off its test curves."""


def plot_test_curves(curves: dict[str, list[tuple[float, float]]], path: Path, title: str) -> None:
    """Test accuracy (%) against training minutes, one line per run, the ``TARGETS`` dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(7, 4.5))
    for label, curve in curves.items():
        axis.plot([s / 60 for s, _ in curve], [100 * a for _, a in curve], marker="o", markersize=3,
                  label=label)
    for target in TARGETS:
        axis.axhline(100 * target, color="grey", linestyle=":", linewidth=0.8)
    axis.set_xlabel("training time (minutes)")
    axis.set_ylabel("test accuracy (%)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _interval(scores: np.ndarray) -> str:
    mean, ci = mean_ci95(np.asarray(scores) * 100)
    return f"{mean:.2f} +- {ci:.2f}"


TITLES = {"methods": "Omniglot 5-way: MAML, first-order MAML, Reptile, MAML++ recipe",
          "family": "Omniglot 5-way 1-shot: ANIL, BOIL, iMAML",
          "goal": "Omniglot 5-way 1-shot: 95% in 35 minutes, lever by lever",
          "paper": "Omniglot 5-way: towards the papers in two hours",
          "horizon": "Omniglot 5-way 1-shot: 25 inner steps, exact and approximate meta-gradients",
          "twenty": "Omniglot 20-way 1-shot: MAML and Reptile with their papers' 20-way protocols"}


def report(
    table: str = "methods",
    runs=None,
    tasks: int = 600,
    out: str | None = None,
    results: str = "RESULTS.md",
    plot: str | None = None,
    curve_tasks: int = 200,
) -> None:
    """Evaluate every run on the same test tasks; write the table and the plot (the paper table:
    also each snapshot on the first ``curve_tasks`` tasks, the last point on all ``tasks``, and
    the training minutes to 95, 97 and 98% read off that curve)."""
    chosen = _runs(table, runs)
    out_path = Path(out or f"runs/omniglot-{table}")
    plot_path = Path(plot or f"docs/figures/omniglot-{table}.png")
    torch.set_num_threads(1)
    both = table in ("methods", "family", "paper", "twenty")
    memory = table in ("family", "horizon")
    timed = table == "paper"  # test curves from the runs' snapshots
    rows, curves, tests = [], {}, {}
    for run in chosen:
        folder = out_path / run.name
        payload = load_checkpoint(folder)
        metrics, validation = RunFolder(folder).metrics(), RunFolder(folder).validation()
        if validation:  # a run trained beside its reference (time_to_accuracy.py) validates not
            curves[f"{run.label}, {run.shots}-shot" if both else run.label] = [validation]
        steps, options = run.method.eval_steps, run.method.eval_options
        transductive = _scores(folder, steps, tasks, True, payload["iteration"], options)
        paper = run.method.paper.get(run.shots, ("-", "-"))
        cells = [run.label, str(run.shots), _interval(transductive)]
        if both:
            inductive = _scores(folder, steps, tasks, False, payload["iteration"], options)
            cells += [paper[0], _interval(inductive), paper[1]]
        if timed:
            final = transductive if run.method.curve_transductive else inductive
            curve = _test_curve(run, folder, curve_tasks)
            curve = [*curve, (float(payload["train_seconds"]), float(np.mean(final)))]
            tests[f"{run.label}, {run.shots}-shot"] = curve
            reached = [time_to(curve, target, 1 / run.ways) for target in TARGETS]
            cells.append(" / ".join("-" if t is None else f"{t / 60:.0f}" for t in reached))
        cells += [str(steps), str(payload["iteration"]), f"{payload['train_seconds'] / 60:.1f}",
                  f"{statistics.median(m['seconds'] for m in metrics):.2f}",
                  f"{100 * validation[-1]['accuracy']:.1f}" if validation else "-"]
        if memory:
            cells.append(f"{payload['step_memory_mb']:.0f}")
        rows.append("| " + " | ".join(cells) + " |")
    if curves:
        validation_curves(curves, "accuracy", plot_path, title=TITLES[table], percent=True,
                          log_iterations=True)
    test_plot = plot_path.with_name(f"{plot_path.stem}-test{plot_path.suffix}")
    if timed:
        plot_test_curves(tests, test_plot, TITLES[table])
    head = ["lever" if table == "goal" else "method", "shots", "transductive"]
    if both:
        head += ["paper", "non-transductive", "paper"]
    if timed:
        head.append("minutes to " + " / ".join(f"{100 * t:.0f}" for t in TARGETS) + "%")
    head += ["eval steps", "meta-iterations", "training minutes", "s / meta-iter (median)",
             "last meta-val accuracy"]
    if memory:
        head.append("meta-step memory (MB)")
    relative = os.path.relpath(plot_path, Path(results).parent)
    body = "\n".join([
        f"Commands: `python examples/omniglot_table.py train --table {table}`, then "
        f"`python examples/omniglot_table.py report --table {table}` (runs in `{out_path}`).",
        "",
        f"Test accuracy (%) on the same {tasks} meta-test tasks (evaluation seed {EVAL_SEED}, 15 "
        "query images per class), mean +- 95% interval over tasks; training seed 0. Machine: "
        f"{machine_description()}. {library_versions()}. Written "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
        *rows,
        *(["", *NOTES[table]] if table in NOTES else []),
        "",
        *([f"Test accuracy against training time: each run's snapshots (every "
           f"{SNAPSHOT_EVERY[table] / 60:.0f} minutes of training) on the first {curve_tasks} of these "
           f"tasks, its end on all {tasks}, scored as each paper scores (MAML transductive, Reptile "
           "not); the minutes to each accuracy are read off it, linearly between points.", "",
           f"![test accuracy against training time]({os.path.relpath(test_plot, Path(results).parent)})",
           ""] if timed else []),
        f"![meta-val accuracy against training time and meta-iterations]({relative})",
    ])
    print(body)
    if results != "none":
        write_section(results, f"omniglot-{table}", TITLES[table], body)


if __name__ == "__main__":
    fire_checked({"train": train, "report": report})
