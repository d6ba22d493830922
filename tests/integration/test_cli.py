"""The command line: every command's help, the run folder it writes, and one-line errors."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from dataclasses import fields
from fractions import Fraction
from pathlib import Path

import pytest
import torch

from diffopt.algorithms import ALGORITHMS
from diffopt.cli import main
from diffopt.config import TrainConfig, resolve_config
from diffopt.optim import inner_rule_names

TINY = ["--iterations", "3", "--meta_batch_size", "2", "--hidden", "8", "--progress", "False"]


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("diffopt: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def trained_once(tmp_path_factory):
    """One tiny trained run for the whole module (training it for each test cost 27 trainings)."""
    run = tmp_path_factory.mktemp("runs") / "maml"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["train", *TINY, "--run_dir", str(run)])
    assert code == 0 and "run folder" in out.getvalue()
    return run


@pytest.fixture
def trained_run(trained_once, tmp_path_factory):
    """This test's own copy of the module's trained run (tests write evaluations into it),
    outside ``tmp_path``, which some tests check stays empty."""
    return Path(shutil.copytree(trained_once, tmp_path_factory.mktemp("run") / "maml"))


def test_train_writes_run_folder(trained_run):
    config = json.loads((trained_run / "config.json").read_text())
    assert config["algorithm"] == "maml" and config["hidden"] == [8]
    metrics = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    assert [m["iteration"] for m in metrics] == [1, 2, 3]
    assert all(m["loss"] > 0 and m["seconds"] > 0 for m in metrics)
    payload = torch.load(trained_run / "checkpoint.pt", weights_only=True)
    assert payload["iteration"] == 3 and payload["config"]["hidden"] == (8,)
    assert set(payload["algorithm"]) == {"model.0.weight", "model.0.bias", "model.2.weight",
                                         "model.2.bias"}
    assert not [p for p in trained_run.iterdir() if p.name.endswith(".tmp")]


def test_same_seed_same_metrics(tmp_path, capsys, trained_run):
    again = tmp_path / "again"
    assert run_cli(capsys, "train", *TINY, "--run_dir", str(again))[0] == 0
    first = [json.loads(x)["loss"] for x in (trained_run / "metrics.jsonl").read_text().splitlines()]
    second = [json.loads(x)["loss"] for x in (again / "metrics.jsonl").read_text().splitlines()]
    assert first == second


def test_evaluate_run_folder_and_checkpoint(trained_run, capsys):
    code, out, _ = run_cli(capsys, "evaluate", str(trained_run), "--tasks", "4", "--steps", "0,2")
    assert code == 0
    assert "mse after   0 steps" in out and "mse after   2 steps" in out and "(4 tasks)" in out
    wrote = out.strip().splitlines()[-1]
    assert wrote.startswith(f"wrote {trained_run}/eval-k10-trans-")
    saved = json.loads(open(wrote.removeprefix("wrote ")).read())
    assert len(saved["scores"]["2"]) == 4 and saved["protocol"]["tasks"] == 4
    code, out2, _ = run_cli(capsys, "evaluate", str(trained_run / "checkpoint.pt"), "--tasks", "4",
                            "--steps", "0,2")
    assert code == 0 and out2 == out.removesuffix(wrote + "\n")  # same tasks, same numbers


def test_evaluations_under_two_protocols_keep_both_scores(trained_run, capsys):
    def evaluate(*extra: str) -> tuple[str, dict]:
        code, out, _ = run_cli(capsys, "evaluate", str(trained_run), "--tasks", "3", "--steps", "2",
                               "--inner_batch_size", "5", *extra)
        assert code == 0
        line = out.strip().splitlines()[-1]
        path = next(word.removesuffix(":") for word in line.split() if word.endswith((".json", ".json:")))
        return line, json.loads(open(path).read())

    line, inductive = evaluate("--transductive", "False")
    assert "-nontrans-" in line and inductive["protocol"]["transductive"] is False
    line, transductive = evaluate()
    assert "-trans-" in line and transductive["protocol"]["inner_batch_size"] == 5
    assert len(list(trained_run.glob("eval-*.json"))) == 2  # the first is still there
    line, again = evaluate("--transductive", "False")
    assert line.startswith("same protocol as ") and line.endswith(": same numbers (kept)")
    assert again == inductive and len(list(trained_run.glob("eval-*.json"))) == 2


def test_evaluate_shots_overrides_the_runs(trained_run, capsys):
    """--shots 3 on a run trained with 10: the support sets have 3 examples (the scores are the
    library's with shots=3, not those of 10), and the file and protocol say k3."""
    from diffopt.data import get_dataset
    from diffopt.evaluate import evaluate
    from diffopt.train import load_trained

    code, out, _ = run_cli(capsys, "evaluate", str(trained_run), "--tasks", "4", "--steps", "0,2",
                           "--shots", "3")
    assert code == 0
    written = out.strip().splitlines()[-1].removeprefix("wrote ")
    assert written.startswith(f"{trained_run}/eval-k3-trans-")
    saved = json.loads(open(written).read())
    assert saved["protocol"]["shots"] == 3
    _, algorithm, _ = load_trained(trained_run)
    scores = {k: evaluate(algorithm, get_dataset("sinusoid"), shots=k, test_shots=100, tasks=4,
                          steps=(0, 2)).scores[2].tolist() for k in (3, 10)}
    assert saved["scores"]["2"] == pytest.approx(scores[3], rel=1e-12)
    assert saved["scores"]["2"] != pytest.approx(scores[10], rel=1e-3)
    code, out, _ = run_cli(capsys, "evaluate", str(trained_run), "--tasks", "4", "--steps", "0,2")
    assert code == 0 and "/eval-k10-trans-" in out.strip().splitlines()[-1]  # the run's own by default


def test_evaluate_inner_batch_size_overrides_the_runs(trained_run, capsys):
    """Reptile's --eval-batch: inner steps at evaluation on mini-batches of the support set."""
    from diffopt.checkpoint import restore_module
    from diffopt.config import resolve_config
    from diffopt.data import get_dataset
    from diffopt.evaluate import evaluate
    from diffopt.runfolder import load_checkpoint
    from diffopt.train import build

    args = ["evaluate", str(trained_run), "--tasks", "4", "--steps", "2"]
    code, full, _ = run_cli(capsys, *args)
    code3, batched, _ = run_cli(capsys, *args, "--inner_batch_size", "3")
    assert code == code3 == 0 and full != batched
    payload = load_checkpoint(trained_run)
    algorithm = build(resolve_config(**{**payload["config"], "inner_batch_size": 3}))
    restore_module(algorithm, payload["algorithm"], trained_run)
    mean, ci = evaluate(algorithm, get_dataset("sinusoid"), shots=10, test_shots=100, tasks=4,
                        steps=(2,)).summary(2)
    assert f"{mean:.4f} +- {ci:.4f}" in batched


def test_init_from_another_architecture_is_one_line(trained_run, tmp_path, capsys):
    code, _, err = run_cli(capsys, "train", *TINY[:-4], "--hidden", "16", "--progress", "False",
                           "--init_from", str(trained_run), "--run_dir", str(tmp_path / "x"))
    assert_one_line_error(code, err, "another architecture", "model.0.weight")
    assert not (tmp_path / "x").exists()


def test_init_from_starts_at_the_checkpoint(trained_run, tmp_path, capsys):
    code, _, _ = run_cli(capsys, "train", *TINY, "--iterations", "1", "--meta_lr", "1e-12",
                         "--init_from", str(trained_run), "--run_dir", str(tmp_path / "x"))
    assert code == 0
    old = torch.load(trained_run / "checkpoint.pt", weights_only=True)["algorithm"]
    new = torch.load(tmp_path / "x" / "checkpoint.pt", weights_only=True)["algorithm"]
    for key in old:
        torch.testing.assert_close(new[key], old[key], rtol=0, atol=1e-9)


@pytest.mark.parametrize("argv, fragments", [
    (["--algorithm", "mamll"], ["unknown algorithm 'mamll'", ", ".join(sorted(ALGORITHMS))]),
    (["--dataset", "cifar"], ["unknown dataset 'cifar'", "sinusoid"]),
    (["--inner_optimizer", "lbfgs"], ["unknown inner optimizer",
                                        ", ".join(sorted(inner_rule_names()))]),
    (["--outer_optimizer", "lbfgs"], ["unknown outer optimizer", "adam, sgd"]),
    (["--activation", "gelu"], ["unknown activation"]),
    (["--shots", "0"], ["--shots must be a whole number >= 1; got 0"]),
    (["--shots", "-3"], ["--shots must be a whole number >= 1"]),
    (["--shots", "2.5"], ["--shots must be a whole number"]),
    (["--shots", "five"], ["--shots must be a whole number", "'five'"]),
    (["--ways", "1"], ["--ways must be a whole number >= 2"]),
    (["--ways", "5"], ["--ways applies to classification datasets"]),
    (["--iterations", "0"], ["--iterations must be a whole number >= 1"]),
    (["--inner_lr", "-0.1"], ["--inner_lr must be a finite number > 0"]),
    (["--meta_lr", "nan"], ["--meta_lr must be a finite number > 0"]),
    (["--hidden", "0,4"], ["--hidden must be a whole number >= 1"]),
    (["--num_workers", "2"], ["use --num_workers 0"]),
    (["--keep_freed_memory", "sometimes"], ["--keep_freed_memory must be True or False", "'sometimes'"]),
    (["--model", "conv4", "--hidden", "40,40"], ["--hidden for conv4 is one filter count or four"]),
    (["--dataset", "omniglot", "--shots", "10", "--test_shots", "15", "--hidden", "64"],
     ["omniglot has 20 examples per class", "(10 + 15)"]),
])
def test_bad_train_options_are_one_line_errors(argv, fragments, tmp_path, capsys):
    run_dir = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", *TINY, *argv, "--run_dir", str(run_dir))
    assert_one_line_error(code, err, *fragments)
    assert not run_dir.exists()


def test_missing_checkpoint(tmp_path, capsys):
    code, _, err = run_cli(capsys, "evaluate", str(tmp_path / "nope"))
    assert_one_line_error(code, err, "no checkpoint at", "diffopt train")


def test_corrupt_and_truncated_checkpoints(trained_run, tmp_path, capsys):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint")
    code, _, err = run_cli(capsys, "evaluate", str(garbage))
    assert_one_line_error(code, err, "is not a checkpoint (not the zip archive torch.save writes)",
                          str(garbage))
    pickled = tmp_path / "pickled.pt"
    torch.save({"format": "diffopt-checkpoint", "object": Fraction(1, 3)}, pickled)  # weights_only refuses
    code, _, err = run_cli(capsys, "evaluate", str(pickled))
    assert_one_line_error(code, err, "corrupt or truncated", "Fraction")
    assert "PyTorch 2.6" not in err  # torch's advice about weights_only is not the user's fix
    data = (trained_run / "checkpoint.pt").read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    code, _, err = run_cli(capsys, "evaluate", str(truncated))
    assert_one_line_error(code, err, "corrupt or truncated", str(truncated))


def test_foreign_and_future_checkpoints(tmp_path, capsys):
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    assert_one_line_error(*run_cli(capsys, "evaluate", str(foreign))[::2], "not a diffopt checkpoint")
    future = tmp_path / "future.pt"
    torch.save({"format": "diffopt-checkpoint", "version": 99}, future)
    assert_one_line_error(*run_cli(capsys, "evaluate", str(future))[::2], "format version 99")


def test_checkpoint_whose_weights_do_not_fit_its_config(trained_run, tmp_path, capsys):
    payload = torch.load(trained_run / "checkpoint.pt", weights_only=True)
    payload["algorithm"]["model.0.weight"] = torch.zeros(3, 1)
    bad = tmp_path / "bad.pt"
    torch.save(payload, bad)
    code, _, err = run_cli(capsys, "evaluate", str(bad))
    assert_one_line_error(code, err, "another architecture", "(3, 1) there, (8, 1) here")


def test_existing_run_is_not_overwritten(trained_run, capsys):
    before = (trained_run / "checkpoint.pt").read_bytes()
    code, _, err = run_cli(capsys, "train", *TINY, "--run_dir", str(trained_run))
    assert_one_line_error(code, err, "already holds a run")
    assert (trained_run / "checkpoint.pt").read_bytes() == before


@pytest.mark.parametrize("argv, fragment", [
    (["evaluate", "RUN", "--tasks", "1"], "--tasks must be a whole number >= 2"),
    (["evaluate", "RUN", "--steps", "-1"], "--steps must be >= 0"),
    (["compare", "--algorithms", "maml,nope", "--iterations", "1"], "unknown algorithm 'nope'"),
    (["compare", "--shots", "0"], "--shots must be a whole number >= 1"),
    (["gradcheck", "--algorithm", "reptile"], "finite differences cannot check it"),
    (["gradcheck", "--eps", "0"], "--eps must be a finite number > 0"),
    # a list is echoed as it was typed, not as the tuple fire made of it
    (["evaluate", "RUN", "--steps", "0,abc"], "--steps takes a comma-separated list of ints; got 0,abc"),
    (["train", "--inner_lr", "0.1,0.2", "--dry_run", "True"],
     "--inner_lr must be a finite number > 0; got 0.1,0.2"),
])
def test_bad_options_of_other_commands(argv, fragment, trained_run, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = [str(trained_run) if a == "RUN" else a for a in argv]
    assert_one_line_error(*run_cli(capsys, *argv)[::2], fragment)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("argv, message", [
    (["trian"], "unknown command 'trian' for diffopt; did you mean train?"),
    (["train", "--iteration", "2"],
     "unknown option --iteration for diffopt train; did you mean --iterations?"),
    (["compare", "--seed", "2"], "unknown option --seed for diffopt compare; did you mean --seeds?"),
    (["evaluate", "RUN", "--task", "5"], "unknown option --task for diffopt evaluate; did you mean --tasks?"),
    (["evaluate", "--tasks", "5"],
     "diffopt evaluate needs RUN; usage: diffopt evaluate RUN [--option VALUE ...]"),
    (["evaluate", "RUN", "--transductive", "flase"], "--transductive must be True or False; got 'flase'"),
    (["data", "prepare"], "diffopt data prepare needs NAME"),
    (["gradcheck", "--hiden", "4"], "did you mean --hidden?"),
])
def test_a_bad_command_line_stops_before_any_work(argv, message, trained_run, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in trained_run.iterdir())
    argv = [str(trained_run) if a == "RUN" else a for a in argv]
    code, out, err = run_cli(capsys, *argv, "--run_dir" if argv[0] == "train" else "--out", "made") \
        if argv[0] in ("train", "compare") else run_cli(capsys, *argv)
    assert_one_line_error(code, err, message)
    assert out == "" and list(tmp_path.iterdir()) == []
    assert sorted(p.name for p in trained_run.iterdir()) == before  # no evaluation written


def test_lower_case_booleans_are_booleans(trained_run, capsys):
    code, out, _ = run_cli(capsys, "evaluate", str(trained_run), "--tasks", "2", "--steps", "1",
                           "--transductive", "false")
    assert code == 0 and "mse after   1 step:" in out
    written = out.strip().splitlines()[-1].removeprefix("wrote ")
    assert json.loads(open(written).read())["protocol"]["tasks"] == 2


def test_compare_reads_shared_boolean_train_options_as_train_does():
    from diffopt import cli
    from diffopt.firecli import check_arguments

    for command in (cli.train_command, cli.compare_command):
        assert check_arguments(command, ["--keep_freed_memory", "false"], "x") == \
            ["--keep_freed_memory", "False"]


def test_dry_run_prints_the_resolved_options_and_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, _ = run_cli(capsys, "train", "--dataset", "omniglot", "--algorithm", "reptile", "--dry_run")
    assert code == 0 and list(tmp_path.iterdir()) == []
    resolved = json.loads(out)
    assert resolved["inner_optimizer"] == "adam_beta1_0" and resolved["inner_state"] == "persist"
    assert resolved["shots"] == 1 and resolved["model"] == "conv4"


def test_gradcheck_command_passes_and_reports(capsys):
    code, out, _ = run_cli(capsys, "gradcheck", "--inner_optimizer", "momentum", "--inner_steps", "3")
    assert code == 0
    worst = out.strip().splitlines()[-1]
    assert worst.startswith("worst: abs") and worst.endswith("PASS (rtol 1e-05)")
    assert float(worst.split()[4]) < 1e-5


def test_gradcheck_of_a_trained_run(trained_run, capsys):
    code, out, _ = run_cli(capsys, "gradcheck", "--run", str(trained_run), "--tasks", "1")
    assert code == 0 and "maml: inner sgd lr=0.01 steps=1 adapting all, hidden=(8,) relu" in out


def help_text(command: str, flag: str = "--help") -> str:
    result = subprocess.run([sys.executable, "-m", "diffopt", command, flag], capture_output=True,
                            text=True, timeout=120, env={"PAGER": "cat", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    return result.stdout


@pytest.mark.slow
def test_train_help_lists_every_option():
    text = help_text("train")
    assert text.startswith("usage: diffopt train [--option VALUE ...]") and "INFO" not in text
    for f in fields(TrainConfig):
        assert f"--{f.name}=" in text and f.metadata["help"] in text
    assert text == help_text("train", "-h")
    # an option each dataset sets shows what each resolves it to, not "None"
    per_dataset = {name: resolve_config(dataset=name) for name in ("sinusoid", "omniglot", "miniimagenet")}
    shown = ", ".join(f"{config.inner_lr} ({name})" for name, config in per_dataset.items())
    assert f"--inner_lr={shown}\n" in text and "--inner_lr=None" not in text
    assert "--dataset=sinusoid\n" in text and "--train_shots=None\n" in text  # none sets it


@pytest.mark.slow
def test_compare_help_says_where_a_shared_algorithm_applies():
    text = help_text("compare")
    assert "--algorithms=None" in text
    assert "(every configuration of a --config file that names none; else --algorithms) meta-learning" in text


@pytest.mark.slow
def test_help_piped_into_a_reader_that_stops_early_ends_quietly():
    done = subprocess.run(f"{sys.executable} -m diffopt train -h | head -1", shell=True, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.stdout.startswith("usage: diffopt train") and done.stderr == ""


@pytest.mark.slow
@pytest.mark.parametrize("command, options", [
    ("evaluate", ["run", "tasks", "steps", "shots", "test_shots", "seed", "device", "transductive",
                  "inner_batch_size", "rotations", "ensemble"]),
    ("compare", ["config", "dataset", "algorithms", "inner_optimizers", "inner_steps", "shots", "ways",
                 "seeds", "iterations", "max_seconds", "eval_tasks", "eval_steps", "eval_test_shots",
                 "eval_seed", "eval_transductive", "validate_every", "validation_tasks", "out", "progress",
                 "tensorboard"]),
    ("gradcheck", ["algorithm", "inner_optimizer", "inner_lr", "inner_options", "inner_steps", "inner_solver",
                   "inner_backtrack", "inner_checkpoint", "hidden",
                   "activation", "norm", "inner_params", "inner_proximal", "cg_steps", "vectorize", "shots",
                   "test_shots", "tasks", "seed", "eps", "rtol", "run"]),
])
def test_other_commands_help_lists_every_option(command, options):
    import inspect

    from diffopt import cli

    assert list(inspect.signature(getattr(cli, f"{command}_command")).parameters)[:len(options)] == options
    text = help_text(command)
    for option in options:
        assert f"--{option}" in text or option.upper() in text


@pytest.mark.slow
def test_console_script_error_has_no_traceback(tmp_path):
    script = __import__("pathlib").Path(sys.executable).parent / "diffopt"
    result = subprocess.run([str(script), "train", "--algorithm", "nope"], capture_output=True,
                            text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().startswith("diffopt: error: unknown algorithm 'nope'")


def run_example(script: str) -> subprocess.CompletedProcess:
    """examples/<script> with a tiny budget; it must succeed."""
    root = __import__("pathlib").Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [sys.executable, str(root / "examples" / script), "--iterations", "3",
         "--meta_batch_size", "2", "--eval_tasks", "4"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return result


@pytest.mark.slow
def test_example_script_runs():
    result = run_example("sinusoid_maml.py")
    lines = [line for line in result.stdout.splitlines() if line.startswith("MSE after")]
    assert len(lines) == 3 and lines[-1].startswith("MSE after 10 inner steps")


@pytest.mark.slow
def test_custom_rule_example_checks_and_trains_its_rule():
    result = run_example("custom_rule.py")
    check = next(line for line in result.stdout.splitlines() if line.startswith("gradcheck:"))
    assert float(check.split()[4]) < 1e-5
    alphas = next(line for line in result.stdout.splitlines() if line.startswith("learned alpha"))
    assert len(alphas.split(",")) == 6 and "0.01," not in alphas  # meta-learned away from 0.01


def test_progress_in_a_log_is_plain_lines(tmp_path, capsys):
    code, _, err = run_cli(capsys, "train", *TINY[:-2], "--progress", "True",
                           "--run_dir", str(tmp_path / "r"))
    assert code == 0
    assert "\r" not in err and "\x1b" not in err
    lines = [line for line in err.splitlines() if line.startswith("maml:")]
    assert len(lines) == 1 and "3/3" in lines[0], err  # the final state; none per iteration


def test_evaluate_says_a_step_count_diverged_instead_of_printing_nan(trained_run, capsys, monkeypatch):
    real = sys.modules["diffopt.evaluate"].evaluate

    def diverging(*args, **kwargs):
        evaluation = real(*args, **kwargs)
        evaluation.scores[2][1] = float("nan")
        return evaluation

    monkeypatch.setattr(sys.modules["diffopt.evaluate"], "evaluate", diverging)
    code, out, _ = run_cli(capsys, "evaluate", str(trained_run), "--tasks", "4", "--steps", "1,2",
                           "--seed", "5")
    assert code == 0
    assert "mse after   1 step: " in out and "mse after   2 steps: diverges on 1 of 4 tasks" in out
    assert "nan" not in out


def test_only_diffopt_warnings_are_printed_as_diffopt_notices(tmp_path):
    (tmp_path / "noisy_rule.py").write_text(  # a plug-in whose import warns, as torch.jit.script does
        "import warnings\nwarnings.warn('noisy_rule is deprecated', FutureWarning)\n\n\n"
        "def rule(params, lr, steps):\n    from diffopt.optim import SGD\n    return SGD(lr)\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "OMP_NUM_THREADS": "1"}

    def dry_run(*flags: str) -> str:
        done = subprocess.run([sys.executable, "-m", "diffopt", "train", "--hidden", "4", "--dry_run", "True",
                               *flags], env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return done.stderr

    err = dry_run("--inner_optimizer", "noisy_rule:rule")
    assert "noisy_rule.py:2: FutureWarning: noisy_rule is deprecated" in err  # Python's own format
    assert "diffopt: noisy_rule is deprecated" not in err
    err = dry_run("--inner_optimizer", "momentum")
    assert "diffopt: running the tasks of a meta-batch one by one" in err  # diffopt's own, one line
    assert "UserWarning" not in err
