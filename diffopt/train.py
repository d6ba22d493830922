"""Meta-training: loader -> episode -> algorithm.meta_gradient -> outer step, logged to a run folder.

A run folder holds ``config.json``, ``metrics.jsonl`` (one JSON object per logged iteration)
and ``checkpoint.pt`` (see ``diffopt.checkpoint``).
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from diffopt.algorithms import MAML, MetaAlgorithm, build_algorithm
from diffopt.algorithms.mamlpp import apply_recipe
from diffopt.checkpoint import (
    CHECKPOINT_NAME,
    load_checkpoint,
    restore_module,
    save_checkpoint,
    write_json,
)
from diffopt.config import TrainConfig
from diffopt.data import Episode, get_dataset
from diffopt.errors import DiffoptError
from diffopt.inner import InnerLoop
from diffopt.models import build_model


def build(config: TrainConfig) -> MetaAlgorithm:
    """The algorithm (model and inner loop) a config describes, freshly initialised from its seed."""
    spec = get_dataset(config.dataset)
    torch.manual_seed(config.seed)
    io = dict(spec.model_io, out_features=config.ways) if spec.classification else spec.model_io
    model = build_model(config.model, hidden=config.hidden, activation=config.activation,
                        norm=config.norm, steps=config.inner_steps, **io)
    inner = InnerLoop(config.inner_optimizer, config.inner_lr, config.inner_steps, model=model)
    algorithm = build_algorithm(config.algorithm, model, inner, spec.loss, config.vectorize)
    try:
        return algorithm.to(config.device)
    except (RuntimeError, AssertionError) as error:
        raise DiffoptError(f"--device {config.device!r} is not usable here ({error})") from None


def outer_optimizer(config: TrainConfig, algorithm: MetaAlgorithm):
    """The outer optimizer and its per-iteration learning-rate schedule (stepped each iteration)."""
    cls = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}[config.outer_optimizer]
    optimizer = cls(algorithm.parameters(), lr=config.meta_lr)
    final = config.meta_lr if config.meta_lr_final is None else config.meta_lr_final
    if config.meta_lr_schedule == "cosine":  # MAML++: cosine annealing to the final rate
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=config.iterations, eta_min=final)
        return optimizer, scheduler

    def factor(iteration: int) -> float:  # linear from meta_lr to final over the run (or constant)
        done = min(iteration / config.iterations, 1.0) if config.meta_lr_schedule == "linear" else 0.0
        return (1 - done) + done * final / config.meta_lr

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass(frozen=True)
class TrainResult:
    run_dir: Path
    algorithm: MetaAlgorithm
    seconds_per_iteration: float
    """Median wall-clock seconds of a meta-iteration (data, meta-gradient, outer step)."""
    final_loss: float


def default_run_dir(config: TrainConfig) -> Path:
    return Path("runs") / f"{config.dataset}-{config.algorithm}-{time.strftime('%Y%m%d-%H%M%S')}"


def train(config: TrainConfig) -> TrainResult:
    """Meta-train as ``config`` says; write the run folder; return the trained algorithm."""
    spec = get_dataset(config.dataset)
    loader = spec.loader(  # first: a missing dataset is reported before anything else happens
        "train", seed=config.seed, shots=config.shots, test_shots=config.test_shots,
        ways=config.ways, batch_size=config.meta_batch_size,
        num_tasks=config.iterations * config.meta_batch_size, num_workers=config.num_workers,
        root=config.data_root,
    )
    algorithm = build(config)
    if config.init_from is not None:
        restore_module(algorithm, load_checkpoint(config.init_from)["algorithm"], config.init_from)
    optimizer, scheduler = outer_optimizer(config, algorithm)
    run_dir = Path(config.run_dir) if config.run_dir else default_run_dir(config)
    if (run_dir / CHECKPOINT_NAME).exists():
        raise DiffoptError(f"{run_dir} already holds a run; choose another --run_dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / "config.json", config.to_dict())

    def checkpoint(iteration: int) -> None:
        save_checkpoint(run_dir / CHECKPOINT_NAME, {
            "config": config.to_dict(), "iteration": iteration,
            "algorithm": algorithm.state_dict(), "outer_optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
        })

    durations: list[float] = []
    metrics: dict[str, float] = {}
    bar = tqdm(total=config.iterations, disable=not config.progress, desc=config.algorithm,
               dynamic_ncols=True, leave=False)
    with open(run_dir / "metrics.jsonl", "w") as log:
        start = time.perf_counter()
        for iteration, batch in enumerate(loader, start=1):
            episode = Episode.from_torchmeta(batch, device=config.device)
            if isinstance(algorithm, MAML):
                apply_recipe(algorithm, iteration, iterations_per_epoch=config.iterations_per_epoch,
                             multi_step_loss_epochs=config.multi_step_loss_epochs,
                             first_order_epochs=config.first_order_epochs)
            optimizer.zero_grad(set_to_none=True)
            metrics = algorithm.meta_gradient(episode)
            optimizer.step()
            scheduler.step()
            now = time.perf_counter()
            durations.append(now - start)
            start = now
            record = {"iteration": iteration, **metrics, "lr": optimizer.param_groups[0]["lr"],
                      "seconds": durations[-1]}
            if isinstance(algorithm, MAML):
                record["first_order"] = algorithm.first_order
            log.write(json.dumps(record) + "\n")
            bar.update()
            bar.set_postfix(loss=f"{metrics['loss']:.4f}")
            if config.checkpoint_every and iteration % config.checkpoint_every == 0:
                checkpoint(iteration)
    bar.close()
    checkpoint(config.iterations)
    return TrainResult(run_dir, algorithm, statistics.median(durations), metrics["loss"])
