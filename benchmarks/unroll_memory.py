"""Second-order meta-step memory and time against inner steps: diffopt's plain and checkpointed
unrolls beside the peers, a fresh process per point.

    python benchmarks/unroll_memory.py run                          # every workload, T = 1 .. 100
    python benchmarks/unroll_memory.py run --workloads sinusoid --steps 1,10 --write none
    python benchmarks/unroll_memory.py run --write BENCHMARKS.md    # table and plot

Workloads (random data of the real shapes, float32, one task per meta-step: memory is per task,
since every implementation frees a task's graph before the next):
``omniglot`` conv-4 (64 filters, strided, batch norm) 5-way 1-shot, 15 queries per class;
``miniimagenet`` conv-4 (32 filters, max-pooling) 5-way 5-shot 84x84 RGB, 15 queries per class;
``sinusoid`` 1-40-40-1 ReLU MLP, K = 10 support and 10 query points. Inner SGD, lr 0.01.

Implementations: diffopt's MAML looping over tasks with the plain unroll and with
``--inner_checkpoint auto`` (segments of ceil(sqrt(T)) steps; checkpointed unrolls loop, so the
plain one does too here: the same path but for the checkpoints), and benchmarks/references.py's
peers (hand-written loops, naive higher, learn2learn, torchopt where installed). Each point runs
in its own process under an address-space cap (``--cap_gb``) so that one running out of memory
ends alone: its cell says so. Memory: the growth of the peak resident set over the resident
size before the first meta-step. Time: the median of the meta-steps after the first, as many as
fit in ``--seconds`` (at least one).
"""

from __future__ import annotations

import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import PEER_LIBRARIES, Workload, _images, _setup  # noqa: E402
from references import MISSING, available  # noqa: E402

from diffopt.algorithms import build_algorithm  # noqa: E402
from diffopt.data import Episode  # noqa: E402
from diffopt.firecli import fire_checked  # noqa: E402
from diffopt.inner import InnerLoop  # noqa: E402
from diffopt.memory import reset_resident_peak, resident_mb  # noqa: E402
from diffopt.models import MLP, Conv4  # noqa: E402
from diffopt.models.resnet12 import ResNet12  # noqa: E402
from diffopt.report import library_versions, machine_description, write_section  # noqa: E402

WORKLOADS = {
    "omniglot": Workload("Omniglot conv-4 (64 filters, strided) 5-way 1-shot, 15 queries per class",
                         lambda: Conv4(1, 5, 64, 28, pool=False),
                         lambda g: _images(g, 1, 5, 1, 15, (1, 28, 28)), 0.01, 1, F.cross_entropy),
    "miniimagenet": Workload("Mini-ImageNet conv-4 (32 filters, max-pooling) 5-way 5-shot 84x84, 15 "
                             "queries per class", lambda: Conv4(3, 5, 32, 84, pool=True),
                             lambda g: _images(g, 1, 5, 5, 15, (3, 84, 84)), 0.01, 1, F.cross_entropy),
    "resnet12": Workload("ResNet-12 (64-160-320-640, 12.4M parameters) 5-way 1-shot 84x84, 5 queries "
                         "per class (python benchmarks/unroll_memory.py run --workloads resnet12 "
                         "--steps 5,20 --implementations diffopt)",
                         lambda: ResNet12(3, 5, 64, 84), lambda g: _images(g, 1, 5, 1, 5, (3, 84, 84)),
                         0.01, 1, F.cross_entropy),
    "sinusoid": Workload("sinusoid MLP 1-40-40-1 ReLU, K = 10 support and 10 query points",
                         lambda: MLP(1, 1, (40, 40), "relu"),
                         lambda g: Episode(*(torch.rand(1, 10, 1, generator=g) * 10 - 5 for _ in range(4))),
                         0.01, 1, F.mse_loss),
}
PLAIN, CHECKPOINTED = "diffopt", "diffopt, checkpointed (auto)"


def _builders(workload: Workload, steps: int) -> dict:
    """label -> (model -> meta_gradient(episode)), diffopt's two first."""
    def diffopt(checkpoint):
        def build(model):
            inner = InnerLoop("sgd", workload.lr, steps, model=model, checkpoint=checkpoint)
            return build_algorithm("maml", model, inner, workload.loss, "never").meta_gradient
        return build

    builders = {PLAIN: diffopt(None), CHECKPOINTED: diffopt("auto")}
    for label, builder in available("maml").items():
        builders[label] = lambda model, builder=builder: builder(model, workload.lr, steps, workload.loss)
    return builders


