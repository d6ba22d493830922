"""Markdown reports: result scripts keep their section of RESULTS.md / BENCHMARKS.md up to date."""

from __future__ import annotations

import os
import platform
import re
from importlib import metadata
from pathlib import Path

from diffopt.atomic import write_text


def write_section(path: str | Path, key: str, title: str, body: str) -> None:
    """Put ``body`` between the ``<!-- key:start -->`` / ``<!-- key:end -->`` markers of the
    markdown file ``path``, replacing what was there, or append it under ``## title`` (the file is
    created if missing, and written atomically)."""
    path = Path(path)
    start, end = f"<!-- {key}:start -->", f"<!-- {key}:end -->"
    section = f"{start}\n{body.strip()}\n{end}"
    text = path.read_text() if path.exists() else f"# {path.stem.title()}\n"
    if start in text and end in text:
        text = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: section, text, flags=re.S)
    else:
        text = text.rstrip("\n") + f"\n\n## {title}\n\n{section}\n"
    write_text(path, text)


def machine_description() -> str:
    """CPU model and core count, e.g. 'AMD EPYC 7B13, 2 cores'."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores"


def library_versions(names: tuple[str, ...] = ("higher", "torchmeta", "numpy")) -> str:
    """'Python 3.11.7, torch 2.14.1, higher 0.2.1, ..., diffopt 0.1.0' (installed ones only)."""
    import torch

    from diffopt import __version__

    parts = [f"Python {platform.python_version()}", f"torch {torch.__version__}"]
    for name in names:
        try:
            parts.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pass
    return ", ".join(parts + [f"diffopt {__version__}"])
