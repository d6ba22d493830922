"""Training options: one dataclass assembled from the components' declarations, resolved from
flags and literature defaults, then validated.

Resolution order (later wins): the run's and the declared options' defaults, the
algorithm's own and its ``inner_defaults``, the dataset's defaults, the dataset's per-algorithm
defaults, the model's, the flags the user gave. ``TrainConfig`` fields carry their help text,
from which the CLI builds ``diffopt train --help``.
"""

from __future__ import annotations

import typing
from dataclasses import MISSING, asdict, dataclass, field, fields, make_dataclass
from types import SimpleNamespace
from typing import Any

from diffopt.algorithms import ALGORITHMS, algorithm_class
from diffopt.data import DATA_OPTIONS, get_dataset
from diffopt.data.image_options import WITHOUT_VALIDATION
from diffopt.errors import DiffoptError, as_typed
from diffopt.inner import InnerLoop
from diffopt.models import MODEL_OPTIONS, check_model_options, model_defaults
from diffopt.options import AS_TODAY, Option, arguments, check_float, check_int, check_name
from diffopt.outer import OuterStep
from diffopt.vectorize import VECTORIZE_MODES

BUDGETED_ITERATIONS = 100_000
"""The most meta-iterations a run with ``--max_seconds`` and no ``--iterations`` takes."""


