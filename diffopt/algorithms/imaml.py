"""Implicit MAML (Rajeswaran et al. 2019): the meta-gradient at the inner problem's solution,
without differentiating through the inner steps.

The inner loop solves w*(phi) = argmin_w L_s(w) + lambda/2 ||w - phi||^2 approximately (the inner
steps, ``InnerLoop(proximal=lambda)``). At a minimum, grad L_s(w*) + lambda (w* - phi) = 0, so
dw*/dphi = (I + H/lambda)^-1 with H the Hessian of L_s at w*, and the meta-gradient of the query
loss L_q(w*) is (I + H/lambda)^-1 grad L_q(w*) (H symmetric), solved by conjugate gradient on
Hessian-vector products. No graph of the inner steps is kept: memory does not grow with them.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from diffopt.algorithms.base import MetaAlgorithm, TaskGradient, accumulate_grad
from diffopt.data.episode import Episode, Task
from diffopt.errors import DiffoptError, as_typed
from diffopt.fastweights import FunctionalModel
from diffopt.inner import InnerLoop, LossFn, adapted_mask
from diffopt.models.norm import ShiftBatchNorm
from diffopt.options import Option, check_int
from diffopt.unroll import reduce_loss
from diffopt.vectorize import over_tasks

Vectors = list[torch.Tensor]
NORM_LAYERS = (ShiftBatchNorm, nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)


def _dot(a: Vectors, b: Vectors) -> torch.Tensor:
    return torch.stack([(u * v).sum() for u, v in zip(a, b, strict=True)]).sum()


def _ratio(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """numerator / denominator, 0 where the denominator is 0 (a solved system's residual)."""
    return numerator / torch.where(denominator == 0, torch.ones_like(denominator), denominator)


def inner_residual(support_grads: Vectors, weights: Vectors, anchor: Vectors, lam: float,
                   mask: list[bool]) -> torch.Tensor:
    """How far the inner loop's result w is from solving the proximal problem, scale-free:
    ||g + lambda (w - phi)|| / (||g|| + lambda ||w - phi||) over the adapted tensors, g the
    support loss's gradient at w, phi = ``anchor``. 0 at the solution (the implicit gradient is
    the meta-gradient there); near 1 when the steps barely moved (w ~ phi: the implicit gradient
    is then not the meta-gradient). Vmappable."""
    def norm(vectors: Vectors) -> torch.Tensor:
        return torch.sqrt(_dot(vectors, vectors))

    chosen = [(g, w - phi) for g, w, phi, adapted in zip(support_grads, weights, anchor, mask, strict=True)
              if adapted]
    residual = norm([g + lam * moved for g, moved in chosen])
    return _ratio(residual, norm([g for g, _ in chosen]) + lam * norm([moved for _, moved in chosen]))


RESIDUAL_WARNING = 0.5
"""``IMAML`` warns once when the mean ``inner_residual`` of a meta-batch is above this."""


def conjugate_gradient(matvec: Callable[[Vectors], Vectors], b: Vectors, steps: int,
                       tolerance: float | None = 1e-10) -> Vectors:
    """x ~ A^-1 b for a symmetric positive definite A given as ``matvec`` (lists of tensors),
    after at most ``steps`` iterations from x = 0 (imaml_dev's utils.cg_solve), stopping once the
    residual ||b - A x|| is below ``tolerance`` ||b|| (imaml_dev: ||r||^2 < 1e-10, absolute,
    which stops float64 checks early on small gradients). ``tolerance`` None: exactly ``steps``
    iterations, no data-dependent stop (under ``torch.func.vmap``). ``steps`` = 0 gives b itself
    (the first-order approximation)."""
    if steps == 0:
        return [v.clone() for v in b]
    x = [torch.zeros_like(v) for v in b]
    r = [v.clone() for v in b]
    p = [v.clone() for v in b]
    r_dot_r = _dot(r, r)
    stop = None if tolerance is None else tolerance ** 2 * r_dot_r.item()
    for _ in range(steps):
        if stop is not None and r_dot_r.item() <= stop:
            break
        a_p = matvec(p)
        alpha = _ratio(r_dot_r, _dot(p, a_p))
        x = [xi + alpha * pi for xi, pi in zip(x, p, strict=True)]
        r = [ri - alpha * ai for ri, ai in zip(r, a_p, strict=True)]
        new_r_dot_r = _dot(r, r)
        p = [ri + _ratio(new_r_dot_r, r_dot_r) * pi for ri, pi in zip(r, p, strict=True)]
        r_dot_r = new_r_dot_r
    return x


class IMAML(MetaAlgorithm):
    """Implicit MAML: the inner loop with the proximal term (``inner.proximal`` = lambda > 0, the
    ``--inner_proximal`` option), then per task v = (I + H/lambda)^-1 grad_w L_q(w*) by
    ``cg_steps`` of conjugate gradient, H the Hessian of the inner loss (``loss_reduction``) at w*
    over the adapted tensors. Adapted tensors get v; tensors the inner loop leaves alone
    (``--inner_params``) get their direct gradient minus H[them, adapted] v / lambda (the same
    implicit derivative). The meta-gradient is the gradient of ``meta_loss`` (the query loss at
    the inner loop's result) once the inner loop has converged and CG has solved the system:
    ``gradient_at_optimum``. Vectorized (``vectorize``, where ``diffopt.vectorize`` allows), every
    task's inner loop, gradients and CG run in one ``torch.func.vmap`` (Hessian-vector products
    as ``vjp`` of ``grad``; CG then takes exactly ``cg_steps`` iterations);
    otherwise tasks run one at a time (``task_threads`` on threads), CG stopping early once solved.

    Constructor arguments: see ``MetaAlgorithm``; ``cg_steps``, conjugate-gradient iterations
    per task (0: the first-order approximation grad L_q(w*)).
    """

    name = "imaml"
    gradient_at_optimum = True
    solves_inner_problem = True
    OPTIONS = {
        "cg_steps": Option(
            int | None, 5, "imaml: conjugate-gradient iterations solving (I + H/lambda) v = query "
            "gradient per task (0: the first-order approximation); default 5 (imaml_dev)",
            belongs="imaml's linear solve"),
    }
    inner_defaults = {"inner_proximal": 1.0}

    def __init__(self, model: nn.Module, inner: InnerLoop, loss_fn: LossFn, vectorize: str = "auto",
                 task_threads: int = 1, cg_steps: int = 5) -> None:
        self.check_options(cg_steps=cg_steps)
        if vectorize != "never" and any(isinstance(m, NORM_LAYERS) for m in model.modules()):
            obstacle = ("its Hessian-vector products through batch norm do not run under "
                        "torch.func.vmap (a double backward reads .data)")
            if vectorize == "always":
                raise DiffoptError(f"cannot vectorize imaml's meta-batch: {obstacle}; use "
                                   "vectorize='never' (--vectorize never)")
            warnings.warn(f"running the tasks of a meta-batch one by one, not all at once: {obstacle}",
                          UserWarning, stacklevel=2)
            vectorize = "never"
        super().__init__(model, inner, loss_fn, vectorize=vectorize, task_threads=task_threads)
        self.cg_steps = cg_steps
        self.warned_unsolved = False
        """Whether the warning about an unsolved inner problem was given (it is given once)."""

    @classmethod
    def check_options(cls, cg_steps: int = 5) -> None:
        check_int("cg_steps", cg_steps, 0)

    @classmethod
    def check_inner(cls, inner: Any, task_threads: int) -> None:
        super().check_inner(inner, task_threads)
        if not (isinstance(inner.proximal, int | float) and inner.proximal > 0):
            raise DiffoptError(f"--inner_proximal must be a finite number > 0 for imaml, the weight "
                               f"lambda of its inner problem's proximal term; got {as_typed(inner.proximal)}")

    def _solve(self, task: Task) -> nn.Module:
        """The model after the inner loop on the support set (no graph), one task (not vmapped)."""
        return self.inner.adapt(self.model, self.loss_fn, task.support_x, task.support_y,
                                track_higher_grads=False)

    def meta_loss(self, episode: Episode, *, track_higher_grads: bool = True) -> torch.Tensor:
        """The mean query loss at the inner loop's result."""
        return torch.stack([self.loss_fn(self._solve(task)(task.query_x), task.query_y)
                            for task in episode]).mean()

    def task_gradient(self, task: Task, scale: float = 1.0) -> TaskGradient:
        """(the implicit meta-gradient of ``scale`` x the task's query loss per model parameter,
        that loss)."""
        grads, loss, _ = self._task_terms(task, scale)
        return grads, loss

    def _task_terms(self, task: Task, scale: float) -> tuple[Vectors, torch.Tensor, torch.Tensor]:
        """``task_gradient``'s pair and the task's ``inner_residual``, one task (not vmapped)."""
        solved = self._solve(task)
        weights = list(solved.parameters())
        query = self.loss_fn(solved(task.query_x), task.query_y) * scale
        query_grads = _zeros_for_none(torch.autograd.grad(query, weights, allow_unused=True), weights)
        prediction = solved(task.support_x)
        support = reduce_loss(self.loss_fn(prediction, task.support_y), prediction, self.inner.loss_reduction)
        support_grads = _zeros_for_none(
            torch.autograd.grad(support, weights, create_graph=True, allow_unused=True), weights)
        mask = adapted_mask(self.model, self.inner.params)

        def hessian_times(vectors: Vectors) -> Vectors:
            product = _dot([g for g, adapted in zip(support_grads, mask, strict=True) if adapted], vectors)
            return _zeros_for_none(torch.autograd.grad(product, weights, retain_graph=True,
                                                       allow_unused=True), weights)

        grads = self._implicit_gradient(query_grads, hessian_times, mask, tolerance=1e-10)
        with torch.no_grad():
            residual = inner_residual(support_grads, weights, list(self.model.parameters()),
                                      self.inner.proximal, mask)
        return grads, query.detach(), residual

    def _implicit_gradient(self, query_grads: Vectors, hessian_times: Callable[[Vectors], Vectors],
                           mask: list[bool], tolerance: float | None) -> Vectors:
        """Per model tensor, the implicit meta-gradient from the query gradient at w*, given
        ``hessian_times`` (vectors on the adapted tensors -> H [vectors, 0 elsewhere] for every
        tensor): v = (I + H_aa / lambda)^-1 g_a by CG for the adapted tensors, g_n - H_na v / lambda
        for the others."""
        lam = self.inner.proximal

        def system(vectors: Vectors) -> Vectors:  # (I + H_aa / lambda) vectors
            hv = [h for h, adapted in zip(hessian_times(vectors), mask, strict=True) if adapted]
            return [v + h / lam for v, h in zip(vectors, hv, strict=True)]

        adapted = [g for g, a in zip(query_grads, mask, strict=True) if a]
        solution = conjugate_gradient(system, adapted, self.cg_steps, tolerance=tolerance)
        if all(mask):
            return solution
        cross, on_adapted = hessian_times(solution), iter(solution)
        return [next(on_adapted) if a else g - h / lam
                for g, h, a in zip(query_grads, cross, mask, strict=True)]

    def _functional_task_terms(self, task: Task) -> tuple[Vectors, torch.Tensor, torch.Tensor]:
        """``_task_terms`` (scale 1) as pure functions of tensors (``torch.func``), for vmap."""
        model, reduction = self.model, self.inner.loss_reduction
        names = [name for name, _ in model.named_parameters()]
        mask = adapted_mask(model, self.inner.params)
        solved = self.adapt(task.support_x, task.support_y, track_higher_grads=False)
        weights = [w.detach() for w in solved.parameters()]

        def query_loss(w: Vectors) -> torch.Tensor:
            return self.loss_fn(FunctionalModel(model, names, w)(task.query_x), task.query_y)

        def support_loss(w: Vectors) -> torch.Tensor:
            prediction = FunctionalModel(model, names, w)(task.support_x)
            return reduce_loss(self.loss_fn(prediction, task.support_y), prediction, reduction)

        # H v as the vector-Jacobian product of the support gradient (H symmetric), its graph
        # built once for every CG iteration
        support_grads, support_vjp = torch.func.vjp(torch.func.grad(support_loss), weights)

        def hessian_times(vectors: Vectors) -> Vectors:
            on_adapted = iter(vectors)
            (product,) = support_vjp([next(on_adapted) if adapted else torch.zeros_like(w)
                                      for w, adapted in zip(weights, mask, strict=True)])
            return product

        query_grads, loss = torch.func.grad_and_value(query_loss)(weights)
        anchor = [p.detach() for p in model.parameters()]
        residual = inner_residual(support_grads, weights, anchor, self.inner.proximal, mask)
        return self._implicit_gradient(query_grads, hessian_times, mask, tolerance=None), loss, residual

    def meta_gradient(self, episode: Episode) -> dict[str, float]:
        """Metrics: ``loss``, the mean query loss at the inner loop's results; ``inner_residual``,
        the tasks' mean ``inner_residual`` (a warning, once, if it is above ``RESIDUAL_WARNING``)."""
        params = list(self.model.parameters())
        if self.vectorized:
            grads, losses, residuals = over_tasks(self._functional_task_terms, episode)
            accumulate_grad(params, [g.mean(0) for g in grads])
            return self._metrics(losses.mean().item(), residuals.mean().item())
        residuals: list[float] = []

        def task_gradient(task: Task) -> TaskGradient:
            grads, loss, residual = self._task_terms(task, 1.0 / len(episode))
            residuals.append(residual.item())
            return grads, loss

        loss = self.accumulate_tasks(task_gradient, episode, params)
        return self._metrics(loss, sum(residuals) / len(residuals))

    def _metrics(self, loss: float, residual: float) -> dict[str, float]:
        """``meta_gradient``'s metrics; the warning, once, if ``residual`` is above the bound."""
        if not residual <= RESIDUAL_WARNING and not self.warned_unsolved:  # NaN: not solved either
            self.warned_unsolved = True
            warnings.warn(
                f"imaml's inner steps leave the proximal problem far from solved (inner_residual "
                f"{residual:.2f}; 0 is solved), so its implicit gradient is not the meta-gradient: "
                "take more --inner_steps, a larger --inner_lr or a larger --inner_proximal",
                UserWarning, stacklevel=3)
        return {"loss": loss, "inner_residual": residual}


def _zeros_for_none(grads, like: Vectors) -> Vectors:
    return [torch.zeros_like(w) if g is None else g for g, w in zip(grads, like, strict=True)]
