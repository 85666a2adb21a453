"""Batch norm over the global batch of all ranks, on any backend (gloo included).

W ranks with batch_size / W images each should normalise with the statistics of the whole
global batch, as one process with batch_size images does; otherwise each rank normalises with
a noisier half (or quarter ...) batch and a W-rank run trains a different network from the
one-process run. torch's SyncBatchNorm does this on CUDA only (its kernels have no CPU
version), so on CPU :func:`convert_to_global_bn` swaps every batch-norm layer for
:class:`GlobalBatchNorm`, which does the same with one all-reduce forward and one backward:

forward    each rank: its (mean_r, var_r) over its n_r values per channel (torch.var_mean);
           all-reduce (n_r, n_r mean_r, n_r (var_r + mean_r^2)) in float64, so that
           var = S2 / n - mean^2 keeps float32 precision even when |mean| >> std;
           y = batch_norm(x) with the global (mean, var): torch's fused kernel.
backward   each rank: (sum dy, sum dy * xhat) over its values (torch's fused batch-norm
           backward reduction), all-reduced, then
           dx = w invstd (dy - sum dy / n - xhat sum dy xhat / n)   (the batch-norm gradient of the
           whole batch: every rank's loss reaches x through the shared statistics);
           weight and bias get this rank's own sums, which DDP averages like any gradient.

The all-reduces run in a process group of their own so that they never queue behind DDP's
gradient buckets. Evaluation uses the running statistics and communicates nothing.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


class _GlobalBatchNormFn(torch.autograd.Function):
    """y = batch_norm(x) with the statistics of every rank's x: see the module docstring."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu", cast_inputs=torch.float32)
    def forward(ctx, x, weight, bias, running_mean, running_var, eps: float, momentum: float, group):
        channels = x.shape[1]
        dims = [0, *range(2, x.dim())]
        var_r, mean_r = torch.var_mean(x, dims, correction=0)                     # (C,), (C,)
        n_r = x.numel() // channels
        mean_r64 = mean_r.double()
        stats = torch.cat([torch.full((1,), float(n_r), dtype=torch.float64, device=x.device),
                           n_r * mean_r64, n_r * (var_r.double() + mean_r64 * mean_r64)])
        dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=group)
        count = float(stats[0])
        mean64 = stats[1:1 + channels] / count
        mean = mean64.float()
        var = (stats[1 + channels:] / count - mean64 * mean64).clamp_min(0.0).float()
        if running_mean is not None:
            unbiased = var * (count / max(count - 1.0, 1.0))
            running_mean.mul_(1.0 - momentum).add_(mean, alpha=momentum)
            running_var.mul_(1.0 - momentum).add_(unbiased, alpha=momentum)
        invstd = torch.rsqrt(var + eps)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.eps, ctx.count, ctx.group = eps, count, group
        return F.batch_norm(x, mean, var, weight, bias, training=False, momentum=0.0, eps=eps)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx, dy):
        x, weight, mean, invstd = ctx.saved_tensors
        dy = dy.contiguous()
        channels = x.shape[1]
        shape = [1, -1] + [1] * (x.dim() - 2)
        # Local sum(dy * xhat) and sum(dy) per channel: the grad_weight and grad_bias outputs of
        # torch's fused batch-norm backward, given our global mean and invstd.
        _, sum_dy_xhat, sum_dy = torch.ops.aten.native_batch_norm_backward(
            dy, x, weight, None, None, mean, invstd, True, ctx.eps, [False, True, True])
        sums = torch.cat([sum_dy, sum_dy_xhat])
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=ctx.group)
        mean_dy, mean_dy_xhat = sums[:channels] / ctx.count, sums[channels:] / ctx.count
        scale = invstd if weight is None else weight * invstd                   # w invstd  (C,)
        # dx = scale (dy - mean_dy - (x - mean) invstd mean_dy_xhat) = scale dy - (slope x + offset)
        slope = scale * invstd * mean_dy_xhat
        offset = scale * mean_dy - slope * mean
        dx = torch.addcmul(offset.view(shape), x, slope.view(shape)).neg_().addcmul_(dy, scale.view(shape))
        grad_weight = sum_dy_xhat if weight is not None and ctx.needs_input_grad[1] else None
        grad_bias = sum_dy if ctx.needs_input_grad[2] else None
        return dx, grad_weight, grad_bias, None, None, None, None, None


class GlobalBatchNorm(_BatchNorm):
    """BatchNorm1d/2d/3d whose training statistics are those of the whole global batch.

    Input (B, C, ...) with B the local batch; output the same shape (float32 under CPU
    autocast). Running statistics are updated as torch's BatchNorm does (momentum, unbiased
    variance over the global count), so they are the same on every rank. Outside training, or
    with no process group, it is plain batch norm.
    """

    group = None   # the process group of the statistics (convert_to_global_bn gives each model one)

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"GlobalBatchNorm needs (B, C, ...) input, got shape {tuple(x.shape)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        momentum = 0.0
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        return _GlobalBatchNormFn.apply(x, self.weight, self.bias, self.running_mean, self.running_var,
                                        self.eps, momentum, self.group)


def convert_to_global_bn(module: nn.Module, group=None) -> nn.Module:
    """Replace every batch-norm layer of ``module`` (in place, recursively) with a
    :class:`GlobalBatchNorm` that shares its parameters and buffers; returns the module (a new
    one only if ``module`` itself is a batch-norm layer). Like SyncBatchNorm.convert_sync_batchnorm.

    ``group``: the process group of the statistics; None makes one new group for all the layers
    (every rank must call this at the same point, as for any group creation).
    """
    if group is None and dist.is_available() and dist.is_initialized():
        group = dist.new_group()
    if isinstance(module, _BatchNorm) and not isinstance(module, GlobalBatchNorm):
        converted = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                    module.track_running_stats)
        if module.affine:
            converted.weight, converted.bias = module.weight, module.bias
        if module.track_running_stats:
            converted.running_mean, converted.running_var = module.running_mean, module.running_var
            converted.num_batches_tracked = module.num_batches_tracked
        converted.train(module.training)
        converted.group = group
        return converted
    for name, child in module.named_children():
        module.add_module(name, convert_to_global_bn(child, group))
    return module
