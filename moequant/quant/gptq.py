"""GPTQ, batched over same-shape matrices (all experts of a layer solved together).

For W [B, R, C] and Hessians H [B, C, C] (H = Σ x xᵀ, or Σ c·x xᵀ for AGQ), quantize the columns of each W left to
right; after each column, spread its rounding error over the not-yet-quantized columns through the Cholesky factor
U of H⁻¹ (H⁻¹ = Uᵀ U, U upper; Frantar et al. 2022, Alg. 1), `block_size` columns at a time:

    for each block S = [i1, i2):
        catch up    bring W[:, S] up to date with the errors of every column before i1
        inner loop  column by column inside the block (rows are independent: each row of W is its own problem)

Two ways to catch up, the same numbers up to fp32 round-off (`update=`):
- "right" (the textbook lazy update): after each block, W[:, i2:] -= E1 @ U[i1:i2, i2:] with the scaled errors E1.
  Needs U, i.e. the Cholesky factor of the inverse of H (a Cholesky plus a triangular inverse of C×C).
- "left" (default): with H = Ũ Ũᵀ (Ũ upper, the Cholesky factor of H with rows and columns reversed) U = Ũ⁻¹, and
  the errors so far, D = W − Q over the finished columns, give the block directly:
      W'[:, S] = W[:, S] + (D[:, :i1] @ Ũ[:i1, S]) @ Ũ[S, S]⁻¹,     U[S, S] = Ũ[S, S]⁻¹
  (from W − Q = E U and the block inverse of a triangular matrix). The same R·C² multiply-adds as the lazy update,
  but no C×C inverse: only the Cholesky of H and a 128×128 triangular inverse per block. At Mixtral's down_proj
  (C = 14336) that halves the factorisation work.
The Cholesky itself is blocked (`_cholesky_blocked`: left-looking, `CHOLESKY_BLOCK` columns per step, batched
matrix products over all experts at once) or cuSOLVER's (`CHOLESKY = "torch"`); again the same numbers up to round-off.
All of it is fp32 (fp64 when given fp64) with TF32 off; `tf32=True` allows TF32 in the catch-up products (faster on
tensor cores, ~1e-3 relative error in those products: it changes results, so it is an explicit option, off by default).

Two implementations of the inner loop, same math:
- torch: one Python iteration per column, each a handful of batched tensor ops (any device, any setting);
- Triton (`_gptq_block_kernel`, CUDA): one launch per block; each program keeps a [rows × block] tile of W in
  registers and walks the block's columns itself, so a column costs no kernel launches. At C = 14336 (Mixtral's
  down_proj) that is 112 launches instead of ~14336 × 10.
`backend="auto"` takes the kernel on CUDA for the settings it covers (fp32 compute; groups that divide the block or
start at block boundaries; static groups; MSE clipping only where the grid is computed outside the block) and the
torch loop otherwise. The two agree up to rare rounding ties (fused multiply-adds in the kernel).
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl

from .quantizer import QuantSpec, find_params, quantize_codes

log = logging.getLogger("moequant")

GPTQ_BACKENDS = ("auto", "torch", "triton")
UPDATES = ("left", "right")
# The catch-up rule gptq_quantize uses by default ("left": no C×C inverse; see the module docstring).
UPDATE = "left"


@dataclass
class GPTQResult:
    codes: torch.Tensor  # uint8 [B, R, C], original column order
    scales: torch.Tensor  # [B, G, R] scale dtype
    zeros: torch.Tensor  # [B, G, R] fp32 integer values
    g_idx: torch.Tensor | None  # int32 [B, C] when act-order without static groups
    weight: torch.Tensor  # dequantized W_hat [B, R, C] fp32
    damp: torch.Tensor  # relative damping finally used per matrix [B]
    notes: list = field(default_factory=list)


@contextmanager
def _matmul_precision(tf32: bool):
    """fp32 products in full fp32 (or TF32 when asked), whatever the process-wide setting says."""
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev


# -- Cholesky and H⁻¹ factors ---------------------------------------------------------------------------------------

CHOLESKIES = ("blocked", "torch")
# Which Cholesky the factorisations use: "blocked" (`_cholesky_blocked`) or "torch" (torch.linalg.cholesky_ex:
# cuSOLVER on CUDA, LAPACK on CPU). Matrices of at most CHOLESKY_BLOCK columns always go to torch.
CHOLESKY = "blocked"
CHOLESKY_BLOCK = 512


def _cholesky_blocked(A: torch.Tensor, nb: int | None = None):
    """Lower Cholesky factor of SPD matrices A [B, n, n], computed in place in A; and a per-matrix failure flag.

    Left-looking, nb columns per step: panel A[k:, k:k+nb] −= L[k:, :k] L[k:k+nb, :k]ᵀ (one batched matrix product
    for all B matrices), Cholesky of its nb×nb top, triangular solve for the rest. n³/3 multiply-adds per matrix
    like any Cholesky, nearly all of them in large batched GEMMs (cuSOLVER factorises a batch of large matrices one
    after the other). Only the lower triangle of A is read; the upper triangle is zeroed on return.
    """
    nb = nb or CHOLESKY_BLOCK
    B, n, _ = A.shape
    bad = torch.zeros(B, dtype=torch.bool, device=A.device)
    for k in range(0, n, nb):
        e = min(k + nb, n)
        panel = A[:, k:, k:e]
        if k:
            panel = torch.baddbmm(panel, A[:, k:, :k], A[:, k:e, :k].mT, alpha=-1)
        L11, info = torch.linalg.cholesky_ex(panel[:, : e - k])
        bad |= info != 0
        A[:, k:e, k:e] = L11
        if e < n:  # L21 L11ᵀ = A21
            A[:, e:, k:e] = torch.linalg.solve_triangular(L11.mT, panel[:, e - k:], upper=True, left=False)
    A.tril_()
    return A, bad


def _cholesky(A: torch.Tensor):
    """(L lower with A = L Lᵀ, failure flag per matrix) for A [B, n, n]; A may be overwritten."""
    if CHOLESKY == "blocked" and A.shape[-1] > CHOLESKY_BLOCK:
        return _cholesky_blocked(A)
    if CHOLESKY not in CHOLESKIES:
        raise ValueError(f"unknown Cholesky {CHOLESKY!r}; use one of {', '.join(CHOLESKIES)}")
    L, info = torch.linalg.cholesky_ex(A)
    return L, info != 0


def _triu_inverse(U: torch.Tensor, leaf: int = 512) -> torch.Tensor:
    """Inverse of upper-triangular U [..., n, n] by halves: [[A, B], [0, D]]⁻¹ = [[A⁻¹, −A⁻¹ B D⁻¹], [0, D⁻¹]].

    The off-diagonal block costs two dense matrix products (2n³/3 flops over the recursion, at GEMM speed) where a
    triangular solve against the identity costs n³ at the slower TRSM speed.
    """
    n = U.shape[-1]
    if n <= leaf:
        eye = torch.eye(n, dtype=U.dtype, device=U.device).expand_as(U)
        return torch.linalg.solve_triangular(U, eye, upper=True)
    h = (n // 2 + 127) // 128 * 128 if n > 256 else n // 2  # split on a multiple of 128: aligned GEMM operands
    Ai, Di = _triu_inverse(U[..., :h, :h], leaf), _triu_inverse(U[..., h:, h:], leaf)
    out = torch.zeros_like(U)
    out[..., :h, :h], out[..., h:, h:] = Ai, Di
    out[..., :h, h:] = -(Ai @ U[..., :h, h:]) @ Di
    return out


def _reversed_factor(Hd: torch.Tensor):
    """Ũ upper triangular with Hd = Ũ Ũᵀ, and a per-matrix failure flag: with J the column reversal,
    J Hd J = L Lᵀ gives Ũ = J L J. (Ũ⁻¹ is the upper Cholesky factor of Hd⁻¹, GPTQ's U.)"""
    L, bad = _cholesky(Hd.flip(-2, -1))
    return L.flip(-2, -1), bad


def _upper_factor_of_inverse(Hd: torch.Tensor, how: str):
    """U upper triangular with Hd⁻¹ = Uᵀ U, and a per-matrix failure flag.

    "inverse": Cholesky, explicit inverse, Cholesky again (the textbook GPTQ recipe).
    "reversed": U = Ũ⁻¹ with Ũ from `_reversed_factor`: one Cholesky and one triangular inverse, never forming Hd⁻¹
    ("reversed": by a triangular solve; "reversed-recursive": by halves with matrix products, `_triu_inverse`).
    "factor": Ũ itself (not an inverse factor: what the "left" update uses).
    """
    if how == "inverse":
        L, info = torch.linalg.cholesky_ex(Hd)
        Hinv = torch.cholesky_inverse(L)
        del L
        U, info2 = torch.linalg.cholesky_ex(Hinv, upper=True)
        return U, (info != 0) | (info2 != 0)
    if how in ("reversed", "reversed-recursive", "factor"):
        Ut, bad = _reversed_factor(Hd)
        if how == "factor":
            return Ut, bad
        if how == "reversed-recursive":
            return _triu_inverse(Ut), bad
        eye = torch.eye(Hd.shape[-1], dtype=Hd.dtype, device=Hd.device).expand_as(Hd)
        return torch.linalg.solve_triangular(Ut, eye, upper=True), bad
    raise ValueError(f"unknown factorisation {how!r}; use 'inverse', 'reversed', 'reversed-recursive' or 'factor'")


FACTORISATIONS = ("inverse", "reversed", "reversed-recursive")
# Which recipe for U the "right" update uses. Measured on an H100 (benchmarks/bench_quantize.py --factor-bench,
# 2026-11-25), 8 Mixtral down_proj Hessians [14336²]: inverse 3.10 s, reversed 1.21 s, reversed-recursive 0.97 s.
INVERSE_FACTOR = "reversed-recursive"


def _inverse_cholesky_upper(H: torch.Tensor, damp: float, max_tries: int = 6, how: str | None = None):
    """Upper Cholesky factor of (H + λ·mean(diag H)·I)⁻¹ per matrix (how="factor": Ũ, see `_reversed_factor`).

    Where the fp32 factorisation fails, the same matrix is first factorised again in fp64 (the usual cause is fp32
    round-off: a Hessian dominated by a few huge directions, as outlier features make it, is positive definite but
    too ill-conditioned for fp32 at λ = 1%); only where that fails too is λ raised ×10. Both are logged.
    """
    B, C, _ = H.shape
    how = how or INVERSE_FACTOR
    lam = torch.full((B,), damp, dtype=H.dtype, device=H.device)
    mean_diag = torch.diagonal(H, dim1=-2, dim2=-1).mean(-1)
    U = None
    todo = torch.arange(B, device=H.device)  # matrices still to factorise
    notes = []
    for _attempt in range(max_tries):
        Hd = H.clone() if U is None else H[todo]
        Hd.diagonal(dim1=-2, dim2=-1).add_((lam[todo] * mean_diag[todo]).unsqueeze(-1))
        Ut, bad = _upper_factor_of_inverse(Hd, how)
        bad = bad | ~torch.isfinite(Ut).all(-1).all(-1)
        if bad.any() and H.dtype == torch.float32:
            idx = torch.nonzero(bad).flatten()
            U64, bad64 = _upper_factor_of_inverse(Hd[idx].double(), how)
            Ut[idx] = U64.float()
            bad[idx] = bad64 | ~torch.isfinite(Ut[idx]).all(-1).all(-1)
            fixed = todo[idx[~bad[idx]]].tolist()
            if fixed:
                msg = f"GPTQ: fp32 Cholesky failed for matrices {fixed} at damp {damp}; factorised in fp64 instead"
                log.info(msg)
                notes.append(msg)
        del Hd
        if U is None:
            U = Ut
        else:
            U[todo] = Ut
        if not bad.any():
            return U, lam, notes
        todo = todo[bad]
        msg = f"GPTQ: Cholesky failed for matrices {todo.tolist()} at damp {lam[todo].tolist()}; raising damp x10"
        log.warning(msg)
        notes.append(msg)
        lam[todo] *= 10
    raise RuntimeError(f"GPTQ: Hessian not positive definite even at damp {lam.max().item():.3g}; check the inputs")


# -- the inner loop: torch ----------------------------------------------------------------------------------------

def _block_torch(Wv, U1, codes, scales, zeros, i1, i2, g, spec, scale_dtype, col_group, static_groups):
    """Quantize columns [i1, i2) one by one; returns the scaled errors E1 [B, R, i2-i1].

    Wv [B, R, m ≥ i2-i1]: the weights of columns i1, i1+1, ... brought up to date with every column before i1
    (columns past i2 only feed the grid of a group that starts inside the block); U1 [B, n, n]: U[S, S].
    """
    B, R, _ = Wv.shape
    W1 = Wv[:, :, : i2 - i1].clone()
    E1 = torch.zeros_like(W1)
    scale = zero = None
    for i in range(i2 - i1):
        col = i1 + i
        w = W1[:, :, i]  # [B, R]
        if static_groups:
            gid = col_group[:, col].view(B, 1, 1).expand(B, R, 1)
            scale, zero = torch.gather(scales, 2, gid).squeeze(2), torch.gather(zeros, 2, gid).squeeze(2)
        elif col % g == 0:  # a new group starts: its grid from the error-updated weights
            blk = torch.cat([W1[:, :, i:], Wv[:, :, i2 - i1:]], dim=2)[:, :, :g]
            scale, zero = find_params(blk, spec, scale_dtype)
            scales[:, :, col // g], zeros[:, :, col // g] = scale, zero
        elif scale is None:  # the block starts inside a group that began in an earlier block
            scale, zero = scales[:, :, col // g], zeros[:, :, col // g]
        q = quantize_codes(w, scale, zero, spec.maxq)
        codes[:, :, col] = q.to(torch.uint8)
        wq = (q - zero) * scale
        err = (w - wq) / U1[:, i, i].unsqueeze(1)
        W1[:, :, i:] -= err.unsqueeze(2) * U1[:, i, i:].unsqueeze(1)
        E1[:, :, i] = err
    return E1


# -- the inner loop: Triton ---------------------------------------------------------------------------------------

@triton.jit
def _round_half_even(x):
    """torch.round's rule (ties to even), exact for |x| < 2**22."""
    r = tl.floor(x + 0.5)
    tie = (r - x) == 0.5
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    return tl.where(tie & odd, r - 1.0, r)


@triton.jit
def _round_to_bf16(x):
    """fp32 -> nearest bf16 (ties to even), kept in fp32; by bits, so the interpreter rounds like the GPU."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _grid_params(W1, in_group, MAXQ: tl.constexpr, SYM: tl.constexpr, SCALE_KIND: tl.constexpr, tiny):
    """`quantizer.find_params` (no MSE clipping) for the columns of W1 [rows, block] selected by in_group."""
    wmax = tl.max(tl.where(in_group[None, :], W1, -3.0e38), axis=1)
    wmin = tl.min(tl.where(in_group[None, :], W1, 3.0e38), axis=1)
    wmax = tl.maximum(wmax, 0.0)
    wmin = tl.minimum(wmin, 0.0)
    if SYM:
        wmax = tl.maximum(tl.abs(wmin), wmax)
        wmin = -wmax
    degenerate = (wmax - wmin) == 0.0  # an all-zero row: any grid represents it; avoid a zero scale
    wmin = tl.where(degenerate, wmin - 1.0, wmin)
    wmax = tl.where(degenerate, wmax + 1.0, wmax)
    scale = tl.math.div_rn(wmax - wmin, MAXQ * 1.0)
    if SYM:
        zero = tl.zeros_like(scale) + ((MAXQ + 1) // 2)
    else:
        zero = _round_half_even(tl.math.div_rn(-wmin, scale))  # with the unrounded scale, as find_params
    if SCALE_KIND == 1:  # the scale is stored in the model dtype: quantize with the stored value
        scale = _round_to_bf16(scale)
    elif SCALE_KIND == 2:
        scale = scale.to(tl.float16).to(tl.float32)
    scale = tl.maximum(scale, tiny)
    return scale, zero


@triton.jit
def _gptq_block_kernel(
    w_ptr, u_ptr, codes_ptr, err_ptr, scales_ptr, zeros_ptr, gscale_ptr, gzero_ptr,
    R, C, G, i1, ncols, tiny,
    w_stride_b, w_stride_r, u_stride_b, u_stride_r,
    g_stride_b, g_stride_r, g_stride_c,
    MAXQ: tl.constexpr, SYM: tl.constexpr, GROUP: tl.constexpr, GIVEN: tl.constexpr, SCALE_KIND: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Columns [i1, i1 + ncols) of rows [pid·BLOCK_R, …) of matrix b.

    w: the block's up-to-date weights, fp32, element (b, r, j) at b·w_stride_b + r·w_stride_r + j (j < ncols);
    u: the block's factor U[S, S], fp32, element (b, i, j) at b·u_stride_b + i·u_stride_r + j.
    GIVEN: each column's grid is read from gscale/gzero (strided, may broadcast); otherwise the kernel computes the
    grid of every group of GROUP columns (GROUP divides the block) from the error-updated tile and records it in
    scales/zeros [B, R, G]. Writes the codes (uint8 [B, R, C], columns i1...) and the scaled errors err [B, R, ncols].
    """
    pid_r = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    rmask = rows < R
    cmask = cols < ncols
    tile_mask = rmask[:, None] & cmask[None, :]
    rows64 = rows.to(tl.int64)
    W1 = tl.load(w_ptr + b * w_stride_b + rows64[:, None] * w_stride_r + cols[None, :], mask=tile_mask, other=0.0)
    codes = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    errs = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    u_blk = u_ptr + b * u_stride_b  # U1[i, j] = u_blk[i * u_stride_r + j]
    scale = tl.zeros((BLOCK_R,), dtype=tl.float32)
    zero = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for g0 in range(0, ncols, GROUP):
        if not GIVEN:
            scale, zero = _grid_params(W1, (cols >= g0) & (cols < g0 + GROUP), MAXQ, SYM, SCALE_KIND, tiny)
            grp = (i1 + g0) // GROUP
            tl.store(scales_ptr + b * R * G + rows64 * G + grp, scale, mask=rmask)
            tl.store(zeros_ptr + b * R * G + rows64 * G + grp, zero, mask=rmask)
        for i in range(g0, tl.minimum(g0 + GROUP, ncols)):
            sel = cols == i
            w = tl.sum(tl.where(sel[None, :], W1, 0.0), axis=1)  # column i of the updated tile
            if GIVEN:
                goff = b * g_stride_b + rows64 * g_stride_r + i * g_stride_c
                scale = tl.load(gscale_ptr + goff, mask=rmask, other=1.0)
                zero = tl.load(gzero_ptr + goff, mask=rmask, other=0.0)
            q = tl.minimum(tl.maximum(_round_half_even(tl.math.div_rn(w, scale)) + zero, 0.0), MAXQ * 1.0)
            wq = (q - zero) * scale
            err = tl.math.div_rn(w - wq, tl.load(u_blk + i * u_stride_r + i))
            u_row = tl.load(u_blk + i * u_stride_r + cols, mask=cmask & (cols >= i), other=0.0)
            W1 = W1 - err[:, None] * u_row[None, :]  # spread the error over the block's later columns
            codes = tl.where(sel[None, :], q[:, None], codes)
            errs = tl.where(sel[None, :], err[:, None], errs)
    tl.store(codes_ptr + b * R * C + rows64[:, None] * C + i1 + cols[None, :], codes.to(tl.uint8), mask=tile_mask)
    tl.store(err_ptr + b * R * ncols + rows64[:, None] * ncols + cols[None, :], errs, mask=tile_mask)


_SCALE_KIND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _kernel_mode(W, spec: QuantSpec, g: int, block_size: int, static_groups: bool, scale_dtype, backend: str):
    """'in-kernel' | 'given' | None (torch loop): how the Triton block kernel can get each column's grid."""
    if backend == "torch" or (backend == "auto" and not W.is_cuda):
        return None
    C = W.shape[-1]
    if W.dtype != torch.float32 or scale_dtype not in _SCALE_KIND:
        mode = None
    elif static_groups or g % block_size == 0 or g == C:
        mode = "given"  # grids fixed up front, or every group starts at a block start: computed before the block
    elif block_size % g == 0 and not spec.mse_clip:
        mode = "in-kernel"
    else:
        mode = None
    if mode is None and backend == "triton":
        raise ValueError(f"the Triton GPTQ kernel does not cover group size {g} with block size {block_size}"
                         f"{' and MSE clipping' if spec.mse_clip else ''} ({W.dtype} weights, {scale_dtype} scales); "
                         f"use backend 'torch' or 'auto'")
    return mode


def _block_triton(Wv, U1, codes, scales, zeros, i1, i2, g, spec, scale_dtype, col_group, static_groups, mode):
    """The Triton inner loop over columns [i1, i2); same arguments as `_block_torch` (last stride of Wv and U1: 1)."""
    from ..kernels._triton_utils import kernel_for, next_pow2

    B, R, _ = Wv.shape
    C = codes.shape[2]
    n = i2 - i1
    E1 = torch.empty(B, R, n, dtype=Wv.dtype, device=Wv.device)
    gs = gz = scales  # unused unless GIVEN
    strides = (0, 0, 0)
    if mode == "given":
        if static_groups:
            idx = col_group[:, None, i1:i2].expand(B, R, n)
            gs, gz = torch.gather(scales, 2, idx), torch.gather(zeros, 2, idx)
        else:
            if i1 % g == 0:  # a group starts with this block: its grid from the error-updated weights
                scales[:, :, i1 // g], zeros[:, :, i1 // g] = find_params(Wv[:, :, :g], spec, scale_dtype)
            gs, gz = scales[:, :, i1 // g].unsqueeze(2), zeros[:, :, i1 // g].unsqueeze(2)  # broadcast over columns
        gs, gz = gs.contiguous(), gz.contiguous()
        strides = (gs.stride(0), gs.stride(1), gs.stride(2) if gs.shape[2] > 1 else 0)
    assert Wv.stride(2) == 1 and U1.stride(2) == 1
    block_c = next_pow2(max(n, 16))
    block_r = 16
    kernel = kernel_for(_gptq_block_kernel, Wv.device, "gptq")
    grid = (triton.cdiv(R, block_r), B)
    kernel[grid](
        Wv, U1, codes, E1, scales, zeros, gs, gz,
        R, C, scales.shape[2], i1, n, torch.finfo(scale_dtype).tiny,
        Wv.stride(0), Wv.stride(1), U1.stride(0), U1.stride(1),
        *strides,
        MAXQ=spec.maxq, SYM=spec.sym, GROUP=g if mode == "in-kernel" else block_c, GIVEN=mode == "given",
        SCALE_KIND=_SCALE_KIND[scale_dtype], BLOCK_R=block_r, BLOCK_C=block_c,
    )
    return E1


def _extent(i1: int, i2: int, g: int, C: int, static_groups: bool) -> int:
    """End of the columns whose up-to-date weights block [i1, i2) needs: the block, and the whole of any group that
    starts inside it (its grid is found from all its columns)."""
    first = -(-i1 // g) * g  # the first group start at or after i1
    if static_groups or first >= i2:
        return i2
    return min(C, max(i2, ((i2 - 1) // g) * g + g))


# -- GPTQ ---------------------------------------------------------------------------------------------------------

def gptq_quantize(W: torch.Tensor, H: torch.Tensor, spec: QuantSpec, *, damp: float = 0.01, block_size: int = 128,
                  act_order: bool = False, static_groups: bool = False, scale_dtype: torch.dtype | None = None,
                  backend: str = "auto", update: str | None = None, tf32: bool = False) -> GPTQResult:
    """Batched GPTQ. W [B, R, C] or [R, C]; H [B, C, C] or [C, C] (same batch). Computes in fp32 (fp64 if given).

    backend: "auto" (Triton inner loop on CUDA where it applies, else torch), "torch", or "triton".
    update: "left" or "right" (module docstring; default `UPDATE`). tf32: allow TF32 in the fp32 matrix products of
    the catch-up (off by default: it changes results; the factorisation always runs in full fp32).
    """
    if backend not in GPTQ_BACKENDS:
        raise ValueError(f"GPTQ backend {backend!r} is not one of {', '.join(GPTQ_BACKENDS)}")
    update = update or UPDATE
    if update not in UPDATES:
        raise ValueError(f"GPTQ update {update!r} is not one of {', '.join(UPDATES)}")
    squeeze = W.dim() == 2
    if squeeze:
        W, H = W.unsqueeze(0), H.unsqueeze(0)
    if H.shape != (W.shape[0], W.shape[2], W.shape[2]):
        raise ValueError(f"Hessian shape {tuple(H.shape)} does not match weight {tuple(W.shape)}")
    scale_dtype = scale_dtype or W.dtype
    cdt = torch.float64 if W.dtype == torch.float64 else torch.float32
    W = W.to(cdt, copy=True)
    H = H.to(cdt, copy=True)
    B, R, C = W.shape
    g = spec.group_of(C)
    G = C // g
    ar = torch.arange(C, device=W.device)

    # Dead columns: an input that never fired carries no information; zero it (GPTQ's rule).
    diag = torch.diagonal(H, dim1=-2, dim2=-1)
    dead = diag == 0
    H[:, ar, ar] = torch.where(dead, torch.ones_like(diag), diag)
    W.masked_fill_(dead.unsqueeze(1), 0)

    # Grid of each group: static groups fix it from the original weights, before any error feedback; otherwise it
    # is found when the group's first column comes up, from the error-updated weights.
    if static_groups:
        scales, zeros = find_params(W.reshape(B, R, G, g), spec, scale_dtype)  # [B, R, G]
        scales, zeros = scales.to(cdt), zeros.to(cdt)
    else:
        scales = torch.zeros(B, R, G, dtype=cdt, device=W.device)
        zeros = torch.zeros(B, R, G, dtype=cdt, device=W.device)

    perm = None
    if act_order:  # columns with the largest Hessian diagonal first
        perm = torch.argsort(torch.diagonal(H, dim1=-2, dim2=-1), dim=-1, descending=True)  # [B, C]
        W = torch.gather(W, 2, perm.unsqueeze(1).expand(B, R, C))
        H = torch.gather(torch.gather(H, 1, perm.unsqueeze(2).expand(B, C, C)), 2, perm.unsqueeze(1).expand(B, C, C))
    # group of each (permuted) column
    col_group = ((perm if perm is not None else ar.expand(B, C)) // g) if static_groups else (ar // g).expand(B, C)

    with _matmul_precision(False):
        F, lam, notes = _inverse_cholesky_upper(H, damp, how="factor" if update == "left" else None)
    del H

    mode = _kernel_mode(W, spec, g, block_size, static_groups, scale_dtype, backend)
    F, scales, zeros = F.contiguous(), scales.contiguous(), zeros.contiguous()
    codes = torch.zeros(B, R, C, dtype=torch.uint8, device=W.device)
    Q = torch.empty_like(W)
    block = _block_torch if mode is None else (lambda *a: _block_triton(*a, mode))
    with _matmul_precision(tf32):
        for i1 in range(0, C, block_size):
            i2 = min(i1 + block_size, C)
            if update == "right":  # F = U; W[:, :, i1:] already holds the errors of the columns before i1
                Wv, U1 = W[:, :, i1:], F[:, i1:i2, i1:i2]
            else:  # F = Ũ; W[:, :, :i1] holds D = W − Q of the finished columns, W[:, :, i1:] the original weights
                e = _extent(i1, i2, g, C, static_groups)
                if i1 == 0:  # nothing to catch up with
                    Wv, Ui = W[:, :, :e], _triu_inverse(F[:, :i2, :i2])
                else:  # Ũ[S', S']⁻¹ over the extent S' = [i1, e): its leading block is U[S, S]
                    Ui = _triu_inverse(F[:, i1:e, i1:e])
                    Wv = torch.baddbmm(W[:, :, i1:e], W[:, :, :i1] @ F[:, :i1, i1:e], Ui)
                U1 = Ui[:, : i2 - i1, : i2 - i1].contiguous()
            E1 = block(Wv, U1, codes, scales, zeros, i1, i2, g, spec, scale_dtype, col_group, static_groups)
            idx = col_group[:, None, i1:i2].expand(B, R, i2 - i1)
            Q[:, :, i1:i2] = (codes[:, :, i1:i2].to(cdt) - torch.gather(zeros, 2, idx)) * torch.gather(scales, 2, idx)
            if update == "right":
                W[:, :, i2:] -= E1 @ F[:, i1:i2, i2:]  # lazy update of the columns after the block
            else:
                W[:, :, i1:i2] -= Q[:, :, i1:i2]  # D for the blocks to come

    g_idx = None
    if perm is not None:
        inv = torch.argsort(perm, dim=-1)
        codes = torch.gather(codes, 2, inv.unsqueeze(1).expand(B, R, C))
        Q = torch.gather(Q, 2, inv.unsqueeze(1).expand(B, R, C))
        if not static_groups:
            g_idx = torch.gather(col_group, 1, inv).to(torch.int32)

    res = GPTQResult(
        codes=codes,
        scales=scales.transpose(1, 2).to(scale_dtype),
        zeros=zeros.transpose(1, 2),
        g_idx=g_idx,
        weight=Q.float() if cdt == torch.float32 else Q,
        damp=lam,
        notes=notes,
    )
    if squeeze:
        res.codes, res.scales, res.zeros, res.weight = res.codes[0], res.scales[0], res.zeros[0], res.weight[0]
        res.g_idx = None if res.g_idx is None else res.g_idx[0]
    return res


def gptq_workspace_bytes(B: int, R: int, C: int) -> int:
    """Peak extra device memory of one `gptq_quantize` call on [B, R, C] fp32 (an estimate, ±10%).

    W copy (which becomes D = W − Q for the "left" update) and Q (fp32), codes (uint8), the transient of a catch-up
    product (≤ one W), H copy + the factor + two factorisation temporaries (fp32 [B, C, C] each).
    """
    return B * (R * C * (4 + 4 + 1 + 4) + 4 * C * C * 4)


def proxy_loss(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """GPTQ's objective tr((W − Ŵ) H (W − Ŵ)ᵀ) per matrix."""
    D = (W - W_hat).to(H.dtype)
    return torch.einsum("...rc,...cd,...rd->...", D, H, D)
