"""diffopt.runfolder: the run folder writes its files and reads them back; nothing else names them."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from diffopt.errors import DiffoptError
from diffopt.runfolder import CHECKPOINT_NAME, RunFolder, checkpoint_path, load_checkpoint

PACKAGE = Path(__file__).resolve().parents[1] / "diffopt"


def test_logs_written_are_read_back_and_a_cut_line_is_dropped(tmp_path):
    folder = RunFolder(tmp_path / "run")
    folder.start({"seed": 0})
    with folder.metrics_log() as log:
        for iteration in (1, 2, 3):
            log.write(json.dumps({"iteration": iteration, "train_seconds": iteration}) + "\n")
        log.write('{"iteration": 4, "lo')  # a line cut by a kill
    folder.log_validation({"iteration": 2, "accuracy": 0.5})
    assert [r["iteration"] for r in folder.metrics()] == [1, 2, 3]
    assert folder.last_metrics() is None  # the last line is cut: no progress read from it
    folder.rewind(2)
    assert [r["iteration"] for r in folder.metrics()] == [1, 2]
    assert folder.last_metrics()["train_seconds"] == 2
    assert folder.validation() == [{"iteration": 2, "accuracy": 0.5}]
    absent = RunFolder(tmp_path / "none")
    assert absent.metrics() == [] and absent.last_metrics() is None


def test_checkpoints_records_and_evaluations(tmp_path):
    folder = RunFolder(tmp_path / "run")
    folder.start({})
    assert not folder.has_checkpoint()
    folder.save({"iteration": 7})
    assert folder.has_checkpoint() and checkpoint_path(folder.path) == folder.checkpoint
    assert load_checkpoint(folder.path)["iteration"] == 7 == load_checkpoint(folder.checkpoint)["iteration"]
    folder.snapshot(9, {"iteration": 9})
    folder.snapshot(12, {"iteration": 12})
    assert [load_checkpoint(p)["iteration"] for p in folder.snapshots()] == [9, 12]
    assert folder.comparison_record() is None
    folder.write_comparison_record({"result": 1})
    assert folder.comparison_record() == {"result": 1}
    record = {"protocol": {"shots": 5, "transductive": True}, "scores": {"1": [0.5]}}
    first = folder.save_evaluation(record)
    assert folder.save_evaluation(record).endswith("same numbers (kept)")
    other = folder.save_evaluation({**record, "scores": {"1": [0.25]}})
    assert first.startswith("wrote") and other.endswith("-2.json")
    with pytest.raises(DiffoptError, match=f"its {CHECKPOINT_NAME}"):
        load_checkpoint(tmp_path / "empty")


def test_a_reader_writes_nothing(tmp_path):
    reader = RunFolder(tmp_path / "run", writer=False)
    reader.start({})
    reader.write_comparison_record({})
    assert not (tmp_path / "run").exists()


def test_no_other_module_names_a_run_file():
    """RunFolder owns the names: no other module of the package spells them in code."""
    names = re.compile(r"[\"'](checkpoint\.pt|metrics\.jsonl|validation\.jsonl|evaluation\.json|config\.json"
                       r"|snapshots|best)[\"']")
    offenders = [str(path.relative_to(PACKAGE)) for path in PACKAGE.rglob("*.py")
                 if path.name != "runfolder.py" and names.search(path.read_text())]
    assert offenders == []
