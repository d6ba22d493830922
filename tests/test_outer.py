"""The outer step against torch's own schedulers and clipping, and its checks as the config runs them."""

from __future__ import annotations

import math

import pytest
import torch

from diffopt.config import resolve_config
from diffopt.errors import DiffoptError
from diffopt.outer import OuterStep
from diffopt.train import outer_step


def _schedule_against_torch(outer: OuterStep, scheduler_of, steps: int = 10) -> None:
    optimizer = outer.optimizer([torch.zeros(3, requires_grad=True)])
    scheduler = scheduler_of(optimizer)
    for t in range(steps + 1):
        assert outer.learning_rate(t / steps) == pytest.approx(optimizer.param_groups[0]["lr"], rel=1e-6)
        optimizer.step()
        scheduler.step()


def test_cosine_schedule_is_torchs_cosine_annealing():
    _schedule_against_torch(
        OuterStep("adam", lr=1e-3, final_lr=1e-5, schedule="cosine"),
        lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10, eta_min=1e-5))


def test_linear_schedule_is_torchs_linear_lr():
    _schedule_against_torch(OuterStep("sgd", lr=0.5, final_lr=0.05, schedule="linear"),
                            lambda opt: torch.optim.lr_scheduler.LinearLR(opt, 1.0, 0.1, total_iters=10))


def test_constant_schedule_and_progress_clamped():
    outer = OuterStep("adam", lr=0.3, final_lr=0.0, schedule="linear")
    assert outer.learning_rate(-1.0) == 0.3 and outer.learning_rate(2.0) == 0.0
    assert OuterStep(lr=0.3).learning_rate(0.7) == 0.3
    optimizer = outer.optimizer([torch.zeros(1, requires_grad=True)])
    assert isinstance(optimizer, torch.optim.Adam)
    outer.set_learning_rate(optimizer, 0.5)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.15)


def test_clip_is_clamp_then_norm():
    torch.manual_seed(0)
    grads = [torch.randn(4, 3) * 5, torch.randn(7) * 5]
    params = [torch.zeros_like(g, requires_grad=True) for g in grads]
    for p, g in zip(params, grads, strict=True):
        p.grad = g.clone()
    norm = OuterStep(max_grad_value=2.0, max_grad_norm=1.5).clip(params)
    clamped = [g.clamp(-2.0, 2.0) for g in grads]
    expected_norm = math.sqrt(sum(float((c ** 2).sum()) for c in clamped))
    assert float(norm) == pytest.approx(expected_norm, rel=1e-6)
    for p, c in zip(params, clamped, strict=True):
        torch.testing.assert_close(p.grad, c * (1.5 / (expected_norm + 1e-6)))
    for p, g in zip(params, grads, strict=True):  # no clipping: the norm alone, gradients untouched
        p.grad = g.clone()
    norm = OuterStep().clip(params)
    assert float(norm) == pytest.approx(math.sqrt(sum(float((g ** 2).sum()) for g in grads)), rel=1e-6)
    assert all(torch.equal(p.grad, g) for p, g in zip(params, grads, strict=True))


@pytest.mark.parametrize("flags, constructor, message", [
    (dict(outer_optimizer="rmsprop"), dict(optimizer="rmsprop"), "unknown outer optimizer 'rmsprop'"),
    (dict(meta_lr=0.0), dict(lr=0.0), "--meta_lr must be a finite number > 0; got 0.0"),
    (dict(meta_lr_final=-1.0), dict(final_lr=-1.0), "--meta_lr_final must be a finite number >= 0"),
    (dict(meta_lr_schedule="cosine"), dict(schedule="cosine"),
     "--meta_lr_schedule cosine needs --meta_lr_final"),
    (dict(meta_lr_schedule="step"), dict(schedule="step"), "unknown learning-rate schedule 'step'"),
    (dict(max_grad_norm=-2.0), dict(max_grad_norm=-2.0), "--max_grad_norm must be a finite number > 0"),
    (dict(max_grad_value=math.inf), dict(max_grad_value=math.inf), "--max_grad_value must be a finite"),
])
def test_one_check_for_the_constructor_and_the_config(flags, constructor, message):
    with pytest.raises(DiffoptError, match=message) as built:
        OuterStep(**constructor)
    with pytest.raises(DiffoptError) as resolved:
        resolve_config(**flags)
    assert str(resolved.value) == str(built.value)


def test_config_defaults_come_from_the_declaration():
    config = resolve_config()
    outer = outer_step(config)
    assert (config.outer_optimizer, config.meta_lr) == (OuterStep.OPTIONS["outer_optimizer"].default,
                                                       OuterStep.OPTIONS["meta_lr"].default)
    assert config.meta_lr_schedule == "constant" and outer.learning_rate(1.0) == config.meta_lr
    assert resolve_config(meta_lr_final=1e-5).meta_lr_schedule == "linear"
    assert resolve_config(meta_lr_final=1e-5, meta_lr_schedule="cosine").meta_lr_schedule == "cosine"
