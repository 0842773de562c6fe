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


def scaled_rows(x: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    """Rows x_i·√c_i (MOEQUANT.md), so that Σ c_i x_i x_iᵀ is a Gram matrix of the rows actually summed: positive
    semi-definite whatever the rounding. Weighting one operand only (Σ round(c_i x_i) x_iᵀ) is not, and a Hessian
    dominated by a few large directions (outlier features) then turns indefinite at λ = 1% (measured on the H100:
    44 of 12288 Qwen3-30B-A3B-shaped expert Hessians had to have their damping raised).
    One pass: the product is formed in fp32 and rounded once into x's dtype (= (x.float() * √c).to(x.dtype))."""
    if w is None:
        return x
    return torch.mul(x, w.float().sqrt(), out=torch.empty_like(x))


def scaled_pair_rows(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [T, K], w [T, k] -> rows x_t·√w_ts [T·k, K] in (token, slot) order: `scaled_rows` of x repeated once per
    slot, without materialising the repeat (the same fp32 products, rounded once)."""
    T, k = w.shape
    out = torch.empty(T, k, x.shape[-1], dtype=x.dtype, device=x.device)
    torch.mul(x.unsqueeze(1), w.float().sqrt().unsqueeze(-1), out=out)
    return out.view(T * k, x.shape[-1])


def uses_kernel(x: torch.Tensor, backend: str = "auto") -> bool:
    """Whether `expert_hessians` runs the Triton kernel for x (else the torch reference)."""
    return backend == "triton" or (backend == "auto" and x.is_cuda)


def expert_hessians(x, topk_ids, weights, num_experts, H=None, counts=None, backend: str = "auto",
                    sqrt_w: bool = False):
    """Per-expert Hessians of the routed tokens; see `moequant.reference.expert_hessians_ref` for the math.
    sqrt_w: the Gram matrix of the rows x·√w (`scaled_rows`: rounded once to x's dtype, so PSD); the kernel forms
    them in its sorted order (`moequant.kernels.expert_hessians.sorted_rows`), the reference in (token, slot) order."""
    if uses_kernel(x, backend):
        from ..kernels import expert_hessians as kernel  # Triton; needs a GPU (or TRITON_INTERPRET=1)

        return kernel(x, topk_ids, weights, num_experts, H=H, counts=counts, sqrt_w=sqrt_w)
    if sqrt_w and weights is not None:
        x = scaled_pair_rows(x, weights)  # one row per (token, slot); with k = 1 that is scaled_rows
        topk_ids, weights = topk_ids.reshape(-1, 1), None
    return expert_hessians_ref(x, topk_ids, weights, num_experts, H=H, counts=counts)
