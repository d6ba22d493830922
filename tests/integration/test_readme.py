"""README's claims that code can check: its Python block runs and does what it says; every
`diffopt ...` command it shows is a valid command line (no misspelled option)."""

from __future__ import annotations

import inspect
import math
import re
import shlex
from pathlib import Path

import pytest

from diffopt import cli
from diffopt.compare import shared_train_options
from diffopt.firecli import check_arguments

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def commands() -> list[list[str]]:
    """Every `diffopt ...` command of README's bash blocks, continuation lines joined."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words[:1] == ["diffopt"]:
                found.append(words[1:])
    return found


def test_readme_shows_the_commands_it_should():
    verbs = {words[0] for words in commands()}
    assert {"train", "evaluate", "compare", "gradcheck", "data"} <= verbs


@pytest.mark.parametrize("words", commands(), ids=lambda words: " ".join(words)[:60])
def test_every_readme_command_line_is_valid(words, tmp_path, monkeypatch, capsys):
    verb, args = words[0], words[1:]
    monkeypatch.chdir(tmp_path)
    if verb == "train" and "--resume" not in args:
        assert cli.main(["train", *args, "--dry_run"]) == 0, capsys.readouterr().err
        assert not any(tmp_path.iterdir())  # a dry run creates nothing
        return
    if verb == "data":
        verb, args = "data prepare", args[1:]
        function = cli.COMMANDS["data"]["prepare"]
    else:
        function = cli.COMMANDS[verb]
    check_arguments(function, args, f"diffopt {verb}")  # raises on an unknown option
    if verb == "compare":
        own = set(inspect.signature(function).parameters)
        options = {a.lstrip("-").split("=")[0] for a in args if a.startswith("--")}
        assert options - own <= set(shared_train_options())


def test_readme_python_block_runs():
    (block,) = re.findall(r"```python\n(.*?)```", README, re.S)
    printed = []
    exec(compile(block, "README.md", "exec"), {"print": printed.append})
    (mean, ci95), max_rel_error = printed
    assert 0 <= mean <= 1 and ci95 > 0 and not math.isnan(mean)
    assert max_rel_error < 1e-5


def _numbers(text: str) -> list[str]:
    return re.findall(r"\d+\.\d+|diverges on \d+ of \d+", text)


def _agree(promised: str, printed: str) -> bool:
    """README's numbers in ``promised`` against the first as many in ``printed``, to 1%: a
    run on another CPU rounds differently (mean squared errors to 1% of themselves, divergence
    counts to 1% of the tasks)."""
    said, seen = _numbers(promised), _numbers(printed)
    if len(seen) < len(said):
        return False
    for a, b in zip(said, seen[:len(said)], strict=True):
        if a.startswith("diverges") != b.startswith("diverges"):
            return False
        if a.startswith("diverges"):
            (n, total), (m, other) = (map(int, re.findall(r"\d+", x)) for x in (a, b))
            if total != other or abs(n - m) > total / 100:
                return False
        elif abs(float(a) - float(b)) > float(a) / 100:
            return False
    return True


@pytest.mark.slow
def test_the_own_rule_commands_print_the_numbers_readme_promises(tmp_path):
    """The three commands of "Your own rule", run as README says (in examples/), print what its
    "What to expect" paragraph and table say: the scores to 1% (``_agree``), gradcheck's
    rounding errors to within a factor of 10 (the last digits of either vary with the CPU)."""
    import os
    import shutil
    import subprocess
    import sys

    shutil.copy(Path(__file__).resolve().parents[2] / "examples" / "custom_rule.py", tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(tmp_path)}
    section = README.split("## Your own rule", 1)[1].split("\n## ", 1)[0]
    block = re.findall(r"```bash\n(.*?)```", section, re.S)[0]  # the three commands
    printed = {}
    for line in block.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        if words[:1] == ["diffopt"]:
            quiet = [] if words[1] == "gradcheck" else ["--progress", "False"]  # no bars in the output
            done = subprocess.run([sys.executable, "-m", "diffopt", *words[1:], *quiet], cwd=tmp_path,
                                  env=env, capture_output=True, text=True, timeout=900)
            assert done.returncode == 0, done.stderr
            printed[words[1]] = done.stdout
    worst = re.search(r"`gradcheck` ends `(.*?)`", section.replace("\n", " ")).group(1)
    got = " ".join(printed["gradcheck"].split("\n")[-2].split())
    pattern = r"worst: abs (\S+) rel (\S+) (\w+ \(rtol \S+\))"
    (*promised, verdict), (*measured, measured_verdict) = (re.fullmatch(pattern, line).groups()
                                                          for line in (worst, got))
    assert measured_verdict == verdict, got
    for said, seen in zip(promised, measured, strict=True):  # rounding: its digits vary with the CPU
        assert float(said) / 10 < float(seen) < float(said) * 10, got
    (table,) = re.findall(r"```\n(\| configuration.*?)```", section, re.S)
    for row in table.strip().splitlines()[1:]:
        label = row.split("|")[1].strip()
        (got,) = [line for line in printed["compare"].splitlines() if line.startswith(f"| {label} |")]
        assert _agree(row, got), (row, got)
    evaluated = " ".join(printed["evaluate"].split())
    for claim in re.findall(r"`(mse after .*?)`", section.replace("\n", " ")):
        label = claim.split(":")[0] + ":"
        assert label in evaluated and _agree(claim, evaluated.split(label, 1)[1]), (claim, evaluated)
