"""Per-expert (affinity-weighted) Hessians in one kernel: H_e += sum_i w_ie x_i x_iᵀ (MoEQuant Eq. 19).

The routed (token, slot) pairs are grouped by expert with the same alignment as the fused MoE GEMMs
(`moe_align`), so each expert's rows form a run of whole blocks. One program owns one (expert, tile i,
tile j) with i <= j of the K x K result: it walks the expert's blocks of rows, multiplies the two
column slabs on the tensor cores (bf16/fp16 operands, fp32 accumulation) and adds the tile into H and its
transpose into the mirrored tile, so only the upper triangle is computed. Programs of one expert run
next to each other, so its rows are read from DRAM about once and re-read from L2.

The affinity is applied to one operand (rows x * w against rows x), which is the same sum as rows scaled
by sqrt(w) on both sides with one rounding to the input dtype instead of two; or, with `sqrt_w=True`, to both
as x * sqrt(w), each rounded once: then H is the Gram matrix of the rows actually multiplied, positive
semi-definite whatever the rounding (every weighted Hessian of the pipeline; `moequant.quant.hessian.scaled_rows`).
Diagonal tiles are symmetrised, so H is exactly symmetric.

Scaling inside the kernel puts arithmetic between the async copy and the tensor-core dot, so the scaled operand
makes a round trip through registers (ncu on the H100: 1.7x the instructions, tensor pipe 28% against 44%;
6.7-8.3 ms against 4.4 ms unweighted, E=64, K=2048, 64k tokens). The default for sqrt_w therefore forms the rows
first (`sorted_rows`): one memory-bound pass (85% of DRAM peak) writes x·√w for every pair in the alignment's
sorted order, and the unweighted kernel reads them as contiguous blocks (`SORTED`, no index loads): 5.0 ms in all.

Wide tiles (`wide=2`): a program owns a BLOCK_K x 2·BLOCK_K tile, i.e. two neighbouring square tiles that share
their row slab, so each row of x is loaded 1.5 times per pair of squares instead of twice (less traffic from L2
per multiply-add, which limits the square kernel at large K). The accumulator is split back into its two squares
for the epilogue, and each square is stored by the square kernel's rule (a diagonal square symmetrised, one
below the diagonal skipped). Every element of H sums the same products in the same order as with square tiles.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_utils import interpreting, kernel_for, next_pow2
from .moe_align import moe_align


@triton.jit
def _expert_hessian_kernel(
    x_ptr, w_ptr, sorted_ids_ptr, offsets_ptr, tiles_ptr, h_ptr,
    K, num_pairs, stride_x,
    TOPK: tl.constexpr, HAS_W: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr, SCALE_A: tl.constexpr, WIDE: tl.constexpr, SQRT_W: tl.constexpr,
    SORTED: tl.constexpr,
):
    tile = tl.program_id(0)
    e = tl.program_id(1)
    start = tl.load(offsets_ptr + e)
    end = tl.load(offsets_ptr + e + 1)
    if start == end:  # no rows routed to this expert: H_e is left as it was
        return
    ti = tl.load(tiles_ptr + 2 * tile)
    tj = tl.load(tiles_ptr + 2 * tile + 1)  # in units of WIDE * BLOCK_K columns
    offs_i = ti * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_j = tj * (WIDE * BLOCK_K) + tl.arange(0, WIDE * BLOCK_K)
    mask_i = offs_i < K
    mask_j = offs_j < K
    acc = tl.zeros((BLOCK_K, WIDE * BLOCK_K), dtype=tl.float32)
    for p0 in range(start, end, BLOCK_T):  # the expert's run is a whole number of blocks
        offs_p = p0 + tl.arange(0, BLOCK_T)
        if SORTED:  # x holds the rows in sorted order already (`sorted_rows`), padding rows zero
            pair = offs_p
            valid = offs_p >= 0
            row = offs_p.to(tl.int64) * stride_x
        else:
            pair = tl.load(sorted_ids_ptr + offs_p)
            valid = pair < num_pairs  # padding slots hold num_pairs
            row = (pair // TOPK).to(tl.int64) * stride_x
        a = tl.load(x_ptr + row[:, None] + offs_i[None, :], mask=valid[:, None] & mask_i[None, :], other=0.0)
        b = tl.load(x_ptr + row[:, None] + offs_j[None, :], mask=valid[:, None] & mask_j[None, :], other=0.0)
        if HAS_W:
            w = tl.load(w_ptr + pair, mask=valid, other=0.0).to(tl.float32)
            if SQRT_W:  # rows x·√w on both sides, each rounded once to the input dtype: a Gram matrix, so PSD
                r = tl.sqrt_rn(w)[:, None]
                a = (a.to(tl.float32) * r).to(x_ptr.dtype.element_ty)
                b = (b.to(tl.float32) * r).to(x_ptr.dtype.element_ty)
            elif SCALE_A:  # the left operand may live in registers (wgmma), the right one stays in shared memory
                a = (a.to(tl.float32) * w[:, None]).to(x_ptr.dtype.element_ty)
            else:
                b = (b.to(tl.float32) * w[:, None]).to(x_ptr.dtype.element_ty)
        acc = tl.dot(tl.trans(a), b, acc, input_precision=DOT_PRECISION)

    h_base = h_ptr + e.to(tl.int64) * K * K
    if WIDE == 1:
        _store_square(h_base, acc, ti, tj, K, BLOCK_K)
    else:  # the two squares of the tile, each by the square rule
        left, right = tl.split(tl.permute(tl.reshape(acc, (BLOCK_K, 2, BLOCK_K)), (0, 2, 1)))
        _store_square(h_base, left, ti, 2 * tj, K, BLOCK_K)
        _store_square(h_base, right, ti, 2 * tj + 1, K, BLOCK_K)


@triton.jit
def _store_square(h_base, acc, ti, tj, K, BLOCK_K: tl.constexpr):
    """H[ti-block, tj-block] += acc and its mirror, for square tiles of BLOCK_K; below the diagonal: nothing."""
    offs_i = ti * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_j = tj * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (offs_i < K)[:, None] & (offs_j < K)[None, :]
    ptr_ij = h_base + offs_i[:, None] * K + offs_j[None, :]
    if ti == tj:
        acc = (acc + tl.trans(acc)) * 0.5  # exact symmetry on the diagonal blocks
        tl.store(ptr_ij, tl.load(ptr_ij, mask=mask) + acc, mask=mask)
    elif ti < tj:
        tl.store(ptr_ij, tl.load(ptr_ij, mask=mask) + acc, mask=mask)
        ptr_ji = h_base + offs_j[None, :] * K + offs_i[:, None]  # tile (j, i) = acc transposed
        tl.store(ptr_ji, tl.load(ptr_ji, mask=mask) + acc, mask=mask)


@triton.jit
def _sorted_rows_kernel(x_ptr, w_ptr, sorted_ids_ptr, num_padded_ptr, out_ptr, K, num_pairs, stride_x,
                        TOPK: tl.constexpr, HAS_W: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """out[q] = x[p // TOPK] · √w[p] for the pair p at sorted position q (product in fp32, rounded once to x's
    dtype); padding positions get zero rows. Positions past num_padded are left alone (no expert reads them)."""
    q0 = tl.program_id(0) * BLOCK_R
    if q0 >= tl.load(num_padded_ptr):
        return
    offs_q = q0 + tl.arange(0, BLOCK_R)
    pair = tl.load(sorted_ids_ptr + offs_q)
    valid = pair < num_pairs
    row = (pair // TOPK).to(tl.int64) * stride_x
    if HAS_W:
        r = tl.sqrt_rn(tl.load(w_ptr + pair, mask=valid, other=0.0).to(tl.float32))[:, None]
    out_row = offs_q.to(tl.int64)[:, None] * K
    for c0 in range(0, K, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = (offs_c < K)[None, :]
        v = tl.load(x_ptr + row[:, None] + offs_c[None, :], mask=valid[:, None] & mask_c, other=0.0)
        if HAS_W:
            v = (v.to(tl.float32) * r).to(x_ptr.dtype.element_ty)
        tl.store(out_ptr + out_row + offs_c[None, :], v, mask=mask_c)


def sorted_rows(x, weights, al, topk):
    """The rows the Hessian kernel multiplies, formed once in the alignment's sorted order: [capacity, K], row q =
    x[t]·√w[t, s] for the pair (t, s) at position q, zero at padding positions. One pass that reads x (through L2,
    each token once per expert it went to) and writes pairs·K elements; the kernel then reads whole blocks of
    contiguous rows instead of gathering them, with no scaling between load and dot. topk: routing slots per row
    of x (the k of the topk_ids that `al` aligned)."""
    K = x.shape[1]
    out = torch.empty(al.sorted_ids.numel(), K, dtype=x.dtype, device=x.device)
    w = None if weights is None else weights.contiguous()
    block_r, block_c = (8, 32) if interpreting() else (8, 256)
    kernel = kernel_for(_sorted_rows_kernel, x.device, "expert_hessians")
    kernel[(triton.cdiv(out.shape[0], block_r),)](
        x, w if w is not None else x, al.sorted_ids, al.num_padded, out, K, al.num_pairs, x.stride(0),
        TOPK=topk, HAS_W=w is not None, BLOCK_R=block_r, BLOCK_C=block_c,
        **({} if interpreting() else {"num_warps": 4}),
    )
    return out


# Tile shape by default: 1 = square tiles, 2 = two squares side by side. Measured on the H100 (2026-11-25,
# benchmarks/bench_quantize_parts.py, Mixtral's down_proj rows, K = 14336): square 20.7 ms, the best wide setting
# 23.0 ms (same bits): the square kernel is not limited by its loads from L2 there, so wide tiles stay opt-in.
WIDE = 1

_TILE_CACHE: dict = {}


def _upper_tiles(num_tiles: int, device, wide: int = 1) -> torch.Tensor:
    """int32 [n, 2]: (i, j), row-major, for square tiles i <= j (wide=1); for tiles of `wide` squares side by side
    (j counts wide tiles) those holding a square on or above the diagonal: i < wide·(j + 1)."""
    key = (num_tiles, str(device), wide)
    if key not in _TILE_CACHE:
        if wide == 1:
            i, j = torch.triu_indices(num_tiles, num_tiles)
        else:
            pairs = [(a, b) for a in range(num_tiles) for b in range(-(-num_tiles // wide)) if a < wide * (b + 1)]
            i, j = torch.tensor(pairs, dtype=torch.int64).reshape(-1, 2).T
        _TILE_CACHE[key] = torch.stack([i, j], 1).to(torch.int32).contiguous().to(device)
    return _TILE_CACHE[key]


def _check(x, topk_ids, weights, num_experts, H, counts):
    if x.dim() != 2:
        raise ValueError(f"expert_hessians: x must be [tokens, K], got shape {tuple(x.shape)}")
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"expert_hessians: x must be bf16, fp16 or fp32, got {x.dtype}")
    T, K = x.shape
    if topk_ids.dim() != 2 or topk_ids.shape[0] != T:
        raise ValueError(f"expert_hessians: topk_ids must be [{T}, k], got {tuple(topk_ids.shape)}")
    if weights is not None and tuple(weights.shape) != tuple(topk_ids.shape):
        raise ValueError(f"expert_hessians: weights must match topk_ids {tuple(topk_ids.shape)}, got {tuple(weights.shape)}")
    if weights is not None and not weights.dtype.is_floating_point:
        raise ValueError(f"expert_hessians: weights must be floating point, got {weights.dtype}")
    for name, t in (("topk_ids", topk_ids), ("weights", weights), ("H", H), ("counts", counts)):
        if t is not None and t.device != x.device:
            raise ValueError(f"expert_hessians: {name} is on {t.device}, x on {x.device}; put them on one device")
    if H is not None:
        if tuple(H.shape) != (num_experts, K, K) or H.dtype != torch.float32 or not H.is_contiguous():
            raise ValueError(f"expert_hessians: H must be a contiguous fp32 [{num_experts}, {K}, {K}] tensor, "
                             f"got {H.dtype} {tuple(H.shape)}")
    if counts is not None and (tuple(counts.shape) != (num_experts,) or counts.dtype != torch.int64):
        raise ValueError(f"expert_hessians: counts must be int64 [{num_experts}], got {counts.dtype} {tuple(counts.shape)}")


def expert_hessians(x, topk_ids, weights, num_experts, H=None, counts=None, *, block_k=None, block_t=None,
                    num_warps=None, num_stages=None, scale_a=True, wide=None, sqrt_w=False, form_rows=None):
    """H_e += sum over pairs (t, s) routed to e of w[t, s] * x_t x_tᵀ; counts_e += number of such pairs.

    x [T, K] bf16/fp16/fp32, topk_ids [T, k] int, weights [T, k] or None (plain GPTQ Hessians).
    For down_proj, whose inputs are one row per (token, expert), pass topk_ids [N, 1] and weights [N, 1].
    H (fp32 [E, K, K]) and counts (int64 [E]) are accumulated in place when given. Returns (H, counts).
    Same semantics as `moequant.reference.expert_hessians_ref`; weights must be >= 0.
    wide: 1 (square tiles) or 2 (tiles of two squares side by side: module docstring); None: `WIDE`.
    sqrt_w: weight both operands by sqrt(w) (each rounded once to x's dtype) instead of one by w: the same sum in
    exact arithmetic, and a Gram matrix (PSD) after rounding.
    form_rows: form those rows first in sorted order (`sorted_rows`) and run the unweighted kernel on them; the
    default with sqrt_w (measured faster than scaling in the kernel, BENCHMARKS.md). Without weights: the plain
    rows (a copy). The same products either way; only the order of the fp32 sums may differ.
    """
    _check(x, topk_ids, weights, num_experts, H, counts)
    kernel = kernel_for(_expert_hessian_kernel, x.device, "expert_hessians")
    T, K = x.shape
    if H is None:
        H = torch.zeros(num_experts, K, K, dtype=torch.float32, device=x.device)
    if counts is None:
        counts = torch.zeros(num_experts, dtype=torch.int64, device=x.device)
    if T == 0 or K == 0:
        return H, counts
    interp = interpreting()
    bk = block_k or min(32 if interp else 128, max(16, next_pow2(K)))
    # Defaults from the H100 sweep of 2026-11-24 (E=64, K=2048, 64k tokens; /work/notes/bench_kernels.md):
    # GPTQ 32-row steps, 5 stages; AGQ (the scaling sits between load and dot) 64-row steps, 4 stages.
    fp32 = x.dtype == torch.float32
    if form_rows is None:
        form_rows = sqrt_w and weights is not None
    if form_rows and weights is not None and not sqrt_w:
        raise ValueError("expert_hessians: form_rows with weights forms the rows x·√w; pass sqrt_w=True")
    in_kernel_w = weights is not None and not form_rows  # the kernel scales operands between load and dot
    bt = block_t or (16 if interp else (64 if in_kernel_w and not fp32 else 32))
    wide = wide or WIDE
    if wide not in (1, 2):
        raise ValueError(f"expert_hessians: wide must be 1 or 2, got {wide}")
    num_warps = num_warps or (4 if wide == 1 else 8)
    num_stages = num_stages or (3 if fp32 else (4 if in_kernel_w else 5))
    x = x if x.stride(1) == 1 else x.contiguous()
    topk = topk_ids.shape[1]
    al = moe_align(topk_ids, num_experts, bt)
    w = None if weights is None else weights.contiguous()
    if form_rows:
        x, w = sorted_rows(x, w, al, topk), None
    tiles = _upper_tiles(triton.cdiv(K, bk), x.device, wide)
    grid = (tiles.shape[0], num_experts)
    precision = "tf32x3" if x.dtype == torch.float32 else "tf32"  # 16-bit operands ignore it
    kernel[grid](
        x, w if w is not None else x, al.sorted_ids, al.expert_offsets, tiles, H,
        K, al.num_pairs, x.stride(0),
        TOPK=topk, HAS_W=w is not None, BLOCK_T=bt, BLOCK_K=bk, DOT_PRECISION=precision, SCALE_A=scale_a, WIDE=wide,
        SQRT_W=bool(sqrt_w) and w is not None, SORTED=bool(form_rows),
        **({} if interp else {"num_warps": num_warps, "num_stages": num_stages}),
    )
    counts += al.counts
    return H, counts
