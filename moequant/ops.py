"""Python wrappers of the C++/CUDA extension `moequant._C` (ops registered as torch.ops.moequant).

    dequantize(p, dtype)                                   packed weight -> dense [..., out, in]
    moe_w4a16_decode(x, w13, w2, topk_ids, topk_weights)   small-batch fused MoE (decode, M <= ~16)

Both run on CPU tensors always and on CUDA tensors when the extension was built with CUDA.
`available()` says whether the extension is importable; every op raises a clear error if not.
"""
from __future__ import annotations

import torch

from .packing import PackedWeight

_BUILD_HINT = "moequant._C is not built: run pip install --no-build-isolation -e ."

try:
    from . import _C  # noqa: F401  (importing registers torch.ops.moequant.*)

    _IMPORT_ERROR: Exception | None = None
except ImportError as e:  # the extension was not built, or was built against another torch
    _C = None
    _IMPORT_ERROR = e

# Largest number of tokens for which the quantized MoE layer should use `moe_w4a16_decode`
# rather than the Triton fused_moe_w4a16. Measured on an H100 in one run (benchmarks/gpu_csrc.sh,
# BENCHMARKS.md "Decode fused MoE, v5", 2026-11-25): the decode op is 1.2-1.8x faster than the Triton
# kernel up to M=8 on the Mixtral, DeepSeek-V2-Lite and Qwen3-30B-A3B shapes, and slower from M=16
# (0.7-0.9x; the TMA kernel takes at most 8 tokens, the tiled one above), where the Triton kernel's
# larger tiles pay off.
DECODE_MAX_M = 8


def available() -> bool:
    """True when moequant._C imports (the CPU ops are then always there)."""
    return _C is not None


def cuda_available() -> bool:
    """True when moequant._C was built with its CUDA kernels."""
    return _C is not None and bool(getattr(_C, "WITH_CUDA", 0))


def _require(*tensors: torch.Tensor) -> None:
    if _C is None:
        raise RuntimeError(f"{_BUILD_HINT} (import failed: {_IMPORT_ERROR})")
    if any(t.is_cuda for t in tensors) and not cuda_available():
        raise RuntimeError(
            "moequant._C was built without CUDA, but a CUDA tensor was passed: rebuild on a machine with "
            "nvcc and a CUDA torch (pip install --no-build-isolation -e .), or move the tensors to CPU"
        )


def dequantize(p: PackedWeight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Dense weight [..., out, in] of a packed weight, in `dtype` (default: the scales' dtype).

    Same numbers as `moequant.packing.dequantize`: (q - zero) * scale in float32, rounded once.
    """
    _require(p.qweight)
    dtype = dtype or p.scales.dtype
    return torch.ops.moequant.dequantize(p.qweight, p.scales, p.qzeros, p.g_idx, p.bits, p.group_size, dtype)


def moe_w4a16_decode(x: torch.Tensor, w13: PackedWeight, w2: PackedWeight, topk_ids: torch.Tensor,
                     topk_weights: torch.Tensor) -> torch.Tensor:
    """Fused MoE for a few tokens: y[M, H] = sum_s w[m, s] * down_e(SiLU(gate_e(x_m)) * up_e(x_m)).

    x [M, H] (bf16/fp16; fp32 on CPU), w13 packed gate_up [E, H*bits/32, 2I] (gate columns first),
    w2 packed down [E, I*bits/32, H], topk_ids [M, k] int32/int64, topk_weights [M, k].
    The CUDA kernel needs 4-bit weights without g_idx, group sizes that are multiples of 8 (or per
    channel) and scales in x's dtype; accumulation is float32 throughout.
    """
    _require(x)
    for name, p in (("w13", w13), ("w2", w2)):
        if p.g_idx is not None:
            raise ValueError(f"moe_w4a16_decode: {name} has g_idx (act-order); the decode kernel needs a "
                             "static group order: use the Triton fused_moe_w4a16 path, or export without desc_act")
    if w13.bits != w2.bits:
        raise ValueError(f"moe_w4a16_decode: w13 has {w13.bits} bits and w2 {w2.bits}; they must match")
    x2 = x.reshape(-1, x.shape[-1])
    y = torch.ops.moequant.moe_w4a16_decode(x2, w13.qweight, w13.scales, w13.qzeros, w2.qweight, w2.scales,
                                            w2.qzeros, topk_ids.reshape(x2.shape[0], -1),
                                            topk_weights.reshape(x2.shape[0], -1), w13.bits, w13.group_size,
                                            w2.group_size)
    return y.reshape(x.shape)


def use_decode_kernel(num_tokens: int) -> bool:
    """Whether the quantized MoE layer should dispatch `num_tokens` tokens to `moe_w4a16_decode`."""
    return cuda_available() and num_tokens <= DECODE_MAX_M


if _C is not None:
    # Shapes for torch.compile / meta tensors.
    @torch.library.register_fake("moequant::dequantize")
    def _dequantize_fake(qweight, scales, qzeros, g_idx, bits, group_size, dtype):
        in_f = qweight.shape[-2] * 32 // bits
        return qweight.new_empty((*qweight.shape[:-2], qweight.shape[-1], in_f), dtype=dtype)

    @torch.library.register_fake("moequant::moe_w4a16_decode")
    def _moe_decode_fake(x, w13_qweight, w13_scales, w13_qzeros, w2_qweight, w2_scales, w2_qzeros, topk_ids,
                         topk_weights, bits, w13_group_size, w2_group_size):
        return torch.empty_like(x)
