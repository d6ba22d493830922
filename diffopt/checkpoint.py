"""Checkpoints and run-folder files: written atomically, read with ``weights_only=True``.

A checkpoint is a dict of plain values and tensors::

    {"format": "diffopt-checkpoint", "version": 1, "config": TrainConfig.to_dict(),
     "iteration": int, "algorithm": state_dict, "outer_optimizer": state_dict,
     "random_state": dict, "train_seconds": float, "step_memory_mb": float, "skipped_steps": int}
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffopt.errors import DiffoptError

FORMAT = "diffopt-checkpoint"
VERSION = 1
CHECKPOINT_NAME = "checkpoint.pt"


def temporary_sibling(path: Path) -> str:
    """A new empty file next to ``path``, with the permissions a plain ``open`` would give it."""
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    return tmp


@contextmanager
def atomic_path(path: Path) -> Iterator[str]:
    """A temporary file name next to ``path``, for writers that want a name (h5py): renamed to
    ``path`` when the block ends normally, removed when it raises. Never a partial ``path``."""
    tmp = temporary_sibling(Path(path))
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _atomic_write(path: Path, write) -> None:
    """Write via a temporary file in the same folder, synced, then rename: never a partial file.
    A failed write (a full disk, ...) is a one-line DiffoptError; the file there before is intact."""
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
    except OSError as error:
        reason = error.strerror or str(error) or type(error).__name__
        raise DiffoptError(f"could not write {path} ({reason}); what was there before is intact: "
                           "make room, then continue (a run: diffopt train --resume)") from None


def write_text(path: Path, text: str) -> None:
    """Atomically write ``text``."""
    _atomic_write(path, lambda s: s.write(text.encode()))


def write_json(path: Path, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON."""
    _atomic_write(path, lambda s: s.write((json.dumps(obj, indent=2) + "\n").encode()))


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Atomically save ``payload`` (format and version tags are added)."""
    _atomic_write(path, lambda s: torch.save({"format": FORMAT, "version": VERSION, **payload}, s))


def checkpoint_path(run_or_file: str | os.PathLike) -> Path:
    """The checkpoint file of a run folder, or the file itself."""
    path = Path(run_or_file)
    return path / CHECKPOINT_NAME if path.is_dir() else path


def load_checkpoint(run_or_file: str | os.PathLike) -> dict[str, Any]:
    """Load and sanity-check a checkpoint; DiffoptError in one line if it cannot be used."""
    path = checkpoint_path(run_or_file)
    if not path.is_file():
        raise DiffoptError(
            f"no checkpoint at {path}: pass a run folder written by `diffopt train` or its "
            f"{CHECKPOINT_NAME}"
        )
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated zip, garbage bytes, unpickling refused, ...
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DiffoptError(f"checkpoint {path} is corrupt or truncated ({reason[:120]})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise DiffoptError(f"{path} is not a diffopt checkpoint")
    if payload.get("version") != VERSION:
        raise DiffoptError(
            f"checkpoint {path} has format version {payload.get('version')!r}; this diffopt "
            f"reads version {VERSION}: use the diffopt release that wrote it"
        )
    return payload


def restore_module(module: nn.Module, state: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """``module.load_state_dict(state)``, with a one-line error if the architectures differ."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or mismatched:
        if mismatched:
            key = mismatched[0]
            detail = f"{key} has shape {tuple(state[key].shape)} there, {tuple(own[key].shape)} here"
        else:
            detail = f"missing {missing[:2]}" if missing else f"unexpected {unexpected[:2]}"
        raise DiffoptError(
            f"checkpoint {checkpoint_path(path)} is for another architecture ({detail}); "
            "use the same model options it was trained with"
        )
    module.load_state_dict(state)


LOCK_NAME = ".writer.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


@contextmanager
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
