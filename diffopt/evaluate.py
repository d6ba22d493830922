"""Evaluation: adapt to held-out tasks and score the query set after chosen numbers of steps.

The evaluation task stream depends only on the evaluation seed, so every algorithm evaluated
with the same seed, shots and task count is scored on exactly the same tasks.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

import numpy as np
import torch

from diffopt import distributed
from diffopt.algorithms import MetaAlgorithm
from diffopt.data import DatasetSpec, Episode, Task, accuracy_per_task, mse_per_task
from diffopt.errors import DiffoptError, as_typed
from diffopt.options import check_bool, check_int
from diffopt.progress import progress_bar
from diffopt.vectorize import over_tasks

EVAL_SEED = 2017
"""Default seed of the held-out test-task stream (independent of every training seed)."""


def task_key(task: Task) -> str:
    """A 16-hex-digit fingerprint of a task's support and query tensors (values, shapes, dtypes)."""
    digest = hashlib.sha1()
    for tensor in (task.support_x, task.support_y, task.query_x, task.query_y):
        array = tensor.detach().cpu().contiguous().numpy()
        digest.update(f"{array.dtype}{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()[:16]


def mean_ci95(values: Sequence[float] | np.ndarray) -> tuple[float, float]:
    """Mean and half-width of its 95% interval, 1.96 * std / sqrt(n) (sample std, n >= 2)."""
    values = np.asarray(values, dtype=np.float64)
    if values.size < 2:
        return float(values.mean()) if values.size else math.nan, math.nan
    return float(values.mean()), float(1.96 * values.std(ddof=1) / math.sqrt(values.size))


def student_t_ci95(values: Sequence[float]) -> float:
    """Half-width of the 95% interval of the mean of ``values`` (Student t, n - 1 dof)."""
    from scipy.stats import t

    values = np.asarray(values, dtype=np.float64)
    if values.size < 2:
        return math.nan
    return float(t.ppf(0.975, values.size - 1) * values.std(ddof=1) / math.sqrt(values.size))


@dataclass(frozen=True)
class Evaluation:
    """Per-task scores after each requested number of inner steps."""

    metric: str
    scores: dict[int, np.ndarray]
    """steps -> [tasks] score of the query set after that many inner steps."""
    task_keys: list[str]
    """A fingerprint of each task's data (support and query sets), in score order: two
    evaluations scored the same tasks exactly when their keys are equal."""

    def summary(self, steps: int) -> tuple[float, float]:
        return mean_ci95(self.scores[steps])

    def diverged(self, steps: int) -> int:
        """How many tasks' scores after ``steps`` are not finite (the summary is then NaN)."""
        return int((~np.isfinite(np.asarray(self.scores[steps], dtype=np.float64))).sum())


def _batches(tasks: Episode | Iterable[Task | Episode], batch_size: int) -> Iterator[Episode]:
    """Episodes of at most ``batch_size`` tasks from an Episode or an iterable of tasks/Episodes."""
    if isinstance(tasks, Episode):
        yield tasks
        return
    pending: list[Task] = []
    for item in tasks:
        if isinstance(item, Episode):
            yield item
            continue
        if not isinstance(item, Task):
            raise DiffoptError(f"evaluate takes a DatasetSpec, an Episode or an iterable of Task or "
                               f"Episode; got an item of type {type(item).__name__}")
        pending.append(item)
        if len(pending) == batch_size:
            yield _stack(pending)
            pending = []
    if pending:
        yield _stack(pending)


def _stack(tasks: list[Task]) -> Episode:
    try:
        return Episode(*(torch.stack([getattr(t, name) for t in tasks])
                         for name in ("support_x", "support_y", "query_x", "query_y")))
    except RuntimeError:
        raise DiffoptError("tasks given to evaluate in one batch must have the same shapes; "
                           "pass them as Episodes, or batch_size=1") from None


def _score_of(episode: Episode) -> tuple[Callable[[torch.Tensor, torch.Tensor], torch.Tensor], str]:
    """Accuracy for integer targets (classification), else mean squared error."""
    if episode.query_y.is_floating_point():
        return mse_per_task, "mse"
    return accuracy_per_task, "accuracy"


def evaluate(
    algorithm: MetaAlgorithm | Sequence[MetaAlgorithm],
    data: DatasetSpec | Episode | Iterable[Task | Episode],
    *,
    shots: int | None = None,
    test_shots: int | None = None,
    tasks: int | None = None,
    steps: Sequence[int] = (0, 1, 10),
    seed: int = EVAL_SEED,
    ways: int | None = None,
    batch_size: int = 25,
    device: str = "cpu",
    root: str = "data",
    transductive: bool = True,
    split: str = "test",
    rotations: bool = True,
    images: str = "bilinear",
    class_split: str | None = None,
    progress: bool = False,
) -> Evaluation:
    """Adapt ``algorithm`` to each task; score its query set after each of ``steps`` inner steps.

    ``data``: a dataset (``get_dataset(name)``: ``tasks`` test tasks of ``shots`` support and
    ``test_shots`` query examples per class, drawn by ``seed``, with the data options below), or
    the tasks themselves: an ``Episode`` or an iterable of ``Task``s / ``Episode``s (scored by
    accuracy for integer targets, else mean squared error; ``shots``, ``tasks`` and the data
    options do not apply).

    Adaptation runs the algorithm's own inner loop on the support set (first order, as no
    meta-gradient is needed); the score is ``spec.score`` on the query set. The model's
    buffers (running statistics) are restored afterwards.

    ``transductive`` (as MAML): the query set goes through the model as one batch, so batch
    norm normalises it with its own statistics. Otherwise (the Reptile paper's protocol) each
    query example is predicted in a batch with the support set alone, so no query example
    sees another. ``split``: 'val' scores validation tasks (learning curves, model selection).
    ``rotations=False``: Omniglot's characters without their rotated copies (the test classes
    of Reptile and MAML++; MAML tests on rotated ones, as diffopt by default). ``images``: the
    image preprocessing and ``class_split`` the Omniglot character split the run trained with
    (``TrainConfig.data_options``).

    Several algorithms (an ensemble, MAML++'s test protocol: the checkpoints with the best
    validation scores, ``diffopt evaluate --ensemble``): each adapts on its own and their
    predictions (logits) are averaged before scoring (HowToTrainYourMAMLPytorch
    experiment_builder.py:247-290).

    Under torchrun each rank scores its shard of every batch of tasks; every rank gets all the
    scores, in task order. ``progress``: a progress bar over the tasks (on the main rank).
    """
    steps = sorted(set(steps))
    if isinstance(data, DatasetSpec):
        missing = [name for name, value in [("shots", shots), ("test_shots", test_shots), ("tasks", tasks)]
                   if value is None]
        if missing:
            raise DiffoptError(f"evaluate(algorithm, dataset) draws its tasks: give {', '.join(missing)}")
        spec = data
        batches = (Episode.from_torchmeta(batch, dtype=None) for batch in spec.loader(
            split, seed=seed, shots=shots, test_shots=test_shots, ways=ways, batch_size=batch_size,
            num_tasks=tasks, root=root, rotations=rotations, images=images, class_split=class_split))
    else:
        batches = _batches(data, batch_size)
    members = [algorithm] if isinstance(algorithm, MetaAlgorithm) else list(algorithm)
    if len({member.vectorized for member in members}) != 1:
        raise DiffoptError("an ensemble's members must all run vectorized or all loop over tasks")
    distributed.init(device)

    def predict(fmodel, task: Task) -> torch.Tensor:
        if transductive:
            return fmodel(task.query_x)
        return torch.cat([fmodel(torch.cat([task.support_x, x[None]]))[-1:] for x in task.query_x])

    def task_scores(task: Task) -> torch.Tensor:  # [len(steps)]
        total = None  # per scored step: the members' summed predictions
        for member in members:
            unrolled = member.unroll(task.support_x, task.support_y, steps=steps[-1])
            predictions = [predict(fmodel, task) for step, fmodel in enumerate(unrolled) if step in steps]
            total = predictions if total is None else [a + b for a, b in zip(total, predictions, strict=True)]
        return torch.stack([score(summed / len(members), task.query_y) for summed in total])

    dtype = next(members[0].parameters()).dtype
    buffers = [{name: b.clone() for name, b in member.named_buffers()} for member in members]
    shards = []  # per batch of tasks: (this rank's scores [tasks, len(steps)], their task keys)
    score, metric = (spec.score, spec.metric) if isinstance(data, DatasetSpec) else (None, None)
    bar = progress_bar(total=tasks if isinstance(data, DatasetSpec) else None, desc="evaluate",
                       unit="task", disable=not (progress and distributed.is_main()), leave=False)
    for batch in batches:
        bar.update(len(batch))
        episode = distributed.shard(batch.to(device, dtype))
        if score is None:
            score, metric = _score_of(episode)
        if len(episode) == 0:  # a batch with fewer tasks than ranks
            scores = torch.empty(0, len(steps))
        elif members[0].vectorized:
            with torch.no_grad():  # torch.func.grad still computes the inner gradients
                scores = over_tasks(task_scores, episode)
        else:
            scores = torch.stack([task_scores(task).detach() for task in episode])
        shards.append((scores.cpu(), [task_key(task) for task in episode]))
    with torch.no_grad():  # test tasks leave no trace in running statistics
        for member, saved in zip(members, buffers, strict=True):
            for name, buffer in member.named_buffers():
                buffer.copy_(saved[name])
    bar.close()
    pieces = [piece for batch in distributed.gather_shards(shards) for piece in batch]  # task order
    if not pieces:
        raise DiffoptError("evaluate was given no tasks")
    table = torch.cat([scores for scores, _ in pieces]).double().numpy()
    keys = [key for _, batch_keys in pieces for key in batch_keys]
    return Evaluation(metric, {s: table[:, i] for i, s in enumerate(steps)}, keys)


@dataclass(frozen=True)
class EvaluationProtocol:
    """How a trained run is scored: ``tasks`` held-out test tasks drawn by ``seed`` with
    ``test_shots`` query examples (per class; None: the dataset's ``eval_test_shots``), scored after
    each of ``steps`` inner steps, the queries as one batch (``transductive``) or each with the
    support set alone; Omniglot with or without its rotated classes; an ``ensemble`` of the run's
    best validation checkpoints. ``diffopt evaluate``'s options and a comparison's ``eval_*`` ones
    build it, checked here where it is built; ``record`` is what every evaluation record keeps.

    >>> protocol = EvaluationProtocol(tasks=100, steps=(0, 10))
    >>> protocol.steps, protocol.test_shots
    ((0, 10), None)
    """

    tasks: int = 500
    steps: tuple[int, ...] = (0, 1, 10)
    test_shots: int | None = None
    seed: int = EVAL_SEED
    transductive: bool = True
    rotations: bool = True
    ensemble: int = 1
    option_prefix: str = field(default="", compare=False, repr=False)
    """How the command line names these settings in its errors (a comparison's: ``eval_``)."""

    def __post_init__(self) -> None:
        prefix = self.option_prefix
        steps = self.steps if isinstance(self.steps, (tuple, list)) else (self.steps,)
        if not steps or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in steps):
            raise DiffoptError(f"--{prefix}steps must be >= 0 (whole numbers); got {as_typed(self.steps)}")
        object.__setattr__(self, "steps", tuple(sorted(set(steps))))
        for name, minimum in [("tasks", 2), ("seed", 0), ("ensemble", 1)]:
            check_int(prefix + name, getattr(self, name), minimum)
        if self.test_shots is not None:
            check_int(prefix + "test_shots", self.test_shots, 1)
        for name in ("transductive", "rotations"):
            check_bool(prefix + name, getattr(self, name))

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> EvaluationProtocol:
        """The protocol an evaluation record (``record``'s output) was scored with; settings the
        record predates take their defaults."""
        names = [f.name for f in fields(cls) if f.name != "option_prefix"]
        return cls(**{name: tuple(record[name]) if name == "steps" else record[name]
                      for name in names if name in record})

    def for_dataset(self, spec: DatasetSpec) -> EvaluationProtocol:
        """This protocol with the dataset's query examples where ``test_shots`` is None."""
        return self if self.test_shots is not None else replace(self, test_shots=spec.eval_test_shots)

    def evaluate(self, algorithm: MetaAlgorithm | Sequence[MetaAlgorithm], config: Any, *,
                 device: str | None = None, progress: bool = False) -> Evaluation:
        """Score ``algorithm`` (trained as ``config``, a ``TrainConfig``, says: its shots, ways and
        data options) on this protocol's tasks."""
        from diffopt.data import get_dataset

        spec = get_dataset(config.dataset)
        protocol = self.for_dataset(spec)
        return evaluate(algorithm, spec, shots=config.shots, test_shots=protocol.test_shots,
                        tasks=protocol.tasks, steps=protocol.steps, seed=protocol.seed, ways=config.ways,
                        device=device or config.device, transductive=protocol.transductive,
                        rotations=protocol.rotations, progress=progress, **config.data_options())

    def settings(self) -> dict[str, Any]:
        """The protocol as a JSON record (``from_record`` reads it back)."""
        return {f.name: list(self.steps) if f.name == "steps" else getattr(self, f.name)
                for f in fields(self) if f.name != "option_prefix"}

    def record(self, config: Any, *, iteration: int) -> dict[str, Any]:
        """Everything an evaluation's scores depend on, as every evaluation record keeps it
        (``diffopt evaluate``'s eval-*.json, a comparison's evaluation.json): the run's
        checkpoint (iteration), its config's (a ``TrainConfig``) data options, shots, ways, inner
        mini-batches and inner state, and this protocol."""
        from diffopt.data import get_dataset

        protocol = self.for_dataset(get_dataset(config.dataset))
        return {"split": "test", "iteration": iteration, "shots": config.shots, "ways": config.ways,
                "inner_batch_size": config.inner_batch_size, "inner_state": config.inner_state,
                **config.data_options(), **protocol.settings()}
