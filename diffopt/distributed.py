"""Several processes (torchrun): each meta-batch sharded over ranks, meta-gradients averaged.

Under ``torchrun`` (``WORLD_SIZE`` > 1) ``init`` joins the process group: gloo on CPU, nccl on
CUDA (device ``cuda`` then means GPU ``LOCAL_RANK``). Every rank draws the same meta-batch of B
tasks from the same loader and takes its contiguous shard (``shard``); after the backward,
``all_reduce_grads`` averages the meta-gradient over ranks, which is the mean over all B tasks
when the shards are equal. DistributedDataParallel is not used: its hooks do not support the
double backward of MAML.

Collectives give up after ``DIFFOPT_DIST_TIMEOUT`` seconds (default 300), so a lost peer ends
the run with a one-line ``DiffoptError`` instead of a hang. In a single process (no torchrun)
every function here is a no-op or the identity.
"""

from __future__ import annotations

import os
import socket
import sys
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn

from diffopt.data.episode import Episode
from diffopt.errors import DiffoptError

TIMEOUT_VARIABLE = "DIFFOPT_DIST_TIMEOUT"
DEFAULT_TIMEOUT_SECONDS = 300.0

T = TypeVar("T")


def launched_world_size() -> int:
    """The number of processes torchrun launched (``WORLD_SIZE``; 1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def timeout_seconds() -> float:
    """Seconds a collective waits for the other ranks (``DIFFOPT_DIST_TIMEOUT``)."""
    value = os.environ.get(TIMEOUT_VARIABLE, str(DEFAULT_TIMEOUT_SECONDS))
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise DiffoptError(f"{TIMEOUT_VARIABLE} must be a number of seconds > 0; got {value!r}")
    return seconds


def init(device: str) -> None:
    """Join the process group torchrun set up (gloo on CPU, nccl on CUDA); no-op in a single
    process or when already joined."""
    if launched_world_size() <= 1 or dist.is_initialized():
        return
    timeout = timedelta(seconds=timeout_seconds())
    target = torch.device(device)
    if target.type == "cuda" and target.index is None:  # "cuda": this rank's GPU
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    with _collective("joining the process group"):
        dist.init_process_group("nccl" if target.type == "cuda" else "gloo", timeout=timeout)


def shutdown() -> None:
    """Leave the process group, if joined."""
    if dist.is_initialized():
        dist.destroy_process_group()


def world_size() -> int:
    """Processes in the joined group (1 when not distributed)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    """This process's rank in the joined group (0 when not distributed)."""
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    """Whether this process is rank 0, the one that writes the run folder and prints."""
    return rank() == 0


def check_meta_batch(meta_batch_size: int) -> None:
    """DiffoptError unless the meta-batch splits evenly over the launched processes (needs no
    process group, so it fails before anything is created)."""
    processes = launched_world_size()
    if meta_batch_size % processes:
        raise DiffoptError(f"--meta_batch_size {meta_batch_size} does not split evenly over "
                           f"{processes} processes; give a multiple of {processes}")


def shard(episode: Episode) -> Episode:
    """This rank's contiguous share of the episode's B tasks: rank r of n takes tasks
    ``r * B // n`` .. ``(r + 1) * B // n - 1`` (B / n each when n divides B; possibly none)."""
    size, index = world_size(), rank()
    if size == 1:
        return episode
    start, stop = index * len(episode) // size, (index + 1) * len(episode) // size
    return Episode(episode.support_x[start:stop], episode.support_y[start:stop],
                   episode.query_x[start:stop], episode.query_y[start:stop])


def all_reduce_grads(module: nn.Module) -> None:
    """Average over ranks, in place, the ``.grad`` of every parameter of ``module`` (the initial
    weights and any learned inner rule's parameters) and its floating-point buffers (running
    statistics, which each rank updated on its own tasks)."""
    if world_size() == 1:
        return
    tensors = [p.grad for p in module.parameters() if p.grad is not None]
    tensors += [b for b in module.buffers() if b.is_floating_point()]
    groups: dict[tuple, list[torch.Tensor]] = defaultdict(list)
    for tensor in tensors:
        groups[tensor.dtype, tensor.device].append(tensor)
    for group in groups.values():  # one collective per dtype and device
        flat = torch.cat([t.reshape(-1) for t in group])
        with _collective("averaging the meta-gradient"):
            dist.all_reduce(flat)
        flat /= world_size()
        for tensor, part in zip(group, flat.split([t.numel() for t in group]), strict=True):
            tensor.copy_(part.view_as(tensor))


def mean_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """``values`` (e.g. the logged loss) averaged over ranks, the same on every rank."""
    if world_size() == 1:
        return dict(values)
    tensor = torch.tensor(list(values.values()), dtype=torch.float64, device=_collective_device())
    with _collective("averaging the metrics"):
        dist.all_reduce(tensor)
    return dict(zip(values, (tensor / world_size()).tolist(), strict=True))


def broadcast_module(module: nn.Module) -> None:
    """Copy rank 0's parameters and buffers into every rank's ``module``."""
    if world_size() == 1:
        return
    with torch.no_grad(), _collective("broadcasting the parameters"):
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor, src=0)


def gather_shards(pieces: list[T]) -> list[list[T]]:
    """Every rank's ``pieces`` (picklable, one per batch, as many on every rank), batch by batch:
    ``[[rank 0's piece i, rank 1's piece i, ...] for each i]``, which with ``shard``'s
    contiguous shards is task order. Single process: ``[[piece] for piece in pieces]``."""
    if world_size() == 1:
        return [[piece] for piece in pieces]
    everyone: list[list[T] | None] = [None] * world_size()
    with _collective("gathering the scores"):
        dist.all_gather_object(everyone, pieces)
    return [list(batch) for batch in zip(*everyone, strict=True)]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for a one-machine rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def local_launcher(processes: int) -> list[str]:
    """The command prefix (torchrun, as ``python -m torch.distributed.run``) that starts
    ``processes`` ranks on this machine, meeting on a free local port; append ``-m diffopt ...``."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
            "--master_addr", "127.0.0.1", "--master_port", str(free_port())]


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@contextmanager
def _collective(what: str) -> Iterator[None]:
    """A failed or timed-out collective as a one-line DiffoptError."""
    try:
        yield
    except RuntimeError as error:  # torch.distributed.DistError and its kinds are RuntimeErrors
        lines = str(error).strip().splitlines()
        reason = lines[0][:200] if lines else type(error).__name__
        raise DiffoptError(
            f"rank {os.environ.get('RANK', '?')} of {launched_world_size()}: {what} failed: another "
            f"process died or did not answer within {TIMEOUT_VARIABLE}={timeout_seconds():g} s "
            f"({reason})") from None
