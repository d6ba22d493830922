"""The ``diffopt`` command line (fire): train, evaluate, compare, gradcheck.

Every command validates its options before it creates a file, and bad input ends in a single
``diffopt: error: ...`` line on stderr with exit status 2.
"""

from __future__ import annotations

import inspect
import sys
import time
import typing
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import fire

from diffopt.config import TrainConfig, check_float, check_int, resolve_config
from diffopt.errors import DiffoptError
from diffopt.evaluate import EVAL_SEED


def _as_tuple(name: str, value: Any, kind: type) -> tuple:
    """Fire gives ``5`` for ``--x 5`` and ``(5, 10)`` for ``--x 5,10``: always a tuple of ``kind``."""
    values = value if isinstance(value, (tuple, list)) else (value,)
    if kind is float:  # fire reads 0 and 1 as ints
        values = tuple(float(v) if isinstance(v, int) and not isinstance(v, bool) else v for v in values)
    if not values or not all(isinstance(v, kind) and not isinstance(v, bool) for v in values):
        raise DiffoptError(f"--{name} takes a comma-separated list of {kind.__name__}s; got {value!r}")
    return tuple(values)


def train(resume: str | None = None, **options: Any) -> None:
    """Meta-train one algorithm; writes config.json, metrics.jsonl and checkpoint.pt to a run folder."""
    from diffopt.train import resume as resume_training
    from diffopt.train import train as run_training

    if resume is not None:
        other = sorted(set(options) - {"progress"})
        if other:
            raise DiffoptError(f"--resume continues a run with the options it was started with; "
                               f"drop --{other[0]}")
        result = resume_training(resume, progress=options.get("progress"))
    else:
        result = run_training(resolve_config(**options))
    print(f"run folder: {result.run_dir}  (median {result.seconds_per_iteration:.4f} s / meta-iteration, "
          f"final loss {result.final_loss:.4f})")


def _train_help() -> tuple[inspect.Signature, str]:
    params = [inspect.Parameter("resume", inspect.Parameter.KEYWORD_ONLY, default=None,
                                annotation=str | None)]
    lines = ["    resume: continue the run in this folder from its last checkpoint, exactly (no other "
             "options but --progress)"]
    types = typing.get_type_hints(TrainConfig)
    for f in fields(TrainConfig):
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default,
                                        annotation=types[f.name]))
        lines.append(f"    {f.name}: {f.metadata['help']}")
    doc = (f"{train.__doc__}\n\nOptions left unset take the dataset's literature defaults "
           "(and the algorithm's, e.g. Reptile's).\n\nArgs:\n" + "\n".join(lines))
    return inspect.Signature(params), doc


train.__signature__, train.__doc__ = _train_help()


def evaluate(
    run: str,
    tasks: int = 500,
    steps: Sequence[int] = (0, 1, 10),
    shots: int | None = None,
    test_shots: int | None = None,
    seed: int = EVAL_SEED,
    device: str = "cpu",
    transductive: bool = True,
    inner_batch_size: int | None = None,
) -> None:
    """Adapt a trained run to held-out tasks and report the metric after each number of steps.

    Args:
        run: run folder written by `diffopt train`, or its checkpoint.pt
        tasks: number of held-out test tasks
        steps: numbers of inner steps after which to score, e.g. 0,1,10
        shots: support examples per task (default: the run's)
        test_shots: query examples per task (per class) that are scored (default: the dataset's,
            sinusoid 100, omniglot 15)
        seed: evaluation seed; the same seed gives the same tasks to every run
        device: torch device
        transductive: score the query set as one batch (MAML); False: each query example in a
            batch with the support set alone (Reptile's non-transductive protocol)
        inner_batch_size: examples per inner step at evaluation (default: the run's; Reptile's
            --eval-batch)
    """
    from diffopt.checkpoint import write_json
    from diffopt.data import get_dataset
    from diffopt.evaluate import evaluate as run_evaluation
    from diffopt.train import load_trained

    steps = _as_tuple("steps", steps, int)
    for name, value, minimum in [("tasks", tasks, 2), ("seed", seed, 0)]:
        check_int(name, value, minimum)
    if test_shots is not None:
        check_int("test_shots", test_shots, 1)
    if not isinstance(transductive, bool):
        raise DiffoptError(f"--transductive must be True or False; got {transductive!r}")
    if min(steps) < 0:
        raise DiffoptError(f"--steps must be >= 0; got {steps!r}")
    overrides = {"device": device, "shots": shots, "inner_batch_size": inner_batch_size}
    config, algorithm, _ = load_trained(run, **{k: v for k, v in overrides.items() if v is not None})
    spec = get_dataset(config.dataset)
    test_shots = spec.eval_test_shots if test_shots is None else test_shots
    evaluation = run_evaluation(
        algorithm, spec, shots=config.shots, test_shots=test_shots,
        tasks=tasks, steps=steps, seed=seed, ways=config.ways, device=device, root=config.data_root,
        transductive=transductive,
    )
    summary = {}
    for step in sorted(evaluation.scores):
        mean, ci = evaluation.summary(step)
        summary[step] = {"mean": mean, "ci95": ci}
        print(f"{evaluation.metric} after {step:>3} steps: {mean:.4f} +- {ci:.4f}  ({tasks} tasks)")
    run_path = Path(run)
    if run_path.is_dir():
        write_json(run_path / f"eval-k{config.shots}-seed{seed}.json", {
            "metric": evaluation.metric, "tasks": tasks, "shots": config.shots,
            "test_shots": test_shots, "seed": seed, "summary": summary,
            "scores": {s: v.tolist() for s, v in evaluation.scores.items()},
        })


