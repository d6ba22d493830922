"""Progress bars in a log: plain lines, no carriage returns or escape codes, no empty 0% line."""

from __future__ import annotations

from diffopt.progress import LineProgress, progress_bar


def test_a_bar_in_a_log_writes_its_final_state_as_one_plain_line(capsys):
    bar = progress_bar(total=5, desc="evaluate")  # stderr is captured: not a terminal
    assert isinstance(bar, LineProgress)
    for _ in range(5):
        bar.update()
    bar.close()
    err = capsys.readouterr().err
    assert "\r" not in err and "\x1b" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("evaluate: 100%") and "5/5" in lines[0]


def test_a_bar_that_did_nothing_writes_nothing(capsys):
    progress_bar(total=5, desc="evaluate").close()
    assert capsys.readouterr().err == ""
