"""GPTQ, batched over same-shape matrices (all experts of a layer solved together).

For W [B, R, C] and Hessians H [B, C, C] (H = Σ x xᵀ, or Σ c·x xᵀ for AGQ), quantize the columns of each W left to
right; after each column, spread its rounding error over the not-yet-quantized columns through the Cholesky factor
of H⁻¹ (Frantar et al. 2022, Alg. 1), with lazy updates of `block_size` columns. Every step is a batched tensor op,
so B experts cost one Python loop over columns, not B.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from .quantizer import QuantSpec, find_params, quantize_codes

log = logging.getLogger("moequant")


@dataclass
class GPTQResult:
    codes: torch.Tensor  # uint8 [B, R, C], original column order
    scales: torch.Tensor  # [B, G, R] scale dtype
    zeros: torch.Tensor  # [B, G, R] fp32 integer values
    g_idx: torch.Tensor | None  # int32 [B, C] when act-order without static groups
    weight: torch.Tensor  # dequantized W_hat [B, R, C] fp32
    damp: torch.Tensor  # relative damping finally used per matrix [B]
    notes: list = field(default_factory=list)


def _inverse_cholesky_upper(H: torch.Tensor, damp: float, max_tries: int = 6):
    """Upper Cholesky factor of (H + λ·mean(diag H)·I)⁻¹, raising λ ×10 for matrices where it fails (logged)."""
    B, C, _ = H.shape
    eye = torch.eye(C, dtype=H.dtype, device=H.device)
    lam = torch.full((B,), damp, dtype=H.dtype, device=H.device)
    mean_diag = torch.diagonal(H, dim1=-2, dim2=-1).mean(-1)
    notes = []
    for attempt in range(max_tries):
        Hd = H + (lam * mean_diag).view(B, 1, 1) * eye
        L, info = torch.linalg.cholesky_ex(Hd)
        Hinv = torch.cholesky_inverse(L)
        U, info2 = torch.linalg.cholesky_ex(Hinv, upper=True)
        bad = (info != 0) | (info2 != 0) | ~torch.isfinite(U).all(-1).all(-1)
        if not bad.any():
            return U, lam, notes
        idx = torch.nonzero(bad).flatten().tolist()
        msg = f"GPTQ: Cholesky failed for matrices {idx} at damp {lam[bad].tolist()}; raising damp x10"
        log.warning(msg)
        notes.append(msg)
        lam = torch.where(bad, lam * 10, lam)
    raise RuntimeError(f"GPTQ: Hessian not positive definite even at damp {lam.max().item():.3g}; check the inputs")


def gptq_quantize(W: torch.Tensor, H: torch.Tensor, spec: QuantSpec, *, damp: float = 0.01, block_size: int = 128,
                  act_order: bool = False, static_groups: bool = False, scale_dtype: torch.dtype | None = None
                  ) -> GPTQResult:
    """Batched GPTQ. W [B, R, C] or [R, C]; H [B, C, C] or [C, C] (same batch). Computes in fp32 (fp64 if given)."""
    squeeze = W.dim() == 2
    if squeeze:
        W, H = W.unsqueeze(0), H.unsqueeze(0)
    if H.shape != (W.shape[0], W.shape[2], W.shape[2]):
        raise ValueError(f"Hessian shape {tuple(H.shape)} does not match weight {tuple(W.shape)}")
    scale_dtype = scale_dtype or W.dtype
    cdt = torch.float64 if W.dtype == torch.float64 else torch.float32
    W = W.to(cdt).clone()
    H = H.to(cdt).clone()
    B, R, C = W.shape
    g = spec.group_of(C)
    G = C // g
    maxq = spec.maxq
    ar = torch.arange(C, device=W.device)

    # Dead columns: an input that never fired carries no information; zero it (GPTQ's rule).
    diag = torch.diagonal(H, dim1=-2, dim2=-1)
    dead = diag == 0
    H[:, ar, ar] = torch.where(dead, torch.ones_like(diag), diag)
    W = W.masked_fill(dead.unsqueeze(1), 0)

    # Static groups: grid of each group from the original weights, before any error feedback.
    if static_groups:
        st_scale, st_zero = find_params(W.reshape(B, R, G, g), spec, scale_dtype)  # [B, R, G]

    perm = None
    if act_order:  # columns with the largest Hessian diagonal first
        perm = torch.argsort(torch.diagonal(H, dim1=-2, dim2=-1), dim=-1, descending=True)  # [B, C]
        W = torch.gather(W, 2, perm.unsqueeze(1).expand(B, R, C))
        H = torch.gather(torch.gather(H, 1, perm.unsqueeze(2).expand(B, C, C)), 2, perm.unsqueeze(1).expand(B, C, C))

    U, lam, notes = _inverse_cholesky_upper(H, damp)

    codes = torch.zeros(B, R, C, dtype=cdt, device=W.device)
    Q = torch.zeros_like(W)
    scales = torch.zeros(B, R, G, dtype=cdt, device=W.device)
    zeros = torch.zeros(B, R, G, dtype=cdt, device=W.device)
    col_group = torch.zeros(B, C, dtype=torch.long, device=W.device)  # group id of each (permuted) column
    scale = zero = None

    for i1 in range(0, C, block_size):
        i2 = min(i1 + block_size, C)
        W1 = W[:, :, i1:i2].clone()
        E1 = torch.zeros_like(W1)
        U1 = U[:, i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            w = W1[:, :, i]  # [B, R]
            if static_groups:
                orig = perm[:, col] if perm is not None else torch.full((B,), col, device=W.device)
                gid = orig // g  # [B]
                scale = torch.gather(st_scale, 2, gid.view(B, 1, 1).expand(B, R, 1)).squeeze(2)
                zero = torch.gather(st_zero, 2, gid.view(B, 1, 1).expand(B, R, 1)).squeeze(2)
                col_group[:, col] = gid
            else:
                if col % g == 0:  # a new group starts: its grid from the error-updated weights
                    blk = torch.cat([W1[:, :, i:], W[:, :, i2:]], dim=2)[:, :, :g]
                    scale, zero = find_params(blk, spec, scale_dtype)
                    scales[:, :, col // g], zeros[:, :, col // g] = scale, zero
                col_group[:, col] = col // g
            q = quantize_codes(w, scale, zero, maxq)
            codes[:, :, col] = q
            wq = (q - zero) * scale
            Q[:, :, col] = wq
            d = U1[:, i, i].unsqueeze(1)  # [B, 1]
            err = (w - wq) / d
            W1[:, :, i:] -= err.unsqueeze(2) * U1[:, i, i:].unsqueeze(1)
            E1[:, :, i] = err
        W[:, :, i2:] -= E1 @ U[:, i1:i2, i2:]

    g_idx = None
    if perm is not None:
        inv = torch.argsort(perm, dim=-1)
        codes = torch.gather(codes, 2, inv.unsqueeze(1).expand(B, R, C))
        Q = torch.gather(Q, 2, inv.unsqueeze(1).expand(B, R, C))
        col_group = torch.gather(col_group, 1, inv)
        if not static_groups:
            g_idx = col_group.to(torch.int32)
    if static_groups:
        scales, zeros = st_scale, st_zero

    res = GPTQResult(
        codes=codes.to(torch.uint8),
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


def proxy_loss(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """GPTQ's objective tr((W − Ŵ) H (W − Ŵ)ᵀ) per matrix."""
    D = (W - W_hat).to(H.dtype)
    return torch.einsum("...rc,...cd,...rd->...", D, H, D)