def compare(
    dataset: str = "sinusoid",
    algorithms: Sequence[str] = ("maml", "fomaml", "reptile"),
    shots: Sequence[int] = (5, 10),
    iterations: int = 1000,
    eval_tasks: int = 500,
    eval_steps: Sequence[int] = (0, 1, 10),
    eval_test_shots: int = 100,
    seed: int = 0,
    eval_seed: int = EVAL_SEED,
    out: str | None = None,
    progress: bool = True,
) -> None:
    """Train each algorithm at each shot count with the same seed and budget, score all on the same
    held-out tasks, and print the table (also written to OUT/report.md and OUT/results.json).

    Args:
        dataset: dataset name
        algorithms: comma-separated algorithm names
        shots: comma-separated support-set sizes K; one model is trained per K
        iterations: meta-iterations per training run
        eval_tasks: held-out tasks each model is scored on
        eval_steps: numbers of inner steps after which to score
        eval_test_shots: query points scored per evaluation task
        seed: training seed (model initialisation and task stream), the same for every run
        eval_seed: seed of the held-out task stream, the same for every run
        out: output folder (default: runs/compare-<dataset>-<time>)
        progress: show progress bars
    """
    from diffopt.compare import compare as run_comparison
    from diffopt.compare import format_table

    algorithms = _as_tuple("algorithms", algorithms, str)
    shots = _as_tuple("shots", shots, int)
    eval_steps = _as_tuple("eval_steps", eval_steps, int)
    for name, value, minimum in [("eval_tasks", eval_tasks, 2), ("eval_test_shots", eval_test_shots, 1),
                                 ("eval_seed", eval_seed, 0)]:
        check_int(name, value, minimum)
    if min(eval_steps) < 0:
        raise DiffoptError(f"--eval_steps must be >= 0; got {eval_steps!r}")
    out_dir = Path(out) if out else Path("runs") / f"compare-{dataset}-{time.strftime('%Y%m%d-%H%M%S')}"
    rows = run_comparison(
        dataset=dataset, configs={name: {"algorithm": name} for name in algorithms}, shots=shots,
        iterations=iterations,
        eval_tasks=eval_tasks, eval_steps=eval_steps, eval_test_shots=eval_test_shots, seed=seed,
        eval_seed=eval_seed, out=out_dir, progress=progress,
    )
    from diffopt.data import get_dataset

    print()
    print(f"{dataset}: {iterations} meta-iterations per run; {get_dataset(dataset).metric} on "
          f"{eval_tasks} held-out tasks, mean +- 95% interval")
    print(format_table(rows, get_dataset(dataset).metric, eval_steps))
    print(f"\nreport: {out_dir / 'report.md'}")


