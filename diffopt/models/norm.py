"""Normalisation layers for meta-learning, chosen by name (``NORMS``).

``per_step_batch`` is MAML++'s per-step batch normalisation (Antoniou et al. 2019, section 4):
one set of running statistics and one learned weight and bias per inner step. The inner loop
tells the layer how many steps the weights have taken (``set_inner_step``), so the model
after k steps uses set k, for its forward on the support set (the next step) and on the query
set alike; a model that takes more steps than it has sets uses the last one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from diffopt.optim.rule import in_transform

NORMS = ("none", "batch", "batch_shift", "per_step_batch")


class PerStepBatchNorm(nn.Module):
    """Batch norm over channel dim 1 of [N, C] or [N, C, H, W] with per-step parameters.

    weight, bias: [steps + 1, C] (ones, zeros); buffers running_mean, running_var:
    [steps + 1, C]. Training mode normalises with the batch statistics and updates row
    ``inner_step`` of the running statistics; evaluation mode uses that row.
    """

    def __init__(self, channels: int, steps: int, momentum: float = 0.1, eps: float = 1e-5) -> None:
        super().__init__()
        rows = steps + 1
        self.weight = nn.Parameter(torch.ones(rows, channels))
        self.bias = nn.Parameter(torch.zeros(rows, channels))
        self.register_buffer("running_mean", torch.zeros(rows, channels))
        self.register_buffer("running_var", torch.ones(rows, channels))
        self.momentum, self.eps = momentum, eps
        self.inner_step = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        row = min(self.inner_step, self.weight.shape[0] - 1)
        return F.batch_norm(x, self.running_mean[row], self.running_var[row], self.weight[row],
                            self.bias[row], self.training, self.momentum, self.eps)

    def extra_repr(self) -> str:
        return f"channels={self.weight.shape[1]}, steps={self.weight.shape[0] - 1}"


class ShiftBatchNorm(nn.Module):
    """Batch norm over channel dim 1 with a learned shift (bias: [C], zeros) and no scale, batch
    statistics always: TF's ``batch_norm`` defaults, which cbfinn/maml uses (utils.py).

    ``F.batch_norm`` with neither scale nor shift, the shift added after (``forward``). This
    layer is vmapped over tasks, its shift batched when the inner loop adapts it: unlike affine
    batch norm's learned scale, that is right under ``torch.func.vmap``, as the loop-equality and
    finite-difference tests prove (tests/test_vectorize.py, tests/test_norm.py). Twice as fast as
    the same statistics written out with mean and square.
    """

    def __init__(self, channels: int, eps: float = 1e-3) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # No weight and the shift added outside: with a bias and no weight, batch_norm's double
        # backward is wrong; under vmap, torch's batch rule would multiply by a unit weight too.
        shift = self.bias.view((1, -1) + (1,) * (x.dim() - 2))
        return F.batch_norm(x, None, None, None, None, True, 0.0, self.eps) + shift

    def extra_repr(self) -> str:
        return f"channels={self.bias.shape[0]}, eps={self.eps}"


class _AffineAfterUnderTransforms:
    """The forward of ``BatchStatNorm1d`` and ``BatchStatNorm2d`` (mixed into torch's layers)."""

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__(channels, eps=eps, track_running_stats=False)  # type: ignore[call-arg]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not in_transform():
            return super().forward(x)  # type: ignore[misc]
        shape = (1, -1) + (1,) * (x.dim() - 2)
        normalised = F.batch_norm(x, None, None, None, None, True, 0.0, self.eps)  # type: ignore[attr-defined]
        return normalised * self.weight.view(shape) + self.bias.view(shape)  # type: ignore[attr-defined]


class BatchStatNorm1d(_AffineAfterUnderTransforms, nn.BatchNorm1d):
    """torch's affine ``BatchNorm1d`` with no running statistics (the batch statistics always, as
    MAML), its scale and shift applied after the normalisation under a ``torch.func`` transform:
    the form ``torch.func.vmap`` differentiates right (its batch rule for the fused layer gets an
    adapted scale's second derivatives wrong), for the support side of a meta-batch under vmap
    (``diffopt.vectorize.over_support``); outside transforms torch's fused layer, faster."""


class BatchStatNorm2d(_AffineAfterUnderTransforms, nn.BatchNorm2d):
    """``BatchStatNorm1d`` for images [N, C, H, W]."""


def set_inner_step(model: nn.Module, step: int) -> None:
    """Tell every per-step layer of ``model`` (or of its higher copy) that it has taken ``step`` steps."""
    for module in model.modules():
        if hasattr(module, "inner_step"):
            module.inner_step = step


def make_norm(norm: str, channels: int, dims: int, steps: int, eps: float = 1e-5) -> nn.Module:
    """The layer ``norm`` names, for ``channels`` channels of a ``dims``-d input (1: [N, C]; 2: images).

    ``batch`` is affine batch norm that always normalises with the batch statistics, as in MAML
    (no running statistics, so the query set is normalised as a batch: transductive);
    ``batch_shift`` the same with a shift and no scale (``ShiftBatchNorm``). ``eps`` is added to
    the variance (torch's default 1e-5; TF's, which the original MAML and Reptile code use, 1e-3).
    """
    if norm == "none":
        return nn.Identity()
    if norm == "batch":
        return (BatchStatNorm1d if dims == 1 else BatchStatNorm2d)(channels, eps)
    if norm == "batch_shift":
        return ShiftBatchNorm(channels, eps)
    if norm == "per_step_batch":
        return PerStepBatchNorm(channels, steps, eps=eps)
    raise ValueError(f"unknown norm {norm!r}; choose from {', '.join(NORMS)}")
