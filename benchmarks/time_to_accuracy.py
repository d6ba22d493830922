"""Time to accuracy: diffopt against an independent implementation of the same protocol.

    python benchmarks/time_to_accuracy.py --budget_minutes 20 --write BENCHMARKS.md

For each method (MAML, first-order MAML, Reptile; Omniglot 5-way 1-shot, each with its paper's
protocol), ``diffopt train`` and ``benchmarks/omniglot_reference.py`` (plain PyTorch written from
the original code, sharing no diffopt code) train for the same training wall-clock (evaluation and
snapshot writing excluded), keeping a snapshot every budget / ``snapshots`` seconds: side by side,
one process and one torch thread each, or with ``--threads 2`` one after the other, two threads
each (the whole 2-core machine; the pair then spans twice the budget, resumably). Then every
snapshot of both is scored on the same meta-test tasks (diffopt's test stream, evaluation seed
2017, 1 support + 15 query examples per class; each task's fingerprint is checked), after the
paper's test-time adaptation: MAML and first-order MAML 10 SGD steps transductively, Reptile 50
Adam steps on mini-batches of 5, non-transductively. The last snapshot is scored on all
``tasks``, the others on the first ``curve_tasks`` of them (the accuracy-against-time curve).

The table: method, implementation, meta-iterations, median seconds per meta-iteration,
accuracy +- 95% interval at the budget, and the time-to-accuracy ratio: the training time
diffopt needs to reach the reference's final accuracy (linear between snapshots), over the
budget. Each method's results are kept in ``out/<method>/result.json``; a rerun skips methods
already done (``--fresh`` redoes them).
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from diffopt.firecli import fire_checked
from diffopt.runfolder import RunFolder

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "examples"))
from omniglot_table import PAPER_RUNS, TARGETS, plot_test_curves, thread_environment, time_to  # noqa: E402  (the paper table's)

METHODS = {"maml": "MAML", "fomaml": "first-order MAML", "reptile": "Reptile",
           "maml-paper": "MAML, the paper table's recipe",
           "maml-paper-lslr": "MAML, the paper table's recipe with LSLR and 1200 training characters"}
RECIPES = {"maml-paper": ("maml", "goal", "paper-maml-1shot"),
           "maml-paper-lslr": ("maml", "goal-lslr-trainval", "paper-maml-lslr-1shot")}
"""Methods beyond their original code's settings: (algorithm, the reference's MAML recipe, the
examples/omniglot_table.py paper-table run whose options diffopt trains with); each recipe's
meta-gradient equals diffopt's: tests/test_reference_parity.py."""
PROTOCOL = {  # test-time adaptation per method (the papers')
    "maml": dict(steps=10, inner_batch_size=None, transductive=True),
    **{method: dict(steps=10, inner_batch_size=None, transductive=True) for method in RECIPES},
    "fomaml": dict(steps=10, inner_batch_size=None, transductive=True),
    "reptile": dict(steps=50, inner_batch_size=5, transductive=False),
}
WAYS, SHOTS, QUERIES = 5, 1, 15
IMPLEMENTATIONS = ("diffopt", "reference")


def _methods(methods: str | tuple | list) -> list[str]:
    names = [m for m in (methods.split(",") if isinstance(methods, str) else methods) if m]
    unknown = [m for m in names if m not in METHODS]
    if unknown or not names:
        raise SystemExit(f"time_to_accuracy: unknown method {unknown[0] if unknown else ''!r}; "
                         f"choose from {', '.join(METHODS)}")
    return names


def make_tasks(path: Path, tasks: int, data_root: str) -> None:
    """The meta-test tasks as tensors (what the reference scores), with their fingerprints."""
    from diffopt.data import Episode, get_dataset
    from diffopt.evaluate import EVAL_SEED, task_key

    loader = get_dataset("omniglot").loader("test", seed=EVAL_SEED, shots=SHOTS, test_shots=QUERIES,
                                            ways=WAYS, batch_size=25, num_tasks=tasks, root=data_root)
    episodes = [Episode.from_torchmeta(batch) for batch in loader]
    fields = ("support_x", "support_y", "query_x", "query_y")
    payload = {name: torch.cat([getattr(e, name) for e in episodes]) for name in fields}
    keys = [task_key(task) for e in episodes for task in e]
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, path)
    path.with_suffix(".keys.json").write_text(json.dumps(keys))


