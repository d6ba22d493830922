"""Resuming: a run killed with SIGKILL mid-run and resumed ends bit-identical to one never
interrupted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading

import pytest
import torch

from diffopt.cli import main
from diffopt.runfolder import load_checkpoint

OPTIONS = ["--iterations", "300", "--meta_batch_size", "4", "--shots", "3", "--hidden", "16,16",
           "--inner_optimizer", "lslr", "--inner_steps", "2", "--checkpoint_every", "7",
           "--meta_lr_schedule", "cosine", "--meta_lr_final", "1e-4", "--progress", "False"]


STOPPING = """\
import os, signal, sys
import diffopt.train as train
from diffopt.cli import main
calls, real = 0, train.meta_step
def stopping(*args, **kwargs):  # the process stops itself inside meta-iteration STOP_AT
    global calls
    calls += 1
    if calls == int(os.environ["STOP_AT"]):
        os.kill(os.getpid(), signal.SIGSTOP)
    return real(*args, **kwargs)
train.meta_step = stopping
sys.exit(main(sys.argv[1:]))
"""


def diffopt(*args: str, **env: str) -> subprocess.Popen:
    """``python -m diffopt ARGS`` (or ``python SCRIPT ARGS``) in a process of its own."""
    command = args if args[0].endswith(".py") else ("-m", "diffopt", *args)
    return subprocess.Popen([sys.executable, *command], env=dict(os.environ, OMP_NUM_THREADS="1", **env),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_identical(tmp_path):
    """The victim stops itself (SIGSTOP) in meta-iteration 40, after the checkpoint of 35 and
    the log lines of 36-39; the test waits for that stop (an event, not a clock) and kills it."""
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    reference = diffopt("train", *OPTIONS, "--run_dir", str(whole))
    script = tmp_path / "stopping.py"
    script.write_text(STOPPING)
    victim = diffopt(str(script), "train", *OPTIONS, "--run_dir", str(killed), STOP_AT="40")
    guard = threading.Timer(300, victim.kill)  # a victim that never stops fails the test, not hangs it
    guard.start()
    try:
        _, status = os.waitpid(victim.pid, os.WUNTRACED)
    finally:
        guard.cancel()
    assert os.WIFSTOPPED(status), (status, victim.stderr.read().decode())
    victim.send_signal(signal.SIGKILL)
    assert victim.wait() == -signal.SIGKILL
    assert load_checkpoint(killed)["iteration"] == 35  # killed mid-run, after a checkpoint
    logged = [json.loads(line)["iteration"] for line in (killed / "metrics.jsonl").open()]
    assert logged == list(range(1, 40))  # the iterations after the checkpoint: logged, to redo
    assert reference.wait() == 0, reference.stderr.read().decode()

    assert main(["train", "--resume", str(killed), "--progress", "False"]) == 0
    a, b = load_checkpoint(whole), load_checkpoint(killed)
    assert a["iteration"] == b["iteration"] == 300
    assert_same(comparable(a), comparable(b), "checkpoint")  # every tensor and random state
    logs = [[(r["iteration"], r["loss"], r["lr"]) for r in map(json.loads, (run / "metrics.jsonl").open())]
            for run in (whole, killed)]
    assert logs[0] == logs[1] and [i for i, _, _ in logs[1]] == list(range(1, 301))


def test_resume_takes_no_other_options_and_needs_a_run(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path), "--iterations", "5"]) == 2
    assert "drop --iterations" in capsys.readouterr().err
    assert main(["train", "--resume", str(tmp_path)]) == 2
    assert f"no checkpoint at {tmp_path / 'checkpoint.pt'}" in capsys.readouterr().err


def test_starting_over_an_existing_run_points_to_resume(tmp_path, capsys):
    args = ["train", "--iterations", "1", "--meta_batch_size", "2", "--run_dir", str(tmp_path),
            "--progress", "False"]
    assert main(args) == 0
    assert main(args) == 2
    assert f"continue it with `diffopt train --resume {tmp_path}`" in capsys.readouterr().err


def test_time_budget_stops_the_run_and_resume_respects_it(tmp_path):
    from diffopt.config import resolve_config
    from diffopt.train import resume, train

    config = resolve_config(iterations=50, meta_batch_size=2, max_seconds=1e-9, checkpoint_every=1,
                            run_dir=str(tmp_path), progress=False)
    result = train(config)
    assert result.iterations == 1 and result.train_seconds > 0  # the first iteration spends it
    payload = load_checkpoint(tmp_path)
    assert payload["iteration"] == 1 and payload["train_seconds"] == result.train_seconds
    again = resume(tmp_path)
    assert again.iterations == 1  # nothing left of the budget
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["iteration"] for line in lines] == [1]


def test_a_resumed_run_ends_with_the_whole_checkpoint_of_an_uninterrupted_one(tmp_path, monkeypatch):
    """Every tensor and random state the checkpoint saves, the clocks aside."""
    import diffopt.train as train_module
    from diffopt.config import resolve_config

    options = dict(iterations=6, meta_batch_size=2, shots=3, hidden=(8,), inner_optimizer="lslr",
                   checkpoint_every=2, progress=False)
    train_module.train(resolve_config(**options, run_dir=str(tmp_path / "whole")))
    real_build = train_module.build

    def build_that_dies_at_the_fourth_iteration(config):
        algorithm = real_build(config)
        real, calls = algorithm.meta_gradient, []

        def meta_gradient(episode):
            calls.append(1)
            if len(calls) == 4:
                raise KeyboardInterrupt  # killed after the checkpoint of iteration 2
            return real(episode)

        algorithm.meta_gradient = meta_gradient
        return algorithm

    monkeypatch.setattr(train_module, "build", build_that_dies_at_the_fourth_iteration)
    with pytest.raises(KeyboardInterrupt):
        train_module.train(resolve_config(**options, run_dir=str(tmp_path / "killed")))
    assert load_checkpoint(tmp_path / "killed")["iteration"] == 2
    monkeypatch.setattr(train_module, "build", real_build)
    train_module.resume(tmp_path / "killed")

    whole, resumed = (comparable(load_checkpoint(tmp_path / name)) for name in ("whole", "killed"))
    assert_same(whole, resumed, "checkpoint")


def comparable(payload: dict) -> dict:
    """A checkpoint without what may differ between two runs of one config: clocks and folder."""
    clocks = ("train_seconds", "step_memory_mb")
    config = {key: value for key, value in payload["config"].items() if key != "run_dir"}
    return {**{key: value for key, value in payload.items() if key not in clocks}, "config": config}


def assert_same(a, b, where: str) -> None:
    """Equal, tensors bit for bit, through nested dicts, lists and tuples."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where
