"""Bad numbers: non-finite meta-iterations are skipped, counted and bounded; meta-gradient
clipping. Bad arguments: a Hypothesis fuzz of the CLI's options ends in one-line errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import diffopt.train as train_module
from diffopt.cli import main
from diffopt.config import TrainConfig, resolve_config
from diffopt.errors import DiffoptError
from diffopt.runfolder import load_checkpoint

TINY = dict(iterations=6, meta_batch_size=2, hidden=(4,), progress=False)


def poison(monkeypatch, bad_iterations: set[int]) -> None:
    """Make the meta-gradient NaN at the given (1-based) iterations."""
    real_build = train_module.build

    def build(config):
        algorithm = real_build(config)
        real = algorithm.meta_gradient
        calls = []

        def meta_gradient(episode):
            calls.append(1)
            metrics = real(episode)
            if len(calls) in bad_iterations:
                next(algorithm.parameters()).grad.fill_(math.nan)
            return metrics

        algorithm.meta_gradient = meta_gradient
        return algorithm

    monkeypatch.setattr(train_module, "build", build)


def test_a_non_finite_meta_gradient_is_skipped_and_logged(tmp_path, monkeypatch):
    clean = train_module.train(resolve_config(run_dir=str(tmp_path / "clean"), **TINY))
    poison(monkeypatch, {3})
    result = train_module.train(resolve_config(run_dir=str(tmp_path / "bad"), **TINY))
    records = [json.loads(x) for x in (tmp_path / "bad" / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("skipped", False) for r in records] == [False, False, True, False, False, False]
    payload = load_checkpoint(tmp_path / "bad")
    assert payload["skipped_steps"] == 1
    for tensor in payload["algorithm"].values():
        assert torch.isfinite(tensor).all()
    # the skipped step changed nothing: one step fewer than the clean run, so they differ
    first = next(iter(result.algorithm.parameters()))
    assert not torch.equal(first, next(iter(clean.algorithm.parameters())))


def test_too_many_bad_steps_in_a_row_stop_the_run_with_a_finite_checkpoint(tmp_path, monkeypatch, capsys):
    poison(monkeypatch, {2, 3, 4, 5, 6})
    config = resolve_config(run_dir=str(tmp_path), max_bad_steps=2, **TINY)
    with pytest.raises(DiffoptError, match="3 meta-iterations in a row .up to 4. gave a non-finite"):
        train_module.train(config)
    payload = load_checkpoint(tmp_path)
    assert payload["iteration"] == 4 and payload["skipped_steps"] == 3
    assert all(torch.isfinite(t).all() for t in payload["algorithm"].values())


def test_meta_gradient_clipping_bounds_the_outer_step(tmp_path):
    config = resolve_config(run_dir=str(tmp_path), outer_optimizer="sgd", meta_lr=1.0,
                            max_grad_norm=1e-3, **{**TINY, "iterations": 1})
    before = [p.detach().clone() for p in train_module.build(config).parameters()]
    after = list(train_module.train(config).algorithm.parameters())
    moved = math.sqrt(sum(float((a.detach() - b).pow(2).sum()) for a, b in zip(after, before, strict=True)))
    logged = json.loads((tmp_path / "metrics.jsonl").read_text())["grad_norm"]
    assert logged > 1e-3  # the raw meta-gradient was larger than the clip
    assert moved == pytest.approx(1e-3, rel=1e-4)


def test_clipping_by_value_bounds_every_element(tmp_path):
    config = resolve_config(run_dir=str(tmp_path), outer_optimizer="sgd", meta_lr=1.0,
                            max_grad_value=1e-4, **{**TINY, "iterations": 1})
    before = [p.detach().clone() for p in train_module.build(config).parameters()]
    after = list(train_module.train(config).algorithm.parameters())
    steps = torch.cat([(a.detach() - b).flatten() for a, b in zip(after, before, strict=True)])
    assert steps.abs().max() == pytest.approx(1e-4, rel=1e-3)  # some elements were clamped (float32)
    assert 0 < (steps.abs() < 0.99e-4).sum() < steps.numel()  # and some were not


@pytest.mark.parametrize("dataset, algorithm, shots, expected", [
    ("miniimagenet", "maml", 1, 10 / 75), ("miniimagenet", "fomaml", 5, 10 * 5 / 75),
    ("miniimagenet", "reptile", 1, None), ("omniglot", "maml", 1, None)])
def test_cbfinn_clamps_mini_imagenet_meta_gradients_on_its_loss_scale(dataset, algorithm, shots, expected):
    """maml.py:147-148 clamps at 10 the gradient of a loss ways x 15 / shots times diffopt's mean."""
    config = resolve_config(dataset=dataset, algorithm=algorithm, shots=shots)
    assert config.max_grad_value == (None if expected is None else pytest.approx(expected))
    assert resolve_config(dataset=dataset, algorithm=algorithm, max_grad_value=3.0).max_grad_value == 3.0


