"""moequant._C small-batch fused MoE (moe_w4a16_decode) against reference.fused_moe_w4a16_ref (float64)."""
import pytest
import torch

from moequant import ops
from moequant.reference import fused_moe_w4a16_ref

from test_csrc_dequant import poison_allocator, random_packed

pytestmark = pytest.mark.skipif(not ops.available(), reason="moequant._C is not built")
CUDA = torch.cuda.is_available() and ops.cuda_available()


def make_problem(M, E, k, H, I, group, sym, dtype, gen, device, same_expert=False, ids_dtype=torch.int64):
    x = torch.randn(M, H, generator=gen).to(dtype)
    w13 = random_packed((E,), 2 * I, H, 4, group, sym, False, dtype, gen)
    w2 = random_packed((E,), H, I, 4, group, sym, False, dtype, gen)
    if same_expert:  # every token routed to expert 1 (plus others from 2..E-1): a long token list for one expert
        ids = torch.stack([torch.randperm(E - 2, generator=gen)[: k - 1] + 2 for _ in range(M)]) if k > 1 else None
        ids = torch.ones(M, 1, dtype=torch.int64) if ids is None else torch.cat(
            [torch.ones(M, 1, dtype=torch.int64), ids], 1)
    else:
        ids = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(M)])
    wts = torch.softmax(torch.randn(M, k, generator=gen), -1).to(dtype)
    mv = lambda t: t.to(device)
    return mv(x), w13.to(device), w2.to(device), mv(ids.to(ids_dtype)), mv(wts)


def rel_err(got, ref):
    return ((got.double().cpu() - ref).norm() / ref.norm()).item()


SHAPES = [  # (M, E, k, H, I, group, sym)
    (1, 8, 2, 256, 128, 128, True),
    (3, 8, 2, 256, 96, 32, False),
    (8, 16, 4, 128, 64, -1, True),
    (16, 8, 2, 256, 128, 64, False),
    (5, 4, 1, 64, 32, 32, True),
    (2, 8, 2, 1024, 176, 16, False),  # K slices that start and end inside groups
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "M{}-E{}-k{}-H{}-I{}-g{}-{}".format(*s[:6], "sym" if s[6] else "asym"))
def test_moe_decode_cpu(shape):
    M, E, k, H, I, group, sym = shape
    gen = torch.Generator().manual_seed(sum(shape[:6]))
    x, w13, w2, ids, wts = make_problem(M, E, k, H, I, group, sym, torch.float32, gen, "cpu")
    ref = fused_moe_w4a16_ref(x, w13, w2, ids, wts)
    got = ops.moe_w4a16_decode(x, w13, w2, ids, wts)
    assert got.shape == x.shape and got.dtype == x.dtype
    assert rel_err(got, ref) < 1e-5


def test_moe_decode_cpu_bf16_and_int32_ids():
    gen = torch.Generator().manual_seed(3)
    x, w13, w2, ids, wts = make_problem(4, 8, 2, 128, 64, 32, False, torch.bfloat16, gen, "cpu", ids_dtype=torch.int32)
    ref = fused_moe_w4a16_ref(x, w13, w2, ids, wts)
    got = ops.moe_w4a16_decode(x, w13, w2, ids, wts)
    assert got.dtype == torch.bfloat16 and rel_err(got, ref) < 5e-3


def test_moe_decode_bad_input_raises():
    gen = torch.Generator().manual_seed(4)
    x, w13, w2, ids, wts = make_problem(2, 4, 2, 64, 32, 32, True, torch.float32, gen, "cpu")
    with pytest.raises(RuntimeError, match="shapes disagree"):
        ops.moe_w4a16_decode(x[:, :32], w13, w2, ids, wts)
    with pytest.raises(RuntimeError, match="outside"):
        ops.moe_w4a16_decode(x, w13, w2, ids + 4, wts)


