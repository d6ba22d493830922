"""Meta-training: loader -> episode -> algorithm.meta_gradient -> outer step, logged to a run folder.

``train`` sets a run up (or restores it from its checkpoint); a ``_Sitting`` runs the loop:
``meta_step`` (the guarded outer step), logging, validation and checkpoints, all written through
``diffopt.runfolder.RunFolder``.
"""

from __future__ import annotations

import copy
import json
import math
import random
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from diffopt import distributed
from diffopt.algorithms import MetaAlgorithm, algorithm_class, build_algorithm
from diffopt.allocator import keep_freed_memory
from diffopt.checkpoint import restore_module
from diffopt.config import TrainConfig, resolve_saved_config
from diffopt.data import Episode, get_dataset
from diffopt.errors import DiffoptError, PluginError
from diffopt.evaluate import evaluate
from diffopt.inner import InnerLoop
from diffopt.memory import StepMemory
from diffopt.models import build_model, initialize, model_arguments
from diffopt.options import arguments
from diffopt.outer import OuterStep
from diffopt.progress import progress_bar
from diffopt.runfolder import RunFolder, checkpoint_path, load_checkpoint


def build(config: TrainConfig) -> MetaAlgorithm:
    """The algorithm (model and inner loop) a config describes, freshly initialised from its seed."""
    spec = get_dataset(config.dataset)
    torch.manual_seed(config.seed)
    io = dict(spec.model_io, out_features=config.ways) if spec.classification else spec.model_io
    model = build_model(config.model, **model_arguments(config, io, config.inner_steps))
    initialize(model, config.init)
    inner = InnerLoop(model=model, **arguments(InnerLoop.OPTIONS, config))
    declared = {name: option for name, option in algorithm_class(config.algorithm).own_options().items()
                if hasattr(config, name)}  # a plug-in algorithm's options are not train options
    algorithm = build_algorithm(config.algorithm, model, inner, spec.loss, config.vectorize,
                                config.task_threads, **arguments(declared, config))
    try:
        return algorithm.to(config.device)
    except (RuntimeError, AssertionError) as error:
        raise DiffoptError(f"--device {config.device!r} is not usable here ({error})") from None


def load_trained(run: str | Path, **overrides) -> tuple[TrainConfig, MetaAlgorithm, dict]:
    """(config, algorithm with the trained meta-parameters, checkpoint payload) of a run folder
    or checkpoint file; ``overrides`` replace options of the saved config (e.g. ``device``)."""
    payload = load_checkpoint(run)
    try:  # resolved again: options added since the run was written take their defaults
        config = resolve_saved_config(payload["config"], **overrides)
    except PluginError as error:  # the run is fine; its plug-in is not importable from here
        raise PluginError(f"run {run} was trained with a plug-in: {error}") from None
    except (DiffoptError, TypeError) as error:
        raise DiffoptError(f"checkpoint {run} has an unreadable config ({error})") from None
    algorithm = build(config)
    restore_module(algorithm, payload["algorithm"], checkpoint_path(run))
    algorithm.inner.carried_state = payload.get("inner_state")
    return config, algorithm, payload


def guarded_step(algorithm: MetaAlgorithm, optimizer: torch.optim.Optimizer) -> bool:
    """``optimizer.step()``, undone (parameters and optimizer state as before) if it made a
    meta-parameter non-finite (an overflow from finite gradients); whether the step was kept."""
    params = list(algorithm.parameters())
    with torch.no_grad():
        before = torch._foreach_mul(params, 1.0)  # copies, in one call
        state = {p: {k: v.clone() if torch.is_tensor(v) else copy.deepcopy(v) for k, v in s.items()}
                 for p, s in optimizer.state.items()}  # tensors cloned: a deepcopy costs 10x more
    optimizer.step()
    if all(bool(torch.isfinite(p).all()) for p in params):
        return True
    with torch.no_grad():
        torch._foreach_copy_(params, before)
    optimizer.state.clear()
    optimizer.state.update(state)
    return False


def outer_step(config: TrainConfig) -> OuterStep:
    """The outer step (optimizer, schedule, clipping) a config describes."""
    return OuterStep(**arguments(OuterStep.OPTIONS, config))


def run_progress(config: TrainConfig, iteration: int, train_seconds: float) -> float:
    """How far along the run meta-iteration ``iteration`` (1-based) starts, 0 .. 1: the fraction
    of ``--iterations`` done or, under ``--max_seconds``, of the budget if that is further."""
    progress = (iteration - 1) / config.iterations
    if config.max_seconds is not None:
        progress = max(progress, train_seconds / config.max_seconds)
    return min(progress, 1.0)


