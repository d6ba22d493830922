"""Plug-ins: a researcher's own rule, model and algorithm as ``module:attribute``, through every command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from diffopt import InnerLoop, register_rule
from diffopt.cli import main
from diffopt.errors import DiffoptError
from diffopt.optim import LEARNED_RULES, UpdateRule, build_rule

PLUGIN = textwrap.dedent('''
    import torch
    from torch import nn

    from diffopt import MAML
    from diffopt.models import MLP
    from diffopt.optim import UpdateRule
    from diffopt.optim.rule import tensor_map


    class LearnedScale(UpdateRule):
        """update = -lr * exp(s) * g, one learned log-scale s per tensor."""

        def __init__(self, params, lr):
            super().__init__()
            self.lr = lr
            self.s = nn.Parameter(params[0].new_zeros(len(params)))

        def update(self, grads, state, params, step):
            return tensor_map(lambda i, g: -self.lr * torch.exp(self.s[i]) * g, grads), state


    def doubled(params, lr, steps):
        return LearnedScale(params, 2 * lr)


    def narrow_mlp(in_features, out_features, hidden, activation, norm, norm_eps, steps, **unused):
        return MLP(in_features, out_features, hidden=(4,), activation=activation)


    class MyMAML(MAML):
        name = "my_maml"


    not_a_rule = 3
''')

TINY = ["--iterations", "3", "--meta_batch_size", "2", "--hidden", "8", "--progress", "False"]


@pytest.fixture
def plugin_folder(tmp_path, monkeypatch):
    """The current folder holds my_rules.py, as a researcher's project would."""
    (tmp_path / "my_rules.py").write_text(PLUGIN)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("my_rules", None)


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.slow
def test_rule_model_and_algorithm_by_import_path_train_and_evaluate_in_a_new_process(plugin_folder, capsys):
    run = plugin_folder / "run"
    code, _, err = cli(capsys, "train", *TINY, "--inner_optimizer", "my_rules:LearnedScale",
                       "--model", "my_rules:narrow_mlp", "--algorithm", "my_rules:MyMAML",
                       "--run_dir", str(run))
    assert code == 0, err
    config = json.loads((run / "config.json").read_text())
    assert (config["inner_optimizer"], config["model"], config["algorithm"]) == \
        ("my_rules:LearnedScale", "my_rules:narrow_mlp", "my_rules:MyMAML")
    saved = torch.load(run / "checkpoint.pt", weights_only=True)["algorithm"]
    assert saved["inner.rule.s"].shape == (4,)  # narrow_mlp: two linear layers, weight and bias
    assert saved["model.0.weight"].shape == (4, 1)
    assert not torch.equal(saved["inner.rule.s"], torch.zeros(4))  # meta-learned
    evaluated = subprocess.run([sys.executable, "-m", "diffopt", "evaluate", str(run), "--tasks", "2",
                                "--steps", "1"], capture_output=True, text=True, timeout=300,
                               cwd=plugin_folder)
    assert evaluated.returncode == 0, evaluated.stderr
    assert "mse after   1 step:" in evaluated.stdout


def test_the_custom_rule_example_is_a_plugin(monkeypatch, capsys):
    examples = Path(__file__).resolve().parents[1] / "examples"
    monkeypatch.chdir(examples)
    monkeypatch.syspath_prepend(str(examples))
    code, out, _ = cli(capsys, "gradcheck", "--inner_optimizer", "custom_rule:LearnedMomentum")
    assert code == 0 and out.strip().endswith("PASS (rtol 1e-05)")
    assert "inner.rule.alpha" in out and "inner.rule.b" in out


def test_gradcheck_proves_a_plugin_rule(plugin_folder, capsys):
    code, out, _ = cli(capsys, "gradcheck", "--inner_optimizer", "my_rules:doubled")
    assert code == 0 and out.strip().endswith("PASS (rtol 1e-05)")
    assert "inner.rule.s" in out


@pytest.mark.slow
def test_compare_runs_a_plugin_rule_in_its_child_processes(plugin_folder, capsys):
    out = plugin_folder / "cmp"
    code, _, err = cli(capsys, "compare", "--algorithms", "maml,reptile", "--inner_optimizers",
                       "sgd,my_rules:LearnedScale", "--iterations", "2", "--shots", "5",
                       "--eval_tasks", "2", "--eval_steps", "1", "--out", str(out), "--progress", "False")
    assert code == 0, err
    report = (out / "report.md").read_text()
    assert "| maml+my_rules:LearnedScale | 5 | 1 |" in report
    assert "| inner_optimizer | sgd | my_rules:LearnedScale | sgd |" in report
    assert "Skipped: `reptile+my_rules:LearnedScale` (reptile does not meta-learn an inner rule's " \
           "parameters)." in report


