"""The memory column: growth over the level before a step, not the process's lifetime peak."""

from __future__ import annotations

import ctypes
import math

import pytest
import torch

from diffopt.memory import StepMemory, reset_resident_peak, resident_mb

pytestmark = pytest.mark.skipif(not reset_resident_peak(), reason="no /proc/self/clear_refs here")


def release_freed_memory() -> None:
    """Hand memory earlier tests freed back to the system: once an in-process run has told glibc
    to keep freed memory (diffopt.allocator), a new allocation reuses resident pages and the
    resident set would not grow (tests/test_imaml.py frees about 750 MB just before)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def test_a_step_that_allocates_256_mb_measures_about_that_and_one_that_does_not_measures_little():
    """The yardstick is measured in this process: the resident growth of touching the 256 MiB
    tensor the process then holds (not counted by later steps). A step that touches as much
    again measures about that growth; a step that allocates nothing measures a small part of it;
    the measure keeps the largest step."""
    release_freed_memory()
    before = resident_mb()["VmRSS"]
    held = torch.ones(64 * 2**20)  # 256 MiB the process holds before the steps: not counted
    yardstick = resident_mb()["VmRSS"] - before
    assert yardstick > 0.5 * held.nbytes / 2**20, yardstick  # the pages were touched
    memory = StepMemory("cpu")
    with memory.measured():
        pass
    assert memory.peak_growth_mb < 0.1 * yardstick, (memory.peak_growth_mb, yardstick)
    with memory.measured():
        step = torch.ones(64 * 2**20)  # 256 MiB, touched
        del step
    largest = memory.peak_growth_mb
    assert 0.8 * yardstick < largest < 1.2 * yardstick, (largest, yardstick)
    with memory.measured():
        pass
    assert memory.peak_growth_mb == largest  # the largest over the steps
    assert held.sum() > 0


def test_cannot_measure_gives_nan(monkeypatch):
    from diffopt import memory as module

    monkeypatch.setattr(module, "reset_resident_peak", lambda: False)
    memory = StepMemory("cpu")
    with memory.measured():
        pass
    assert math.isnan(memory.peak_growth_mb)


def _child_growth_mb(queue) -> None:
    """In a forked child: the resident growth of touching 128 MiB, as resident_mb reads it."""
    torch.set_num_threads(1)  # as torch's DataLoader workers: a parent's OpenMP pool does not survive fork
    before = resident_mb()["VmRSS"]
    touched = torch.ones(32 * 2**20)
    queue.put(resident_mb()["VmRSS"] - before)
    del touched


def test_a_forked_child_reads_its_own_memory_not_its_parents():
    """The probe keeps /proc/self files open; a child forked after the parent opened them (a
    data-loader worker) must not read the parent's through the inherited descriptors."""
    import multiprocessing

    resident_mb()  # opened in the parent
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_child_growth_mb, args=(queue,))
    child.start()
    growth = queue.get(timeout=60)
    child.join()
    assert growth > 64, growth
