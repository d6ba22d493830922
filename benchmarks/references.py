"""Reference (peer) implementations of meta-gradients, for the benchmarks to time against diffopt.

Every builder has the signature ``build(model, lr, steps, loss_fn) -> meta_gradient`` and
``meta_gradient(episode)`` adds to each parameter's ``.grad`` the meta-gradient of the episode,
averaged over its tasks (the caller zeroes the gradients before). The inner loop is ``steps``
plain SGD steps with step size ``lr`` on a task's full support set (Reptile: support and query
sets together), as ``diffopt.inner.InnerLoop("sgd", lr, steps)``.

``REFERENCES`` maps algorithm -> peer label -> builder, listing only the peers whose library
imports; ``MISSING`` says why an optional peer (learn2learn, torchopt) is left out.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Callable

import higher
import torch
from torch import nn
from torch.func import functional_call

from diffopt.data import Episode

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
MetaGradient = Callable[[Episode], None]
Builder = Callable[[nn.Module, float, int, LossFn], MetaGradient]

MISSING: dict[str, str] = {}
"""Optional peer library -> why it could not be imported."""

try:
    # learn2learn imports gym, which prints a deprecation notice to stderr.
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        import learn2learn
except Exception as error:  # any import failure only drops the peer
    learn2learn = None
    MISSING["learn2learn"] = f"{type(error).__name__}: {error}"

try:
    # torchopt's compiled ops do not load on recent torch; its SGD never uses them (pure Python).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import torchopt
except Exception as error:
    torchopt = None
    MISSING["torchopt"] = f"{type(error).__name__}: {error}"


def _sgd(model: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor,
         lr: float, steps: int, loss_fn: LossFn, create_graph: bool) -> dict[str, torch.Tensor]:
    """``steps`` SGD steps on (x, y) from ``params``; with ``create_graph`` the result stays
    differentiable through the inner gradients (second order), else they are constants."""
    for _ in range(steps):
        loss = loss_fn(functional_call(model, params, (x,)), y)
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=create_graph)
        params = {n: p - lr * g for (n, p), g in zip(params.items(), grads, strict=True)}
    return params


# --- second-order MAML -------------------------------------------------------------------------


def maml_hand_written(model: nn.Module, lr: float, steps: int, loss_fn: LossFn) -> MetaGradient:
    """``functional_call`` + ``autograd.grad(create_graph=True)`` over the tasks; one backward of
    the mean meta-loss."""

    def meta_gradient(episode: Episode) -> None:
        initial = dict(model.named_parameters())
        total = 0.0
        for task in episode:
            params = _sgd(model, initial, task.support_x, task.support_y, lr, steps, loss_fn, True)
            total = total + loss_fn(functional_call(model, params, (task.query_x,)), task.query_y)
        (total / len(episode)).backward()

    return meta_gradient


def _per_task(model: nn.Module, lr: float, steps: int, loss_fn: LossFn, second_order: bool) -> MetaGradient:
    """Adapt with ``_sgd`` and backward the query loss, one task at a time."""

    def meta_gradient(episode: Episode) -> None:
        initial = dict(model.named_parameters())
        for task in episode:
            params = _sgd(model, initial, task.support_x, task.support_y, lr, steps, loss_fn, second_order)
            loss = loss_fn(functional_call(model, params, (task.query_x,)), task.query_y)
            (loss / len(episode)).backward()

    return meta_gradient


def maml_hand_written_per_task(model: nn.Module, lr: float, steps: int, loss_fn: LossFn) -> MetaGradient:
    """The hand-written loop with one backward per task (each task's graph freed at once)."""
    return _per_task(model, lr, steps, loss_fn, second_order=True)


def maml_higher(model: nn.Module, lr: float, steps: int, loss_fn: LossFn) -> MetaGradient:
    """Naive higher: a new ``innerloop_ctx`` per task, backward per task."""
    inner = torch.optim.SGD(model.parameters(), lr=lr)

    def meta_gradient(episode: Episode) -> None:
        for task in episode:
            with higher.innerloop_ctx(model, inner, copy_initial_weights=False) as (fmodel, diffopt):
                for _ in range(steps):
                    diffopt.step(loss_fn(fmodel(task.support_x), task.support_y))
                (loss_fn(fmodel(task.query_x), task.query_y) / len(episode)).backward()

    return meta_gradient


def _learn2learn(model: nn.Module, lr: float, steps: int, loss_fn: LossFn, first_order: bool) -> MetaGradient:
    maml = learn2learn.algorithms.MAML(model, lr=lr, first_order=first_order)

    def meta_gradient(episode: Episode) -> None:
        for task in episode:
            learner = maml.clone()  # a differentiable clone: gradients flow back to model
            for _ in range(steps):
                learner.adapt(loss_fn(learner(task.support_x), task.support_y))
            (loss_fn(learner(task.query_x), task.query_y) / len(episode)).backward()

    return meta_gradient


def maml_learn2learn(model: nn.Module, lr: float, steps: int, loss_fn: LossFn) -> MetaGradient:
    """learn2learn's ``MAML(first_order=False)``: ``clone`` and ``adapt`` per task, backward per task."""
    return _learn2learn(model, lr, steps, loss_fn, first_order=False)


def maml_torchopt(model: nn.Module, lr: float, steps: int, loss_fn: LossFn) -> MetaGradient:
    """torchopt's ``MetaSGD`` (OOP API, as its MAML example): the steps replace the module's
    parameters by differentiable updates; ``recover_state_dict`` restores them after each task's
    backward."""
    inner = torchopt.MetaSGD(model, lr=lr)

    def meta_gradient(episode: Episode) -> None:
        net_state = torchopt.extract_state_dict(model, by="reference", detach_buffers=True)
        inner_state = torchopt.extract_state_dict(inner, by="reference")
        for task in episode:
            try:
                for _ in range(steps):
                    inner.step(loss_fn(model(task.support_x), task.support_y))
                (loss_fn(model(task.query_x), task.query_y) / len(episode)).backward()
            finally:
                torchopt.recover_state_dict(model, net_state)
                torchopt.recover_state_dict(inner, inner_state)

    return meta_gradient


def lslr_hand_written(model: nn.Module, lr: float, steps: int, loss_fn: LossFn) -> MetaGradient:
    """MAML with learned per-layer, per-step step sizes (MAML++'s LSLR), hand-written: a leaf
    tensor ``alpha`` [tensors, steps] (initialised to ``lr``) scales step s of tensor i; one
    backward per task reaches the initial weights and ``alpha`` (its gradient in
    ``meta_gradient.alpha.grad``)."""
    first = next(model.parameters())
    alpha = first.new_full((len(list(model.parameters())), max(steps, 1)), lr).requires_grad_()

    def meta_gradient(episode: Episode) -> None:
        initial = dict(model.named_parameters())
        for task in episode:
            params = initial
            for step in range(steps):
                loss = loss_fn(functional_call(model, params, (task.support_x,)), task.support_y)
                grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
                params = {n: p - alpha[i, step] * g
                          for i, ((n, p), g) in enumerate(zip(params.items(), grads, strict=True))}
            loss = loss_fn(functional_call(model, params, (task.query_x,)), task.query_y)
            (loss / len(episode)).backward()

    meta_gradient.alpha = alpha
    return meta_gradient


# --- first-order MAML ---------------------------------------------------------------------------


def fomaml_hand_written(model: nn.Module, lr: float, steps: int, loss_fn: LossFn) -> MetaGradient:
    """Inner gradients without a graph, so adapted = initial - lr * (constant); the query loss's
    gradient at the adapted weights reaches the initial ones unchanged. Backward per task."""
    return _per_task(model, lr, steps, loss_fn, second_order=False)


def fomaml_learn2learn(model: nn.Module, lr: float, steps: int, loss_fn: LossFn) -> MetaGradient:
    """learn2learn's ``MAML(first_order=True)``: ``clone`` and ``adapt`` per task, backward per task."""
    return _learn2learn(model, lr, steps, loss_fn, first_order=True)


# --- Reptile --------------------------------------------------------------------------------------


def reptile_hand_written(model: nn.Module, lr: float, steps: int, loss_fn: LossFn) -> MetaGradient:
    """SGD on each task's support + query sets from detached weights; ``.grad += (phi - W) / T``."""

    def meta_gradient(episode: Episode) -> None:
        initial = dict(model.named_parameters())
        for task in episode:
            x = torch.cat([task.support_x, task.query_x])
            y = torch.cat([task.support_y, task.query_y])
            params = {n: p.detach().requires_grad_() for n, p in initial.items()}
            for _ in range(steps):
                loss = loss_fn(functional_call(model, params, (x,)), y)
                grads = torch.autograd.grad(loss, list(params.values()))
                with torch.no_grad():
                    params = {n: (p - lr * g).requires_grad_()
                              for (n, p), g in zip(params.items(), grads, strict=True)}
            with torch.no_grad():
                for name, phi in initial.items():
                    step = (phi - params[name]) / len(episode)
                    if phi.grad is None:
                        phi.grad = step
                    else:
                        phi.grad.add_(step)

    return meta_gradient


def _references() -> dict[str, dict[str, Builder]]:
    references: dict[str, dict[str, Builder]] = {
        "maml": {"hand-written loop": maml_hand_written,
                 "hand-written loop, backward per task": maml_hand_written_per_task,
                 "higher (naive)": maml_higher},
        "lslr": {"hand-written loop": lslr_hand_written},
        "fomaml": {"hand-written loop": fomaml_hand_written},
        "reptile": {"hand-written loop": reptile_hand_written},
    }
    if learn2learn is not None:
        references["maml"]["learn2learn"] = maml_learn2learn
        references["fomaml"]["learn2learn"] = fomaml_learn2learn
    if torchopt is not None:
        references["maml"]["torchopt"] = maml_torchopt
    return references


REFERENCES: dict[str, dict[str, Builder]] = _references()
"""algorithm -> peer label -> builder, for the peers whose library imports."""


def available(algorithm: str) -> dict[str, Builder]:
    """The importable peers of ``algorithm`` (label -> builder); empty when it has none."""
    return dict(REFERENCES.get(algorithm, {}))
