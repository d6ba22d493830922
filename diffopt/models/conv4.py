"""Conv-4, the few-shot image classifier of Finn et al. 2017 (after Vinyals et al. 2016)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from diffopt.models.mlp import ACTIVATIONS
from diffopt.models.norm import make_norm

HEADS = ("flatten", "mean")
POOL_PADDINGS = ("valid", "same")
"""How 2x2 max-pooling treats an odd size: ``valid`` drops the last row/column (torch's default,
MAML's and MAML++'s: 84-42-21-10-5), ``same`` keeps it (TF's 'SAME', supervised-reptile's
Mini-ImageNet model: 84-42-21-11-6)."""
INPUT_NORMS: dict[str, tuple[tuple[float, ...], tuple[float, ...]] | None] = {
    "none": None, "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))}
"""Per-channel (mean, std) the input is standardised with: ``imagenet``'s is MAML++'s on
Mini-ImageNet (HowToTrainYourMAMLPytorch data.py:98-106); the other originals feed [0, 1]."""


class InputNorm(nn.Module):
    """(x - mean) / std per channel of [N, C, H, W]; constants, not parameters or buffers (so the
    model stays vmappable and checkpoints are unchanged)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.mean, self.std = tuple(mean), tuple(std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1, 1, 1)
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(shape)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(shape)
        return (x - mean) / std

    def extra_repr(self) -> str:
        return f"mean={self.mean}, std={self.std}"


PADDINGS = ("same", "symmetric")
"""How a 3x3 convolution pads: ``same`` as TensorFlow's 'SAME' (the original MAML and Reptile
code), which puts an odd total padding at the bottom and right (a stride-2 convolution of an
even size pads 0 above, 1 below); ``symmetric`` as torch's ``padding=1``. They differ only for
strided convolutions (Omniglot): stride-1 'SAME' pads 1 on every side."""


class SameConv2d(nn.Conv2d):
    """A 3x3 ``nn.Conv2d`` padded as TensorFlow's 'SAME' for its stride (1 or 2); same parameters
    and output size as ``padding=1``, the sampling grid aligned as in TF.

    An odd 'SAME' padding goes at the bottom and right, which torch's convolutions cannot pad, so
    the input is copied into a padded tensor (``F.pad``: about 30% of a vmapped conv-4 meta-step
    on Omniglot). Turned by 180 degrees the odd row and column are at the top and left, where
    ``padding=1`` puts them: the convolution of the turned map with the turned kernel is the turned
    'SAME' output, with no copy of the map. A chain of these convolutions, with layers between
    them that act per channel or per element (batch norm, activations), runs on turned maps:
    ``turned_input`` says the input comes turned (from such a chain), ``turned_output`` that the
    output stays turned (for the next); the first turns its input, the last its output (``Conv4``).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, turned_input: bool = False,
                 turned_output: bool = False) -> None:
        if stride not in (1, 2):
            raise ValueError(f"SameConv2d takes stride 1 or 2; got {stride!r}")
        super().__init__(in_channels, out_channels, 3, stride=stride, padding=0)
        self.turned_input, self.turned_output = turned_input, turned_output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.turned_input or self.turned_output:
            turned = x if self.turned_input else x.flip(-2, -1)
            y = F.conv2d(turned, self.weight.flip(-2, -1), self.bias, self.stride, 1)
            return y if self.turned_output else y.flip(-2, -1)
        pads = []
        for size in (x.shape[-1], x.shape[-2]):  # F.pad lists the last dimension first
            total = max((math.ceil(size / self.stride[0]) - 1) * self.stride[0] + 3 - size, 0)
            pads += [total // 2, total - total // 2]
        return self._conv_forward(F.pad(x, pads), self.weight, self.bias)

    def extra_repr(self) -> str:
        turned = [name for name in ("turned_input", "turned_output") if getattr(self, name)]
        return super().extra_repr() + "".join(f", {name}=True" for name in turned)


def image_input(head: str, pool_padding: str, input_norm: str) -> list[nn.Module]:
    """The layers an image model starts with (``input_norm``'s standardisation, if any), once its
    ``head`` and ``pool_padding`` are checked: ValueError naming a bad one."""
    for kind, value, choices in [("head", head, HEADS), ("pool padding", pool_padding, POOL_PADDINGS),
                                 ("input norm", input_norm, INPUT_NORMS)]:
        if value not in choices:
            raise ValueError(f"unknown {kind} {value!r}; choose from {', '.join(choices)}")
    statistics = INPUT_NORMS[input_norm]
    return [] if statistics is None else [InputNorm(*statistics)]


class Conv4(nn.Sequential):
    """[N, in_channels, size, size] -> [N, out_features] logits.

    Four blocks of 3x3 conv (``hidden`` filters: one width, or one per block) + norm + activation,
    then a linear layer on the features: the flattened last map (``head='flatten'``) or its mean
    over positions (``head='mean'``, cbfinn/maml on Omniglot). ``pool=False`` (Omniglot, as
    MAML): stride-2 convolutions, no pooling; ``pool=True`` (Mini-ImageNet): stride-1
    convolutions each followed by 2x2 max-pooling. ``padding``: ``PADDINGS``; ``pool_padding``:
    ``POOL_PADDINGS``; ``input_norm``: ``INPUT_NORMS`` (a first ``InputNorm`` layer).
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
        padding: str = "same",
        pool_padding: str = "valid",
        input_norm: str = "none",
    ) -> None:
        if padding not in PADDINGS:
            raise ValueError(f"unknown padding {padding!r}; choose from {', '.join(PADDINGS)}")
        widths = [hidden] * 4 if isinstance(hidden, int) else list(hidden)
        widths = widths * 4 if len(widths) == 1 else widths
        if len(widths) != 4:
            raise ValueError(f"conv4 takes one filter count or four; got {hidden!r}")
        layers = image_input(head, pool_padding, input_norm)
        size, channels = image_size, in_channels
        for block, width in enumerate(widths):
            stride = 1 if pool else 2
            # strided 'SAME' convolutions back to back: maps turned between them (SameConv2d)
            layers.append(SameConv2d(channels, width, stride, turned_input=block > 0,
                                     turned_output=block < len(widths) - 1)
                          if padding == "same" and stride > 1
                          else nn.Conv2d(channels, width, 3, stride=stride, padding=1))
            layers += [make_norm(norm, width, 2, steps, norm_eps), ACTIVATIONS[activation]()]
            if pool:
                keep_odd = pool_padding == "same"
                layers.append(nn.MaxPool2d(2, ceil_mode=keep_odd))
                size = (size + 1) // 2 if keep_odd else size // 2
            else:
                size = (size + 1) // 2
            channels = width
        if head == "mean":
            layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, out_features)]
        else:
            layers += [nn.Flatten(), nn.Linear(channels * size * size, out_features)]
        super().__init__(*layers)