def _subset(path: Path, count: int) -> Path:
    """The first ``count`` tasks of the task file ``path`` (a file beside it)."""
    target = path.with_name(f"{path.stem}-first{count}.pt")
    if not target.exists():
        payload = torch.load(path, weights_only=True)
        torch.save({k: v[:count].clone() for k, v in payload.items()}, target)
    return target


def _snapshots(implementation: str, run: Path) -> list[Path]:
    """The run's snapshots in training order, the final state last."""
    if implementation == "diffopt":
        folder = RunFolder(run, writer=False)
        return folder.snapshots() + [folder.checkpoint]
    return sorted(run.glob("snapshot-*.pt"), key=lambda p: int(p.stem.split("-")[1]))


def score(method: str, implementation: str, run: str, tasks_file: str, curve_tasks: int, out: str,
          data_root: str = "data", threads: int = 1) -> None:
    """Score every snapshot of one run (a child process of ``main``): the last on all tasks,
    the others on the first ``curve_tasks``; write the curve to ``out`` (JSON)."""
    torch.set_num_threads(threads)
    run_path, tasks_path = Path(run), Path(tasks_file)
    keys = json.loads(tasks_path.with_suffix(".keys.json").read_text())
    protocol = PROTOCOL[method]
    snapshots = _snapshots(implementation, run_path)
    curve = []
    for index, snapshot in enumerate(snapshots):
        count = len(keys) if index == len(snapshots) - 1 else min(curve_tasks, len(keys))
        if implementation == "diffopt":
            from diffopt.data import get_dataset
            from diffopt.evaluate import evaluate
            from diffopt.train import load_trained

            config, algorithm, payload = load_trained(snapshot, inner_batch_size=protocol["inner_batch_size"])
            evaluation = evaluate(algorithm, get_dataset("omniglot"), shots=SHOTS, test_shots=QUERIES,
                                  ways=WAYS, tasks=count, steps=(protocol["steps"],), root=data_root,
                                  transductive=protocol["transductive"])
            if evaluation.task_keys != keys[:count]:
                raise SystemExit("time_to_accuracy: diffopt scored other tasks than the task file's")
            accuracy, ci95 = evaluation.summary(protocol["steps"])
            seconds, iteration = float(payload["train_seconds"]), int(payload["iteration"])
        else:
            sys.path.insert(0, str(HERE))
            import omniglot_reference

            subset = tasks_path if count == len(keys) else _subset(tasks_path, count)
            algorithm = RECIPES.get(method, (method,))[0]
            result = omniglot_reference.evaluate(algorithm, str(snapshot), str(subset), threads=threads,
                                                 **protocol)
            accuracy, ci95 = result["accuracy"], result["ci95"]
            payload = torch.load(snapshot, weights_only=True)
            seconds, iteration = float(payload["train_seconds"]), int(payload["iteration"])
        curve.append(dict(train_seconds=seconds, iteration=iteration, tasks=count,
                          accuracy=accuracy, ci95=ci95))
    Path(out).write_text(json.dumps(curve, indent=1))


def _iteration_seconds(implementation: str, run: Path) -> list[float]:
    """Each meta-iteration's training seconds: the steps of the logged training clock."""
    if implementation == "diffopt":
        clock = [record["train_seconds"] for record in RunFolder(run, writer=False).metrics()]
    else:
        log = run / "log.jsonl"
        clock = [json.loads(line)["train_seconds"] for line in log.read_text().splitlines() if line.strip()]
    return [b - a for a, b in zip([0.0, *clock[:-1]], clock, strict=True)]


def _time_to(curve: list[dict], target: float) -> float | None:
    """Training seconds at which a scored ``curve`` first reaches ``target`` (omniglot_table's
    ``time_to``: linear between points, from chance, 1 / ways, at 0 s)."""
    return time_to([(point["train_seconds"], point["accuracy"]) for point in curve], target, 1 / WAYS)


def _diffopt_flags(method: str) -> list[str]:
    if method not in RECIPES:
        return ["--algorithm", method]
    run = next(run for run in PAPER_RUNS if run.name == RECIPES[method][2])
    flags = {k: v for k, v in run.flags().items() if k != "shots"}
    return [f"--{key}={value}" for key, value in flags.items()]