@pytest.mark.parametrize("option, value, fragment", [
    ("--inner_optimizer", "no_such_module:Rule", "cannot import module 'no_such_module'"),
    ("--inner_optimizer", "my_rules:Missing", "module 'my_rules' has no attribute 'Missing'"),
    ("--inner_optimizer", "my_rules:not_a_rule", "is a int, not a rule factory"),
    ("--model", "my_rules:LearnedScale", "cannot be built from the data's model options"),
    ("--algorithm", "my_rules:narrow_mlp", "not a subclass of diffopt.MetaAlgorithm"),
    ("--algorithm", "my_rules:", "write module:attribute"),
    ("--inner_optimizer", "my_rules.py:LearnedScale", "name the module, not its file: my_rules:LearnedScale"),
    ("--inner_optimizer", "broken_rules:Rule", "importing module 'broken_rules' failed: ModuleNotFoundError"),
    ("--inner_optimizer", "my_rule", "or your own as module:attribute"),
    ("--model", "my_models", "or your own as module:attribute"),
    ("--algorithm", "my_algo", "or your own as module:attribute"),
])
def test_a_bad_import_path_is_one_line(plugin_folder, capsys, option, value, fragment):
    (plugin_folder / "broken_rules.py").write_text("import a_module_that_is_not_installed\n")
    code, _, err = cli(capsys, "train", *TINY, option, value, "--run_dir", str(plugin_folder / "run"))
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("diffopt: error: "), err
    assert fragment in lines[0]
    assert not (plugin_folder / "run").exists()


def test_register_rule_for_a_notebook(plugin_folder):
    from my_rules import LearnedScale

    register_rule("learned_scale_test", LearnedScale)
    try:
        model = torch.nn.Linear(2, 1)
        inner = InnerLoop("learned_scale_test", 0.1, 2, model=model)
        assert isinstance(inner.rule, LearnedScale) and inner.rule.s.shape == (2,)
        with pytest.raises(DiffoptError, match="exists already"):
            register_rule("lslr", LearnedScale)
        with pytest.raises(DiffoptError, match="without ':'"):
            register_rule("a:b", LearnedScale)
    finally:
        LEARNED_RULES.pop("learned_scale_test")


def test_factories_taking_fewer_arguments_and_results_that_are_not_rules(plugin_folder):
    params = [torch.zeros(3), torch.zeros(2)]
    assert build_rule("my_rules:LearnedScale", params, 0.1, 5).lr == 0.1  # (params, lr)
    assert build_rule("my_rules:doubled", params, 0.1, 5).lr == 0.2  # (params, lr, steps)
    (plugin_folder / "bad_rules.py").write_text("def rule(params, lr, steps):\n    return 1\n")
    with pytest.raises(DiffoptError, match="made a int, not a diffopt.optim.UpdateRule"):
        build_rule("bad_rules:rule", params, 0.1, 5)
    assert isinstance(build_rule("lslr", params, 0.1, 5), UpdateRule)


def test_evaluate_takes_an_episode_or_tasks_and_scores_them_as_the_dataset_path_does():
    from diffopt import evaluate, get_dataset
    from diffopt.config import resolve_config
    from diffopt.data import Episode
    from diffopt.train import build

    algorithm = build(resolve_config(hidden=(8,), seed=0))
    spec = get_dataset("sinusoid")
    drawn = evaluate(algorithm, spec, shots=5, test_shots=10, tasks=6, steps=(0, 2), batch_size=4)
    loader = spec.loader("test", seed=2017, shots=5, test_shots=10, batch_size=4, num_tasks=6)
    episodes = [Episode.from_torchmeta(batch) for batch in loader]
    tasks = [task for episode in episodes for task in episode]
    for given in (episodes, tasks, iter(tasks)):
        again = evaluate(algorithm, given, steps=(0, 2), batch_size=4)
        assert again.metric == "mse" and again.task_keys == drawn.task_keys
        for step in (0, 2):
            assert again.scores[step] == pytest.approx(drawn.scores[step], rel=1e-6)
    one = evaluate(algorithm, episodes[0], steps=(1,))
    assert len(one.scores[1]) == 4
    with pytest.raises(DiffoptError, match="give shots, test_shots, tasks"):
        evaluate(algorithm, spec)
    with pytest.raises(DiffoptError, match="an item of type int"):
        evaluate(algorithm, [1, 2])


def test_the_algorithms_show_and_document_their_constructor():
    import inspect

    from diffopt import FOMAML, IMAML, MAML, MetaAlgorithm, Reptile

    for cls in (MAML, FOMAML, Reptile, IMAML):  # the shared arguments, then the declared options'
        own = [option.argument or name for name, option in cls.own_options().items()]
        assert list(inspect.signature(cls).parameters) == ["model", "inner", "loss_fn", "vectorize",
                                                           "task_threads", *own]
        assert "see ``MetaAlgorithm``" in cls.__doc__
    assert MAML.own_options() and IMAML.own_options() and not Reptile.own_options()
    for argument in ("model:", "inner:", "loss_fn:", "vectorize:", "task_threads:"):
        assert f"        {argument}" in MetaAlgorithm.__doc__


