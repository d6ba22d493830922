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


@pytest.mark.parametrize("name", ["paper-maml-1shot", "paper-maml-lslr-1shot-2threads", "paper-reptile-5shot",
                                  "paper-reptile-1shot", "maml-20way-1shot", "reptile-20way-1shot"])
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


def test_a_run_with_threads_of_its_own_trains_alone(table, tmp_path, monkeypatch):
    """``train`` runs ``parallel`` runs at a time, but one that names its threads has the machine."""
    started, live = [], set()

    class Process:  # a training process that has ended by the time it is first polled
        def __init__(self, args, env, stdout, stderr):
            self.name, self.returncode = Path(args[args.index("--run_dir") + 1]).name, None
            started.append((self.name, env["OMP_NUM_THREADS"], sorted(live)))
            live.add(self.name)

        def poll(self):
            live.discard(self.name)
            self.returncode = 0
            return 0

    monkeypatch.setattr(table.subprocess, "Popen", Process)
    monkeypatch.setattr(table.time, "sleep", lambda seconds: None)
    names = ["paper-maml-1shot", "paper-maml-lslr-1shot-2threads", "paper-reptile-5shot",
             "paper-reptile-1shot"]
    table.train("paper", runs=",".join(names), parallel=2, threads=1, out=str(tmp_path))
    assert started == [(names[0], "1", []), (names[1], "2", []), (names[2], "1", []),
                       (names[3], "1", [names[2]])]
