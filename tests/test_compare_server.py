"""diffopt.compare.server: each run in a child forked from one server process, its output in its
log, a failure its own (the next run still runs), a server that dies a one-line error."""

from __future__ import annotations

import json
import os
import signal

import pytest

import diffopt.compare.runs as compare_module
from diffopt.compare.server import RunServer
from diffopt.config import resolve_config
from diffopt.errors import DiffoptError
from diffopt.evaluate import EvaluationProtocol

PROTOCOL = EvaluationProtocol(tasks=3, steps=(0, 1), test_shots=5)


def job(tmp_path, name: str, **flags) -> tuple[str, object]:
    config = resolve_config(dataset="sinusoid", hidden=(4,), iterations=2, run_dir=str(tmp_path / name),
                            progress=False, **flags)
    return json.dumps({"config": config.to_dict(), "protocol": PROTOCOL.settings()}), config


def finish(server: RunServer) -> int:
    while (code := server.wait(timeout=1.0)) is None:
        pass
    return code


def test_runs_are_children_of_one_server_and_a_failure_is_the_runs_alone(tmp_path):
    with RunServer() as server:
        bad, _ = job(tmp_path, "diverges", inner_lr=1e30, max_bad_steps=0)
        server.start("diffopt.compare.runs:run_job", bad, tmp_path / "diverges.log")
        assert finish(server) != 0
        assert "non-finite" in (tmp_path / "diverges.log").read_text()
        good, config = job(tmp_path, "fine")
        server.start("diffopt.compare.runs:run_job", good, tmp_path / "fine.log")
        assert finish(server) == 0  # the server outlived the failed run
        record = json.loads((tmp_path / "fine" / "evaluation.json").read_text())
        assert record["result"]["iterations"] == 2
        assert record["config"] == json.loads(json.dumps(config.to_dict()))
        server_pid = server._process.pid
    assert server._process.returncode == 0  # stopped when the comparison ended
    assert server_pid != os.getpid()


def test_a_failed_run_is_a_one_line_error_naming_its_log(tmp_path):
    _, config = job(tmp_path, "diverges", inner_lr=1e30, max_bad_steps=0)
    log = tmp_path / "logs" / "diverges.log"
    with RunServer() as server, pytest.raises(DiffoptError) as error:
        compare_module._run_in_subprocess(config, PROTOCOL, log, False, server)
    message = str(error.value)
    assert "\n" not in message and message.startswith("run diverges failed (") and str(log) in message


def test_a_server_that_dies_is_an_error_not_a_hang(tmp_path):
    good, _ = job(tmp_path, "fine")
    with RunServer() as server:
        server.start("diffopt.compare.runs:run_job", good, tmp_path / "fine.log")
        os.kill(server._process.pid, signal.SIGKILL)
        with pytest.raises(DiffoptError, match="run server stopped"):
            finish(server)


def test_the_report_is_written_by_a_child_and_its_failure_is_one_line(tmp_path):
    """The report child writes report.md from results.json; without one, a one-line error."""
    with RunServer() as server, pytest.raises(DiffoptError) as error:
        compare_module._report(tmp_path, [], server)
    message = str(error.value)
    assert "\n" not in message and "report.md failed (" in message and "results.json" in message
    assert not (tmp_path / "report.md").exists()
