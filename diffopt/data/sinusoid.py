"""Sinusoid regression (Finn et al. 2017) through torchmeta's ``Sinusoid`` and ``BatchMetaDataLoader``.

Amplitude in [0.1, 5], phase in [0, pi], inputs uniform in [-5, 5] (torchmeta's defaults).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import torch

from diffopt.data.torchmeta_compat import load as load_torchmeta
from diffopt.errors import DiffoptError


def sinusoid_loader(
    *, shots: int, test_shots: int, batch_size: int, num_tasks: int, seed: int, num_workers: int = 0,
    split: str = "train", root: str | None = None, start: int = 0, batched: bool = True,
) -> Iterable[dict]:
    """Batches of ``batch_size`` Sinusoid tasks, tasks ``start`` .. ``num_tasks - 1``, in a fixed order.

    Generated data: ``split`` only selects the seed (``DatasetSpec.loader``), ``root`` is unused.
    torchmeta draws each task's inputs from one generator in turn, so starting later replays the
    draws of the tasks before ``start`` (``_skip_tasks``).

    Each batch is ``{'train': (x, y), 'test': (x, y)}`` with x, y of shape [B, shots or
    test_shots, 1] (float64). The task stream depends on ``seed`` alone. ``batched``: torchmeta's
    ``Sinusoid`` draws a meta-batch at a time (``SinusoidBatches``: the same tasks, bit for bit);
    False: torchmeta's ``BatchMetaDataLoader``, a Python object per task and per example.
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
    if batched and dataset.noise_std is None:  # (the Sinusoid itself, its splitter a transform)
        return SinusoidBatches(dataset, shots, batch_size, range(start, num_tasks))
    return BatchMetaDataLoader(dataset, batch_size=batch_size, sampler=range(start, num_tasks),
                               shuffle=False, num_workers=0)


class SinusoidBatches:
    """torchmeta's ``Sinusoid`` task stream, drawn a meta-batch at a time: its generator's
    inputs for B tasks in one ``uniform`` call (the same draws, in the same order, as B calls of one
    task each), their targets ``amplitude * sin(x - phase)`` in one array operation, the first
    ``shots`` examples of each task its support set and the rest its query set, as torchmeta's
    unshuffled ``ClassSplitter`` takes them: the batches ``BatchMetaDataLoader`` gives, bit for bit
    (tests/test_data_sinusoid.py), in microseconds rather than milliseconds."""

    def __init__(self, dataset, shots: int, batch_size: int, tasks: range) -> None:
        self.dataset = dataset
        """torchmeta's ``Sinusoid`` (as a DataLoader's ``dataset``: its amplitudes and phases)."""
        self.shots, self.batch_size, self.tasks = shots, batch_size, tasks

    def __len__(self) -> int:
        return -(-len(self.tasks) // self.batch_size)

    def __iter__(self) -> Iterator[dict]:
        # A DataLoader's iterator draws its base seed from torch's global generator when it is
        # made: drawing it here too, now, leaves every later draw (a resumed run's, a
        # validation's) where it was.
        torch.empty((), dtype=torch.int64).random_()
        return self._batches()

    def _batches(self) -> Iterator[dict]:
        sinusoid = self.dataset
        amplitudes, phases = sinusoid.amplitudes, sinusoid.phases  # lazily drawn first, as there
        low, high = sinusoid._input_range
        samples = sinusoid.num_samples_per_task
        for first in range(self.tasks.start, self.tasks.stop, self.batch_size):
            chosen = slice(first, min(first + self.batch_size, self.tasks.stop))
            x = sinusoid.np_random.uniform(low, high, size=(chosen.stop - chosen.start, samples, 1))
            y = amplitudes[chosen, None, None] * np.sin(x - phases[chosen, None, None])
            yield {"train": (_tensor(x[:, :self.shots]), _tensor(y[:, :self.shots])),
                   "test": (_tensor(x[:, self.shots:]), _tensor(y[:, self.shots:]))}


def _tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array))


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
