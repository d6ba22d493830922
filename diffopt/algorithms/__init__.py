"""Meta-learning algorithms, each one short module behind the ``MetaAlgorithm`` interface."""

from __future__ import annotations

from torch import nn

from diffopt.algorithms.base import MetaAlgorithm, accumulate_grad
from diffopt.algorithms.fomaml import FOMAML
from diffopt.algorithms.maml import MAML
from diffopt.algorithms.pretrain import Pretrain
from diffopt.algorithms.reptile import Reptile
from diffopt.errors import unknown_name
from diffopt.inner import InnerLoop, LossFn

__all__ = ["ALGORITHMS", "FOMAML", "MAML", "MetaAlgorithm", "Pretrain", "Reptile",
           "accumulate_grad", "build_algorithm"]

ALGORITHMS: dict[str, type[MetaAlgorithm]] = {cls.name: cls for cls in (MAML, FOMAML, Reptile, Pretrain)}


def build_algorithm(name: str, model: nn.Module, inner: InnerLoop, loss_fn: LossFn,
                    vectorize: str = "auto", task_threads: int = 1) -> MetaAlgorithm:
    """The registered algorithm ``name`` around ``model`` (``vectorize``, ``task_threads``: see
    MetaAlgorithm)."""
    if name not in ALGORITHMS:
        raise unknown_name("algorithm", name, ALGORITHMS)
    return ALGORITHMS[name](model, inner, loss_fn, vectorize=vectorize, task_threads=task_threads)
