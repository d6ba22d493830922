"""Side-by-side comparison: train each algorithm at each shot count, score all on the same tasks."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from diffopt.checkpoint import write_json
from diffopt.config import resolve_config
from diffopt.data import get_dataset
from diffopt.evaluate import EVAL_SEED, evaluate, mean_ci95
from diffopt.train import train


@dataclass(frozen=True)
class Row:
    algorithm: str
    shots: int
    seconds_per_iteration: float
    scores: dict[int, list[float]]
    """inner steps -> per-task scores on the shared evaluation tasks."""
    run_dir: str


def compare(
    *,
    dataset: str,
    algorithms: Sequence[str],
    shots: Sequence[int],
    iterations: int,
    eval_tasks: int,
    eval_steps: Sequence[int],
    eval_test_shots: int,
    seed: int,
    eval_seed: int = EVAL_SEED,
    out: Path,
    progress: bool = True,
) -> list[Row]:
    """Train every (algorithm, shots) pair with the same seed and budget, then evaluate each on
    the same ``eval_tasks`` held-out tasks. Writes ``out/results.json`` and ``out/report.md``.
    """
    spec = get_dataset(dataset)
    configs = [  # validate the whole grid before any training starts
        resolve_config(algorithm=algorithm, dataset=dataset, shots=k, iterations=iterations,
                       seed=seed, run_dir=str(out / f"{algorithm}-k{k}"), progress=progress)
        for k in shots for algorithm in algorithms
    ]
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for config in configs:
        result = train(config)
        evaluation = evaluate(
            result.algorithm, spec, shots=config.shots, test_shots=eval_test_shots,
            tasks=eval_tasks, steps=eval_steps, seed=eval_seed, device=config.device,
        )
        rows.append(Row(config.algorithm, config.shots, result.seconds_per_iteration,
                        {s: v.tolist() for s, v in evaluation.scores.items()}, str(result.run_dir)))
        if progress:
            print(f"done: {config.algorithm} K={config.shots}", flush=True)
    table = format_table(rows, spec.metric, eval_steps)
    write_json(out / "results.json", {
        "dataset": dataset, "metric": spec.metric, "iterations": iterations, "seed": seed,
        "eval_seed": eval_seed, "eval_tasks": eval_tasks, "eval_test_shots": eval_test_shots,
        "rows": [row.__dict__ for row in rows],
    })
    (out / "report.md").write_text(
        f"# {dataset}: {', '.join(algorithms)}\n\n"
        f"{iterations} meta-iterations each, seed {seed}; {spec.metric} on the query set of "
        f"{eval_tasks} held-out tasks (evaluation seed {eval_seed}, {eval_test_shots} query "
        f"points), mean +- 95% interval; written {time.strftime('%Y-%m-%d %H:%M')}.\n\n"
        f"{table}\n"
    )
    return rows


def format_table(rows: Sequence[Row], metric: str, steps: Sequence[int]) -> str:
    """Markdown table: one row per (algorithm, shots), one column per number of inner steps."""
    steps = sorted(set(steps))
    header = ["algorithm", "K"] + [f"{metric} after {s} step{'s' * (s != 1)}" for s in steps]
    header.append("s / meta-iter")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row.algorithm, str(row.shots)]
        for s in steps:
            mean, ci = mean_ci95(row.scores[s])
            cells.append(f"{mean:.3f} +- {ci:.3f}")
        cells.append(f"{row.seconds_per_iteration:.4f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
