"""benchmarks/time_to_accuracy.py at a tiny budget: both implementations train side by side,
every snapshot is scored on the same tasks, and the table is written (the benchmark must not rot)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from diffopt.report import write_section

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "time_to_accuracy.py"


@pytest.mark.slow
def test_time_to_accuracy_runs_both_implementations_on_the_same_tasks(omniglot_root, tmp_path):
    out, report = tmp_path / "tta", tmp_path / "BENCHMARKS.md"
    write_section(report, "other", "Other", "kept")
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--budget_minutes", "0.1", "--methods", "reptile,fomaml",
         "--tasks", "4", "--curve_tasks", "2", "--snapshots", "2", "--out", str(out),
         "--data_root", str(omniglot_root), "--write", str(report)],
        capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:] + done.stdout[-2000:]
    for method in ("reptile", "fomaml"):
        result = json.loads((out / method / "result.json").read_text())
        for name in ("diffopt", "reference"):
            curve = result[name]["curve"]
            assert len(curve) >= 2 and curve[-1]["tasks"] == 4 and curve[0]["tasks"] == 2
            assert [p["train_seconds"] for p in curve] == sorted(p["train_seconds"] for p in curve)
            assert curve[-1]["train_seconds"] >= 6 and result[name]["iterations"] >= 1
            assert 0 <= result[name]["accuracy"] <= 1 and result[name]["seconds_per_iteration"] > 0
    text = report.read_text()
    assert "kept" in text and "| Reptile | diffopt |" in text and "| first-order MAML | reference |" in text
    again = subprocess.run([sys.executable, str(SCRIPT), "--budget_minutes", "0.1", "--methods", "reptile",
                            "--tasks", "4", "--out", str(out), "--data_root", str(omniglot_root)],
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "| Reptile | reference |" in again.stdout
    assert "side by side" not in again.stdout  # a finished method is not run again


@pytest.mark.slow
def test_a_misspelled_option_stops_before_any_work(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--budget_minute", "1", "--out", str(tmp_path / "x")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "did you mean --budget_minutes" in done.stderr
    assert not (tmp_path / "x").exists()
