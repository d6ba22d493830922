"""fire_checked: unknown commands and options stop before the function runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from diffopt.firecli import fire_checked

ROOT = Path(__file__).resolve().parents[2]


def refused(capsys, component, argv) -> str:
    """The one stderr line of a command line ``fire_checked`` refuses (exit status 2)."""
    with pytest.raises(SystemExit) as stop:
        fire_checked(component, argv, name="job")
    assert stop.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("job: error: "), lines
    return lines[0].removeprefix("job: error: ")


def test_a_misspelled_option_exits_before_the_function_runs(capsys):
    calls = []

    def train(budget: float = 1.0, table: str = "methods") -> None:
        calls.append((budget, table))

    assert refused(capsys, train, ["--budget", "2", "--tabel", "goal"]) == \
        "unknown option --tabel for job; did you mean --table?"
    assert "choose from --budget, --table" in refused(capsys, train, ["--zzz=3"])
    assert calls == []
    fire_checked(train, ["--budget", "2", "--table=goal"], name="job")
    assert calls == [(2, "goal")]


def test_commands_are_checked_and_their_own_options_too(capsys):
    calls = []
    commands = {"train": lambda out="x": calls.append(("train", out)),
                "report": lambda tasks=600: calls.append(("report", tasks)),
                "data": {"prepare": lambda name, root="data": calls.append(("prepare", name, root))}}
    assert refused(capsys, commands, ["trian"]) == "unknown command 'trian' for job; did you mean train?"
    assert "unknown option --tasks for job train" in refused(capsys, commands, ["train", "--tasks", "3"])
    assert "did you mean prepare?" in refused(capsys, commands, ["data", "prepaer"])
    assert refused(capsys, commands, ["data", "prepare", "--root", "r"]) == \
        "job data prepare needs NAME; usage: job data prepare NAME [--option VALUE ...]"
    assert "unexpected argument 'c'" in refused(capsys, commands, ["data", "prepare", "a", "b", "c"])
    assert calls == []
    fire_checked(commands, ["report", "--tasks", "3"], name="job")
    fire_checked(commands, ["data", "prepare", "omniglot", "--root=r"], name="job")
    assert calls == [("report", 3), ("prepare", "omniglot", "r")]


def test_boolean_words_in_any_case_and_no_prefix(capsys):
    seen = []

    def evaluate(run: str, transductive: bool = True, tasks: int = 5) -> None:
        seen.append((run, transductive, tasks))

    for argv in (["r", "--transductive", "false"], ["r", "--transductive=FALSE"], ["r", "--notransductive"],
                 ["--transductive", "no", "r"]):
        fire_checked(evaluate, argv, name="job")
    fire_checked(evaluate, ["r", "--transductive", "--tasks", "2"], name="job")
    assert seen == [("r", False, 5)] * 4 + [("r", True, 2)]
    assert refused(capsys, evaluate, ["r", "--transductive", "flase"]) == \
        "--transductive must be True or False; got 'flase'"


def test_help_is_plain_text_with_defaults_and_h_is_help(capsys):
    def gradcheck(hidden: tuple = (8, 8), rtol: float = 1e-5) -> None:
        """Check gradients.

        Args:
            hidden: hidden layer widths
                of the MLP
            rtol: pass threshold
        """
        raise AssertionError("help must not run the command")

    for flag in ("-h", "--help"):
        fire_checked({"gradcheck": gradcheck}, ["gradcheck", flag], name="job")
        text = capsys.readouterr().out
        assert text.splitlines()[0] == "usage: job gradcheck [--option VALUE ...]"
        assert "  --hidden=8,8\n      hidden layer widths of the MLP\n" in text
        assert "  --rtol=1e-05\n      pass threshold" in text
    with pytest.raises(SystemExit) as stopped:  # no command: help on stderr, a failing status
        fire_checked({"gradcheck": gradcheck}, [], name="job")
    captured = capsys.readouterr()
    assert stopped.value.code == 2 and captured.out == ""
    assert "  gradcheck  Check gradients." in captured.err
    assert captured.err.rstrip().endswith("job: error: job takes a command first: gradcheck")


def test_functions_taking_any_option_are_left_to_fire():
    seen = {}

    def anything(**options):
        seen.update(options)

    fire_checked(anything, ["--whatever", "1"], name="job")
    assert seen == {"whatever": 1}


@pytest.mark.slow
@pytest.mark.parametrize("script, args", [
    ("examples/omniglot_table.py", ["train", "--budgett", "1"]),
    ("benchmarks/time_to_accuracy.py", ["--budget_minute", "1"]),
])
def test_scripts_refuse_a_typo_before_any_work(script, args, tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / script), *args, "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode != 0
    assert "unknown option --budget" in done.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "out").exists()
