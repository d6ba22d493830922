"""A comparison's results: the table's rows aggregated from ``results.json``'s per-run records,
the markdown table, and ``report.md`` with its figures, all computed from ``results.json`` alone."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from diffopt.atomic import write_text
from diffopt.compare.grid import PER_RUN_OPTIONS
from diffopt.evaluate import mean_ci95, student_t_ci95
from diffopt.firecli import shown
from diffopt.report import machine_description

RESULTS_NAME = "results.json"
"""A comparison folder's record of every run (configs, settings, per-task scores)."""
REPORT_NAME = "report.md"


@dataclass(frozen=True)
class ComparisonRow:
    """One (configuration, K) of the table, aggregated over its seeds."""

    label: str
    shots: int
    seeds: list[int]
    mean: dict[int, float]
    """inner steps -> mean over seeds of the mean score over tasks."""
    ci95_seeds: dict[int, float]
    """inner steps -> 95% interval of that mean across seeds (Student t; NaN for one seed)."""
    ci95_tasks: dict[int, float]
    """inner steps -> 95% interval across tasks of the per-task score averaged over seeds."""
    diverged: dict[int, int]
    """inner steps -> how many of the ``scored`` (seed, task) scores are not finite (the
    statistics are then NaN)."""
    scored: int
    """(seed, task) scores per number of inner steps: seeds x evaluation tasks."""
    iterations: float
    seconds_per_iteration: float
    step_memory_mb: float
    """The most memory a meta-step took above the process's level before it (max over seeds;
    NaN where not measured)."""
    meta_parameters: int
    train_seconds: float
    warnings: list[str]
    """diffopt's warnings while its runs trained and were scored (e.g. iMAML's unsolved inner
    problem), each once."""



def aggregate(runs: Sequence[Mapping[str, Any]]) -> list[ComparisonRow]:
    """The table's rows from the per-run records of ``results.json`` (first-appearance order)."""
    groups: dict[tuple[str, int], list[Mapping[str, Any]]] = {}
    for run in runs:
        groups.setdefault((run["label"], run["shots"]), []).append(run)
    rows = []
    for (label, shots), members in groups.items():
        steps = sorted(int(s) for s in members[0]["scores"])
        mean, ci_seeds, ci_tasks, diverged = {}, {}, {}, {}
        for step in steps:
            table = np.array([run["scores"][str(step)] for run in members], dtype=np.float64)
            diverged[step] = int((~np.isfinite(table)).sum())
            with np.errstate(invalid="ignore", over="ignore"):
                seed_means = table.mean(1)
                mean[step] = float(seed_means.mean())
                ci_seeds[step] = student_t_ci95(seed_means)
                ci_tasks[step] = mean_ci95(table.mean(0))[1]
        rows.append(ComparisonRow(
            label, shots, [run["seed"] for run in members], mean, ci_seeds, ci_tasks, diverged,
            sum(len(run["task_keys"]) for run in members),
            float(np.mean([run["iterations"] for run in members])),
            float(np.median([run["seconds_per_iteration"] for run in members])),
            float(max(run.get("step_memory_mb", math.nan) for run in members)),
            int(members[0]["meta_parameters"]),
            float(np.mean([run["train_seconds"] for run in members])),
            list(dict.fromkeys(w for run in members for w in run.get("warnings", []))),
        ))
    return rows



def differing_settings(resolved: Mapping[str, Mapping[str, Any]]) -> str:
    """Markdown table of every resolved train option whose value differs between configurations
    (label -> resolved config), the per-run ones (folder, seed, K) aside; '' if none differs."""
    labels = list(resolved)
    keys = [key for key in next(iter(resolved.values()), {})
            if key not in (*PER_RUN_OPTIONS, "shots")
            and len({json.dumps(resolved[label].get(key)) for label in labels}) > 1]
    if not keys:
        return ""
    lines = ["| setting | " + " | ".join(labels) + " |", "|" + "---|" * (len(labels) + 1)]
    for key in keys:
        lines.append(f"| {key} | " + " | ".join(shown(resolved[label].get(key)) for label in labels) + " |")
    return "\n".join(lines)



