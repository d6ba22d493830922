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
