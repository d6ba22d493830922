"""Running a comparison: every (configuration, K, seed) trained and evaluated in a process of its
own, finished runs reused and interrupted ones resumed, then the results written."""

from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from diffopt.atomic import write_json
from diffopt.compare.grid import GRID_DEFAULTS, run_name
from diffopt.compare.results import RESULTS_NAME, ComparisonRow, aggregate
from diffopt.compare.server import RunServer
from diffopt.config import TrainConfig, resolve_config, resolve_saved_config
from diffopt.data import get_dataset
from diffopt.errors import DiffoptError, from_diffopt
from diffopt.evaluate import EvaluationProtocol
from diffopt.progress import progress_bar
from diffopt.report import library_versions
from diffopt.runfolder import RunFolder, load_checkpoint, run_folder_lock


def compare(
    *,
    dataset: str,
    configs: Mapping[str, Mapping[str, Any]],
    shots: Sequence[int],
    seeds: Sequence[int] = (0,),
    iterations: int = GRID_DEFAULTS["iterations"],
    max_seconds: float | None = None,
    ways: int | None = None,
    protocol: EvaluationProtocol,
    validate_every: int | None = None,
    validation_tasks: int = GRID_DEFAULTS["validation_tasks"],
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
    training tasks in the same order; every run is scored on the same ``protocol.tasks``
    tasks. Validation (``validate_every`` iterations; default: 20 points per run) gives the
    learning curves. ``skipped``: configurations left out (label -> why), for the report.
    """
    out = Path(out)
    spec = get_dataset(dataset)
    protocol = protocol.for_dataset(spec)
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
        return _train_grid(grid, out, protocol, progress, tensorboard, {
            "command": command, "versions": library_versions(), "dataset": dataset,
            "metric": spec.metric, "lower_is_better": spec.lower_is_better, "shots": list(shots),
            "seeds": list(seeds), "budget": budget, "evaluation": protocol.settings(),
            "configs": {label: dict(flags) for label, flags in configs.items()},
            "skipped": dict(skipped or {})})



def _train_grid(grid: list, out: Path, protocol: EvaluationProtocol, progress: bool, tensorboard: bool,
                results: dict[str, Any]) -> list[ComparisonRow]:
    """Train and evaluate every run of ``grid`` not finished yet; write results.json (``results``
    plus the runs) and the report."""
    runs = []
    grid_bar = progress_bar(total=len(grid), desc="grid", disable=not progress, position=0)
    with RunServer() as server:
        for label, k, seed, config in grid:
            name = Path(config.run_dir).name
            grid_bar.set_postfix_str(name, refresh=False)
            record = _finished(Path(config.run_dir), config, protocol)
            if record is None:
                record = _run_in_subprocess(config, protocol, out / "logs" / f"{name}.log", progress, server)
            runs.append({"label": label, "shots": k, "seed": seed, "run": name, **record["result"]})
            if tensorboard:
                _write_tensorboard(out / "tensorboard" / name, Path(config.run_dir), results["metric"],
                                   record)
            grid_bar.update()
        grid_bar.close()
        results = {**results, "resolved": {label: config.to_dict() for label, _, _, config in grid},
                   "runs": runs}
        write_json(out / RESULTS_NAME, results)
        return _report(out, runs, server)


def _report(out: Path, runs: list[dict], server: RunServer) -> list[ComparisonRow]:
    """Write ``out``'s report.md and plots in a child of ``server``, whose imports (torchmeta:
    the sinusoid figure draws a task) are done; the table's rows, computed here meanwhile."""
    log = out / "logs" / "report.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    server.start("diffopt.compare.results:write_report", str(out), log)
    rows = aggregate(runs)
    if server.wait() != 0:
        raise DiffoptError(f"writing {out / 'report.md'} failed ({_last_line(log)}); full log: {log}")
    return rows


def _last_line(log: Path) -> str:
    """A failed child's last line of output: its error."""
    return (log.read_text().strip().splitlines() or ["no output"])[-1]


