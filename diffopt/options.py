"""Train options declared by the component they configure, and the checks of single values.

``diffopt.models.MODEL_OPTIONS``, ``InnerLoop.OPTIONS`` and each algorithm's ``OPTIONS`` declare
their options (type, default, help); ``diffopt.config`` assembles ``TrainConfig``, the command
line, its help and the option resolution from the declarations, and the components' checks
(``InnerLoop.check_arguments``, ``MetaAlgorithm.check_inner``, ``check_model_options``) run in
their constructors or builders and in a config's validation alike: every check is written once.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any

from diffopt.errors import DiffoptError, as_typed, unknown_name

AS_TODAY = object()
"""``Option.before``'s default: runs saved before the option existed take today's default."""


@dataclass(frozen=True)
class Option:
    """One ``diffopt train`` option (``--NAME``), declared where it is used.

    ``type``: its annotation (the command line reads booleans and lists by it); ``default``: the
    value when neither the dataset's protocol nor the user sets it; ``argument``: the keyword of
    the component's constructor it feeds (default: the option's name); ``before``: the value runs
    saved before the option existed took, where that is not today's default; ``unset``: for an
    algorithm's option, its value under every other algorithm, which refuses any other
    (``belongs``: what the option is, for that error: "--NAME is BELONGS; drop it for ...").
    """

    type: Any
    default: Any
    help: str
    argument: str | None = None
    before: Any = AS_TODAY
    unset: Any = None
    belongs: str = ""


def arguments(options: dict[str, Option], values: Any) -> dict[str, Any]:
    """The constructor keywords ``options`` declare, with ``values``' (a config's) settings."""
    return {option.argument or name: getattr(values, name) for name, option in options.items()}


def check_int(name: str, value: Any, minimum: int) -> None:
    """DiffoptError unless ``value`` is an int (not a bool) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise DiffoptError(f"--{name} must be a whole number >= {minimum}; got {as_typed(value)}")


def check_float(name: str, value: Any, *, positive: bool) -> None:
    """DiffoptError unless ``value`` is a finite real > 0 (``positive``) or >= 0."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    ok = ok and value == value and abs(value) != float("inf")
    if not ok or value < 0 or (positive and value == 0):
        bound = "> 0" if positive else ">= 0"
        raise DiffoptError(f"--{name} must be a finite number {bound}; got {as_typed(value)}")


def check_bool(name: str, value: Any) -> None:
    """DiffoptError unless ``value`` is True or False."""
    if not isinstance(value, bool):
        raise DiffoptError(f"--{name} must be True or False; got {as_typed(value)}")


def check_name(kind: str, value: Any, choices) -> None:
    """DiffoptError (naming the choices) unless ``value`` is one of ``choices``."""
    if not isinstance(value, str) or value not in choices:
        raise unknown_name(kind, value, choices)
