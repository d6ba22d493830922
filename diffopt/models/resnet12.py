"""ResNet-12, the few-shot backbone of Lee et al. 2019 (MetaOptNet, after Mishra et al.'s SNAIL and
Oreshkin et al.'s TADAM), laid out as learn2learn's ``learn2learn/vision/models/resnet12.py``."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from diffopt.models.conv4 import image_input
from diffopt.models.mlp import ACTIVATIONS
from diffopt.models.norm import make_norm

RESNET12_DEFAULTS: dict[str, object] = dict(
    hidden=(64,), activation="leaky_relu_0.1", norm="batch", norm_eps=1e-5, head="mean", init="torch")
"""The training options ``--model resnet12`` starts from, over the dataset's and algorithm's (which
describe conv-4; explicit flags still win): widths 64-160-320-640, leaky ReLU of slope 0.1, affine
batch norm with batch statistics, global average pooling, and the model's own initialisation."""


def resnet12_widths(hidden: int | Sequence[int]) -> list[int]:
    """The four blocks' widths: one number w means (w, 2.5w, 5w, 10w), 2.5w rounded half up
    (64: 64-160-320-640, Lee et al.'s); four numbers are the widths themselves."""
    widths = [hidden] if isinstance(hidden, int) else list(hidden)
    if len(widths) == 1:
        w = widths[0]
        widths = [w, (5 * w + 1) // 2, 5 * w, 10 * w]
    if len(widths) != 4:
        raise ValueError(f"resnet12 takes one width or four; got {hidden!r}")
    return widths


class ResidualBlock(nn.Module):
    """3 x (3x3 conv + norm), an activation after the first two; plus a 1x1 conv + norm shortcut;
    the activation of the sum, then 2x2 max-pooling (``ceil_mode``: keep an odd last row/column).

    As Lee et al.'s and learn2learn's block, the third activation follows the residual sum.
    The convolutions carry a bias only without a norm (a norm's shift makes it redundant)."""

    def __init__(self, in_channels: int, out_channels: int, norm: str, steps: int, norm_eps: float,
                 activation: str, ceil_mode: bool) -> None:
        super().__init__()
        bias = norm == "none"

        def conv_norm(channels: int, kernel: int) -> list[nn.Module]:
            return [nn.Conv2d(channels, out_channels, kernel, padding=kernel // 2, bias=bias),
                    make_norm(norm, out_channels, 2, steps, norm_eps)]

        self.body = nn.Sequential(*conv_norm(in_channels, 3), ACTIVATIONS[activation](),
                                  *conv_norm(out_channels, 3), ACTIVATIONS[activation](),
                                  *conv_norm(out_channels, 3))
        self.shortcut = nn.Sequential(*conv_norm(in_channels, 1))
        self.activation = ACTIVATIONS[activation]()
        self.pool = nn.MaxPool2d(2, ceil_mode=ceil_mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.activation(self.body(x) + self.shortcut(x)))


class ResNet12(nn.Sequential):
    """[N, in_channels, size, size] -> [N, out_features] logits.

    Four ``ResidualBlock``s (widths from ``hidden``: see ``resnet12_widths``), each halving the
    map (84-42-21-10-5, Omniglot's 28-14-7-3-1; ``pool_padding='same'`` keeps odd rows:
    84-42-21-11-6), then a linear layer on the features: the last map averaged over positions
    (``head='mean'``, global average pooling, as Lee et al. and learn2learn) or flattened
    (``head='flatten'``: Lee et al.'s 16,000-d embedding on Mini-ImageNet). ``norm``: see
    ``diffopt.models.norm`` (``batch``, batch statistics, by default; ``per_step_batch`` sized by
    ``steps``; ``none``); ``input_norm``: ``INPUT_NORMS``. ``pool`` is accepted, as the data's
    model options pass it (conv-4's choice of strided convolutions), and ignored: the blocks
    always max-pool. Convolutions start from Kaiming-normal weights (fan out, leaky ReLU), as
    learn2learn's; the output layer from torch's default.

    No DropBlock (Lee et al. regularise the last two blocks with it): a random layer would make
    the meta-gradient differ from run to run and force the loop over tasks to run one task at
    a time (diffopt.vectorize); this model is deterministic. Its blocks have their own
    ``forward``, so a meta-batch always loops over tasks (``vmap_obstacle`` names them, and
    ``BatchStatNorm2d`` with the default norm).
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_features: int = 5,
        hidden: int | Sequence[int] = 64,
        image_size: int = 84,
        pool: bool = True,
        activation: str = "leaky_relu_0.1",
        norm: str = "batch",
        steps: int = 1,
        head: str = "mean",
        norm_eps: float = 1e-5,
        pool_padding: str = "valid",
        input_norm: str = "none",
    ) -> None:
        del pool  # see the docstring
        layers = image_input(head, pool_padding, input_norm)
        keep_odd = pool_padding == "same"
        size, channels = image_size, in_channels
        for width in resnet12_widths(hidden):
            layers.append(ResidualBlock(channels, width, norm, steps, norm_eps, activation, keep_odd))
            size, channels = (size + 1) // 2 if keep_odd else size // 2, width
        if size < 1:
            raise ValueError(f"resnet12 halves its input four times: {image_size}x{image_size} is too small")
        if head == "mean":
            layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, out_features)]
        else:
            layers += [nn.Flatten(), nn.Linear(channels * size * size, out_features)]
        super().__init__(*layers)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="leaky_relu")
