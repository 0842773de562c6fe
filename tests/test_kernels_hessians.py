"""expert_hessians (Triton) against expert_hessians_ref, in float64, on fresh random inputs.

CPU: Triton interpreter (TRITON_INTERPRET=1, set here when there is no GPU), tiny shapes, fp16/fp32.
GPU: real shapes, bf16/fp16.
"""
import os

import pytest
import torch
from triton.runtime.interpreter import InterpretedFunction

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from moequant.kernels import expert_hessians  # noqa: E402
from moequant.kernels.moe_align import moe_align  # noqa: E402
from moequant.kernels.expert_hessians import _expert_hessian_kernel as _KERNEL  # noqa: E402
from conftest import gpu, interpreter_only  # noqa: E402
from moequant.reference import expert_hessians_ref  # noqa: E402



_INTERPRETED = isinstance(_KERNEL, InterpretedFunction)
interpreter = interpreter_only(_KERNEL)


def _inputs(T, K, E, k, dtype, device, weighted, gen):
    x = torch.randn(T, K, generator=gen).to(dtype).to(device)
    ids = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)]).to(device)
    w = torch.rand(T, k, generator=gen).to(device) + 0.05 if weighted else None
    return x, ids, w


def _exact(x, ids, w, E):
    """float64 H per expert (the reference's formula in float64)."""
    T, K = x.shape
    xd, ids = x.double().cpu(), ids.cpu()
    H = torch.zeros(E, K, K, dtype=torch.float64)
    for j in range(E):
        t, s = torch.nonzero(ids == j, as_tuple=True)
        rows = xd[t] if w is None else xd[t] * w.double().cpu()[t, s].sqrt().unsqueeze(1)
        H[j] = rows.T @ rows
    return H


def _rel(a, b):
    return ((a.double().cpu() - b).norm() / b.norm()).item()


