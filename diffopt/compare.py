"""Side-by-side comparison: a grid of configurations x shot counts x seeds, trained on the same
task streams under the same budget and scored on exactly the same evaluation tasks.

A configuration is a label and the ``diffopt train`` options that differ from the defaults, e.g.
``{"meta_sgd": {"algorithm": "maml", "inner_optimizer": "meta_sgd"}}``. Each (configuration,
K, seed) run is trained and evaluated in a process of its own (so its memory is its own),
in ``OUT/runs/<label>-k<K>-seed<S>``; its ``evaluation.json`` records the config, the settings
and the result. Re-running the comparison skips finished runs, resumes interrupted ones from
their checkpoint, and restarts runs whose configuration changed. The grid's ``results.json``
holds every run's per-task scores; ``report.md`` and the plots are computed from it alone
(``aggregate``), so any table can be recomputed.
"""

from __future__ import annotations

import difflib
import json
import math
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from diffopt.atomic import write_json, write_text
from diffopt.config import TrainConfig, resolve_config, resolve_saved_config
from diffopt.data import get_dataset
from diffopt.errors import DiffoptError
from diffopt.evaluate import EVAL_SEED, mean_ci95, student_t_ci95
from diffopt.firecli import shown, suggestion
from diffopt.progress import progress_bar
from diffopt.report import library_versions, machine_description
from diffopt.runfolder import RunFolder, load_checkpoint, run_folder_lock


@dataclass(frozen=True)
class EvaluationSettings:
    """What every run of a comparison shares besides its configuration."""

    eval_tasks: int
    eval_steps: list[int]
    eval_test_shots: int
    eval_seed: int = EVAL_SEED
    eval_transductive: bool = True
    """Whether each query set is scored as a batch (batch norm's statistics over it) or each
    query example with the support set alone (``evaluate(transductive=...)``)."""


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


GRID_KEYS = ("dataset", "configs", "common", "algorithms", "inner_optimizers", "inner_steps", "shots",
             "ways", "seeds", "iterations", "max_seconds", "eval_tasks", "eval_steps", "eval_test_shots",
             "eval_seed", "eval_transductive", "validate_every", "validation_tasks")
"""What a grid file may set (the same names as ``diffopt compare``'s options, and ``common``:
train options every configuration takes unless it sets them itself)."""

PER_RUN_OPTIONS = ("run_dir", "seed", "progress")
"""Train options a comparison sets per run itself."""


def shared_train_options() -> list[str]:
    """The ``diffopt train`` options a comparison applies to every configuration: all but those
    ``diffopt compare`` has under the same name and ``PER_RUN_OPTIONS``."""
    own = set(GRID_KEYS) | set(PER_RUN_OPTIONS)
    return [f.name for f in fields(TrainConfig) if f.name not in own]


def _check_train_keys(options: Mapping[str, Any], where: str, allowed: Sequence[str]) -> None:
    for key in options:
        if key not in allowed:
            raise DiffoptError(f"unknown train option {key!r} in {where}{suggestion(str(key), allowed)}")


def load_grid_file(path: str | Path) -> dict[str, Any]:
    """A comparison grid from a YAML or JSON file: ``configs`` (label -> train options) and any
    of ``GRID_KEYS``."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise DiffoptError(f"no grid file at {path}")
    try:
        grid = yaml.safe_load(path.read_text())  # JSON is YAML
    except yaml.YAMLError as error:
        raise DiffoptError(f"{path} is not valid YAML or JSON ({str(error).splitlines()[0]})") from None
    if not isinstance(grid, dict):
        raise DiffoptError(f"{path} must hold a mapping of options, e.g. configs: {{maml: {{}}}}")
    unknown = sorted(set(grid) - set(GRID_KEYS))
    if unknown:
        raise DiffoptError(f"unknown key {unknown[0]!r} in {path}; choose from {', '.join(GRID_KEYS)}")
    configs = grid.get("configs", {})
    if not isinstance(configs, dict) or not all(isinstance(v, dict | None) for v in configs.values()):
        raise DiffoptError(f"'configs' in {path} must map labels to train options, e.g. "
                           "lslr: {algorithm: maml, inner_optimizer: lslr}")
    train_options = [f.name for f in fields(TrainConfig) if f.name not in PER_RUN_OPTIONS]
    for label, flags in configs.items():
        _check_train_keys(flags or {}, f"{path}, configs.{label}", train_options)
    if configs:
        grid["configs"] = {str(label): dict(flags or {}) for label, flags in configs.items()}
        products = sorted({"algorithms", "inner_optimizers", "inner_steps"} & set(grid))
        if products:
            raise DiffoptError(f"{path} lists its configs, which {products[0]!r} would replace: set "
                               f"it inside each configuration (e.g. {{algorithm: maml, inner_steps: 5}})")
    common = grid.get("common", {})
    if not isinstance(common, dict):
        raise DiffoptError(f"'common' in {path} must map train options to values, e.g. meta_batch_size: 4")
    _check_train_keys(common, f"{path}, common", shared_train_options())
    return grid


def with_shared_options(configs: Mapping[str, Mapping[str, Any]], common: Mapping[str, Any],
                        given: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Every configuration with the grid file's ``common`` options under its own, and the command
    line's ``given`` ones over both; DiffoptError where a configuration sets a given one itself."""
    merged = {}
    for label, flags in configs.items():
        clash = sorted(set(flags) & set(given))
        if clash:
            meant = difflib.get_close_matches(clash[0], [k for k in GRID_KEYS if k != clash[0]], 1)
            hint = f" (did you mean compare's --{meant[0]}?)" if meant else ""
            raise DiffoptError(f"--{clash[0]} is set for every configuration and by configuration "
                               f"{label!r} too; drop one{hint}")
        merged[label] = {**common, **flags, **given}
    return merged


