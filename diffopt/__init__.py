"""diffopt: meta-learning by unrolling differentiable inner-loop optimizers with higher.

Data flows loader -> ``Episode`` -> ``MetaAlgorithm.meta_gradient`` -> outer step; evaluation
adapts with the same inner loop; ``check_meta_gradient`` verifies meta-gradients against
finite differences.

torchmeta (and through it torchvision, seconds of imports) is imported when a loader first needs
it, with the fixes it needs on current torch applied first: code of your own that imports
torchmeta calls ``diffopt.data.torchmeta_compat.load()`` first, which returns the module.
"""

from diffopt.algorithms import ALGORITHMS, ANIL, BOIL, FOMAML, IMAML, MAML, MetaAlgorithm, Reptile
from diffopt.data import DATASETS, Episode, Task, get_dataset
from diffopt.errors import DiffoptError
from diffopt.evaluate import evaluate, mean_ci95
from diffopt.gradcheck import GradcheckResult, check_meta_gradient
from diffopt.inner import InnerLoop
from diffopt.optim import register_rule

__version__ = "0.1.0"

__all__ = [
    "ALGORITHMS", "ANIL", "BOIL", "DATASETS", "FOMAML", "IMAML", "MAML", "DiffoptError", "Episode",
    "GradcheckResult", "InnerLoop", "MetaAlgorithm", "Reptile", "Task", "check_meta_gradient", "evaluate",
    "get_dataset", "mean_ci95", "register_rule",
]
