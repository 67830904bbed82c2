"""The data loaders of one training process: the epoch's order and augmentation, the shard of
each process, and resuming in the middle of an epoch."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from ..core.interrupt import ignore_sigint
from .config import TrainConfig
from .data import Augmented, DataBundle, default_workers
from .distributed import DistEnv, ShardSampler


class _SkipFirst(Sampler[int]):
    """``sampler``'s indices without the first ``skip`` (a resumed, half-done epoch)."""

    def __init__(self, sampler: DistributedSampler) -> None:
        self.sampler = sampler
        self.skip = 0

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(iter(self.sampler), self.skip, None)

    def __len__(self) -> int:
        return max(0, len(self.sampler) - self.skip)


class Loaders:
    """Training and validation loaders of one process, with the training set's per-epoch seed."""

    def __init__(self, data: DataBundle, config: TrainConfig, env: DistEnv) -> None:
        if config.batch_size % env.world_size:
            raise ValueError(f"batch_size {config.batch_size} is not divisible by the "
                             f"{env.world_size} processes")
        self.batch = batch = config.batch_size // env.world_size
        self.train_set = (Augmented(data.train, max(1, data.image_size // 8), config.seed)
                          if config.augment else data.train)
        self.sampler = DistributedSampler(self.train_set, env.world_size, env.rank,
                                          shuffle=True, seed=config.seed)
        self.skipping = _SkipFirst(self.sampler)
        self.workers = config.workers if config.workers is not None else default_workers(
            data.name)
        # Their own generator: starting an iteration draws a worker seed from it, never from
        # the global RNG, so resuming in the middle of an epoch leaves the dropout draws as
        # they were (the augmentation has its own seeds).
        options = dict(num_workers=self.workers, pin_memory=env.device.type == "cuda",
                       worker_init_fn=ignore_sigint if self.workers else None,
                       generator=torch.Generator().manual_seed(config.seed))
        self.train = DataLoader(self.train_set, batch_size=batch, sampler=self.skipping,
                                drop_last=len(self.sampler) >= batch, **options)
        self.steps = len(self.train)  # per full epoch
        self.val = DataLoader(data.val, batch_size=batch,
                              sampler=ShardSampler(len(data.val), env.rank, env.world_size),
                              **options)

    def set_epoch(self, epoch: int, skip_steps: int = 0) -> None:
        """Use epoch ``epoch``'s order and augmentation, leaving out its first ``skip_steps``."""
        self.sampler.set_epoch(epoch)
        self.skipping.skip = skip_steps * self.batch
        if isinstance(self.train_set, Augmented):
            self.train_set.set_epoch(epoch)
