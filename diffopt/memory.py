"""How much memory a meta-step needs: the peak during the step above what the process held before it.

On the CPU the peak is Linux's high-water mark of the resident set (``VmHWM``), reset to the
current resident size (``VmRSS``) before the step by writing 5 to ``/proc/self/clear_refs``; on
CUDA, torch's peak allocation since ``reset_peak_memory_stats``. A process's lifetime peak (what
``getrusage`` reports) mixes the step with imports, the dataset and cached images; the growth
during the step is what differs between algorithms (second-order graphs, more inner steps).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def resident_mb() -> dict[str, float]:
    """{'VmRSS': current, 'VmHWM': peak since the last reset} resident set size in MiB (Linux)."""
    text = _STATUS.read_text()
    return {key: int(kib) / 1024 for key, kib in re.findall(r"(VmHWM|VmRSS):\s+(\d+) kB", text)}


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
            before = resident_mb()["VmRSS"]
            yield
            growth = resident_mb()["VmHWM"] - before
        else:
            yield
            growth = float("nan")
        self.peak_growth_mb = max(self.peak_growth_mb, growth) if growth == growth else growth