def point(workload: str, implementation: str, steps: int, seconds: float = 60.0, cap_gb: float = 16.0,
          threads: int = 1) -> None:
    """(In a fresh process) print the JSON {peak_growth_mb, seconds} of one implementation at
    ``steps`` inner steps, or {error} if it ran out of the ``cap_gb`` address space."""
    cap = int(cap_gb * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    torch.set_num_threads(threads)
    spec = WORKLOADS[workload]
    model, step, episode = _setup(spec, _builders(spec, steps)[implementation])
    gc.collect()
    reset_resident_peak()
    before = resident_mb()["VmRSS"]
    times: list[float] = []
    try:
        while len(times) < 2 or (sum(times[1:]) < seconds and len(times) < 12):
            model.zero_grad(set_to_none=True)
            start = time.perf_counter()
            step(episode)
            times.append(time.perf_counter() - start)
            if sum(times) > seconds:
                break
    except Exception as error:  # noqa: BLE001 - a library may hide the allocation error in its own
        said = isinstance(error, MemoryError) or "memory" in str(error).lower()
        if not said and resident_mb()["VmHWM"] < 0.75 * cap_gb * 1024:
            raise
        hidden = "" if said else f"; {type(error).__name__} raised in its place"
        print(json.dumps({"error": f"out of memory (over the {cap_gb:g} GiB cap{hidden})"}))
        return
    print(json.dumps({"peak_growth_mb": resident_mb()["VmHWM"] - before,
                      "seconds": statistics.median(times[1:] or times), "meta_steps": len(times)}))


def _child(*args: str, timeout: float) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    try:
        result = subprocess.run([sys.executable, __file__, "point", *args], capture_output=True, text=True,
                                timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"over {timeout:.0f} s"}
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        tail = result.stderr.strip().splitlines()[-1:] or [f"exit {result.returncode}"]
        killed = result.returncode < 0 or "memory" in tail[0].lower()
        return {"error": "out of memory" if killed else tail[0][:120]}
    return json.loads(lines[-1])


def _cell(result: dict) -> str:
    if "error" in result:
        return result["error"]
    return f"{result['peak_growth_mb']:.0f} MB, {result['seconds']:.3f} s"


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(results), figsize=(5 * len(results), 8), squeeze=False)
    for column, (workload, by_label) in enumerate(results.items()):
        for label, points in by_label.items():
            done = [(t, r) for t, r in points if "error" not in r]
            style = "-o" if label.startswith("diffopt") else "--."
            for row, key in enumerate(("peak_growth_mb", "seconds")):
                axes[row][column].plot([t for t, _ in done], [r[key] for _, r in done], style, label=label)
        axes[0][column].set_title(workload)
        for row, unit in enumerate(("peak meta-step memory growth (MB)", "seconds per meta-step")):
            axes[row][column].set_xscale("log")
            axes[row][column].set_yscale("log")
            axes[row][column].set_xlabel("inner steps T")
            axes[row][column].set_ylabel(unit)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)


