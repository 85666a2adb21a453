"""The process group a trainer runs in.

Everything the round loop needs from ``torch.distributed`` goes through :class:`World`,
so the loop reads the same for one process and for W ranks. ``World.single()`` is the
one-process world (no process group); ``trainer.distributed`` builds the W-rank one.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from trainer.global_bn import convert_to_global_bn


@dataclass
class World:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @classmethod
    def single(cls, device: str | torch.device = "cpu") -> "World":
        return cls(rank=0, world_size=1, local_rank=0, device=torch.device(device))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_gather_cat(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate equal-shaped ``tensor`` (B, ...) from every rank: (W*B, ...), rank order."""
        if not self.distributed:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, dim=0)

    def all_gather_indexed(self, indices: torch.Tensor, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """All-gather (indices (B,) int64, features (B, d) float32) of every rank in ONE collective.

        The per-step memory-bank sync is latency-bound (small messages), so the two tensors
        travel as one block (``pack_indexed``). Returns (W*B,) int64 and (W*B, d) float32, in
        rank order.
        """
        if not self.distributed:
            return indices, features
        return unpack_indexed(self.all_gather_cat(pack_indexed(indices, features)))

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over ranks in place and return it."""
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def wrap_model(self, model: torch.nn.Module, sync_bn: bool = True) -> torch.nn.Module:
        """DistributedDataParallel over the ranks; the model itself in a one-process world.

        ``sync_bn``: batch norm is synchronised across ranks, so W ranks with batch B/W each
        normalise with the statistics of the whole global batch B, as one process with batch B
        does: torch's SyncBatchNorm on CUDA, ``trainer.global_bn.GlobalBatchNorm`` on CPU
        (SyncBatchNorm has no CPU kernel). Both are converted in place; the returned module
        shares its parameters and buffers with ``model``. Without it each rank normalises its
        own B/W images (no collective inside the forward pass).
        """
        if not self.distributed:
            return model
        from torch.nn.parallel import DistributedDataParallel

        if sync_bn and self.device.type == "cuda":
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        elif sync_bn:
            model = convert_to_global_bn(model)
        ids = [self.device.index] if self.device.type == "cuda" else None
        # No per-step buffer broadcast: training-mode batch norm reads batch statistics, not
        # the running ones, and sync_buffers makes those equal at every epoch end.
        wrapped = DistributedDataParallel(model, device_ids=ids, **_no_forward_buffer_sync())
        # DDP's own init broadcast of the buffers, which torch < 2.13's broadcast_buffers=False
        # also turns off: rank 0's buffers on every rank from the first step, in every version.
        self.sync_buffers(model)
        return wrapped

    def sync_buffers(self, model: torch.nn.Module) -> None:
        """Give every rank rank 0's buffers (batch-norm running statistics), once per epoch.

        Synchronised batch norm updates them from the same global statistics on every rank, so
        this is a guarantee rather than a correction: evaluation and checkpoints need the
        replicas equal to the bit, whatever a reduction's rounding did.
        """
        if not self.distributed:
            return
        for buffer in model.buffers():
            dist.broadcast(buffer.data, src=0)

    def assert_identical(self, what: str, *tensors: torch.Tensor) -> None:
        """Raise if ``tensors`` differ in any bit between ranks (debug mode, ``--check-replicas``)."""
        if not self.distributed:
            return
        import hashlib

        digest = hashlib.blake2b(digest_size=16)
        for tensor in tensors:
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        digests = [None] * self.world_size
        dist.all_gather_object(digests, digest.hexdigest())
        if len(set(digests)) != 1:
            raise RuntimeError(f"replicas diverged: {what} differs between ranks ({digests})")

    def broadcast_object(self, obj):
        """Rank 0's ``obj`` on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def _no_forward_buffer_sync() -> dict:
    """DistributedDataParallel's keyword for "no buffer broadcast before each forward":
    ``forward_sync_buffers=False`` from torch 2.13 (where ``broadcast_buffers`` is deprecated),
    ``broadcast_buffers=False`` before (torch 2.11 has no ``forward_sync_buffers``)."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


def pack_indexed(indices: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """(B,) int64 and (B, d) float32 -> (B, 2 + d) int32 holding the bits of both (exact, no casting)."""
    index_bits = indices.to(torch.int64).contiguous().view(torch.int32).reshape(-1, 2)
    feature_bits = features.to(torch.float32).contiguous().view(torch.int32)
    return torch.cat([index_bits, feature_bits], dim=1)


def unpack_indexed(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`pack_indexed`: (B, 2 + d) int32 -> (B,) int64, (B, d) float32."""
    indices = packed[:, :2].contiguous().view(torch.int64).reshape(-1)
    features = packed[:, 2:].contiguous().view(torch.float32)
    return indices, features
