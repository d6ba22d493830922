"""Sinusoid regression (Finn et al. 2017) through torchmeta's ``Sinusoid`` and ``BatchMetaDataLoader``.

Amplitude in [0.1, 5], phase in [0, pi], inputs uniform in [-5, 5] (torchmeta's defaults).
"""

from __future__ import annotations

from torch.utils.data import DataLoader

from diffopt.data.torchmeta_compat import load as load_torchmeta
from diffopt.errors import DiffoptError


def sinusoid_loader(
    *, shots: int, test_shots: int, batch_size: int, num_tasks: int, seed: int, num_workers: int = 0,
    split: str = "train", root: str | None = None,
) -> DataLoader:
    """Batches of ``batch_size`` Sinusoid tasks, ``num_tasks`` in all, in a fixed order.

    Generated data: ``split`` only selects the seed (``DatasetSpec.loader``), ``root`` is unused.

    Each batch is ``{'train': (x, y), 'test': (x, y)}`` with x, y of shape [B, shots or
    test_shots, 1] (float64). The task stream depends on ``seed`` alone.
    """
    if num_workers != 0:
        raise DiffoptError(
            "sinusoid draws every task from one random stream that loader workers would each "
            "repeat; use --num_workers 0"
        )
    load_torchmeta()
    from torchmeta.toy.helpers import sinusoid
    from torchmeta.utils.data import BatchMetaDataLoader

    dataset = sinusoid(
        shots=shots, test_shots=test_shots, shuffle=False, seed=seed, num_tasks=num_tasks
    )
    return BatchMetaDataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
