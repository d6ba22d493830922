"""Levers for the meta-step on conv-4 (issue 33), each timed against a hand-written baseline in one process.

    python benchmarks/second_order_levers.py loop --workload W2 --rounds 6
    python benchmarks/second_order_levers.py reference --algorithm fomaml --rounds 30
    python benchmarks/second_order_levers.py reference --algorithm maml --recipe goal --rounds 10
    python benchmarks/second_order_levers.py support --workload W3 --shots 1,2,5,10
    python benchmarks/second_order_levers.py compiled

``loop``: second-order MAML with sgd on a workload of peers.py (W2, W3: conv-4 with affine batch
norm, which loops over tasks), the baseline the hand-written loop with a backward per task
(references.py, the fastest peer on this CPU), then its variants (one summed backward,
channels-last tensors, oneDNN off), diffopt as it runs (the support side under vmap where it
applies), its loop over tasks (functional; and through higher)
and affine batch norm written for vmap (``batch_norm`` without affine parameters, then ``* w + b``)
vmapped by diffopt, and that layer under vmap on the support side only (every task's inner steps
at once, each task's query loss alone, one backward through the batched inner steps).
``support``: MAML with every task's inner loop under vmap against whole tasks one at a time, for
support sets of growing size (``diffopt.vectorize.SMALL_SUPPORT``).
``compiled``: whether ``torch.compile`` (inductor) keeps the graph a second-order meta-step
differentiates: the gradient of a compiled convolution's loss taken with ``create_graph``, then
differentiated again, against eager.
``reference``: MAML's Omniglot step with cbfinn/maml's recipe (5-way 1-shot, one query per
class, meta-batch 32, one inner step of 0.4; diffopt vmaps it) or the goal
table's (``--recipe goal``: 15 queries per class, meta-batch 8, affine batch norm: diffopt
loops over tasks), the baseline the independent reference's hand-batched step
(omniglot_reference.py: the tasks as groups of one grouped convolution), on the same random
tasks; beside diffopt as it runs, diffopt with its 'SAME' padding copied in (``F.pad``) instead
of run on turned maps (``SameConv2d``).

Every round times each implementation once, in turn; the medians after 2 warm-up rounds, and
their ratios to the baseline. The meta-gradients are compared first where the implementations
share a model. One process and one thread unless OMP_NUM_THREADS says otherwise: ratios for
deciding levers; peers.py is the protocol for the published table (a process per implementation).
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import omniglot_reference as reference_code  # noqa: E402
from omniglot_table import GOAL_RECIPE  # noqa: E402
from peers import WORKLOADS, _images  # noqa: E402
from references import maml_hand_written, maml_hand_written_per_task  # noqa: E402

import diffopt.algorithms.maml as maml_module  # noqa: E402
from diffopt import vectorize  # noqa: E402
from diffopt.algorithms import build_algorithm  # noqa: E402
from diffopt.config import resolve_config  # noqa: E402
from diffopt.data import Episode  # noqa: E402
from diffopt.firecli import fire_checked  # noqa: E402
from diffopt.inner import InnerLoop  # noqa: E402
from diffopt.models.conv4 import SameConv2d  # noqa: E402
from diffopt.train import build  # noqa: E402


class VmapAffineNorm(nn.Module):
    """Affine batch norm with batch statistics as ``torch.func.vmap`` batches it best: the
    normalisation without affine parameters, then the scale and shift (``bn``'s own tensors)."""

    def __init__(self, bn: nn.BatchNorm2d) -> None:
        super().__init__()
        self.weight, self.bias, self.eps = bn.weight, bn.bias, bn.eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        normalised = F.batch_norm(x, None, None, None, None, True, 0.0, self.eps)
        return normalised * self.weight.view(shape) + self.bias.view(shape)


def _time(implementations: dict[str, Callable[[], None]], rounds: int, warmup: int = 2) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in implementations}
    for round_ in range(warmup + rounds):
        for name, step in implementations.items():
            began = time.perf_counter()
            step()
            if round_ >= warmup:
                times[name].append(time.perf_counter() - began)
    return {name: statistics.median(values) for name, values in times.items()}


