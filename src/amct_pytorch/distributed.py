"""The collectives LinearQAT's calibration uses under torch.distributed (gloo, NCCL, ...).

Without an initialised process group (or with one process) every function is the
identity, so single-process code pays nothing. Tensors stay on their own device, which
must be one the backend supports (CPU for gloo, CUDA for NCCL), as for DDP itself.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def rank() -> int:
    return dist.get_rank() if world_size() > 1 else 0


def gather_values(values: torch.Tensor) -> torch.Tensor:
    """Every rank's 1-d `values`, concatenated in rank order (ranks may hold different counts)."""
    world = world_size()
    if world == 1:
        return values
    size = torch.tensor([values.numel()], device=values.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    counts = [int(s) for s in sizes]
    # all_gather needs equal shapes (NCCL): pad to the longest, then cut
    padded = values.new_zeros(max(counts))
    padded[: values.numel()] = values
    chunks = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(chunks, padded)
    return torch.cat([chunk[:n] for chunk, n in zip(chunks, counts)])


def global_min_max(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(min over ranks of lo, max over ranks of hi), in one all-reduce."""
    if world_size() == 1:
        return lo, hi
    both = torch.stack([-lo, hi])
    dist.all_reduce(both, op=dist.ReduceOp.MAX)
    return -both[0], both[1]


def sum_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of `tensor` over ranks (a new tensor; the input is untouched)."""
    if world_size() == 1:
        return tensor
    total = tensor.clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total
