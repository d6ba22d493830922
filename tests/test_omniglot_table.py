"""examples/omniglot_table.py's own computations: the time a test curve reaches an accuracy, and
the run settings its tables pass to diffopt (the whole script runs in tests/test_prepare.py)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from diffopt.config import resolve_config

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "omniglot_table.py"


@pytest.fixture(scope="module")
def table():
    spec = importlib.util.spec_from_file_location("omniglot_table", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["omniglot_table"] = module  # its dataclasses look the module up while it loads
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("omniglot_table", None)


def test_time_to_an_accuracy_is_read_off_the_curve_linearly(table):
    curve = [(60.0, 0.9), (120.0, 0.96), (180.0, 0.99)]
    assert table.time_to(curve, 0.95, 0.2) == pytest.approx(60 + 60 * 0.05 / 0.06)
    assert table.time_to(curve, 0.99, 0.2) == 180.0
    assert table.time_to(curve, 0.5, 0.2) == pytest.approx(60 * 0.3 / 0.7)  # from chance at 0 s
    assert table.time_to(curve, 0.995, 0.2) is None
    assert table.time_to([(60.0, 0.97), (120.0, 0.96), (180.0, 0.975)], 0.97, 0.2) == 60.0  # the first


@pytest.mark.parametrize("name", ["paper-maml-1shot", "paper-reptile-5shot", "paper-reptile-1shot",
                                  "maml-20way-1shot", "reptile-20way-1shot"])
def test_every_run_of_the_new_tables_is_a_valid_configuration(table, name):
    (run,) = [run for runs in table.TABLES.values() for run in runs if run.name == name]
    config = resolve_config(dataset="omniglot", **run.flags())
    assert (config.ways, config.shots) == (run.ways, run.shots)
    resolve_config(**{**config.to_dict(), **run.method.eval_options})  # the test-time options too
    if name.startswith("reptile-20way"):
        assert (config.inner_batch_size, config.inner_steps, config.inner_lr) == (20, 10, 0.0005)
        assert run.method.eval_options == {"inner_batch_size": 10} and not run.method.curve_transductive
    if name == "maml-20way-1shot":
        assert (config.meta_batch_size, config.inner_steps, config.inner_lr) == (16, 5, 0.1)
    if name == "paper-reptile-5shot":
        assert config.algorithm == "reptile" and run.method.eval_options == {"inner_batch_size": 5}
