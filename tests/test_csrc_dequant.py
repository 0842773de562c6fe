"""moequant._C dequantization (CPU always; CUDA when built with it) against packing.dequantize."""
import pytest
import torch

from moequant import ops
from moequant.packing import PackedWeight, pack_int32
from moequant.reference import dequantize_ref

pytestmark = pytest.mark.skipif(not ops.available(), reason="moequant._C is not built")
CUDA = torch.cuda.is_available() and ops.cuda_available()
DEVICES = ["cpu"] + (["cuda"] if CUDA else [])
TOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def random_packed(batch, out_f, in_f, bits, group_size, sym=True, act_order=False, scale_dtype=torch.bfloat16,
                  gen=None, device="cpu"):
    """Fresh random codes / scales / zeros (never zeros) in the package format."""
    g = in_f if group_size == -1 else group_size
    G = in_f // g
    codes = torch.randint(0, 1 << bits, (*batch, out_f, in_f), generator=gen, dtype=torch.int64)
    scales = (torch.rand(*batch, G, out_f, generator=gen) * 0.02 + 0.001).to(scale_dtype)
    zeros = None if sym else torch.randint(0, 1 << bits, (*batch, G, out_f), generator=gen).to(torch.uint8)
    g_idx = torch.randperm(in_f, generator=gen).div(g, rounding_mode="floor").to(torch.int32) if act_order else None
    p = PackedWeight(pack_int32(codes, bits), scales, zeros, g_idx, bits, g)
    return p.to(device)


def poison_allocator(shape, dtype, device):
    """Leave a NaN-filled block in the allocator so an unwritten output element shows up as NaN."""
    t = torch.full(shape, float("nan"), dtype=dtype, device=device)
    del t


CASES = [  # (batch, out, in, bits, group, sym, act_order)
    ((), 96, 256, 4, 128, True, False),
    ((), 64, 256, 4, 32, False, False),
    ((3,), 40, 128, 4, -1, True, False),
    ((2,), 72, 136, 4, 8, False, False),   # in not a multiple of 32: a partial chunk per column
    ((), 64, 256, 4, 64, False, True),    # act-order g_idx
    ((2,), 48, 128, 8, 64, False, False),
    ((), 33, 96, 8, -1, True, True),
    ((), 64, 256, 2, 128, True, False),
    ((2,), 40, 96, 3, 32, False, False),  # 3-bit codes straddle words
    ((), 40, 192, 3, 64, True, True),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"b{len(c[0])}-{c[1]}x{c[2]}-int{c[3]}-g{c[4]}-{'sym' if c[5] else 'asym'}{'-act' if c[6] else ''}")
def test_dequantize_matches_reference(case, device):
    batch, out_f, in_f, bits, group, sym, act = case
    gen = torch.Generator().manual_seed(hash(case) % 2**31)
    for scale_dtype, out_dtype in [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                                   (torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)]:
        p = random_packed(batch, out_f, in_f, bits, group, sym, act, scale_dtype, gen, device)
        ref = dequantize_ref(p.to("cpu"), out_dtype)
        poison_allocator(ref.shape, out_dtype, device)
        got = ops.dequantize(p, out_dtype)
        assert got.dtype == out_dtype and got.shape == (*batch, out_f, in_f) and got.device.type == device
        assert not got.isnan().any(), "unwritten output elements"
        torch.testing.assert_close(got.cpu(), ref, rtol=TOL[out_dtype], atol=1e-7)


def test_dequantize_default_dtype_is_scales_dtype():
    p = random_packed((), 16, 64, 4, 32, scale_dtype=torch.float16)
    assert ops.dequantize(p).dtype == torch.float16


@pytest.mark.skipif(not CUDA, reason="needs CUDA and a CUDA build of moequant._C")
def test_dequantize_cuda_large_stack_bit_exact():
    """An expert stack the size of a real layer slice; same-dtype scales give bit-identical results."""
    gen = torch.Generator().manual_seed(7)
    p = random_packed((4,), 1024, 2048, 4, 128, sym=False, scale_dtype=torch.bfloat16, gen=gen, device="cuda")
    got = ops.dequantize(p, torch.bfloat16)
    ref = dequantize_ref(p, torch.bfloat16)
    assert torch.equal(got, ref)


def test_dequantize_bad_input_raises():
    p = random_packed((), 16, 64, 4, 32)
    with pytest.raises(RuntimeError, match="qweight must be int32"):
        torch.ops.moequant.dequantize(p.qweight.float(), p.scales, None, None, 4, 32, torch.bfloat16)
    with pytest.raises(RuntimeError, match="groups"):
        torch.ops.moequant.dequantize(p.qweight, p.scales, None, None, 4, 16, torch.bfloat16)
    with pytest.raises(RuntimeError, match="bits=5"):
        torch.ops.moequant.dequantize(p.qweight, p.scales, None, None, 5, 32, torch.bfloat16)
    bad_gidx = torch.full((64,), 9, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="g_idx values"):
        torch.ops.moequant.dequantize(p.qweight, p.scales, None, bad_gidx, 4, 32, torch.bfloat16)