@pytest.mark.skipif(not CUDA, reason="needs CUDA and a CUDA build of moequant._C")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES + [(1, 64, 6, 2048, 1408, 128, True), (2, 128, 8, 512, 768, 128, False),
                                            (12, 8, 2, 512, 384, 128, True), (1, 8, 2, 2048, 1408, 128, False),
                                            # one token (the gemv kernel): ragged column tiles, per channel,
                                            # K split in gate_up; group 16 at M=1 goes to the tiled kernel
                                            (1, 16, 4, 544, 1440, 32, False), (1, 8, 2, 1024, 256, -1, True),
                                            (1, 8, 2, 4096, 512, 64, False), (1, 8, 2, 256, 128, 16, False),
                                            # one token through the fused kernel (sm_90): groups of 32, and
                                            # of 512 K (two gate_up stages per group)
                                            (1, 16, 4, 1024, 96, 32, False), (1, 8, 2, 2048, 512, 512, True)],
                         ids=lambda s: "M{}-E{}-k{}-H{}-I{}-g{}-{}".format(*s[:6], "sym" if s[6] else "asym"))
def test_moe_decode_cuda(shape, dtype):
    M, E, k, H, I, group, sym = shape
    gen = torch.Generator().manual_seed(sum(shape[:6]) + 1)
    x, w13, w2, ids, wts = make_problem(M, E, k, H, I, group, sym, dtype, gen, "cuda")
    ref = fused_moe_w4a16_ref(x.cpu(), w13.to("cpu"), w2.to("cpu"), ids.cpu(), wts.cpu())
    poison_allocator((M, H), dtype, "cuda")
    got = ops.moe_w4a16_decode(x, w13, w2, ids, wts)
    torch.cuda.synchronize()
    assert got.shape == x.shape and got.dtype == dtype and not got.isnan().any()
    assert rel_err(got, ref) < 5e-3
    cpu = ops.moe_w4a16_decode(x.cpu(), w13.to("cpu"), w2.to("cpu"), ids.cpu(), wts.cpu())
    assert rel_err(got, cpu.double()) < 8e-3  # CUDA and CPU agree with each other too


@pytest.mark.skipif(not CUDA, reason="needs CUDA and a CUDA build of moequant._C")
@pytest.mark.parametrize("M", [1, 17, 40])
def test_moe_decode_cuda_many_tokens_one_expert(M):
    """All M tokens on one expert: token lists longer than one pass of the kernel; int32 ids."""
    gen = torch.Generator().manual_seed(M)
    x, w13, w2, ids, wts = make_problem(M, 8, 2, 256, 128, 64, False, torch.bfloat16, gen, "cuda", same_expert=True,
                                        ids_dtype=torch.int32)
    ref = fused_moe_w4a16_ref(x.cpu(), w13.to("cpu"), w2.to("cpu"), ids.cpu(), wts.cpu())
    got = ops.moe_w4a16_decode(x, w13, w2, ids, wts)
    assert rel_err(got, ref) < 5e-3


@pytest.mark.skipif(not CUDA, reason="needs CUDA and a CUDA build of moequant._C")
@pytest.mark.parametrize("shape", [(64, 6, 2048, 1408, 128), (128, 8, 2048, 768, 128), (8, 2, 4096, 2048, 64)],
                         ids=lambda s: "E{}-k{}-H{}-I{}-g{}".format(*s))
def test_moe_decode_cuda_one_token_repeatable_on_a_busy_stream(shape):
    """One token, many routings, each call queued behind unrelated GPU work and run twice: bit-identical
    results (the kernels are deterministic, so a difference is a race between the two launches or between
    warps of the reduction), matching the CPU op."""
    E, k, H, I, group = shape
    gen = torch.Generator().manual_seed(E + I)
    x, w13, w2, _, _ = make_problem(1, E, k, H, I, group, False, torch.bfloat16, gen, "cuda")
    busy = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    for trial in range(8):
        ids = torch.randperm(E, generator=gen)[:k].view(1, k).cuda()
        wts = torch.softmax(torch.randn(1, k, generator=gen), -1).to(torch.bfloat16).cuda()
        outs = []
        for _ in range(2):
            for _ in range(3):
                busy = (busy @ busy).clamp_(-1, 1)  # keep the stream busy so the launches queue up
            outs.append(ops.moe_w4a16_decode(x, w13, w2, ids, wts))
        assert torch.equal(outs[0], outs[1]), f"trial {trial}: two runs of the same call differ"
        cpu = ops.moe_w4a16_decode(x.cpu(), w13.to("cpu"), w2.to("cpu"), ids.cpu(), wts.cpu())
        assert rel_err(outs[0], cpu.double()) < 8e-3, f"trial {trial}"
