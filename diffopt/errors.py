"""The one exception type diffopt raises for bad input; the CLI prints it as a single line."""

from __future__ import annotations

from collections.abc import Iterable


class DiffoptError(Exception):
    """Bad input (an option, a name, a file) described in one line that names the fix."""


def unknown_name(kind: str, name: object, choices: Iterable[str]) -> DiffoptError:
    """Error for a name that is not registered, listing the valid ones."""
    return DiffoptError(f"unknown {kind} {name!r}; choose one of: {', '.join(sorted(choices))}")