def same_run(a: TrainConfig, b: TrainConfig) -> bool:
    """Whether two configs train the same run (where the folder is, and progress bars, aside)."""
    return a == replace(b, run_dir=a.run_dir, progress=a.progress)



def _finished(run_dir: Path, config: TrainConfig, protocol: EvaluationProtocol) -> dict | None:
    """The record of a finished run with this config, scored by this protocol, else None.

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
        recorded_protocol = EvaluationProtocol.from_record(record["protocol"])
    except (KeyError, TypeError):
        return None
    if not same_run(recorded, config) or recorded_protocol != protocol:
        return None
    return record



def _run_in_subprocess(config: TrainConfig, protocol: EvaluationProtocol, log: Path, progress: bool,
                       server: RunServer) -> dict:
    """Train (or resume) and evaluate one run in a process of its own (forked by ``server``);
    its record."""
    log.parent.mkdir(parents=True, exist_ok=True)
    run_dir = Path(config.run_dir)
    folder = RunFolder(run_dir, writer=False)
    job = json.dumps({"config": config.to_dict(), "protocol": protocol.settings()})
    done = _progress_of(folder, bool(config.max_seconds))  # a resumed run's
    bar = progress_bar(total=config.max_seconds or config.iterations, initial=done, desc=run_dir.name,
                       position=1, leave=False, disable=not progress,
                       unit="s" if config.max_seconds else "it")
    server.start("diffopt.compare.runs:run_job", job, log)
    training = False
    while (returncode := server.wait(timeout=0.5)) is None:
        reached = _progress_of(folder, bool(config.max_seconds))
        if not training and reached > done:  # the clock starts with training, not the child
            training = True
            bar.reset(total=bar.total)
            bar.n = bar.last_print_n = done
        if reached > bar.n:
            bar.update(reached - bar.n)  # drawn at the bar's own pace (plain lines: every 30 s)
    bar.close()
    if returncode != 0:
        raise DiffoptError(f"run {run_dir.name} failed ({_last_line(log)}); full log: {log}")
    return folder.comparison_record()



def _progress_of(folder: RunFolder, seconds: bool) -> float:
    """Iterations (or training seconds) a running run's metrics log has reached."""
    record = folder.last_metrics()
    if record is None:
        return 0
    return round(record["train_seconds"], 1) if seconds else record["iteration"]



def run_job(job: str) -> dict:
    """``run_one`` of a job as ``_run_in_subprocess`` writes it (JSON: config and protocol)."""
    job = json.loads(job)
    return run_one(resolve_config(**job["config"]), EvaluationProtocol.from_record(job["protocol"]))


def run_one(config: TrainConfig, protocol: EvaluationProtocol) -> dict:
    """Train (resuming a matching checkpoint) and evaluate one run; write its ``evaluation.json``,
    diffopt's warnings during the run included (the report shows them beside the run's row)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")  # each once per place, as a console shows them
        result, evaluation = _train_and_score(config, protocol)
    for warning in caught:  # the run's log still shows them
        warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)
    notices = [str(w.message) for w in caught
               if from_diffopt(w.filename) and issubclass(w.category, UserWarning)]
    record = {
        "config": config.to_dict(), "protocol": protocol.record(config, iteration=result.iterations),
        "result": {
            "iterations": result.iterations, "train_seconds": result.train_seconds,
            "seconds_per_iteration": result.seconds_per_iteration,
            "step_memory_mb": result.step_memory_mb,
            "meta_parameters": sum(p.numel() for p in result.algorithm.parameters()),
            "scores": {str(s): v.tolist() for s, v in evaluation.scores.items()},
            "task_keys": evaluation.task_keys,
            "warnings": list(dict.fromkeys(notices)),
        },
    }
    RunFolder(config.run_dir).write_comparison_record(record)
    return record


def _train_and_score(config: TrainConfig, protocol: EvaluationProtocol):
    """(the training result, the evaluation) of ``run_one``."""
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
    return result, protocol.evaluate(result.algorithm, config)



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

