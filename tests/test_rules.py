"""Learned inner rules: meta-gradients of weights, step sizes and curvature matrices against finite
differences; the exact SGD step at initialisation; the update formulas; checkpointing."""

from __future__ import annotations

import json

import higher
import pytest
import torch
import torch.nn.functional as F
from conftest import random_episode
from hypothesis import given, settings, target
from hypothesis import strategies as st
from torch import nn

from diffopt.algorithms import build_algorithm
from diffopt.cli import main
from diffopt.data import Episode
from diffopt.errors import DiffoptError
from diffopt.gradcheck import check_meta_gradient
from diffopt.inner import InnerLoop
from diffopt.models import MLP
from diffopt.optim import LEARNED_RULES, LSLR, Chain, MetaCurvature

RULES = sorted(LEARNED_RULES)


class TinyConvNet(nn.Sequential):
    """[N, 2, 4, 4] -> conv 3x3 (3 filters) -> tanh -> linear -> [N, 1]."""

    def __init__(self) -> None:
        super().__init__(nn.Conv2d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(12, 1))


def image_episode(seed: int, tasks: int, shots: int, queries: int) -> Episode:
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    return Episode(rand(tasks, shots, 2, 4, 4), rand(tasks, shots, 1),
                   rand(tasks, queries, 2, 4, 4), rand(tasks, queries, 1))


def maml_with(rule: str, model: nn.Module, lr: float, steps: int, vectorize: str = "never"):
    model = model.double()
    return build_algorithm("maml", model, InnerLoop(rule, lr, steps, model=model), F.mse_loss,
                           vectorize)


