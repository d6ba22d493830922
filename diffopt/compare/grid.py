"""A comparison's grid: the grid file's schema and defaults, and its expansion into labelled
configurations (every run is scored by one ``diffopt.evaluate.EvaluationProtocol``)."""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

from diffopt.config import TrainConfig
from diffopt.errors import DiffoptError
from diffopt.evaluate import EVAL_SEED
from diffopt.firecli import suggestion

GRID_KEYS = ("dataset", "configs", "common", "algorithms", "inner_optimizers", "inner_steps", "shots",
             "ways", "seeds", "iterations", "max_seconds", "eval_tasks", "eval_steps", "eval_test_shots",
             "eval_seed", "eval_transductive", "validate_every", "validation_tasks")
"""What a grid file may set (the same names as ``diffopt compare``'s options, and ``common``:
train options every configuration takes unless it sets them itself)."""


GRID_DEFAULTS: dict[str, Any] = dict(
    dataset="sinusoid", algorithms=("maml", "fomaml", "reptile"), shots=(5, 10), seeds=1, iterations=1000,
    eval_tasks=500, eval_steps=(0, 1, 10), eval_seed=EVAL_SEED, eval_transductive=True, validation_tasks=100)
"""What a comparison takes where neither the command line nor the grid file says (eval_test_shots:
the dataset's; validate_every: 20 points per run)."""


PER_RUN_OPTIONS = ("run_dir", "seed", "progress")
"""Train options a comparison sets per run itself."""



def shared_train_options() -> list[str]:
    """The ``diffopt train`` options a comparison applies to every configuration: all but those
    ``diffopt compare`` has under the same name and ``PER_RUN_OPTIONS``."""
    own = set(GRID_KEYS) | set(PER_RUN_OPTIONS)
    return [f.name for f in fields(TrainConfig) if f.name not in own]



def _check_train_keys(options: Mapping[str, Any], where: str, allowed: Sequence[str]) -> None:
    for key in options:
        if key not in allowed:
            raise DiffoptError(f"unknown train option {key!r} in {where}{suggestion(str(key), allowed)}")



def load_grid_file(path: str | Path) -> dict[str, Any]:
    """A comparison grid from a YAML or JSON file: ``configs`` (label -> train options) and any
    of ``GRID_KEYS``."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise DiffoptError(f"no grid file at {path}")
    try:
        grid = yaml.safe_load(path.read_text())  # JSON is YAML
    except yaml.YAMLError as error:
        raise DiffoptError(f"{path} is not valid YAML or JSON ({str(error).splitlines()[0]})") from None
    if not isinstance(grid, dict):
        raise DiffoptError(f"{path} must hold a mapping of options, e.g. configs: {{maml: {{}}}}")
    unknown = sorted(set(grid) - set(GRID_KEYS))
    if unknown:
        raise DiffoptError(f"unknown key {unknown[0]!r} in {path}; choose from {', '.join(GRID_KEYS)}")
    configs = grid.get("configs", {})
    if not isinstance(configs, dict) or not all(isinstance(v, dict | None) for v in configs.values()):
        raise DiffoptError(f"'configs' in {path} must map labels to train options, e.g. "
                           "lslr: {algorithm: maml, inner_optimizer: lslr}")
    train_options = [f.name for f in fields(TrainConfig) if f.name not in PER_RUN_OPTIONS]
    for label, flags in configs.items():
        _check_train_keys(flags or {}, f"{path}, configs.{label}", train_options)
    if configs:
        grid["configs"] = {str(label): dict(flags or {}) for label, flags in configs.items()}
        products = sorted({"algorithms", "inner_optimizers", "inner_steps"} & set(grid))
        if products:
            raise DiffoptError(f"{path} lists its configs, which {products[0]!r} would replace: set "
                               f"it inside each configuration (e.g. {{algorithm: maml, inner_steps: 5}})")
    common = grid.get("common", {})
    if not isinstance(common, dict):
        raise DiffoptError(f"'common' in {path} must map train options to values, e.g. meta_batch_size: 4")
    _check_train_keys(common, f"{path}, common", shared_train_options())
    return grid



def with_shared_options(configs: Mapping[str, Mapping[str, Any]], common: Mapping[str, Any],
                        given: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Every configuration with the grid file's ``common`` options under its own, and the command
    line's ``given`` ones over both; DiffoptError where a configuration sets a given one itself."""
    merged = {}
    for label, flags in configs.items():
        clash = sorted(set(flags) & set(given))
        if clash:
            meant = difflib.get_close_matches(clash[0], [k for k in GRID_KEYS if k != clash[0]], 1)
            hint = f" (did you mean compare's --{meant[0]}?)" if meant else ""
            raise DiffoptError(f"--{clash[0]} is set for every configuration and by configuration "
                               f"{label!r} too; drop one{hint}")
        merged[label] = {**common, **flags, **given}
    return merged



def product_configs(algorithms: Sequence[str], inner_optimizers: Sequence[str] | None = None,
                    inner_steps: Sequence[int] | None = None,
                    skipped: dict[str, str] | None = None) -> dict[str, dict[str, Any]]:
    """Every algorithm x inner rule x inner steps that is well defined, labelled by what varies
    (first-order MAML, Reptile and the pre-trained baseline skip learned rules: ``skipped``, if
    given, receives each left-out pair's label and the reason)."""
    from diffopt.algorithms import algorithm_class
    from diffopt.optim import INNER_OPTIMIZERS

    configs = {}
    for algorithm in algorithms:
        for rule in inner_optimizers or (None,):
            if rule is not None and rule not in INNER_OPTIMIZERS \
                    and not algorithm_class(algorithm).learns_update_rule:
                if skipped is not None:
                    skipped[f"{algorithm}+{rule}"] = (f"{algorithm} does not meta-learn an inner "
                                                      "rule's parameters")
                continue
            for steps in inner_steps or (None,):
                flags: dict[str, Any] = {"algorithm": algorithm}
                label = [algorithm]
                if rule is not None:
                    flags["inner_optimizer"] = rule
                    if len(inner_optimizers) > 1:
                        label.append(rule)
                if steps is not None:
                    flags["inner_steps"] = steps
                    if len(inner_steps) > 1:
                        label.append(f"{steps}steps")
                configs["+".join(label)] = flags
    return configs



def run_name(label: str, shots: int, seed: int) -> str:
    return f"{label}-k{shots}-seed{seed}"