def format_table(rows: Sequence[ComparisonRow], metric: str, steps: Sequence[int]) -> str:
    """Markdown table: one row per (configuration, K); each score is mean +- seeds / +- tasks."""
    steps = sorted(set(steps))
    header = ["configuration", "K", "seeds"]
    header += [f"{metric} after {s} step{'s' * (s != 1)}" for s in steps]
    header += ["meta-iterations", "s / meta-iter", "meta-step memory (MB)", "meta-parameters"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row.label + " (warned)" * bool(row.warnings), str(row.shots), str(len(row.seeds))]
        for s in steps:
            if row.diverged[s]:
                cells.append(f"diverges on {row.diverged[s]} of {row.scored} (seed, task) pairs")
                continue
            seeds = "" if math.isnan(row.ci95_seeds[s]) else f" +- {row.ci95_seeds[s]:.3f}"
            cells.append(f"{row.mean[s]:.3f}{seeds} (tasks +- {row.ci95_tasks[s]:.3f})")
        cells += [f"{row.iterations:.0f}", f"{row.seconds_per_iteration:.4f}",
                  "-" if math.isnan(row.step_memory_mb) else f"{row.step_memory_mb:.0f}",
                  f"{row.meta_parameters:,}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)



def warning_lines(rows: Sequence[ComparisonRow]) -> list[str]:
    """One line per warning of a row: ``label K=k: message`` (the rows marked "(warned)")."""
    return [f"{row.label} K={row.shots}: {warning}" for row in rows for warning in row.warnings]


def _protocol_words(evaluation: Mapping[str, Any]) -> str:
    if evaluation["transductive"]:
        return "transductive: each query set scored as one batch"
    return "non-transductive: each query example scored with the support set alone"



def write_report(out: Path) -> list[ComparisonRow]:
    """``report.md`` and the plots of ``out``, computed from ``out/results.json`` alone."""
    from diffopt import plots

    out = Path(out)
    results = json.loads((out / RESULTS_NAME).read_text())
    rows = aggregate(results["runs"])
    evaluation, budget = results["evaluation"], results["budget"]
    steps = evaluation["steps"]
    metric = results["metric"]
    figures = plots.comparison_figures(out, results, rows)
    if budget.get("max_seconds") is not None:
        budget_text = f"{budget['max_seconds']:g} s of training time per run"
    else:
        budget_text = f"{budget['iterations']} meta-iterations per run"
    if len(results["seeds"]) > 1:
        spread = ("mean over seeds +- the 95% interval across seeds (Student t), and in brackets "
                  "the 95% interval across tasks of the per-task score averaged over seeds")
    else:
        spread = "mean over tasks, in brackets its 95% interval across tasks"
    resolved = results.get("resolved", {})  # absent from comparisons written before it
    by_label = {label: resolved[label] for label in results["configs"] if label in resolved}
    differing = differing_settings(by_label) if len(by_label) > 1 else ""
    lines = [
        f"# {results['dataset']}: {', '.join(results['configs'])}",
        "",
        f"Command: `{results['command']}`" if results["command"] else "",
        "",
        f"{budget_text}; training seeds {', '.join(map(str, results['seeds']))} (every run with "
        f"the same seed meets the same training tasks). {metric} on the query sets of the same "
        f"{evaluation['tasks']} held-out tasks for every run (evaluation seed "
        f"{evaluation['seed']}, {evaluation['test_shots']} query examples, "
        f"{_protocol_words(evaluation)}), after each number of inner steps: {spread}.",
        "",
        f"Machine: {machine_description()}. {results['versions']}. Written "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "",
        format_table(rows, metric, steps),
        "",
        *(["Warnings (the rows marked \"(warned)\"):", "", *[f"- {line}" for line in warned], ""]
          if (warned := warning_lines(rows)) else []),
        "Meta-step memory: the most memory one meta-step (meta-gradient and outer step) took above "
        "what the run's process held before it, the largest over the run and its seeds (resident "
        "set on the CPU, allocated memory on CUDA); seconds per meta-iteration: the median over "
        "the run, data loading included.",
        "",
        "Configurations: " + "; ".join(
            f"`{label}`: " + (", ".join(f"{k}={v}" for k, v in flags.items()) or "defaults")
            for label, flags in results["configs"].items()) + ".",
        "",
        *(["Settings that differ between the configurations (resolved, defaults included):", "",
           differing, ""] if differing else []),
        *([f"Skipped: {'; '.join(f'`{label}` ({why})' for label, why in skipped.items())}.", ""]
          if (skipped := results.get("skipped")) else []),
        *[f"![{title}]({path.relative_to(out)})\n" for title, path in figures],
    ]
    write_text(out / REPORT_NAME, "\n".join(lines).replace("\n\n\n", "\n\n") + "\n")
    return rows

