"""benchmarks/time_to_accuracy.py at a tiny budget: both implementations train side by side,
every snapshot is scored on the same tasks, and the table is written (the benchmark must not rot)."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffopt.report import write_section

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "time_to_accuracy.py"
sys.path.insert(0, str(SCRIPT.parent))  # omniglot_reference, beside it


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
                            "--tasks", "4", "--out", str(out), "--data_root", str(omniglot_root),
                            "--figure", str(tmp_path / "curves.png")],
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "| Reptile | reference |" in again.stdout
    assert (tmp_path / "curves.png").read_bytes().startswith(b"\x89PNG")
    assert "side by side" not in again.stdout  # a finished method is not run again


@pytest.mark.slow
def test_a_misspelled_option_stops_before_any_work(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--budget_minute", "1", "--out", str(tmp_path / "x")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "did you mean --budget_minutes" in done.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["cbfinn", "goal"])
def test_a_resumed_reference_run_continues_exactly(omniglot_root, tmp_path, recipe, monkeypatch):
    """The reference resumes from its last snapshot (weights, Adam, clock, task generator): two
    sittings of 2 + 2 meta-iterations end where one of 4 does, bit for bit. (The goal recipe's
    cosine follows the fraction of meta_iters done, which the sittings' meta_iters change: held
    constant here.)"""
    reference = importlib.import_module("omniglot_reference")
    monkeypatch.setattr(reference, "cosine", lambda start, final, fraction: start)
    common = dict(data_root=str(omniglot_root), budget_seconds=1e9, recipe=recipe)
    reference.train("maml", str(tmp_path / "whole"), meta_iters=4, snapshots=1, **common)
    reference.train("maml", str(tmp_path / "parts"), meta_iters=2, snapshots=1, **common)
    reference.train("maml", str(tmp_path / "parts"), meta_iters=4, snapshots=2, resume=True, **common)
    whole = torch.load(tmp_path / "whole" / "snapshot-1.pt", weights_only=True)
    parts = torch.load(tmp_path / "parts" / "snapshot-2.pt", weights_only=True)
    assert (whole["iteration"], parts["iteration"], parts["recipe"]) == (4, 4, recipe)
    for name, value in whole["model"].items():
        assert torch.equal(value, parts["model"][name]), name
    assert whole["meta_adam"]["step"] == parts["meta_adam"]["step"] == 4
    log = (tmp_path / "parts" / "log.jsonl").read_text().splitlines()
    logged = [json.loads(line)["iteration"] for line in log]
    assert logged == [1, 2, 3, 4]


@pytest.mark.parametrize("threads", [1, 2])
def test_one_thread_runs_side_by_side_more_run_one_after_the_other(tmp_path, threads):
    """Side by side each has a core; with more threads each has the machine, so the second waits."""
    tta = importlib.import_module("time_to_accuracy")
    probe = ("import os, sys, time; start = time.time(); time.sleep(0.4); "
             "print(os.environ['OMP_NUM_THREADS'], start, time.time())")
    tta._run_all({name: [sys.executable, "-c", probe] for name in ("a", "b")}, tmp_path, "train", threads)
    (a_threads, a_start, a_end), (b_threads, b_start, b_end) = (
        (tmp_path / f"{name}-train.log").read_text().split() for name in ("a", "b"))
    assert a_threads == b_threads == str(threads)
    assert (float(b_start) >= float(a_end)) == (threads > 1)


def test_one_after_the_other_stops_at_the_first_failure(tmp_path):
    tta = importlib.import_module("time_to_accuracy")
    with pytest.raises(SystemExit, match="a train failed: broken"):
        tta._run_all({"a": [sys.executable, "-c", "raise SystemExit('broken')"],
                      "b": [sys.executable, "-c", "print('ran')"]}, tmp_path, "train", 2)
    assert not (tmp_path / "b-train.log").exists()
