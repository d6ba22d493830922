"""diffopt: meta-learning by unrolling differentiable inner-loop optimizers with higher.

Data flows loader -> ``Episode`` -> ``MetaAlgorithm.meta_gradient`` -> outer step; evaluation
adapts with the same inner loop; ``check_meta_gradient`` verifies meta-gradients against
finite differences.

Importing diffopt imports torchmeta with the fixes it needs on current torch applied first
(``diffopt.data.torchmeta_compat``).
"""

from diffopt.data import torchmeta_compat as _torchmeta_compat

_torchmeta_compat.load()

from diffopt.algorithms import ALGORITHMS, ANIL, BOIL, FOMAML, IMAML, MAML, MetaAlgorithm, Reptile  # noqa: E402
from diffopt.data import DATASETS, Episode, Task, get_dataset  # noqa: E402
from diffopt.errors import DiffoptError  # noqa: E402
from diffopt.evaluate import evaluate, mean_ci95  # noqa: E402
from diffopt.gradcheck import GradcheckResult, check_meta_gradient  # noqa: E402
from diffopt.inner import InnerLoop  # noqa: E402
from diffopt.optim import register_rule  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "ALGORITHMS", "ANIL", "BOIL", "DATASETS", "FOMAML", "IMAML", "MAML", "DiffoptError", "Episode",
    "GradcheckResult", "InnerLoop", "MetaAlgorithm", "Reptile", "Task", "check_meta_gradient", "evaluate",
    "get_dataset", "mean_ci95", "register_rule",
]
