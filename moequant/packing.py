"""The packed weight format: integer codes, bit-packed into int32 along the input dim.

This is the one on-disk and in-memory format of a quantized weight (README, "Format"):

    weight  W [..., out, in]           (a Linear weight, or a stack of experts [E, out, in])
    codes   q [..., out, in]           integers in [0, 2**bits - 1]
    qweight   int32 [..., in*bits/32, out]   codes packed along the input dim, as a little-endian
                                             bit stream: code i of a column sits at bits
                                             [i*bits, (i+1)*bits) of the column's stream
                                             (so 8 codes per word at 4 bits, GPTQ v1 order)
    scales    model dtype [..., in/g, out]   one per group of g input columns (g = in: per channel)
    qzeros    uint8 [..., in/g, out]         zero point codes (asymmetric only; symmetric: 2**(bits-1))
    g_idx     int32 [..., in]                group of each input column (act-order only)

    W_hat[o, i] = (q[o, i] - zero[g(i), o]) * scale[g(i), o],   g(i) = g_idx[i] or i // g

Kernels and csrc know this layout; they import nothing else from the package.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SUPPORTED_BITS = (2, 3, 4, 8)


def check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits} is not supported; choose one of {SUPPORTED_BITS}")


def packed_rows(in_features: int, bits: int) -> int:
    """Number of int32 rows that hold `in_features` codes of `bits` bits."""
    check_bits(bits)
    if (in_features * bits) % 32:
        raise ValueError(
            f"input dim {in_features} cannot be packed at {bits} bits: in*bits must be a multiple of 32 "
            f"(in must be a multiple of {32 // math.gcd(32, bits)})"
        )
    return in_features * bits // 32


def _stream_positions(in_features: int, bits: int, device):
    """Word index and bit offset of each code in a column's little-endian bit stream."""
    pos = torch.arange(in_features, device=device) * bits
    return pos // 32, pos % 32


def pack_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes [..., out, in] (integers in [0, 2**bits)) -> int32 [..., in*bits/32, out]."""
    out_f, in_f = codes.shape[-2:]
    rows = packed_rows(in_f, bits)
    if codes.numel():
        lo, hi = (int(v) for v in torch.aminmax(codes))  # one reduction (and one host sync on a GPU)
        if lo < 0 or hi >= (1 << bits):
            raise ValueError(f"codes out of range for {bits} bits")
    if 32 % bits == 0:
        # Whole codes per word: code j of word r is input r * per + j, at bits [bits*j, bits*(j+1)).
        # One shift-or per code position over [rows, out] slices (the general path below widens the whole
        # stack to int64 and index_adds it: 26-65 ms per Mixtral expert stack on an H100, issue 8 profile).
        per = 32 // bits
        c = codes.transpose(-1, -2)  # [..., in, out], a view
        words = torch.zeros(*c.shape[:-2], rows, out_f, dtype=torch.int64, device=codes.device)
        for j in range(per):
            words |= c[..., j::per, :].to(torch.int64) << (bits * j)
    else:
        c = codes.to(torch.int64).transpose(-1, -2)  # [..., in, out]
        word, off = _stream_positions(in_f, bits, codes.device)
        words = torch.zeros(*c.shape[:-2], rows + 1, out_f, dtype=torch.int64, device=codes.device)
        # Bits of different codes never overlap, so adding places them exactly like OR would.
        words.index_add_(-2, word, (c << off.view(-1, 1)) & 0xFFFFFFFF)
        spill = off + bits > 32  # 3-bit codes may straddle two words
        if spill.any():
            words.index_add_(-2, word[spill] + 1, c[..., spill, :] >> (32 - off[spill]).view(-1, 1))
        words = words[..., :rows, :]
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32).contiguous()


def unpack_int32(qweight: torch.Tensor, bits: int, in_features: int | None = None) -> torch.Tensor:
    """int32 [..., in*bits/32, out] -> codes uint8 [..., out, in]. Inverse of `pack_int32`."""
    check_bits(bits)
    rows, out_f = qweight.shape[-2:]
    in_f = rows * 32 // bits
    if in_features is not None and in_features != in_f:
        raise ValueError(f"packed rows {rows} hold {in_f} codes at {bits} bits, expected {in_features}")
    w = qweight.to(torch.int64) & 0xFFFFFFFF
    w = torch.cat([w, torch.zeros_like(w[..., :1, :])], dim=-2)  # a zero word past the end
    word, off = _stream_positions(in_f, bits, qweight.device)
    lo = w[..., word, :] >> off.view(-1, 1)
    hi = w[..., word + 1, :] << (32 - off).view(-1, 1)  # bits that spilled into the next word
    c = (lo | hi) & ((1 << bits) - 1)  # [..., in, out]
    return c.transpose(-1, -2).to(torch.uint8).contiguous()


@dataclass
class PackedWeight:
    """A quantized weight in the package format (see module docstring)."""

    qweight: torch.Tensor
    scales: torch.Tensor
    qzeros: torch.Tensor | None
    g_idx: torch.Tensor | None
    bits: int
    group_size: int  # input columns per group; equals in_features for per-channel

    @property
    def in_features(self) -> int:
        return self.qweight.shape[-2] * 32 // self.bits

    @property
    def out_features(self) -> int:
        return self.qweight.shape[-1]

    @property
    def sym(self) -> bool:
        return self.qzeros is None

    def to(self, device) -> "PackedWeight":
        mv = lambda t: None if t is None else t.to(device)
        return PackedWeight(mv(self.qweight), mv(self.scales), mv(self.qzeros), mv(self.g_idx), self.bits, self.group_size)

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """The tensors as named on disk: `{prefix}.qweight`, `.scales`, and `.qzeros` / `.g_idx` when present."""
        out = {f"{prefix}.qweight": self.qweight, f"{prefix}.scales": self.scales}
        if self.qzeros is not None:
            out[f"{prefix}.qzeros"] = self.qzeros
        if self.g_idx is not None:
            out[f"{prefix}.g_idx"] = self.g_idx
        return out

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize(self, dtype)


def group_index(in_features: int, group_size: int, g_idx: torch.Tensor | None, device=None) -> torch.Tensor:
    if g_idx is not None:
        return g_idx.long()
    return torch.arange(in_features, device=device) // group_size


def dequantize_codes(codes, scales, zeros, group_size, g_idx=None, bits=4, dtype=None) -> torch.Tensor:
    """codes [..., out, in], scales [..., G, out], zeros [..., G, out] or None -> W_hat [..., out, in]."""
    in_f = codes.shape[-1]
    gi = group_index(in_f, group_size, g_idx, codes.device)  # [in] or [..., in]
    s = scales.float().transpose(-1, -2)  # [..., out, G]
    z = (
        torch.full_like(s, float(1 << (bits - 1)))
        if zeros is None
        else zeros.float().transpose(-1, -2)
    )
    if gi.dim() == 1:
        s_full, z_full = s[..., gi], z[..., gi]
    else:  # per-matrix g_idx [..., in]
        idx = gi.unsqueeze(-2).expand(*s.shape[:-1], in_f)
        s_full, z_full = torch.gather(s, -1, idx), torch.gather(z, -1, idx)
    w = (codes.float() - z_full) * s_full
    return w.to(dtype or scales.dtype)


def dequantize(p: PackedWeight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Plain-PyTorch dequantization of a packed weight -> [..., out, in]."""
    codes = unpack_int32(p.qweight, p.bits)
    return dequantize_codes(codes, p.scales, p.qzeros, p.group_size, p.g_idx, p.bits, dtype)
