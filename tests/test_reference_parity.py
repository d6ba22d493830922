"""diffopt against the independent Omniglot reference (benchmarks/omniglot_reference.py, written
from cbfinn/maml): on the same meta-parameters and the same meta-batch, MAML's and first-order
MAML's meta-gradients are the same, with cbfinn's settings and with the goal recipe of
examples/omniglot_table.py. The time-to-accuracy benchmark compares the two over a
training budget; this pins the per-step computation, so a gap there is the task stream and the
seed, not the algorithm."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from diffopt.config import resolve_config
from diffopt.data import Episode
from diffopt.train import build

ROOT = Path(__file__).resolve().parents[1]


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module  # dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module


def _reference():
    return _load(ROOT / "benchmarks" / "omniglot_reference.py")


STEP_SIZE_RULES = {None: "sgd", "tensor": "lslr", "element": "meta_sgd"}
"""The reference's ``step_sizes`` setting -> diffopt's inner optimizer."""


def _recipe_flags(recipe: str, settings: dict) -> dict:
    """diffopt's options for the reference's recipe (its ``settings``): none for cbfinn's
    (diffopt's defaults)."""
    if recipe == "cbfinn":
        return {}
    return {**_load(ROOT / "examples" / "omniglot_table.py").GOAL_RECIPE,
            "inner_optimizer": STEP_SIZE_RULES[settings["step_sizes"]]}


def _reference_params(algorithm, of=lambda p: p) -> dict[str, torch.Tensor]:
    """``of`` each diffopt meta-parameter (itself, its .grad) under the reference's names; the
    learned step sizes of the i-th model parameter (LSLR's alpha[i, 0], Meta-SGD's alpha.i) as
    "lr.<its name>"."""
    model = [_reference_names(f"model.{n}") for n, _ in algorithm.model.named_parameters()]
    params = {}
    for name, p in algorithm.named_parameters():
        if name.startswith("model."):
            params[_reference_names(name)] = of(p)
        elif name == "inner.rule.alpha":  # LSLR: [tensors, steps], one training step
            params.update({f"lr.{n}": of(p)[i, 0] for i, n in enumerate(model)})
        else:  # Meta-SGD: inner.rule.alpha.<i>
            params[f"lr.{model[int(name.rsplit('.', 1)[1])]}"] = of(p)
    return params


def _reference_names(name: str) -> str:
    """diffopt's conv4 (Sequential: conv, norm, relu x 4, then pool, flatten, linear) -> the
    reference's parameter names."""
    index, kind = name.split(".")[1:]
    index = int(index)
    if index >= 12:  # after the four blocks: the dense layer (pool and flatten hold no parameters)
        return f"fc.{kind}"
    block = index // 3 + 1
    return f"conv{block}.{kind}" if index % 3 == 0 else f"bn{block}.{kind}"


@pytest.mark.parametrize("algorithm, vectorize, recipe", [
    ("maml", "always", "cbfinn"), ("maml", "never", "cbfinn"), ("fomaml", "always", "cbfinn"),
    ("fomaml", "never", "cbfinn"), ("maml", "auto", "goal"), ("fomaml", "auto", "goal"),
    ("maml", "auto", "goal-lslr"), ("maml", "auto", "goal-meta-sgd")])
def test_meta_gradient_equals_the_reference_on_the_same_tasks(algorithm, vectorize, recipe, monkeypatch):
    ref = _reference()
    settings = ref.MAML_RECIPES[recipe]
    tasks, ways, shots = settings["meta_batch"], 5, 1
    queries = settings["queries"] or shots
    flags = {**_recipe_flags(recipe, settings), "test_shots": queries, "meta_batch_size": tasks}
    config = resolve_config(dataset="omniglot", algorithm=algorithm, shots=shots, ways=ways, seed=3,
                            vectorize=vectorize, **flags)
    diffopt_algorithm = build(config).double()  # float64: the two summation orders agree to 1e-10
    with torch.no_grad():  # moved off their initial values so no gradient is trivially zero
        for p in diffopt_algorithm.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    named = _reference_params(diffopt_algorithm)
    params = {n: p.detach().clone().requires_grad_() for n, p in named.items()}
    reference_init = ref.init_params("maml", ways, torch.Generator(), recipe)
    assert {n: p.shape for n, p in params.items()} == {n: p.shape for n, p in reference_init.items()}

    gen = torch.Generator().manual_seed(0)
    x = torch.rand(tasks, ways, shots + queries, 1, 28, 28, generator=gen, dtype=torch.float64)
    y = torch.arange(ways).view(1, ways, 1).expand(tasks, ways, shots + queries)
    monkeypatch.setattr(ref, "sample_tasks", lambda *args: (x, y))
    captured = {}
    monkeypatch.setattr(ref, "tf_adam_", lambda plist, grads, *a, **k: captured.update(grads=grads))
    ref.maml_step(params, None, None, ways, shots, algorithm == "fomaml", gen, recipe)
    expected = dict(zip(params, captured["grads"], strict=True))

    episode = Episode(x[:, :, :shots].flatten(1, 2), y[:, :, :shots].flatten(1, 2),
                      x[:, :, shots:].flatten(1, 2), y[:, :, shots:].flatten(1, 2))
    diffopt_algorithm.zero_grad()
    diffopt_algorithm.meta_gradient(episode)
    got = _reference_params(diffopt_algorithm, lambda p: p.grad)
    # cbfinn's meta-loss sums the query cross-entropies over a task's ways * shots queries and
    # averages over tasks (maml.py:136); diffopt averages over the queries too: a constant factor,
    # which Adam's update does not see. The goal recipe averages both.
    scale = ways * shots if settings["meta_loss"] == "sum" else 1
    for name, grad in expected.items():
        if name.removeprefix("lr.").startswith("conv") and name.endswith("bias"):  # batch norm next
            # subtracts the channel mean next: the exact gradient is 0, both sides are rounding
            assert grad.abs().max() < 1e-12 and got[name].abs().max() < 1e-12, name
            continue
        assert grad.abs().sum() > 1e-3, name
        error = (scale * got[name] - grad).norm() / grad.norm()
        assert error < 1e-10, (name, error.item())


def test_each_time_to_accuracy_pair_trains_its_reference_recipe():
    """benchmarks/time_to_accuracy.py pairs a paper-table run of diffopt with a reference recipe:
    the options that differ between recipes (inner rule, training characters, meta-batch, queries,
    meta-learning-rate schedule) agree; the meta-gradient of each step-size rule is pinned above."""
    pairs = _load(ROOT / "benchmarks" / "time_to_accuracy.py")
    ref = _reference()
    splits = {"train": "vinyals", "trainval": "vinyals_trainval"}
    assert pairs.RECIPES
    for method, (algorithm, recipe, run_name) in pairs.RECIPES.items():
        settings = ref.MAML_RECIPES[recipe]
        flags = next(run for run in pairs.PAPER_RUNS if run.name == run_name).flags()
        config = resolve_config(dataset="omniglot", **flags)
        assert config.algorithm == algorithm, method
        assert config.inner_optimizer == STEP_SIZE_RULES[settings["step_sizes"]], method
        assert (config.class_split or "vinyals") == splits[settings["classes"]], method
        assert config.meta_batch_size == settings["meta_batch"], method
        assert config.test_shots == settings["queries"], method
        assert config.meta_lr_schedule == "cosine", method
        assert config.meta_lr_final == settings["meta_lr_final"], method
        goal = _recipe_flags("goal", ref.MAML_RECIPES["goal"])
        assert goal.items() <= {**flags, "inner_optimizer": "sgd"}.items(), method  # the goal recipe's levers
