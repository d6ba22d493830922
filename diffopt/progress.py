"""Progress bars: tqdm on a terminal; plain lines (no carriage returns or escape codes) in a log."""

from __future__ import annotations

import sys
from typing import Any

from tqdm import tqdm


class LineProgress(tqdm):
    """tqdm that writes each refresh as one plain line, at most every ``mininterval`` seconds:
    none before the first unit is done, and the last state when it closes."""

    def display(self, msg: str | None = None, pos: int | None = None) -> None:
        if msg == "" or (msg is None and self.n == 0):  # tqdm clearing its line; nothing done yet
            return None
        self.fp.write((self.__str__() if msg is None else msg) + "\n")
        self.fp.flush()
        return None

    def close(self) -> None:
        if not self.disable and self.n > 0 and self.last_print_n != self.n:
            self.display()
        super().close()


def progress_bar(*, disable: bool = False, **kwargs: Any) -> tqdm:
    """A tqdm bar on stderr: drawn in place on a terminal, otherwise ``LineProgress`` lines every
    30 seconds (``kwargs`` as tqdm's)."""
    if sys.stderr.isatty():
        return tqdm(disable=disable, dynamic_ncols=True, **kwargs)
    kwargs = {key: value for key, value in kwargs.items() if key not in ("position", "leave")}
    return LineProgress(disable=disable, mininterval=30.0, leave=False, ascii=True, **kwargs)
