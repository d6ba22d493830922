"""A meta-batch of tasks as tensors: what every algorithm consumes."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from diffopt.errors import DiffoptError


@dataclass(frozen=True)
class Task:
    """One task. support_x: [K, *x], support_y: [K, *y], query_x: [Q, *x], query_y: [Q, *y]."""

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor


@dataclass(frozen=True)
class Episode:
    """A meta-batch of B tasks with the same shapes.

    support_x: [B, K, *x], support_y: [B, K, *y], query_x: [B, Q, *x], query_y: [B, Q, *y].
    """

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor

    def __post_init__(self) -> None:
        for name in ("support_y", "query_y"):
            target = getattr(self, name)
            if target.is_floating_point() and target.dim() < 3:
                raise DiffoptError(
                    f"{name} {list(target.shape)} is a regression target without its feature axis: "
                    f"regression targets are [B, K, d] (sinusoid: d = 1, as the model's predictions); "
                    f"pass {name}.unsqueeze(-1), or int64 class indices for classification")

    @classmethod
    def from_torchmeta(
        cls, batch: dict, device: torch.device | str = "cpu", dtype: torch.dtype | None = torch.float32
    ) -> Episode:
        """Convert a ``BatchMetaDataLoader`` batch ({'train': (x, y), 'test': (x, y)}); floating-point
        tensors cast to ``dtype`` (None: as loaded)."""
        (sx, sy), (qx, qy) = batch["train"], batch["test"]
        return cls(sx, sy, qx, qy).to(device, dtype)

    def __len__(self) -> int:
        return self.support_x.shape[0]

    def __iter__(self) -> Iterator[Task]:
        for i in range(len(self)):
            yield Task(self.support_x[i], self.support_y[i], self.query_x[i], self.query_y[i])

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Episode:
        """Move to ``device``; cast floating-point tensors to ``dtype``."""

        def move(tensor: torch.Tensor) -> torch.Tensor:
            if tensor.is_floating_point():
                return tensor.to(device=device, dtype=dtype)
            return tensor.to(device=device)

        return Episode(*(move(t) for t in (self.support_x, self.support_y, self.query_x, self.query_y)))
