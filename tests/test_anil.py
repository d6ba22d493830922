"""ANIL and BOIL: MAML whose inner loop adapts the head alone, or the body alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import random_episode

from diffopt import ANIL, BOIL, MAML
from diffopt.cli import main
from diffopt.config import resolve_config
from diffopt.errors import DiffoptError
from diffopt.inner import InnerLoop
from diffopt.models import MLP


def grads(algorithm, episode):
    algorithm.zero_grad(set_to_none=True)
    algorithm.meta_gradient(episode)
    return [p.grad.clone() for p in algorithm.model.parameters()]


@pytest.mark.parametrize("cls, which", [(ANIL, "head"), (BOIL, "body")])
def test_anil_and_boil_are_maml_adapting_the_head_or_the_body(cls, which):
    episode = random_episode(2, tasks=3)
    torch.manual_seed(0)
    model = MLP(1, 1, (8, 8), "tanh").double()
    named = cls(model, InnerLoop("sgd", 0.1, 2), F.mse_loss)
    assert named.inner.params == which
    masked = MAML(model, InnerLoop("sgd", 0.1, 2, params=which), F.mse_loss)
    full = MAML(model, InnerLoop("sgd", 0.1, 2), F.mse_loss)
    got, want, maml = grads(named, episode), grads(masked, episode), grads(full, episode)
    assert all(torch.allclose(a, b, rtol=1e-12, atol=1e-14) for a, b in zip(got, want, strict=True))
    assert any(not torch.allclose(a, b) for a, b in zip(got, maml, strict=True))
    with pytest.raises(DiffoptError, match=f"adapts the {which} in the inner loop, not 'weights'"):
        cls(model, InnerLoop("sgd", 0.1, 2, params="weights"), F.mse_loss)


def test_anil_takes_the_datasets_maml_protocol_and_fixes_what_adapts():
    maml = resolve_config(dataset="omniglot", algorithm="maml")
    anil = resolve_config(dataset="omniglot", algorithm="anil")
    assert anil.inner_params == "head" and resolve_config(algorithm="boil").inner_params == "body"
    for name in ("inner_lr", "inner_loss_reduction", "norm", "norm_eps", "init", "head", "test_shots"):
        assert getattr(anil, name) == getattr(maml, name), name
    with pytest.raises(DiffoptError, match="--algorithm anil adapts the head in the inner loop; drop"):
        resolve_config(algorithm="anil", inner_params="all")


def test_compare_runs_anil_and_boil_beside_maml(tmp_path, capsys, compare_in_process):
    out = tmp_path / "c"
    assert main(["compare", "--algorithms", "maml,anil,boil", "--shots", "3", "--iterations", "3",
                 "--eval_tasks", "4", "--eval_steps", "1", "--hidden", "8", "--out", str(out),
                 "--progress", "False"]) == 0
    report = (out / "report.md").read_text()
    assert "| anil | 3 |" in report and "| boil | 3 |" in report
    assert "| inner_params | all | head | body |" in report


def test_inner_params_takes_name_patterns():
    """``--inner_params`` patterns (fnmatch, comma-separated) adapt the matching tensors alone;
    one matching nothing lists the model's parameters."""
    episode = random_episode(3, tasks=2)
    torch.manual_seed(0)
    model = MLP(1, 1, (8, 8), "tanh").double()
    by_pattern = MAML(model, InnerLoop("sgd", 0.1, 2, params="4.*"), F.mse_loss)
    by_name = MAML(model, InnerLoop("sgd", 0.1, 2, params="head"), F.mse_loss)
    assert all(torch.equal(a, b) for a, b in zip(grads(by_pattern, episode), grads(by_name, episode),
                                                  strict=True))
    two = MAML(model, InnerLoop("sgd", 0.1, 2, params="0.weight, 2.*"), F.mse_loss)
    task = next(iter(episode))
    adapted = two.adapt(task.support_x, task.support_y)
    moved = [not torch.equal(a, b) for a, b in zip(adapted.parameters(), model.parameters(), strict=True)]
    assert moved == [True, False, True, True, False, False]
    with pytest.raises(DiffoptError, match=r"matching a parameter of the model; its parameters: 0.weight"):
        MAML(model, InnerLoop("lslr", 0.1, 2, params="heads", model=model), F.mse_loss)
    assert resolve_config(inner_params="layers.*").inner_params == "layers.*"


