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
    release_freed_memory()
    held = torch.ones(64 * 2**20)  # 256 MiB the process holds before the steps: not counted
    memory = StepMemory("cpu")
    with memory.measured():
        pass
    assert memory.peak_growth_mb < 32
    with memory.measured():
        step = torch.ones(64 * 2**20)  # 256 MiB, touched
        del step
    assert 240 < memory.peak_growth_mb < 300
    with memory.measured():
        pass
    assert 240 < memory.peak_growth_mb < 300  # the largest over the steps
    assert resident_mb()["VmRSS"] > 256 and held.sum() > 0


def test_cannot_measure_gives_nan(monkeypatch):
    from diffopt import memory as module

    monkeypatch.setattr(module, "reset_resident_peak", lambda: False)
    memory = StepMemory("cpu")
    with memory.measured():
        pass
    assert math.isnan(memory.peak_growth_mb)
