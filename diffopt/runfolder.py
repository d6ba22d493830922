"""A training run's folder: the one place that writes config.json, metrics.jsonl,
validation.jsonl, checkpoint.pt, snapshots/ and best/, under the folder's writer lock.

Every file is written atomically or appended line by line, so a crash leaves the last complete
checkpoint and whole log lines (a resumed run drops the lines after its checkpoint).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from diffopt.checkpoint import CHECKPOINT_NAME, run_folder_lock, save_checkpoint, write_json, write_text
from diffopt.errors import DiffoptError

METRICS_NAME = "metrics.jsonl"
"""One JSON object per meta-iteration: loss, learning rate, gradient norm, seconds, ..."""
VALIDATION_NAME = "validation.jsonl"
"""One JSON object per validation: iteration, training seconds, steps, score and its interval."""
SNAPSHOT_FOLDER = "snapshots"
"""``--snapshot_every_seconds`` checkpoints, ``<iteration>.pt``."""
BEST_FOLDER = "best"
"""Where ``--keep_best`` keeps checkpoints: ``<iteration>.pt`` and ``index.json``, a list of
{"iteration", "score"} best first."""


class RunFolder:
    """The files of one run. ``writer=False`` (a torchrun rank other than 0): the same calls,
    nothing written."""

    def __init__(self, path: str | os.PathLike, writer: bool = True) -> None:
        self.path = Path(path)
        self.writer = writer

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the folder for this process (a second writer is refused, see run_folder_lock)."""
        with run_folder_lock(self.path) if self.writer else contextlib.nullcontext():
            yield

    def start(self, config: dict[str, Any]) -> None:
        """A new run: refuse a folder that already holds one; write the config, empty logs."""
        if (self.path / CHECKPOINT_NAME).exists():
            raise DiffoptError(f"{self.path} already holds a run; choose another --run_dir, or "
                               f"continue it with `diffopt train --resume {self.path}`")
        if self.writer:
            self.path.mkdir(parents=True, exist_ok=True)
            write_json(self.path / "config.json", config)
            write_text(self.path / METRICS_NAME, "")
            write_text(self.path / VALIDATION_NAME, "")

    def rewind(self, iteration: int) -> None:
        """A resumed run: drop the log lines of iterations after its checkpoint's ``iteration``."""
        if self.writer:
            for name in (METRICS_NAME, VALIDATION_NAME):
                write_text(self.path / name, _lines_up_to(self.path / name, iteration))

    def metrics_log(self) -> IO[str]:
        """The metrics log, open for appending (``os.devnull`` for a non-writer)."""
        return open(self.path / METRICS_NAME if self.writer else os.devnull, "a")

    def log_validation(self, record: dict[str, Any]) -> None:
        if self.writer:
            with open(self.path / VALIDATION_NAME, "a") as out:
                out.write(json.dumps(record) + "\n")

    def save(self, payload: dict[str, Any], path: Path | None = None) -> None:
        """Write a checkpoint, ``checkpoint.pt`` unless ``path`` says otherwise."""
        if self.writer:
            save_checkpoint(path or self.path / CHECKPOINT_NAME, payload)

    def snapshot(self, iteration: int, payload: dict[str, Any]) -> None:
        if self.writer:
            (self.path / SNAPSHOT_FOLDER).mkdir(exist_ok=True)
            self.save(payload, self.path / SNAPSHOT_FOLDER / f"{iteration:08d}.pt")

    def keep_if_best(self, iteration: int, score: float, keep: int, lower_is_better: bool,
                     payload: Callable[[], dict[str, Any]]) -> None:
        """Keep this validation's checkpoint among the ``keep`` best (see ``keep_if_best``)."""
        if self.writer:
            keep_if_best(self.path / BEST_FOLDER, iteration, score, keep, lower_is_better,
                         lambda path: self.save(payload(), path))


def _lines_up_to(path: Path, iteration: int) -> str:
    """The complete lines of a JSON-lines log that belong to iterations <= ``iteration``."""
    kept = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a kill
            continue
        if record.get("iteration", iteration + 1) <= iteration:
            kept.append(line + "\n")
    return "".join(kept)


def keep_if_best(folder: Path, iteration: int, score: float, keep: int, lower_is_better: bool,
                 save: Callable[[Path], None]) -> None:
    """Keep the checkpoint of the validation at ``iteration`` (``save(path)`` writes it) if its
    ``score`` is among the ``keep`` best so far, dropping the one it displaces; the index is
    rewritten last, so a crash leaves at worst an unlisted file."""
    index_path = folder / "index.json"
    kept = json.loads(index_path.read_text()) if index_path.exists() else []
    kept = [entry for entry in kept if entry["iteration"] != iteration]  # a resumed run's repeat
    ranked = sorted(kept + [{"iteration": iteration, "score": score}],
                    key=lambda entry: entry["score"] if lower_is_better else -entry["score"])
    best = ranked[:keep]
    if any(entry["iteration"] == iteration for entry in best):
        folder.mkdir(parents=True, exist_ok=True)
        save(folder / f"{iteration:08d}.pt")
    write_json(index_path, best)
    for entry in ranked[keep:]:
        (folder / f"{entry['iteration']:08d}.pt").unlink(missing_ok=True)


def best_checkpoints(run: str | Path, count: int) -> list[Path]:
    """The checkpoints of run folder ``run``'s ``count`` best validations (``--keep_best``)."""
    index_path = Path(run) / BEST_FOLDER / "index.json"
    kept = json.loads(index_path.read_text()) if index_path.exists() else []
    if len(kept) < count:
        raise DiffoptError(f"{run} kept {len(kept)} best checkpoints; --ensemble {count} needs a run "
                           f"trained with --keep_best {count} or more (and validation)")
    return [Path(run) / BEST_FOLDER / f"{entry['iteration']:08d}.pt" for entry in kept[:count]]
