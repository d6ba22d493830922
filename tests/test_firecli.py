"""fire_checked: unknown commands and options stop before the function runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from diffopt.firecli import fire_checked

ROOT = Path(__file__).resolve().parents[1]


def test_a_misspelled_option_exits_before_the_function_runs():
    calls = []

    def train(budget: float = 1.0, table: str = "methods") -> None:
        calls.append((budget, table))

    with pytest.raises(SystemExit, match=r"^job: unknown option --tabel; did you mean --table\?$"):
        fire_checked(train, ["--budget", "2", "--tabel", "goal"], name="job")
    with pytest.raises(SystemExit, match="unknown option --zzz; choose from --budget, --table"):
        fire_checked(train, ["--zzz=3"], name="job")
    assert calls == []
    fire_checked(train, ["--budget", "2", "--table=goal"], name="job")
    assert calls == [(2, "goal")]


def test_commands_are_checked_and_their_own_options_too():
    calls = []
    commands = {"train": lambda out="x": calls.append(("train", out)),
                "report": lambda tasks=600: calls.append(("report", tasks))}
    with pytest.raises(SystemExit, match=r"unknown command 'trian'; did you mean train\?"):
        fire_checked(commands, ["trian"], name="job")
    with pytest.raises(SystemExit, match=r"unknown option --tasks; did you mean --out\?|choose from --out"):
        fire_checked(commands, ["train", "--tasks", "3"], name="job")
    assert calls == []
    fire_checked(commands, ["report", "--tasks", "3"], name="job")
    assert calls == [("report", 3)]


def test_functions_taking_any_option_are_left_to_fire():
    seen = {}

    def anything(**options):
        seen.update(options)

    fire_checked(anything, ["--whatever", "1"], name="job")
    assert seen == {"whatever": 1}


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
