"""The ``diffopt`` command line (fire): train, evaluate, compare, gradcheck.

Every command validates its options before it creates a file, and bad input ends in a single
``diffopt: error: ...`` line on stderr with exit status 2.
"""

from __future__ import annotations

import functools
import inspect
import json
import math
import os
import shlex
import sys
import time
import typing
import warnings
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

from diffopt import distributed
from diffopt.compare import shared_train_options
from diffopt.config import TrainConfig, resolve_config, resolve_saved_config
from diffopt.data import DATA_OPTIONS, DATASETS
from diffopt.errors import DiffoptError, as_typed, from_diffopt
from diffopt.evaluate import EVAL_SEED
from diffopt.firecli import run_checked
from diffopt.firecli import shown as shown_value
from diffopt.options import check_bool, check_float, check_int
from diffopt.runfolder import RunFolder


def _as_tuple(name: str, value: Any, kind: type) -> tuple:
    """Fire gives ``5`` for ``--x 5`` and ``(5, 10)`` for ``--x 5,10``: always a tuple of ``kind``."""
    values = value if isinstance(value, (tuple, list)) else (value,)
    if kind is str and isinstance(value, str):  # fire leaves "a,b:c" (not a Python literal) whole
        values = tuple(value.split(","))
    if kind is float:  # fire reads 0 and 1 as ints
        values = tuple(float(v) if isinstance(v, int) and not isinstance(v, bool) else v for v in values)
    if not values or not all(isinstance(v, kind) and not isinstance(v, bool) for v in values):
        raise DiffoptError(f"--{name} takes a comma-separated list of {kind.__name__}s; "
                           f"got {as_typed(value)}")
    return tuple(values)


def train_command(resume: str | None = None, dry_run: bool = False, **options: Any) -> None:
    """Meta-train one algorithm; writes config.json, metrics.jsonl and checkpoint.pt to a run folder."""
    from diffopt.train import resume as resume_training
    from diffopt.train import train as run_training

    if resume is not None:
        other = sorted(set(options) - {"progress"})
        if other:
            raise DiffoptError(f"--resume continues a run with the options it was started with; "
                               f"drop --{other[0]}")
        if dry_run:
            from diffopt.runfolder import load_checkpoint

            saved = resolve_saved_config(load_checkpoint(resume)["config"])
            print(json.dumps(saved.to_dict(), indent=1))
            return
        result = resume_training(resume, progress=options.get("progress"))
    elif dry_run:
        from diffopt.train import build

        config = resolve_config(**options)
        build(config)  # the checks the algorithm, model and inner loop make when built
        print(json.dumps(config.to_dict(), indent=1))
        return
    else:
        result = run_training(resolve_config(**options))
    if not distributed.is_main():
        return
    if math.isnan(result.seconds_per_iteration):  # a resumed run that had already reached its end
        summary = (f"already finished: {result.iterations} meta-iterations, {result.train_seconds:.0f} s "
                   "of training")
    else:
        summary = (f"median {result.seconds_per_iteration:.4f} s / meta-iteration, final loss "
                   f"{result.final_loss:.4f}")
    print(f"run folder: {result.run_dir}  ({summary})")


@functools.cache
def _resolved_defaults() -> dict[str, str]:
    """How ``-h`` shows the options left None ("not given") in ``TrainConfig``: the value
    ``--dataset D`` (with maml) resolves each to, where some dataset gives it one (only shown: the
    command line passes the options given). Computed once for train's and compare's help."""
    resolved = {name: resolve_config(dataset=name).to_dict() for name in DATASETS}
    shown = {"dataset": DATA_OPTIONS["dataset"].default}  # what picks the others: its own default
    for f in fields(TrainConfig):
        if f.default is not None or f.name in shown:
            continue
        values = {name: shown_value(config[f.name]) for name, config in resolved.items()}
        distinct = set(values.values())
        if distinct != {"None"}:
            shown[f.name] = (distinct.pop() if len(distinct) == 1
                             else ", ".join(f"{value} ({name})" for name, value in values.items()))
    return shown


def _train_options(names: Sequence[str]) -> list[inspect.Parameter]:
    """``TrainConfig``'s fields ``names`` as keyword-only parameters, with types (which tell the
    command line which options are booleans) and defaults (those the dataset decides as each
    dataset resolves them)."""
    types = typing.get_type_hints(TrainConfig)
    defaults = {f.name: f.default for f in fields(TrainConfig)}
    defaults.update(_resolved_defaults())
    return [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=defaults[name],
                              annotation=types[name]) for name in names]