def _run_pair(method: str, folder: Path, budget: float, snapshots: int, data_root: str, seed: int,
              threads: int) -> None:
    """Train diffopt and the reference (``_run_all``); a run stopped part-way resumes (diffopt from
    its checkpoint, the reference from its last snapshot), a finished one returns at once."""
    every = budget / snapshots
    run_dir = folder / "diffopt"
    if RunFolder(run_dir, writer=False).has_checkpoint():
        diffopt = ["train", "--resume", str(run_dir), "--progress", "False"]
    else:
        diffopt = ["train", "--dataset", "omniglot", *_diffopt_flags(method), "--data_root", data_root,
                   "--max_seconds", str(budget), "--iterations", str(10**7), "--snapshot_every_seconds",
                   str(every), "--checkpoint_every", "100", "--seed", str(seed), "--run_dir", str(run_dir),
                   "--progress", "False"]
    algorithm, recipe = RECIPES.get(method, (method, "cbfinn"))[:2]
    commands = {
        "diffopt": [sys.executable, "-m", "diffopt", *diffopt],
        "reference": [sys.executable, str(HERE / "omniglot_reference.py"), "train", "--algorithm", algorithm,
                      "--recipe", recipe, "--resume", "True", "--out", str(folder / "reference"),
                      "--budget_seconds", str(budget), "--snapshots", str(snapshots), "--data_root",
                      data_root, "--seed", str(seed), "--threads", str(threads)],
    }
    _run_all(commands, folder, "train", threads)


def _run_all(commands: dict[str, list[str]], folder: Path, stage: str, threads: int) -> None:
    """Run ``commands`` with ``threads`` torch threads each, logging to ``folder/<name>-<stage>.log``:
    at once with one thread (one core each), one after the other with more (the machine each);
    exit if one fails. A log is appended to, so a pair that spans sittings keeps every sitting's."""
    processes, failed = {}, []
    for name, command in commands.items():
        log = open(folder / f"{name}-{stage}.log", "a")
        processes[name] = (subprocess.Popen(command, env=thread_environment(threads), stdout=log,
                                            stderr=subprocess.STDOUT), log)
        if threads > 1 and processes[name][0].wait() != 0:
            break
    for name, (process, log) in processes.items():
        if process.wait() != 0:
            failed.append(name)
        log.close()
    if failed:
        tail = (folder / f"{failed[0]}-{stage}.log").read_text().strip().splitlines()[-3:]
        raise SystemExit(f"time_to_accuracy: {failed[0]} {stage} failed: {' / '.join(tail)}")


def run_method(method: str, out: Path, budget: float, tasks_file: Path, snapshots: int, curve_tasks: int,
               data_root: str, seed: int, fresh: bool, threads: int) -> dict:
    """Train and score one method's pair; a finished pair (of another budget or thread count) or
    ``fresh`` starts over, an unfinished one resumes (a run's scores, once written, are kept)."""
    folder = out / method
    if fresh or (folder / "result.json").exists():
        shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    started = time.time()
    _run_pair(method, folder, budget, snapshots, data_root, seed, threads)
    _run_all({name: [sys.executable, str(Path(__file__).resolve()), "score", method, name,
                     str(folder / name), str(tasks_file), str(curve_tasks),
                     str(folder / f"{name}-curve.json"), f"--data_root={data_root}", f"--threads={threads}"]
              for name in IMPLEMENTATIONS if not (folder / f"{name}-curve.json").exists()},
             folder, "score", threads)
    result = {"method": method, "budget_seconds": budget, "threads": threads,
              "wall_seconds": time.time() - started}
    for name in IMPLEMENTATIONS:
        curve = json.loads((folder / f"{name}-curve.json").read_text())
        seconds = _iteration_seconds(name, folder / name)
        result[name] = dict(curve=curve, iterations=curve[-1]["iteration"],
                            seconds_per_iteration=statistics.median(seconds),
                            accuracy=curve[-1]["accuracy"], ci95=curve[-1]["ci95"])
    reached = _time_to(result["diffopt"]["curve"], result["reference"]["accuracy"])
    result["time_to_accuracy_ratio"] = None if reached is None else reached / budget
    (folder / "result.json").write_text(json.dumps(result, indent=1))
    return result


