"""Plug-ins: ``module:attribute`` wherever a rule, model or algorithm name is taken.

``--inner_optimizer my_rules:ScaledSignSGD``, ``--model my_models:wide_mlp``,
``--algorithm my_algorithms:MyMAML``: the name is imported when a run is built, so it is what
config.json, checkpoints and reports record, and evaluate, resume and compare's child processes
(fresh interpreters) rebuild the run from it. ``module`` is a dotted module name importable from
the current folder or ``sys.path``, ``attribute`` a (dotted) name in it.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from typing import Any

from diffopt.errors import PluginError


def is_plugin(name: object) -> bool:
    """Whether ``name`` is a ``module:attribute`` import path."""
    return isinstance(name, str) and ":" in name


def load_plugin(path: str, kind: str) -> Any:
    """The object ``module:attribute`` names; a one-line ``DiffoptError`` naming the module if the
    import fails. ``kind`` (e.g. "inner optimizer") words the error."""
    module_name, _, attribute = path.partition(":")
    if not module_name or not attribute:
        raise PluginError(f"{kind} {path!r}: write module:attribute, e.g. my_rules:ScaledSignSGD")
    if module_name.endswith(".py"):
        raise PluginError(f"{kind} {path!r}: name the module, not its file: "
                          f"{module_name.removesuffix('.py').replace('/', '.')}:{attribute}")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())  # the console script does not put the current folder there
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as error:
        if _findable(module_name):  # found, but an import inside it failed
            raise PluginError(f"{kind} {path!r}: importing module {module_name!r} failed: "
                              f"{type(error).__name__}: {error}") from None
        raise PluginError(f"{kind} {path!r}: cannot import module {module_name!r} ({error}); run "
                          "from the folder holding it or add that folder to PYTHONPATH") from None
    except Exception as error:  # noqa: BLE001 - the user's module failed while importing
        raise PluginError(f"{kind} {path!r}: importing module {module_name!r} failed: "
                          f"{type(error).__name__}: {error}") from None
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise PluginError(f"{kind} {path!r}: module {module_name!r} has no attribute {attribute!r}")
        target = getattr(target, part)
    return target


def _findable(module_name: str) -> bool:
    """Whether ``module_name`` exists on the path (its own import aside)."""
    try:
        return importlib.util.find_spec(module_name) is not None
    except (ImportError, ValueError):  # a parent package that does not import
        return False
