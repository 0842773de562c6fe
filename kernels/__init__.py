"""Triton kernels of moequant, installed as `moequant.kernels`.

- `expert_hessians`: per-expert (affinity-weighted) Hessians for GPTQ / AGQ (expert_hessians.py)
- `fused_moe_w4a16`: the int4-weight MoE layer, alignment -> GEMM1 (+SiLU·up) -> GEMM2 (+routing weight)
  -> top-k sum; `prepare_moe_w4a16` re-lays packed weights for it once at load (fused_moe_w4a16.py)
- `moe_align`: routing alignment shared by both (moe_align.py)
"""
from .expert_hessians import expert_hessians
from .fused_moe_w4a16 import MoeConfig, MoeW4A16Weight, default_config, fused_moe_w4a16, prepare_moe_w4a16
from .moe_align import Alignment, moe_align

__all__ = [
    "expert_hessians", "fused_moe_w4a16", "prepare_moe_w4a16", "MoeW4A16Weight", "MoeConfig", "default_config",
    "moe_align", "Alignment",
]