@pytest.mark.parametrize("rule", ["meta_sgd", "lslr", "meta_curvature"])
@pytest.mark.parametrize("vectorize", ["never", "always"])
def test_learned_rules_carry_parameters_for_the_adapted_tensors_alone(rule, vectorize):
    """ANIL with a learned rule: the rule is sized to the head (also when the algorithm, not the
    InnerLoop, fixes it), its meta-gradient checked by finite differences on both paths."""
    from diffopt.gradcheck import check_meta_gradient

    torch.manual_seed(1)
    model = MLP(1, 1, (5,), "tanh").double()
    head = [p for name, p in model.named_parameters() if name.startswith("2.")]
    for inner in (InnerLoop(rule, 0.1, 2, model=model), InnerLoop(rule, 0.1, 2, model=model, params="head")):
        algorithm = ANIL(model, inner, F.mse_loss, vectorize=vectorize)
        assert algorithm.vectorized == (vectorize == "always")
        sized = InnerLoop(rule, 0.1, 2, model=torch.nn.ParameterList(head))
        assert [p.shape for p in algorithm.inner.parameters()] == [p.shape for p in sized.parameters()]
    with torch.no_grad():  # off their initial values, as after meta-training
        for p in algorithm.inner.parameters():
            p.mul_(1.3)
    result = check_meta_gradient(algorithm, random_episode(4, tasks=2))
    assert result.max_rel_error < 1e-5, result.per_parameter
    assert any(name.startswith("inner.rule.") for name in result.per_parameter)


@pytest.mark.parametrize("vectorize", ["never", "always"])
def test_anil_runs_the_body_once_per_support_set_and_query_set(vectorize):
    """ANIL's body is fixed in the inner loop: its features are computed once (two body forwards
    a task, not steps + 1), giving MAML-adapting-the-head's meta-gradient on both paths."""
    episode = random_episode(6, tasks=2)
    torch.manual_seed(0)
    model = MLP(1, 1, (8, 8), "tanh").double()
    anil = ANIL(model, InnerLoop("sgd", 0.1, 4), F.mse_loss, vectorize=vectorize)
    assert anil.body_and_head() is not None
    calls = []
    handle = model[0].register_forward_hook(lambda *_: calls.append(1))
    got = grads(anil, episode)
    handle.remove()
    assert len(calls) == (2 if vectorize == "always" else 2 * len(episode))
    masked = MAML(model, InnerLoop("sgd", 0.1, 4, params="head"), F.mse_loss, vectorize=vectorize)
    for a, b in zip(got, grads(masked, episode), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_anil_runs_the_whole_model_where_the_body_changes_with_the_step(monkeypatch):
    """A per-step batch norm (MAML++) gives the body one weight row per inner step: ANIL runs
    the whole model at each step, as MAML adapting the head does (the norm's forwards, and the
    rows they use, recorded: rows 0 and 1 for the two support steps, the last step's row 1 for
    the queries, InnerLoop's default; a body run once would use one row), both rows get their
    meta-gradient, and the meta-gradient is MAML-adapting-the-head's. A conv4 without per-step
    layers is split."""
    from diffopt.models import build_model
    from diffopt.models.norm import PerStepBatchNorm

    episode = random_episode(7, tasks=2)
    torch.manual_seed(0)
    per_step = build_model("mlp", hidden=(4,), activation="tanh", norm="per_step_batch", steps=2,
                           in_features=1, out_features=1).double()
    with torch.no_grad():  # rows unlike each other, as after meta-training
        per_step[1].weight.mul_(torch.tensor([[0.5], [1.0], [2.0]], dtype=torch.float64))
        per_step[1].bias.add_(torch.tensor([[-0.3], [0.0], [0.3]], dtype=torch.float64))
    anil = ANIL(per_step, InnerLoop("sgd", 0.1, 2), F.mse_loss, vectorize="never")  # no vmap for it
    assert anil.body_and_head() is None
    masked = MAML(per_step, InnerLoop("sgd", 0.1, 2, params="head"), F.mse_loss, vectorize="never")
    rows, real_forward = [], PerStepBatchNorm.forward
    monkeypatch.setattr(PerStepBatchNorm, "forward",
                        lambda self, x: rows.append(self.inner_step) or real_forward(self, x))
    seen, results = [], []
    for algorithm in (anil, masked):
        rows.clear()
        results.append(grads(algorithm, episode))
        seen.append(list(rows))
    assert seen == [[0, 1, 1] * len(episode)] * 2  # each task: 2 support steps and the query
    names = [name for name, _ in per_step.named_parameters()]
    assert all(row.abs().max() > 0 for row in results[0][names.index("1.weight")][:2])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    conv = build_model("conv4", hidden=(4,), activation="relu", norm="batch_shift", in_channels=1,
                       image_size=28, out_features=5, pool=False)
    assert ANIL(conv, InnerLoop("sgd", 0.1, 2), F.mse_loss).body_and_head() is not None
