"""Meta-learning algorithms, each one short module behind the ``MetaAlgorithm`` interface."""

from __future__ import annotations

from torch import nn

from diffopt.algorithms.anil import ANIL, BOIL
from diffopt.algorithms.base import ALGORITHMS, MetaAlgorithm, accumulate_grad
from diffopt.algorithms.fomaml import FOMAML
from diffopt.algorithms.imaml import IMAML
from diffopt.algorithms.maml import MAML
from diffopt.algorithms.pretrain import Pretrain
from diffopt.algorithms.reptile import Reptile
from diffopt.errors import DiffoptError, unknown_name
from diffopt.inner import InnerLoop, LossFn
from diffopt.plugins import is_plugin, load_plugin

__all__ = ["ALGORITHMS", "ANIL", "BOIL", "FOMAML", "IMAML", "MAML", "MetaAlgorithm", "Pretrain", "Reptile",
           "accumulate_grad", "algorithm_class", "build_algorithm"]

ALGORITHMS.update({cls.name: cls for cls in (MAML, FOMAML, Reptile, Pretrain, ANIL, BOIL, IMAML)})


def algorithm_class(name: object) -> type[MetaAlgorithm]:
    """The class ``name`` names: a registered algorithm or a ``module:attribute`` subclass of
    ``MetaAlgorithm``."""
    if is_plugin(name):
        cls = load_plugin(name, "algorithm")
        if not (isinstance(cls, type) and issubclass(cls, MetaAlgorithm)):
            raise DiffoptError(f"algorithm {name!r} is not a subclass of diffopt.MetaAlgorithm")
        return cls
    if not isinstance(name, str) or name not in ALGORITHMS:
        raise unknown_name("algorithm", name, ALGORITHMS, "my_algorithms:MyMAML")
    return ALGORITHMS[name]


def build_algorithm(name: str, model: nn.Module, inner: InnerLoop, loss_fn: LossFn,
                    vectorize: str = "auto", task_threads: int = 1, **options) -> MetaAlgorithm:
    """The algorithm ``name`` (registered or ``module:attribute``) around ``model``
    (``vectorize``, ``task_threads``: see MetaAlgorithm; ``options``: the algorithm's own
    constructor arguments, e.g. imaml's ``cg_steps``)."""
    return algorithm_class(name)(model, inner, loss_fn, vectorize=vectorize, task_threads=task_threads,
                                 **options)