def perturb_rule(algorithm, seed: int, scale: float = 0.05) -> None:
    """Move the learned parameters off their initial values, as meta-training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in algorithm.inner.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype) * p.abs().mean())


SETTINGS = settings(max_examples=settings.default.max_examples // 4)  # profile's, conftest.py


@pytest.mark.slow
@SETTINGS
@given(rule=st.sampled_from(RULES), hidden=st.lists(st.integers(2, 6), min_size=1, max_size=2),
       activation=st.sampled_from(["tanh", "softplus"]), steps=st.integers(1, 3),
       lr=st.floats(0.01, 0.3), shots=st.integers(1, 5), queries=st.integers(1, 5),
       seed=st.integers(0, 2**16), vectorize=st.sampled_from(["never", "always"]))
def test_learned_rules_on_mlps_match_finite_differences(rule, hidden, activation, steps, lr, shots,
                                                       queries, seed, vectorize):
    torch.manual_seed(seed)
    algorithm = maml_with(rule, MLP(1, 1, tuple(hidden), activation), lr, steps, vectorize)
    perturb_rule(algorithm, seed)
    result = check_meta_gradient(algorithm, random_episode(seed, 2, shots, queries))
    target(result.max_rel_error)
    assert result.max_rel_error < 1e-5, result.per_parameter
    assert any(name.startswith("inner.rule.") for name in result.per_parameter)


@pytest.mark.slow
@SETTINGS
@given(rule=st.sampled_from(RULES), steps=st.integers(1, 3), lr=st.floats(0.01, 0.2),
       seed=st.integers(0, 2**16), vectorize=st.sampled_from(["never", "always"]))
def test_learned_rules_on_a_conv_net_match_finite_differences(rule, steps, lr, seed, vectorize):
    torch.manual_seed(seed)
    algorithm = maml_with(rule, TinyConvNet(), lr, steps, vectorize)
    perturb_rule(algorithm, seed)
    tasks = 2 if vectorize == "always" else 1  # a real batch for vmap
    result = check_meta_gradient(algorithm, image_episode(seed, tasks, 3, 3))
    target(result.max_rel_error)
    assert result.max_rel_error < 1e-5, result.per_parameter
    if rule.startswith("meta_curvature"):  # the conv weight's three Kronecker factors
        shapes = {name: tuple(p.shape) for name, p in algorithm.named_parameters()}
        assert [shapes[f"inner.rule.rules.0.factors.0.{k}"] for k in range(3)] == [(3, 3), (2, 2), (9, 9)]


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("model", [lambda: MLP(1, 1, (5, 4), "tanh"), TinyConvNet])
def test_initial_learned_rule_takes_the_sgd_step(rule, model):
    torch.manual_seed(0)
    net = model().double()
    algorithm = build_algorithm("maml", net, InnerLoop(rule, 0.07, 3, model=net), F.mse_loss)
    episode = random_episode(0, 1, 4, 4) if isinstance(net, MLP) else image_episode(0, 1, 4, 4)
    task = next(iter(episode))
    ours = algorithm.adapt(task.support_x, task.support_y, track_higher_grads=True)
    with higher.innerloop_ctx(net, torch.optim.SGD(net.parameters(), lr=0.07),
                              copy_initial_weights=False) as (fmodel, sgd):
        for _ in range(3):
            sgd.step(F.mse_loss(fmodel(task.support_x), task.support_y))
    for a, b in zip(ours.parameters(), fmodel.parameters(), strict=True):
        assert torch.equal(a, b)  # bit for bit


def test_meta_curvature_formulas():
    g = torch.Generator().manual_seed(0)
    linear, conv = torch.randn(4, 3, generator=g), torch.randn(5, 2, 3, 3, generator=g)
    rule = MetaCurvature([linear, conv, torch.zeros(4)])
    with torch.no_grad():
        for p in rule.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    (m_out, m_in), (c_out, c_in, c_filter), (bias_scale,) = (list(f) for f in rule.factors)
    bias = torch.randn(4, generator=g)
    out, _ = rule.update([linear, conv, bias, None], None, None, 0)
    torch.testing.assert_close(out[0], m_out @ linear @ m_in)
    # mode-n products one at a time on the [out, in, k*k] view
    unfolded = conv.reshape(5, 2, 9)
    step1 = torch.stack([c_out @ unfolded[:, i, :] for i in range(2)], 1)          # x1 M_out
    step2 = torch.stack([step1[a] .T @ c_in.T for a in range(5)], 0).transpose(1, 2)  # x2 M_in
    step3 = step2 @ c_filter.T                                                         # x3 M_filter
    torch.testing.assert_close(out[1], step3.reshape(5, 2, 3, 3))
    torch.testing.assert_close(out[2], bias_scale * bias)
    assert out[3] is None


def test_lslr_uses_each_steps_step_size_and_the_last_beyond():
    net = MLP(1, 1, (3,), "tanh").double()
    inner = InnerLoop("lslr", 0.1, 2, model=net)
    assert inner.rule.alpha.shape == (4, 2)
    with torch.no_grad():
        inner.rule.alpha[:, 1] = 0.0  # the second (and every later) step does nothing
    task = next(iter(random_episode(0, 1)))
    weights = [[p.detach().clone() for p in f.parameters()]
               for f in inner.unroll(net, F.mse_loss, task.support_x, task.support_y, 4)]
    assert not torch.equal(weights[1][0], weights[0][0])
    for later in weights[2:]:
        assert all(torch.equal(a, b) for a, b in zip(later, weights[1], strict=True))


@pytest.mark.parametrize("name", ["fomaml", "reptile"])
def test_algorithms_that_cannot_learn_a_rule_refuse_it(name):
    net = MLP(1, 1, (3,))
    with pytest.raises(DiffoptError, match=f"{name} does not meta-learn .* 'lslr'; use maml"):
        build_algorithm(name, net, InnerLoop("lslr", 0.1, 1, model=net), F.mse_loss)


def test_learned_rule_needs_the_model():
    with pytest.raises(DiffoptError, match="sized from the model"):
        InnerLoop("meta_sgd", 0.1, 1)


def test_custom_rule_instances_plug_in():
    net = MLP(1, 1, (3,)).double()
    params = list(net.parameters())
    rule = Chain(MetaCurvature(params), LSLR(params, 1, 0.1))
    algorithm = build_algorithm("maml", net, InnerLoop(rule, steps=1), F.mse_loss)
    assert check_meta_gradient(algorithm, random_episode(1)).passed()


def test_training_learns_and_checkpoints_the_rule(tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", "--inner_optimizer", "meta_curvature+lslr", "--iterations", "3",
            "--meta_batch_size", "2", "--hidden", "8", "--progress", "False", "--run_dir", str(run)]
    assert main(args) == 0
    state = torch.load(run / "checkpoint.pt", weights_only=True)["algorithm"]
    alpha = state["inner.rule.rules.1.alpha"]
    assert alpha.shape == (4, 1) and not torch.allclose(alpha, torch.full_like(alpha, 0.01))
    assert not torch.equal(state["inner.rule.rules.0.factors.0.0"], torch.eye(8))
    assert main(["evaluate", str(run), "--tasks", "3", "--steps", "1"]) == 0
    assert json.loads((run / "config.json").read_text())["inner_optimizer"] == "meta_curvature+lslr"
    capsys.readouterr()


@pytest.mark.slow
@pytest.mark.parametrize("rule", ["lslr", "meta_sgd", "meta_curvature"])
def test_gradcheck_catches_a_missing_rule_gradient(rule):
    """The relative-error floor must not hide a wrong gradient of the (small) rule parameters."""
    torch.manual_seed(0)
    algorithm = maml_with(rule, MLP(1, 1, (6, 6), "tanh"), 0.1, 2)
    assert check_meta_gradient(algorithm, random_episode(0)).passed()

    class RuleGradientDropped(type(algorithm)):
        def meta_gradient(self, episode):
            metrics = super().meta_gradient(episode)
            for p in self.inner.parameters():
                p.grad.zero_()
            return metrics

    broken = RuleGradientDropped(algorithm.model, algorithm.inner, algorithm.loss_fn)
    result = check_meta_gradient(broken, random_episode(0))
    worst_rule = max(e.rel_error for n, e in result.per_parameter.items() if n.startswith("inner."))
    assert worst_rule > 1e-3 and not result.passed()


def test_adam_rules_sqrt_has_a_zero_derivative_where_the_squared_average_is_zero():
    """Adam's and AdamW's sqrt(v): finite derivative 0 at v = 0 (a parameter whose gradient is
    exactly 0, as higher masks it; plain sqrt's is infinite and makes the meta-gradient NaN),
    1 / (2 sqrt(v)) elsewhere, and without grad mode the same values as torch.sqrt."""
    from diffopt.optim.adam import _sqrt

    v = torch.tensor([0.0, 4.0], requires_grad=True)
    (derivative,) = torch.autograd.grad(_sqrt([v])[0].sum(), v)
    assert derivative.tolist() == [0.0, 0.25]
    (plain,) = torch.autograd.grad(v.sqrt().sum(), v)
    assert not torch.isfinite(plain).all()  # what the mask is for
    with torch.no_grad():
        assert torch.equal(_sqrt([v])[0], v.sqrt())