def _print(medians: dict[str, float], baseline: str, agreement: dict[str, float] | None = None) -> None:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); ratios to {baseline!r}")
    print("| implementation | s / meta-step | ratio | max meta-gradient difference (relative) |")
    print("|---|---|---|---|")
    for name, seconds in medians.items():
        difference = "" if agreement is None or name not in agreement else f"{agreement[name]:.1e}"
        print(f"| {name} | {seconds:.4f} | {seconds / medians[baseline]:.3f}x | {difference} |")


def loop(workload: str = "W2", rounds: int = 6) -> None:
    """Second-order MAML (sgd) on peers.py's ``workload``: the levers against the hand-written loop."""
    if workload not in WORKLOADS:
        raise SystemExit(f"--workload is one of {', '.join(WORKLOADS)}; got {workload!r}")
    spec = WORKLOADS[workload]
    torch.manual_seed(0)
    model = spec.model()
    episode = spec.episode(torch.Generator().manual_seed(0))
    per_task = maml_hand_written_per_task(model, spec.lr, spec.steps, spec.loss)

    def channels_last() -> None:
        initial = {n: p.contiguous(memory_format=torch.channels_last) if p.dim() == 4 else p
                   for n, p in model.named_parameters()}
        for task in episode:
            params = initial
            support, query = (x.contiguous(memory_format=torch.channels_last)
                              for x in (task.support_x, task.query_x))
            for _ in range(spec.steps):
                loss = spec.loss(functional_call(model, params, (support,)), task.support_y)
                grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
                params = {n: p - spec.lr * g for (n, p), g in zip(params.items(), grads, strict=True)}
            (spec.loss(functional_call(model, params, (query,)), task.query_y) / len(episode)).backward()

    def without_onednn() -> None:
        with torch.backends.mkldnn.flags(enabled=False):
            per_task(episode)

    def diffopt_maml(vectorize: str):
        return build_algorithm("maml", model, InnerLoop("sgd", spec.lr, spec.steps, model=model), spec.loss,
                               vectorize, 1)

    diffopt, one_by_one = diffopt_maml("auto"), diffopt_maml("never")

    def through_higher() -> None:
        functional = maml_module.loops_functionally
        maml_module.loops_functionally = lambda *args: False
        try:
            one_by_one.meta_gradient(episode)
        finally:
            maml_module.loops_functionally = functional

    vmapped_model = spec.model()
    vmapped_model.load_state_dict(model.state_dict())
    for index, module in enumerate(vmapped_model):
        if isinstance(module, nn.BatchNorm2d):
            vmapped_model[index] = VmapAffineNorm(module)
    safe = vectorize.VMAP_SAFE_MODULES
    vectorize.VMAP_SAFE_MODULES = (*safe, VmapAffineNorm)
    try:
        inner = InnerLoop("sgd", spec.lr, spec.steps, model=vmapped_model)
        vmapped = build_algorithm("maml", vmapped_model, inner, spec.loss, "always", 1)
    finally:
        vectorize.VMAP_SAFE_MODULES = safe
    summed = maml_hand_written(model, spec.lr, spec.steps, spec.loss)
    names = [name for name, _ in model.named_parameters()]

    def support_under_vmap() -> None:
        """Every task's inner steps at once under vmap (the affine norm as vmap differentiates it
        right), then each task's query loss alone, differentiated to its fast weights only (its
        graph freed), and one backward through the batched inner steps."""
        def adapt(weights: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
            def support_loss(current: list[torch.Tensor]) -> torch.Tensor:
                named = dict(zip(names, current, strict=True))
                return spec.loss(functional_call(vmapped_model, named, (x,)), y)
            for _ in range(spec.steps):
                grads = torch.func.grad(support_loss)(weights)
                weights = [w - spec.lr * g for w, g in zip(weights, grads, strict=True)]
            return weights

        fast = torch.func.vmap(adapt, in_dims=(None, 0, 0))(list(model.parameters()), episode.support_x,
                                                           episode.support_y)
        to_fast = [torch.empty_like(weights) for weights in fast]
        for index, task in enumerate(episode):
            leaves = [weights[index].detach().requires_grad_() for weights in fast]
            loss = spec.loss(functional_call(model, dict(zip(names, leaves, strict=True)), (task.query_x,)),
                             task.query_y) / len(episode)
            for buffer, grad in zip(to_fast, torch.autograd.grad(loss, leaves), strict=True):
                buffer[index] = grad
        torch.autograd.backward(fast, to_fast)

    steps = {
        "hand-written loop, backward per task": lambda: per_task(episode),
        "the same, one summed backward": lambda: summed(episode),
        "the same, channels-last tensors": channels_last,
        "the same, oneDNN off": without_onednn,
        f"diffopt ({diffopt.meta_batch_path(episode)})":
            lambda: diffopt.meta_gradient(episode),
        f"diffopt, tasks one by one (functional loop: {one_by_one.functional_loop})":
            lambda: one_by_one.meta_gradient(episode),
        "diffopt through higher": through_higher,
        "affine batch norm vmapped (batch_norm, then * w + b)": lambda: vmapped.meta_gradient(episode),
        "support side under vmap, query side per task": support_under_vmap,
    }
    grads, agreement = {}, {}
    for name, step in steps.items():
        target = vmapped_model if "vmapped" in name else model
        target.zero_grad(set_to_none=True)
        step()
        grads[name] = [p.grad.clone() for p in target.parameters()]
    baseline = next(iter(grads.values()))
    scale = max(float(g.abs().max()) for g in baseline)
    for name, values in grads.items():
        worst = max(float((a - b).abs().max()) for a, b in zip(values, baseline, strict=True))
        agreement[name] = worst / scale

    def zeroed(step: Callable[[], None]) -> Callable[[], None]:
        return lambda: (model.zero_grad(set_to_none=True), vmapped_model.zero_grad(set_to_none=True), step())

    print(f"{workload}: {spec.description}; second-order MAML, sgd")
    _print(_time({name: zeroed(step) for name, step in steps.items()}, rounds), next(iter(steps)), agreement)


def _padded(learner) -> None:
    """``learner``'s 'SAME' convolutions padded by copies (``F.pad``), not run on turned maps."""
    for module in learner.model.modules():
        if isinstance(module, SameConv2d):
            module.turned_input = module.turned_output = False


def reference(algorithm: str = "fomaml", recipe: str = "cbfinn", rounds: int = 30) -> None:
    """MAML's Omniglot step with ``recipe``'s settings (cbfinn: one query per class, meta-batch
    32; goal: the goal table's recipe), diffopt's against the reference's grouped one."""
    if algorithm not in ("maml", "fomaml") or recipe not in reference_code.MAML_RECIPES:
        raise SystemExit(f"--algorithm is maml or fomaml, --recipe one of "
                         f"{', '.join(reference_code.MAML_RECIPES)}; got {algorithm!r}, {recipe!r}")
    settings = reference_code.MAML_RECIPES[recipe]
    options = dict(meta_batch_size=32) if recipe == "cbfinn" else GOAL_RECIPE
    config = resolve_config(dataset="omniglot", algorithm=algorithm, shots=1, **options)
    learner, padded = build(config), build(config)
    _padded(padded)
    one_by_one = build(resolve_config(dataset="omniglot", algorithm=algorithm, shots=1, vectorize="never",
                                      **options))
    tasks, ways, queries = config.meta_batch_size, config.ways, settings["queries"] or 1
    g = torch.Generator().manual_seed(0)
    episode = Episode(torch.rand(tasks, ways, 1, 28, 28, generator=g), torch.arange(ways).repeat(tasks, 1),
                      torch.rand(tasks, ways * queries, 1, 28, 28, generator=g),
                      torch.arange(ways).repeat_interleave(queries).repeat(tasks, 1))
    params = {name: p.requires_grad_() for name, p in
              reference_code.init_params("maml", ways, torch.Generator().manual_seed(0), recipe).items()}
    first_order = algorithm == "fomaml"

    def reference_step() -> None:
        fast = reference_code.maml_adapt(params, episode.support_x, episode.support_y, config.inner_steps,
                                         config.inner_lr, 1, create_graph=not first_order, track=True,
                                         recipe=recipe)
        logits = reference_code.forward(fast, episode.query_x.transpose(0, 1), settings["head"],
                                        settings["bn_eps"])
        losses = F.cross_entropy(logits.reshape(-1, ways), episode.query_y.transpose(0, 1).reshape(-1),
                                 reduction="none")
        torch.autograd.grad(losses.sum() / tasks, list(params.values()))

    def step(implementation) -> Callable[[], None]:
        return lambda: (implementation.zero_grad(set_to_none=True), implementation.meta_gradient(episode))

    print(f"Omniglot {algorithm} step, the {recipe} recipe, meta-batch {tasks}; diffopt: "
          f"{learner.meta_batch_path(episode)}")
    baseline = "reference (grouped convolutions)"
    _print(_time({baseline: reference_step, "diffopt": step(learner),
                  "diffopt, 'SAME' padded by copies (F.pad)": step(padded),
                  "diffopt, tasks one by one (vectorize='never')": step(one_by_one)}, rounds), baseline)


def support(workload: str = "W3", shots=(1, 2, 5, 10), rounds: int = 6) -> None:
    """Second-order MAML (sgd) on ``workload``'s model, meta-batch, inner steps and image shape
    with ``shots`` support images per class: every task's inner loop under vmap against whole
    tasks one at a time (where ``diffopt.vectorize.SMALL_SUPPORT`` comes from)."""
    if workload not in WORKLOADS:
        raise SystemExit(f"--workload is one of {', '.join(WORKLOADS)}; got {workload!r}")
    spec = WORKLOADS[workload]
    sample = spec.episode(torch.Generator().manual_seed(0))
    tasks, shape = len(sample), tuple(sample.support_x.shape[2:])

    def step(model: nn.Module, episode: Episode, **options) -> Callable[[], None]:
        inner = InnerLoop("sgd", spec.lr, spec.steps, model=model)
        learner = build_algorithm("maml", model, inner, spec.loss, "auto", 1, **options)
        return lambda: (model.zero_grad(set_to_none=True), learner.meta_gradient(episode))

    baseline = "whole tasks one at a time (--support_vmap_tasks 1)"
    for count in (shots,) if isinstance(shots, int) else shots:
        torch.manual_seed(0)
        model = spec.model()
        episode = _images(torch.Generator().manual_seed(0), tasks, 5, count, 15, shape)
        print(f"{workload} with {count}-shot support sets ({episode.support_x[0].numel()} elements a task; "
              f"SMALL_SUPPORT {vectorize.SMALL_SUPPORT})")
        _print(_time({baseline: step(model, episode, support_vmap_tasks=1),
                      "every task's support side under vmap": step(model, episode, support_vmap_tasks=tasks)},
                     rounds), baseline)


def compiled() -> None:
    """Second-order gradients through ``torch.compile`` (inductor) against eager: printed, or the
    error the compiled path raises."""
    torch.manual_seed(0)
    weight, x = torch.randn(8, 3, 3, 3, requires_grad=True), torch.randn(5, 3, 16, 16)

    def loss(w: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, w).relu().pow(2).mean()

    print(f"torch {torch.__version__}")
    for name, function in [("eager", loss), ("torch.compile (inductor)", torch.compile(loss))]:
        try:
            grad, = torch.autograd.grad(function(weight), weight, create_graph=True)
            second, = torch.autograd.grad((grad * grad).sum(), weight)
            print(f"{name}: second-order gradient norm {float(second.norm()):.6f}")
        except RuntimeError as error:
            print(f"{name}: {type(error).__name__}: {str(error).splitlines()[0]}")


if __name__ == "__main__":
    fire_checked({"loop": loop, "reference": reference, "support": support, "compiled": compiled},
                 name="second_order_levers")
