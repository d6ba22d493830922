"""The comparison's figures (matplotlib, PNG): learning curves, final scores, sinusoid fits.

Everything is drawn from a comparison folder: ``results.json`` and the runs' own
validation logs and checkpoints.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffopt.evaluate import student_t_ci95
from diffopt.runfolder import RunFolder


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _validation(out: Path, run: str) -> list[dict]:
    return RunFolder(out / "runs" / run, writer=False).validation()


def learning_curves(out: Path, results: Mapping[str, Any], path: Path) -> Path | None:
    """A comparison's validation curves (``validation_curves``), one line per (configuration, K);
    None when no run validated."""
    groups: dict[str, list[list[dict]]] = {}
    for run in results["runs"]:
        records = _validation(out, run["run"])
        if records:
            groups.setdefault(f"{run['label']} K={run['shots']}", []).append(records)
    if not groups:
        return None
    return validation_curves(groups, results["metric"], path, lower_is_better=results["lower_is_better"],
                             title=f"{results['dataset']}: learning curves (mean over seeds, 95% interval)")


def _after(steps: int) -> str:
    return f"after {steps} inner step{'s' * (steps != 1)}"


def curve_labels(groups: Mapping[str, Sequence[Sequence[Mapping[str, Any]]]]) -> tuple[dict[str, str], str]:
    """(line label -> legend entry, y-axis wording): where lines were validated after different
    numbers of inner steps, each legend entry says after how many."""
    steps = {name: seeds[0][0]["steps"] for name, seeds in groups.items()}
    if len(set(steps.values())) == 1:
        return {name: name for name in groups}, _after(next(iter(steps.values())))
    legend = {name: f"{name} ({_after(k)})" for name, k in steps.items()}
    return legend, "after the inner steps in each legend"


def validation_curves(groups: Mapping[str, Sequence[Sequence[Mapping[str, Any]]]], metric: str, path: Path,
                      *, title: str, lower_is_better: bool = False, percent: bool = False,
                      log_iterations: bool = False) -> Path:
    """Validation metric against meta-iterations and against training time (minutes beyond ten).

    ``groups``: line label -> one ``validation.jsonl`` record list per seed. Each line is the
    mean over seeds, shaded by the 95% interval across seeds (one seed: across the validation
    tasks). ``percent`` plots a fraction as a percentage; ``log_iterations`` a symmetric-log
    iteration axis.
    """
    scale = 100.0 if percent else 1.0
    longest = max(r["train_seconds"] for seeds in groups.values() for records in seeds for r in records)
    per_unit, unit = (60.0, "minutes") if longest > 600 else (1.0, "s")
    labels, after = curve_labels(groups)
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for name, seeds in groups.items():
        length = min(len(records) for records in seeds)  # validation k of every seed
        values = scale * np.array([[r[metric] for r in records[:length]] for records in seeds])
        iterations = np.mean([[r["iteration"] for r in records[:length]] for records in seeds], 0)
        seconds = np.mean([[r["train_seconds"] for r in records[:length]] for records in seeds], 0)
        with np.errstate(invalid="ignore", over="ignore"):  # diverged validations are inf / NaN
            mean = values.mean(0)
            if len(seeds) > 1:
                band = np.array([student_t_ci95(values[:, i]) for i in range(length)])
            else:
                band = scale * np.array([r["ci95"] for r in seeds[0][:length]])
        for axis, x in zip(axes, (iterations, seconds / per_unit), strict=True):
            (line,) = axis.plot(x, mean, marker="o", markersize=2.5, label=labels[name])
            axis.fill_between(x, mean - band, mean + band, alpha=0.15, color=line.get_color())
    axes[0].set_xlabel("meta-iterations")
    axes[1].set_xlabel(f"training time ({unit})")
    if log_iterations:
        axes[0].set_xscale("symlog", linthresh=50)
        axes[0].set_xlim(left=0)
    axes[0].set_ylabel(f"validation {metric}{' (%)' if percent else ''} {after}")
    if lower_is_better:  # diverging validations (a rule run past the steps it learned) leave the
        # axis rather than squash every other curve
        starts = [seeds[0][0][metric] for seeds in groups.values()]
        finite = [value for value in starts if math.isfinite(value)]  # a run may diverge at once
        for axis in axes if finite else ():  # nothing finite to draw: the axes stay linear
            axis.set_yscale("log")
            axis.set_ylim(top=3 * scale * max(max(finite), 1e-12))
    for axis in axes:
        axis.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def final_scores(results: Mapping[str, Any], rows: Sequence[Any], path: Path) -> Path:
    """Bar charts of the held-out metric, one panel per number of evaluation steps (> 0), one
    group per K; a configuration that diverged on some task is marked instead of drawn."""
    plt = _pyplot()
    steps = [s for s in results["evaluation"]["steps"] if s > 0] or results["evaluation"]["steps"]
    shots = sorted({row.shots for row in rows})
    labels = list(dict.fromkeys(row.label for row in rows))
    width = 0.8 / len(labels)
    fig, axes = plt.subplots(1, len(steps), squeeze=False,
                             figsize=(max(6.0, 2 + 0.7 * len(labels) * len(shots) * len(steps)), 4.5))
    for axis, step in zip(axes[0], steps, strict=True):
        for i, label in enumerate(labels):
            picked = {row.shots: row for row in rows if row.label == label}
            x = [shots.index(k) + (i - (len(labels) - 1) / 2) * width for k in picked]
            good = [not picked[k].diverged[step] for k in picked]
            heights = [picked[k].mean[step] if ok else 0.0 for k, ok in zip(picked, good, strict=True)]
            errors = [picked[k].ci95_seeds[step] if not math.isnan(picked[k].ci95_seeds[step])
                      else picked[k].ci95_tasks[step] for k in picked]
            errors = [e if ok else 0.0 for e, ok in zip(errors, good, strict=True)]
            bars = axis.bar(x, heights, width, yerr=errors, capsize=3, label=label)
            for bar, ok in zip(bars, good, strict=True):
                if not ok:
                    axis.annotate("diverges", (bar.get_x() + bar.get_width() / 2, 0), rotation=90,
                                  ha="center", va="bottom", fontsize=7, color=bar.get_facecolor())
        axis.set_xticks(range(len(shots)), [f"K = {k}" for k in shots])
        axis.set_ylabel(f"{results['metric']} after {step} step{'s' * (step > 1)}")
        axis.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    spread = "across seeds" if len(results["seeds"]) > 1 else "across tasks (one seed)"
    fig.suptitle(f"{results['dataset']}: held-out {results['metric']}, 95% interval {spread}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def sinusoid_task(seed: int, shots: int, test_shots: int = 10, index: int = 0):
    """Held-out task ``index`` of the evaluation stream ``seed``: (support x [K, 1], support y
    [K, 1], true function x -> y) as numpy, the function from torchmeta's amplitude and phase."""
    from diffopt.data import get_dataset

    loader = get_dataset("sinusoid").loader("test", seed=seed, shots=shots, test_shots=test_shots,
                                            batch_size=1, num_tasks=index + 1)
    batch = list(loader)[index]
    amplitude, phase = loader.dataset.amplitudes[index], loader.dataset.phases[index]
    x, y = (t[0].numpy() for t in batch["train"])
    return x, y, lambda grid: amplitude * np.sin(grid - phase)


