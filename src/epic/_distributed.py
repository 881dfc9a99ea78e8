"""Several processes (``torchrun``): process group, rank, gathers and broadcasts.

Plumbing shared by ``training`` (data-parallel loop, sharded inference) and ``defenses``
(selection split by class); it imports neither. Every helper is a no-op or the identity in a
single process, so code that calls them runs unchanged without ``torchrun``.

``torchrun --nproc_per_node N`` starts N copies of a script with ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` in their environment;
:func:`init_from_env` reads them.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor

from ._errors import EpicError

__all__ = ["all_gather_varlen", "all_reduce_sum", "barrier", "broadcast", "init_from_env",
           "is_distributed", "is_main", "local_rank", "rank", "shutdown", "world_size"]

_MAX_DIMS = 8


def init_from_env(backend: str | None = None, *, timeout: float | None = None) -> bool:
    """Join the process group ``torchrun`` describes in the environment, once.

    Does nothing (and returns False) unless ``WORLD_SIZE`` > 1. On a machine with CUDA the
    current device becomes ``cuda:LOCAL_RANK``.

    Args:
        backend: ``torch.distributed`` backend; default ``"cpu:gloo,cuda:nccl"`` when CUDA is
            available (NCCL for GPU tensors, gloo for the few CPU ones, such as masks), else
            ``"gloo"``.
        timeout: seconds a collective may wait for the other processes before failing
            (default: torch's).

    Returns:
        Whether this process is now part of a group of several processes.
    """
    if dist.is_available() and dist.is_initialized():
        return is_distributed()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_available():
        raise EpicError("WORLD_SIZE > 1 but this torch build has no torch.distributed; "
                        "run a single process")
    cuda = torch.cuda.is_available()
    if cuda and local_rank() < torch.cuda.device_count():
        torch.cuda.set_device(local_rank())
    if backend is None:
        backend = "cpu:gloo,cuda:nccl" if cuda else "gloo"
    wait = None if timeout is None else timedelta(seconds=timeout)
    dist.init_process_group(backend=backend, timeout=wait)  # env://: RANK, WORLD_SIZE, MASTER_*
    return is_distributed()


def shutdown() -> None:
    """Leave the process group, if any (at the end of a command)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    """Whether several processes are in an initialised process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 in a single process)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of processes (1 in a single process)."""
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    """Rank on this machine: ``LOCAL_RANK`` if set, else :func:`rank`."""
    value = os.environ.get("LOCAL_RANK")
    return int(value) if value is not None else rank()


def is_main() -> bool:
    """Whether this process writes files and prints (rank 0, or a single process)."""
    return rank() == 0


def barrier() -> None:
    """Wait until every process gets here."""
    if is_distributed():
        dist.barrier()


def broadcast(tensor: Tensor, src: int = 0) -> Tensor:
    """Overwrite ``tensor`` in place with rank ``src``'s (same shape and dtype everywhere)."""
    if not is_distributed():
        return tensor
    if tensor.dtype == torch.bool:  # not every backend broadcasts bools
        buf = tensor.to(torch.uint8)
        dist.broadcast(buf, src)
        tensor.copy_(buf.bool())
    else:
        dist.broadcast(tensor, src)
    return tensor


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Sum ``tensor`` over every process, in place."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_varlen(tensor: Tensor) -> Tensor:
    """Concatenate every process's ``tensor`` along dim 0, in rank order.

    The first dimension may differ between processes (zero included); the other dimensions
    and the dtype must agree wherever a process has elements (an empty tensor of any shape
    stands for zero rows). Sizes are gathered first, then each tensor is padded to the largest.
    """
    if not is_distributed():
        return tensor
    if tensor.ndim > _MAX_DIMS or tensor.ndim == 0:
        raise EpicError(f"all_gather_varlen needs a tensor with 1 to {_MAX_DIMS} dimensions, "
                        f"got {tensor.ndim}")
    world, device = world_size(), tensor.device
    shape = torch.zeros(_MAX_DIMS + 2, dtype=torch.long, device=device)
    shape[0], shape[1] = tensor.numel(), tensor.ndim
    shape[2:2 + tensor.ndim] = torch.tensor(tensor.shape, dtype=torch.long)
    shapes = [torch.empty_like(shape) for _ in range(world)]
    dist.all_gather(shapes, shape)
    shapes_cpu = [s.tolist() for s in shapes]
    full = [s for s in shapes_cpu if s[0] > 0]
    if not full:
        return tensor
    trailing = full[0][3:2 + full[0][1]]
    if any(s[3:2 + s[1]] != trailing for s in full):
        raise EpicError("all_gather_varlen: the tensors' trailing dimensions differ between "
                        f"processes: {[s[2:2 + s[1]] for s in full]}")
    sizes = [s[2] if s[0] > 0 else 0 for s in shapes_cpu]
    local = tensor.reshape(sizes[rank()], *trailing)
    padded = torch.zeros(max(sizes), *trailing, dtype=tensor.dtype, device=device)
    padded[: len(local)] = local
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([part[:n] for part, n in zip(parts, sizes, strict=True)])
