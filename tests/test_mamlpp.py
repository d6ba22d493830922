"""The MAML++ recipe: multi-step loss, derivative-order annealing, cosine annealing."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import random_episode, small_algorithm

from diffopt.algorithms import MAML
from diffopt.algorithms.mamlpp import multi_step_loss_weights
from diffopt.cli import main
from diffopt.config import resolve_config
from diffopt.errors import DiffoptError
from diffopt.gradcheck import check_meta_gradient
from diffopt.inner import InnerLoop
from diffopt.models import MLP
from diffopt.train import train


@pytest.mark.parametrize("steps", [1, 2, 5])
def test_multi_step_loss_weights_anneal_to_the_last_step(steps):
    anneal = 10
    history = [multi_step_loss_weights(steps, epoch, anneal) for epoch in range(anneal + 5)]
    assert history[0] == pytest.approx([1 / steps] * steps)
    for weights in history:
        assert sum(weights) == pytest.approx(1.0)
        assert all(w >= 0.03 / steps - 1e-12 for w in weights[:-1])
    for before, after in zip(history, history[1:], strict=False):
        assert all(a <= b for a, b in zip(after[:-1], before[:-1], strict=True))
        assert after[-1] >= before[-1]
    if steps > 1:
        assert history[anneal][:-1] == pytest.approx([0.03 / steps] * (steps - 1))
        assert history[anneal][-1] == pytest.approx(1 - (steps - 1) * 0.03 / steps)


def test_recipe_switches_by_epoch():
    plain = small_algorithm("maml", "sgd", 0.1, 3)
    learner = MAML(plain.model, plain.inner, F.mse_loss, vectorize="never", multi_step_loss_epochs=2,
                   first_order_epochs=1)
    learner.on_epoch(0)
    assert learner.first_order and learner.step_weights == pytest.approx([1 / 3] * 3)
    assert learner.iteration_record() == {"first_order": True}
    learner.on_epoch(1)
    assert not learner.first_order and learner.step_weights == multi_step_loss_weights(3, 1, 2)
    learner.on_epoch(2)  # last-step loss only, second order
    assert not learner.first_order and learner.step_weights is None
    assert learner.iteration_record() == {"first_order": False}
    plain.on_epoch(0)  # the recipe off: plain MAML
    assert not plain.first_order and plain.step_weights is None
    with pytest.raises(DiffoptError, match="--first_order_epochs must be a whole number >= 0"):
        MAML(plain.model, plain.inner, F.mse_loss, first_order_epochs=-1)


def test_multi_step_meta_loss_is_the_weighted_sum_and_its_gradient_is_exact():
    learner = small_algorithm("maml", "sgd", 0.2, 3)
    learner.step_weights = [0.2, 0.3, 0.5]
    episode = random_episode(0, tasks=2)
    expected = 0
    for task in episode:
        for step, fmodel in enumerate(learner.unroll(task.support_x, task.support_y, 3)):
            if step:
                expected = expected + learner.step_weights[step - 1] * F.mse_loss(
                    fmodel(task.query_x), task.query_y).item() / len(episode)
    assert learner.meta_loss(episode).item() == pytest.approx(expected, rel=1e-12)
    assert check_meta_gradient(learner, episode).max_rel_error < 1e-5


def grads(learner, episode):
    learner.zero_grad(set_to_none=True)
    learner.meta_gradient(episode)
    return {n: p.grad.clone() for n, p in learner.named_parameters()}


def test_first_order_mode_equals_first_order_maml():
    episode = random_episode(1, tasks=3)
    maml = small_algorithm("maml", "momentum", 0.1, 3)
    maml.first_order = True
    fomaml = small_algorithm("fomaml", "momentum", 0.1, 3)
    for name, grad in grads(fomaml, episode).items():
        torch.testing.assert_close(grads(maml, episode)[name], grad, rtol=1e-10, atol=1e-12)
    with pytest.raises(DiffoptError, match="finite differences cannot check it"):
        check_meta_gradient(maml, episode)


def test_first_order_mode_still_learns_step_sizes():
    torch.manual_seed(0)
    net = MLP(1, 1, (6,), "tanh").double()
    learner = small_algorithm("maml")
    learner = type(learner)(net, InnerLoop("lslr", 0.1, 2, model=net), F.mse_loss)
    learner.first_order = True
    episode = random_episode(2, tasks=2)
    first = grads(learner, episode)
    assert first["inner.rule.alpha"].abs().min() > 0  # every step size gets a gradient
    learner.first_order = False
    second = grads(learner, episode)
    assert not torch.allclose(first["model.0.weight"], second["model.0.weight"])


def test_cosine_schedule(tmp_path):
    config = resolve_config(iterations=8, meta_batch_size=2, hidden=(4,), meta_lr=1e-2,
                            meta_lr_final=1e-4, meta_lr_schedule="cosine",
                            run_dir=str(tmp_path / "r"), progress=False)
    train(config)
    lrs = [json.loads(x)["lr"] for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    # the rate iteration t (1-based) used: the cosine at progress (t - 1) / 8
    expected = [1e-4 + (1e-2 - 1e-4) * (1 + math.cos(math.pi * (t - 1) / 8)) / 2 for t in range(1, 9)]
    assert lrs == pytest.approx(expected, rel=1e-9)


def test_recipe_through_the_cli(tmp_path, capsys):
    run = tmp_path / "run"
    code = main(["train", "--inner_optimizer", "lslr", "--inner_steps", "2", "--iterations", "4",
                 "--meta_batch_size", "2", "--hidden", "8", "--iterations_per_epoch", "2",
                 "--multi_step_loss_epochs", "2", "--first_order_epochs", "1",
                 "--meta_lr_final", "1e-5", "--meta_lr_schedule", "cosine", "--progress", "False",
                 "--run_dir", str(run)])
    assert code == 0
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["first_order"] for m in metrics] == [True, True, False, False]
    capsys.readouterr()


def test_epochs_divide_the_run_or_its_wall_clock_budget():
    """``--epochs E``: epoch = floor(progress x E), the progress the learning-rate schedule uses
    (iterations done, or the budget used where further along), so MAML++'s epoch schedules scale
    to a budget; without it, every ``--iterations_per_epoch`` iterations."""
    from diffopt.train import current_epoch, run_progress

    counted = resolve_config(iterations=1000, epochs=10)
    epochs = [current_epoch(counted, t, run_progress(counted, t, 0.0)) for t in (1, 100, 101, 1000)]
    assert epochs == [0, 0, 1, 9]
    budget = resolve_config(iterations=10**6, max_seconds=200.0, epochs=150)
    epochs = [current_epoch(budget, 5, run_progress(budget, 5, s)) for s in (0.0, 1.0, 1.34, 199.9, 250.0)]
    assert epochs == [0, 0, 1, 149, 149]
    default = resolve_config(iterations_per_epoch=7)
    assert [current_epoch(default, t, 0.5) for t in (1, 7, 8, 15)] == [0, 0, 1, 2]
    with pytest.raises(DiffoptError, match="--epochs must be a whole number >= 1"):
        resolve_config(epochs=0)


def test_epochs_through_the_cli(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--inner_steps", "2", "--iterations", "6", "--meta_batch_size", "2",
                 "--hidden", "8", "--epochs", "3", "--first_order_epochs", "1", "--progress", "False",
                 "--run_dir", str(run)]) == 0
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["first_order"] for m in metrics] == [True, True, False, False, False, False]
    capsys.readouterr()


@pytest.mark.parametrize("argv, fragment", [
    (["--algorithm", "reptile", "--multi_step_loss_epochs", "3"], "needs --algorithm maml"),
    (["--algorithm", "fomaml", "--first_order_epochs", "3"], "needs --algorithm maml"),
    (["--meta_lr_schedule", "cosine"], "needs --meta_lr_final"),
    (["--meta_lr_schedule", "step"], "unknown learning-rate schedule 'step'"),
    (["--iterations_per_epoch", "0"], "--iterations_per_epoch must be a whole number >= 1"),
])
def test_recipe_option_errors(argv, fragment, tmp_path, capsys):
    assert main(["train", *argv, "--run_dir", str(tmp_path / "x")]) == 2
    assert fragment in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
