"""A comparison's runs and its report, each in a process of its own, forked from one that
imported torch, diffopt and torchmeta once.

A fresh interpreter per run spends seconds on those imports (torchmeta pulls in torchvision),
more than a small sinusoid run trains; a child forked from this server starts in milliseconds and
is otherwise as fresh: its memory is its own, a crash ends it alone, and every random state it
uses is seeded by its run. The server computes nothing itself, because a process forked after
torch has run parallel (OpenMP) work may hang in its own.

Protocol: one JSON line per call on stdin, ``{"call": "module:function", "argument": text,
"log": path}``; the child runs ``function(argument)``, its stdout and stderr going to ``log``;
one JSON line back on stdout when it ends, ``{"returncode": n}``. End of stdin ends the server.
"""

from __future__ import annotations

import importlib
import json
import os
import select
import subprocess
import sys
import traceback
from pathlib import Path
from typing import NoReturn

from diffopt.errors import DiffoptError


def serve() -> None:
    """Fork a child per request line until stdin closes (torchmeta imported first)."""
    from diffopt.data.torchmeta_compat import load

    load()
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(request)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}), flush=True)


def _child(request: dict) -> NoReturn:
    code = 1
    try:
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)  # the server's requests are not the child's
        log = os.open(request["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        module, name = request["call"].split(":")
        getattr(importlib.import_module(module), name)(request["argument"])
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
    ...     server.start("diffopt.compare.runs:run_job", job, Path("run.log"))
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

    def start(self, call: str, argument: str, log: Path) -> None:
        """Begin ``call`` (``module:function``) of ``argument`` in a child, its output appended
        to ``log``."""
        if self._process is None:
            self._process = subprocess.Popen([sys.executable, "-m", "diffopt.compare"],
                                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self._process.stdin.write(json.dumps({"call": call, "argument": argument, "log": str(log)}) + "\n")
        self._process.stdin.flush()

    def wait(self, timeout: float | None = None) -> int | None:
        """The child's exit status once it has ended, else None after ``timeout`` seconds (None:
        however long it takes)."""
        ready, _, _ = select.select([self._process.stdout], [], [], timeout)
        if not ready:
            return None
        line = self._process.stdout.readline()
        if not line:
            raise DiffoptError(f"diffopt's run server stopped (exit status {self._process.wait()}); "
                               "its error is printed above")
        return json.loads(line)["returncode"]
