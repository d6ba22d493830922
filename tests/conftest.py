"""Shared helpers: Hypothesis profiles, small random episodes and algorithms."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, settings

from diffopt.algorithms import build_algorithm
from diffopt.data import Episode
from diffopt.data.prepare import prepare_omniglot
from diffopt.inner import InnerLoop
from diffopt.models import MLP

# CI checks the same examples every run (no flaky reds); `pytest --hypothesis-profile explore`
# searches new random ones, ten times as many.
settings.register_profile("ci", derandomize=True, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("explore", derandomize=False, deadline=None, max_examples=1000,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci")


def random_episode(seed: int, tasks: int = 2, shots: int = 5, queries: int = 7,
                   dtype: torch.dtype = torch.float64) -> Episode:
    """A meta-batch of random 1-d regression tasks: x ~ N(0, 1), y ~ N(0, 1)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype)

    return Episode(rand(tasks, shots, 1), rand(tasks, shots, 1), rand(tasks, queries, 1),
                   rand(tasks, queries, 1))


def small_algorithm(name: str = "maml", optimizer: str = "sgd", lr: float = 0.1, steps: int = 1,
                    hidden=(8, 8), activation: str = "tanh", seed: int = 0,
                    dtype: torch.dtype = torch.float64, vectorize: str = "never", options=None):
    """An algorithm on a small MLP; the loop over tasks (higher) unless ``vectorize`` says;
    ``options``: the inner optimizer's hyper-parameters."""
    torch.manual_seed(seed)
    model = MLP(1, 1, hidden, activation).to(dtype)
    inner = InnerLoop(optimizer, lr, steps, model=model, options=options)
    return build_algorithm(name, model, inner, F.mse_loss, vectorize)


def cold_warm_and_uncached(loader, monkeypatch, **kwargs) -> list[tuple[torch.Tensor, ...]]:
    """Each tensor of ``loader(**kwargs)``'s tasks read three ways: filling the image cache,
    reading it, and through torchmeta alone (no cache)."""
    from diffopt.data import images

    def tensors():
        return [t for batch in loader(**kwargs) for t in batch["train"] + batch["test"]]

    images._IMAGE_CACHES.clear()
    cold, warm = tensors(), tensors()
    with monkeypatch.context() as patch:
        patch.setattr(images, "CachedClasses", lambda classes, cache: classes)
        direct = tensors()
    return list(zip(cold, warm, direct, strict=True))


SHARED_OMNIGLOT = Path(os.environ.get(  # the shared real data, beside the project (README)
    "DIFFOPT_OMNIGLOT_SOURCE", Path(__file__).resolve().parents[1].parent / "shared" / "data" / "omniglot"))
CACHE = Path(os.environ.get("DIFFOPT_TEST_CACHE", Path.home() / ".cache" / "diffopt-tests"))


@pytest.fixture(scope="session")
def omniglot_root() -> Path:
    """The shared zips prepared once into a cache outside the source tree (keyed by zip sizes)."""
    if not SHARED_OMNIGLOT.is_dir():
        pytest.skip(f"the shared Omniglot copy is not at {SHARED_OMNIGLOT}")
    key = "-".join(str((SHARED_OMNIGLOT / f"{g}.zip").stat().st_size)
                   for g in ("images_background", "images_evaluation"))
    root = CACHE / f"omniglot-{key}"
    prepare_omniglot(SHARED_OMNIGLOT, root)
    return root
