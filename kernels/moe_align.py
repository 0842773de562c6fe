"""Routing alignment shared by the expert-Hessian and fused-MoE kernels.

The (token, slot) pairs of a routing table `topk_ids [T, k]` are numbered p = t * k + s. Alignment sorts
them by expert and pads every expert's run up to a multiple of `block_size`, so that each block of
`block_size` sorted positions belongs to exactly one expert and a kernel program can take a block as its
unit of work:

    sorted_ids     int32 [capacity]         pair index p at each sorted position; padding holds T*k
    block_expert   int32 [capacity / bs]    expert of each block; -1 for blocks past the end
    expert_offsets int32 [E + 1]            expert e owns sorted positions [off[e], off[e+1])
    counts         int64 [E]                real pairs routed to each expert
    num_padded     int32 [1]                off[E], the number of used sorted positions

`capacity` is a host-side bound (T*k + min(T*k, E) * (bs - 1), rounded up to bs) so nothing here reads
device values back to the host: the whole alignment is a few sync-free torch ops and can be captured in
a CUDA graph together with the GEMMs that use it.
"""
from __future__ import annotations

from typing import NamedTuple

import torch


class Alignment(NamedTuple):
    sorted_ids: torch.Tensor
    block_expert: torch.Tensor
    expert_offsets: torch.Tensor
    counts: torch.Tensor
    num_padded: torch.Tensor
    block_size: int
    num_pairs: int

    @property
    def num_blocks(self) -> int:
        return self.block_expert.numel()


def aligned_capacity(num_pairs: int, num_experts: int, block_size: int) -> int:
    """Upper bound on sorted positions: every expert that is hit wastes at most block_size - 1 slots."""
    cap = num_pairs + min(num_pairs, num_experts) * (block_size - 1)
    return max(block_size, -(-cap // block_size) * block_size)


def moe_align(topk_ids: torch.Tensor, num_experts: int, block_size: int) -> Alignment:
    """Sort the (token, slot) pairs of `topk_ids [T, k]` by expert, each expert padded to `block_size`."""
    if topk_ids.dim() != 2:
        raise ValueError(f"topk_ids must be [tokens, k], got shape {tuple(topk_ids.shape)}")
    if topk_ids.dtype.is_floating_point or topk_ids.dtype == torch.bool:
        raise ValueError(f"topk_ids must be an integer tensor, got {topk_ids.dtype}")
    dev = topk_ids.device
    flat = topk_ids.reshape(-1).long()
    n = flat.numel()
    counts = torch.zeros(num_experts, dtype=torch.int64, device=dev)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_size - 1) // block_size * block_size
    pad_end = torch.cumsum(padded, 0)
    pad_start = pad_end - padded
    cnt_start = torch.cumsum(counts, 0) - counts
    order = torch.argsort(flat, stable=True)  # pairs of one expert keep token order
    sorted_e = flat[order]
    dest = pad_start[sorted_e] + torch.arange(n, device=dev) - cnt_start[sorted_e]
    cap = aligned_capacity(n, num_experts, block_size)
    sorted_ids = torch.full((cap,), n, dtype=torch.int32, device=dev)
    sorted_ids[dest] = order.to(torch.int32)
    block_start = torch.arange(0, cap, block_size, device=dev)
    block_expert = torch.searchsorted(pad_end, block_start, right=True)
    block_expert = torch.where(block_expert < num_experts, block_expert, -1).to(torch.int32)
    offsets = torch.cat([pad_start, pad_end[-1:]]).to(torch.int32)
    return Alignment(sorted_ids, block_expert, offsets, counts, pad_end[-1:].to(torch.int32), block_size, n)
