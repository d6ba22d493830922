"""Meta-step speed and memory: diffopt against its peers, side by side.

    python benchmarks/peers.py speed                      # every workload and algorithm; prints tables
    python benchmarks/peers.py speed --workloads W2 --algorithms maml,fomaml --rounds 5
    python benchmarks/peers.py memory                     # peak memory, a process per implementation
    python benchmarks/peers.py scaling                    # memory vs inner steps; a long run's memory
    python benchmarks/peers.py all --write BENCHMARKS.md  # the three, written into BENCHMARKS.md

Workloads (random data of the real shapes, float32):
W1 sinusoid 1-40-40-1 ReLU MLP, meta-batch 25, K=10 support + 10 query, 1 inner step (lr 0.01);
W2 Omniglot conv-4 (64 filters, batch norm), 5-way 1-shot, 15 queries per class, meta-batch 32,
1 inner step (lr 0.4); W3 the same conv-4, meta-batch 8, 5 inner steps; MI Mini-ImageNet conv-4
(32 filters, max-pooling), 5-way 1-shot on 84x84 RGB images, 15 queries per class, meta-batch 4,
5 inner steps (lr 0.01).

Implementations: diffopt (defaults: vmap where proven correct, else the loop over tasks, one
task at a time), diffopt with tasks on threads (``task_threads=0``: torch's thread count), and
the peers of ``references.py`` (hand-written loops, naive higher, learn2learn, torchopt, where
installed: ``make bench-setup``). Speed: each implementation runs in its own process; every
round times every implementation once, in turn (interleaved, so drift hits all alike); the
median over rounds after ``warmup``. Before timing,
every implementation's meta-gradient (of the model's weights) is compared with diffopt's.
Memory: each implementation in a fresh process; the growth of the peak resident set size over
the resident size before the first meta-step, during ``steps`` meta-steps.
"""

from __future__ import annotations

import gc
import json
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from references import MISSING, available  # noqa: E402

from diffopt.algorithms import build_algorithm  # noqa: E402
from diffopt.allocator import keep_freed_memory  # noqa: E402
from diffopt.data import Episode  # noqa: E402
from diffopt.firecli import fire_checked  # noqa: E402
from diffopt.inner import InnerLoop  # noqa: E402
from diffopt.memory import reset_resident_peak, resident_mb  # noqa: E402
from diffopt.models import MLP, Conv4  # noqa: E402
from diffopt.report import library_versions, machine_description, write_section  # noqa: E402
from diffopt.vectorize import vmap_obstacle  # noqa: E402

PEER_LIBRARIES = ("higher", "learn2learn", "torchopt")


@dataclass(frozen=True)
class Workload:
    description: str
    model: Callable[[], nn.Module]
    episode: Callable[[torch.Generator], Episode]
    lr: float
    steps: int
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    steps_per_turn: int = 1
    """Meta-steps a timing worker runs back to back per turn; with more than one, the first (cold:
    the worker has idled while the others ran) is dropped and the median of the rest reported."""


def _images(g: torch.Generator, tasks: int, ways: int, shots: int, queries: int, shape) -> Episode:
    support_y = torch.arange(ways).repeat_interleave(shots).expand(tasks, -1)
    query_y = torch.arange(ways).repeat_interleave(queries).expand(tasks, -1)
    return Episode(torch.rand(tasks, ways * shots, *shape, generator=g), support_y.clone(),
                   torch.rand(tasks, ways * queries, *shape, generator=g), query_y.clone())


def _omniglot(description: str, tasks: int, shots: int, steps: int) -> Workload:
    """Omniglot-shaped conv-4 (64 filters, strided), 5-way, 15 queries per class, inner lr 0.4."""
    return Workload(description, lambda: Conv4(1, 5, 64, 28, pool=False),
                    lambda g: _images(g, tasks, 5, shots, 15, (1, 28, 28)), 0.4, steps, F.cross_entropy)


