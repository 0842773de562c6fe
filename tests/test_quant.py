"""Packing, the RTN quantizer and the batched GPTQ solver against straightforward implementations."""
import logging

import pytest
import torch

from moequant.packing import dequantize, dequantize_codes, pack_int32, unpack_int32
from moequant.quant.gptq import gptq_quantize, proxy_loss
from moequant.quant.quantizer import QuantSpec, quantize_rtn, rtn, to_packed


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_roundtrip_exact(bits):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (3, 7, 96), generator=g, dtype=torch.uint8)
    packed = pack_int32(codes, bits)
    assert packed.dtype == torch.int32 and packed.shape == (3, 96 * bits // 32, 7)
    assert torch.equal(unpack_int32(packed, bits), codes)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_bit_stream_layout(bits):
    """Code i of a column occupies bits [i*bits, (i+1)*bits) of the column's little-endian stream (GPTQ v1)."""
    codes = torch.randint(0, 2**bits, (2, 64), dtype=torch.uint8)
    words = pack_int32(codes, bits)
    for o in range(2):
        stream = 0
        for r in range(words.shape[0]):
            stream |= (int(words[r, o]) & 0xFFFFFFFF) << (32 * r)
        got = [(stream >> (i * bits)) & ((1 << bits) - 1) for i in range(64)]
        assert got == codes[o].tolist()


def test_pack_errors():
    with pytest.raises(ValueError, match="multiple"):
        pack_int32(torch.zeros(2, 12, dtype=torch.uint8), 4)
    with pytest.raises(ValueError, match="out of range"):
        pack_int32(torch.full((2, 8), 16, dtype=torch.uint8), 4)
    with pytest.raises(ValueError, match="bits=5"):
        QuantSpec(bits=5)


def test_dequantize_matches_elementwise_formula():
    torch.manual_seed(0)
    spec = QuantSpec(bits=4, group_size=32, sym=False)
    w = torch.randn(2, 5, 64)
    p = quantize_rtn(w, spec, torch.float16)
    codes = unpack_int32(p.qweight, 4)
    got = dequantize(p, torch.float32)
    for e in range(2):
        for o in range(5):
            for i in range(64):
                s = p.scales[e, i // 32, o].float()
                z = p.qzeros[e, i // 32, o].float()
                assert got[e, o, i] == (codes[e, o, i].float() - z) * s


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group", [32, 64, 128, -1])
def test_rtn_error_shrinks_with_bits(sym, group):
    torch.manual_seed(1)
    w = torch.randn(16, 128)
    errs = []
    for bits in (2, 3, 4, 8):
        spec = QuantSpec(bits=bits, group_size=group, sym=sym)
        codes, scales, zeros = rtn(w, spec)
        assert codes.max() <= spec.maxq
        w_hat = dequantize(to_packed(codes, scales, zeros, spec), torch.float32)
        errs.append(((w_hat - w).norm() / w.norm()).item())
        # Each weight lands within half a step of its group's grid (nothing clipped for min/max grids).
        step = scales.float().repeat_interleave(spec.group_of(128), dim=0).T
        assert ((w_hat - w).abs() <= step / 2 + 1e-6).all()
    assert errs == sorted(errs, reverse=True) and errs[-1] < 0.01


def test_group_size_must_divide():
    with pytest.raises(ValueError, match="does not divide"):
        rtn(torch.randn(4, 96), QuantSpec(group_size=64))


def test_mse_clip_lowers_error():
    """The clipping search minimises the 2.4-norm error per channel: never worse per row, clearly better overall."""
    torch.manual_seed(2)
    w = torch.distributions.StudentT(4.0).sample((64, 256))
    plain = QuantSpec(bits=3, group_size=-1)
    clip = QuantSpec(bits=3, group_size=-1, mse_clip=True)
    e = [(quantize_rtn(w, s).dequantize(torch.float32) - w).abs().pow(2.4).sum(-1) for s in (plain, clip)]
    assert (e[1] <= e[0] * (1 + 1e-5)).all()
    assert e[1].sum() < 0.7 * e[0].sum()


# -- GPTQ -----------------------------------------------------------------------------------------------------

def straightforward_gptq(W, H, spec, damp=0.01):
    """Textbook GPTQ for one matrix, no lazy blocks, no batching (fp64): the independent check."""
    W = W.double().clone()
    H = H.double().clone()
    R, C = W.shape
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += damp * torch.mean(torch.diag(H)) * torch.eye(C, dtype=H.dtype)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    g = spec.group_of(C)
    codes = torch.zeros(R, C)
    from moequant.quant.quantizer import find_params, quantize_codes
    for i in range(C):
        if i % g == 0:
            scale, zero = find_params(W[:, i:i + g], spec, torch.float64)
        q = quantize_codes(W[:, i], scale, zero, spec.maxq)
        codes[:, i] = q
        err = (W[:, i] - (q - zero) * scale) / Hinv[i, i]
        W[:, i:] -= err.unsqueeze(1) * Hinv[i, i:].unsqueeze(0)
    return codes


def _hessian(B, C, n=600, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(B, n, C, generator=g, dtype=torch.float64) @ torch.randn(C, C, generator=g,
                                                                              dtype=torch.float64) * 0.3
    return X.transpose(1, 2) @ X


@pytest.mark.parametrize("sym", [True, False])
def test_gptq_matches_straightforward_per_matrix(sym):
    torch.manual_seed(3)
    B, R, C = 3, 8, 96
    W, H = torch.randn(B, R, C, dtype=torch.float64), _hessian(B, C)
    H[1, :, 5] = H[1, 5, :] = 0  # a dead column in one matrix
    spec = QuantSpec(bits=4, group_size=32, sym=sym)
    res = gptq_quantize(W, H, spec, block_size=32, scale_dtype=torch.float64)
    for b in range(B):
        ref = straightforward_gptq(W[b], H[b], spec)
        assert (res.codes[b].double() == ref).float().mean() > 0.995  # equal up to rare rounding ties
        assert (res.weight[b, :, 5] == 0).all() if b == 1 else True


@pytest.mark.parametrize("act_order,static", [(False, False), (True, False), (True, True), (False, True)])
def test_gptq_beats_rtn_on_proxy_loss(act_order, static):
    torch.manual_seed(4)
    B, R, C = 4, 16, 128
    W, H = torch.randn(B, R, C), _hessian(B, C, seed=1).float()
    spec = QuantSpec(bits=3, group_size=32)
    res = gptq_quantize(W, H, spec, act_order=act_order, static_groups=static)
    w_rtn = quantize_rtn(W, spec).dequantize(torch.float32)
    # the packed codes reproduce the solver's weights exactly, g_idx included
    w_back = dequantize_codes(res.codes, res.scales, None, 32, res.g_idx, 3, torch.float32)
    assert torch.equal(w_back, res.weight)
    assert (res.g_idx is not None) == (act_order and not static)
    assert (proxy_loss(W, res.weight, H) < 0.8 * proxy_loss(W, w_rtn, H)).all()


def test_gptq_batched_equals_one_by_one():
    torch.manual_seed(5)
    W, H = torch.randn(3, 8, 64), _hessian(3, 64, seed=2).float()
    spec = QuantSpec(bits=4, group_size=-1)
    batched = gptq_quantize(W, H, spec)
    for b in range(3):
        single = gptq_quantize(W[b], H[b], spec)
        assert torch.equal(single.codes, batched.codes[b])


def test_gptq_raises_damping_on_failure(caplog):
    W = torch.randn(4, 32)
    H = -torch.eye(32)  # negative definite: needs damping to become positive
    H[0, 0] = 40.0
    with caplog.at_level(logging.WARNING, logger="moequant"):
        res = gptq_quantize(W, H, QuantSpec(bits=4, group_size=-1))
    assert "raising damp" in caplog.text and res.damp.item() > 0.01
