"""Conv-4, the few-shot image classifier of Finn et al. 2017 (after Vinyals et al. 2016)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from diffopt.models.mlp import ACTIVATIONS
from diffopt.models.norm import make_norm


class Conv4(nn.Sequential):
    """[N, in_channels, size, size] -> [N, out_features] logits.

    Four blocks of 3x3 conv (``hidden`` filters: one width, or one per block) + norm + activation,
    then a linear layer on the
    flattened features. ``pool=False`` (Omniglot, as MAML): stride-2 convolutions, no pooling;
    ``pool=True`` (Mini-ImageNet): stride-1 convolutions each followed by 2x2 max-pooling.
    ``norm``: see ``diffopt.models.norm`` (``batch`` by default, as MAML); ``steps`` sizes a
    per-step norm.
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
    ) -> None:
        widths = [hidden] * 4 if isinstance(hidden, int) else list(hidden)
        widths = widths * 4 if len(widths) == 1 else widths
        if len(widths) != 4:
            raise ValueError(f"conv4 takes one filter count or four; got {hidden!r}")
        layers: list[nn.Module] = []
        size, channels = image_size, in_channels
        for width in widths:
            layers.append(nn.Conv2d(channels, width, 3, stride=1 if pool else 2, padding=1))
            layers += [make_norm(norm, width, 2, steps), ACTIVATIONS[activation]()]
            if pool:
                layers.append(nn.MaxPool2d(2))
                size //= 2
            else:
                size = (size + 1) // 2
            channels = width
        layers += [nn.Flatten(), nn.Linear(channels * size * size, out_features)]
        super().__init__(*layers)
