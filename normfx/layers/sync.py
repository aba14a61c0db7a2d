"""SyncBatchNorm that also synchronizes CPU tensors (gloo), as a drop-in ``nn.SyncBatchNorm``.

torch's ``nn.SyncBatchNorm`` raises on CPU inputs under an initialized process group (its kernels are GPU
only). This subclass keeps torch's path wherever torch supports it (GPU, XPU, …, or no process group / one
process: plain BatchNorm) and adds the CPU one: per channel, the sum over the local batch and the local count
are all-reduced, then the sum of squared deviations from the global mean (2 all-reduces of C + 1 and C numbers;
two passes, so the variance does not suffer from E[x²] − E[x]² cancellation). Each all-reduce's backward
all-reduces the gradients (:class:`_AllReduceSum`): each rank gets the gradient of the summed loss of all
ranks, as torch's kernel gives. The EMA is updated with the global mean and
the global unbiased variance, identically on every rank. Same state_dict as BatchNorm.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ._batch_stats import ema_factors, reduce_dims, update_running, updates_statistics

__all__ = ["SyncBatchNorm"]

_TORCH_DEVICES = ("cuda", "hpu", "xpu")


class _AllReduceSum(torch.autograd.Function):
    """Sum over the ranks of ``group``; the gradient of a sum is the sum of the ranks' gradients."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        out = tensor.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


class SyncBatchNorm(nn.SyncBatchNorm):
    """``nn.SyncBatchNorm`` with a CPU path (gloo); otherwise torch's layer unchanged."""

    def _cpu_sync_world(self, x: torch.Tensor) -> int:
        """World size to synchronize over on the CPU path; 0 when torch's own forward applies."""
        if not self.training or not (dist.is_available() and dist.is_initialized()):
            return 0
        if x.device.type in _TORCH_DEVICES or x.device.type == torch._C._get_privateuse1_backend_name():
            return 0
        world = dist.get_world_size(self.process_group or dist.group.WORLD)
        return world if world > 1 else 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._cpu_sync_world(x):
            return super().forward(x)
        self._check_input_dim(x)
        self._check_non_zero_input_channels(x)
        group = self.process_group or dist.group.WORLD
        dims = reduce_dims(x)
        acc = torch.promote_types(x.dtype, torch.float32)
        xa = x.to(acc)
        count = torch.tensor([x.numel() // x.shape[1]], dtype=acc, device=x.device)
        packed = _AllReduceSum.apply(torch.cat([xa.sum(dims), count]), group)
        total = packed[-1]
        mean = packed[:-1] / total
        view = (1, -1) + (1,) * (x.dim() - 2)
        var = _AllReduceSum.apply((xa - mean.view(view)).square().sum(dims), group) / total
        scale = torch.rsqrt(var + self.eps)
        shift = -mean * scale
        if self.weight is not None:
            scale, shift = scale * self.weight, shift * self.weight + self.bias
        y = (xa * scale.view(view) + shift.view(view)).to(x.dtype)
        if updates_statistics(self):
            update_running(self, [mean.detach()], [var.detach()], [int(total.item())], ema_factors(self, 1))
        return y

    @classmethod
    def from_batchnorm(cls, bn: nn.Module, process_group=None) -> "SyncBatchNorm":
        """A SyncBatchNorm with ``bn``'s eps, momentum, affine, statistics and mode (no storage shared)."""
        from ._batch_stats import copy_bn_state

        ref = bn.weight if bn.weight is not None else bn.running_mean
        layer = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats, process_group,
                    device=None if ref is None else ref.device, dtype=None if ref is None else ref.dtype)
        return copy_bn_state(bn, layer)