def current_epoch(config: TrainConfig, iteration: int, progress: float) -> int:
    """The (0-based) epoch of meta-iteration ``iteration``: ``progress`` x ``--epochs`` where
    ``--epochs`` is set, else every ``--iterations_per_epoch`` iterations."""
    if config.epochs is not None:
        return min(int(progress * config.epochs), config.epochs - 1)
    return (iteration - 1) // config.iterations_per_epoch


@dataclass(frozen=True)
class TrainResult:
    run_dir: Path
    algorithm: MetaAlgorithm
    seconds_per_iteration: float
    """Median wall-clock seconds of a meta-iteration (data, meta-gradient, outer step)."""
    final_loss: float
    iterations: int
    """Meta-iterations completed (fewer than configured when --max_seconds ran out)."""
    train_seconds: float
    """Training time summed over the run's sessions (the --max_seconds clock)."""
    step_memory_mb: float
    """The most memory a meta-step took above what the process held before it, over every
    session of the run (``diffopt.memory.StepMemory``: resident set, or CUDA allocation)."""


def default_run_dir(config: TrainConfig) -> Path:
    return Path("runs") / f"{config.dataset}-{config.algorithm}-{time.strftime('%Y%m%d-%H%M%S')}"


def _random_state() -> dict:
    """Every global random state a run may touch (python, numpy, torch), as checkpointable values."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)),
                      "position": position, "has_gauss": has_gauss, "gauss": gauss}}


def _set_random_state(state: dict) -> None:
    random.setstate(_as_tuples(state["python"]))
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["position"],
                         n["has_gauss"], n["gauss"]))


def _as_tuples(value):
    """Lists back to the nested tuples ``random.setstate`` wants."""
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def resume(run_dir: str | Path, *, progress: bool | None = None) -> TrainResult:
    """Continue the run in ``run_dir`` from its checkpoint, exactly as if it had never stopped.

    The checkpoint holds the config, the meta-parameters (and buffers), the outer optimizer and
    schedule, the iteration and every global random state; the task stream restarts at the next
    task. Metrics logged after the checkpoint are dropped and recomputed.
    """
    run_dir = Path(run_dir)
    payload = load_checkpoint(run_dir)
    overrides: dict = dict(run_dir=str(run_dir))
    if progress is not None:
        overrides["progress"] = progress
    return train(resolve_saved_config(payload["config"], **overrides), resume_from=payload)


def train(config: TrainConfig, *, resume_from: dict | None = None) -> TrainResult:
    """Meta-train as ``config`` says; write the run folder; return the trained algorithm.

    ``resume_from``: a checkpoint of this run to continue from (see ``resume``).

    Under torchrun each rank trains on its shard of every meta-batch and the meta-gradients are
    averaged before the outer step (``diffopt.distributed``); rank 0 alone writes the run folder.
    """
    spec = get_dataset(config.dataset)
    distributed.check_meta_batch(config.meta_batch_size)
    if config.keep_freed_memory:
        keep_freed_memory()
    done = 0 if resume_from is None else int(resume_from["iteration"])
    if resume_from is None:  # python's and numpy's global generators too: a function of the seed
        random.seed(config.seed)
        np.random.seed(config.seed % 2**32)
    loader = spec.loader(  # first: a missing dataset is reported before anything else happens
        "train", seed=config.seed, shots=config.train_shots or config.shots,
        test_shots=config.test_shots, ways=config.ways, batch_size=config.meta_batch_size,
        num_tasks=config.iterations * config.meta_batch_size, num_workers=config.num_workers,
        start=done * config.meta_batch_size, **config.data_options(),
    )
    distributed.init(config.device)
    algorithm = build(config)
    if config.init_from is not None and resume_from is None:
        restore_module(algorithm, load_checkpoint(config.init_from)["algorithm"],
                       checkpoint_path(config.init_from))
    outer = outer_step(config)
    optimizer = outer.optimizer(algorithm.parameters())
    folder = RunFolder(config.run_dir or default_run_dir(config), writer=distributed.is_main())
    # The loader's iterator draws its base seed from torch's global generator: draw it before a
    # resumed run restores the random state, as the uninterrupted run drew it before iteration 1.
    batches = iter(loader)
    with folder.locked():
        if resume_from is None:
            folder.start(config.to_dict())
        else:
            restore_module(algorithm, resume_from["algorithm"], folder.checkpoint)
            algorithm.inner.carried_state = resume_from.get("inner_state")
            optimizer.load_state_dict(resume_from["outer_optimizer"])
            _set_random_state(resume_from["random_state"])
            folder.rewind(done)
        distributed.broadcast_module(algorithm)
        try:
            return _Sitting(config, spec, algorithm, outer, optimizer, folder, resume_from).run(batches)
        except Exception as error:  # a crash (a user's rule, model, bad steps) leaves its mark
            folder.mark_failed(error)
            raise


def meta_step(algorithm: MetaAlgorithm, optimizer: torch.optim.Optimizer, episode: Episode,
              outer: OuterStep, memory: StepMemory) -> tuple[dict[str, float], float, bool, dict]:
    """One outer step on ``episode``'s meta-gradient, averaged over torchrun ranks and clipped as
    ``outer`` says (``memory`` measures it). A non-finite loss, gradient or new parameter skips
    it: parameters, optimizer state and running statistics stay as they were.

    Returns the metrics (the same on every rank), the gradient norm before norm clipping, whether
    the step was taken, and where its time went: ``gradient_seconds`` (the meta-gradient, averaged
    over ranks) and ``outer_seconds`` (clipping and the guarded outer step).
    """
    optimizer.zero_grad(set_to_none=True)
    buffers = [b.clone() for b in algorithm.buffers()]  # running statistics, if any
    with memory.measured():
        began = time.perf_counter()
        metrics = algorithm.meta_gradient(episode)
        distributed.all_reduce_grads(algorithm)
        computed = time.perf_counter()
        metrics = distributed.mean_over_ranks(metrics)  # every rank decides alike below
        norm = outer.clip(algorithm.parameters())
        taken = (math.isfinite(metrics["loss"]) and bool(torch.isfinite(norm))
                 and guarded_step(algorithm, optimizer))
        stepped = time.perf_counter()
    timings = {"gradient_seconds": computed - began, "outer_seconds": stepped - computed}
    if not taken:
        with torch.no_grad():
            for buffer, saved in zip(algorithm.buffers(), buffers, strict=True):
                buffer.copy_(saved)
    return metrics, float(norm), taken, timings


def follow_schedule(config: TrainConfig, outer: OuterStep, algorithm: MetaAlgorithm,
                    optimizer: torch.optim.Optimizer, iteration: int, train_seconds: float) -> None:
    """Set meta-iteration ``iteration``'s outer learning rate and tell the algorithm its epoch
    (``MetaAlgorithm.on_epoch``: MAML's MAML++ recipe)."""
    progress = run_progress(config, iteration, train_seconds)
    algorithm.on_epoch(current_epoch(config, iteration, progress))
    outer.set_learning_rate(optimizer, progress)


def _next_multiple(clock: float, every: float | None) -> float:
    """The first multiple of ``every`` seconds after ``clock`` (never, if ``every`` is None)."""
    return math.inf if every is None else (math.floor(clock / every) + 1) * every


class _Sitting:
    """One sitting of a run, from its checkpoint (or the start) to ``--iterations`` or the time
    budget: the loop with its training clock and counters, all of which the checkpoint keeps."""

    def __init__(self, config: TrainConfig, spec, algorithm: MetaAlgorithm, outer: OuterStep,
                 optimizer: torch.optim.Optimizer, folder: RunFolder, resume_from: dict | None) -> None:
        self.config, self.spec, self.algorithm, self.optimizer, self.folder = (
            config, spec, algorithm, optimizer, folder)
        self.outer = outer
        saved = resume_from or {}
        self.fresh = resume_from is None
        self.done = int(saved.get("iteration", 0))
        self.clock = float(saved.get("train_seconds", 0.0))
        """Training seconds over every sitting (the --max_seconds clock; validation excluded)."""
        self.skipped = int(saved.get("skipped_steps", 0))
        self.memory = StepMemory(config.device)
        self.memory.peak_growth_mb = float(saved.get("step_memory_mb", 0.0))

    def payload(self, iteration: int) -> dict:
        """The checkpoint after meta-iteration ``iteration``: everything ``resume`` needs."""
        return {
            "config": self.config.to_dict(), "iteration": iteration,
            "algorithm": self.algorithm.state_dict(), "outer_optimizer": self.optimizer.state_dict(),
            "inner_state": self.algorithm.inner.carried_state, "random_state": _random_state(),
            "train_seconds": self.clock, "step_memory_mb": self.memory.peak_growth_mb,
            "skipped_steps": self.skipped,
        }

    def validate(self, iteration: int) -> None:
        """Score the validation tasks into validation.jsonl (and best/ with --keep_best); the
        training random streams are left untouched."""
        config = self.config
        state = _random_state()
        evaluation = evaluate(
            self.algorithm, self.spec, shots=config.shots, test_shots=self.spec.eval_test_shots,
            ways=config.ways, tasks=config.validation_tasks, steps=(config.validation_steps,),
            split="val", device=config.device, **config.data_options())
        _set_random_state(state)
        mean, ci95 = evaluation.summary(config.validation_steps)
        self.folder.log_validation({"iteration": iteration, "train_seconds": self.clock,
                                    "steps": config.validation_steps, evaluation.metric: mean,
                                    "ci95": ci95})
        if config.keep_best:
            self.folder.keep_if_best(iteration, mean, config.keep_best, self.spec.lower_is_better,
                                     lambda: self.payload(iteration))

    def run(self, batches: Iterator) -> TrainResult:
        """Meta-train on ``batches`` (the loader's iterator, at the next task), logging every
        iteration, validating and checkpointing as the config says."""
        config, folder, algorithm = self.config, self.folder, self.algorithm
        next_validation = _next_multiple(self.clock, config.validate_every_seconds)
        next_snapshot = _next_multiple(self.clock, config.snapshot_every_seconds)
        validating = config.validate_every_seconds is not None or config.validate_every > 0
        durations: list[float] = []
        metrics: dict[str, float] = {}
        bad_in_row = 0
        completed = validated = self.done  # a resumed run validated up to its checkpoint
        if validating and self.fresh:
            self.validate(0)
        timed = config.max_seconds is not None  # the bar counts what ends the run
        bar = progress_bar(total=math.ceil(config.max_seconds) if timed else config.iterations,
                           initial=int(self.clock) if timed else self.done, unit="s" if timed else "it",
                           leave=False, disable=not (config.progress and folder.writer),
                           desc=config.algorithm)
        with folder.metrics_log() as log:
            start = booked = time.perf_counter()
            for iteration, batch in enumerate(batches, start=self.done + 1):
                if config.max_seconds is not None and self.clock >= config.max_seconds:
                    break
                episode = distributed.shard(Episode.from_torchmeta(batch, device=config.device))
                data_seconds = time.perf_counter() - booked  # the loader's and the episode's
                follow_schedule(config, self.outer, algorithm, self.optimizer, iteration, self.clock)
                metrics, norm, taken, timings = meta_step(algorithm, self.optimizer, episode, self.outer,
                                                          self.memory)
                bad_in_row = 0 if taken else bad_in_row + 1
                self.skipped += not taken
                now = time.perf_counter()
                metrics = distributed.mean_over_ranks({**metrics, "seconds": now - start})
                durations.append(metrics.pop("seconds"))  # the same clock on every rank
                self.clock += durations[-1]
                start = now
                completed = iteration
                record = {"iteration": iteration, **metrics, "lr": self.optimizer.param_groups[0]["lr"],
                          "grad_norm": norm, "seconds": durations[-1], "train_seconds": self.clock,
                          "data_seconds": data_seconds, **timings}
                if not taken:
                    record["skipped"] = True
                record.update(algorithm.iteration_record())
                log.write(json.dumps(record) + "\n")
                log.flush()  # followers (diffopt compare's progress bar) see every iteration
                bar.update(min(int(self.clock), bar.total) - bar.n if timed else 1)  # whole seconds
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", refresh=False)  # drawn with the next update
                if self.clock >= next_validation or (
                        config.validate_every and iteration % config.validate_every == 0):
                    self.validate(iteration)
                    validated = iteration
                    next_validation = _next_multiple(self.clock, config.validate_every_seconds)
                    start = time.perf_counter()  # validation is not training time
                if self.clock >= next_snapshot:
                    folder.snapshot(iteration, self.payload(iteration))
                    next_snapshot = _next_multiple(self.clock, config.snapshot_every_seconds)
                    start = time.perf_counter()  # nor is writing a snapshot
                if bad_in_row > config.max_bad_steps:
                    # the last good parameters: the skipped steps changed nothing
                    folder.save(self.payload(iteration))
                    raise DiffoptError(
                        f"{bad_in_row} meta-iterations in a row (up to {iteration}) gave a non-finite "
                        f"meta-loss, meta-gradient or parameters; {folder.checkpoint} holds "
                        "the last good parameters; lower --meta_lr or --inner_lr, or set --max_grad_norm")
                if config.checkpoint_every and iteration % config.checkpoint_every == 0:
                    folder.save(self.payload(iteration))  # after the log line: the log reaches the checkpoint
                booked = time.perf_counter()  # the next iteration's data starts here
        bar.close()
        if validating and validated != completed:
            self.validate(completed)
        folder.save(self.payload(completed))
        median = statistics.median(durations) if durations else float("nan")
        return TrainResult(folder.path, algorithm, median, metrics.get("loss", float("nan")), completed,
                           self.clock, self.memory.peak_growth_mb)
