"""Which training samples each rank sees in an epoch, and in which batches (pure functions).

The global order of an epoch is a permutation of 0..N-1 that depends only on (seed, round,
epoch). Like torch's DistributedSampler it is padded to a multiple of the world size W by
repeating its head, and rank r takes positions r, r + W, r + 2W, ...: every rank gets
ceil(N / W) samples, so every rank runs the same number of steps with the same batch sizes
(the per-step all-gather needs equal shapes), and together the ranks cover the epoch once
(plus the padding, which the memory bank's duplicate rule handles).
"""
from __future__ import annotations

import math

import torch

from trainer.seeding import generator


def epoch_permutation(n: int, seed: int, round: int, epoch: int) -> torch.Tensor:
    """(N,) int64: the global sample order of (round, epoch)."""
    return torch.randperm(n, generator=generator(seed, "order", round, epoch))


def shard_indices(n: int, seed: int, round: int, epoch: int, rank: int, world_size: int) -> torch.Tensor:
    """(ceil(N / W),) int64: rank ``rank``'s samples of the epoch, in order."""
    order = epoch_permutation(n, seed, round, epoch)
    total = math.ceil(n / world_size) * world_size
    if total > n:
        repeats = math.ceil((total - n) / n)
        order = torch.cat([order, order.repeat(repeats)[: total - n]])
    return order[rank:total:world_size]


def split_batches(shard: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Split a rank's shard (S,) into ceil(S / batch_size) consecutive batches whose sizes differ
    by at most one (never a tiny last batch, which BatchNorm cannot train on; nothing dropped).
    All ranks' shards have the same length, so all ranks get the same batch sizes."""
    steps = math.ceil(len(shard) / batch_size)
    bounds = [(i * len(shard)) // steps for i in range(steps + 1)]
    return [shard[bounds[i]:bounds[i + 1]] for i in range(steps)]


def epoch_batches(n: int, seed: int, round: int, epoch: int, rank: int, world_size: int,
                  global_batch: int) -> list[torch.Tensor]:
    """Rank ``rank``'s batches of (round, epoch): global_batch / world_size samples each (+-1)."""
    return split_batches(shard_indices(n, seed, round, epoch, rank, world_size), global_batch // world_size)
