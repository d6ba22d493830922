"""MAML++ per-step batch norm: meta-gradients of every step's weights and biases against finite
differences, per-step running statistics that accumulate in the model, and the CLI flag."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import random_episode
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from diffopt.algorithms import build_algorithm
from diffopt.cli import main
from diffopt.data import Episode, get_dataset
from diffopt.evaluate import evaluate
from diffopt.gradcheck import check_meta_gradient
from diffopt.inner import QUERY_NORM_ROWS, InnerLoop
from diffopt.models import MLP, Conv4, PerStepBatchNorm, ShiftBatchNorm
from diffopt.runfolder import load_checkpoint


def per_step_maml(steps: int, rule: str = "sgd", lr: float = 0.1, seed: int = 0, hidden=(3, 2),
                  query_norm_row: str = "last_step", algorithm: str = "maml"):
    torch.manual_seed(seed)
    model = MLP(1, 1, hidden, "tanh", norm="per_step_batch", steps=steps).double()
    with torch.no_grad():  # off the initial ones and zeros, as meta-training would leave them
        for module in model.modules():
            if isinstance(module, PerStepBatchNorm):
                module.weight.add_(0.2 * torch.randn_like(module.weight))
                module.bias.add_(0.2 * torch.randn_like(module.bias))
    inner = InnerLoop(rule, lr, steps, model=model, query_norm_row=query_norm_row)
    return build_algorithm(algorithm, model, inner, F.mse_loss)


@pytest.mark.slow
@settings(max_examples=settings.default.max_examples // 10)  # profile's (conftest.py); slow FD
@given(steps=st.integers(1, 3), rule=st.sampled_from(["sgd", "lslr", "meta_curvature"]),
       lr=st.floats(0.01, 0.2), seed=st.integers(0, 2**16), row=st.sampled_from(QUERY_NORM_ROWS))
def test_per_step_batch_norm_meta_gradient_matches_finite_differences(steps, rule, lr, seed, row):
    algorithm = per_step_maml(steps, rule, lr, seed, query_norm_row=row)
    assert not algorithm.vectorized  # buffers: the loop over tasks
    # Batch norm over 5 examples makes the meta-loss sharply curved: with eps 1e-6 the central
    # difference's truncation error reached 1.1e-5 (it fell as eps^2: 1.1e-3 at 1e-5, 1.1e-7 at
    # 1e-7; seed 0, 1 sgd step, lr 1/64), while at eps 1e-7 round-off reached 1.7e-5 on a tensor
    # with a small gradient (seed 183, 2 sgd steps, lr 0.103). Each tensor takes its better eps.
    result = check_meta_gradient(algorithm, random_episode(seed, 2, 5, 5), eps=(1e-6, 1e-7))
    assert result.max_rel_error < 1e-5, result.per_parameter
    norm_weight = result.per_parameter["model.1.weight"]
    assert norm_weight.grad_scale > 0


@pytest.mark.parametrize("algorithm_name", ["maml", "fomaml"])
@pytest.mark.parametrize("query_norm_row", QUERY_NORM_ROWS)
def test_every_step_has_its_own_weights_and_statistics(query_norm_row, algorithm_name):
    steps = 3
    algorithm = per_step_maml(steps, query_norm_row=query_norm_row, algorithm=algorithm_name)
    norm = algorithm.model[1]
    episode = random_episode(1, tasks=1, shots=6, queries=6)
    task = next(iter(episode))
    algorithm.zero_grad()
    algorithm.meta_gradient(episode)
    # Rows 0..steps-1 normalise the support forward of each step. The query loss after the last
    # step reads row steps - 1 under MAML++'s pairing (last_step), row `steps` under steps_taken,
    # so only there does every row's weight get a gradient (first order: only the query's row).
    assert norm.weight.shape == (steps + 1, 3)
    used = [steps - 1 if query_norm_row == "last_step" else steps]
    if algorithm_name == "maml":
        used = range(steps + 1) if query_norm_row == "steps_taken" else range(steps)
    assert [row for row in range(steps + 1) if norm.weight.grad[row].abs().sum() > 0] == list(used)
    assert (norm.running_mean[steps].abs().sum() > 0) == (query_norm_row == "steps_taken")
    # Running statistics land in the model itself (higher's copies would discard them); row 0
    # saw exactly one batch, the support set through the initial first layer.
    with torch.no_grad():
        first = algorithm.model[0](task.support_x).mean(0)
    torch.testing.assert_close(norm.running_mean[0], 0.1 * first)
    assert all(norm.running_mean[row].abs().sum() > 0 for row in range(steps))


def test_at_initialisation_it_is_batch_norm():
    torch.manual_seed(0)
    ours = MLP(1, 1, (5,), "relu", norm="per_step_batch", steps=2)
    plain = nn.Sequential(nn.Linear(1, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 1))
    for mine, theirs in ((ours[0], plain[0]), (ours[3], plain[3])):
        theirs.load_state_dict(mine.state_dict())
    x = torch.randn(7, 1)
    torch.testing.assert_close(ours(x), plain(x))
    torch.testing.assert_close(ours[1].running_var[0], plain[1].running_var)


def test_evaluation_leaves_running_statistics_untouched():
    algorithm = per_step_maml(2).float()
    before = {k: v.clone() for k, v in algorithm.named_buffers()}
    evaluate(algorithm, get_dataset("sinusoid"), shots=5, test_shots=5, tasks=4, steps=(0, 2))
    for name, value in algorithm.named_buffers():
        assert torch.equal(value, before[name]), name


def test_conv4_with_per_step_batch_norm_adapts():
    torch.manual_seed(0)
    model = Conv4(1, 3, hidden=4, image_size=12, norm="per_step_batch", steps=2)
    algorithm = build_algorithm("maml", model, InnerLoop("lslr", 0.1, 2, model=model), F.cross_entropy)
    x, y = torch.randn(6, 1, 12, 12), torch.arange(3).repeat(2)
    losses = [F.cross_entropy(f(x), y).item() for f in algorithm.unroll(x, y)]
    assert losses[-1] < losses[0]


def test_train_flag_builds_per_step_norms(tmp_path, capsys):
    code = main(["train", "--iterations", "2", "--meta_batch_size", "2", "--norm", "per_step_batch",
                 "--inner_steps", "2", "--hidden", "8", "--run_dir", str(tmp_path / "r"),
                 "--progress", "False"])
    assert code == 0
    state = load_checkpoint(tmp_path / "r")["algorithm"]
    assert state["model.1.running_mean"].shape == (3, 8)
    assert state["model.1.running_mean"].abs().sum() > 0
    assert main(["train", "--norm", "group"]) == 2
    assert "unknown norm 'group'" in capsys.readouterr().err


@pytest.mark.parametrize("norm", ["batch", "per_step_batch"])
def test_norm_models_are_not_vmapped(norm):
    model = MLP(1, 1, (3,), norm=norm)
    assert not build_algorithm("maml", model, InnerLoop("sgd"), F.mse_loss, "auto").vectorized


def test_non_transductive_evaluation_predicts_each_query_with_the_support_set_alone():
    torch.manual_seed(0)
    spec = get_dataset("sinusoid")
    kwargs = dict(shots=4, test_shots=6, tasks=3, steps=(0, 1), batch_size=3)
    batch_norm = build_algorithm("maml", MLP(1, 1, (5,), norm="batch"), InnerLoop("sgd", 0.1, 1),
                                 F.mse_loss)
    together = evaluate(batch_norm, spec, **kwargs)
    alone = evaluate(batch_norm, spec, transductive=False, **kwargs)
    assert not np.allclose(together.scores[1], alone.scores[1])  # batch statistics differ
    # By hand for the first task, before adaptation: query j in a batch with the support set.
    task = next(iter(Episode.from_torchmeta(next(iter(spec.loader(
        "test", seed=2017, shots=4, test_shots=6, batch_size=3, num_tasks=3))))))
    with torch.no_grad():
        predictions = torch.cat([batch_norm.model(torch.cat([task.support_x, x[None]]))[-1:]
                                 for x in task.query_x])
    assert alone.scores[0][0] == pytest.approx(spec.score(predictions, task.query_y).item(), rel=1e-6)
    plain = build_algorithm("maml", MLP(1, 1, (5,)), InnerLoop("sgd", 0.1, 1), F.mse_loss)
    np.testing.assert_allclose(evaluate(plain, spec, **kwargs).scores[1],
                               evaluate(plain, spec, transductive=False, **kwargs).scores[1], rtol=1e-5)


def tf_batch_norm_maml(lr: float, seed: int, steps: int) -> object:
    """MAML with cbfinn/maml's TF batch norm (shift, no scale, eps 1e-3) and its inner loss
    (class_sum: the mean times the number of outputs)."""
    torch.manual_seed(seed)
    model = MLP(3, 3, (4, 3), "tanh", norm="batch_shift", norm_eps=1e-3).double()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, ShiftBatchNorm):
                module.bias.add_(0.2 * torch.randn_like(module.bias))
    return build_algorithm("maml", model, InnerLoop("sgd", lr, steps, loss_reduction="class_sum"), F.mse_loss)


@pytest.mark.slow
@settings(max_examples=settings.default.max_examples // 10)
@given(steps=st.integers(1, 2), lr=st.floats(0.01, 0.1), seed=st.integers(0, 2**16))
def test_shift_only_batch_norm_meta_gradient_matches_finite_differences(steps, lr, seed):
    algorithm = tf_batch_norm_maml(lr, seed, steps)
    g = torch.Generator().manual_seed(seed)
    episode = Episode(*(torch.randn(2, n, d, generator=g, dtype=torch.float64)
                        for n, d in ((6, 3), (6, 3), (6, 3), (6, 3))))
    result = check_meta_gradient(algorithm, episode, eps=(1e-6, 1e-7))
    assert result.max_rel_error < 1e-5, result.per_parameter
    assert result.per_parameter["model.1.bias"].grad_scale > 0


def test_shift_only_batch_norm_is_batch_norm_without_a_scale():
    layer = ShiftBatchNorm(4, eps=1e-3)
    with torch.no_grad():
        layer.bias.copy_(torch.tensor([0.5, -1.0, 0.0, 2.0]))
    x = torch.randn(6, 4, 3, 3)
    reference = nn.BatchNorm2d(4, eps=1e-3, affine=False, track_running_stats=False)(x)
    torch.testing.assert_close(layer(x), reference + layer.bias[:, None, None])
    assert [name for name, _ in layer.named_parameters()] == ["bias"]
