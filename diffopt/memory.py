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
from collections.abc import Iterator, Sequence

import torch

_PAGE_MB = os.sysconf("SC_PAGE_SIZE") / 2**20 if hasattr(os, "sysconf") else 0.0
_FILES: dict[str, int] = {}
"""/proc/self file -> a descriptor this process keeps open: a probe runs around every meta-step,
and opening the files costs most of it (44 -> 9 us a step, a sinusoid MAML step being 3 ms)."""
_OPENED_BY: list[int] = []


def _descriptor(name: str, flags: int) -> int:
    """An open descriptor of /proc/self/``name`` of this process (reopened in a forked child: an
    inherited one would read its parent)."""
    if _OPENED_BY != [os.getpid()]:
        _FILES.clear()
        _OPENED_BY[:] = [os.getpid()]
    descriptor = _FILES.get(name)
    if descriptor is None:
        descriptor = _FILES[name] = os.open(f"/proc/self/{name}", flags | os.O_CLOEXEC)
    return descriptor


def resident_mb() -> dict[str, float]:
    """{'VmRSS': current, 'VmHWM': peak since the last reset} resident set size in MiB (Linux)."""
    text = os.pread(_descriptor("status", os.O_RDONLY), 8192, 0)
    return {key.decode(): int(kib) / 1024 for key, kib in re.findall(rb"(VmHWM|VmRSS):\s+(\d+) kB", text)}


def _current_resident_mb() -> float:
    """VmRSS alone, from statm (its second field, in pages): a tenth of reading the status."""
    return int(os.pread(_descriptor("statm", os.O_RDONLY), 256, 0).split()[1]) * _PAGE_MB


def reset_resident_peak() -> bool:
    """Set the resident high-water mark to the current resident size; whether this system can."""
    try:
        os.write(_descriptor("clear_refs", os.O_WRONLY), b"5")
        return True
    except OSError:
        return False


def available_bytes(device: torch.device) -> int | None:
    """Memory free for new tensors on ``device`` now: CUDA's free memory, on the CPU Linux's
    ``MemAvailable``; None where unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo", "rb") as file:
            match = re.search(rb"MemAvailable:\s+(\d+) kB", file.read())
    except OSError:
        return None
    return int(match.group(1)) * 1024 if match else None


def graph_bytes(tensors: Sequence[torch.Tensor], exclude: Sequence[torch.Tensor] = ()) -> int:
    """Bytes of the distinct storages ``tensors`` and the tensors their autograd graph saved for
    its backward hold, but those of ``exclude`` (the parameters, held anyway)."""
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    storages: dict[int, int] = {}

    def note(value: object) -> None:
        for tensor in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(tensor, torch.Tensor) and tensor.untyped_storage().data_ptr() not in excluded:
                storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()

    note(list(tensors))
    stack, seen = [t.grad_fn for t in tensors if t.grad_fn is not None], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for name in dir(node):
            if name.startswith("_saved_"):
                with contextlib.suppress(RuntimeError):  # freed by a backward
                    note(getattr(node, name))
        stack.extend(following for following, _ in node.next_functions)
    return sum(storages.values())


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
