"""Fused w4a16 MoE layer: alignment -> GEMM1 (gate_up, SiLU(gate)·up) -> GEMM2 (down, · routing weight) -> top-k sum.

Design (v2; /work/notes/bench_kernels_v2.md has the profiles behind it):

- Dequantization in 16-bit, two elements per instruction. `prepare_moe_w4a16` re-lays each int32 word once at
  load so that codes 2i and 2i+1 of the word's 8 input columns sit at bits 4i and 16 + 4i. Then
  `(word >> 4i) & 0x000F000F | 0x43004300` is a bf16x2 register holding (128 + code, 128 + code') exactly
  (fp16: 0x6400, 1024 + code); one packed FMA subtracts (128 + zero) exactly, one packed FMA multiplies by the
  group scale (the only rounding, the same one as the reference's fp32 product rounded to 16 bits).
  That is ~2 instructions per weight element instead of ~10 (3 interleaves, variable shift, and, or, fp32
  subtract, multiply, convert), through `tl.inline_asm_elementwise` on the GPU; the Triton interpreter
  (CPU tests) runs the same math in plain Triton ops.
- The 8 outputs of one word are joined (`tl.join`, register-level) into 8 consecutive columns, so a thread
  ends up with whole 16-byte runs of K: no interleave/shuffle of int32 copies.
- Scales and zeros stay [E, K/g, N] (N contiguous, coalesced) and are turned into the packed 16-bit
  constants once per group and row, then broadcast over words, never over elements.
- GEMM1 loads the gate rows and the matching up rows as one 2·BLOCK_N-row tile: one dequant, one wide dot,
  and the accumulator is split into gate and up in the epilogue (SiLU(gate)·up, written in the activation dtype
  at the sorted (token, expert) slot).
- Two operand orders. Small M (few tokens per expert): out[n, m] = W[n, :] · x[m, :] (SWAP_AB), so the
  token tile can be 16 wide without filling the 64-row minimum of wgmma with empty token rows. Large M:
  out[m, n] = x[m, :] · W[n, :], 128-token tiles, the dequantized weight tile goes through shared memory as
  the dot's right operand, GROUP_M programs share a weight column (L2 reuse).
- GEMM2 multiplies by the routing weight in fp32 and adds into an fp32 [M, H] output with atomics: the top-k
  reduction and the split-K reduction in one (split-K keeps the SMs busy when few tokens hit few experts).

Everything between the host call and the result is sync-free, so the whole layer can be captured in a
CUDA graph.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from moequant.packing import PackedWeight

from ._triton_utils import interpreting, kernel_for
from .moe_align import moe_align

LAST_COMPILED: dict = {}  # the compiled kernels of the last call, for benchmarks to read registers / spills / SASS

# One int32 word (kernel nibble order) -> 8 16-bit weights. $8 word, $9 scale bits in both halves,
# $10 -(magic + zero) bits in both halves. Outputs $0..$7 = columns 0..7 of the word.
# The same code for both 16-bit types: only the type suffix, 1.0 and the magic number (the float whose
# ulp is 1, so OR-ing a code into its mantissa adds it exactly: 128 in bf16, 1024 in fp16) differ.
_DEQUANT_ASM = """{{
.reg .b32 c<4>, one, nzero;
mov.b32 one, {one};
mov.b32 nzero, 0x80008000;
lop3.b32 c0, $8, 0x000F000F, {magic}, 0xEA;
shr.u32 c1, $8, 4;
lop3.b32 c1, c1, 0x000F000F, {magic}, 0xEA;
shr.u32 c2, $8, 8;
lop3.b32 c2, c2, 0x000F000F, {magic}, 0xEA;
shr.u32 c3, $8, 12;
lop3.b32 c3, c3, 0x000F000F, {magic}, 0xEA;
fma.rn.{t} c0, c0, one, $10;
fma.rn.{t} c1, c1, one, $10;
fma.rn.{t} c2, c2, one, $10;
fma.rn.{t} c3, c3, one, $10;
fma.rn.{t} c0, c0, $9, nzero;
fma.rn.{t} c1, c1, $9, nzero;
fma.rn.{t} c2, c2, $9, nzero;
fma.rn.{t} c3, c3, $9, nzero;
mov.b32 {{$0, $1}}, c0;
mov.b32 {{$2, $3}}, c1;
mov.b32 {{$4, $5}}, c2;
mov.b32 {{$6, $7}}, c3;
}}"""
_DEQUANT_ASM_BF16 = tl.constexpr(_DEQUANT_ASM.format(t="bf16x2", one="0x3F803F80", magic="0x43004300"))
_DEQUANT_ASM_FP16 = tl.constexpr(_DEQUANT_ASM.format(t="f16x2", one="0x3C003C00", magic="0x64006400"))


@triton.jit
def _group_consts(s, z, HAS_ZEROS: tl.constexpr, USE_ASM: tl.constexpr):
    """Per (row, group) constants for `_dequant`, from scales s (16-bit) and zero codes z (uint8; unused if sym).

    asm: (scale bits in both 16-bit halves, bits of -(magic + zero) in both halves) as int32.
    plain: (scale, zero) as fp32."""
    if USE_ASM:
        sb = s.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        if HAS_ZEROS:
            zi = z.to(tl.int32)
        else:
            zi = tl.zeros_like(sb) + 8
        if s.dtype == tl.bfloat16:
            nz = zi | 0xC300  # -(128 + zero) in bf16
        else:
            nz = zi | 0xE400  # -(1024 + zero) in fp16
        return sb | (sb << 16), nz | (nz << 16)
    else:
        if HAS_ZEROS:
            zf = z.to(tl.float32)
        else:
            zf = tl.zeros_like(s.to(tl.float32)) + 8.0
        return s.to(tl.float32), zf


@triton.jit
def _plain_code(q, J: tl.constexpr, a, b, DTYPE: tl.constexpr):
    # column J of each word sits at bit 4*(J//2) + 16*(J%2) (kernel nibble order)
    c = ((q >> (4 * (J // 2) + 16 * (J % 2))) & 0xF).to(tl.float32)
    return ((c - b) * a).to(DTYPE)


@triton.jit
def _dequant(q, a, b, ROWS: tl.constexpr, COLS: tl.constexpr, DTYPE: tl.constexpr, USE_ASM: tl.constexpr):
    """q int32 [ROWS, COLS/8] (kernel nibble order), a/b from `_group_consts` broadcast over words
    -> [ROWS, COLS] DTYPE, column 8w + j = code j of word w, (code - zero) * scale rounded once."""
    if USE_ASM:
        if DTYPE == tl.bfloat16:
            o0, o1, o2, o3, o4, o5, o6, o7 = tl.inline_asm_elementwise(
                _DEQUANT_ASM_BF16, "=h,=h,=h,=h,=h,=h,=h,=h,r,r,r", [q, a, b],
                dtype=(tl.bfloat16, tl.bfloat16, tl.bfloat16, tl.bfloat16, tl.bfloat16, tl.bfloat16, tl.bfloat16, tl.bfloat16),
                is_pure=True, pack=1)
        else:
            o0, o1, o2, o3, o4, o5, o6, o7 = tl.inline_asm_elementwise(
                _DEQUANT_ASM_FP16, "=h,=h,=h,=h,=h,=h,=h,=h,r,r,r", [q, a, b],
                dtype=(tl.float16, tl.float16, tl.float16, tl.float16, tl.float16, tl.float16, tl.float16, tl.float16),
                is_pure=True, pack=1)
    else:
        o0 = _plain_code(q, 0, a, b, DTYPE)
        o1 = _plain_code(q, 1, a, b, DTYPE)
        o2 = _plain_code(q, 2, a, b, DTYPE)
        o3 = _plain_code(q, 3, a, b, DTYPE)
        o4 = _plain_code(q, 4, a, b, DTYPE)
        o5 = _plain_code(q, 5, a, b, DTYPE)
        o6 = _plain_code(q, 6, a, b, DTYPE)
        o7 = _plain_code(q, 7, a, b, DTYPE)
    # each join appends a trailing dim, so the outermost join picks the lowest bit of the column index
    w = tl.join(tl.join(tl.join(o0, o4), tl.join(o2, o6)), tl.join(tl.join(o1, o5), tl.join(o3, o7)))
    return tl.reshape(w, (ROWS, COLS))


@triton.jit
def _load_consts(s_ptr, z_ptr, srow, N, G, k0, ROWS: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_SIZE: tl.constexpr,
                 HAS_ZEROS: tl.constexpr, USE_ASM: tl.constexpr):
    """`_group_consts` [ROWS, NG] of the groups in K tile k0.. (NG = groups per tile); `srow` = e*G*N + row,
    scales / zeros [E, G, N]. Callers load the next tile's constants one iteration ahead: these small loads
    are not pipelined by the compiler, and waiting for them in every iteration would stall the dequant."""
    GS_TILE: tl.constexpr = GROUP_SIZE if GROUP_SIZE < BLOCK_K else BLOCK_K
    NG: tl.constexpr = BLOCK_K // GS_TILE  # groups inside one K tile (1 when the group spans the tile)
    grp = tl.minimum((k0 + tl.arange(0, NG) * GS_TILE) // GROUP_SIZE, G - 1)  # clamped past the last tile
    sz = srow[:, None] + grp[None, :].to(tl.int64) * N
    s = tl.load(s_ptr + sz)
    if HAS_ZEROS:
        z = tl.load(z_ptr + sz)
    else:
        z = s
    return _group_consts(s, z, HAS_ZEROS, USE_ASM)


@triton.jit
def _load_words(qw_ptr, wrow, KW, k0, W: tl.constexpr, MASKED: tl.constexpr):
    """Packed words [ROWS, W] for input columns k0.. of the rows `wrow` of qweight [E*N, KW = K/8]. KW comes from
    the host (not K // 8 in the kernel) so that Triton sees its divisibility by 16 and copies 16-byte runs.
    MASKED: words past KW read as code 0 (a ragged last tile: they meet x = 0 in the dot)."""
    offs_w = k0 // 8 + tl.arange(0, W)
    if MASKED:
        return tl.load(qw_ptr + wrow[:, None] * KW + offs_w[None, :], mask=(offs_w < KW)[None, :], other=0)
    else:
        return tl.load(qw_ptr + wrow[:, None] * KW + offs_w[None, :])


@triton.jit
def _weight_tile(q, a, b, ROWS: tl.constexpr, BLOCK_K: tl.constexpr, DTYPE: tl.constexpr, USE_ASM: tl.constexpr):
    """Dequantized weight tile [ROWS, BLOCK_K] from its words q [ROWS, BLOCK_K/8] and its group constants
    a, b [ROWS, NG] (`_load_consts`)."""
    W: tl.constexpr = BLOCK_K // 8
    NG: tl.constexpr = a.shape[1]
    if NG > 1:  # repeat each group's constants over its words
        a = tl.reshape(tl.broadcast_to(a[:, :, None], (ROWS, NG, W // NG)), (ROWS, W))
        b = tl.reshape(tl.broadcast_to(b[:, :, None], (ROWS, NG, W // NG)), (ROWS, W))
    return _dequant(q, a, b, ROWS, BLOCK_K, DTYPE, USE_ASM)


@triton.jit
def _tile_ids(NUM_M_BLOCKS, num_n, GROUP_M: tl.constexpr):
    # Program order: GROUP_M token blocks share a column of weight tiles (L2 reuse at large M).
    pid = tl.program_id(0)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_m = min(NUM_M_BLOCKS - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m
    return pid_m, pid_n


@triton.jit
def _moe_gemm1_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, inter_ptr, sorted_ids_ptr, block_expert_ptr,
    num_pairs, K, KW, I, G, stride_xm, NUM_M_BLOCKS,
    TOPK: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_ZEROS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
    GROUP_M: tl.constexpr, SWAP_AB: tl.constexpr, USE_ASM: tl.constexpr,
):
    pid_m, pid_n = _tile_ids(NUM_M_BLOCKS, tl.cdiv(I, BLOCK_N), GROUP_M)
    e = tl.load(block_expert_ptr + pid_m)
    if e < 0:  # block past the routed tokens
        return
    DTYPE: tl.constexpr = x_ptr.dtype.element_ty
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_ids_ptr + offs_m)
    valid = pair < num_pairs
    tok = (pair // TOPK).to(tl.int64)
    # one tile of 2*BLOCK_N weight rows: BLOCK_N gate rows, then the matching up rows (I further)
    offs_r = tl.arange(0, 2 * BLOCK_N)
    n = pid_n * BLOCK_N + offs_r % BLOCK_N
    n = tl.where(n < I, n, 0)  # clamped rows: loads stay in bounds, results are not stored
    row = n + tl.where(offs_r >= BLOCK_N, I, 0)  # row in the expert's [2I] rows
    wrow = e.to(tl.int64) * 2 * I + row
    srow = e.to(tl.int64) * G * 2 * I + row
    offs_k = tl.arange(0, BLOCK_K)

    if SWAP_AB:
        acc = tl.zeros((2 * BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, 2 * BLOCK_N), dtype=tl.float32)
    a, b = _load_consts(s_ptr, z_ptr, srow, 2 * I, G, 0, 2 * BLOCK_N, BLOCK_K, GROUP_SIZE, HAS_ZEROS, USE_ASM)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            xt = tl.load(x_ptr + tok[:, None] * stride_xm + (k0 + offs_k)[None, :], mask=valid[:, None], other=0.0)
        else:
            xt = tl.load(x_ptr + tok[:, None] * stride_xm + (k0 + offs_k)[None, :],
                         mask=valid[:, None] & ((k0 + offs_k) < K)[None, :], other=0.0)
        q = _load_words(qw_ptr, wrow, KW, k0, BLOCK_K // 8, not EVEN_K)  # staged in shared memory by the compiler
        w = _weight_tile(q, a, b, 2 * BLOCK_N, BLOCK_K, DTYPE, USE_ASM)
        a, b = _load_consts(s_ptr, z_ptr, srow, 2 * I, G, k0 + BLOCK_K, 2 * BLOCK_N, BLOCK_K, GROUP_SIZE, HAS_ZEROS,
                            USE_ASM)
        if SWAP_AB:  # out[n, m]: weights on the left
            acc = tl.dot(w, tl.trans(xt), acc)
        else:  # out[m, n]: tokens on the left, the weight tile through shared memory on the right
            acc = tl.dot(xt, tl.trans(w), acc)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if SWAP_AB:  # [2*BN, BM] -> gate, up [BN, BM]
        gate, up = tl.split(tl.permute(tl.reshape(acc, (2, BLOCK_N, BLOCK_M)), (1, 2, 0)))
        h = gate / (1.0 + tl.exp(-gate)) * up  # SiLU(gate) * up, fp32
        ptrs = inter_ptr + offs_m[None, :].to(tl.int64) * I + offs_n[:, None]
        tl.store(ptrs, h.to(DTYPE), mask=(offs_n < I)[:, None] & valid[None, :])
    else:  # [BM, 2*BN] -> gate, up [BM, BN]
        gate, up = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N)), (0, 2, 1)))
        h = gate / (1.0 + tl.exp(-gate)) * up
        ptrs = inter_ptr + offs_m[:, None].to(tl.int64) * I + offs_n[None, :]
        tl.store(ptrs, h.to(DTYPE), mask=valid[:, None] & (offs_n < I)[None, :])


@triton.jit
def _moe_gemm2_kernel(
    a_ptr, qw_ptr, s_ptr, z_ptr, out_ptr, sorted_ids_ptr, block_expert_ptr, topk_w_ptr,
    num_pairs, K, KW, N, G, K_ITERS, NUM_M_BLOCKS,
    TOPK: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_ZEROS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
    GROUP_M: tl.constexpr, SWAP_AB: tl.constexpr, USE_ASM: tl.constexpr,
):
    pid_m, pid_n = _tile_ids(NUM_M_BLOCKS, tl.cdiv(N, BLOCK_N), GROUP_M)
    pid_k = tl.program_id(1)  # split-K slice
    e = tl.load(block_expert_ptr + pid_m)
    if e < 0:
        return
    DTYPE: tl.constexpr = a_ptr.dtype.element_ty
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_ids_ptr + offs_m)
    valid = pair < num_pairs
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    row = tl.where(n_mask, offs_n, 0)
    wrow = e.to(tl.int64) * N + row
    srow = e.to(tl.int64) * G * N + row
    offs_k = tl.arange(0, BLOCK_K)
    a_rows = offs_m.to(tl.int64) * K  # GEMM1 wrote its output at the sorted positions

    if SWAP_AB:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_first = pid_k * K_ITERS * BLOCK_K
    a, b = _load_consts(s_ptr, z_ptr, srow, N, G, k_first, BLOCK_N, BLOCK_K, GROUP_SIZE, HAS_ZEROS, USE_ASM)
    for it in range(0, K_ITERS):
        k0 = k_first + it * BLOCK_K
        if EVEN_K:
            at = tl.load(a_ptr + a_rows[:, None] + (k0 + offs_k)[None, :], mask=valid[:, None], other=0.0)
        else:
            at = tl.load(a_ptr + a_rows[:, None] + (k0 + offs_k)[None, :],
                         mask=valid[:, None] & ((k0 + offs_k) < K)[None, :], other=0.0)
        q = _load_words(qw_ptr, wrow, KW, k0, BLOCK_K // 8, not EVEN_K)
        w = _weight_tile(q, a, b, BLOCK_N, BLOCK_K, DTYPE, USE_ASM)
        a, b = _load_consts(s_ptr, z_ptr, srow, N, G, k0 + BLOCK_K, BLOCK_N, BLOCK_K, GROUP_SIZE, HAS_ZEROS, USE_ASM)
        if SWAP_AB:
            acc = tl.dot(w, tl.trans(at), acc)
        else:
            acc = tl.dot(at, tl.trans(w), acc)

    rw = tl.load(topk_w_ptr + pair, mask=valid, other=0.0).to(tl.float32)  # routing weight, fp32
    tok = (pair // TOPK).to(tl.int64)
    if SWAP_AB:
        acc = acc * rw[None, :]
        tl.atomic_add(out_ptr + tok[None, :] * N + offs_n[:, None], acc, mask=n_mask[:, None] & valid[None, :])
    else:
        acc = acc * rw[:, None]
        tl.atomic_add(out_ptr + tok[:, None] * N + offs_n[None, :], acc, mask=valid[:, None] & n_mask[None, :])


@dataclass
class MoeW4A16Weight:
    """One expert projection in the kernel layout (see module docstring). Build with `prepare_moe_w4a16`."""

    qweight: torch.Tensor  # int32 [E, N, K/8], K contiguous, kernel nibble order (see `_to_kernel_order`)
    scales: torch.Tensor  # [E, K/g, N], as in the checkpoint
    qzeros: torch.Tensor | None  # uint8 [E, K/g, N] or None (symmetric: zero 8)
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


def _to_kernel_order(qweight: torch.Tensor) -> torch.Tensor:
    """int32 [K/8, N] in the checkpoint order (code j of a word at bits 4j) -> int32 [N, K/8] with code j at
    bits 4*(j//2) + 16*(j%2), so that one mask gives the 16-bit pair (code 2i, code 2i+1) of a word."""
    w = qweight.to(torch.int64) & 0xFFFFFFFF
    out = torch.zeros_like(w)
    for j in range(8):
        out |= ((w >> (4 * j)) & 0xF) << (4 * (j // 2) + 16 * (j % 2))
    out = torch.where(out >= 2**31, out - 2**32, out)
    return out.to(torch.int32).t().contiguous()


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
    if w.scales.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"{name}: scales must be bf16 or fp16 (the activation dtype), got {w.scales.dtype}")
    if w.qzeros is not None and tuple(w.qzeros.shape) != (E, K // g, N):
        raise ValueError(f"{name}: qzeros shape {tuple(w.qzeros.shape)} does not match scales {tuple(w.scales.shape)}")
    qweight = torch.stack([_to_kernel_order(w.qweight[e]) for e in range(E)])  # one expert at a time: bounded memory
    zeros = None if w.qzeros is None else w.qzeros.to(torch.uint8).contiguous()
    return MoeW4A16Weight(qweight, w.scales.contiguous(), zeros, g)


@dataclass(frozen=True)
class MoeConfig:
    block_m: int  # tokens per tile
    block_n1: int  # GEMM1 output columns per tile (the tile holds that many gate rows and as many up rows)
    block_n2: int  # GEMM2 output columns per tile
    block_k: int
    split_k: int  # GEMM2 only (GEMM1's SiLU epilogue needs the whole K)
    num_warps: int
    num_stages: int
    group_m: int = 8
    swap_ab: bool = True  # weights as the dot's left operand (small M; see module docstring)
    asm: bool = True  # packed 16-bit dequant in inline PTX (GPU); False: the same math in plain Triton ops


def default_config(M: int, topk: int, E: int, H: int, I: int) -> MoeConfig:
    """Tiles by the expected tokens per hit expert; split-K on GEMM2 while it has fewer than 4 programs per SM.

    From the H100 sweeps of 2026-11-25 (benchmarks/bench_moe_gemm.py --sweep; /work/notes/bench_kernels_v2.md).
    Tokens on the left (swap_ab=False) only with <= 16 weight rows per warp: Triton 3.6 fails to compile the
    shared-memory layout of a taller dequantized tile ("Illegal shared layout")."""
    if interpreting():
        return MoeConfig(16, 32, 32, 32, 2, 4, 1)
    per_expert = M * topk / min(E, M * topk)
    if per_expert <= 16:  # weights on the left, 16-token tiles, long K tiles: streaming the weights
        cfg = MoeConfig(16, 32, 64, 256, 1, 4, 4)
    elif per_expert <= 48:  # one 64-token tile per expert reads (and dequantizes) its weights once
        cfg = MoeConfig(64, 64, 64, 64, 1, 4, 4)
    else:  # tokens on the left, 128 x (64 gate + 64 up) tiles, 2 CTAs of 8 warps per SM
        cfg = MoeConfig(128, 64, 128, 64, 1, 8, 4, swap_ab=False)
    hit = min(E, M * topk)
    progs2 = hit * triton.cdiv(H, cfg.block_n2) * max(1, triton.cdiv(M * topk, hit * cfg.block_m))
    split = 1
    while progs2 * split < 4 * 132 and split < 4 and I // (cfg.block_k * split * 2) >= 2:
        split *= 2
    return dataclasses.replace(cfg, split_k=split)


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
    for name, w in (("w13", w13), ("w2", w2)):
        if w.scales.dtype != x.dtype:
            raise ValueError(f"fused_moe_w4a16: {name} scales are {w.scales.dtype}, x is {x.dtype}; quantize with "
                             f"scales in the activation dtype (scale_dtype=x.dtype) or cast x")
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
    PackedWeight (re-laid on every call: slow) or as `prepare_moe_w4a16` results (do that once at load); their
    scales in x's dtype. Group sizes dividing K (multiples of 16) or per channel; symmetric or asymmetric.
    Returns [M, H] in x's dtype.
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
    use_asm = cfg.asm and not interpreting()
    x = x if x.stride(1) == 1 else x.contiguous()
    al = moe_align(topk_ids, E, cfg.block_m)
    nmb = al.num_blocks
    launch = {} if interpreting() else {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    zeros = lambda w: w.qzeros if w.qzeros is not None else w.scales  # a placeholder pointer when symmetric

    bk1 = _block_k(cfg.block_k, H, w13.group_size)
    inter = torch.empty(al.sorted_ids.numel(), I, dtype=x.dtype, device=x.device)
    grid1 = (nmb * triton.cdiv(I, cfg.block_n1),)
    LAST_COMPILED["gemm1"] = k1[grid1](
        x, w13.qweight, w13.scales, zeros(w13), inter,
        al.sorted_ids, al.block_expert, al.num_pairs, H, H // 8, I, H // w13.group_size, x.stride(0), nmb,
        TOPK=topk, GROUP_SIZE=w13.group_size, HAS_ZEROS=w13.qzeros is not None,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n1, BLOCK_K=bk1, EVEN_K=H % bk1 == 0,
        GROUP_M=cfg.group_m, SWAP_AB=cfg.swap_ab, USE_ASM=use_asm, **launch,
    )

    bk2 = _block_k(cfg.block_k, I, w2.group_size)
    n_kb = triton.cdiv(I, bk2)
    split = max(1, min(cfg.split_k, n_kb))
    k_iters = triton.cdiv(n_kb, split)
    split = triton.cdiv(n_kb, k_iters)  # no empty slices
    out = torch.zeros(M, H, dtype=torch.float32, device=x.device)
    grid2 = (nmb * triton.cdiv(H, cfg.block_n2), split)
    LAST_COMPILED["gemm2"] = k2[grid2](
        inter, w2.qweight, w2.scales, zeros(w2), out,
        al.sorted_ids, al.block_expert, topk_weights.contiguous(), al.num_pairs, I, I // 8, H, I // w2.group_size,
        k_iters, nmb,
        TOPK=topk, GROUP_SIZE=w2.group_size, HAS_ZEROS=w2.qzeros is not None,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n2, BLOCK_K=bk2, EVEN_K=(I % bk2 == 0 and n_kb % split == 0),
        GROUP_M=cfg.group_m, SWAP_AB=cfg.swap_ab, USE_ASM=use_asm, **launch,
    )
    return out.to(x.dtype)