WORKLOADS = {
    "W1": Workload("sinusoid MLP 1-40-40-1, meta-batch 25, K=10, 1 step",
                   lambda: MLP(1, 1, (40, 40), "relu"),
                   lambda g: Episode(*(torch.rand(25, 10, 1, generator=g) * 10 - 5 for _ in range(4))),
                   0.01, 1, F.mse_loss, steps_per_turn=20),
    "W2": _omniglot("Omniglot conv-4 5-way 1-shot, 15 query, meta-batch 32, 1 step", 32, 1, 1),
    "W3": _omniglot("same conv-4, meta-batch 8, 5 steps", 8, 1, 5),
    "W3-10shot": _omniglot("same conv-4, meta-batch 8, 5-way 10-shot (50 support images), 5 steps", 8, 10, 5),
    "MI": Workload("Mini-ImageNet conv-4 (32 filters) 5-way 1-shot 84x84, 15 query, meta-batch 4, 5 steps",
                   lambda: Conv4(3, 5, 32, 84, pool=True),
                   lambda g: _images(g, 4, 5, 1, 15, (3, 84, 84)), 0.01, 5, F.cross_entropy),
}

ALGORITHMS = {  # label -> (diffopt algorithm, inner rule, references.py key)
    "maml": ("maml", "sgd", "maml"),
    "lslr": ("maml", "lslr", "lslr"),
    "meta_curvature": ("maml", "meta_curvature", None),
    "fomaml": ("fomaml", "sgd", "fomaml"),
    "reptile": ("reptile", "sgd", "reptile"),
}
ALGORITHM_NAMES = {"maml": "MAML (sgd)", "lslr": "MAML + LSLR", "meta_curvature": "MAML + Meta-Curvature",
                   "fomaml": "first-order MAML", "reptile": "Reptile"}
DIFFOPT, DIFFOPT_THREADS, HAND = "diffopt", "diffopt, tasks on torch's threads", "hand-written loop"
DIFFOPT_WHOLE_TASKS = "diffopt, whole tasks one by one (--vectorize never)"
MALLOC_SETTINGS = {"default": "glibc malloc as it comes", "kept": "freed memory kept"}
"""setting -> what it means (``kept``: ``diffopt.allocator.keep_freed_memory``)."""