WRONG_DERIVATIVE = textwrap.dedent('''
    import torch
    from torch import nn

    from diffopt.optim import UpdateRule
    from diffopt.optim.rule import tensor_map


    class Scaled(UpdateRule):
        """update = -lr * exp(s) * g, one learned log-scale s per tensor."""

        def __init__(self, params, lr):
            super().__init__()
            self.lr = lr
            self.s = nn.Parameter(params[0].new_zeros(len(params)))

        def direction(self, g):
            return g

        def update(self, grads, state, params, step):
            return tensor_map(lambda i, g: -self.lr * torch.exp(self.s[i]) * self.direction(g), grads), state


    class DetachedScaled(Scaled):
        """The same updates, but g.detach(): the inner gradient's own derivative (the meta-
        gradient's second-order part) is missing, so the meta-gradient is wrong."""

        def direction(self, g):
            return g.detach()
''')


@pytest.mark.slow
def test_gradcheck_exits_1_on_a_rule_with_a_wrong_derivative(tmp_path, monkeypatch, capsys):
    """The rule whose update detaches the gradient fails ``diffopt gradcheck``: in a fresh
    process, the rule module on PYTHONPATH, the exit status is 1 and the verdict FAIL. Its twin
    without the detach (the same updates, the same meta-loss) passes, here in this process."""
    (tmp_path / "wrong_rules.py").write_text(WRONG_DERIVATIVE)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        code, out, _ = cli(capsys, "gradcheck", "--inner_optimizer", "wrong_rules:Scaled")
    finally:
        sys.modules.pop("wrong_rules", None)
    assert code == 0 and out.strip().endswith("PASS (rtol 1e-05)")
    path = os.pathsep.join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH")) if p)
    wrong = subprocess.run([sys.executable, "-m", "diffopt", "gradcheck", "--inner_optimizer",
                            "wrong_rules:DetachedScaled"], capture_output=True, text=True, timeout=300,
                           env={**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"})
    assert wrong.returncode == 1, (wrong.returncode, wrong.stdout, wrong.stderr)
    assert wrong.stdout.strip().splitlines()[-1].endswith("FAIL (rtol 1e-05)"), wrong.stdout
    assert "model.0.weight" in wrong.stdout


def test_a_plugin_run_evaluated_where_its_module_is_not_says_so(plugin_folder, tmp_path_factory, monkeypatch):
    """Loading a plug-in run from a folder where its module cannot be imported names the
    plug-in and the fix, not an "unreadable config"."""
    from diffopt.config import resolve_config
    from diffopt.errors import PluginError
    from diffopt.train import load_trained, train

    run = plugin_folder / "run"
    train(resolve_config(inner_optimizer="my_rules:LearnedScale", iterations=1, meta_batch_size=2,
                         hidden=(8,), run_dir=str(run), progress=False))
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    monkeypatch.chdir(elsewhere)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(plugin_folder))])
    sys.modules.pop("my_rules", None)
    with pytest.raises(PluginError, match=f"run {run} was trained with a plug-in: .*cannot import "
                       "module 'my_rules'.*PYTHONPATH") as error:
        load_trained(run)
    assert "unreadable" not in str(error.value)


CRASHING = textwrap.dedent('''
    from diffopt.optim import SGD

    calls = []


    class Crashing(SGD):
        """SGD that raises on its third update, as a researcher's rule with a bug might."""

        def update(self, grads, state, params, step):
            calls.append(step)
            if len(calls) == 3:
                raise RuntimeError("my rule has a bug")
            return super().update(grads, state, params, step)


    def rule(params, lr, steps):
        return Crashing(lr)
''')


def test_a_crash_in_a_users_rule_marks_the_run_folder_failed(plugin_folder, capsys):
    (plugin_folder / "crashing_rules.py").write_text(CRASHING)
    run = plugin_folder / "run"
    with pytest.raises(RuntimeError, match="my rule has a bug"):
        main(["train", *TINY, "--vectorize", "never", "--inner_optimizer", "crashing_rules:rule",
              "--run_dir", str(run)])
    failure = json.loads((run / "failed.json").read_text())
    # two tasks of one step each per meta-iteration: the third update is meta-iteration 2's
    assert failure == {"error": "RuntimeError: my rule has a bug", "last_iteration": 1, "checkpoint": False}
    code, _, err = cli(capsys, "evaluate", str(run))
    assert code == 2 and "failed before its first checkpoint, after meta-iteration 1" in err
    assert err.count("\n") == 1
    code, _, err = cli(capsys, "train", *TINY, "--run_dir", str(run))  # fixed: the same folder trains
    assert code == 0, err
    assert not (run / "failed.json").exists() and (run / "checkpoint.pt").exists()
    sys.modules.pop("crashing_rules", None)
