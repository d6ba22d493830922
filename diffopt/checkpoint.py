"""The checkpoint format: written atomically, read with ``weights_only=True``.

A checkpoint is a dict of plain values and tensors::

    {"format": "diffopt-checkpoint", "version": 1, "config": TrainConfig.to_dict(),
     "iteration": int, "algorithm": state_dict, "outer_optimizer": state_dict,
     "random_state": dict, "train_seconds": float, "step_memory_mb": float, "skipped_steps": int}
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffopt.atomic import write_atomically
from diffopt.errors import DiffoptError

FORMAT = "diffopt-checkpoint"
VERSION = 1


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Atomically save ``payload`` (format and version tags are added)."""
    write_atomically(path, lambda s: torch.save({"format": FORMAT, "version": VERSION, **payload}, s))


def read_checkpoint(path: Path, what: str = "a checkpoint file") -> dict[str, Any]:
    """Load and sanity-check the checkpoint file ``path``; DiffoptError in one line if it cannot
    be used (``what``: what the caller should pass instead, for the error)."""
    if not path.is_file():
        raise DiffoptError(f"no checkpoint at {path}: pass {what}")
    with open(path, "rb") as stream:
        if stream.read(4) != b"PK\x03\x04":  # torch.save writes a zip archive
            raise DiffoptError(f"{path} is not a checkpoint (not the zip archive torch.save writes): "
                               f"pass {what}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated zip, unpickling refused, ...
        raise DiffoptError(f"checkpoint {path} is corrupt or truncated ({_reason(error)})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise DiffoptError(f"{path} is not a diffopt checkpoint")
    if payload.get("version") != VERSION:
        raise DiffoptError(
            f"checkpoint {path} has format version {payload.get('version')!r}; this diffopt "
            f"reads version {VERSION}: use the diffopt release that wrote it"
        )
    return payload


def _reason(error: Exception) -> str:
    """The informative line of a failed ``torch.load``: the unpickler's own complaint where
    weights_only refused something (torch's advice about weights_only around it is not ours)."""
    text = str(error).strip()
    for line in text.splitlines():
        if "WeightsUnpickler error:" in line:  # its first sentence: the rest advises torch users
            return line.split("WeightsUnpickler error:", 1)[1].split(". ")[0].strip()[:160]
    return (text.splitlines()[0] if text else type(error).__name__)[:160]


def restore_module(module: nn.Module, state: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """``module.load_state_dict(state)``, with a one-line error if the architectures differ."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or mismatched:
        if mismatched:
            key = mismatched[0]
            detail = f"{key} has shape {tuple(state[key].shape)} there, {tuple(own[key].shape)} here"
        else:
            detail = f"missing {missing[:2]}" if missing else f"unexpected {unexpected[:2]}"
        raise DiffoptError(
            f"checkpoint {path} is for another architecture ({detail}); "
            "use the same model options it was trained with"
        )
    module.load_state_dict(state)
