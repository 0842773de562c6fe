"""fused_moe_w4a16 (Triton) against fused_moe_w4a16_ref (float64) on fresh random inputs.

CPU: Triton interpreter (TRITON_INTERPRET=1, set here when there is no GPU), tiny shapes, fp16; the kernel
     nibble order of prepare_moe_w4a16; the dequantized weight tile bit for bit against packing.dequantize.
GPU: real MoE shapes (E=60, I=1408, odd M), bf16/fp16, group sizes 32/64/128/per-channel, sym/asym, both operand
     orders; the inline-PTX dequant bit for bit against packing.dequantize and against the plain-Triton path.
"""
import dataclasses
import os

import pytest
import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from moequant.kernels import MoeConfig, default_config, fused_moe_w4a16, prepare_moe_w4a16  # noqa: E402
from moequant.kernels.fused_moe_w4a16 import _load_consts, _load_words, _weight_tile  # noqa: E402
from moequant.kernels.moe_align import moe_align  # noqa: E402
from moequant.packing import PackedWeight, dequantize, unpack_int32  # noqa: E402
from moequant.quant.quantizer import QuantSpec, quantize_rtn  # noqa: E402
from moequant.kernels.fused_moe_w4a16 import _moe_gemm1_kernel as _KERNEL  # noqa: E402
from conftest import gpu, interpreter_only  # noqa: E402
from moequant.reference import fused_moe_w4a16_ref  # noqa: E402



_INTERPRETED = isinstance(_KERNEL, InterpretedFunction)
interpreter = interpreter_only(_KERNEL)


def _layer(E, H, I, g, sym, dtype, device, gen):
    spec = QuantSpec(bits=4, group_size=g, sym=sym)
    w13 = torch.randn(E, 2 * I, H, generator=gen) / H ** 0.5
    w2 = torch.randn(E, H, I, generator=gen) / I ** 0.5
    return quantize_rtn(w13, spec, dtype).to(device), quantize_rtn(w2, spec, dtype).to(device)


def _routing(M, E, k, device, gen):
    ids = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(M)])
    w = torch.softmax(torch.randn(M, k, generator=gen), -1)
    return ids.to(device), w.to(device)


def _poison_allocator(device):
    """Fill memory the caching allocator will hand out next with NaN, so unwritten buffers show."""
    if device == "cuda":
        torch.full((64 << 20,), float("nan"), device=device)  # freed at once, its blocks stay cached


def _check(out, ref, dtype):
    assert out.dtype == dtype and out.shape == ref.shape
    assert torch.isfinite(out).all()
    o, r = out.double().cpu(), ref.double().cpu()
    rel = ((o - r).norm() / r.norm()).item()
    assert rel < (1e-2 if dtype == torch.bfloat16 else 3e-3), rel
    # every row was written: per-row errors too, not only the global norm
    row_rel = (o - r).norm(dim=1) / r.norm(dim=1)
    assert row_rel.max().item() < (3e-2 if dtype == torch.bfloat16 else 1e-2), row_rel.max().item()