def product_configs(algorithms: Sequence[str], inner_optimizers: Sequence[str] | None = None,
                    inner_steps: Sequence[int] | None = None,
                    skipped: dict[str, str] | None = None) -> dict[str, dict[str, Any]]:
    """Every algorithm x inner rule x inner steps that is well defined, labelled by what varies
    (first-order MAML, Reptile and the pre-trained baseline skip learned rules: ``skipped``, if
    given, receives each left-out pair's label and the reason)."""
    from diffopt.algorithms import algorithm_class
    from diffopt.optim import INNER_OPTIMIZERS

    configs = {}
    for algorithm in algorithms:
        for rule in inner_optimizers or (None,):
            if rule is not None and rule not in INNER_OPTIMIZERS \
                    and not algorithm_class(algorithm).learns_update_rule:
                if skipped is not None:
                    skipped[f"{algorithm}+{rule}"] = (f"{algorithm} does not meta-learn an inner "
                                                      "rule's parameters")
                continue
            for steps in inner_steps or (None,):
                flags: dict[str, Any] = {"algorithm": algorithm}
                label = [algorithm]
                if rule is not None:
                    flags["inner_optimizer"] = rule
                    if len(inner_optimizers) > 1:
                        label.append(rule)
                if steps is not None:
                    flags["inner_steps"] = steps
                    if len(inner_steps) > 1:
                        label.append(f"{steps}steps")
                configs["+".join(label)] = flags
    return configs


def run_name(label: str, shots: int, seed: int) -> str:
    return f"{label}-k{shots}-seed{seed}"


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
        cells = [row.label, str(row.shots), str(len(row.seeds))]
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


