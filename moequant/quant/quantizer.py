"""Uniform integer quantizer: grid parameters per (row, group), round-to-nearest, packing.

Conventions follow GPTQ so that our codes export to GPTQ checkpoints unchanged:
symmetric uses the full code range with zero = 2**(bits-1) and scale = 2·max|w| / (2**bits - 1);
asymmetric spans [min(w, 0), max(w, 0)] with an integer zero point.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ..packing import PackedWeight, check_bits, pack_int32


@dataclass(frozen=True)
class QuantSpec:
    bits: int = 4
    group_size: int = 128  # input columns per group; -1 = one group per output channel
    sym: bool = True
    mse_clip: bool = False  # search a shrink of the min/max range that minimises the p-norm error
    mse_grid: int = 100
    mse_norm: float = 2.4
    mse_max_shrink: float = 0.8

    def __post_init__(self):
        check_bits(self.bits)
        if self.group_size != -1 and self.group_size <= 0:
            raise ValueError(f"group_size must be positive or -1 (per channel), got {self.group_size}")

    @property
    def maxq(self) -> int:
        return (1 << self.bits) - 1

    def groups(self, in_features: int) -> int:
        g = self.group_of(in_features)
        return in_features // g

    def group_of(self, in_features: int) -> int:
        """The group size in columns for an input dim; checks that it divides."""
        if self.group_size == -1:
            return in_features
        if in_features % self.group_size:
            raise ValueError(
                f"group size {self.group_size} does not divide the input dim {in_features}; "
                f"use a divisor of {in_features} or --group-size -1 (per channel)"
            )
        return self.group_size

    def to_dict(self):
        return asdict(self)


def _grid(wmin, wmax, spec: QuantSpec):
    """Scale and zero from a per-row range (tensors [..., R])."""
    maxq = spec.maxq
    if spec.sym:
        wmax = torch.maximum(wmin.abs(), wmax)
        wmin = -wmax
    degenerate = (wmax - wmin) == 0  # an all-zero row: any grid represents it; avoid a zero scale
    wmin = torch.where(degenerate, wmin - 1, wmin)
    wmax = torch.where(degenerate, wmax + 1, wmax)
    scale = (wmax - wmin) / maxq
    if spec.sym:
        zero = torch.full_like(scale, float((maxq + 1) // 2))
    else:
        zero = torch.round(-wmin / scale)
    return scale, zero


def quantize_codes(w, scale, zero, maxq):
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


def find_params(w: torch.Tensor, spec: QuantSpec, scale_dtype: torch.dtype = torch.float32):
    """Grid for the rows of w [..., R, C] (each row is one output channel of one group).

    Returns scale, zero [..., R] in fp32; the scale is already rounded to `scale_dtype`,
    the dtype it is stored in, so dequantizing the stored tensors reproduces the codes' values.
    """
    w = w.float()
    wmin = torch.clamp(w.amin(dim=-1), max=0)
    wmax = torch.clamp(w.amax(dim=-1), min=0)
    scale, zero = _grid(wmin, wmax, spec)
    if spec.mse_clip:
        best = torch.full_like(scale, float("inf"))
        n_steps = int(spec.mse_max_shrink * spec.mse_grid)
        for i in range(n_steps):
            p = 1 - i / spec.mse_grid  # shrink factor of the range (MSE clipping, GPTQ/QuaRot style)
            s1, z1 = _grid(p * wmin, p * wmax, spec)
            q = quantize_codes(w, s1.unsqueeze(-1), z1.unsqueeze(-1), spec.maxq)
            err = ((q - z1.unsqueeze(-1)) * s1.unsqueeze(-1) - w).abs().pow(spec.mse_norm).sum(-1)
            better = err < best
            best = torch.where(better, err, best)
            scale = torch.where(better, s1, scale)
            zero = torch.where(better, z1, zero)
    scale = scale.to(scale_dtype).float()
    tiny = torch.finfo(scale_dtype).tiny
    scale = torch.clamp(scale, min=tiny)
    return scale, zero


def rtn(w: torch.Tensor, spec: QuantSpec, scale_dtype: torch.dtype | None = None):
    """Round-to-nearest of w [..., out, in] -> (codes uint8 [..., out, in], scales [..., G, out], zeros [..., G, out]).

    zeros are returned for both modes (constant for symmetric) so dequantization is one formula.
    """
    scale_dtype = scale_dtype or w.dtype
    out_f, in_f = w.shape[-2:]
    g = spec.group_of(in_f)
    wg = w.float().reshape(*w.shape[:-1], in_f // g, g)  # [..., out, G, g]
    scale, zero = find_params(wg, spec, scale_dtype)  # [..., out, G]
    codes = quantize_codes(wg, scale.unsqueeze(-1), zero.unsqueeze(-1), spec.maxq)
    codes = codes.reshape(*w.shape).to(torch.uint8)
    return codes, scale.transpose(-1, -2).to(scale_dtype), zero.transpose(-1, -2)


def to_packed(codes, scales, zeros, spec: QuantSpec, g_idx=None) -> PackedWeight:
    """Codes [..., out, in] and per-group parameters [..., G, out] -> the package's packed format."""
    in_f = codes.shape[-1]
    return PackedWeight(
        qweight=pack_int32(codes, spec.bits),
        scales=scales,
        qzeros=None if spec.sym else zeros.to(torch.uint8),
        g_idx=None if g_idx is None else g_idx.to(torch.int32),
        bits=spec.bits,
        group_size=spec.group_of(in_f),
    )


def quantize_rtn(w: torch.Tensor, spec: QuantSpec, scale_dtype=None) -> PackedWeight:
    """RTN straight to the packed format."""
    codes, scales, zeros = rtn(w, spec, scale_dtype)
    return to_packed(codes, scales, zeros, spec)
