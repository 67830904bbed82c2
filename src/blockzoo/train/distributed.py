"""Multi-process training under ``torchrun``: process group, DDP, SyncBatchNorm, data sharding.

``torchrun --nproc_per_node=N -m blockzoo train ...`` (or the ``blockzoo`` script) starts ``N``
processes with ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` set;
:func:`init_distributed` reads them and joins the group (``nccl`` on CUDA, ``gloo`` on CPU).
Without them everything runs in one process and the functions here are no-ops.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Sampler


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands: its rank among ``world_size`` and the device it trains on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        """Whether more than one process trains."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that logs, writes checkpoints and metrics."""
        return self.rank == 0


def launched_by_torchrun() -> bool:
    """Whether the environment describes a process group of more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed(device: str = "auto") -> DistEnv:
    """Join the process group ``torchrun`` describes (if any) and pick this process's device.

    ``device`` is ``"auto"`` (CUDA if available, else CPU), ``"cpu"`` or ``"cuda"``. Under
    ``torchrun`` with CUDA each process takes GPU ``LOCAL_RANK`` and the ``nccl`` backend; on CPU
    the ``gloo`` backend. A group that is already initialised is reused.
    """
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but CUDA is not available")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if not launched_by_torchrun():
        return DistEnv(0, 1, 0, torch.device("cuda" if use_cuda else "cpu"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo",
                                device_id=dev if use_cuda else None)
    return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, dev)


def cleanup_distributed() -> None:
    """Leave the process group (if this process is in one)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap_model(model: nn.Module, env: DistEnv, sync_bn: bool = True) -> nn.Module:
    """``DistributedDataParallel`` around ``model`` (already on ``env.device``) when distributed.

    With ``sync_bn`` every BatchNorm becomes ``nn.SyncBatchNorm`` (statistics over the global
    batch) first; PyTorch implements SyncBatchNorm on accelerators only, so on CPU (``gloo``) the
    BatchNorms stay per process and DDP broadcasts rank 0's running statistics each step.
    """
    if not env.distributed:
        return model
    if sync_bn and env.device.type != "cpu":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ids = [env.device.index] if env.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` wrapper (or ``model`` itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


class ShardSampler(Sampler[int]):
    """Every ``world_size``-th index from ``rank``, in order, without padding (for evaluation).

    Unlike ``DistributedSampler`` no sample is repeated, so summing correct predictions and
    counts over the ranks gives the exact accuracy on the whole set.
    """

    def __init__(self, length: int, rank: int, world_size: int) -> None:
        self.indices = range(rank, length, world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def all_reduce_sum(values: list[float], env: DistEnv) -> list[float]:
    """Sum ``values`` over all processes (float64); unchanged in a single process."""
    if not env.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=env.device)
    dist.all_reduce(t)
    return t.tolist()


def broadcast_buffers(model: nn.Module, env: DistEnv) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every process.

    DDP broadcasts them at the start of each training forward, after which each process updates
    its own from its shard; calling this at the end of an epoch makes evaluation and checkpoints
    use one model on every rank.
    """
    if not env.distributed:
        return
    for buffer in unwrap(model).buffers():
        dist.broadcast(buffer, src=0)


def check_replicas_equal(model: nn.Module, env: DistEnv) -> None:
    """Raise ``RuntimeError`` unless every process holds the same parameters and buffers.

    Compares a float64 checksum (sum and sum of squares of every tensor) across ranks.
    """
    if not env.distributed:
        return
    tensors = list(unwrap(model).state_dict().values())
    local = torch.stack([
        torch.stack([t.double().sum(), t.double().square().sum()]) for t in tensors
    ]).to(env.device)
    gathered = [torch.empty_like(local) for _ in range(env.world_size)]
    dist.all_gather(gathered, local)
    for rank, other in enumerate(gathered):
        if not torch.equal(other, gathered[0]):
            raise RuntimeError(f"the weights of rank {rank} differ from rank 0's after training")
