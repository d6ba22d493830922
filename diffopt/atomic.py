"""Files written atomically: a temporary file in the same folder, synced, then renamed, so a
crash or a full disk never leaves a partial file and what was there before stays intact."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from diffopt.errors import DiffoptError


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


def write_atomically(path: Path, write) -> None:
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
    write_atomically(path, lambda s: s.write(text.encode()))


def write_json(path: Path, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON."""
    write_atomically(path, lambda s: s.write((json.dumps(obj, indent=2) + "\n").encode()))
