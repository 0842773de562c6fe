"""Hessian accumulation: dense H = Σ x xᵀ, and per-expert H_j = Σ_i a_ij x_i x_iᵀ (AGQ, MoEQuant Eq. 19).

On CUDA the Triton kernel (`moequant.kernels.expert_hessians`) does the per-expert sums; on CPU the reference.
Both accumulate in fp32 and have the same contract (DESIGN.md).
"""
from __future__ import annotations

import torch

from ..reference import expert_hessians_ref


def dense_hessian_(H: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None = None) -> None:
    """H += Σ_t w_t x_t x_tᵀ over the rows of x [T, K] (w = 1 when weight is None), in fp32."""
    x = x.reshape(-1, x.shape[-1]).float()
    if weight is not None:
        x = x * weight.reshape(-1, 1).float().sqrt()
    H.addmm_(x.T, x)


def uses_kernel(x: torch.Tensor, backend: str = "auto") -> bool:
    """Whether `expert_hessians` runs the Triton kernel for x (else the torch reference)."""
    return backend == "triton" or (backend == "auto" and x.is_cuda)


def expert_hessians(x, topk_ids, weights, num_experts, H=None, counts=None, backend: str = "auto",
                    sqrt_w: bool = False):
    """Per-expert Hessians of the routed tokens; see `moequant.reference.expert_hessians_ref` for the math.
    sqrt_w (kernel only): both operands scaled by √w and rounded once, the Gram matrix of those rows (PSD)."""
    if uses_kernel(x, backend):
        from ..kernels import expert_hessians as kernel  # Triton; needs a GPU (or TRITON_INTERPRET=1)

        return kernel(x, topk_ids, weights, num_experts, H=H, counts=counts, sqrt_w=sqrt_w)
    if sqrt_w:
        raise ValueError("expert_hessians: sqrt_w is the Triton kernel's; on the reference path pass rows x·√w "
                         "(moequant.pipeline._scaled_rows) and no weights")
    return expert_hessians_ref(x, topk_ids, weights, num_experts, H=H, counts=counts)
