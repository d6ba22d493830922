"""Where a training iteration's time goes: the data, the meta-step, the outer step, the rest.

    python benchmarks/loop_overhead.py --iterations 300 --write BENCHMARKS.md

Each workload runs ``diffopt train`` in a process of its own on one torch thread for
``iterations`` meta-iterations at its dataset's and algorithm's defaults (the trainer's own
settings: checkpoints, memory probes, the metrics log) and reads its ``metrics.jsonl``, whose
records split each iteration's ``seconds`` into ``data_seconds`` (the loader and the episode),
``gradient_seconds`` (the meta-gradient), ``outer_seconds`` (clipping and the outer step) and the
rest, bookkeeping (logging, checkpoints, memory probes, progress). Medians over the iterations
after the first ``warmup``; a checkpoint (rewritten after the run, median of 5) and the memory
probe (median of 2000) as shares of the median iteration, a checkpoint every 500 iterations
as the trainer writes them. The meta-step is the meta-gradient and the outer step; issue 29's
targets: end to end <= 1.15x the meta-step on sinusoid, <= 1.05x on Omniglot and Mini-ImageNet,
the data <= 5% of an Omniglot iteration. Also the start-up: ``diffopt train -h`` and
``import diffopt``, medians of ``repeats`` fresh processes.

Omniglot is read from ``--data_root`` (``diffopt data prepare omniglot``); Mini-ImageNet is a
generated distribution (``diffopt.data.fixture``, 20 images per class) prepared into a temporary
folder, its tasks the real pipeline's at the real image size.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from diffopt.config import TrainConfig
from diffopt.firecli import fire_checked

WORKLOADS = {
    "sinusoid MAML": dict(dataset="sinusoid", algorithm="maml"),
    "Omniglot MAML": dict(dataset="omniglot", algorithm="maml"),
    "Omniglot MAML with a loader worker": dict(dataset="omniglot", algorithm="maml", num_workers="1"),
    "Omniglot first-order MAML": dict(dataset="omniglot", algorithm="fomaml"),
    "Omniglot Reptile": dict(dataset="omniglot", algorithm="reptile"),
    "Mini-ImageNet MAML (generated)": dict(dataset="miniimagenet", algorithm="maml"),
}
ITERATION_CAPS = {"Mini-ImageNet MAML (generated)": 40}
"""The most meta-iterations a slow workload runs (Mini-ImageNet's meta-step: about 8 s)."""
TARGETS = {"sinusoid": 1.15, "omniglot": 1.05, "miniimagenet": 1.05}
"""The most end-to-end seconds per iteration may be, as a multiple of the meta-step's."""
PARTS = ("data_seconds", "gradient_seconds", "outer_seconds")


def _environment() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


def _fixture_root(folder: Path) -> str:
    """A prepared generated Mini-ImageNet (8 / 5 / 5 classes of 20 images) under ``folder``."""
    from diffopt.data.fixture import make_distribution
    from diffopt.data.prepare import prepare_miniimagenet

    source = folder / "source"
    make_distribution(source, {"train": 8, "val": 5, "test": 5}, 20)
    prepare_miniimagenet(source, folder / "prepared")
    return str(folder / "prepared")


WARM = """
import sys
from diffopt.cli import main
from diffopt.data import get_dataset
loader = get_dataset({dataset!r}).loader("train", seed=0, shots=1, test_shots=1, ways=5, batch_size=1,
                                          num_tasks=1, root={root!r})
loader.dataset.store.fill()
sys.exit(main({arguments!r}))
"""
"""``diffopt train`` in a process whose meta-training images are read first: the training loader
gathers from the same store (one per split and preprocessing in a process)."""


def measure(name: str, iterations: int, warmup: int, roots: dict[str, str], folder: Path,
            warm_images: bool) -> dict:
    """Train one workload; the medians of its iterations' parts. ``warm_images``: every image
    read before training starts (``ImageStore.fill``)."""
    flags = WORKLOADS[name]
    run_dir = folder / name.replace(" ", "-")
    iterations = min(iterations, ITERATION_CAPS.get(name, iterations))
    warmup = min(warmup, iterations // 4)
    arguments = ["train", "--iterations", str(iterations), "--run_dir", str(run_dir), "--progress", "False",
                 "--data_root", roots[flags["dataset"]]]
    arguments += [item for key, value in flags.items() for item in (f"--{key}", value)]
    command = [sys.executable, "-m", "diffopt", *arguments]
    if warm_images and flags["dataset"] != "sinusoid":
        command = [sys.executable, "-c", WARM.format(dataset=flags["dataset"], root=roots[flags["dataset"]],
                                                     arguments=arguments)]
    done = subprocess.run(command, env=_environment(), capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"loop_overhead: {name} failed: {done.stderr.strip().splitlines()[-1:]}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][warmup:]
    row = {"workload": name, "dataset": flags["dataset"], "iterations": len(records),
           "seconds": statistics.median(r["seconds"] for r in records)}
    for part in PARTS:
        row[part] = statistics.median(r[part] for r in records)
    row["bookkeeping_seconds"] = statistics.median(
        r["seconds"] - sum(r[part] for part in PARTS) for r in records)
    row["meta_step_seconds"] = statistics.median(r["gradient_seconds"] + r["outer_seconds"] for r in records)
    row["checkpoint_seconds"] = checkpoint_seconds(run_dir)
    return row


def checkpoint_seconds(run_dir: Path, repeats: int = 5) -> float:
    """Median seconds to write ``run_dir``'s checkpoint again, as the trainer does (atomically)."""
    from diffopt.runfolder import RunFolder, load_checkpoint

    payload, folder, taken = load_checkpoint(run_dir), RunFolder(run_dir), []
    for _ in range(repeats):
        began = time.perf_counter()
        folder.save(payload, run_dir / "timed.pt")
        taken.append(time.perf_counter() - began)
    return statistics.median(taken)


def probe_seconds(repeats: int = 2000) -> float:
    """Median seconds the memory probe (``StepMemory.measured``) adds around a meta-step."""
    from diffopt.memory import StepMemory

    memory, taken = StepMemory("cpu"), []
    for _ in range(repeats):
        began = time.perf_counter()
        with memory.measured():
            pass
        taken.append(time.perf_counter() - began)
    return statistics.median(taken)


def startup(repeats: int) -> dict[str, float]:
    """Median wall seconds of fresh processes: ``diffopt train -h`` and ``import diffopt``."""
    commands = {"diffopt train -h": [sys.executable, "-m", "diffopt", "train", "-h"],
                "import diffopt": [sys.executable, "-c", "import diffopt"]}
    times: dict[str, float] = {}
    for label, command in commands.items():
        taken = []
        for _ in range(repeats):
            began = time.perf_counter()
            subprocess.run(command, env=_environment(), capture_output=True, check=True)
            taken.append(time.perf_counter() - began)
        times[label] = statistics.median(taken)
    return times


def table(rows: list[dict], probe: float) -> str:
    """The markdown table; ``probe``: the memory probe's seconds per meta-step."""
    every = TrainConfig().checkpoint_every
    lines = ["| workload | iterations | s / iteration | data | meta-gradient | outer step | bookkeeping "
             f"| end to end / meta-step (target) | data share | checkpoint share (every {every}) "
             "| memory probe share |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        ratio = row["seconds"] / row["meta_step_seconds"]
        target = TARGETS[row["dataset"]]
        lines.append(
            f"| {row['workload']} | {row['iterations']} | {row['seconds']:.4f} | {row['data_seconds']:.4f} "
            f"| {row['gradient_seconds']:.4f} | {row['outer_seconds']:.4f} "
            f"| {row['bookkeeping_seconds']:.4f} "
            f"| {ratio:.2f}x ({'met' if ratio <= target else 'not met'}: <= {target:.2f}x) "
            f"| {100 * row['data_seconds'] / row['seconds']:.1f}% "
            f"| {100 * row['checkpoint_seconds'] / (every * row['seconds']):.2f}% "
            f"| {100 * probe / row['seconds']:.2f}% |")
    return "\n".join(lines)


def main(iterations: int = 300, warmup: int = 20, workloads: str | None = None, repeats: int = 5,
         data_root: str = "data", warm_images: bool = True, write: str | None = None) -> None:
    """Measure every workload (comma-separated names of ``WORKLOADS``; default all) and the
    start-up; print the table; ``warm_images``: image datasets' meta-training images read before
    the clock starts (a long run's steady state; False: the first iterations, filling the store);
    ``write``: a markdown file whose loop-overhead section is replaced."""
    names = list(WORKLOADS) if workloads is None else [w.strip() for w in workloads.split(",")]
    unknown = [name for name in names if name not in WORKLOADS]
    if unknown or iterations <= warmup:
        raise SystemExit(f"loop_overhead: unknown workload {unknown[:1]} (choose from "
                         f"{', '.join(WORKLOADS)}) or --iterations not above --warmup")
    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(temporary)
        roots = {"sinusoid": data_root, "omniglot": data_root}
        if any(WORKLOADS[name]["dataset"] == "miniimagenet" for name in names):
            roots["miniimagenet"] = _fixture_root(folder)
        rows = [measure(name, iterations, warmup, roots, folder, warm_images) for name in names]
    times = startup(repeats)
    text = table(rows, probe_seconds()) + f"\n\nStart-up (median of {repeats} fresh processes): " + ", ".join(
        f"`{label}` {seconds:.2f} s" for label, seconds in times.items()) + "."
    print(text)
    if write:
        from diffopt.report import library_versions, machine_description, write_section

        images = "read before" if warm_images else "read as drawn, after"
        body = (f"{machine_description()}; {library_versions()}. One torch thread per run, "
                f"{iterations} meta-iterations each, medians over all but the first {warmup}, image "
                f"datasets' meta-training images {images} the clock starts. Command: "
                f"`python benchmarks/loop_overhead.py --iterations {iterations} "
                f"--warm_images {warm_images} --write {write}`.\n\n{text}")
        write_section(write, "loop-overhead", "Where a training iteration's time goes", body)


if __name__ == "__main__":
    fire_checked(main, name="loop_overhead")
