"""Quantized fused experts: a drop-in replacement of a transformers 5 experts module.

Same forward contract as the module it replaces (MixtralExperts, Qwen2MoeExperts, DeepseekV2Experts, ...):

    forward(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]
    y[t] = sum_s top_k_weights[t, s] * down_e(act(gate_e(x_t)) * up_e(x_t)),   e = top_k_index[t, s]

It replaces the module (rather than registering an experts implementation) because the experts' parameters
themselves change: the fused `gate_up_proj [E, 2I, H]` / `down_proj [E, H, I]` become packed weights, held as
`gate_up_proj.{qweight,scales,qzeros,g_idx}` / `down_proj.{...}` under the checkpoint's names.

Paths (`path_for` says which one a call takes, and why):
  decode     CUDA, bits 4, no act-order, at most `DECODE_MAX_TOKENS` tokens: moequant.ops.moe_w4a16_decode
  fused      CUDA, bits 4, no act-order, more tokens: moequant.kernels.fused_moe_w4a16 (Triton)
  dequant    everything else (CPU always; other bit widths and act-order on GPU too): dequantize the hit
             experts and run the transformers expert loop. Exact, slower.
The Triton kernel is imported on first use and moequant.ops imports without moequant._C, so a CPU-only install
needs neither; a kernel that is missing on a GPU machine moves the module to the next path, and `moequant.load`
logs the path of every module.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops  # imports without moequant._C too (ops.available() then says False)
from ..packing import PackedWeight
from .quant_linear import PackedWeightBuffers, dequantize_weight

# Tokens up to which the decode kernel (moequant._C) is used instead of the Triton fused kernel.
# None: moequant.ops.DECODE_MAX_M, the crossover measured for the kernels.
DECODE_MAX_TOKENS: int | None = None


def _decode_kernel_missing() -> str | None:
    """None when moequant.ops.moe_w4a16_decode runs on CUDA here, else why not."""
    return None if ops.cuda_available() else "moequant._C is not built with CUDA"


_FUSED_IMPORT: list = []  # [None] or [reason], filled on first use


def _fused_kernel_missing() -> str | None:
    """None when the Triton fused_moe_w4a16 kernel imports, else why not."""
    if not _FUSED_IMPORT:
        try:
            from ..kernels import fused_moe_w4a16  # noqa: F401

            _FUSED_IMPORT.append(None)
        except ImportError as e:
            _FUSED_IMPORT.append(f"moequant.kernels.fused_moe_w4a16 cannot be imported ({e})")
    return _FUSED_IMPORT[0]


def decode_max_tokens() -> int:
    return ops.DECODE_MAX_M if DECODE_MAX_TOKENS is None else DECODE_MAX_TOKENS


class QuantExperts(nn.Module):
    """Fused experts with packed gate_up_proj [E, 2I, H] and down_proj [E, H, I] (gate rows first)."""

    def __init__(self, gate_up: PackedWeight, down: PackedWeight, act_fn=None):
        super().__init__()
        E, two_i, H = gate_up.qweight.shape[0], gate_up.out_features, gate_up.in_features
        if gate_up.qweight.dim() != 3 or down.qweight.dim() != 3:
            raise ValueError("QuantExperts needs stacked [E, ...] packed weights for gate_up_proj and down_proj")
        if down.qweight.shape[0] != E or two_i % 2 or (down.out_features, down.in_features) != (H, two_i // 2):
            raise ValueError(f"gate_up_proj [E={E}, {two_i}, {H}] and down_proj [E={down.qweight.shape[0]}, "
                             f"{down.out_features}, {down.in_features}] do not fit together (expect down [E, H, I])")
        self.num_experts, self.hidden_dim, self.intermediate_dim = E, H, two_i // 2
        self.gate_up_proj = PackedWeightBuffers(gate_up)
        self.down_proj = PackedWeightBuffers(down)
        self.act_fn = act_fn if act_fn is not None else nn.SiLU()
        self._fused = None  # (device, w13, w2) in the Triton kernel's layout, built on first use
        self._support: dict = {}  # dtype -> kernel_support(dtype)

    @classmethod
    def from_experts(cls, experts: nn.Module, gate_up: PackedWeight, down: PackedWeight) -> "QuantExperts":
        for name, p in (("gate_up_proj", gate_up), ("down_proj", down)):
            dense = getattr(experts, name).shape
            got = (p.qweight.shape[0], p.out_features, p.in_features)
            if tuple(dense) != got:
                raise ValueError(f"packed {name} is {list(got)} but the experts module has {list(dense)}")
        return cls(gate_up, down, experts.act_fn)

    # -- dispatch ---------------------------------------------------------------------------------------------
    def kernel_support(self, dtype: torch.dtype) -> str | None:
        """None when the 4-bit kernels can run this module for activations of `dtype`, else why not."""
        if dtype not in self._support:  # decided once per dtype (forward asks on every call)
            self._support[dtype] = self._kernel_support(dtype)
        return self._support[dtype]

    def _kernel_support(self, dtype: torch.dtype) -> str | None:
        g, d = self.gate_up_proj, self.down_proj
        if g.bits != 4 or d.bits != 4:
            return f"bits={g.bits}/{d.bits} (kernels need 4)"
        if g.g_idx is not None or d.g_idx is not None:
            return "act-order (g_idx)"
        if dtype not in (torch.bfloat16, torch.float16):
            return f"activation dtype {dtype} (kernels need bf16/fp16)"
        if g.scales.dtype != dtype:
            return f"scales dtype {g.scales.dtype} differs from activations {dtype}"
        for p in (g, d):
            if p.group_size % 16:
                return f"group size {p.group_size} (kernels need a multiple of 16)"
        return None

    def path_for(self, device: torch.device, dtype: torch.dtype, num_tokens: int) -> tuple[str, str]:
        """(path, reason) the forward takes for `num_tokens` tokens on `device` in `dtype`."""
        if torch.device(device).type != "cuda":
            return "dequant", "not on CUDA"
        why = self.kernel_support(dtype)
        if why is not None:
            return "dequant", why
        fused_missing = _fused_kernel_missing()
        if num_tokens <= decode_max_tokens():
            if _decode_kernel_missing() is None:
                return "decode", f"<= {decode_max_tokens()} tokens"
            if fused_missing is None:
                return "fused", f"decode kernel unavailable: {_decode_kernel_missing()}"
        elif fused_missing is None:
            return "fused", f"> {decode_max_tokens()} tokens"
        return "dequant", f"kernels unavailable: {fused_missing}"

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        path, _ = self.path_for(hidden_states.device, hidden_states.dtype, hidden_states.shape[0])
        return self.run(path, hidden_states, top_k_index, top_k_weights)

    def run(self, path: str, hidden_states, top_k_index, top_k_weights):
        """The forward on a given path: "decode" (moequant.ops; CPU too, when moequant._C is built), "fused"
        (Triton; CPU only under TRITON_INTERPRET=1) or "dequant"."""
        if path == "decode":
            return ops.moe_w4a16_decode(hidden_states, self.gate_up_proj.packed, self.down_proj.packed, top_k_index,
                                        top_k_weights)
        if path == "fused":
            from ..kernels.fused_moe_w4a16 import fused_moe_w4a16

            w13, w2 = self._fused_weights()
            return fused_moe_w4a16(hidden_states, w13, w2, top_k_index, top_k_weights)
        if path != "dequant":
            raise ValueError(f"unknown path {path!r}; choose decode, fused or dequant")
        return self.forward_dequant(hidden_states, top_k_index, top_k_weights)

    def _fused_weights(self):
        dev = self.gate_up_proj.qweight.device
        if self._fused is None or self._fused[0] != dev:
            from ..kernels.fused_moe_w4a16 import prepare_moe_w4a16

            self._fused = (dev, prepare_moe_w4a16(self.gate_up_proj.packed, "gate_up_proj"),
                           prepare_moe_w4a16(self.down_proj.packed, "down_proj"))
        return self._fused[1], self._fused[2]

    def prepare(self, dtype: torch.dtype) -> str:
        """Build kernel layouts for the current device now (load time). Returns the large-batch path's name."""
        path, _ = self.path_for(self.gate_up_proj.qweight.device, dtype, decode_max_tokens() + 1)
        if path == "fused":
            self._fused_weights()
        return path

    def _apply(self, fn, *args, **kwargs):
        self._fused, self._support = None, {}  # moved or cast: decide and re-lay again on next use
        return super()._apply(fn, *args, **kwargs)

    # -- the plain path ---------------------------------------------------------------------------------------
    def expert_weights(self, j: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Dequantized (gate_up [2I, H], down [H, I]) of expert j."""
        def one(p: PackedWeight):
            sl = lambda t: None if t is None else t[j]
            return dequantize_weight(PackedWeight(sl(p.qweight), sl(p.scales), sl(p.qzeros), sl(p.g_idx), p.bits,
                                                  p.group_size), dtype)
        return one(self.gate_up_proj.packed), one(self.down_proj.packed)

    def forward_dequant(self, hidden_states, top_k_index, top_k_weights):
        """The transformers expert computation on dequantized weights (only the experts that are hit are
        dequantized). Like transformers' grouped_mm path, the top-k outputs of a token are summed in slot order."""
        T, k = top_k_index.shape
        I = self.intermediate_dim
        pairs = hidden_states.new_zeros(T, k, self.hidden_dim,
                                        dtype=torch.promote_types(hidden_states.dtype, top_k_weights.dtype))
        for j in torch.unique(top_k_index).tolist():
            if not 0 <= j < self.num_experts:
                continue  # expert-parallel sentinel: not an expert of this rank
            token, slot = torch.where(top_k_index == j)
            w13, w2 = self.expert_weights(j, hidden_states.dtype)
            gu = F.linear(hidden_states[token], w13)
            h = F.linear(self.act_fn(gu[:, :I]) * gu[:, I:], w2)
            pairs[token, slot] = (h * top_k_weights[token, slot, None]).to(pairs.dtype)
        return pairs.sum(dim=1).to(hidden_states.dtype)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, hidden_dim={self.hidden_dim}, intermediate_dim={self.intermediate_dim}"