def sinusoid_fits(out: Path, results: Mapping[str, Any], path: Path, steps: Sequence[int] = (1, 10)) -> Path:
    """Finn et al.'s figure 2 for every configuration: the true function of one held-out task,
    its K support points, and the prediction before adaptation and after ``steps`` inner steps
    (first K and first seed of the comparison)."""
    from diffopt.train import load_trained

    plt = _pyplot()
    k, seed = results["shots"][0], results["seeds"][0]
    x, y, truth = sinusoid_task(results["evaluation"]["seed"], k)
    grid = np.linspace(-5, 5, 200)
    labels = list(results["configs"])
    columns = min(3, len(labels))
    rows = math.ceil(len(labels) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.5 * columns, 3.4 * rows), squeeze=False,
                             sharex=True, sharey=True)
    for axis, label in zip(axes.flat, labels, strict=False):
        _, algorithm, _ = load_trained(out / "runs" / f"{label}-k{k}-seed{seed}")
        dtype = next(algorithm.parameters()).dtype
        support = [torch.as_tensor(v, dtype=dtype) for v in (x, y)]
        query = torch.as_tensor(grid[:, None], dtype=dtype)
        axis.plot(grid, truth(grid), color="red", label="ground truth")
        for step, fmodel in enumerate(algorithm.unroll(*support, steps=max(steps))):
            if step == 0 or step in steps:
                with torch.no_grad():
                    prediction = fmodel(query).squeeze(-1).numpy()
                axis.plot(grid, prediction, linestyle=":" if step == 0 else "-",
                          label="before adaptation" if step == 0 else f"after {step} step{'s' * (step > 1)}")
        axis.scatter(x[:, 0], y[:, 0], marker="^", color="black", zorder=3, label=f"{k} support points")
        axis.set_title(label)
        axis.grid(alpha=0.3)
    for axis in list(axes.flat)[len(labels):]:
        axis.set_visible(False)
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"One held-out sinusoid task (K = {k}, seed {seed})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def comparison_figures(out: Path, results: Mapping[str, Any], rows: Sequence[Any]) -> list[tuple[str, Path]]:
    """Every figure of a comparison folder, as (title, path)."""
    figures = []
    curves = learning_curves(out, results, out / "learning_curves.png")
    if curves is not None:
        figures.append(("learning curves", curves))
    figures.append(("final scores", final_scores(results, rows, out / "final_scores.png")))
    if results["dataset"] == "sinusoid":
        figures.append(("sinusoid fits", sinusoid_fits(out, results, out / "sinusoid_fits.png")))
    return figures

