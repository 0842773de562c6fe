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

Within an expert the pairs keep their order (p ascending). `capacity` is a host-side bound
(T*k + min(T*k, E) * (bs - 1), rounded up to bs) so nothing here reads device values back to the host, and
the alignment can be captured in a CUDA graph together with the GEMMs that use it.

Two implementations of the same contract. On CUDA (and on CPU under the Triton interpreter): three small Triton
kernels, chunk-parallel and deterministic (per-chunk counts; one program scans them into padded offsets and
per-chunk bases; each chunk places its pairs in order and labels its share of the blocks), O(T*k*E / programs).
Elsewhere: sync-free torch ops (a stable argsort and ~10 small kernels, measured at 46-170 µs per call on an H100
in a CUDA graph, which is a large part of a decode or mid-size layer). Expert ids outside [0, E) are an error
for the torch ops (device assert) and are dropped (routed nowhere) by the kernels.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from ._triton_utils import interpreting, next_pow2


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


@triton.jit
def _align_count_kernel(ids_ptr, hist_ptr, sorted_ptr, n, cap, E, CHUNK: tl.constexpr, SUB: tl.constexpr,
                        E_P2: tl.constexpr, FILL: tl.constexpr):
    """Program c: pairs per expert in chunk c -> hist[c, :]; and its share of sorted_ids filled with n (padding;
    the place kernel overwrites the real slots later)."""
    c = tl.program_id(0)
    experts = tl.arange(0, E_P2)
    counts = tl.zeros([E_P2], dtype=tl.int32)
    for start in range(c * CHUNK, c * CHUNK + CHUNK, SUB):
        offs = start + tl.arange(0, SUB)
        e = tl.load(ids_ptr + offs, mask=offs < n, other=-1).to(tl.int32)
        hit = (e[:, None] == experts[None, :]) & (experts < E)[None, :]
        counts += tl.sum(hit.to(tl.int32), axis=0)
    tl.store(hist_ptr + c * E_P2 + experts, counts)
    for start in range(c * FILL, c * FILL + FILL, SUB * 4):
        offs = start + tl.arange(0, SUB * 4)
        tl.store(sorted_ptr + offs, tl.zeros([SUB * 4], dtype=tl.int32) + n, mask=offs < cap)


@triton.jit
def _align_scan_kernel(hist_ptr, base_ptr, offsets_ptr, counts_ptr, num_padded_ptr, NC, E, BS: tl.constexpr,
                       E_P2: tl.constexpr, ROWS: tl.constexpr):
    """One program: totals per expert, padded offsets, and base[c, e] = the slot of chunk c's first pair of e."""
    experts = tl.arange(0, E_P2)
    counts = tl.zeros([E_P2], dtype=tl.int32)
    for r0 in range(0, NC, ROWS):
        rows = r0 + tl.arange(0, ROWS)
        h = tl.load(hist_ptr + rows[:, None] * E_P2 + experts[None, :], mask=(rows < NC)[:, None], other=0)
        counts += tl.sum(h, axis=0)
    padded = (counts + BS - 1) // BS * BS
    pad_end = tl.cumsum(padded, axis=0)
    running = pad_end - padded  # pad_start
    tl.store(offsets_ptr + experts, running, mask=experts < E)
    tl.store(offsets_ptr + E, tl.sum(padded, axis=0))
    tl.store(counts_ptr + experts, counts.to(tl.int64), mask=experts < E)
    tl.store(num_padded_ptr, tl.sum(padded, axis=0))
    for r0 in range(0, NC, ROWS):
        rows = r0 + tl.arange(0, ROWS)
        h = tl.load(hist_ptr + rows[:, None] * E_P2 + experts[None, :], mask=(rows < NC)[:, None], other=0)
        tl.store(base_ptr + rows[:, None] * E_P2 + experts[None, :], running[None, :] + tl.cumsum(h, axis=0) - h,
                 mask=(rows < NC)[:, None])
        running += tl.sum(h, axis=0)


@triton.jit
def _align_place_kernel(ids_ptr, base_ptr, offsets_ptr, sorted_ptr, block_expert_ptr, n, NB, E,
                        CHUNK: tl.constexpr, SUB: tl.constexpr, E_P2: tl.constexpr, BS: tl.constexpr,
                        BLOCKS: tl.constexpr):
    """Program c: the pairs of chunk c into their slots, in order; and the experts of its share of the blocks."""
    c = tl.program_id(0)
    experts = tl.arange(0, E_P2)
    next_slot = tl.load(base_ptr + c * E_P2 + experts)
    for start in range(c * CHUNK, c * CHUNK + CHUNK, SUB):
        offs = start + tl.arange(0, SUB)
        e = tl.load(ids_ptr + offs, mask=offs < n, other=-1).to(tl.int32)
        hit = (e[:, None] == experts[None, :]) & (experts < E)[None, :]
        hit_i = hit.to(tl.int32)
        rank = tl.cumsum(hit_i, axis=0) - 1  # earlier pairs of the same expert in this sub-chunk
        slot = tl.sum(tl.where(hit, rank + next_slot[None, :], 0), axis=1)
        tl.store(sorted_ptr + slot, offs, mask=tl.sum(hit_i, axis=1) > 0)
        next_slot += tl.sum(hit_i, axis=0)
    # a block's expert: how many experts end at or before its first slot (searchsorted, right)
    pad_end = tl.load(offsets_ptr + 1 + experts, mask=experts < E, other=2147483647)
    for b0 in range(c * BLOCKS, c * BLOCKS + BLOCKS, SUB):
        b = b0 + tl.arange(0, SUB)
        owner = tl.sum(((b * BS)[:, None] >= pad_end[None, :]).to(tl.int32), axis=1)
        tl.store(block_expert_ptr + b, tl.where(owner < E, owner, -1), mask=b < NB)


