"""Which training samples each rank sees in an epoch, and in which batches (pure functions).

The global order of an epoch is a permutation of 0..N-1 that depends only on (seed, round,
epoch). Like torch's DistributedSampler it is padded to a multiple of the world size W by
repeating its head. That padded order is cut into global batches of ``batch_size`` positions
(the same cut for every W that divides N), and rank r takes positions r, r + W, r + 2W, ... of
each global batch. So:

- every rank runs the same number of steps with the same batch sizes (the per-step all-gather
  needs equal shapes), and together the ranks cover the epoch once (plus the padding, which
  the memory bank's duplicate rule handles);
- step t trains on the same set of images at every W (when W divides N): W ranks with
  batch_size / W images each compute what one process with batch_size images does. This is
  what lets a W-rank run match a one-process run (see ``trainer.augment`` for the matching
  augmentation draws and ``trainer.world`` for batch norm over the global batch).
"""
from __future__ import annotations

import math
from itertools import pairwise

import torch

from trainer.seeding import generator


def epoch_permutation(n: int, seed: int, round: int, epoch: int) -> torch.Tensor:
    """(N,) int64: the global sample order of (round, epoch)."""
    return torch.randperm(n, generator=generator(seed, "order", round, epoch))


def padded_order(n: int, seed: int, round: int, epoch: int, world_size: int) -> torch.Tensor:
    """(ceil(N / W) * W,) int64: the epoch permutation, its head repeated to a multiple of W."""
    order = epoch_permutation(n, seed, round, epoch)
    total = math.ceil(n / world_size) * world_size
    if total > n:
        repeats = math.ceil((total - n) / n)
        order = torch.cat([order, order.repeat(repeats)[: total - n]])
    return order


def global_batch_bounds(total: int, batch_size: int, world_size: int = 1) -> list[int]:
    """Start/stop positions of consecutive global batches of ``batch_size`` over ``total`` positions.

    A remainder of at least half a batch (and two images per rank) is the last batch; a smaller
    one joins the last full batch: a last batch of a handful of images would make batch norm's
    statistics noise, and one image per rank cannot train it. Nothing is dropped.
    [0, B, 2B, ..., total].
    """
    full, remainder = divmod(total, batch_size)
    bounds = [i * batch_size for i in range(full + 1)]
    if (remainder * 2 >= batch_size and remainder >= 2 * world_size) or full == 0:
        bounds.append(total)
    else:
        bounds[-1] = total
    return bounds


def epoch_batches(n: int, seed: int, round: int, epoch: int, rank: int, world_size: int,
                  global_batch: int) -> list[torch.Tensor]:
    """Rank ``rank``'s batches of (round, epoch): every W-th image of each global batch, starting
    at position ``rank`` (global_batch / W images each; a multiple of W, so equal on every rank)."""
    order = padded_order(n, seed, round, epoch, world_size)
    bounds = global_batch_bounds(len(order), global_batch, world_size)
    return [order[start:stop][rank::world_size] for start, stop in pairwise(bounds)]
