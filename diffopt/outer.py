"""The outer step: the optimizer of the meta-parameters, its learning-rate schedule over the run
and the clipping of the meta-gradient, with the ``diffopt train`` options that configure them."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, ClassVar

import torch

from diffopt.errors import DiffoptError
from diffopt.options import Option, check_float, check_name

OUTER_OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}
SCHEDULES = ("constant", "linear", "cosine")


def _schedule_default(values: dict[str, Any]) -> str:
    """An annealing schedule once a final learning rate is given: linear; else constant."""
    return "constant" if values["meta_lr_final"] is None else "linear"


class OuterStep:
    """How the meta-parameters move after a meta-gradient: torch's ``optimizer`` (adam, sgd) at
    learning rate ``lr``, annealed over the run by ``schedule`` (constant; linear or cosine,
    MAML++, to ``final_lr``), the meta-gradient first clamped to [-``max_grad_value``,
    ``max_grad_value``] element by element, then clipped to norm ``max_grad_norm``.

    Example::

        outer = OuterStep("adam", lr=1e-3, final_lr=1e-5, schedule="cosine", max_grad_norm=10.0)
        optimizer = outer.optimizer(model.parameters())
        for progress in (0.0, 0.5, 1.0):    # how far along the run
            outer.set_learning_rate(optimizer, progress)
            ...                             # meta-gradient into .grad
            norm = outer.clip(model.parameters())
            optimizer.step()
    """

    OPTIONS: ClassVar[dict[str, Option]] = {
        "outer_optimizer": Option(str | None, "adam", f"outer optimizer: {', '.join(OUTER_OPTIMIZERS)}",
                                  argument="optimizer"),
        "meta_lr": Option(float | None, 1e-3, "outer learning rate (Reptile: the step eps)", argument="lr"),
        "meta_lr_final": Option(float | None, None, "final outer learning rate of a linear or cosine "
                                "schedule", argument="final_lr"),
        "meta_lr_schedule": Option(
            str | None, _schedule_default, f"outer learning-rate schedule: {', '.join(SCHEDULES)} "
            "(default: linear if --meta_lr_final is set, else constant)", argument="schedule"),
        "max_grad_value": Option(
            float | None, None, "clamp each element of the meta-gradient (of the mean query loss) to "
            "[-V, V] before the outer step (cbfinn/maml and MAML++ on Mini-ImageNet: 10 on their "
            "losses' scales; default: that for maml and fomaml on Mini-ImageNet, else none)",
            before=None),
        "max_grad_norm": Option(float | None, None, "clip the meta-gradient (all meta-parameters "
                                "together) to this norm before the outer step"),
    }
    """The ``diffopt train`` options of the outer step, each feeding the constructor keyword
    ``argument`` (default: its name)."""

    @staticmethod
    def check_arguments(optimizer: str, lr: float, final_lr: float | None, schedule: str,
                        max_grad_value: float | None, max_grad_norm: float | None) -> None:
        """DiffoptError naming the first bad constructor argument (as its option): the checks of
        ``__init__``, which a config's validation runs before building anything."""
        check_name("outer optimizer", optimizer, OUTER_OPTIMIZERS)
        check_name("learning-rate schedule", schedule, SCHEDULES)
        check_float("meta_lr", lr, positive=True)
        if final_lr is not None:
            check_float("meta_lr_final", final_lr, positive=False)
        for name, value in (("max_grad_norm", max_grad_norm), ("max_grad_value", max_grad_value)):
            if value is not None:
                check_float(name, value, positive=True)
        if schedule != "constant" and final_lr is None:
            raise DiffoptError(f"--meta_lr_schedule {schedule} needs --meta_lr_final")

    def __init__(self, optimizer: str = "adam", lr: float = 1e-3, final_lr: float | None = None,
                 schedule: str = "constant", max_grad_value: float | None = None,
                 max_grad_norm: float | None = None) -> None:
        self.check_arguments(optimizer, lr, final_lr, schedule, max_grad_value, max_grad_norm)
        self.optimizer_name, self.lr, self.schedule = optimizer, lr, schedule
        self.final_lr = lr if final_lr is None else final_lr
        self.max_grad_value, self.max_grad_norm = max_grad_value, max_grad_norm

    def optimizer(self, parameters: Iterable[torch.Tensor]) -> torch.optim.Optimizer:
        """The outer optimizer of ``parameters``, at the schedule's initial learning rate."""
        return OUTER_OPTIMIZERS[self.optimizer_name](parameters, lr=self.lr)

    def learning_rate(self, progress: float) -> float:
        """The learning rate after ``progress`` (0 .. 1, clamped) of the run."""
        progress = min(max(progress, 0.0), 1.0)
        if self.schedule == "linear":
            return self.lr + progress * (self.final_lr - self.lr)
        if self.schedule == "cosine":
            return self.final_lr + (self.lr - self.final_lr) * (1 + math.cos(math.pi * progress)) / 2
        return self.lr

    def set_learning_rate(self, optimizer: torch.optim.Optimizer, progress: float) -> None:
        """Give every group of ``optimizer`` the learning rate after ``progress`` of the run."""
        for group in optimizer.param_groups:
            group["lr"] = self.learning_rate(progress)

    def clip(self, parameters: Iterable[torch.Tensor]) -> torch.Tensor:
        """Clamp, then clip, the gradients of ``parameters`` in place; their norm before the
        norm clipping (non-finite if a gradient is)."""
        parameters = list(parameters)
        if self.max_grad_value is not None:
            torch.nn.utils.clip_grad_value_(parameters, self.max_grad_value)
        return torch.nn.utils.clip_grad_norm_(parameters, self.max_grad_norm or math.inf)