def gradcheck(
    algorithm: str = "maml",
    inner_optimizer: str = "sgd",
    inner_lr: float = 0.1,
    inner_steps: int = 2,
    hidden: Sequence[int] = (8, 8),
    activation: str = "tanh",
    norm: str = "none",
    vectorize: str = "auto",
    shots: int = 5,
    test_shots: int = 5,
    tasks: int = 2,
    seed: int = 0,
    eps: float | Sequence[float] = 1e-6,
    rtol: float = 1e-5,
    run: str | None = None,
) -> None:
    """Check an algorithm's meta-gradient against central finite differences in float64.

    Builds a small model on Sinusoid tasks (or takes a trained run's model and options with --run)
    and prints the worst absolute and relative error per meta-parameter. Exits with status 1 if
    the worst relative error reaches rtol.

    Args:
        algorithm: algorithm whose meta-gradient is checked (it must be exact, e.g. maml)
        inner_optimizer: inner-loop optimizer
        inner_lr: inner-loop step size
        inner_steps: inner-loop steps
        hidden: hidden layer widths of the MLP
        activation: MLP activation (smooth ones such as tanh suit finite differences)
        norm: normalisation after each hidden layer: none, batch, per_step_batch
        vectorize: check the vmapped meta-batch (auto, always) or the loop over tasks (never)
        shots: support examples per task
        test_shots: query examples per task
        tasks: tasks in the checked meta-batch
        seed: seed for the model and the tasks
        eps: finite-difference step, or several (e.g. 1e-6,1e-7: each tensor takes its best;
            for sharply curved meta-losses such as batch norm over few examples)
        rtol: pass threshold for the worst relative error
        run: check this trained run's model (its own options) instead of a fresh small one
    """
    from diffopt.data import Episode, get_dataset
    from diffopt.gradcheck import check_meta_gradient
    from diffopt.train import build, load_trained

    if run is not None:
        config, meta_learner, _ = load_trained(run, meta_batch_size=tasks, run_dir=None, init_from=None)
    else:
        config = resolve_config(
            algorithm=algorithm, inner_optimizer=inner_optimizer, inner_lr=inner_lr,
            inner_steps=inner_steps, hidden=hidden, activation=activation, norm=norm,
            vectorize=vectorize, shots=shots, test_shots=test_shots, meta_batch_size=tasks,
            seed=seed,
        )
    eps = _as_tuple("eps", eps, float)
    for step in eps:
        check_float("eps", step, positive=True)
    check_float("rtol", rtol, positive=True)
    if run is None:
        meta_learner = build(config)
    loader = get_dataset(config.dataset).loader(
        "train", seed=config.seed, shots=config.shots, test_shots=config.test_shots,
        ways=config.ways, batch_size=config.meta_batch_size, num_tasks=config.meta_batch_size,
        root=config.data_root,
    )
    episode = Episode.from_torchmeta(next(iter(loader)))
    result = check_meta_gradient(meta_learner, episode, eps=eps)
    eps = ",".join(f"{step:g}" for step in eps)
    path = "vmap over tasks" if meta_learner.vectorized else "loop over tasks"
    print(f"{config.algorithm}: inner {config.inner_optimizer} lr={config.inner_lr} "
          f"steps={config.inner_steps}, hidden={config.hidden} {config.activation} norm={config.norm}, "
          f"{config.meta_batch_size} tasks, {path}, eps={eps}, float64")
    for name, error in result.per_parameter.items():
        print(f"  {name:<24} abs {error.abs_error:.2e}  rel {error.rel_error:.2e}  "
              f"(|grad| up to {error.grad_scale:.2e})")
    verdict = "PASS" if result.passed(rtol) else "FAIL"
    print(f"worst: abs {result.max_abs_error:.2e}  rel {result.max_rel_error:.2e}  "
          f"{verdict} (rtol {rtol:g})")
    if verdict == "FAIL":
        sys.exit(1)


def prepare(name: str, source: str | None = None, root: str = "data", download: bool = False) -> None:
    """Prepare a dataset offline into ROOT, the folder later given to torchmeta as its root.

    Args:
        name: dataset to prepare: omniglot, miniimagenet
        source: folder holding the original distribution (omniglot: images_background.zip and
            images_evaluation.zip; miniimagenet: images/ with train.csv, val.csv, test.csv, or
            mini-imagenet-cache-{train,val,test}.pkl)
        root: output root; the dataset is written to ROOT/NAME
        download: fetch with torchmeta's own download instead (needs internet; no --source)
    """
    from diffopt.data.prepare import PREPARERS
    from diffopt.errors import unknown_name

    if name not in PREPARERS:
        raise unknown_name("dataset to prepare", name, PREPARERS)
    if download == (source is not None):
        raise DiffoptError("give either --source DIR (offline) or --download (torchmeta's download)")
    if download:
        from torchmeta.datasets import MiniImagenet, Omniglot

        {"omniglot": Omniglot, "miniimagenet": MiniImagenet}[name](root, meta_train=True, download=True)
        folder = Path(root) / name
    else:
        folder = PREPARERS[name](source, root)
    print(f"{name} ready in {folder}")


COMMANDS = {"train": train, "evaluate": evaluate, "compare": compare, "gradcheck": gradcheck,
            "data": {"prepare": prepare}}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``diffopt`` console script."""
    try:
        fire.Fire(COMMANDS, command=list(sys.argv[1:] if argv is None else argv), name="diffopt")
    except DiffoptError as error:
        print(f"diffopt: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("diffopt: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
