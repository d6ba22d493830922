"""Sinusoid regression (Finn et al. 2017) through torchmeta's ``Sinusoid`` and ``BatchMetaDataLoader``.

Amplitude in [0.1, 5], phase in [0, pi], inputs uniform in [-5, 5] (torchmeta's defaults).
"""

from __future__ import annotations

from torch.utils.data import DataLoader

from diffopt.data.torchmeta_compat import load as load_torchmeta
from diffopt.errors import DiffoptError


def sinusoid_loader(
    *, shots: int, test_shots: int, batch_size: int, num_tasks: int, seed: int, num_workers: int = 0,
    split: str = "train", root: str | None = None, start: int = 0,
) -> DataLoader:
    """Batches of ``batch_size`` Sinusoid tasks, tasks ``start`` .. ``num_tasks - 1``, in a fixed order.

    Generated data: ``split`` only selects the seed (``DatasetSpec.loader``), ``root`` is unused.
    torchmeta draws each task's inputs from one generator in turn, so starting later replays the
    draws of the tasks before ``start`` (``_skip_tasks``).

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
    _skip_tasks(dataset, start)
    return BatchMetaDataLoader(dataset, batch_size=batch_size, sampler=range(start, num_tasks),
                               shuffle=False, num_workers=0)


def _skip_tasks(dataset, count: int) -> None:
    """Advance torchmeta's ``Sinusoid`` generator past its first ``count`` tasks.

    Its draws, in order: all amplitudes and all phases (on first use), then per task
    ``uniform(-5, 5, (num_samples, 1))`` inputs (plus ``randn`` noise if ``noise_std``). One
    ``uniform`` call of ``count * num_samples`` values consumes the generator exactly as ``count``
    calls of ``num_samples`` do (tested against building the tasks).
    """
    if count == 0:
        return
    if dataset.noise_std is not None:
        for index in range(count):
            dataset[index]
        return
    dataset.amplitudes, dataset.phases  # noqa: B018 (their lazy draws come first)
    low, high = dataset._input_range
    dataset.np_random.uniform(low, high, size=count * dataset.num_samples_per_task)
