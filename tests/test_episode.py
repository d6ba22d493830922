"""diffopt.data.episode: an Episode refuses a regression target without its feature axis, which
``F.mse_loss`` would broadcast against the model's [K, 1] predictions into a wrong loss."""

from __future__ import annotations

import pytest
import torch

from diffopt.data import Episode
from diffopt.errors import DiffoptError


def test_a_regression_target_without_its_feature_axis_is_refused():
    x = torch.randn(2, 5, 1)
    with pytest.raises(DiffoptError, match=r"support_y \[2, 5\] is a regression target without its feature"):
        Episode(x, torch.randn(2, 5), x, torch.randn(2, 5, 1))
    with pytest.raises(DiffoptError, match=r"pass query_y.unsqueeze\(-1\)"):
        Episode(x, torch.randn(2, 5, 1), x, torch.randn(2, 5))
    Episode(x, torch.randn(2, 5, 1), x, torch.randn(2, 5, 1))  # [B, K, d]
    labels = torch.randint(0, 3, (2, 5))  # classification: int64 class indices [B, K]
    Episode(torch.randn(2, 5, 3), labels, torch.randn(2, 5, 3), labels)