@triton.jit
def _dequant_tile_kernel(qw_ptr, s_ptr, z_ptr, out_ptr, N, K, G, ROWS: tl.constexpr, BLOCK_K: tl.constexpr,
                         GROUP_SIZE: tl.constexpr, HAS_ZEROS: tl.constexpr, USE_ASM: tl.constexpr):
    """Expert 0's rows [pid*ROWS, ...) dequantized tile by tile by the kernel's own helpers, stored [N, K]."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    for k0 in range(0, K, BLOCK_K):
        a, b = _load_consts(s_ptr, z_ptr, rows.to(tl.int64), N, G, k0, ROWS, BLOCK_K, GROUP_SIZE, HAS_ZEROS, USE_ASM)
        q = _load_words(qw_ptr, rows.to(tl.int64), K // 8, k0, BLOCK_K // 8, False)
        w = _weight_tile(q, a, b, ROWS, BLOCK_K, out_ptr.dtype.element_ty, USE_ASM)
        tl.store(out_ptr + rows[:, None] * K + (k0 + tl.arange(0, BLOCK_K))[None, :], w)


def _check_dequant_tile(device, dtype, g, sym, use_asm, N=32, K=256, block_k=64):
    gen = torch.Generator().manual_seed(g + 7 * sym + (dtype == torch.bfloat16))
    p = quantize_rtn(torch.randn(1, N, K, generator=gen), QuantSpec(bits=4, group_size=g, sym=sym), dtype).to(device)
    kw = prepare_moe_w4a16(p)
    out = torch.full((N, K), float("nan"), dtype=dtype, device=device)
    gs = K if g == -1 else g
    _dequant_tile_kernel[(N // 16,)](kw.qweight, kw.scales, kw.qzeros if kw.qzeros is not None else kw.scales, out,
                                     N, K, K // gs, ROWS=16, BLOCK_K=block_k, GROUP_SIZE=gs, HAS_ZEROS=not sym,
                                     USE_ASM=use_asm)
    # one rounding of the exact (code - zero) * scale, like the reference: equal bit for bit
    assert torch.equal(out.cpu(), dequantize(p, dtype)[0].cpu())


def test_kernel_nibble_order():
    """prepare_moe_w4a16 puts code j of each word at bit 4*(j//2) + 16*(j%2), words [N, K/8]; scales unchanged."""
    gen = torch.Generator().manual_seed(3)
    p = quantize_rtn(torch.randn(2, 24, 64, generator=gen), QuantSpec(bits=4, group_size=32, sym=False), torch.float16)
    kw = prepare_moe_w4a16(p)
    codes = unpack_int32(p.qweight, 4).long()  # [E, N, K]
    words = kw.qweight.long() & 0xFFFFFFFF  # [E, N, K/8]
    assert kw.qweight.shape == (2, 24, 8) and kw.qweight.dtype == torch.int32
    for j in range(8):
        assert torch.equal((words >> (4 * (j // 2) + 16 * (j % 2))) & 0xF, codes[..., j::8])
    assert torch.equal(kw.scales, p.scales) and torch.equal(kw.qzeros, p.qzeros)


def _check_align_paths(device):
    """The Triton alignment (3 kernels) equals the torch one field for field (experts left empty included)."""
    gen = torch.Generator().manual_seed(5)
    for T, k, E, bs in [(37, 3, 5, 8), (1, 2, 8, 16), (5, 8, 128, 16), (300, 4, 60, 64), (16, 2, 8, 128), (2, 6, 64, 32),
                        (600, 8, 128, 16)]:  # the last: several programs, several sub-chunks each
        ids = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)]).to(device)
        if T > 4:
            ids[: T // 2, 0] = 1  # skew: one expert takes many pairs
            ids[: T // 2, 1:] = torch.where(ids[: T // 2, 1:] == 1, 0, ids[: T // 2, 1:])
        a = moe_align(ids, E, bs, use_triton=True)
        b = moe_align(ids, E, bs, use_triton=False)
        for name, x, y in zip(a._fields[:5], a[:5], b[:5]):
            assert x.dtype == y.dtype and torch.equal(x.cpu(), y.cpu()), (T, k, E, bs, name)


@interpreter
def test_align_triton_matches_torch_cpu_interpreter():
    _check_align_paths("cpu")


@interpreter
@pytest.mark.parametrize("g,sym", [(32, False), (128, True), (-1, False)])
def test_dequant_tile_cpu_interpreter(g, sym):
    _check_dequant_tile("cpu", torch.float16, g, sym, use_asm=False)


@interpreter
@pytest.mark.parametrize("g,sym,cfg", [
    (32, True, None),
    (32, False, MoeConfig(16, 32, 32, 64, 2, 4, 1, swap_ab=False)),  # K tile 64 over I=96: ragged, 2 groups per tile
    (-1, False, None),  # per channel
])
def test_fused_moe_cpu_interpreter(g, sym, cfg):
    gen = torch.Generator().manual_seed(10 + g + sym)
    M, H, I, E, k = 5, 64, 96, 4, 2
    w13, w2 = _layer(E, H, I, g, sym, torch.float16, "cpu", gen)
    x = torch.randn(M, H, generator=gen).half()
    ids, tw = _routing(M, E, k, "cpu", gen)
    out = fused_moe_w4a16(x, prepare_moe_w4a16(w13), prepare_moe_w4a16(w2), ids, tw, config=cfg)
    _check(out, fused_moe_w4a16_ref(x, w13, w2, ids, tw), torch.float16)


@interpreter
def test_fused_moe_cpu_accepts_packed_weights_and_topk1():
    gen = torch.Generator().manual_seed(7)
    M, H, I, E, k = 3, 32, 64, 3, 1
    w13, w2 = _layer(E, H, I, 32, True, torch.float16, "cpu", gen)
    x = torch.randn(M, H, generator=gen).half()
    ids, tw = _routing(M, E, k, "cpu", gen)
    tw = tw * 0.7  # not 1: the routing weight must be applied
    _check(fused_moe_w4a16(x, w13, w2, ids, tw), fused_moe_w4a16_ref(x, w13, w2, ids, tw), torch.float16)


def test_fused_moe_errors():
    gen = torch.Generator().manual_seed(8)
    E, H, I = 2, 64, 32
    w13, w2 = _layer(E, H, I, 32, True, torch.float16, "cpu", gen)
    x = torch.randn(4, H, generator=gen).half()
    ids, tw = _routing(4, E, 1, "cpu", gen)
    with pytest.raises(ValueError, match="bf16 or fp16"):
        fused_moe_w4a16(x.float(), w13, w2, ids, tw)
    with pytest.raises(ValueError, match="w2 must be"):
        fused_moe_w4a16(x, w13, w13, ids, tw)
    with pytest.raises(ValueError, match="hidden size"):
        fused_moe_w4a16(x[:, :32].contiguous(), w13, w2, ids, tw)
    bad_g = PackedWeight(w13.qweight, w13.scales, None, None, 4, 48)
    with pytest.raises(ValueError, match="does not divide"):
        fused_moe_w4a16(x, bad_g, w2, ids, tw)
    bad_scales = PackedWeight(w13.qweight, w13.scales[:, :1], None, None, 4, 32)
    with pytest.raises(ValueError, match="scales shape"):
        fused_moe_w4a16(x, bad_scales, w2, ids, tw)
    with pytest.raises(ValueError, match="4-bit"):
        fused_moe_w4a16(x, PackedWeight(w13.qweight, w13.scales, None, None, 8, 32), w2, ids, tw)
    with pytest.raises(ValueError, match="act-order"):
        fused_moe_w4a16(x, PackedWeight(w13.qweight, w13.scales, None, torch.zeros(H, dtype=torch.int32), 4, 32),
                        w2, ids, tw)
    with pytest.raises(ValueError, match="topk_weights"):
        fused_moe_w4a16(x, w13, w2, ids, tw[:, :0])
    with pytest.raises(ValueError, match="scales are torch.float16, x is torch.bfloat16"):
        fused_moe_w4a16(x.bfloat16(), w13, w2, ids, tw)


@pytest.mark.skipif(_INTERPRETED, reason="needs the compiled (non-interpreted) kernel")
def test_fused_moe_cpu_without_interpreter_raises():
    gen = torch.Generator().manual_seed(9)
    w13, w2 = _layer(2, 32, 32, 32, True, torch.float16, "cpu", gen)
    ids, tw = _routing(2, 2, 1, "cpu", gen)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        fused_moe_w4a16(torch.randn(2, 32).half(), w13, w2, ids, tw)


@gpu
@pytest.mark.parametrize("dtype,g,sym,M", [
    (torch.bfloat16, 128, True, 1), (torch.bfloat16, 128, True, 33), (torch.bfloat16, 128, True, 301),
    (torch.bfloat16, 128, False, 301), (torch.float16, 32, False, 33), (torch.bfloat16, 64, True, 1),
    (torch.float16, -1, True, 301), (torch.bfloat16, -1, False, 33),
])
def test_fused_moe_gpu_qwen_shape(dtype, g, sym, M):
    """Qwen1.5-MoE shape: E=60, k=4, H=2048, I=1408 (I is not a multiple of 256), odd M."""
    gen = torch.Generator().manual_seed(M * 100 + g + sym)
    E, k, H, I = 60, 4, 2048, 1408
    w13, w2 = _layer(E, H, I, g, sym, dtype, "cuda", gen)
    p13, p2 = prepare_moe_w4a16(w13), prepare_moe_w4a16(w2)
    x = torch.randn(M, H, generator=gen).to(dtype).cuda()
    ids, tw = _routing(M, E, k, "cuda", gen)
    _poison_allocator("cuda")
    out = fused_moe_w4a16(x, p13, p2, ids, tw)
    _check(out, fused_moe_w4a16_ref(x, w13, w2, ids, tw), dtype)


@gpu
@pytest.mark.parametrize("M,swap_ab", [(2, True), (4096, True), (4096, False), (2, False)])
def test_fused_moe_gpu_large_m_and_skewed_routing(M, swap_ab):
    """Mixtral-like ratios (E=8, k=2) at small and large M; routing skewed so one expert takes most tokens."""
    gen = torch.Generator().manual_seed(M)
    E, k, H, I = 8, 2, 1024, 3584
    w13, w2 = _layer(E, H, I, 128, True, torch.bfloat16, "cuda", gen)
    p13, p2 = prepare_moe_w4a16(w13), prepare_moe_w4a16(w2)
    x = torch.randn(M, H, generator=gen).bfloat16().cuda()
    ids, tw = _routing(M, E, k, "cuda", gen)
    ids[: M // 2, 0] = 3
    ids[: M // 2, 1] = torch.where(ids[: M // 2, 1] == 3, 5, ids[: M // 2, 1])
    cfg = dataclasses.replace(default_config(M, k, E, H, I), swap_ab=swap_ab)
    _poison_allocator("cuda")
    out = fused_moe_w4a16(x, p13, p2, ids, tw, config=cfg)
    _check(out, fused_moe_w4a16_ref(x, w13, w2, ids, tw), torch.bfloat16)


@gpu
def test_fused_moe_gpu_cuda_graph():
    """The layer is sync-free: capture it in a CUDA graph, replay on new inputs in the same buffers."""
    gen = torch.Generator().manual_seed(11)
    E, k, H, I, M = 16, 4, 512, 768, 24
    w13, w2 = _layer(E, H, I, 128, True, torch.bfloat16, "cuda", gen)
    p13, p2 = prepare_moe_w4a16(w13), prepare_moe_w4a16(w2)
    x = torch.randn(M, H, generator=gen).bfloat16().cuda()
    ids, tw = _routing(M, E, k, "cuda", gen)
    fused_moe_w4a16(x, p13, p2, ids, tw)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_moe_w4a16(x, p13, p2, ids, tw)
    x2 = torch.randn(M, H, generator=gen).bfloat16().cuda()
    ids2, tw2 = _routing(M, E, k, "cuda", gen)
    x.copy_(x2), ids.copy_(ids2), tw.copy_(tw2)
    out.fill_(float("nan"))
    graph.replay()
    _check(out, fused_moe_w4a16_ref(x2, w13, w2, ids2, tw2), torch.bfloat16)


@gpu
def test_align_triton_matches_torch_gpu():
    _check_align_paths("cuda")


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("g,sym", [(32, False), (128, True), (64, False), (-1, True)])
def test_dequant_tile_gpu_asm(dtype, g, sym):
    """The inline-PTX 16-bit dequant equals packing.dequantize bit for bit (and so does the plain-Triton path)."""
    _check_dequant_tile("cuda", dtype, g, sym, use_asm=True, K=512, block_k=128)
    _check_dequant_tile("cuda", dtype, g, sym, use_asm=False, K=512, block_k=128)


@gpu
@pytest.mark.parametrize("M,dtype,g,sym,swap_ab", [
    (600, torch.float16, 32, False, False),  # several groups per K tile, zeros, fp16, tokens on the left
    (600, torch.bfloat16, 64, False, True),
    (9, torch.bfloat16, 128, True, True),
    (1500, torch.bfloat16, -1, False, False),
])
def test_fused_moe_gpu_asm_matches_plain_and_ref(M, dtype, g, sym, swap_ab):
    """Both dequant paths (inline PTX, plain Triton) against the reference, and against each other."""
    gen = torch.Generator().manual_seed(M + g)
    E, k, H, I = 8, 2, 512, 1408
    w13, w2 = _layer(E, H, I, g, sym, dtype, "cuda", gen)
    p13, p2 = prepare_moe_w4a16(w13), prepare_moe_w4a16(w2)
    x = torch.randn(M, H, generator=gen).to(dtype).cuda()
    ids, tw = _routing(M, E, k, "cuda", gen)
    cfg = dataclasses.replace(default_config(M, k, E, H, I), swap_ab=swap_ab)
    if not swap_ab:  # tokens on the left need a weight tile of <= 16 rows per warp (compiler limit seen in triton 3.6)
        cfg = dataclasses.replace(cfg, block_m=max(cfg.block_m, 64), block_n1=64, block_n2=128, num_warps=8)
    _poison_allocator("cuda")
    out_asm = fused_moe_w4a16(x, p13, p2, ids, tw, config=cfg)
    _poison_allocator("cuda")
    out_plain = fused_moe_w4a16(x, p13, p2, ids, tw, config=dataclasses.replace(cfg, asm=False))
    ref = fused_moe_w4a16_ref(x, w13, w2, ids, tw)
    _check(out_asm, ref, dtype)
    _check(out_plain, ref, dtype)
    # same dequantized weights, same tiles: equal up to the order of the fp32 atomic adds
    diff = ((out_asm.double() - out_plain.double()).norm() / out_plain.double().norm()).item()
    assert diff < 2e-3, diff
