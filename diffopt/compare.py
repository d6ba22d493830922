"""Side-by-side comparison: train each configuration at each shot count, score all on the same tasks.

A configuration is a label and the ``diffopt train`` flags that differ from the defaults, e.g.
``{"meta_sgd": {"algorithm": "maml", "inner_optimizer": "meta_sgd"}}``. Every run uses the same
training seed, budget and evaluation tasks. A run whose ``evaluation.json`` matches its
configuration and evaluation settings is finished and is not run again when the comparison is
re-run; an unfinished one is started afresh.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from diffopt.checkpoint import write_json
from diffopt.config import TrainConfig, resolve_config
from diffopt.data import get_dataset
from diffopt.errors import DiffoptError
from diffopt.evaluate import EVAL_SEED, evaluate, mean_ci95
from diffopt.train import train

EVALUATION_NAME = "evaluation.json"


@dataclass(frozen=True)
class Row:
    label: str
    shots: int
    seconds_per_iteration: float
    scores: dict[int, list[float]]
    """inner steps -> per-task scores on the shared evaluation tasks."""
    run_dir: str
    train_seconds: float
    """Wall time of the training run (evaluation excluded)."""


def compare(
    *,
    dataset: str,
    configs: Mapping[str, Mapping[str, Any]],
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
    """Train every (configuration, shots) pair with the same seed and budget, then evaluate each
    on the same ``eval_tasks`` held-out tasks. Writes ``out/results.json`` and ``out/report.md``.
    """
    out = Path(out)
    spec = get_dataset(dataset)
    runs = [  # validate the whole grid before any training starts
        (label, resolve_config(**{**flags, "dataset": dataset, "shots": k, "iterations": iterations,
                                  "seed": seed, "run_dir": str(out / f"{label}-k{k}"),
                                  "progress": progress}))
        for k in shots for label, flags in configs.items()
    ]
    settings = dict(eval_tasks=eval_tasks, eval_steps=sorted(set(eval_steps)),
                    eval_test_shots=eval_test_shots, eval_seed=eval_seed)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for label, config in runs:
        run_dir = Path(config.run_dir)
        done = _finished(run_dir, config, settings)
        if done is not None:
            rows.append(done)
            if progress:
                print(f"finished before: {label} K={config.shots}", file=sys.stderr, flush=True)
            continue
        if run_dir.exists():
            print(f"restarting unfinished run {run_dir}", file=sys.stderr, flush=True)
            shutil.rmtree(run_dir)
        start = time.perf_counter()
        result = train(config)
        train_seconds = time.perf_counter() - start
        evaluation = evaluate(
            result.algorithm, spec, shots=config.shots, test_shots=eval_test_shots,
            tasks=eval_tasks, steps=eval_steps, seed=eval_seed, device=config.device,
            ways=config.ways, root=config.data_root,
        )
        row = Row(label, config.shots, result.seconds_per_iteration,
                  {s: v.tolist() for s, v in evaluation.scores.items()}, str(run_dir), train_seconds)
        write_json(run_dir / EVALUATION_NAME,
                   {"config": config.to_dict(), "settings": settings, "row": asdict(row)})
        rows.append(row)
        if progress:
            print(f"done: {label} K={config.shots}", file=sys.stderr, flush=True)
    table = format_table(rows, spec.metric, eval_steps)
    write_json(out / "results.json", {
        "dataset": dataset, "metric": spec.metric, "iterations": iterations, "seed": seed,
        "configs": {label: dict(flags) for label, flags in configs.items()}, **settings,
        "rows": [asdict(row) for row in rows],
    })
    (out / "report.md").write_text(
        f"# {dataset}: {', '.join(configs)}\n\n"
        f"{iterations} meta-iterations each, seed {seed}; {spec.metric} on the query set of "
        f"{eval_tasks} held-out tasks (evaluation seed {eval_seed}, {eval_test_shots} query "
        f"points), mean +- 95% interval; written {time.strftime('%Y-%m-%d %H:%M')}.\n\n"
        f"{table}\n"
    )
    return rows


def _finished(run_dir: Path, config: TrainConfig, settings: dict) -> Row | None:
    """The recorded row of a finished run with this config and these settings, else None.

    The recorded config is resolved again, so a run recorded before an option existed counts as
    having used that option's default.
    """
    path = run_dir / EVALUATION_NAME
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    try:
        recorded = resolve_config(**record["config"])
    except (DiffoptError, KeyError, TypeError):
        return None
    if recorded != config or record.get("settings") != settings:
        return None
    row = record["row"]
    row["scores"] = {int(s): v for s, v in row["scores"].items()}
    return Row(**row)


def format_table(rows: Sequence[Row], metric: str, steps: Sequence[int]) -> str:
    """Markdown table: one row per (configuration, shots), one column per number of inner steps."""
    steps = sorted(set(steps))
    header = ["configuration", "K"] + [f"{metric} after {s} step{'s' * (s != 1)}" for s in steps]
    header.append("s / meta-iter")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row.label, str(row.shots)]
        for s in steps:
            mean, ci = mean_ci95(row.scores[s])
            cells.append(f"{mean:.3f} +- {ci:.3f}")
        cells.append(f"{row.seconds_per_iteration:.4f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