def table(results: list[dict]) -> str:
    targets = " / ".join(f"{100 * t:.0f}" for t in TARGETS)
    lines = ["| method | implementation | meta-iterations | s / meta-iteration (median) | accuracy +- 95% "
             f"| minutes to {targets}% | time-to-accuracy ratio |", "|---|---|---|---|---|---|---|"]
    for result in results:
        for name in IMPLEMENTATIONS:
            r = result[name]
            if name == "diffopt":
                ratio = result["time_to_accuracy_ratio"]
                speed = r["seconds_per_iteration"] / result["reference"]["seconds_per_iteration"]
                shown = f"{ratio:.2f}" if ratio is not None else "not reached"
                shown += f" (s / iteration {speed:.2f}x the reference's)"
            else:
                shown = "1 (by definition)"
            reached = [_time_to(r["curve"], target) for target in TARGETS]
            minutes = " / ".join("-" if t is None else f"{t / 60:.0f}" for t in reached)
            lines.append(f"| {METHODS[result['method']]} | {name} | {r['iterations']} | "
                         f"{r['seconds_per_iteration']:.3f} | {100 * r['accuracy']:.2f} +- "
                         f"{100 * r['ci95']:.2f} | {minutes} | {shown} |")
    return "\n".join(lines)


def main(budget_minutes: float = 20.0, methods: str = "reptile,maml,fomaml", tasks: int = 600,
         curve_tasks: int = 200, snapshots: int = 4, out: str = "runs/time-to-accuracy",
         data_root: str = "data", seed: int = 0, write: str | None = None, fresh: bool = False,
         figure: str | None = None, threads: int = 1) -> None:
    """Run the benchmark for ``methods`` (comma-separated) and print the table (see the module
    docstring); ``write``: a markdown file whose time-to-accuracy section is replaced; ``figure``:
    a PNG of every implementation's test accuracy against training time; ``threads``: torch threads
    per implementation, 1 (side by side) or more (one after the other)."""
    names = _methods(methods)
    if budget_minutes <= 0 or tasks < 2 or curve_tasks < 2 or snapshots < 1 or threads < 1:
        raise SystemExit("time_to_accuracy: --budget_minutes > 0, --tasks and --curve_tasks >= 2, "
                         "--snapshots >= 1, --threads >= 1")
    arrangement = ("side by side, one torch thread each" if threads == 1
                   else f"one after the other, {threads} torch threads each")
    out_path = Path(out)
    tasks_file = out_path / f"tasks-{tasks}.pt"
    if not tasks_file.exists():
        make_tasks(tasks_file, tasks, data_root)
    budget = 60 * budget_minutes
    results = []
    for method in names:
        done = out_path / method / "result.json"
        kept = json.loads(done.read_text()) if done.exists() and not fresh else {}
        if kept.get("budget_seconds") == budget and kept.get("threads", 1) == threads:
            result = kept
            for name in IMPLEMENTATIONS:  # from the logs, as run_method computes it
                seconds = _iteration_seconds(name, out_path / method / name)
                result[name]["seconds_per_iteration"] = statistics.median(seconds)
            results.append(result)
            continue
        print(f"{METHODS[method]}: diffopt and the reference {arrangement}, {budget:.0f} s of training",
              flush=True)
        results.append(run_method(method, out_path, budget, tasks_file, snapshots, curve_tasks,
                                  data_root, seed, fresh, threads))
    text = table(results)
    print(text)
    if figure:
        plot_test_curves({f"{METHODS[result['method']]}: {name}" if len(results) > 1 else name:
                          [(point["train_seconds"], point["accuracy"]) for point in result[name]["curve"]]
                          for result in results for name in IMPLEMENTATIONS}, Path(figure),
                         f"Omniglot 5-way 1-shot, diffopt and the reference, {budget_minutes:g} minutes "
                         f"each, {threads} thread{'s' if threads > 1 else ''}")
    if write:
        from diffopt.report import library_versions, machine_description, write_section

        body = (f"{machine_description()}; {library_versions()}. Budget {budget_minutes:g} minutes of "
                f"training per implementation, {arrangement}; {tasks} meta-test "
                f"tasks (curve points: the first {curve_tasks}); seed {seed}. Command: `python "
                f"benchmarks/time_to_accuracy.py --budget_minutes {budget_minutes:g} --methods "
                f"{','.join(names)} --tasks {tasks}{f' --threads {threads}' if threads > 1 else ''} "
                f"--write {write}`.\n\n{text}")
        write_section(write, "time-to-accuracy", "Time to accuracy against independent references", body)


if __name__ == "__main__":
    command, args = (score, sys.argv[2:]) if sys.argv[1:2] == ["score"] else (main, sys.argv[1:])
    fire_checked(command, args, name="time_to_accuracy")