def compare(
    *,
    dataset: str,
    configs: Mapping[str, Mapping[str, Any]],
    shots: Sequence[int],
    seeds: Sequence[int] = (0,),
    iterations: int = 1000,
    max_seconds: float | None = None,
    ways: int | None = None,
    settings: EvaluationSettings,
    validate_every: int | None = None,
    validation_tasks: int = 100,
    out: Path,
    progress: bool = True,
    tensorboard: bool = False,
    command: str = "",
    skipped: Mapping[str, str] | None = None,
) -> list[ComparisonRow]:
    """Train and evaluate every (configuration, K, seed); write ``results.json``, ``report.md``
    and the plots into ``out``; return the table's rows.

    The budget is ``iterations`` meta-iterations or, with ``max_seconds``, that much training
    time (``iterations`` then caps it, and sizes the task stream). Every run with the same seed meets the same
    training tasks in the same order; every run is scored on the same ``settings.eval_tasks``
    tasks. Validation (``validate_every`` iterations; default: 20 points per run) gives the
    learning curves. ``skipped``: configurations left out (label -> why), for the report.
    """
    out = Path(out)
    spec = get_dataset(dataset)
    if validate_every is None:
        validate_every = 0 if max_seconds is not None else max(1, iterations // 20)
    budget: dict[str, Any] = {"iterations": iterations, "max_seconds": max_seconds,
                              "validate_every": validate_every, "validation_tasks": validation_tasks}
    if max_seconds is not None:
        budget["validate_every_seconds"] = max_seconds / 20
    if ways is not None:
        budget["ways"] = ways
    grid = []  # validate the whole grid before any training starts
    for k in shots:
        for label, flags in configs.items():
            for seed in seeds:
                grid.append((label, k, seed, resolve_config(**{
                    **flags, **budget, "dataset": dataset, "shots": k, "seed": seed,
                    "run_dir": str(out / "runs" / run_name(label, k, seed)), "progress": False})))
    if tensorboard:
        _require_tensorboard()
    with run_folder_lock(out):  # one comparison at a time writes ``out``
        return _train_grid(grid, out, settings, progress, tensorboard, {
            "command": command, "versions": library_versions(), "dataset": dataset,
            "metric": spec.metric, "lower_is_better": spec.lower_is_better, "shots": list(shots),
            "seeds": list(seeds), "budget": budget, "settings": asdict(settings),
            "configs": {label: dict(flags) for label, flags in configs.items()},
            "skipped": dict(skipped or {})})


def _train_grid(grid: list, out: Path, settings: EvaluationSettings, progress: bool, tensorboard: bool,
                results: dict[str, Any]) -> list[ComparisonRow]:
    """Train and evaluate every run of ``grid`` not finished yet; write results.json (``results``
    plus the runs) and the report."""
    runs = []
    grid_bar = progress_bar(total=len(grid), desc="grid", disable=not progress, position=0)
    for label, k, seed, config in grid:
        name = Path(config.run_dir).name
        grid_bar.set_postfix_str(name, refresh=False)
        record = _finished(Path(config.run_dir), config, settings)
        if record is None:
            record = _run_in_subprocess(config, settings, out / "logs" / f"{name}.log", progress)
        runs.append({"label": label, "shots": k, "seed": seed, "run": name, **record["result"]})
        if tensorboard:
            _write_tensorboard(out / "tensorboard" / name, Path(config.run_dir), results["metric"], record)
        grid_bar.update()
    grid_bar.close()

    results = {**results, "resolved": {label: config.to_dict() for label, _, _, config in grid},
               "runs": runs}
    write_json(out / "results.json", results)
    return write_report(out)


def _protocol_words(settings: Mapping[str, Any]) -> str:
    if settings.get("eval_transductive", True):
        return "transductive: each query set scored as one batch"
    return "non-transductive: each query example scored with the support set alone"


def write_report(out: Path) -> list[ComparisonRow]:
    """``report.md`` and the plots of ``out``, computed from ``out/results.json`` alone."""
    from diffopt import plots

    out = Path(out)
    results = json.loads((out / "results.json").read_text())
    rows = aggregate(results["runs"])
    settings, budget = results["settings"], results["budget"]
    steps = settings["eval_steps"]
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
        f"{settings['eval_tasks']} held-out tasks for every run (evaluation seed "
        f"{settings['eval_seed']}, {settings['eval_test_shots']} query examples, "
        f"{_protocol_words(settings)}), after each number of inner steps: {spread}.",
        "",
        f"Machine: {machine_description()}. {results['versions']}. Written "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "",
        format_table(rows, metric, steps),
        "",
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
    write_text(out / "report.md", "\n".join(lines).replace("\n\n\n", "\n\n") + "\n")
    return rows


def same_run(a: TrainConfig, b: TrainConfig) -> bool:
    """Whether two configs train the same run (where the folder is, and progress bars, aside)."""
    return a == replace(b, run_dir=a.run_dir, progress=a.progress)


def _finished(run_dir: Path, config: TrainConfig, settings: EvaluationSettings) -> dict | None:
    """The record of a finished run with this config and these settings, else None.

    The recorded config is resolved again, so a run recorded before an option existed counts as
    having used that option's default.
    """
    record = RunFolder(run_dir).comparison_record()
    if record is None:
        return None
    try:
        recorded = resolve_saved_config(record["config"])
    except (DiffoptError, KeyError, TypeError):
        return None
    try:  # a record written before a setting existed used its default
        recorded_settings = EvaluationSettings(**record["settings"])
    except (KeyError, TypeError):
        return None
    if not same_run(recorded, config) or recorded_settings != settings:
        return None
    return record


def _run_in_subprocess(config: TrainConfig, settings: EvaluationSettings, log: Path, progress: bool) -> dict:
    """Train (or resume) and evaluate one run in a fresh process; its record."""
    log.parent.mkdir(parents=True, exist_ok=True)
    run_dir = Path(config.run_dir)
    folder = RunFolder(run_dir, writer=False)
    job = json.dumps({"config": config.to_dict(), "settings": asdict(settings)})
    done = _progress_of(folder, bool(config.max_seconds))  # a resumed run's
    bar = progress_bar(total=config.max_seconds or config.iterations, initial=done, desc=run_dir.name,
                       position=1, leave=False, disable=not progress,
                       unit="s" if config.max_seconds else "it")
    with open(log, "a") as output:
        child = subprocess.Popen([sys.executable, "-m", "diffopt.compare", job], stdout=output,
                                 stderr=subprocess.STDOUT)
        training = False
        while child.poll() is None:
            time.sleep(0.5)
            reached = _progress_of(folder, bool(config.max_seconds))
            if not training and reached > done:  # the clock starts with training, not the child
                training = True
                bar.reset(total=bar.total)
                bar.n = bar.last_print_n = done
            if reached > bar.n:
                bar.update(reached - bar.n)  # drawn at the bar's own pace (plain lines: every 30 s)
    bar.close()
    if child.returncode != 0:
        tail = log.read_text().strip().splitlines()[-1:] or ["no output"]
        raise DiffoptError(f"run {run_dir.name} failed ({tail[0]}); full log: {log}")
    return folder.comparison_record()


def _progress_of(folder: RunFolder, seconds: bool) -> float:
    """Iterations (or training seconds) a running run's metrics log has reached."""
    record = folder.last_metrics()
    if record is None:
        return 0
    return round(record["train_seconds"], 1) if seconds else record["iteration"]


def run_one(config: TrainConfig, settings: EvaluationSettings) -> dict:
    """Train (resuming a matching checkpoint) and evaluate one run; write its ``evaluation.json``."""
    from diffopt.evaluate import evaluate
    from diffopt.train import resume, train

    run_dir = Path(config.run_dir)
    result = None
    if RunFolder(run_dir).has_checkpoint():
        try:
            saved = resolve_saved_config(load_checkpoint(run_dir)["config"])
        except DiffoptError:
            saved = None
        if saved is not None and same_run(saved, config):
            result = resume(run_dir, progress=False)
    if result is None:
        if run_dir.exists():
            shutil.rmtree(run_dir)
        result = train(config)
    spec = get_dataset(config.dataset)
    evaluation = evaluate(
        result.algorithm, spec, shots=config.shots, test_shots=settings.eval_test_shots,
        tasks=settings.eval_tasks, steps=settings.eval_steps, seed=settings.eval_seed,
        transductive=settings.eval_transductive,
        device=config.device, ways=config.ways, **config.data_options())
    record = {
        "config": config.to_dict(), "settings": asdict(settings),
        "result": {
            "iterations": result.iterations, "train_seconds": result.train_seconds,
            "seconds_per_iteration": result.seconds_per_iteration,
            "step_memory_mb": result.step_memory_mb,
            "meta_parameters": sum(p.numel() for p in result.algorithm.parameters()),
            "scores": {str(s): v.tolist() for s, v in evaluation.scores.items()},
            "task_keys": evaluation.task_keys,
        },
    }
    RunFolder(run_dir).write_comparison_record(record)
    return record


def _require_tensorboard() -> None:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        raise DiffoptError("--tensorboard needs the tensorboard package: "
                           "pip install 'diffopt[tensorboard]' (or pip install tensorboard)") from None


def _write_tensorboard(log_dir: Path, run_dir: Path, metric: str, record: dict) -> None:
    """The run's training loss, validation curve and final scores as TensorBoard scalars."""
    from torch.utils.tensorboard import SummaryWriter

    if log_dir.exists():
        shutil.rmtree(log_dir)
    with SummaryWriter(str(log_dir)) as writer:
        folder = RunFolder(run_dir, writer=False)
        for entry in folder.metrics():
            writer.add_scalar("train/loss", entry["loss"], entry["iteration"])
        for entry in folder.validation():
            writer.add_scalar(f"validation/{metric}", entry[metric], entry["iteration"])
            writer.add_scalar(f"validation/{metric}_by_seconds", entry[metric],
                              int(round(entry["train_seconds"] * 1000)))
        for step, scores in record["result"]["scores"].items():
            writer.add_scalar(f"test/{metric}_after_{step}_steps", float(np.mean(scores)),
                              record["result"]["iterations"])


if __name__ == "__main__":  # one run of a comparison, in its own process (see _run_in_subprocess)
    job = json.loads(sys.argv[1])
    run_one(resolve_config(**job["config"]), EvaluationSettings(**job["settings"]))