def _train_help() -> tuple[inspect.Signature, str]:
    params = [inspect.Parameter("resume", inspect.Parameter.KEYWORD_ONLY, default=None,
                                annotation=str | None)]
    params.append(inspect.Parameter("dry_run", inspect.Parameter.KEYWORD_ONLY, default=False,
                                    annotation=bool))
    lines = ["    resume: continue the run in this folder from its last checkpoint, exactly (no other "
             "options but --progress)",
             "    dry_run: print the resolved options (the dataset's and algorithm's defaults filled "
             "in) and exit"]
    params += _train_options([f.name for f in fields(TrainConfig)])
    lines += [f"    {f.name}: {f.metadata['help']}" for f in fields(TrainConfig)]
    doc = (f"{train_command.__doc__}\n\nOptions left unset take the dataset's literature defaults "
           "(and the algorithm's, e.g. Reptile's): shown per dataset for maml, `--dry_run True` "
           "prints any run's.\n\nArgs:\n" + "\n".join(lines))
    return inspect.Signature(params), doc


train_command.__signature__, train_command.__doc__ = _train_help()


def evaluate_command(
    run: str,
    tasks: int = 500,
    steps: Sequence[int] = (0, 1, 10),
    shots: int | None = None,
    test_shots: int | None = None,
    seed: int = EVAL_SEED,
    device: str = "cpu",
    transductive: bool = True,
    inner_batch_size: int | None = None,
    rotations: bool = True,
    ensemble: int = 1,
    progress: bool = True,
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
        rotations: Omniglot only; False: test on the characters alone, not their rotated
            copies (Reptile's and MAML++'s test protocol)
        ensemble: average the predictions of the run's N best validation checkpoints (MAML++'s
            test protocol: 5; the run must be trained with --keep_best N)
        progress: show a progress bar
    """
    from diffopt.evaluate import EvaluationProtocol
    from diffopt.train import load_trained

    protocol = EvaluationProtocol(tasks, _as_tuple("steps", steps, int), test_shots, seed, transductive,
                                  rotations, ensemble)
    check_bool("progress", progress)
    overrides = {"device": device, "shots": shots, "inner_batch_size": inner_batch_size}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    config, algorithm, payload = load_trained(run, **overrides)
    if ensemble > 1:
        from diffopt.runfolder import best_checkpoints

        algorithm = [load_trained(path, **overrides)[1] for path in best_checkpoints(run, ensemble)]
    evaluation = protocol.evaluate(algorithm, config, device=device, progress=progress)
    if not distributed.is_main():
        return
    summary = {}
    for step in sorted(evaluation.scores):
        mean, ci = evaluation.summary(step)
        diverged = evaluation.diverged(step)
        summary[step] = {"mean": mean, "ci95": ci, **({"diverged": diverged} if diverged else {})}
        after = f"{evaluation.metric} after {step:>3} step{'s' * (step != 1)}:"
        if diverged:
            print(f"{after} diverges on {diverged} of {tasks} tasks (not finite; no mean)")
        else:
            print(f"{after} {mean:.4f} +- {ci:.4f}  ({tasks} tasks)")
    run_path = Path(run)
    if run_path.is_dir():
        record = {"protocol": protocol.record(config, iteration=payload["iteration"]),
                  "metric": evaluation.metric, "summary": summary,
                  "scores": {s: v.tolist() for s, v in evaluation.scores.items()}}
        print(RunFolder(run_path).save_evaluation(record))


def compare_command(
    config: str | None = None,
    dataset: str | None = None,
    algorithms: Sequence[str] | None = None,
    inner_optimizers: Sequence[str] | None = None,
    inner_steps: Sequence[int] | None = None,
    shots: Sequence[int] | None = None,
    ways: int | None = None,
    seeds: int | None = None,
    iterations: int | None = None,
    max_seconds: float | None = None,
    eval_tasks: int | None = None,
    eval_steps: Sequence[int] | None = None,
    eval_test_shots: int | None = None,
    eval_seed: int | None = None,
    eval_transductive: bool | None = None,
    validate_every: int | None = None,
    validation_tasks: int | None = None,
    out: str | None = None,
    progress: bool = True,
    tensorboard: bool = False,
    **train_options: Any,
) -> None:
    """Train a grid of configurations at each shot count and seed on the same tasks, under the
    same budget; score all on the same held-out tasks; write OUT/report.md, OUT/results.json and
    the plots. Finished runs are reused, interrupted ones resumed.

    Any other `diffopt train` option (e.g. --meta_batch_size 4 --inner_lr 0.05) applies to every
    configuration; a configuration may not set it too.

    Args:
        config: YAML or JSON grid file: `configs` (label -> train options), `common` (train
            options for every configuration, under each one's own) and any option below
        dataset: dataset name (default: sinusoid)
        algorithms: comma-separated algorithms (default: maml,fomaml,reptile); with
            --inner_optimizers and --inner_steps, their product (replaces the file's configs)
        inner_optimizers: comma-separated inner rules to cross with the algorithms
        inner_steps: comma-separated inner-step counts to cross with them
        shots: comma-separated support-set sizes K (default: 5,10); one model per K
        ways: classes per task (classification datasets)
        seeds: training seeds 0..N-1 per configuration (default: 1)
        iterations: meta-iterations per run (default: 1000); with --max_seconds, the most
        max_seconds: budget in seconds of training time per run instead of iterations
        eval_tasks: held-out tasks each model is scored on (default: 500)
        eval_steps: numbers of inner steps after which to score (default: 0,1,10)
        eval_test_shots: query examples scored per evaluation task (default: the dataset's)
        eval_seed: seed of the held-out task stream, the same for every run
        eval_transductive: score each query set as one batch (default True); False: each query
            example with the support set alone (batch norm then never sees two queries)
        validate_every: validate every N meta-iterations for the learning curves (default: 20
            points per run)
        validation_tasks: validation tasks per validation (default: 100)
        out: output folder (default: runs/compare-<dataset>-<time>)
        progress: show progress bars (the grid, and the running configuration)
        tensorboard: also write TensorBoard event files (needs the tensorboard extra)
    """
    from diffopt.compare import (
        GRID_DEFAULTS,
        format_table,
        load_grid_file,
        product_configs,
        warning_lines,
        with_shared_options,
    )
    from diffopt.compare import compare as run_comparison
    from diffopt.data import get_dataset
    from diffopt.evaluate import EvaluationProtocol

    grid = load_grid_file(config) if config is not None else {}
    given = dict(dataset=dataset, algorithms=algorithms, inner_optimizers=inner_optimizers,
                 inner_steps=inner_steps, shots=shots, ways=ways, seeds=seeds, iterations=iterations,
                 max_seconds=max_seconds, eval_tasks=eval_tasks, eval_steps=eval_steps,
                 eval_test_shots=eval_test_shots, eval_seed=eval_seed, eval_transductive=eval_transductive,
                 validate_every=validate_every,
                 validation_tasks=validation_tasks)
    options = {**grid, **{k: v for k, v in given.items() if v is not None}}
    options = {**GRID_DEFAULTS, **options}
    spec = get_dataset(options["dataset"])

    skipped: dict[str, str] = {}

    def listed(name: str, kind: type) -> tuple | None:
        return None if options.get(name) is None else _as_tuple(name, options[name], kind)

    if any(given[k] is not None for k in ("algorithms", "inner_optimizers", "inner_steps")) \
            or "configs" not in options:
        configs = product_configs(listed("algorithms", str), listed("inner_optimizers", str),
                                  listed("inner_steps", int), skipped)
    else:
        configs = options["configs"]
    configs = with_shared_options(configs, options.get("common", {}), train_options)
    shots = _as_tuple("shots", options["shots"], int)
    eval_steps = _as_tuple("eval_steps", options["eval_steps"], int)
    protocol = EvaluationProtocol(options["eval_tasks"], eval_steps, options.get("eval_test_shots"),
                                  options["eval_seed"], options["eval_transductive"], option_prefix="eval_")
    for name, value, minimum in [("seeds", options["seeds"], 1), ("iterations", options["iterations"], 1)]:
        check_int(name, value, minimum)
    if not configs:
        raise DiffoptError("the grid has no configuration; give --algorithms or configs in --config")
    if options.get("max_seconds") is not None:
        check_float("max_seconds", options["max_seconds"], positive=True)
    name = options["dataset"]
    out_dir = Path(out) if out else Path("runs") / f"compare-{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    rows = run_comparison(
        dataset=name, configs=configs, shots=shots, seeds=tuple(range(options["seeds"])),
        iterations=options["iterations"], max_seconds=options.get("max_seconds"),
        ways=options.get("ways"),
        protocol=protocol,
        validate_every=options.get("validate_every"), validation_tasks=options["validation_tasks"],
        out=out_dir, progress=progress, tensorboard=tensorboard, command=_COMMAND, skipped=skipped,
    )
    print()
    print(format_table(rows, spec.metric, eval_steps))
    for line in warning_lines(rows):
        print(f"warning: {line}")
    print(f"\nreport: {out_dir / 'report.md'}")


def gradcheck_command(
    algorithm: str = "maml",
    inner_optimizer: str = "sgd",
    inner_lr: float | None = None,
    inner_options: dict | None = None,
    inner_steps: int | None = None,
    inner_solver: str = "gradient",
    inner_backtrack: bool = False,
    inner_checkpoint: int | str | None = None,
    hidden: Sequence[int] = (8, 8),
    activation: str = "tanh",
    norm: str = "none",
    inner_params: str | None = None,
    inner_proximal: float | None = None,
    cg_steps: int | None = None,
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
        inner_lr: inner-loop step size (default 0.1; 1, the full step, for gauss_newton)
        inner_options: the inner optimizer's other hyper-parameters, e.g. '{betas: [0.5, 0.9]}'
        inner_steps: inner-loop steps (default 2; imaml: 100, enough for its inner problem to
            converge, which its implicit gradient assumes)
        inner_solver: imaml's inner steps: gradient or gauss_newton
        inner_backtrack: imaml: take only the inner steps that lower the proximal objective
        inner_checkpoint: check the checkpointed unroll: K inner steps per recomputed segment,
            or auto
        hidden: hidden layer widths of the MLP
        activation: MLP activation (smooth ones such as tanh suit finite differences)
        norm: normalisation after each hidden layer: none, batch, per_step_batch
        inner_params: what the inner loop adapts: all (the default), weights, head, body
            (--algorithm anil and boil fix it to head and body)
        inner_proximal: weight lambda of the inner loop's proximal term (imaml's default here: 5)
        cg_steps: imaml's conjugate-gradient iterations (default here: 1000, stopping once the
            residual is 1e-10 of the gradient's norm)
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
    from diffopt.algorithms import algorithm_class
    from diffopt.data import Episode, get_dataset
    from diffopt.gradcheck import check_meta_gradient
    from diffopt.train import build, load_trained

    if run is not None:
        config, meta_learner, _ = load_trained(run, meta_batch_size=tasks, run_dir=None, init_from=None)
    else:
        implicit = algorithm_class(algorithm).gradient_at_optimum  # converge the inner loop
        config = resolve_config(
            algorithm=algorithm, inner_optimizer=inner_optimizer,
            inner_lr=inner_lr if inner_lr is not None else 1.0 if inner_solver == "gauss_newton" else 0.1,
            inner_options=inner_options, inner_solver=inner_solver, inner_backtrack=inner_backtrack,
            inner_checkpoint=inner_checkpoint,
            inner_steps=inner_steps if inner_steps is not None else 100 if implicit else 2,
            hidden=hidden, activation=activation, norm=norm,
            inner_params=inner_params, vectorize=vectorize, shots=shots, test_shots=test_shots,
            meta_batch_size=tasks,
            inner_proximal=5.0 if implicit and inner_proximal is None else inner_proximal,
            cg_steps=1000 if implicit and cg_steps is None else cg_steps,
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
        **config.data_options(),
    )
    episode = Episode.from_torchmeta(next(iter(loader)))
    result = check_meta_gradient(meta_learner, episode, eps=eps)
    eps = ",".join(f"{step:g}" for step in eps)
    path = meta_learner.meta_batch_path(episode)
    options = "".join(f" {key}={value}" for key, value in (config.inner_options or {}).items())
    solver = "gauss_newton" if config.inner_solver == "gauss_newton" else config.inner_optimizer
    solver += " backtracking" if config.inner_backtrack else ""
    solver += "" if config.inner_checkpoint is None else f" checkpointed every {config.inner_checkpoint}"
    print(f"{config.algorithm}: inner {solver} lr={config.inner_lr}{options} "
          f"steps={config.inner_steps} adapting {config.inner_params}, hidden={config.hidden} "
          f"{config.activation} norm={config.norm}, "
          f"{config.meta_batch_size} tasks, {path}, eps={eps}, float64")
    if config.inner_proximal:
        solve = f", {config.cg_steps} CG iterations at most" if config.cg_steps is not None else ""
        print(f"  inner proximal term lambda={config.inner_proximal:g}{solve}")
    for name, error in result.per_parameter.items():
        print(f"  {name:<24} abs {error.abs_error:.2e}  rel {error.rel_error:.2e}  "
              f"(|grad| up to {error.grad_scale:.2e})")
    verdict = "PASS" if result.passed(rtol) else "FAIL"
    print(f"worst: abs {result.max_abs_error:.2e}  rel {result.max_rel_error:.2e}  "
          f"{verdict} (rtol {rtol:g})")
    if verdict == "FAIL":
        sys.exit(1)


def prepare_command(name: str, source: str | None = None, root: str = "data", download: bool = False) -> None:
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
        from diffopt.data.torchmeta_compat import load as load_torchmeta

        load_torchmeta()  # its fixes first
        from torchmeta.datasets import MiniImagenet, Omniglot

        {"omniglot": Omniglot, "miniimagenet": MiniImagenet}[name](root, meta_train=True, download=True)
        folder = Path(root) / name
    else:
        folder = PREPARERS[name](source, root)
    print(f"{name} ready in {folder}")


def _compare_help() -> tuple[inspect.Signature, str]:
    """compare's own options, then every train option it shares out to the configurations."""
    own = [p for p in inspect.signature(compare_command).parameters.values() if p.kind is not p.VAR_KEYWORD]
    shared = {f.name: f for f in fields(TrainConfig) if f.name in shared_train_options()}
    params = own + _train_options(list(shared))
    # the command line's grid always names each configuration's algorithm (--algorithms), so a
    # shared --algorithm applies only to a --config file's configurations that name none
    scope = {"algorithm": "every configuration of a --config file that names none; else --algorithms"}
    doc = compare_command.__doc__.rstrip() + "\n" + "".join(
        f"        {name}: ({scope.get(name, 'every configuration')}) {f.metadata['help']}\n"
        for name, f in shared.items())
    return inspect.Signature(params), doc


compare_command.__signature__, compare_command.__doc__ = _compare_help()

COMMANDS = {"train": train_command, "evaluate": evaluate_command, "compare": compare_command,
            "gradcheck": gradcheck_command, "data": {"prepare": prepare_command}}


_COMMAND = ""
"""The command line being run (reports quote it)."""


_python_format = warnings.formatwarning


def _notice(message: Warning | str, category: type[Warning], filename: str, lineno: int,
            line: str | None = None) -> str:
    """diffopt's warnings on the command line: one line, no source location; another library's
    (torch's, a plug-in's) as Python shows them, so they are not taken for diffopt's."""
    if from_diffopt(filename):
        return f"diffopt: {message}\n"
    return _python_format(message, category, filename, lineno, line)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``diffopt`` console script."""
    global _COMMAND
    args = list(sys.argv[1:] if argv is None else argv)
    _COMMAND = shlex.join(["diffopt", *args])
    formatwarning, warnings.formatwarning = warnings.formatwarning, _notice
    try:
        run_checked(COMMANDS, args, "diffopt")
    except DiffoptError as error:
        print(f"diffopt: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("diffopt: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`diffopt train -h | head`): nothing to say
        sys.stdout = open(os.devnull, "w")  # so the interpreter's final flush does not fail too
        return 0
    except OSError as error:  # reading or writing a file outside the atomic writers
        where = f" ({error.filename})" if error.filename else ""
        print(f"diffopt: error: {error.strerror or error}{where}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as error:
        if isinstance(error, RuntimeError) and "allocate" not in str(error):
            raise
        print("diffopt: error: out of memory; make the run smaller (--meta_batch_size, --shots, "
              "--test_shots, --hidden, --inner_steps, --iterations)", file=sys.stderr)
        return 2
    finally:
        warnings.formatwarning = formatwarning
        distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
