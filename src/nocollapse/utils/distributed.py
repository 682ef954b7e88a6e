"""torch.distributed helpers: initialisation from torchrun's environment and collectives that
are no-ops in a single process.

Launch with ``torchrun --nproc_per_node=N -m nocollapse.cli train ...`` (or the ``nocollapse``
script): ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` come from the environment. NCCL is used
on GPUs, gloo on CPUs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


_OWNS_GROUP = False


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def resolve_device(preference: str, local_rank: int = 0) -> torch.device:
    if preference == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is available")
    if preference in ("auto", "cuda") and torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(device_preference: str = "auto") -> tuple[DistInfo, torch.device]:
    """Join the process group described by torchrun's environment variables, if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(), resolve_device(device_preference)
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_preference, local_rank)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
        global _OWNS_GROUP
        _OWNS_GROUP = True
    return DistInfo(rank, world, local_rank), device


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """In-place SUM across processes; returns the tensor."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor /= dist.get_world_size()
    return tensor


def broadcast(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    if is_distributed():
        dist.broadcast(tensor, src=src)
    return tensor


class _GatherWithGrad(torch.autograd.Function):
    """All-gather whose backward sums the incoming gradients over ranks and returns this rank's
    slice, so that with DDP's gradient averaging a loss computed on the gathered tensor gets
    exactly the gradient it would have in one process holding the whole batch."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        ctx.rank, ctx.rows = dist.get_rank(), tensor.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.rows: (ctx.rank + 1) * ctx.rows]


def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate equally shaped tensors of all ranks along dim 0, in rank order, keeping the
    gradient path (see :class:`_GatherWithGrad`)."""
    if not is_distributed():
        return tensor
    if tensor.requires_grad:
        return _GatherWithGrad.apply(tensor)
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


class _AllReduceSumWithGrad(torch.autograd.Function):
    """All-reduce SUM whose backward all-reduces the incoming gradients: every rank's loss
    depends on every rank's input, so with DDP's gradient averaging the result matches one
    process holding the whole batch."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        out = tensor.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


def all_reduce_sum_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of ``tensor`` over ranks, out of place, keeping the gradient path (see
    :class:`_AllReduceSumWithGrad`); ``tensor`` itself in a single process."""
    if not is_distributed():
        return tensor
    if tensor.requires_grad:
        return _AllReduceSumWithGrad.apply(tensor)
    return all_reduce_sum(tensor.clone())


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def cleanup() -> None:
    """Leave the process group, if :func:`init_distributed` created it (an embedding program's
    own group is left alone)."""
    global _OWNS_GROUP
    if _OWNS_GROUP and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _OWNS_GROUP = False
