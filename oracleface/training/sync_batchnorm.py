"""BatchNorm over the global batch when training runs in several processes.

Under ``torchrun`` each process sees ``batch_size / world_size`` samples; per-process
BatchNorm then normalises with the statistics of that slice (at 2 samples per process
the 1×1 bottleneck's BatchNorm outputs ±1 per channel). ``synchronise_batchnorm``
converts a module's BatchNorm layers so that training-mode statistics are those of the
global batch:

- CUDA tensors: ``torch.nn.SyncBatchNorm`` (NCCL, fused kernels).
- CPU tensors: ``torch.nn.SyncBatchNorm`` supports only GPU inputs, so
  ``GlobalBatchNorm2d`` all-reduces the per-channel statistics itself (gloo): the sum
  and count first, then the sum of squared deviations from the global mean (two passes:
  no E[x²] − E[x]² cancellation). The all-reduces are differentiable (``_AllReduceSum``,
  whose backward all-reduces the gradient), so each process's backward includes what its
  samples did to the other processes' normalisation — the gradient of the global batch, as
  one process computes it.

Both keep the parameter and buffer names of ``nn.BatchNorm2d``, so checkpoints load
either way. Every process must run every training-mode forward and backward of a
converted module (the statistics are a collective).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class _AllReduceSum(torch.autograd.Function):
    """Sum of a tensor over all processes; the gradient of each input is the sum of the
    output's gradients over all processes. (What ``torch.distributed.nn.functional.
    all_reduce`` did: that warns as deprecated (torch 2.14) and its replacement in
    ``torch.distributed._functional_collectives`` is private.)"""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        total = tensor.clone()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        total = grad.clone()
        dist.all_reduce(total)
        return total


def all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    """Differentiable sum over the processes of the default group (any backend)."""
    return _AllReduceSum.apply(tensor)


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose training statistics are those of the batch of all processes
    of the default process group (any backend); input ``(N, C, H, W)``. In eval mode, or
    with one process, it is ``nn.BatchNorm2d``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized()
                and dist.get_world_size() > 1):
            return super().forward(x)
        self._check_input_dim(x)
        channels = x.shape[1]
        wide = x.to(torch.promote_types(x.dtype, torch.float32))  # statistics in float32 or float64
        values = wide.transpose(0, 1).reshape(channels, -1)
        local = torch.cat([values.sum(1), values.new_full((1,), values.shape[1])])
        totals = all_reduce(local)
        count = totals[-1]
        mean = totals[:channels] / count
        variance = all_reduce((values - mean[:, None]).pow(2).sum(1)) / count  # biased, as BN normalises
        if self.track_running_stats:
            self._update_running_statistics(mean.detach(), variance.detach(), count.item())
        shape = (1, channels, 1, 1)
        y = (wide - mean.view(shape)) * torch.rsqrt(variance.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)

    @torch.no_grad()
    def _update_running_statistics(self, mean, variance, count: float) -> None:
        self.num_batches_tracked.add_(1)
        factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        if factor == 0:
            return
        unbiased = variance * (count / max(count - 1, 1))
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
        self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)


def synchronise_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Replace every ``nn.BatchNorm2d`` of ``module`` (in place where possible) by one that
    normalises over the global batch: ``nn.SyncBatchNorm`` on CUDA, ``GlobalBatchNorm2d``
    elsewhere. Weights, buffers and train/eval mode carry over; returns the module."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return _convert(module)


def _convert(module: nn.Module) -> nn.Module:
    if type(module) is nn.BatchNorm2d:
        converted = GlobalBatchNorm2d(module.num_features, module.eps, module.momentum, module.affine,
                                      module.track_running_stats)
        tensors = list(module.parameters()) + list(module.buffers())
        if tensors:  # same device and floating dtype (load_state_dict would round to float32)
            converted.to(device=tensors[0].device, dtype=tensors[0].dtype)
        converted.load_state_dict(module.state_dict())
        return converted.train(module.training)
    for name, child in module.named_children():
        setattr(module, name, _convert(child))
    return module
