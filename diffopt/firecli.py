"""``fire`` with the command line checked first.

fire calls the function, then complains about arguments it could not consume, so a misspelled
``--option`` would run the whole job with defaults. ``fire_checked`` checks every command name,
``--option``, required argument and boolean value against the function's signature before fire
runs anything, and answers ``-h`` / ``--help`` with a plain help text of its own (the function's
docstring and defaults; no pager, no cut-off type names).
"""

from __future__ import annotations

import difflib
import inspect
import re
import sys
import typing
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import fire

from diffopt.errors import DiffoptError

Component = Callable | Mapping[str, Any]
HELP_FLAGS = ("-h", "--help")
_FLAG = re.compile(r"^--|^-[a-zA-Z]")  # fire's: a leading hyphen that does not start a number
_BOOLEAN_WORDS = {"true": "True", "false": "False", "yes": "True", "no": "False"}


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


def _is_boolean(annotation: Any) -> bool:
    if isinstance(annotation, str):
        return re.fullmatch(r"bool(\s*\|\s*None)?|Optional\[bool\]", annotation) is not None
    return annotation is bool or bool in typing.get_args(annotation)


def _select(component: Component, argv: list[str], name: str) -> tuple[Callable | Mapping, list[str], str]:
    """Follow command names down ``component``: (what they name, the rest of argv, its name)."""
    while isinstance(component, Mapping) and argv and not argv[0].startswith("-"):
        if argv[0] not in component:
            raise DiffoptError(f"unknown command {argv[0]!r} for {name}{suggestion(argv[0], component)}")
        component, name, argv = component[argv[0]], f"{name} {argv[0]}", argv[1:]
    return component, argv, name


def check_arguments(function: Callable, argv: Sequence[str], name: str) -> list[str]:
    """``argv`` for ``function`` with boolean words normalised (``false`` -> ``False``), or a
    ``DiffoptError`` naming the fix for an unknown ``--option``, a missing required argument or
    an argument too many."""
    parameters = inspect.signature(function).parameters
    known = option_names(function)
    positional = [p for p in parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    args, given, loose = list(argv), set(), []
    index = 0
    while index < len(args):
        arg = args[index]
        if arg == "--":
            break
        if not _FLAG.match(arg):
            loose.append(arg)
            index += 1
            continue
        key, has_value = arg.lstrip("-").split("=", 1)[0].replace("-", "_"), "=" in arg
        takes_next = not has_value and index + 1 < len(args) and not _FLAG.match(args[index + 1])
        if known is not None and key not in known:
            if key.startswith("no") and key[2:] in known and not takes_next:
                key = key[2:]
            else:
                raise DiffoptError(f"unknown option --{key} for {name}{suggestion(key, known, '--')}")
        given.add(key)
        value_at = index if has_value else index + 1 if takes_next else None
        if key in parameters and _is_boolean(parameters[key].annotation) and value_at is not None:
            raw = args[value_at].split("=", 1)[1] if has_value else args[value_at]
            word = _BOOLEAN_WORDS.get(raw.lower())
            if word is None and raw not in ("True", "False"):
                raise DiffoptError(f"--{key} must be True or False; got {raw!r}")
            fixed = word or raw
            args[value_at] = f"--{key}={fixed}" if has_value else fixed
        index += 2 if takes_next else 1
    free = [p for p in positional if p.name not in given]
    if len(loose) > len(free) and not any(p.kind is p.VAR_POSITIONAL for p in parameters.values()):
        raise DiffoptError(f"unexpected argument {loose[len(free)]!r} for {name}; see {name} --help")
    for parameter in free[len(loose):]:
        if parameter.default is inspect.Parameter.empty:
            raise DiffoptError(f"{name} needs {parameter.name.upper()}; usage: {usage(function, name)}")
    for parameter in parameters.values():
        if parameter.kind is parameter.KEYWORD_ONLY and parameter.default is inspect.Parameter.empty \
                and parameter.name not in given:
            raise DiffoptError(f"{name} needs --{parameter.name}; see {name} --help")
    return args


def usage(function: Callable, name: str) -> str:
    """``name ARG [--option VALUE ...]``."""
    required = [p.name.upper() for p in inspect.signature(function).parameters.values()
                if p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_ONLY,
                                                                       p.POSITIONAL_OR_KEYWORD)]
    return " ".join([name, *required, "[--option VALUE ...]"])


def _argument_help(doc: str) -> tuple[str, dict[str, str]]:
    """(the docstring before ``Args:``, argument -> its description) of a Google-style docstring."""
    head, _, args = inspect.cleandoc(doc or "").partition("\nArgs:\n")
    described: dict[str, str] = {}
    current = None
    for line in args.splitlines():
        match = re.match(r"^\s{0,8}(\w+): (.*)$", line)
        if match and (current is None or len(line) - len(line.lstrip()) <= 4):
            current = match.group(1)
            described[current] = match.group(2).strip()
        elif current is not None and line.strip():
            described[current] += " " + line.strip()
    return head.strip(), described


def help_text(component: Component, name: str) -> str:
    """The help of a command (usage, summary, every option with its default) or of a group."""
    if isinstance(component, Mapping):
        width = max(map(len, component))
        lines = [f"usage: {name} COMMAND [--option VALUE ...]   ({name} COMMAND --help)", "", "commands:"]
        for command, target in component.items():
            summary = ("commands: " + ", ".join(target) if isinstance(target, Mapping)
                       else (inspect.getdoc(target) or "").split("\n", 1)[0])
            lines.append(f"  {command:<{width}}  {summary}")
        return "\n".join(lines)
    summary, described = _argument_help(inspect.getdoc(component) or "")
    lines = [f"usage: {usage(component, name)}", "", summary, "", "options:"]
    for parameter in inspect.signature(component).parameters.values():
        if parameter.kind in (parameter.VAR_KEYWORD, parameter.VAR_POSITIONAL):
            continue
        if parameter.default is inspect.Parameter.empty:
            flag = parameter.name.upper()
        else:
            flag = f"--{parameter.name}={shown(parameter.default)}"
        lines.append(f"  {flag}")
        if parameter.name in described:
            lines.append(f"      {described[parameter.name]}")
    return "\n".join(lines)


def shown(value: Any) -> str:
    """A value as written on a command line: lists and tuples comma-separated."""
    return ",".join(map(str, value)) if isinstance(value, list | tuple) else str(value)


def fire_checked(component: Component, argv: Sequence[str] | None = None,
                 name: str | None = None) -> Any:
    """``fire.Fire(component)`` once the command line is checked; help is printed, not paged.
    A bad command line exits with status 2 and one line ``NAME: error: ...`` on stderr."""
    args = list(sys.argv[1:] if argv is None else argv)
    name = name or sys.argv[0].rsplit("/", 1)[-1]
    try:
        return run_checked(component, args, name)
    except DiffoptError as error:
        print(f"{name}: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


def run_checked(component: Component, argv: Sequence[str], name: str) -> Any:
    """Check ``argv`` (``DiffoptError`` if it is bad), print help if asked, else call through fire."""
    target, rest, command = _select(component, list(argv), name)
    if any(arg in HELP_FLAGS for arg in rest):
        print(help_text(target, command))
        return None
    if isinstance(target, Mapping):
        if not rest:  # no command: the help, on stderr, and a failing status
            print(help_text(target, command), file=sys.stderr)
        raise DiffoptError(f"{command} takes a command first: {', '.join(target)}")
    return fire.Fire(target, command=check_arguments(target, rest, command), name=command)
