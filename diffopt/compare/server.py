"""The runs of a comparison, each in a process of its own, forked from one that imported torch,
diffopt and torchmeta once.

A fresh interpreter per run spends seconds on those imports (torchmeta pulls in torchvision),
more than a small sinusoid run trains; a child forked from this server starts in milliseconds and
is otherwise as fresh: its memory is its own, a crash ends it alone, and every random state it
uses is seeded by its run. The server computes nothing itself, because a process forked after
torch has run parallel (OpenMP) work may hang in its own.

Protocol: one JSON line per run on stdin, ``{"job": ..., "log": path}`` (the job as
``run_job`` reads it); the child's stdout and stderr go to ``log``; one JSON line back on stdout
when it ends, ``{"returncode": n}``. End of stdin ends the server.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from diffopt.errors import DiffoptError


def serve(run_job: Callable[[str], object]) -> None:
    """Fork a child per request line until stdin closes; a child calls ``run_job(job)``."""
    from diffopt.data.torchmeta_compat import load

    load()
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(run_job, request)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}), flush=True)


def _child(run_job: Callable[[str], object], request: dict) -> NoReturn:
    code = 1
    try:
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)  # the server's requests are not the run's
        log = os.open(request["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        run_job(request["job"])
        code = 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


class RunServer:
    """The parent's side: starts the server on the first ``start`` and stops it on exit.

    >>> with RunServer() as server:  # doctest: +SKIP
    ...     server.start(job, Path("run.log"))
    ...     while (code := server.wait(0.5)) is None:
    ...         pass  # show progress
    """

    def __init__(self) -> None:
        self._process: subprocess.Popen | None = None

    def __enter__(self) -> RunServer:
        return self

    def __exit__(self, *exc) -> None:
        if self._process is not None:
            self._process.stdin.close()
            self._process.wait()

    def start(self, job: str, log: Path) -> None:
        """Begin a run of ``job``, its output appended to ``log``."""
        if self._process is None:
            self._process = subprocess.Popen([sys.executable, "-m", "diffopt.compare"],
                                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self._process.stdin.write(json.dumps({"job": job, "log": str(log)}) + "\n")
        self._process.stdin.flush()

    def wait(self, timeout: float) -> int | None:
        """The run's exit status once it has ended, else None after ``timeout`` seconds."""
        ready, _, _ = select.select([self._process.stdout], [], [], timeout)
        if not ready:
            return None
        line = self._process.stdout.readline()
        if not line:
            raise DiffoptError(f"diffopt's run server stopped (exit status {self._process.wait()}); "
                               "its error is printed above")
        return json.loads(line)["returncode"]