# Every option of `diffopt train` with values that are wrong for it.
BAD_VALUES = st.one_of(st.sampled_from([-1, 0, 10**12, -1e300, math.nan, math.inf, "nope", "", "1,2,x",
                                        "True", "[]", "{}", "None"]),
                       st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=5),
                       st.integers(-10**15, 10**15))
OPTIONS = sorted(f.name for f in TrainConfig.__dataclass_fields__.values()
                 if f.name not in ("run_dir", "progress"))


@pytest.mark.slow
@settings(max_examples=500)
@given(option=st.sampled_from(OPTIONS), value=BAD_VALUES, other=st.sampled_from(OPTIONS),
       other_value=BAD_VALUES)
def test_fuzzed_train_options_are_one_line_errors_or_valid(option, value, other, other_value,
                                                           tmp_path_factory):
    """Any combination of two options with odd values is either a valid configuration or a
    one-line error; never a traceback, never a run folder. (Training itself is stubbed: valid
    huge values, such as 10**12 inner steps, are a run's business; running out of memory is a
    one-line error of its own.)"""
    import contextlib
    import io

    trained = []
    run_dir = tmp_path_factory.mktemp("fuzz") / "run"
    argv = ["train", "--iterations", "1", "--meta_batch_size", "2", "--progress", "False",
            "--run_dir", str(run_dir), f"--{option}", str(value), f"--{other}", str(other_value)]
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()), \
            pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_module, "train", lambda config, **_: trained.append(config) or 1 / 0)
        try:
            code = main(argv)
        except ZeroDivisionError:  # the stub: the options were valid and training would start
            code = None
        except SystemExit as exit_:  # fire's own usage errors (e.g. a malformed flag)
            code = exit_.code
    text = err.getvalue()
    assert not run_dir.exists()
    if code is None:
        assert len(trained) == 1 and isinstance(trained[0], TrainConfig)
    else:
        assert code == 2 and text.startswith("diffopt: error: "), text
        assert len(text.strip().splitlines()) == 1, text


HUGE = 10**13
"""--hidden HUGE: a 1 x 10**13 float32 weight, 40 TB."""

ALLOCATION_ERRORS = {  # what torch raises when an allocation fails (messages as torch words them)
    "cpu": lambda nbytes: RuntimeError(
        "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
        f"you tried to allocate {nbytes} bytes. Error code 12 (Cannot allocate memory)"),
    "cuda": lambda nbytes: torch.OutOfMemoryError(
        f"CUDA out of memory. Tried to allocate {nbytes / 2**30:.2f} GiB. GPU 0 has a total capacity "
        "of 79.19 GiB of which 78.50 GiB is free."),
    "python": lambda nbytes: MemoryError(),
}


@pytest.fixture
def address_space_cap():
    """While the test runs, the process may map at most 16 GiB more than it has: should a patch
    miss and a real huge allocation start, it fails at once instead of touching pages until the
    kernel's OOM killer ends pytest (where the kernel overcommits)."""
    import resource

    status = Path("/proc/self/status")
    if not status.exists():
        pytest.skip("needs /proc/self/status")
    mapped = int(status.read_text().split("VmSize:")[1].split()[0]) * 1024
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = mapped + 16 * 2**30
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    yield
    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@pytest.mark.parametrize("kind", list(ALLOCATION_ERRORS))
def test_running_out_of_memory_is_one_line(tmp_path, capsys, monkeypatch, address_space_cap, kind):
    """--hidden 10**13: the model's allocation is patched to fail as torch's allocators fail
    (CPU, CUDA) or as Python does, instead of really asking for 40 TB."""
    real_empty, asked = torch.empty, []

    def empty(*size, **kwargs):
        shape = size[0] if len(size) == 1 and not isinstance(size[0], int) else size
        if math.prod(shape) >= HUGE:
            asked.append(tuple(shape))
            raise ALLOCATION_ERRORS[kind](4 * math.prod(shape))
        return real_empty(*size, **kwargs)

    monkeypatch.setattr(torch, "empty", empty)
    code = main(["train", "--iterations", "1", "--meta_batch_size", "2", "--hidden", str(HUGE),
                 "--run_dir", str(tmp_path / "r"), "--progress", "False"])
    err = capsys.readouterr().err
    assert asked  # the failure came from the patched allocation
    assert code == 2 and err.startswith("diffopt: error: out of memory") and err.count("\n") == 1, err


