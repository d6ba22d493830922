"""Seconds per meta-iteration of one `diffopt train` command in 1 process versus N (torchrun).

    python benchmarks/distributed.py                                   # a tiny run, the table
    python benchmarks/distributed.py --iterations 300 --meta_batch_size 32 --processes 1,2,4
    python benchmarks/distributed.py --dataset omniglot --algorithm maml --iterations 100

Any other option is a `diffopt train` option, passed to every run. Each run trains in a fresh
run folder (deleted afterwards unless --keep); the table reports the median of the logged
``seconds`` per meta-iteration (data, meta-gradient, all-reduce, outer step; under torchrun the
mean over ranks) after ``warmup`` iterations, the wall time of the whole command (start-up
included) and the final loss, which should agree across rows (the same tasks, to rounding).
"""

from __future__ import annotations

import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from diffopt.distributed import local_launcher
from diffopt.firecli import fire_checked
from diffopt.report import machine_description
from diffopt.runfolder import RunFolder

DEFAULTS = dict(algorithm="maml", meta_batch_size=16, hidden="40,40", shots=10)


def as_flags(options: dict) -> list[str]:
    """``--name value`` pairs; tuples as comma-separated lists."""
    flags = []
    for name, value in options.items():
        value = ",".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)
        flags += [f"--{name}", value]
    return flags


def timed_run(processes: int, flags: list[str], run_dir: Path, threads: int, warmup: int) -> dict:
    """Train once in ``processes`` processes; median seconds per meta-iteration, wall time, loss."""
    launcher = [sys.executable] if processes == 1 else local_launcher(processes)
    command = [*launcher, "-m", "diffopt", "train", *flags, "--run_dir", str(run_dir)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    records = RunFolder(run_dir, writer=False).metrics()
    seconds = [r["seconds"] for r in records[warmup:]] or [r["seconds"] for r in records]
    return {"median": statistics.median(seconds), "wall": wall, "loss": records[-1]["loss"]}


def main(processes: Sequence[int] | int = (1, 2), iterations: int = 20, warmup: int = 5,
         threads: int = 1, keep: bool = False, **options) -> None:
    """Time the same `diffopt train` command with each number of processes; print a markdown table.

    Args:
        processes: process counts to compare, e.g. 1,2,4 (1: plain `python -m diffopt`)
        iterations: meta-iterations per run
        warmup: leading meta-iterations left out of the median
        threads: OMP_NUM_THREADS (torch threads) per process
        keep: keep the run folders (printed) instead of deleting them
        options: any `diffopt train` option (default: MAML, meta-batch 16, 1-40-40-1 MLP, K=10)
    """
    counts = processes if isinstance(processes, (tuple, list)) else (processes,)
    options = {**DEFAULTS, **options, "iterations": iterations, "checkpoint_every": 0,
               "progress": False}
    flags = as_flags(options)
    root = Path(tempfile.mkdtemp(prefix="diffopt-distributed-"))
    results = {n: timed_run(n, flags, root / f"processes-{n}", threads, warmup) for n in counts}
    base = results[counts[0]]["median"]
    lines = ["| processes | median s / meta-iteration | speed-up | wall s (start-up included) | "
             "final loss |", "|---|---|---|---|---|"]
    for n, r in results.items():
        lines.append(f"| {n} | {r['median']:.4f} | {base / r['median']:.2f}x | {r['wall']:.1f} | "
                     f"{r['loss']:.6f} |")
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(f"Command: `diffopt train {' '.join(flags)}` under torchrun --nproc_per_node N. "
          f"{machine_description()}, {threads} torch thread(s) per process, torch {torch.__version__}, "
          f"Python {platform.python_version()}; measured {when}. "
          f"Median over meta-iterations {warmup + 1}..{iterations}.\n")
    print("\n".join(lines))
    if keep:
        print(f"\nrun folders: {root}")
    else:
        shutil.rmtree(root)


if __name__ == "__main__":
    fire_checked(main, name="distributed")
