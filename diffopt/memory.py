"""How much memory a meta-step needs: the peak during the step above what the process held before it.

On the CPU the peak is Linux's high-water mark of the resident set (``VmHWM``), reset to the
current resident size (``VmRSS``) before the step by writing 5 to ``/proc/self/clear_refs``; on
CUDA, torch's peak allocation since ``reset_peak_memory_stats``. A process's lifetime peak (what
``getrusage`` reports) mixes the step with imports, the dataset and cached images; the growth
during the step is what differs between algorithms (second-order graphs, more inner steps).
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")
_STATM = Path("/proc/self/statm")
_CLEAR_REFS = Path("/proc/self/clear_refs")
_PAGE_MB = os.sysconf("SC_PAGE_SIZE") / 2**20 if hasattr(os, "sysconf") else 0.0


def resident_mb() -> dict[str, float]:
    """{'VmRSS': current, 'VmHWM': peak since the last reset} resident set size in MiB (Linux)."""
    with open(_STATUS, "rb") as file:  # bytes, not read_text: this runs around every meta-step
        text = file.read()
    return {key.decode(): int(kib) / 1024 for key, kib in re.findall(rb"(VmHWM|VmRSS):\s+(\d+) kB", text)}


def _current_resident_mb() -> float:
    """VmRSS alone, from statm (its second field, in pages): a third of parsing the status."""
    with open(_STATM, "rb") as file:
        return int(file.read().split()[1]) * _PAGE_MB


def reset_resident_peak() -> bool:
    """Set the resident high-water mark to the current resident size; whether this system can."""
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


class StepMemory:
    """The largest growth of memory over the level before a step, over every step ``measured``.

    ``peak_growth_mb`` is NaN where the system cannot measure it (no ``/proc/self/clear_refs``).
    """

    def __init__(self, device: str = "cpu") -> None:
        self.device = torch.device(device)
        self.peak_growth_mb = 0.0

    @contextlib.contextmanager
    def measured(self) -> Iterator[None]:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            before = torch.cuda.memory_allocated(self.device) / 2**20
            yield
            growth = torch.cuda.max_memory_allocated(self.device) / 2**20 - before
        elif reset_resident_peak():
            before = _current_resident_mb()
            yield
            growth = resident_mb()["VmHWM"] - before
        else:
            yield
            growth = float("nan")
        self.peak_growth_mb = max(self.peak_growth_mb, growth) if growth == growth else growth
