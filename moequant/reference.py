"""Plain-PyTorch references of every kernel. Tests and benchmarks import them from here.

They are written for clarity, not speed: a loop over experts, fp32 (or wider) arithmetic.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .packing import PackedWeight, dequantize


def expert_hessians_ref(x, topk_ids, weights, num_experts, H=None, counts=None):
    """Per-expert (affinity-weighted) Hessians, DESIGN.md contract / MoEQuant Eq. 19.

    x [T, K], topk_ids [T, k], weights [T, k] or None.
    H_j += sum over (t, s) with topk_ids[t, s] == j of  w[t, s] * x_t x_tᵀ   (w = 1 when weights is None)
    counts_j += number of such (t, s).  Accumulates into H / counts when given; returns (H, counts).
    """
    T, K = x.shape
    if H is None:
        H = torch.zeros(num_experts, K, K, dtype=torch.float32, device=x.device)
    if counts is None:
        counts = torch.zeros(num_experts, dtype=torch.int64, device=x.device)
    xf = x.float()
    for j in range(num_experts):
        t, s = torch.nonzero(topk_ids == j, as_tuple=True)
        if t.numel() == 0:
            continue
        rows = xf[t]
        if weights is not None:
            rows = rows * weights[t, s].float().sqrt().unsqueeze(1)
        H[j] += rows.T @ rows
        counts[j] += t.numel()
    return H, counts


def moe_ref(x, w13, w2, topk_ids, topk_weights, act=F.silu, compute_dtype=torch.float64):
    """The HF experts loop on dense weights: y = sum_s w_s * down_e(act(gate_e(x)) * up_e(x)).

    x [M, H], w13 [E, 2I, H] (gate rows first), w2 [E, H, I]. Returns [M, H] in compute_dtype.
    """
    xd = x.to(compute_dtype)
    y = torch.zeros_like(xd)
    I = w2.shape[-1]
    for j in torch.unique(topk_ids).tolist():
        t, s = torch.nonzero(topk_ids == j, as_tuple=True)
        gu = xd[t] @ w13[j].to(compute_dtype).T
        h = act(gu[:, :I]) * gu[:, I:]
        out = h @ w2[j].to(compute_dtype).T
        y.index_add_(0, t, out * topk_weights[t, s].to(compute_dtype).unsqueeze(1))
    return y


def fused_moe_w4a16_ref(x, w13: PackedWeight, w2: PackedWeight, topk_ids, topk_weights, compute_dtype=torch.float64):
    """Reference for `fused_moe_w4a16`: dequantize the packed experts, then `moe_ref`."""
    return moe_ref(x, dequantize(w13, torch.float32), dequantize(w2, torch.float32), topk_ids, topk_weights,
                   compute_dtype=compute_dtype)


def dequantize_ref(p: PackedWeight, dtype=None):
    """Reference for the `_C` dequantization ops."""
    return dequantize(p, dtype)
