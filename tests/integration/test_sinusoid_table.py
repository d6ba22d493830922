"""examples/sinusoid_table.py at toy size: the result script runs through diffopt.compare and
writes its section (it had drifted from compare's signature once, untested)."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "sinusoid_table.py"


@pytest.mark.slow
def test_sinusoid_table_script_writes_every_methods_row(tmp_path, capsys, compare_in_process):
    main = runpy.run_path(str(EXAMPLE))["main"]
    results = tmp_path / "RESULTS.md"
    results.write_text("# Results\n")
    main(iterations=2, methods=("maml", "anil", "boil", "reptile", "imaml"), shots=(5,), eval_tasks=4,
         out=str(tmp_path / "runs"), results=str(results))
    text = results.read_text()
    assert "<!-- sinusoid-table:start -->" in text
    for method in ("maml", "anil", "boil", "reptile", "imaml"):
        assert f"| {method} | 5 |" in text, method
    assert "| maml | 5 | 0.69 +- 0.07 |" in text  # the paper's number beside diffopt's


def test_sinusoid_table_tabulates_finished_runs_without_training(tmp_path, compare_in_process):
    """--train False: the runs already in --out make the table, the others are named, none is
    trained (a long reproduction written up while its last runs still train)."""
    main = runpy.run_path(str(EXAMPLE))["main"]
    results, out = tmp_path / "RESULTS.md", tmp_path / "runs"
    results.write_text("# Results\n")
    main(iterations=2, methods=("boil",), shots=(5,), eval_tasks=4, out=str(out), results="none")
    main(iterations=2, methods=("boil", "imaml"), shots=(5, 10), eval_tasks=4, out=str(out),
         results=str(results), section="family", train=False)
    text = results.read_text()
    assert "| boil | 5 |" in text and "| imaml |" not in text
    assert "- not finished yet: imaml K=5" in text and "- not finished yet: boil K=10" in text
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["boil-k5-seed0"]