def test_alignment_groups_pairs_by_expert():
    gen = torch.Generator().manual_seed(0)
    T, k, E, bs = 37, 3, 5, 8
    ids = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)])
    al = moe_align(ids, E, bs)
    off = al.expert_offsets.tolist()
    assert off[0] == 0 and all(o % bs == 0 for o in off)
    seen = []
    for e in range(E):
        run = al.sorted_ids[off[e]:off[e + 1]].tolist()
        real = [p for p in run if p < T * k]
        assert len(real) == int(al.counts[e]) == int((ids == e).sum())
        assert all(ids.view(-1)[p] == e for p in real)
        assert run[:len(real)] == real and all(p == T * k for p in run[len(real):])
        seen += real
        for b in range(off[e] // bs, off[e + 1] // bs):
            assert int(al.block_expert[b]) == e
    assert sorted(seen) == list(range(T * k))
    assert int(al.num_padded) == off[-1]
    assert (al.block_expert[off[-1] // bs:] == -1).all()


@interpreter
@pytest.mark.parametrize("wide", [1, 2])
@pytest.mark.parametrize("dtype,weighted", [(torch.float32, True), (torch.float16, False), (torch.float16, True)])
def test_hessians_cpu_interpreter(dtype, weighted, wide):
    gen = torch.Generator().manual_seed(1)
    T, K, E, k = 48, 72, 4, 2  # K not a multiple of the tile: masked edges
    x, ids, w = _inputs(T, K, E - 1, k, dtype, "cpu", weighted, gen)  # expert E-1 gets no rows: H stays
    H0 = torch.randn(E, K, K, generator=gen)
    H0 = H0 + H0.transpose(1, 2)
    c0 = torch.randint(0, 10, (E,), generator=gen)
    H, c = expert_hessians(x, ids, w, E, H=H0.clone(), counts=c0.clone(), wide=wide)
    exact = _exact(x, ids, w, E) + H0.double()
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    assert torch.isfinite(H).all()
    assert _rel(H, exact) < tol
    assert torch.equal(H[3], H0[3])
    assert torch.equal(H, H.transpose(1, 2))
    _, cref = expert_hessians_ref(x, ids, w, E)
    assert torch.equal(c, c0 + cref)


@interpreter
def test_hessians_down_proj_rows_cpu():
    """down_proj: one row per (token, expert); topk_ids [N, 1], weights [N, 1]."""
    gen = torch.Generator().manual_seed(2)
    N, I, E = 40, 48, 3
    x = torch.randn(N, I, generator=gen).half()
    ids = torch.randint(0, E, (N, 1), generator=gen)
    w = torch.rand(N, 1, generator=gen)
    H, c = expert_hessians(x, ids, w, E)
    assert _rel(H, _exact(x, ids, w, E)) < 2e-3
    assert torch.equal(c, torch.bincount(ids.view(-1), minlength=E))


def test_hessians_errors():
    x = torch.randn(8, 16)
    ids = torch.zeros(8, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="topk_ids"):
        expert_hessians(x, ids[:4], None, 2)
    with pytest.raises(ValueError, match="weights"):
        expert_hessians(x, ids, torch.ones(8, 3), 2)
    with pytest.raises(ValueError, match="H must be"):
        expert_hessians(x, ids, None, 2, H=torch.zeros(2, 16, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match="bf16, fp16 or fp32"):
        expert_hessians(x.double(), ids, None, 2)


@pytest.mark.skipif(_INTERPRETED, reason="needs the compiled (non-interpreted) kernel")
def test_hessians_cpu_without_interpreter_raises():
    with pytest.raises(RuntimeError, match="moequant.reference"):
        expert_hessians(torch.randn(8, 16), torch.zeros(8, 1, dtype=torch.long), None, 2)


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("weighted", [False, True])
def test_hessians_gpu(dtype, weighted):
    gen = torch.Generator().manual_seed(3)
    T, K, E, k = 3000, 1000, 16, 4  # K not a multiple of 128
    x, ids, w = _inputs(T, K, E, k, dtype, "cuda", weighted, gen)
    exact = _exact(x, ids, w, E)
    H, c = expert_hessians(x, ids, w, E)
    assert torch.isfinite(H).all()
    assert _rel(H, exact) < (4e-3 if weighted else 1e-5)
    assert torch.equal(H, H.transpose(1, 2))
    for wide in (1, 2):  # either tile shape: the same sums in the same order, so the same bits (onto a filled H:
        Hw, _ = expert_hessians(x, ids, w, E, H=torch.full_like(H, 7.0), wide=wide)  # every element is added to)
        assert torch.equal(Hw, H + 7.0), wide
    H0 = torch.randn(E, K, K, generator=gen).cuda()  # accumulating: every tile must add onto what was there
    H2, c2 = expert_hessians(x, ids, w, E, H=H0.clone(), counts=c)
    assert _rel(H2, exact + H0.double().cpu()) < (4e-3 if weighted else 1e-5)
    assert torch.equal(c2.cpu(), 2 * torch.bincount(ids.view(-1).cpu(), minlength=E))


@gpu
def test_hessians_gpu_fp32_and_down_proj():
    gen = torch.Generator().manual_seed(4)
    N, I, E = 5000, 1408, 8
    x = torch.randn(N, I, generator=gen).cuda()
    ids = torch.randint(0, E, (N, 1), generator=gen).cuda()
    w = torch.rand(N, 1, generator=gen).cuda()
    H, _ = expert_hessians(x, ids, w, E)
    assert _rel(H, _exact(x, ids, w, E)) < 1e-5


def _check_sqrt_w_is_scaled_rows(x, ids, w, E, tol):
    """sqrt_w=True: the Gram matrix of the rows x·√w (`scaled_pair_rows`: fp32 product, rounded once); against the
    unweighted kernel on rows formed by torch (topk_ids [T·k, 1]: the same pairs in the same sorted order) and the
    exact sum. Both ways of getting the rows: formed in sorted order first (default) and scaled inside the kernel.
    tol=0: the formed rows must give the same bits (same products summed in the same order)."""
    from moequant.quant.hessian import scaled_pair_rows
    Hr, cr = expert_hessians(scaled_pair_rows(x, w), ids.reshape(-1, 1), None, E)
    for form_rows in (True, False):
        H, c = expert_hessians(x, ids, w, E, sqrt_w=True, form_rows=form_rows)
        assert torch.equal(c, cr) and torch.equal(H, H.transpose(1, 2))
        if form_rows and tol == 0:
            assert torch.equal(H, Hr)
        assert _rel(H, Hr.double().cpu()) < max(tol, 1e-6), form_rows  # in the kernel: another order of the sums
        assert _rel(H, _exact(x, ids, w, E)) < 4e-3


def _check_formed_rows_match_gather(x, ids, E):
    """Without weights, form_rows=True copies the rows in sorted order: the same products in the same order as
    the gathering kernel, so the same bits; and onto a filled H / counts it accumulates."""
    H, c = expert_hessians(x, ids, None, E)
    H0 = torch.randn(H.shape, generator=torch.Generator().manual_seed(9)).to(H.device)
    Hf, cf = expert_hessians(x, ids, None, E, H=H0.clone(), counts=c.clone(), form_rows=True)
    assert torch.equal(cf, 2 * c)
    assert torch.equal(Hf, H0 + H)
    with pytest.raises(ValueError, match="sqrt_w=True"):
        expert_hessians(x, ids, torch.rand(ids.shape, device=x.device), E, form_rows=True)


@interpreter
def test_hessians_sqrt_w_cpu_interpreter():
    gen = torch.Generator().manual_seed(5)
    x, ids, w = _inputs(40, 56, 3, 2, torch.float16, "cpu", True, gen)
    _check_sqrt_w_is_scaled_rows(x, ids, w, 3, 0)
    _check_formed_rows_match_gather(x, ids, 3)


@gpu
def test_hessians_sqrt_w_gpu():
    gen = torch.Generator().manual_seed(6)
    x, ids, w = _inputs(3000, 1000, 16, 4, torch.bfloat16, "cuda", True, gen)
    _check_sqrt_w_is_scaled_rows(x, ids, w, 16, 1e-6)
    _check_formed_rows_match_gather(x, ids, 16)
