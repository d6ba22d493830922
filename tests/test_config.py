"""diffopt.config: TrainConfig assembled from the components' declared options, one check each."""

from __future__ import annotations

import inspect
from dataclasses import fields
from pathlib import Path

import pytest
from torch import nn

from diffopt.algorithms import ALGORITHMS, IMAML, MAML
from diffopt.config import ALGORITHM_OPTIONS, SAVED_BEFORE, TrainConfig, option_reference, resolve_config
from diffopt.data import DATA_OPTIONS
from diffopt.errors import DiffoptError
from diffopt.inner import InnerLoop
from diffopt.models import MODEL_OPTIONS
from diffopt.options import AS_TODAY

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "guide.md"


def test_every_option_is_declared_once_and_feeds_its_constructor():
    names = [f.name for f in fields(TrainConfig)]
    assert len(names) == len(set(names))
    owned = [name for cls in ALGORITHMS.values() for name in cls.own_options()]
    components = [*DATA_OPTIONS, *MODEL_OPTIONS, *InnerLoop.OPTIONS, *owned]
    assert len(components) == len(set(components))  # no option declared by two components
    assert set(components) <= set(names)
    loop = inspect.signature(InnerLoop).parameters
    for name, option in InnerLoop.OPTIONS.items():  # the declared default is the constructor's
        assert loop[option.argument or name].default == option.default, name
    for cls in (MAML, IMAML):
        signature = inspect.signature(cls).parameters
        for name, option in cls.own_options().items():
            assert signature[option.argument or name].default == option.default, name


def test_resolved_defaults_come_from_the_declarations():
    config = resolve_config()
    for name, option in {**DATA_OPTIONS, **MODEL_OPTIONS, **InnerLoop.OPTIONS}.items():
        assert getattr(config, name) == (config.shots if name == "test_shots" else option.default), name
    assert resolve_config(algorithm="imaml").cg_steps == IMAML.OPTIONS["cg_steps"].default
    # where no dataset protocol sets it (Mini-ImageNet has no iMAML protocol)
    assert (resolve_config(algorithm="imaml", dataset="miniimagenet").inner_proximal
            == IMAML.inner_defaults["inner_proximal"])
    for name, option in ALGORITHM_OPTIONS.items():  # the others' value: unset
        assert getattr(resolve_config(algorithm="reptile"), name) == option.unset
    assert SAVED_BEFORE["query_norm_row"] == "steps_taken"
    declared = {**MODEL_OPTIONS, **InnerLoop.OPTIONS}
    assert all(SAVED_BEFORE[name] == option.before for name, option in declared.items()
               if option.before is not AS_TODAY)
    assert SAVED_BEFORE["padding"] == "symmetric"  # runs from before --padding: torch's


@pytest.mark.parametrize("option, value", [
    ("inner_steps", -1), ("inner_lr", 0.0), ("inner_state", "keep"), ("inner_loss_reduction", "max"),
    ("query_norm_row", "first"), ("inner_proximal", -1.0), ("inner_batch_size", 0),
    ("inner_checkpoint", 0), ("inner_checkpoint", "sqrt"), ("inner_backprop_steps", 2),
    ("inner_solver", "newton"), ("inner_backtrack", "yes"), ("inner_optimizer", "adamz"),
    ("inner_options", {"betas": [0.5]}), ("inner_params", ""),
])
def test_a_config_and_the_inner_loop_refuse_a_bad_value_alike(option, value):
    """The config's validation runs the constructor's own check: the same one-line error (under
    an algorithm that takes the option: imaml solves the inner problem, maml differentiates it)."""
    algorithm = "imaml" if option in ("inner_solver", "inner_backtrack") else "maml"
    with pytest.raises(DiffoptError) as from_config:
        resolve_config(algorithm=algorithm, **{option: value})
    argument = InnerLoop.OPTIONS[option].argument or option
    with pytest.raises(DiffoptError) as from_loop:
        InnerLoop(**{"proximal": 1.0, argument: value}, model=nn.Linear(1, 1))
    assert str(from_config.value) == str(from_loop.value)


@pytest.mark.parametrize("algorithm, flags, message", [
    ("maml", dict(inner_state="persist"), "use --inner_state reset with maml"),
    ("maml", dict(inner_solver="gauss_newton"), "--inner_solver gauss_newton is for imaml"),
    ("reptile", dict(inner_checkpoint=1), "reptile does not backpropagate"),
    ("imaml", dict(inner_proximal=0.0), "--inner_proximal must be a finite number > 0 for imaml"),
])
def test_a_config_and_the_algorithm_refuse_an_inner_loop_alike(algorithm, flags, message):
    with pytest.raises(DiffoptError, match=message) as from_config:
        resolve_config(algorithm=algorithm, **flags)
    arguments = {InnerLoop.OPTIONS[name].argument: value for name, value in flags.items()}
    model = nn.Linear(1, 1)
    with pytest.raises(DiffoptError) as from_algorithm:
        inner = InnerLoop(model=model, **{"proximal": 1.0, **arguments})  # a valid loop by itself
        ALGORITHMS[algorithm](model, inner, nn.functional.mse_loss)
    assert str(from_algorithm.value) == str(from_config.value)


def test_an_algorithms_option_is_refused_by_the_others():
    with pytest.raises(DiffoptError, match="--cg_steps is imaml.s linear solve; drop it for --algorithm"):
        resolve_config(algorithm="maml", cg_steps=3)
    with pytest.raises(DiffoptError, match="needs --algorithm maml; drop it for --algorithm anil"):
        resolve_config(algorithm="anil", first_order_epochs=2)
    with pytest.raises(DiffoptError, match="--cg_steps must be a whole number >= 0"):
        resolve_config(algorithm="imaml", cg_steps=-1)
    assert resolve_config(algorithm="maml", first_order_epochs=2).first_order_epochs == 2


def test_the_guide_lists_every_option_as_declared():
    """docs/guide.md's option table is generated from the declarations (``make docs``)."""
    text = GUIDE.read_text()
    section = text.split("<!-- train-options:start -->")[1].split("<!-- train-options:end -->")[0]
    assert section.strip() == option_reference().strip(), "docs/guide.md is stale: run `make docs`"
    assert all(f"`--{f.name}`" in section for f in fields(TrainConfig))


def test_a_time_budget_given_alone_decides_the_runs_length():
    """--max_seconds without --iterations trains for the budget, not for 1000 iterations."""
    from diffopt.config import BUDGETED_ITERATIONS

    assert resolve_config().iterations == 1000
    assert resolve_config(max_seconds=60.0).iterations == BUDGETED_ITERATIONS
    assert resolve_config(max_seconds=60.0, iterations=5).iterations == 5
