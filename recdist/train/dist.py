"""Collectives that are no-ops in a single process, so solvers run the same with or without Ray Train."""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks in place (identity in one process)."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_to_all_(output: torch.Tensor, tensor: torch.Tensor, out_sizes: list[int], in_sizes: list[int]) -> torch.Tensor:
    """Send in_sizes[r] leading rows of `tensor` (in rank order) to rank r; receive out_sizes[r] from each."""
    if is_distributed():
        dist.all_to_all_single(output, tensor.contiguous(), out_sizes, in_sizes)
    else:
        output.copy_(tensor)
    return output