def run(workloads=("omniglot", "miniimagenet", "sinusoid"), steps=(1, 5, 10, 25, 50, 100),
        implementations=None, seconds: float = 60.0, cap_gb: float = 16.0, timeout: float = 900.0,
        write: str = "BENCHMARKS.md",
        plot: str = "docs/figures/unroll-memory.png", out: str = "runs/unroll-memory.json") -> None:
    """Every implementation at every T on every workload, a process each; table, plot, JSON."""
    workloads = (workloads,) if isinstance(workloads, str) else tuple(workloads)
    steps = (steps,) if isinstance(steps, int) else tuple(steps)
    unknown = sorted(set(workloads) - set(WORKLOADS))
    if unknown:
        raise SystemExit(f"unknown workload {unknown[0]!r}; choose from {', '.join(WORKLOADS)}")
    results: dict[str, dict[str, list]] = {}
    lines = []
    for workload in workloads:
        labels = list(_builders(WORKLOADS[workload], 1))
        if implementations is not None:  # diffopt: its plain and checkpointed unrolls
            chosen = (implementations,) if isinstance(implementations, str) else tuple(implementations)
            labels = [label for label in labels if label in chosen or label.split(",")[0] in chosen]
        results[workload] = {label: [] for label in labels}
        lines += [f"{workload}: {WORKLOADS[workload].description}", "",
                  "| T | " + " | ".join(labels) + " | checkpointed / plain memory | time |",
                  "|---|" + "---|" * (len(labels) + 2)]
        for count in steps:
            cells = []
            for label in labels:
                result = _child(workload, label, str(count), f"--seconds={seconds}", f"--cap_gb={cap_gb}",
                                timeout=timeout)
                results[workload][label].append((count, result))
                cells.append(_cell(result))
                print(f"{workload} T={count} {label}: {cells[-1]}", flush=True)
            plain, checkpointed = results[workload][PLAIN][-1][1], results[workload][CHECKPOINTED][-1][1]
            ratios = ["-", "-"]
            if "error" not in plain and "error" not in checkpointed:
                ratios = [f"{checkpointed['peak_growth_mb'] / max(plain['peak_growth_mb'], 1):.2f}x",
                          f"{checkpointed['seconds'] / plain['seconds']:.2f}x"]
            lines.append(f"| {count} | " + " | ".join(cells) + f" | {' | '.join(ratios)} |")
        lines.append("")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(results, indent=1))
    _plot(results, Path(plot))
    command = " ".join(["python benchmarks/unroll_memory.py", *sys.argv[1:]])
    head = (f"Command: `{command}`. Second-order MAML, one task per "
            f"meta-step, inner SGD lr 0.01; each cell a fresh process on one torch thread under a "
            f"{cap_gb:g} GiB address-space cap: peak resident growth during the meta-steps, median "
            f"seconds per meta-step after the first (up to {seconds:g} s of them). Machine: "
            f"{machine_description()}, {library_versions(PEER_LIBRARIES)}; measured "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}."
            + (f" Not installed: {', '.join(MISSING)}." if MISSING else ""))
    body = "\n".join([head, "", *lines, f"![memory and time against inner steps]({plot})"])
    print(body)
    if write != "none":
        if workloads == ("resnet12",):
            write_section(write, "unroll-memory-resnet12", "ResNet-12: second-order memory, plain and "
                          "checkpointed", body)
        else:
            write_section(write, "unroll-memory", "Second-order memory against inner steps", body)


def speed(workloads=("sinusoid", "omniglot", "miniimagenet"), steps=(10, 25), rounds: int = 7,
          write: str = "BENCHMARKS.md") -> None:
    """Checkpointed against plain seconds per meta-step, interleaved in one process (each round
    times one meta-step of each, so load drifts hit both alike): medians and their ratio."""
    torch.set_num_threads(1)
    workloads = (workloads,) if isinstance(workloads, str) else tuple(workloads)
    steps = (steps,) if isinstance(steps, int) else tuple(steps)
    lines = ["| workload | T | plain (s) | checkpointed (s) | ratio of medians |", "|---|---|---|---|---|"]
    for workload in workloads:
        spec = WORKLOADS[workload]
        for count in steps:
            builders = _builders(spec, count)
            runs = [(*_setup(spec, builders[label]), []) for label in (PLAIN, CHECKPOINTED)]
            for round_ in range(rounds + 1):
                for model, step, episode, times in runs:
                    model.zero_grad(set_to_none=True)
                    start = time.perf_counter()
                    step(episode)
                    if round_:  # the first round warms up
                        times.append(time.perf_counter() - start)
            plain, checkpointed = (statistics.median(times) for *_, times in runs)
            lines.append(f"| {workload} | {count} | {plain:.4f} | {checkpointed:.4f} | "
                         f"{checkpointed / plain:.2f}x |")
            print(lines[-1], flush=True)
    command = " ".join(["python benchmarks/unroll_memory.py", *sys.argv[1:]])
    body = "\n".join([
        f"Command: `{command}`. One task per meta-step, one torch thread, {rounds} rounds after one "
        "warm-up, plain and checkpointed (auto) meta-steps alternating in one process; medians. "
        f"Machine: {machine_description()}, {library_versions()}; measured "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.", "", *lines])
    print(body)
    if write != "none":
        write_section(write, "unroll-speed", "Checkpointed against plain meta-step time", body)


if __name__ == "__main__":
    fire_checked({"run": run, "point": point, "speed": speed}, name="unroll_memory")
