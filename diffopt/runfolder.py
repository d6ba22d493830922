"""A training run's folder: the one place that knows its files' names (config.json,
metrics.jsonl, validation.jsonl, checkpoint.pt, evaluation.json, failed.json, snapshots/, best/),
writes them
under the folder's writer lock and reads them back.

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

from diffopt.atomic import write_json, write_text
from diffopt.checkpoint import read_checkpoint, save_checkpoint
from diffopt.errors import DiffoptError

CHECKPOINT_NAME = "checkpoint.pt"
"""The run's latest checkpoint (``diffopt.checkpoint``'s format)."""
CONFIG_NAME = "config.json"
"""The run's resolved options, written when it starts."""
EVALUATION_NAME = "evaluation.json"
"""A comparison's record of the run: its config, the evaluation settings and the scores."""
FAILURE_NAME = "failed.json"
"""Written when training stops on an error: the error, the last logged meta-iteration and whether
a checkpoint holds earlier progress; removed when the run starts again or resumes."""
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
            (self.path / FAILURE_NAME).unlink(missing_ok=True)  # an earlier attempt's
            write_json(self.path / CONFIG_NAME, config)
            write_text(self.path / METRICS_NAME, "")
            write_text(self.path / VALIDATION_NAME, "")

    def rewind(self, iteration: int) -> None:
        """A resumed run: drop the log lines of iterations after its checkpoint's ``iteration``."""
        if self.writer:
            (self.path / FAILURE_NAME).unlink(missing_ok=True)
            for name in (METRICS_NAME, VALIDATION_NAME):
                write_text(self.path / name, _lines_up_to(self.path / name, iteration))

    def mark_failed(self, error: BaseException) -> None:
        """Record that training stopped on ``error`` (``FAILURE_NAME``)."""
        if self.writer and self.path.is_dir():
            last = self.last_metrics()
            write_json(self.path / FAILURE_NAME, {
                "error": f"{type(error).__name__}: {error}".strip().splitlines()[0][:300],
                "last_iteration": 0 if last is None else last.get("iteration", 0),
                "checkpoint": self.has_checkpoint()})

    def failure(self) -> dict[str, Any] | None:
        """What ``mark_failed`` recorded, or None (the run has not failed, or resumed since)."""
        path = self.path / FAILURE_NAME
        try:
            return json.loads(path.read_text()) if path.is_file() else None
        except (OSError, ValueError):
            return {"error": "unknown (failed.json unreadable)", "last_iteration": 0}

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

    @property
    def checkpoint(self) -> Path:
        return self.path / CHECKPOINT_NAME

    def has_checkpoint(self) -> bool:
        return self.checkpoint.exists()

    def metrics(self) -> list[dict[str, Any]]:
        """The metrics log's records, one per meta-iteration ([] if none)."""
        return _records(self.path / METRICS_NAME)

    def validation(self) -> list[dict[str, Any]]:
        """The validation log's records ([] if the run never validated)."""
        return _records(self.path / VALIDATION_NAME)

    def last_metrics(self) -> dict[str, Any] | None:
        """The metrics log's last complete record, read from its end (a running run's progress:
        cheap however long the log), or None."""
        try:
            with open(self.path / METRICS_NAME, "rb") as file:
                file.seek(max(0, file.seek(0, 2) - 4096))
                lines = file.read().decode(errors="ignore").splitlines()
            return json.loads(lines[-1])
        except (OSError, ValueError, IndexError):
            return None

    def comparison_record(self) -> dict[str, Any] | None:
        """The record ``diffopt compare`` keeps of the run (config, settings, scores), or None."""
        path = self.path / EVALUATION_NAME
        return json.loads(path.read_text()) if path.is_file() else None

    def write_comparison_record(self, record: dict[str, Any]) -> None:
        if self.writer:
            write_json(self.path / EVALUATION_NAME, record)

    def save_evaluation(self, record: dict[str, Any]) -> str:
        """Write ``diffopt evaluate``'s ``record`` to ``eval-k<K>-<trans|nontrans>-<protocol
        digest>.json``, one file per protocol: another protocol adds a file, never replaces one.
        The same protocol again keeps its file if the numbers are the same, and otherwise adds a
        numbered one. Returns what happened, naming the file."""
        import hashlib

        protocol = record["protocol"]
        digest = hashlib.sha1(json.dumps(protocol, sort_keys=True).encode()).hexdigest()[:10]
        mode = "trans" if protocol["transductive"] else "nontrans"
        path = self.path / f"eval-k{protocol['shots']}-{mode}-{digest}.json"
        if path.exists():
            try:
                earlier = json.loads(path.read_text())
            except (OSError, ValueError):
                earlier = None
            if earlier is not None and earlier.get("scores") == json.loads(json.dumps(record["scores"])):
                return f"same protocol as {path}: same numbers (kept)"
            number = 2
            while (self.path / f"{path.stem}-{number}.json").exists():
                number += 1
            path = self.path / f"{path.stem}-{number}.json"
            write_json(path, record)
            return f"same protocol as an earlier evaluation, other numbers: wrote {path}"
        write_json(path, record)
        return f"wrote {path}"

    def snapshots(self) -> list[Path]:
        """The ``--snapshot_every_seconds`` checkpoints, oldest first."""
        return sorted((self.path / SNAPSHOT_FOLDER).glob("*.pt"))

    def keep_if_best(self, iteration: int, score: float, keep: int, lower_is_better: bool,
                     payload: Callable[[], dict[str, Any]]) -> None:
        """Keep this validation's checkpoint among the ``keep`` best (see ``keep_if_best``)."""
        if self.writer:
            keep_if_best(self.path / BEST_FOLDER, iteration, score, keep, lower_is_better,
                         lambda path: self.save(payload(), path))