def implementations(algorithm: str, workload: Workload) -> dict[str, Callable[[nn.Module], Callable]]:
    """label -> (model -> meta_gradient(episode)), diffopt's first."""
    name, rule, peers = ALGORITHMS[algorithm]

    def diffopt(task_threads: int, vectorize: str = "auto") -> Callable[[nn.Module], Callable]:
        def build(model: nn.Module) -> Callable:
            inner = InnerLoop(rule, workload.lr, workload.steps, model=model)
            return build_algorithm(name, model, inner, workload.loss, vectorize, task_threads).meta_gradient
        return build

    result = {DIFFOPT: diffopt(1)}
    model = workload.model()
    inner = InnerLoop(rule, workload.lr, workload.steps, model=model)
    if vmap_obstacle(model, inner) is not None:  # threads apply to the loop over tasks only
        if torch.get_num_threads() > 1:
            result[DIFFOPT_THREADS] = diffopt(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            if build_algorithm(name, model, inner, workload.loss).support_vmapped:
                result[DIFFOPT_WHOLE_TASKS] = diffopt(1, "never")
    for label, builder in (available(peers) if peers else {}).items():
        result[label] = lambda model, builder=builder: builder(model, workload.lr, workload.steps,
                                                               workload.loss)
    return result


def _setup(workload: Workload, build: Callable) -> tuple[nn.Module, Callable, Episode]:
    torch.manual_seed(0)
    model = workload.model()
    return model, build(model), workload.episode(torch.Generator().manual_seed(0))


def _grads(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in model.parameters()]


def _time_group(workload: str, algorithm: str, rounds: int, warmup: int, threads: int,
                mallocs: tuple[str, ...]) -> list[dict]:
    """Check that the implementations' meta-gradients agree (in this process), then time them:
    each in its own worker process (``timing_worker``), interleaved round by round.

    A process per implementation, because one implementation's threads change another's speed
    in a shared process: once a thread pool has run OpenMP regions, libgomp counts more threads
    than cores and stops spin-waiting, which slowed a later single-threaded loop by half (measured).
    """
    spec = WORKLOADS[workload]
    impls = implementations(algorithm, spec)
    reference, rows = None, []
    for label, build in impls.items():
        model, step, episode = _setup(spec, build)
        step(episode)
        grads = _grads(model)
        reference = grads if reference is None else reference
        scale = max(float(g.abs().max()) for g in reference)
        worst = max(float((a - b).abs().max()) for a, b in zip(grads, reference, strict=True)) / scale
        rows.append({"implementation": label, "agreement": worst})
    workers = {(label, malloc): subprocess.Popen(
        [sys.executable, __file__, "timing_worker", workload, algorithm, label, f"--threads={threads}",
         f"--malloc={malloc}"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        for label in impls for malloc in mallocs}
    times: dict[tuple[str, str], list[float]] = {key: [] for key in workers}
    try:
        for worker in workers.values():  # built and ready
            _worker_reply(worker)
        for round_ in range(warmup + rounds):
            for key, worker in workers.items():
                worker.stdin.write("step\n")
                worker.stdin.flush()
                seconds = float(_worker_reply(worker))
                if round_ >= warmup:
                    times[key].append(seconds)
    finally:
        for worker in workers.values():
            worker.kill()
            worker.wait()
    for row in rows:
        row["seconds"] = {m: statistics.median(times[row["implementation"], m]) for m in mallocs}
    return rows


def _worker_reply(worker: subprocess.Popen) -> str:
    line = worker.stdout.readline()
    if not line:
        raise RuntimeError(f"timing worker {worker.args[3:6]} ended (exit {worker.wait()}); see its stderr")
    return line.strip()


def _check_malloc(setting: str) -> str:
    if setting not in MALLOC_SETTINGS:
        raise ValueError(f"malloc setting must be one of {', '.join(MALLOC_SETTINGS)}; got {setting!r}")
    return setting


def _malloc_legend(mallocs: tuple[str, ...]) -> str:
    """``setting: meaning; ...``, checking each setting (in the parent, before any worker starts)."""
    return "; ".join(f"{m}: {MALLOC_SETTINGS[_check_malloc(m)]}" for m in mallocs)


def _use_malloc(setting: str) -> None:
    if _check_malloc(setting) == "kept" and not keep_freed_memory():
        raise RuntimeError("this C library has no mallopt (not glibc): use --mallocs default")


def timing_worker(workload: str, algorithm: str, implementation: str, threads: int = 2,
                  malloc: str = "default") -> None:
    """(A child of ``speed``) build one implementation, print ``ready``, then for every line
    ``step`` on stdin run the workload's ``steps_per_turn`` meta-steps and print the seconds of one."""
    torch.set_num_threads(threads)
    _use_malloc(malloc)
    spec = WORKLOADS[workload]
    model, step, episode = _setup(spec, implementations(algorithm, spec)[implementation])
    print("ready", flush=True)
    for _ in sys.stdin:
        times = []
        for _ in range(spec.steps_per_turn):
            model.zero_grad(set_to_none=True)
            start = time.perf_counter()
            step(episode)
            times.append(time.perf_counter() - start)
        print(statistics.median(times[1:] or times), flush=True)


def _finish(lines: list[str], write: str | None, key: str, title: str) -> str:
    """The section's text; also written into ``write`` (a markdown file) under ``key``."""
    body = "\n".join(lines)
    if write:
        write_section(write, key, title, body)
    return body


def _as_tuple(value) -> tuple[str, ...]:
    return (value,) if isinstance(value, str) else tuple(value)


def _header(command: str, threads: int, what: str) -> str:
    return (f"Command: `{command}`. {what} Machine: {machine_description()}, {threads} torch "
            f"threads, {library_versions(PEER_LIBRARIES)}; measured "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}."
            + (f" Not installed: {', '.join(MISSING)}." if MISSING else ""))


def speed(workloads=("W1", "W2", "W3", "MI"), algorithms=tuple(ALGORITHMS), rounds: int = 5,
          warmup: int = 1, threads: int = 2, mallocs=tuple(MALLOC_SETTINGS), write: str | None = None) -> str:
    """Median seconds per meta-step of every implementation under every malloc setting
    (``MALLOC_SETTINGS``); a table per workload."""
    torch.set_num_threads(threads)
    workloads, algorithms, mallocs = _as_tuple(workloads), _as_tuple(algorithms), _as_tuple(mallocs)
    out = [_header(f"python benchmarks/peers.py speed --rounds {rounds} --threads {threads} --mallocs "
                   f"{','.join(mallocs)}", threads,
                   f"Median seconds per meta-step (meta-gradient of one meta-batch, outer step "
                   f"excluded) over {rounds} rounds after {warmup} warm-up; each implementation and "
                   f"malloc setting in its own process, the processes taking turns (interleaved) "
                   f"round by round. Malloc settings: {_malloc_legend(mallocs)} (diffopt.allocator).")]
    columns = "".join(f" s / meta-step ({m}) | speed-up over the hand-written loop ({m}) |" for m in mallocs)
    for name in workloads:
        workload = WORKLOADS[name]
        out += ["", f"**{name}: {workload.description}**", "",
                f"| algorithm | implementation |{columns} max meta-gradient difference (relative to the "
                "largest) |", "|---|---|" + "---|---|" * len(mallocs) + "---|"]
        for algorithm in algorithms:
            rows = _time_group(name, algorithm, rounds, warmup, threads, mallocs)
            hand = next((r["seconds"] for r in rows if r["implementation"] == HAND), None)
            for row in rows:
                cells = "".join(f" {row['seconds'][m]:.4f} | "
                                + ("" if hand is None else f"{hand[m] / row['seconds'][m]:.2f}x") + " |"
                                for m in mallocs)
                out.append(f"| {ALGORITHM_NAMES[algorithm]} | {row['implementation']} |{cells} "
                           f"{row['agreement']:.1e} |")
                print(out[-1], flush=True)
    return _finish(out, write, "peers-speed", "Meta-step speed: diffopt and its peers")


def memory_of(workload: str, algorithm: str, implementation: str, steps: int = 3,
              threads: int = 2, inner_steps: int | None = None, malloc: str = "default") -> None:
    """(In a fresh process) print the JSON {peak_growth_mb, ...} of ``steps`` meta-steps
    (``inner_steps``: instead of the workload's)."""
    torch.set_num_threads(threads)
    _use_malloc(malloc)
    spec = WORKLOADS[workload]
    spec = spec if inner_steps is None else replace(spec, steps=inner_steps)
    model, step, episode = _setup(spec, implementations(algorithm, spec)[implementation])
    gc.collect()
    reset_resident_peak()  # the peak (VmHWM) is now the current resident size
    before = resident_mb()["VmRSS"]
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        step(episode)
    print(json.dumps({"peak_growth_mb": resident_mb()["VmHWM"] - before, "rss_before_mb": before}))


def _child(*args: str) -> dict:
    result = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def memory(workloads=("W1", "W2", "W3", "MI"), algorithms=tuple(ALGORITHMS), steps: int = 3,
           repeats: int = 3, threads: int = 2, mallocs=tuple(MALLOC_SETTINGS),
           write: str | None = None) -> str:
    """Peak memory growth of every implementation under every malloc setting: the median (and
    range) over ``repeats`` fresh processes each (one process's figure varies by about +-5%)."""
    torch.set_num_threads(threads)
    workloads, algorithms, mallocs = _as_tuple(workloads), _as_tuple(algorithms), _as_tuple(mallocs)
    columns = "".join(f" peak growth (MB, {m}), median | range |" for m in mallocs)
    out = [_header(f"python benchmarks/peers.py memory --workloads {','.join(workloads)} --algorithms "
                   f"{','.join(algorithms)} --steps {steps} --repeats {repeats} --threads {threads} "
                   f"--mallocs {','.join(mallocs)}", threads,
                   f"Growth of the peak resident set size during {steps} meta-steps over the "
                   "resident size before them (model and data already built); median and range over "
                   f"{repeats} fresh processes per implementation and malloc setting "
                   f"({_malloc_legend(mallocs)})."), "",
           f"| workload | algorithm | implementation |{columns}", "|---|---|---|" + "---|---|" * len(mallocs)]
    for name in workloads:
        for algorithm in algorithms:
            for label in implementations(algorithm, WORKLOADS[name]):
                cells = ""
                for malloc in mallocs:
                    growths = sorted(_child("memory_of", name, algorithm, label, f"--steps={steps}",
                                            f"--threads={threads}", f"--malloc={malloc}")["peak_growth_mb"]
                                     for _ in range(repeats))
                    cells += f" {statistics.median(growths):.0f} | {growths[0]:.0f}-{growths[-1]:.0f} |"
                out.append(f"| {name} | {ALGORITHM_NAMES[algorithm]} | {label} |{cells}")
                print(out[-1], flush=True)
    return _finish(out, write, "peers-memory", "Meta-step memory: diffopt and its peers")


def long_run_of(workload: str, iterations: int, every: int, threads: int = 2, malloc: str = "kept") -> None:
    """(In a fresh process) diffopt MAML training with an outer Adam step; print the JSON list of
    the resident set size (MB) every ``every`` meta-iterations."""
    torch.set_num_threads(threads)
    _use_malloc(malloc)
    spec = WORKLOADS[workload]
    torch.manual_seed(0)
    model = spec.model()
    learner = build_algorithm("maml", model, InnerLoop("sgd", spec.lr, spec.steps), spec.loss, "never")
    outer = torch.optim.Adam(learner.parameters(), 1e-3)
    g = torch.Generator().manual_seed(0)
    trace = []
    for iteration in range(1, iterations + 1):
        outer.zero_grad(set_to_none=True)
        learner.meta_gradient(spec.episode(g))  # a new meta-batch every iteration
        outer.step()
        if iteration % every == 0:
            trace.append([iteration, resident_mb()["VmRSS"]])
    print(json.dumps(trace))


def scaling(workloads=("W3", "W3-10shot"), max_steps: int = 5, long_workload: str = "W3",
            iterations: int = 300, every: int = 25, threads: int = 2, write: str | None = None) -> str:
    """Second-order MAML memory against inner steps (fresh process each), and the resident size
    along a long training run."""
    workloads = _as_tuple(workloads)
    out = [_header(f"python benchmarks/peers.py scaling --workloads {','.join(workloads)} --max_steps "
                   f"{max_steps} --long_workload {long_workload} --iterations {iterations}", threads,
                   "Peak growth over 2 meta-steps, diffopt MAML (sgd), a fresh process per count of "
                   "inner steps; then the resident set size along one training run (a new meta-batch "
                   "and an Adam outer step every iteration); freed memory kept, as the trainer "
                   "does."), ""]
    for workload in workloads:
        out += [f"{workload}: {WORKLOADS[workload].description} (inner steps varied)", "",
                "| inner steps | diffopt peak growth (MB) | added by the step (MB) |", "|---|---|---|"]
        previous = None
        for steps in range(1, max_steps + 1):
            growth = _child("memory_of", workload, "maml", DIFFOPT, "--steps=2", f"--threads={threads}",
                            f"--inner_steps={steps}", "--malloc=kept")["peak_growth_mb"]
            added = "" if previous is None else str(growth - previous)
            out.append(f"| {steps} | {growth} | {added} |")
            print(out[-1], flush=True)
            previous = growth
        out.append("")
    trace = _child("long_run_of", long_workload, str(iterations), str(every), f"--threads={threads}")
    out += [f"Resident set size along {iterations} meta-iterations of diffopt MAML on {long_workload}:",
            "", "| meta-iteration | " + " | ".join(str(i) for i, _ in trace) + " |",
            "|---|" + "---|" * len(trace), "| RSS (MB) | " + " | ".join(str(m) for _, m in trace) + " |"]
    return _finish(out, write, "peers-scaling", "Meta-step memory: inner steps and long runs")


def all(write: str | None = None, rounds: int = 5, threads: int = 2) -> None:  # noqa: A001
    """speed, memory and scaling, each written into ``write``."""
    speed(rounds=rounds, threads=threads, write=write)
    memory(threads=threads, write=write)
    scaling(threads=threads, write=write)


if __name__ == "__main__":
    fire_checked({"speed": speed, "memory": memory, "scaling": scaling, "all": all,
                  "timing_worker": timing_worker, "memory_of": memory_of, "long_run_of": long_run_of},
                 name="peers")
