"""Fully connected network: the sinusoid model of Finn et al. (1-40-40-1, ReLU)."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

from torch import nn

from diffopt.models.norm import make_norm

ACTIVATIONS = {"relu": nn.ReLU, "leaky_relu": nn.LeakyReLU, "leaky_relu_0.1": partial(nn.LeakyReLU, 0.1),
               "tanh": nn.Tanh, "softplus": nn.Softplus, "sigmoid": nn.Sigmoid}
"""By name; ``leaky_relu`` has torch's slope 0.01, the MAML++ model's (``F.leaky_relu``'s default);
``leaky_relu_0.1`` slope 0.1, ResNet-12's (Lee et al. 2019)."""


class MLP(nn.Sequential):
    """[N, in_features] -> [N, out_features] through Linear (+ norm) + activation per hidden width.

    ``norm`` (see ``diffopt.models.norm``) follows each hidden Linear; ``steps`` sizes a per-step norm,
    ``norm_eps`` is its epsilon.
    """

    def __init__(
        self,
        in_features: int = 1,
        out_features: int = 1,
        hidden: Sequence[int] = (40, 40),
        activation: str = "relu",
        norm: str = "none",
        steps: int = 1,
        norm_eps: float = 1e-5,
    ) -> None:
        widths = [in_features, *hidden]
        layers: list[nn.Module] = []
        for width_in, width_out in zip(widths[:-1], widths[1:], strict=False):
            layers.append(nn.Linear(width_in, width_out))
            if norm != "none":
                layers.append(make_norm(norm, width_out, 1, steps, norm_eps))
            layers.append(ACTIVATIONS[activation]())
        layers.append(nn.Linear(widths[-1], out_features))
        super().__init__(*layers)
