"""Quantized linear layers: a drop-in `nn.Linear` replacement holding a packed weight (moequant/packing.py).

    QuantLinear(packed, bias)      y = x W_hatᵀ + b,  W_hat = dequantize(packed)

Its state_dict uses the checkpoint's names (`<name>.qweight/.scales/.qzeros/.g_idx`, `<name>.bias`), so a
checkpoint loads into it with `load_state_dict`.

Paths (chosen per call from the input's device and dtype; `path_for` says which, and why):
  int4mm       CUDA, bf16 input, 4 bits, no act-order, group size 32/64/128/256: torch's tinygemm kernel
               (`aten._weight_int4pack_mm`) on a copy of the weight re-laid once for it. The layout is checked
               against the dequantized weight when it is built; a mismatch falls back to `dequant` with a warning.
  dequant      everything else (CPU always): dequantize the packed weight, then `F.linear`. Exact, slower.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from ..packing import PackedWeight
from ..packing import dequantize as dequantize_plain

log = logging.getLogger("moequant")

INT4MM_GROUP_SIZES = (32, 64, 128, 256)


def dequantize_weight(p: PackedWeight, dtype: torch.dtype) -> torch.Tensor:
    """Dense [..., out, in]: moequant._C's dequantize op when built for the tensor's device (the same numbers, much
    faster), else the plain definition in moequant.packing."""
    try:
        from .. import ops

        if ops.available() and (not p.qweight.is_cuda or ops.cuda_available()):
            return ops.dequantize(p, dtype)
    except ImportError:  # pragma: no cover - ops ships with the package
        pass
    return dequantize_plain(p, dtype)


class PackedWeightBuffers(nn.Module):
    """The tensors of one packed weight as buffers (`qweight`, `scales`, `qzeros`, `g_idx`), so that a parent
    module's state_dict names them exactly as the checkpoint does."""

    def __init__(self, p: PackedWeight):
        super().__init__()
        self.bits, self.group_size = p.bits, p.group_size
        self.register_buffer("qweight", p.qweight)
        self.register_buffer("scales", p.scales)
        self.register_buffer("qzeros", p.qzeros)  # None (symmetric) is not a state_dict entry
        self.register_buffer("g_idx", p.g_idx)

    @property
    def packed(self) -> PackedWeight:
        return PackedWeight(self.qweight, self.scales, self.qzeros, self.g_idx, self.bits, self.group_size)

    @property
    def shape(self) -> torch.Size:
        """The dense weight's shape [..., out, in] (so code that reads `experts.gate_up_proj.shape` still works)."""
        return torch.Size((*self.qweight.shape[:-2], self.qweight.shape[-1], self.qweight.shape[-2] * 32 // self.bits))

    def extra_repr(self) -> str:
        return (f"shape={tuple(self.shape)}, bits={self.bits}, group_size={self.group_size}, sym={self.qzeros is None}, "
                f"act_order={self.g_idx is not None}")


class QuantLinear(nn.Module):
    """`nn.Linear` with a packed weight: forward(x[..., in]) -> [..., out]."""

    def __init__(self, packed: PackedWeight, bias: torch.Tensor | None = None):
        super().__init__()
        if packed.qweight.dim() != 2:
            raise ValueError(f"QuantLinear needs a 2-D packed weight, got qweight of shape {tuple(packed.qweight.shape)}")
        self.in_features, self.out_features = packed.in_features, packed.out_features
        self.bits, self.group_size = packed.bits, packed.group_size
        self.register_buffer("qweight", packed.qweight)
        self.register_buffer("scales", packed.scales)
        self.register_buffer("qzeros", packed.qzeros)
        self.register_buffer("g_idx", packed.g_idx)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self._int4mm = None  # (device, packed weight, scales_and_zeros) for the tinygemm path, built on first use

    @classmethod
    def from_linear(cls, linear: nn.Linear, packed: PackedWeight) -> "QuantLinear":
        if (packed.out_features, packed.in_features) != tuple(linear.weight.shape):
            raise ValueError(f"packed weight is [{packed.out_features}, {packed.in_features}] but the linear it "
                             f"replaces is {list(linear.weight.shape)}")
        return cls(packed, linear.bias)

    @property
    def packed(self) -> PackedWeight:
        return PackedWeight(self.qweight, self.scales, self.qzeros, self.g_idx, self.bits, self.group_size)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight [out, in] (computed on each access; for inspection, not the forward)."""
        return dequantize_weight(self.packed, self.scales.dtype)

    def path_for(self, device: torch.device, dtype: torch.dtype) -> tuple[str, str]:
        """(path, reason) the forward takes for inputs on `device` in `dtype`."""
        if torch.device(device).type != "cuda":
            return "dequant", "not on CUDA"
        if self.bits != 4 or self.g_idx is not None:
            return "dequant", f"bits={self.bits}, act_order={self.g_idx is not None} (int4mm needs 4 bits, no act-order)"
        if dtype != torch.bfloat16:
            return "dequant", f"input dtype {dtype} (int4mm needs bfloat16)"
        if self.group_size not in INT4MM_GROUP_SIZES:
            return "dequant", f"group size {self.group_size} (int4mm needs one of {INT4MM_GROUP_SIZES})"
        if self.in_features % 32 or self.out_features % 8:
            return "dequant", f"shape [{self.out_features}, {self.in_features}] (int4mm needs in % 32, out % 8)"
        if self._int4mm is not None and self._int4mm[1] is None:
            return "dequant", "int4mm layout check failed at load"
        return "int4mm", "4-bit, bf16"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        path, _ = self.path_for(x.device, x.dtype)
        return self.run(path, x)

    def run(self, path: str, x: torch.Tensor) -> torch.Tensor:
        """The forward on a given path: "int4mm" (CUDA) or "dequant"."""
        if path == "int4mm":
            y = self._forward_int4mm(x)
            if y is not None:
                return y  # None: the layout check failed (warned once); fall through to dequant
        elif path != "dequant":
            raise ValueError(f"unknown path {path!r}; choose int4mm or dequant")
        w = dequantize_weight(self.packed, x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    # -- tinygemm ---------------------------------------------------------------------------------------------
    def prepare(self, dtype: torch.dtype = torch.bfloat16) -> str:
        """Build the kernel layout for the current device now (load time), instead of at the first forward.
        Returns the path inputs of `dtype` will take."""
        path, _ = self.path_for(self.qweight.device, dtype)
        if path == "int4mm":
            self._int4mm_layout()
            path, _ = self.path_for(self.qweight.device, dtype)
        return path

    def _int4mm_layout(self):
        dev = self.qweight.device
        if self._int4mm is not None and self._int4mm[0] == dev:
            return self._int4mm
        w_packed, sz = _tinygemm_layout(self.packed)
        # Check the re-laid weight against our own dequantization once: a kernel layout that differs between torch
        # versions must never give wrong numbers silently.
        probe = torch.randn(8, self.in_features, device=dev, dtype=torch.bfloat16,
                            generator=torch.Generator(dev).manual_seed(0))
        got = torch.ops.aten._weight_int4pack_mm(probe, w_packed, self.group_size, sz).float()
        ref = probe.float() @ dequantize_plain(self.packed, torch.float32).T
        err = (got - ref).norm() / ref.norm().clamp_min(1e-12)
        if not err < 2e-2:
            log.warning(f"QuantLinear: torch's int4mm layout does not reproduce the weight (rel. error {err:.3g}); "
                        f"this layer uses the dequantize path")
            w_packed = sz = None
        self._int4mm = (dev, w_packed, sz)
        return self._int4mm

    def _forward_int4mm(self, x: torch.Tensor) -> torch.Tensor | None:
        _, w_packed, sz = self._int4mm_layout()
        if w_packed is None:
            return None
        x2 = x.reshape(-1, self.in_features)
        y = torch.ops.aten._weight_int4pack_mm(x2.contiguous(), w_packed, self.group_size, sz)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def _apply(self, fn, *args, **kwargs):
        self._int4mm = None  # moved or cast: rebuild the kernel layout on next use
        return super()._apply(fn, *args, **kwargs)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"bits={self.bits}, group_size={self.group_size}, sym={self.qzeros is None}, "
                f"act_order={self.g_idx is not None}")


def _tinygemm_layout(p: PackedWeight):
    """Our 4-bit format -> (weight, scales_and_zeros) for `aten._weight_int4pack_mm` (CUDA).

    tinygemm computes W = (q - 8) * scale + zero with a float zero; ours is W = (q - z) * scale, so
    zero = (8 - z) * scale (exactly 0 for symmetric weights, where z = 8).
    Its input is uint8 [out, in/2], two codes a byte, the even input index in the high nibble.
    """
    from ..packing import unpack_int32

    codes = unpack_int32(p.qweight, 4).to(torch.int32)  # [out, in]
    nibbles = ((codes[:, ::2] << 4) | codes[:, 1::2]).to(torch.uint8).contiguous()
    inner_k_tiles = next(t for t in (8, 4, 2) if p.in_features % (t * 16) == 0)
    w = torch.ops.aten._convert_weight_to_int4pack(nibbles, inner_k_tiles)
    scales = p.scales.float()  # [G, out]
    z = torch.full_like(scales, 8.0) if p.qzeros is None else p.qzeros.float()
    zero = (8.0 - z) * scales
    sz = torch.stack([scales, zero], dim=-1).to(torch.bfloat16).contiguous()  # [G, out, 2]
    return w, sz