def option(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class _RunOptions:
    """The options no component declares: the run's length and bookkeeping (``TrainConfig`` adds
    the data's, the model's, the inner loop's, the algorithms' and the outer step's)."""

    algorithm: str = option(
        "maml", f"meta-learning algorithm: {', '.join(ALGORITHMS)}, or module:Class (a MetaAlgorithm "
        "subclass)")
    iterations: int | None = option(
        None, "meta-iterations (outer steps); default 1000, or with --max_seconds the budget decides "
        f"(at most {BUDGETED_ITERATIONS:,}, which sizes the task stream: give more for a longer run)")
    max_seconds: float | None = option(
        None, "wall-clock budget: stop after the meta-iteration that brings the training time "
        "(summed over resumes, evaluation excluded) to this many seconds")
    iterations_per_epoch: int = option(500, "meta-iterations per epoch (the MAML++ schedules count epochs)")
    epochs: int | None = option(
        None, "the run's length in epochs (MAML++: 150): an epoch is then 1/epochs of the run, of "
        "--iterations or, under --max_seconds, of the budget where that is further along (as the "
        "learning-rate schedules count), so the MAML++ schedules scale to a budget; default: "
        "--iterations_per_epoch")
    max_bad_steps: int = option(
        10, "a meta-iteration with a non-finite meta-loss or meta-gradient is skipped (logged with "
        "skipped: true); after more than this many in a row the run stops")
    vectorize: str = option(
        "auto", "run the meta-batch as one torch.func.vmap over tasks: auto (where proven "
        "correct, else loop with a notice), always (error if not possible), never")
    task_threads: int = option(
        1, "looping over tasks, run this many tasks at once on threads (0: torch's thread count "
        "where the model allows: no buffers, no dropout, on the CPU); same result for any value; "
        "each thread keeps a task's graph alive, and the gain depends on the CPU (BENCHMARKS.md)")
    keep_freed_memory: bool = option(
        True, "tell glibc malloc to keep freed memory for reuse (diffopt.allocator): a faster loop "
        "over tasks on the CPU, the resident size staying near its peak")
    seed: int = option(0, "seed for the model's initialisation and the meta-training task stream")
    device: str = option("cpu", "torch device, e.g. cpu or cuda")
    run_dir: str | None = option(None, "output folder (default: runs/<dataset>-<algorithm>-<time>)")
    checkpoint_every: int = option(500, "write a checkpoint every N meta-iterations (0: only at the end)")
    validate_every: int = option(
        0, "score the validation split every N meta-iterations into validation.jsonl (0: off); "
        "also before and after training")
    validate_every_seconds: float | None = option(
        None, "score the validation split every N seconds of training time (the --max_seconds "
        "clock, which excludes validation) into validation.jsonl; also before and after training")
    snapshot_every_seconds: float | None = option(
        None, "keep a copy of the checkpoint every N seconds of training time (the --max_seconds "
        "clock; writing it is not counted) in snapshots/<iteration>.pt: accuracy against "
        "wall-clock afterwards (benchmarks/time_to_accuracy.py)")
    validation_tasks: int = option(100, "validation tasks per validation (the same tasks each time)")
    keep_best: int = option(
        0, "keep the checkpoints of the K best validations in best/ (MAML++ tests the ensemble of "
        "its 5 best: `diffopt evaluate RUN --ensemble 5`); needs validation")
    validation_steps: int | None = option(
        None, "inner steps before scoring a validation task (default: the training inner steps, "
        "which a learned rule was meta-learned for; Reptile on images: 50)")
    init_from: str | None = option(None, "initialise the meta-parameters from this checkpoint or run folder")
    progress: bool = option(True, "show a progress bar")



def _to_dict(self) -> dict[str, Any]:
    return asdict(self)


def _data_options(self) -> dict[str, Any]:
    """The keyword arguments every loader of this run takes (``DatasetSpec.loader``,
    ``diffopt.evaluate.evaluate``): where the data is and how its images are prepared."""
    return {"root": self.data_root, "images": self.images, "class_split": self.class_split}


ALGORITHM_OPTIONS: dict[str, Option] = {
    name: option for cls in ALGORITHMS.values() for name, option in cls.own_options().items()}
"""The registered algorithms' own options (iMAML's cg_steps, MAML's MAML++ schedules)."""
COMPONENT_OPTIONS: dict[str, Option] = {**DATA_OPTIONS, **MODEL_OPTIONS, **InnerLoop.OPTIONS,
                                        **OuterStep.OPTIONS}
"""The data's, the model's, the inner loop's and the outer step's options: a field "not given"
(None) until resolved."""


def _train_config() -> type:
    """``TrainConfig``: ``_RunOptions``' fields with the declared options in the order a run
    uses them: the algorithm, the data's, the run's length, the model's, the inner loop's and the
    algorithms', the outer step's, then the rest of the run's (a declared option's field default is
    None, "not given", or the algorithm option's ``unset``)."""
    hints = typing.get_type_hints(_RunOptions)

    def declared(options: dict[str, Option], unset: bool = False) -> list[tuple]:
        return [(name, option.type, field(default=option.unset if unset else None,
                                          metadata={"help": option.help}))
                for name, option in options.items()]

    own = [(f.name, hints[f.name], field(default=f.default, metadata=f.metadata))
           for f in fields(_RunOptions)]
    split = next(i for i, (name, *_) in enumerate(own) if name == "iterations_per_epoch")
    components = (declared({**MODEL_OPTIONS, **InnerLoop.OPTIONS}) + declared(ALGORITHM_OPTIONS, unset=True)
                  + declared(OuterStep.OPTIONS))
    ordered = own[:1] + declared(DATA_OPTIONS) + own[1:split] + components + own[split:]
    config = make_dataclass("TrainConfig", ordered, frozen=True, namespace={
        "to_dict": _to_dict, "data_options": _data_options,
        "__doc__": "Everything a meta-training run depends on; saved in its checkpoint."})
    config.__module__ = __name__
    return config


TrainConfig = _train_config()


SAVED_BEFORE: dict[str, Any] = {name: option.before for name, option in COMPONENT_OPTIONS.items()
                                 if option.before is not AS_TODAY}
"""What a run saved before an option existed did: its value for options whose defaults now follow
the original code (docs/protocols.md), so an older run is rebuilt, evaluated and compared as it
was trained."""


def resolve_saved_config(options: dict[str, Any], **overrides: Any) -> TrainConfig:
    """The ``TrainConfig`` of a saved run (a checkpoint's or record's config), ``overrides``
    applied; options it predates take ``SAVED_BEFORE``'s values, not today's defaults."""
    return resolve_config(**{**SAVED_BEFORE, **options, **overrides})


def resolve_config(**flags: Any) -> TrainConfig:
    """A validated ``TrainConfig`` from user flags plus defaults; raises DiffoptError."""
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(flags) - known)
    if unknown:
        raise DiffoptError(f"unknown option --{unknown[0]}; see `diffopt train --help`")
    algorithm = flags.get("algorithm", TrainConfig.algorithm)
    spec = get_dataset(flags.get("dataset") or DATA_OPTIONS["dataset"].default)
    values = {f.name: f.default for f in fields(TrainConfig) if f.default is not MISSING}
    values.update({name: option.default for name, option in COMPONENT_OPTIONS.items()})
    cls = algorithm_class(algorithm)
    values.update({name: option.default for name, option in cls.own_options().items() if name in values})
    values.update(cls.inner_defaults)
    values.update(spec.defaults)
    values.update(spec.algorithm_defaults.get(cls.protocol_of or algorithm, {}))
    if cls.adapts:  # ANIL, BOIL: what the inner loop adapts is the algorithm
        if flags.get("inner_params") not in (None, cls.adapts):
            raise DiffoptError(f"--algorithm {algorithm} adapts the {cls.adapts} in the inner loop; drop "
                               f"--inner_params, or use maml with --inner_params {flags['inner_params']}")
        values["inner_params"] = cls.adapts
    values.update(model_defaults(flags.get("model")))  # the model's own (resnet12: not conv-4's)
    values.update({k: v for k, v in flags.items() if v is not None})
    if isinstance(values["hidden"], int) and not isinstance(values["hidden"], bool):
        values["hidden"] = (values["hidden"],)
    if isinstance(values["hidden"], list):
        values["hidden"] = tuple(values["hidden"])
    if values["iterations"] is None:  # a time budget given alone decides the run's length
        values["iterations"] = 1000 if values["max_seconds"] is None else BUDGETED_ITERATIONS
    if values["test_shots"] is None:
        values["test_shots"] = values["shots"]
    if values["validation_steps"] is None:
        values["validation_steps"] = values["inner_steps"]
    for name, value in values.items():  # defaults computed from the other options
        if callable(value):
            try:
                values[name] = value(values)
            except (TypeError, ValueError, ZeroDivisionError):  # a bad option: validate names it
                values[name] = None
    config = TrainConfig(**values)
    validate(config)
    return config


