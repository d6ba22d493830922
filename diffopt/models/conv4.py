"""Conv-4, the few-shot image classifier of Finn et al. 2017 (after Vinyals et al. 2016)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from diffopt.models.mlp import ACTIVATIONS
from diffopt.models.norm import make_norm

HEADS = ("flatten", "mean")


class Conv4(nn.Sequential):
    """[N, in_channels, size, size] -> [N, out_features] logits.

    Four blocks of 3x3 conv (``hidden`` filters: one width, or one per block) + norm + activation,
    then a linear layer on the features: the flattened last map (``head='flatten'``) or its mean
    over positions (``head='mean'``, cbfinn/maml on Omniglot). ``pool=False`` (Omniglot, as
    MAML): stride-2 convolutions, no pooling; ``pool=True`` (Mini-ImageNet): stride-1
    convolutions each followed by 2x2 max-pooling.
    ``norm``: see ``diffopt.models.norm`` (``batch`` by default, as MAML); ``steps`` sizes a
    per-step norm, ``norm_eps`` is its epsilon.
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_features: int = 5,
        hidden: int | Sequence[int] = 64,
        image_size: int = 28,
        pool: bool = False,
        activation: str = "relu",
        norm: str = "batch",
        steps: int = 1,
        head: str = "flatten",
        norm_eps: float = 1e-5,
    ) -> None:
        if head not in HEADS:
            raise ValueError(f"unknown head {head!r}; choose from {', '.join(HEADS)}")
        widths = [hidden] * 4 if isinstance(hidden, int) else list(hidden)
        widths = widths * 4 if len(widths) == 1 else widths
        if len(widths) != 4:
            raise ValueError(f"conv4 takes one filter count or four; got {hidden!r}")
        layers: list[nn.Module] = []
        size, channels = image_size, in_channels
        for width in widths:
            layers.append(nn.Conv2d(channels, width, 3, stride=1 if pool else 2, padding=1))
            layers += [make_norm(norm, width, 2, steps, norm_eps), ACTIVATIONS[activation]()]
            if pool:
                layers.append(nn.MaxPool2d(2))
                size //= 2
            else:
                size = (size + 1) // 2
            channels = width
        if head == "mean":
            layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, out_features)]
        else:
            layers += [nn.Flatten(), nn.Linear(channels * size * size, out_features)]
        super().__init__(*layers)