def test_a_runtime_error_that_is_not_an_allocation_is_not_called_out_of_memory(tmp_path, monkeypatch):
    def build(config):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)")

    monkeypatch.setattr(train_module, "build", build)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        main(["train", "--iterations", "1", "--meta_batch_size", "2", "--run_dir", str(tmp_path / "r"),
              "--progress", "False"])


def test_a_step_that_overflows_the_parameters_is_undone_and_counted(tmp_path, monkeypatch):
    real_build = train_module.build

    def build(config):  # a finite meta-gradient (norm 1e18) that the outer step turns into inf
        algorithm = real_build(config)
        real = algorithm.meta_gradient

        def meta_gradient(episode):
            metrics = real(episode)
            next(algorithm.parameters()).grad.fill_(1e18)
            return metrics

        algorithm.meta_gradient = meta_gradient
        return algorithm

    run = tmp_path / "run"
    config = resolve_config(**{**TINY, "iterations": 3}, outer_optimizer="sgd", meta_lr=1e21,
                            run_dir=str(run))
    initial = real_build(config).state_dict()
    monkeypatch.setattr(train_module, "build", build)
    train_module.train(config)
    payload = load_checkpoint(run)
    assert payload["skipped_steps"] == 3
    for name, tensor in payload["algorithm"].items():
        assert torch.equal(tensor, initial[name]), name  # every step overflowed and was undone
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(r["skipped"] and math.isfinite(r["grad_norm"]) for r in records)


def test_a_full_disk_while_checkpointing_is_one_line_and_the_last_checkpoint_resumes(
        tmp_path, monkeypatch, capsys):
    import errno

    import diffopt.checkpoint as checkpoint_module

    run = tmp_path / "run"
    real_fsync, failed = checkpoint_module.os.fsync, []

    def full_disk_at_the_second_checkpoint(fd):
        name = checkpoint_module.os.readlink(f"/proc/self/fd/{fd}")
        if ".checkpoint.pt." in name and (run / "checkpoint.pt").exists() and not failed:
            failed.append(name)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(checkpoint_module.os, "fsync", full_disk_at_the_second_checkpoint)
    argv = ["train", "--iterations", "6", "--meta_batch_size", "2", "--hidden", "4", "--checkpoint_every",
            "2", "--progress", "False", "--run_dir", str(run)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"diffopt: error: could not write {run / 'checkpoint.pt'} "
                                               "(No space left on device); what was there before is intact")
    assert load_checkpoint(run)["iteration"] == 2  # the previous checkpoint, whole
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]  # no partial file left
    monkeypatch.setattr(checkpoint_module.os, "fsync", real_fsync)
    assert main(["train", "--resume", str(run)]) == 0
    assert load_checkpoint(run)["iteration"] == 6


def test_one_writer_per_run_folder_and_stale_locks_are_taken_over(tmp_path, capsys):
    import os
    import socket
    import subprocess
    import sys

    run = tmp_path / "run"
    argv = ["--iterations", "2", "--meta_batch_size", "2", "--hidden", "4", "--progress", "False"]
    assert main(["train", *argv, "--run_dir", str(run)]) == 0
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = run / ".writer.lock"
        lock.write_text(json.dumps({"pid": other.pid, "host": socket.gethostname()}))
        before = (run / "checkpoint.pt").read_bytes()
        assert main(["train", "--resume", str(run)]) == 2
        assert capsys.readouterr().err.strip() == (f"diffopt: error: {run} is being written by process "
                                                   f"{other.pid} on this machine; wait for it to end, or "
                                                   "stop it first")
        assert (run / "checkpoint.pt").read_bytes() == before and lock.exists()
        assert main(["compare", "--iterations", "1", "--out", str(run), "--progress", "False"]) == 2
        assert f"being written by process {other.pid}" in capsys.readouterr().err
    finally:
        other.kill()
        other.wait()
    assert main(["train", "--resume", str(run)]) == 0  # its holder is gone: a stale lock
    assert not lock.exists() and os.getpid() > 0
    assert f"{run}  (already finished: 2 meta-iterations, " in capsys.readouterr().out  # no nan median
