"""``fire`` with names checked first: fire calls the function, then complains about arguments it
could not consume, so a misspelled ``--option`` would run the whole job with defaults."""

from __future__ import annotations

import difflib
import inspect
import sys
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import fire


def suggestion(name: str, choices: Collection[str], prefix: str = "") -> str:
    """'; did you mean <prefix>X?' for the closest of ``choices``, else '; choose from ...'."""
    close = difflib.get_close_matches(name, list(choices), 1)
    if close:
        return f"; did you mean {prefix}{close[0]}?"
    return f"; choose from {', '.join(prefix + choice for choice in sorted(choices))}"


def option_names(function: Callable) -> set[str] | None:
    """The ``--options`` ``function`` takes, or None if it takes any (``**kwargs``)."""
    parameters = inspect.signature(function).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    return {p.name for p in parameters if p.kind is not inspect.Parameter.VAR_POSITIONAL}


def check_arguments(component: Callable | Mapping[str, Callable], argv: Sequence[str],
                    name: str) -> None:
    """SystemExit with a one-line message for an unknown command or ``--option`` in ``argv``."""
    function = component
    if isinstance(component, Mapping):
        if not argv or argv[0].startswith("-"):
            return  # fire prints the usage
        if argv[0] not in component:
            raise SystemExit(f"{name}: unknown command {argv[0]!r}{suggestion(argv[0], component)}")
        function, argv = component[argv[0]], argv[1:]
    known = option_names(function)
    if known is None:
        return
    for arg in argv:
        if arg == "--":
            break
        if not arg.startswith("--") or arg == "--help":
            continue
        option = arg[2:].split("=", 1)[0].replace("-", "_")
        if option not in known:
            raise SystemExit(f"{name}: unknown option --{option}{suggestion(option, known, '--')}")


def fire_checked(component: Callable | Mapping[str, Callable], argv: Sequence[str] | None = None,
                 name: str | None = None) -> Any:
    """``fire.Fire(component)`` once every command and ``--option`` in ``argv`` is known."""
    args = list(sys.argv[1:] if argv is None else argv)
    name = name or sys.argv[0].rsplit("/", 1)[-1]
    check_arguments(component, args, name)
    return fire.Fire(dict(component) if isinstance(component, Mapping) else component,
                     command=args, name=name)
