"""Fused w4a16 MoE layer: alignment -> GEMM1 (gate_up, SiLU(gate)·up) -> GEMM2 (down, · routing weight) -> top-k sum.

Design (against the causes of a slow first version: per-element scale loads, fp32 dequant in the K loop,
no split-K, 16-row tiles mostly empty at small M):

- Swap A and B: each program computes out[n, m] = W[n, :] · x[m, :] for a tile of BLOCK_N weight rows and
  BLOCK_M routed tokens. The dequantized weight tile is the dot's *left* operand, kept in registers (Hopper's
  wgmma takes A from registers, B from shared memory), and the token tile is the right operand, whose
  width can be 16 without wasting the 64-row minimum of wgmma on empty token rows.
- Weights are re-laid once at load (`prepare_moe_w4a16`): codes as int32 [E, N, K/8], K contiguous per
  output row, so a tile is BLOCK_K/8 consecutive words per row (16-byte loads); scales and zeros as
  [E, N, K/g]. Per K step a program loads one scale (and zero) per row and group, never one per element.
- int4 -> float by the exponent trick: (code | 0x4B000000) read as fp32 is 2^23 + code, so one subtract
  gives code - zero exactly, one multiply applies the scale, and no int->float conversion is issued.
- GEMM1 keeps two accumulators (gate rows n and up rows I + n) and writes SiLU(gate)·up in the activation
  dtype, one row per sorted (token, expert) slot. GEMM2 multiplies by the routing weight in fp32 and adds
  into an fp32 [M, H] output with atomics, which is both the top-k reduction and the split-K reduction
  (split-K keeps the SMs busy when few tokens hit few experts).

Everything between the host call and the result is sync-free, so the whole layer can be captured in a
CUDA graph.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from moequant.packing import PackedWeight

from ._triton_utils import interpreting, kernel_for
from .moe_align import moe_align

LAST_COMPILED: dict = {}  # the compiled kernels of the last call, for benchmarks to read registers / spills / SASS
_MAGIC = tl.constexpr(8388608.0)  # 2^23: the fp32 whose low mantissa bits hold the int4 code


@triton.jit
def _moe_gemm1_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, inter_ptr, sorted_ids_ptr, block_expert_ptr,
    num_pairs, K, I, G, stride_xm, NUM_M_BLOCKS,
    TOPK: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_ZEROS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
    GROUP_M: tl.constexpr, SWAP_AB: tl.constexpr,
):
    # Program order: GROUP_M token blocks share a weight column of tiles (L2 reuse at large M).
    pid = tl.program_id(0)
    num_n = tl.cdiv(I, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_m = min(NUM_M_BLOCKS - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m

    e = tl.load(block_expert_ptr + pid_m)
    if e < 0:  # block past the routed tokens
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_ids_ptr + offs_m)
    valid = pair < num_pairs
    tok = (pair // TOPK).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < I
    offs_n = tl.where(n_mask, offs_n, 0)  # clamped rows: loads stay in bounds, results are not stored
    row_g = e.to(tl.int64) * 2 * I + offs_n  # gate rows, then up rows I further
    row_u = row_g + I
    KW = K // 8
    offs_kw = tl.arange(0, BLOCK_K // 8)
    offs_k = tl.arange(0, BLOCK_K)
    shifts = (offs_k % 8) * 4
    GS_TILE: tl.constexpr = GROUP_SIZE if GROUP_SIZE < BLOCK_K else BLOCK_K
    NG: tl.constexpr = BLOCK_K // GS_TILE  # groups inside one K tile (1 when the group spans the tile)

    if SWAP_AB:  # out[n, m]: weights are the left operand (registers), tokens the right (shared memory)
        acc_g = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:  # out[m, n]: tokens on the left, the dequantized weights go through shared memory
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kmask = (k0 + offs_k) < K
        if EVEN_K:
            xt = tl.load(x_ptr + tok[:, None] * stride_xm + (k0 + offs_k)[None, :], mask=valid[:, None], other=0.0)
            qg = tl.load(qw_ptr + row_g[:, None] * KW + (k0 // 8 + offs_kw)[None, :])
            qu = tl.load(qw_ptr + row_u[:, None] * KW + (k0 // 8 + offs_kw)[None, :])
        else:
            kwmask = (k0 // 8 + offs_kw) < KW
            xt = tl.load(x_ptr + tok[:, None] * stride_xm + (k0 + offs_k)[None, :],
                         mask=valid[:, None] & kmask[None, :], other=0.0)
            qg = tl.load(qw_ptr + row_g[:, None] * KW + (k0 // 8 + offs_kw)[None, :], mask=kwmask[None, :], other=0)
            qu = tl.load(qw_ptr + row_u[:, None] * KW + (k0 // 8 + offs_kw)[None, :], mask=kwmask[None, :], other=0)
        # group index of this tile's groups (clamped on a ragged last tile: those columns meet x = 0)
        grp = tl.minimum((k0 + tl.arange(0, NG) * GS_TILE) // GROUP_SIZE, G - 1)
        sg = tl.load(s_ptr + row_g[:, None] * G + grp[None, :]).to(tl.float32)  # [BLOCK_N, NG]
        su = tl.load(s_ptr + row_u[:, None] * G + grp[None, :]).to(tl.float32)
        if HAS_ZEROS:
            zg = tl.load(z_ptr + row_g[:, None] * G + grp[None, :]).to(tl.float32) + _MAGIC
            zu = tl.load(z_ptr + row_u[:, None] * G + grp[None, :]).to(tl.float32) + _MAGIC
        else:
            zg = tl.full((BLOCK_N, NG), _MAGIC + 8.0, tl.float32)
            zu = zg
        if NG > 1:  # several groups per tile: repeat each group's value over its GS_TILE columns
            sg = tl.reshape(tl.broadcast_to(sg[:, :, None], (BLOCK_N, NG, GS_TILE)), (BLOCK_N, BLOCK_K))
            su = tl.reshape(tl.broadcast_to(su[:, :, None], (BLOCK_N, NG, GS_TILE)), (BLOCK_N, BLOCK_K))
            zg = tl.reshape(tl.broadcast_to(zg[:, :, None], (BLOCK_N, NG, GS_TILE)), (BLOCK_N, BLOCK_K))
            zu = tl.reshape(tl.broadcast_to(zu[:, :, None], (BLOCK_N, NG, GS_TILE)), (BLOCK_N, BLOCK_K))
        qg = tl.interleave(qg, qg)  # word j -> columns 8j..8j+7
        qg = tl.interleave(qg, qg)
        qg = tl.interleave(qg, qg)
        qu = tl.interleave(qu, qu)  # word j -> columns 8j..8j+7
        qu = tl.interleave(qu, qu)
        qu = tl.interleave(qu, qu)
        wg = ((((qg >> shifts[None, :]) & 0xF) | 0x4B000000).to(tl.float32, bitcast=True) - zg) * sg
        wu = ((((qu >> shifts[None, :]) & 0xF) | 0x4B000000).to(tl.float32, bitcast=True) - zu) * su
        if SWAP_AB:
            xt_t = tl.trans(xt)
            acc_g = tl.dot(wg.to(xt.dtype), xt_t, acc_g)
            acc_u = tl.dot(wu.to(xt.dtype), xt_t, acc_u)
        else:
            acc_g = tl.dot(xt, tl.trans(wg.to(xt.dtype)), acc_g)
            acc_u = tl.dot(xt, tl.trans(wu.to(xt.dtype)), acc_u)

    if not SWAP_AB:
        acc_g = tl.trans(acc_g)
        acc_u = tl.trans(acc_u)
    h = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u  # SiLU(gate) * up, fp32
    ptrs = inter_ptr + offs_m[None, :].to(tl.int64) * I + offs_n[:, None]
    tl.store(ptrs, h.to(inter_ptr.dtype.element_ty), mask=n_mask[:, None] & valid[None, :])


@triton.jit
def _moe_gemm2_kernel(
    a_ptr, qw_ptr, s_ptr, z_ptr, out_ptr, sorted_ids_ptr, block_expert_ptr, topk_w_ptr,
    num_pairs, K, N, G, K_ITERS, NUM_M_BLOCKS,
    TOPK: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_ZEROS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
    GROUP_M: tl.constexpr, SWAP_AB: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)  # split-K slice
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_m = min(NUM_M_BLOCKS - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m

    e = tl.load(block_expert_ptr + pid_m)
    if e < 0:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_ids_ptr + offs_m)
    valid = pair < num_pairs
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_n = tl.where(n_mask, offs_n, 0)
    row = e.to(tl.int64) * N + offs_n
    KW = K // 8
    offs_kw = tl.arange(0, BLOCK_K // 8)
    offs_k = tl.arange(0, BLOCK_K)
    shifts = (offs_k % 8) * 4
    GS_TILE: tl.constexpr = GROUP_SIZE if GROUP_SIZE < BLOCK_K else BLOCK_K
    NG: tl.constexpr = BLOCK_K // GS_TILE
    a_rows = offs_m.to(tl.int64) * K  # GEMM1 wrote its output at the sorted positions

    if SWAP_AB:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for it in range(0, K_ITERS):
        k0 = (pid_k * K_ITERS + it) * BLOCK_K
        if EVEN_K:
            at = tl.load(a_ptr + a_rows[:, None] + (k0 + offs_k)[None, :], mask=valid[:, None], other=0.0)
            q = tl.load(qw_ptr + row[:, None] * KW + (k0 // 8 + offs_kw)[None, :])
        else:
            kmask = (k0 + offs_k) < K
            kwmask = (k0 // 8 + offs_kw) < KW
            at = tl.load(a_ptr + a_rows[:, None] + (k0 + offs_k)[None, :], mask=valid[:, None] & kmask[None, :],
                         other=0.0)
            q = tl.load(qw_ptr + row[:, None] * KW + (k0 // 8 + offs_kw)[None, :], mask=kwmask[None, :], other=0)
        grp = tl.minimum((k0 + tl.arange(0, NG) * GS_TILE) // GROUP_SIZE, G - 1)
        s = tl.load(s_ptr + row[:, None] * G + grp[None, :]).to(tl.float32)
        if HAS_ZEROS:
            z = tl.load(z_ptr + row[:, None] * G + grp[None, :]).to(tl.float32) + _MAGIC
        else:
            z = tl.full((BLOCK_N, NG), _MAGIC + 8.0, tl.float32)
        if NG > 1:
            s = tl.reshape(tl.broadcast_to(s[:, :, None], (BLOCK_N, NG, GS_TILE)), (BLOCK_N, BLOCK_K))
            z = tl.reshape(tl.broadcast_to(z[:, :, None], (BLOCK_N, NG, GS_TILE)), (BLOCK_N, BLOCK_K))
        q = tl.interleave(q, q)  # word j -> columns 8j..8j+7
        q = tl.interleave(q, q)
        q = tl.interleave(q, q)
        w = ((((q >> shifts[None, :]) & 0xF) | 0x4B000000).to(tl.float32, bitcast=True) - z) * s
        if SWAP_AB:
            acc = tl.dot(w.to(at.dtype), tl.trans(at), acc)
        else:
            acc = tl.dot(at, tl.trans(w.to(at.dtype)), acc)
    if not SWAP_AB:
        acc = tl.trans(acc)

    rw = tl.load(topk_w_ptr + pair, mask=valid, other=0.0).to(tl.float32)  # routing weight, fp32
    acc = acc * rw[None, :]
    tok = (pair // TOPK).to(tl.int64)
    tl.atomic_add(out_ptr + tok[None, :] * N + offs_n[:, None], acc, mask=n_mask[:, None] & valid[None, :])


@dataclass
class MoeW4A16Weight:
    """One expert projection in the kernel layout (see module docstring). Build with `prepare_moe_w4a16`."""

    qweight: torch.Tensor  # int32 [E, N, K/8]
    scales: torch.Tensor  # [E, N, K/g]
    qzeros: torch.Tensor | None  # uint8 [E, N, K/g] or None (symmetric: zero 8)
    group_size: int

    @property
    def num_experts(self) -> int:
        return self.qweight.shape[0]

    @property
    def out_features(self) -> int:
        return self.qweight.shape[1]

    @property
    def in_features(self) -> int:
        return self.qweight.shape[2] * 8


def prepare_moe_w4a16(w: PackedWeight, name: str = "weight") -> MoeW4A16Weight:
    """Re-lay a packed expert weight (PackedWeight, qweight [E, K/8, N]) for `fused_moe_w4a16`. Do it once at load."""
    if isinstance(w, MoeW4A16Weight):
        return w
    if not isinstance(w, PackedWeight):
        raise TypeError(f"{name}: expected a moequant.packing.PackedWeight, got {type(w).__name__}")
    if w.bits != 4:
        raise ValueError(f"{name}: fused_moe_w4a16 runs 4-bit weights only, got bits={w.bits}; "
                         f"use moequant.reference.fused_moe_w4a16_ref for other widths")
    if w.g_idx is not None:
        raise ValueError(f"{name}: act-order weights (g_idx) are not supported by fused_moe_w4a16; "
                         f"quantize without act-order (desc_act=False) or use the reference")
    if w.qweight.dim() != 3 or w.qweight.dtype != torch.int32:
        raise ValueError(f"{name}: qweight must be int32 [E, K/8, N], got {w.qweight.dtype} {tuple(w.qweight.shape)}")
    E, KW, N = w.qweight.shape
    K = KW * 8
    g = w.group_size
    if g <= 0 or K % g:
        raise ValueError(f"{name}: group size {g} does not divide the input dim {K}")
    if g % 16:
        raise ValueError(f"{name}: group size {g} is not a multiple of 16, which the kernel's K tiles need")
    if tuple(w.scales.shape) != (E, K // g, N):
        raise ValueError(f"{name}: scales shape {tuple(w.scales.shape)} does not match qweight {tuple(w.qweight.shape)} "
                         f"with group size {g}: expected {(E, K // g, N)}")
    if w.qzeros is not None and tuple(w.qzeros.shape) != (E, K // g, N):
        raise ValueError(f"{name}: qzeros shape {tuple(w.qzeros.shape)} does not match scales {tuple(w.scales.shape)}")
    tr = lambda t: None if t is None else t.transpose(1, 2).contiguous()
    return MoeW4A16Weight(tr(w.qweight), tr(w.scales), tr(w.qzeros), g)


@dataclass(frozen=True)
class MoeConfig:
    block_m: int
    block_n1: int
    block_n2: int
    block_k: int
    split_k: int  # GEMM2 only (GEMM1's SiLU epilogue needs the whole K)
    num_warps: int
    num_stages: int
    group_m: int = 8
    swap_ab: bool = True  # weights as the dot's left operand (see module docstring)


def default_config(M: int, topk: int, E: int, H: int, I: int) -> MoeConfig:
    """Tiles by the expected tokens per hit expert. Small M: 16-token tiles, long K tiles, split-K on GEMM2."""
    if interpreting():
        return MoeConfig(16, 32, 32, 32, 2, 4, 1)
    # Tiles from the H100 sweep of 2026-11-24 (benchmarks/bench_moe_gemm.py --sweep; /work/notes/bench_kernels.md).
    per_expert = M * topk / min(E, M * topk)
    if per_expert <= 16:
        bm, bn1, bn2, bk, warps, stages = 16, 64, 64, 256, 4, 3
    elif per_expert <= 32:
        bm, bn1, bn2, bk, warps, stages = 32, 64, 64, 128, 4, 4
    elif per_expert <= 512:
        bm, bn1, bn2, bk, warps, stages = 64, 64, 64, 64, 4, 4
    else:
        bm, bn1, bn2, bk, warps, stages = 128, 64, 128, 64, 4, 4
    hit = min(E, M * topk)
    progs2 = hit * triton.cdiv(H, bn2) * max(1, triton.cdiv(M * topk, hit * bm))
    split = 1
    target = 2 * 132
    while progs2 * split < target and split < 4 and I // (bk * split * 2) >= 2:
        split *= 2
    return MoeConfig(bm, bn1, bn2, bk, split, warps, stages)


def _block_k(cfg_bk: int, K: int, g: int) -> int:
    """A power-of-two K tile that nests with the group size (one divides the other) and is at most K."""
    bk = cfg_bk
    while bk > 16 and (g % bk and bk % g or bk > K):
        bk //= 2
    return bk


def _check_inputs(x, w13: MoeW4A16Weight, w2: MoeW4A16Weight, topk_ids, topk_weights):
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"fused_moe_w4a16: x must be bf16 or fp16, got {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"fused_moe_w4a16: x must be [tokens, hidden], got shape {tuple(x.shape)}")
    M, H = x.shape
    E = w13.num_experts
    if w2.num_experts != E:
        raise ValueError(f"fused_moe_w4a16: w13 has {E} experts, w2 has {w2.num_experts}")
    if w13.in_features != H:
        raise ValueError(f"fused_moe_w4a16: w13 packs input dim {w13.in_features}, x has hidden size {H}")
    if w13.out_features % 2:
        raise ValueError(f"fused_moe_w4a16: w13 must hold gate and up rows (2*I), got {w13.out_features} rows")
    I = w13.out_features // 2
    if w2.in_features != I or w2.out_features != H:
        raise ValueError(f"fused_moe_w4a16: w2 must be [E, {H}, {I}] (packed input dim {I}), "
                         f"got input {w2.in_features}, output {w2.out_features}")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != M or topk_ids.dtype.is_floating_point:
        raise ValueError(f"fused_moe_w4a16: topk_ids must be an integer [{M}, k] tensor, "
                         f"got {topk_ids.dtype} {tuple(topk_ids.shape)}")
    if tuple(topk_weights.shape) != tuple(topk_ids.shape) or not topk_weights.dtype.is_floating_point:
        raise ValueError(f"fused_moe_w4a16: topk_weights must be a float tensor shaped like topk_ids "
                         f"{tuple(topk_ids.shape)}, got {topk_weights.dtype} {tuple(topk_weights.shape)}")
    for name, t in (("w13", w13.qweight), ("w2", w2.qweight), ("topk_ids", topk_ids), ("topk_weights", topk_weights)):
        if t.device != x.device:
            raise ValueError(f"fused_moe_w4a16: {name} is on {t.device}, x on {x.device}; put them on one device")
    return M, H, I, E


def fused_moe_w4a16(x, w13, w2, topk_ids, topk_weights, *, config: MoeConfig | None = None):
    """y[m] = sum_s topk_weights[m, s] * down_e(SiLU(gate_e(x_m)) * up_e(x_m)),  e = topk_ids[m, s].

    x [M, H] bf16/fp16; w13 (gate_up, [E, 2I, H], gate rows first) and w2 (down, [E, H, I]) as 4-bit
    PackedWeight (re-laid on every call: slow) or as `prepare_moe_w4a16` results (do that once at load).
    Group sizes dividing K (multiples of 16) or per channel; symmetric or asymmetric. Returns [M, H] in x's dtype.
    """
    w13 = prepare_moe_w4a16(w13, "w13")
    w2 = prepare_moe_w4a16(w2, "w2")
    M, H, I, E = _check_inputs(x, w13, w2, topk_ids, topk_weights)
    k1 = kernel_for(_moe_gemm1_kernel, x.device, "fused_moe_w4a16")
    k2 = kernel_for(_moe_gemm2_kernel, x.device, "fused_moe_w4a16")
    if M == 0:
        return torch.empty_like(x)
    topk = topk_ids.shape[1]
    cfg = config or default_config(M, topk, E, H, I)
    x = x if x.stride(1) == 1 else x.contiguous()
    al = moe_align(topk_ids, E, cfg.block_m)
    nmb = al.num_blocks
    launch = {} if interpreting() else {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}

    bk1 = _block_k(cfg.block_k, H, w13.group_size)
    inter = torch.empty(al.sorted_ids.numel(), I, dtype=x.dtype, device=x.device)
    grid1 = (nmb * triton.cdiv(I, cfg.block_n1),)
    LAST_COMPILED["gemm1"] = k1[grid1](
        x, w13.qweight, w13.scales, w13.qzeros if w13.qzeros is not None else w13.scales, inter,
        al.sorted_ids, al.block_expert, al.num_pairs, H, I, H // w13.group_size, x.stride(0), nmb,
        TOPK=topk, GROUP_SIZE=w13.group_size, HAS_ZEROS=w13.qzeros is not None,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n1, BLOCK_K=bk1, EVEN_K=H % bk1 == 0,
        GROUP_M=cfg.group_m, SWAP_AB=cfg.swap_ab, **launch,
    )

    bk2 = _block_k(cfg.block_k, I, w2.group_size)
    n_kb = triton.cdiv(I, bk2)
    split = max(1, min(cfg.split_k, n_kb))
    k_iters = triton.cdiv(n_kb, split)
    split = triton.cdiv(n_kb, k_iters)  # no empty slices
    out = torch.zeros(M, H, dtype=torch.float32, device=x.device)
    grid2 = (nmb * triton.cdiv(H, cfg.block_n2), split)
    LAST_COMPILED["gemm2"] = k2[grid2](
        inter, w2.qweight, w2.scales, w2.qzeros if w2.qzeros is not None else w2.scales, out,
        al.sorted_ids, al.block_expert, topk_weights.contiguous(), al.num_pairs, I, H, I // w2.group_size, k_iters, nmb,
        TOPK=topk, GROUP_SIZE=w2.group_size, HAS_ZEROS=w2.qzeros is not None,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n2, BLOCK_K=bk2, EVEN_K=(I % bk2 == 0 and n_kb % split == 0),
        GROUP_M=cfg.group_m, SWAP_AB=cfg.swap_ab, **launch,
    )
    return out.to(x.dtype)