def _align_triton(flat, num_experts, block_size, cap):
    dev = flat.device
    n = flat.numel()
    e_p2 = next_pow2(num_experts)
    sub = max(16, min(256, 4096 // e_p2))  # [sub, E] one-hot tiles of <= 4096 elements: no spills
    chunk = max(sub, next_pow2(triton.cdiv(n, 128)))  # at most 128 chunks (programs)
    nc = triton.cdiv(n, chunk)
    nb = cap // block_size
    sorted_ids = torch.empty(cap, dtype=torch.int32, device=dev)
    block_expert = torch.empty(nb, dtype=torch.int32, device=dev)
    offsets = torch.empty(num_experts + 1, dtype=torch.int32, device=dev)
    counts = torch.empty(num_experts, dtype=torch.int64, device=dev)
    num_padded = torch.empty(1, dtype=torch.int32, device=dev)
    hist = torch.empty(nc, e_p2, dtype=torch.int32, device=dev)
    base = torch.empty(nc, e_p2, dtype=torch.int32, device=dev)
    warps = {} if interpreting() else {"num_warps": 4}
    _align_count_kernel[(nc,)](flat, hist, sorted_ids, n, cap, num_experts, CHUNK=chunk, SUB=sub, E_P2=e_p2,
                               FILL=triton.cdiv(triton.cdiv(cap, nc), sub * 4) * sub * 4, **warps)
    _align_scan_kernel[(1,)](hist, base, offsets, counts, num_padded, nc, num_experts, BS=block_size, E_P2=e_p2,
                             ROWS=max(1, 4096 // e_p2), **warps)
    _align_place_kernel[(nc,)](flat, base, offsets, sorted_ids, block_expert, n, nb, num_experts, CHUNK=chunk, SUB=sub,
                               E_P2=e_p2, BS=block_size, BLOCKS=triton.cdiv(triton.cdiv(nb, nc), sub) * sub, **warps)
    return sorted_ids, block_expert, offsets, counts, num_padded


def _align_torch(flat, num_experts, block_size, cap):
    dev = flat.device
    flat = flat.long()
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
    sorted_ids = torch.full((cap,), n, dtype=torch.int32, device=dev)
    sorted_ids[dest] = order.to(torch.int32)
    block_start = torch.arange(0, cap, block_size, device=dev)
    block_expert = torch.searchsorted(pad_end, block_start, right=True)
    block_expert = torch.where(block_expert < num_experts, block_expert, -1).to(torch.int32)
    offsets = torch.cat([pad_start, pad_end[-1:]]).to(torch.int32)
    return sorted_ids, block_expert, offsets, counts, pad_end[-1:].to(torch.int32)


def moe_align(topk_ids: torch.Tensor, num_experts: int, block_size: int, *, use_triton: bool | None = None) -> Alignment:
    """Sort the (token, slot) pairs of `topk_ids [T, k]` by expert, each expert padded to `block_size`.

    use_triton: None picks the Triton kernels on CUDA (or on CPU under the Triton interpreter) and torch ops
    otherwise; True / False force one (both give the same result).
    """
    if topk_ids.dim() != 2:
        raise ValueError(f"topk_ids must be [tokens, k], got shape {tuple(topk_ids.shape)}")
    if topk_ids.dtype.is_floating_point or topk_ids.dtype == torch.bool:
        raise ValueError(f"topk_ids must be an integer tensor, got {topk_ids.dtype}")
    flat = topk_ids.reshape(-1)
    flat = flat if flat.is_contiguous() else flat.contiguous()
    n = flat.numel()
    cap = aligned_capacity(n, num_experts, block_size)
    runnable = flat.is_cuda or (flat.device.type == "cpu" and isinstance(_align_place_kernel, InterpretedFunction)
                                and isinstance(tl.standard.cdiv, InterpretedFunction))
    if use_triton is None:
        use_triton = runnable and n > 0
    if use_triton and not runnable:
        raise RuntimeError("moe_align(use_triton=True) needs CUDA tensors, or CPU tensors under TRITON_INTERPRET=1")
    if use_triton and n == 0:
        use_triton = False
    parts = (_align_triton if use_triton else _align_torch)(flat, num_experts, block_size, cap)
    return Alignment(*parts, block_size, n)
