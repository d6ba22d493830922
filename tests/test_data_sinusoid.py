"""diffopt.data.sinusoid: the meta-batch-at-a-time Sinusoid stream is torchmeta's, bit for bit."""

from __future__ import annotations

import pytest
import torch

from diffopt.data.sinusoid import SinusoidBatches, sinusoid_loader


@pytest.mark.parametrize("seed, shots, test_shots, batch_size, num_tasks, start", [
    (0, 5, 5, 25, 100, 0), (3, 10, 7, 4, 30, 0), (11, 1, 100, 7, 40, 9), (5, 2, 3, 25, 60, 50)])
def test_batched_sinusoid_tasks_are_torchmetas(seed, shots, test_shots, batch_size, num_tasks, start):
    kwargs = dict(shots=shots, test_shots=test_shots, batch_size=batch_size, num_tasks=num_tasks, seed=seed,
                  start=start)
    batched = sinusoid_loader(**kwargs)
    reference = sinusoid_loader(**kwargs, batched=False)  # torchmeta's BatchMetaDataLoader
    assert isinstance(batched, SinusoidBatches) and len(batched) == len(reference)
    torch.manual_seed(1)
    ours = iter(batched)
    ours_rng = torch.get_rng_state()  # a DataLoader draws when its iterator is made
    torch.manual_seed(1)
    theirs = iter(reference)
    assert torch.equal(ours_rng, torch.get_rng_state())  # the global stream is left as a DataLoader leaves it
    ours, theirs = list(ours), list(theirs)
    assert len(ours) == len(theirs) == -(-(num_tasks - start) // batch_size)
    for a, b in zip(ours, theirs, strict=True):
        for split in ("train", "test"):
            for mine, torchmetas in zip(a[split], b[split], strict=True):
                assert mine.dtype == torchmetas.dtype == torch.float64
                assert mine.shape == torchmetas.shape
                assert torch.equal(mine, torchmetas)
    assert ours[0]["train"][0].shape[1:] == (shots, 1) and ours[0]["test"][0].shape[1:] == (test_shots, 1)