def validate(config: TrainConfig) -> None:
    """Raise DiffoptError naming the first bad option."""
    spec = get_dataset(config.dataset)
    check_model_options(config, spec.name, spec.model_io)
    inner = arguments(InnerLoop.OPTIONS, config)
    cls = algorithm_class(config.algorithm)
    for name, option in ALGORITHM_OPTIONS.items():
        if name not in cls.own_options() and getattr(config, name) != option.unset:
            raise DiffoptError(f"--{name} is {option.belongs}; drop it for --algorithm {config.algorithm}")
    cls.check_inner(SimpleNamespace(**inner), config.task_threads)  # what the algorithm takes first
    InnerLoop.check_arguments(**inner)
    cls.check_options(**arguments(cls.own_options(), config))
    data = arguments(DATA_OPTIONS, config)
    get_dataset(data.pop("dataset")).check_options(**data)
    if config.keep_best and not (config.validate_every or config.validate_every_seconds):
        raise DiffoptError("--keep_best keeps the best validations' checkpoints: set --validate_every "
                           "or --validate_every_seconds")
    if config.class_split in WITHOUT_VALIDATION and (config.validate_every or config.validate_every_seconds):
        raise DiffoptError(f"--class_split {config.class_split} has no validation classes: drop "
                           "--validate_every and --validate_every_seconds")
    OuterStep.check_arguments(**arguments(OuterStep.OPTIONS, config))
    check_name("vectorize mode", config.vectorize, VECTORIZE_MODES)
    for name, minimum in [("iterations", 1), ("seed", 0), ("checkpoint_every", 0),
                          ("iterations_per_epoch", 1), ("validation_tasks", 2), ("validation_steps", 0),
                          ("validate_every", 0), ("max_bad_steps", 0), ("task_threads", 0),
                          ("keep_best", 0)]:
        check_int(name, getattr(config, name), minimum)
    if config.epochs is not None:
        check_int("epochs", config.epochs, 1)
    for name in ("max_seconds", "validate_every_seconds", "snapshot_every_seconds"):
        if getattr(config, name) is not None:
            check_float(name, getattr(config, name), positive=True)
    if not isinstance(config.device, str):
        raise DiffoptError(f"--device must be a torch device name such as cpu; got {as_typed(config.device)}")
    for name in ("progress", "keep_freed_memory"):
        if not isinstance(getattr(config, name), bool):
            raise DiffoptError(f"--{name} must be True or False; got {as_typed(getattr(config, name))}")


def write_option_reference(path: str = "docs/guide.md") -> None:
    """Put ``option_reference()`` into ``path``'s train-options section (``make docs``)."""
    from diffopt.report import write_section

    write_section(path, "train-options", "Every train option", option_reference())


def option_reference() -> str:
    """The markdown table of every ``diffopt train`` option: who declares it, its default, its
    help (docs/guide.md's "Every train option", ``make docs``)."""
    owners = {name: "the dataset" for name in DATA_OPTIONS}
    owners.update({name: "the model" for name in MODEL_OPTIONS})
    owners.update({name: "`InnerLoop`" for name in InnerLoop.OPTIONS})
    owners.update({name: "`OuterStep`" for name in OuterStep.OPTIONS})
    for cls in ALGORITHMS.values():
        owners.update({name: f"`{cls.__name__}`" for name in cls.own_options()})
    defaults = {name: option.default for name, option in {**COMPONENT_OPTIONS, **ALGORITHM_OPTIONS}.items()}
    rows = ["| option | declared by | default | what it sets |", "|---|---|---|---|"]
    for f in fields(TrainConfig):
        default = defaults.get(f.name, f.default)
        if isinstance(default, tuple):
            default = ",".join(map(str, default))
        shown = "-" if default is None or callable(default) else f"`{default}`"
        text = f.metadata["help"].replace("|", "\\|")
        rows.append(f"| `--{f.name}` | {owners.get(f.name, 'the run')} | {shown} | {text} |")
    return "\n".join(rows)
