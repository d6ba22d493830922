"""Check an algorithm's meta-gradient against central finite differences of its meta-loss."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from diffopt.algorithms import MetaAlgorithm
from diffopt.data.episode import Episode
from diffopt.errors import DiffoptError


@dataclass(frozen=True)
class ParameterCheck:
    """Errors for one meta-parameter tensor.

    ``abs_error`` = max_i |g_i - fd_i|. ``rel_error`` = abs_error / max(grad_scale, floor): the
    worst element error relative to the tensor's gradient scale ``grad_scale`` = max_i
    max(|g_i|, |fd_i|), where ``floor`` = ``scale_floor`` x the largest gradient scale over all
    meta-parameters (see ``check_meta_gradient``).
    """

    abs_error: float
    rel_error: float
    grad_scale: float


@dataclass(frozen=True)
class GradcheckResult:
    """Worst errors over all meta-parameters, and each parameter's own."""

    max_abs_error: float
    max_rel_error: float
    per_parameter: dict[str, ParameterCheck]

    def passed(self, rtol: float = 1e-5) -> bool:
        return self.max_rel_error < rtol


def finite_difference_gradient(
    algorithm: MetaAlgorithm, episode: Episode, eps: float = 1e-6
) -> dict[str, torch.Tensor]:
    """d meta_loss / d theta for every meta-parameter theta, by central differences.

    Each element is perturbed in place by +-eps and restored; the meta-loss is evaluated
    without higher-order tracking (same value, cheaper).
    """
    gradients = {}
    for name, param in algorithm.named_parameters():
        flat = param.data.view(-1)
        fd = torch.empty_like(flat)
        for i in range(flat.numel()):
            original = flat[i].item()
            flat[i] = original + eps
            plus = algorithm.meta_loss(episode, track_higher_grads=False).item()
            flat[i] = original - eps
            minus = algorithm.meta_loss(episode, track_higher_grads=False).item()
            flat[i] = original
            fd[i] = (plus - minus) / (2 * eps)
        gradients[name] = fd.view_as(param)
    return gradients


def check_meta_gradient(
    algorithm: MetaAlgorithm, episode: Episode, eps: float | Sequence[float] = 1e-6,
    scale_floor: float = 1e-3,
) -> GradcheckResult:
    """Compare ``algorithm.meta_gradient(episode)`` with finite differences, in float64.

    Works on a float64 copy of ``algorithm`` and ``episode``; the originals are untouched.
    The algorithm must compute the exact gradient of its meta-loss (``exact_meta_gradient``), or
    the gradient it has once its inner loop has converged (``gradient_at_optimum``, iMAML: the
    errors then also measure how far the inner loop and its linear solve are from converged).

    Each tensor's error is taken relative to its own gradient scale, but never to less than
    ``scale_floor`` times the largest gradient scale: finite differences carry an absolute
    round-off error (about 1e-16 |meta-loss| / eps), which is no measure of a tensor whose whole
    gradient is near zero (a learned step size early in training, say). A tensor whose gradient
    is wrong still shows an error of about its own scale / floor.
    """
    if not (algorithm.exact_meta_gradient or algorithm.gradient_at_optimum):
        raise DiffoptError(
            f"{algorithm.name}'s meta-gradient is not the gradient of a meta-loss, so finite "
            "differences cannot check it; gradcheck an exact algorithm such as maml"
        )
    algorithm = copy.deepcopy(algorithm).double()
    episode = episode.to(dtype=torch.float64)
    algorithm.zero_grad(set_to_none=True)
    algorithm.meta_gradient(episode)
    analytic = {
        name: (p.grad if p.grad is not None else torch.zeros_like(p)).detach().clone()
        for name, p in algorithm.named_parameters()
    }
    per_parameter: dict[str, ParameterCheck] = {}
    for step in [eps] if isinstance(eps, (int, float)) else eps:
        numeric = finite_difference_gradient(algorithm, episode, step)
        scales = {name: max(grad.abs().max().item(), numeric[name].abs().max().item())
                  for name, grad in analytic.items()}
        floor = scale_floor * max(scales.values())
        for name, grad in analytic.items():
            abs_error = (grad - numeric[name]).abs().max().item()
            denominator = max(scales[name], floor)
            check = ParameterCheck(
                abs_error=abs_error, rel_error=abs_error / denominator if denominator > 0 else 0.0,
                grad_scale=scales[name],
            )
            if name not in per_parameter or check.rel_error < per_parameter[name].rel_error:
                per_parameter[name] = check
    return GradcheckResult(
        max_abs_error=max(e.abs_error for e in per_parameter.values()),
        max_rel_error=max(e.rel_error for e in per_parameter.values()),
        per_parameter=per_parameter,
    )
