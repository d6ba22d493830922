"""The one exception type diffopt raises for bad input; the CLI prints it as a single line."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

_PACKAGE = str(Path(__file__).resolve().parent)


class DiffoptError(Exception):
    """Bad input (an option, a name, a file) described in one line that names the fix."""


class PluginError(DiffoptError):
    """A ``module:attribute`` plug-in that cannot be loaded (``diffopt.plugins``)."""


def from_diffopt(filename: str) -> bool:
    """Whether a warning's ``filename`` is a diffopt module's (not torch's, not a plug-in's)."""
    return str(Path(filename).resolve()).startswith(_PACKAGE)


def as_typed(value: object) -> str:
    """``value`` as a command line spells it, for errors: a list as ``0,abc`` (fire reads
    ``--x 0,abc`` as a tuple), anything else as its repr."""
    if isinstance(value, (tuple, list)):
        return ",".join(map(str, value))
    return repr(value)


def unknown_name(kind: str, name: object, choices: Iterable[str], plugin_example: str = "") -> DiffoptError:
    """Error for a name that is not registered, listing the valid ones; ``plugin_example``, where
    the option also takes a ``module:attribute`` plug-in, shows that form."""
    own = f", or your own as module:attribute (e.g. {plugin_example})" if plugin_example else ""
    return DiffoptError(f"unknown {kind} {as_typed(name)}; choose one of: {', '.join(sorted(choices))}{own}")
