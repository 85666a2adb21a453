"""Batch norm over the global batch of all ranks, on any backend (gloo included).

W ranks with batch_size / W images each should normalise with the statistics of the whole
global batch, as one process with batch_size images does; otherwise each rank normalises with
a noisier half (or quarter ...) batch and a W-rank run trains a different network from the
one-process run. torch's SyncBatchNorm does this on CUDA only (it has no CPU kernel), so on
CPU :func:`convert_to_global_bn` swaps every batch-norm layer for :class:`GlobalBatchNorm`,
which computes the same two statistics with differentiable all-reduces:

    n    = sum over ranks of the local count          mean = (sum over ranks of sum x) / n
    var  = (sum over ranks of sum (x - mean)^2) / n   (two passes: no E[x^2] - E[x]^2 cancellation)

Gradients flow through both all-reduces (the backward of a sum over ranks is a sum over ranks),
so each rank's input gradient includes every rank's loss through the shared statistics, as in
SyncBatchNorm. Cost: four small all-reduces per layer per training step (two forward, two
backward); evaluation uses the running statistics and communicates nothing.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks, differentiable: forward and backward are both an all-reduce SUM."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Differentiable sum of ``tensor`` over all ranks (every rank must call it)."""
    return _AllReduceSum.apply(tensor)


class GlobalBatchNorm(_BatchNorm):
    """BatchNorm1d/2d/3d whose training statistics are those of the whole global batch.

    Input (B, C, ...) with B the local batch; output the same shape. Running statistics are
    updated as torch's BatchNorm does (momentum, unbiased variance over the global count), so
    they are the same on every rank. Outside training, or with no process group, it is plain
    batch norm.
    """

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"GlobalBatchNorm needs (B, C, ...) input, got shape {tuple(x.shape)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        local_count = x.new_tensor([x.numel() // x.shape[1]], dtype=torch.float32)
        sums = all_reduce_sum(torch.cat([x.float().sum(dims), local_count]))
        count = sums[-1].detach()
        mean = sums[:-1] / count
        centered = x.float() - mean.view(shape)
        var = all_reduce_sum((centered * centered).sum(dims)) / count
        out = centered * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            self._update_running_stats(mean.detach(), var.detach(), float(count))
        return out.to(x.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, count: float) -> None:
        self.num_batches_tracked.add_(1)
        momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        unbiased = var * (count / max(count - 1.0, 1.0))
        self.running_mean.mul_(1.0 - momentum).add_(mean.to(self.running_mean.dtype), alpha=momentum)
        self.running_var.mul_(1.0 - momentum).add_(unbiased.to(self.running_var.dtype), alpha=momentum)


def convert_to_global_bn(module: nn.Module) -> nn.Module:
    """Replace every batch-norm layer of ``module`` (in place, recursively) with a
    :class:`GlobalBatchNorm` that shares its parameters and buffers; returns the module (a new
    one only if ``module`` itself is a batch-norm layer). Like SyncBatchNorm.convert_sync_batchnorm."""
    if isinstance(module, _BatchNorm) and not isinstance(module, GlobalBatchNorm):
        converted = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                    module.track_running_stats)
        if module.affine:
            converted.weight, converted.bias = module.weight, module.bias
        if module.track_running_stats:
            converted.running_mean, converted.running_var = module.running_mean, module.running_var
            converted.num_batches_tracked = module.num_batches_tracked
        converted.train(module.training)
        return converted
    for name, child in module.named_children():
        module.add_module(name, convert_to_global_bn(child))
    return module
