"""EDropout over several processes (``torch.distributed``): the few collective calls it makes, and none when
the job is one process.

Under DistributedDataParallel every rank holds the same weights (DDP averages the gradients), and the
evolution's random numbers are keyed by (seed, step), so every rank evolves the same trials from the same
population. What a rank computes from its own batch differs: the units' activity (the Ising energy's
fields) and a batch-dependent energy's scores (the energy loss). The controller averages those across the
ranks (:func:`average_across_ranks_`) before they are used, so every rank selects the same trials and applies
the same state; with ``check_ranks`` it verifies that at every step (:func:`check_same_on_all_ranks`).

:func:`launched` initialises the process group of a job started by ``torchrun`` (from its environment
variables RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) for ``edropout train``.
"""

from __future__ import annotations

import contextlib
import gc
import os
from datetime import timedelta
from typing import Any, Iterator, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["active", "rank", "first_line", "world_size", "unwrap", "average_across_ranks_", "sum_across_ranks_",
           "check_same_on_all_ranks", "RanksDisagree", "ProcessGroupFailure", "broadcast_from_rank0", "launched"]


class RanksDisagree(RuntimeError):
    """The ranks no longer hold the same EDropout state (raised on every rank by ``check_ranks``)."""


class ProcessGroupFailure(RuntimeError):
    """A collective call failed: another process died, stopped answering (the timeout) or could not join."""


def active() -> bool:
    """Whether this process is one of several in an initialised process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel (or DataParallel) wrappers: the network whose layers hold
    the units."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def sum_across_ranks_(tensor: Tensor) -> Tensor:
    """Replace ``tensor`` (contiguous) by its sum over the ranks, the same on every rank."""
    if active():
        dist.all_reduce(tensor)
    return tensor


def average_across_ranks_(tensor: Tensor) -> Tensor:
    """Replace ``tensor`` (contiguous, floating) by its mean over the ranks, the same on every rank."""
    if active():
        dist.all_reduce(tensor)
        tensor.div_(dist.get_world_size())
    return tensor


def check_same_on_all_ranks(parts: Sequence[Tuple[str, Tensor]], step: int) -> None:
    """Raise :class:`RanksDisagree` on every rank when one of the named int64 checksums differs between ranks.

    One all_reduce (MAX) of the checksums and their negatives: the ranks agree where max == −max(−x) = min."""
    if not active():
        return
    values = torch.cat([checksum.reshape(-1) for _, checksum in parts])
    extremes = torch.cat([values, -values])
    dist.all_reduce(extremes, op=dist.ReduceOp.MAX)
    n = values.numel()
    agree = extremes[:n] == -extremes[n:]
    start = 0
    for name, checksum in parts:
        if not bool(agree[start:start + checksum.numel()].all()):
            raise RanksDisagree(f"rank {rank()}: EDropout: the {world_size()} ranks disagree on the {name} at step "
                                f"{step}: something a rank computed from its own batch reached selection unaveraged")
        start += checksum.numel()


def broadcast_from_rank0(value: Any) -> Any:
    """Rank 0's ``value`` (any picklable object) on every rank."""
    if not active():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def first_line(error: BaseException) -> str:
    """An exception's first line of text (its type's name when it has none), for one-line errors; a
    location prefix of gloo's ("[/path/to/pair.cc:561] ") dropped."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if text.startswith("[") and "] " in text:  # gloo's "[/path/to/pair.cc:561] Connection closed by peer"
        text = text.split("] ", 1)[1]
    return text


def _is_communication_failure(error: BaseException) -> bool:
    if isinstance(error, dist.DistError):
        return True
    text = str(error).lower()
    return any(word in text for word in ("gloo", "nccl", "timeout", "timed out", "connection", "closed"))


@contextlib.contextmanager
def launched(device: str, timeout_s: float) -> Iterator[torch.device]:
    """For a job of several processes (WORLD_SIZE > 1 in the environment, as ``torchrun`` sets it), the
    block runs in a process group initialised from the environment: nccl for CUDA, gloo for CPU, each
    collective failing after ``timeout_s`` seconds without the other processes. Yields this process's
    device (``cuda`` becomes ``cuda:LOCAL_RANK``). A process group already initialised is used as it is.

    A communication failure inside the block (a process that died or stopped answering) is raised again
    as :class:`ProcessGroupFailure` with one line that names this rank."""
    device = torch.device(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if device.type == "cuda" and device.index is None and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if world <= 1 or dist.is_initialized():
        yield device
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    try:
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    except (ValueError, RuntimeError) as e:
        raise ProcessGroupFailure(f"process group ({backend}, WORLD_SIZE={world}) could not start: "
                                  f"{first_line(e)}") from None
    try:
        yield device
    except RuntimeError as e:  # (torch.distributed's DistError is one)
        if isinstance(e, RanksDisagree) or not _is_communication_failure(e):
            raise
        raise ProcessGroupFailure(
            f"rank {dist.get_rank()} of {world}: lost the other processes ({first_line(e)}); one of them failed "
            f"or did not answer within {timeout_s:g} s, and its own output says why") from None
    finally:
        # Free what the block left in reference cycles (DistributedDataParallel's reducer holds the group's
        # pending work and tensors) while the group and the interpreter live: freed at interpreter exit
        # instead, gloo's threads abort the process now and then ("terminate called without an active
        # exception").
        gc.collect()
        dist.destroy_process_group()