def _records(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines log, a line cut by a kill skipped."""
    records = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


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


def checkpoint_path(run_or_file: str | os.PathLike) -> Path:
    """The checkpoint file of a run folder, or the file itself."""
    path = Path(run_or_file)
    return path / CHECKPOINT_NAME if path.is_dir() else path


def load_checkpoint(run_or_file: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint of a run folder, or of a checkpoint file; DiffoptError in one line if it
    cannot be used (a run that failed before its first checkpoint says so)."""
    path = Path(run_or_file)
    folder = RunFolder(path, writer=False)
    if path.is_dir() and not folder.has_checkpoint() and (failure := folder.failure()) is not None:
        raise DiffoptError(f"run {path} failed before its first checkpoint, after meta-iteration "
                           f"{failure['last_iteration']} ({failure['error']}); fix the cause and train it "
                           f"again (see {path / FAILURE_NAME})")
    return read_checkpoint(checkpoint_path(run_or_file),
                           f"a run folder written by `diffopt train` or its {CHECKPOINT_NAME}")


LOCK_NAME = ".writer.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


@contextlib.contextmanager
def run_folder_lock(run_dir: Path) -> Iterator[None]:
    """Hold ``run_dir`` for this process: a second writer (train, resume, compare) on it is
    refused with a one-line error naming the process; a lock left by a process that is gone (a
    crash, SIGKILL) is taken over. The folder is created if needed."""
    import socket

    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_dir / LOCK_NAME
    me = {"pid": os.getpid(), "host": socket.gethostname()}
    for _ in range(3):
        try:
            handle = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = json.loads(lock.read_text())
            except (OSError, ValueError):
                holder = {}
            if holder.get("host") == me["host"] and isinstance(holder.get("pid"), int) \
                    and holder["pid"] != me["pid"] and _alive(holder["pid"]):
                raise DiffoptError(f"{run_dir} is being written by process {holder['pid']} on this "
                                   "machine; wait for it to end, or stop it first") from None
            if holder.get("host") not in (None, me["host"]):
                raise DiffoptError(f"{run_dir} is held by process {holder.get('pid')} on "
                                   f"{holder['host']}; if that process is gone, delete {lock}") from None
            lock.unlink(missing_ok=True)  # stale: its process is gone
            continue
        with os.fdopen(handle, "w") as stream:
            json.dump(me, stream)
        break
    else:
        raise DiffoptError(f"could not take the lock {lock}; delete it if no process writes {run_dir}")
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)
