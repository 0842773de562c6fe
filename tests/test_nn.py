"""Quantized modules (moequant.nn) against plain-PyTorch references on fresh random inputs.

CPU: every path that runs here — the dequantize path, the decode op's CPU build, the Triton kernel in its
interpreter (fp16) — and the dispatch rules. GPU (skipped without CUDA): the kernel paths in bf16 on real shapes.
"""
import pytest
import torch
import torch.nn.functional as F
import transformers as T

import moequant.nn.quant_experts as qe
from moequant import ops
from moequant.models import tiny_config
from moequant.nn import QuantExperts, QuantLinear, describe_paths, install_quantized
from moequant.packing import PackedWeight, dequantize, pack_int32
from moequant.quant.quantizer import QuantSpec, quantize_rtn
from moequant.reference import fused_moe_w4a16_ref

CUDA = torch.cuda.is_available()
def gpu(test):
    return pytest.mark.gpu(pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")(test))


def random_packed(batch, out_f, in_f, bits, group, sym, act_order, dtype, gen):
    g = in_f if group == -1 else group
    codes = torch.randint(0, 1 << bits, (*batch, out_f, in_f), generator=gen)
    scales = (torch.rand(*batch, in_f // g, out_f, generator=gen) * 0.05 + 0.005).to(dtype)
    zeros = None if sym else torch.randint(0, 1 << bits, (*batch, in_f // g, out_f), generator=gen).to(torch.uint8)
    g_idx = None
    if act_order:
        g_idx = torch.stack([torch.randperm(in_f, generator=gen) // g for _ in range(batch[0])]) if batch else \
            torch.randperm(in_f, generator=gen) // g
        g_idx = g_idx.to(torch.int32)
    return PackedWeight(pack_int32(codes, bits), scales, zeros, g_idx, bits, g)


def routing(T_, E, k, gen, dtype=torch.float32):
    ids = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T_)])
    return ids, torch.softmax(torch.randn(T_, k, generator=gen), -1).to(dtype)


LINEAR_CASES = [(4, 32, True, False, True), (4, 64, False, False, False), (8, -1, False, True, True),
                (3, 32, True, True, False), (2, 32, False, False, True)]


@pytest.mark.parametrize("bits,group,sym,act,bias", LINEAR_CASES)
def test_quant_linear_equals_linear_on_dequantized_weight(bits, group, sym, act, bias):
    gen = torch.Generator().manual_seed(bits * 100 + group)
    p = random_packed((), 48, 128, bits, group, sym, act, torch.float32, gen)
    b = torch.randn(48, generator=gen) if bias else None
    lin = QuantLinear(p, b)
    x = torch.randn(3, 5, 128, generator=gen)
    ref = F.linear(x, dequantize(p, torch.float32), b)
    assert torch.equal(lin(x), ref)
    assert lin.path_for(x.device, x.dtype)[0] == "dequant"
    names = {"qweight", "scales"} | ({"bias"} if bias else set()) | (set() if sym else {"qzeros"}) | (
        {"g_idx"} if act else set())
    assert set(lin.state_dict()) == names  # the checkpoint's names


@pytest.mark.parametrize("bits,group,sym,act", [(4, 32, True, False), (4, 16, False, False), (3, -1, True, False),
                                                (8, 32, False, True)])
def test_quant_experts_matches_reference_and_hf_module(bits, group, sym, act):
    gen = torch.Generator().manual_seed(bits + group)
    E, H, I, k, n = 8, 64, 32, 2, 13
    w13 = random_packed((E,), 2 * I, H, bits, group, sym, act, torch.float32, gen)
    w2 = random_packed((E,), H, I, bits, group, sym, act, torch.float32, gen)
    x = torch.randn(n, H, generator=gen)
    ids, wts = routing(n, E, k, gen)
    mod = QuantExperts(w13, w2)
    got = mod(x, ids, wts)
    ref = fused_moe_w4a16_ref(x, w13, w2, ids, wts)
    assert got.shape == x.shape and got.dtype == x.dtype
    assert ((got.double() - ref).norm() / ref.norm()).item() < 1e-6
    # The same contract as the transformers module it replaces, given the dequantized weights.
    cfg = tiny_config("mixtral", hidden=H, moe_inter=I, experts=E, top_k=k)
    cfg._experts_implementation = "eager"
    hf = T.models.mixtral.modeling_mixtral.MixtralExperts(cfg)
    with torch.no_grad():
        hf.gate_up_proj.copy_(dequantize(w13, torch.float32))
        hf.down_proj.copy_(dequantize(w2, torch.float32))
        torch.testing.assert_close(got, hf(x, ids, wts), rtol=1e-5, atol=1e-6)


def test_unrouted_expert_and_sentinel_ids_contribute_nothing():
    gen = torch.Generator().manual_seed(7)
    E, H, I = 4, 64, 32
    mod = QuantExperts(random_packed((E,), 2 * I, H, 4, 32, True, False, torch.float32, gen),
                       random_packed((E,), H, I, 4, 32, True, False, torch.float32, gen))
    x = torch.randn(3, H, generator=gen)
    ids = torch.tensor([[0, E], [1, E], [E, 0]])  # E: an expert-parallel sentinel (another rank's expert)
    w = torch.rand(3, 2, generator=gen)
    only = torch.tensor([[0], [1], [0]]), torch.stack([w[0, 0], w[1, 0], w[2, 1]]).unsqueeze(1)
    torch.testing.assert_close(mod(x, ids, w), mod(x, *only), rtol=0, atol=0)


def test_dispatch_rules(monkeypatch):
    gen = torch.Generator().manual_seed(1)
    E, H, I = 4, 64, 32
    mk = lambda bits, act=False, dtype=torch.bfloat16, g=32: QuantExperts(
        random_packed((E,), 2 * I, H, bits, g, True, act, dtype, gen), random_packed((E,), H, I, bits, g, True, act,
                                                                                     dtype, gen))
    monkeypatch.setattr(qe, "_decode_kernel_missing", lambda: None)  # as on a GPU machine with a CUDA build
    monkeypatch.setattr(qe, "_fused_kernel_missing", lambda: None)
    cuda, bf16 = torch.device("cuda"), torch.bfloat16
    m = mk(4)
    cross = qe.decode_max_tokens()
    assert m.path_for("cpu", bf16, 1)[0] == "dequant"
    assert m.path_for(cuda, bf16, 1)[0] == "decode" and m.path_for(cuda, bf16, cross)[0] == "decode"
    assert m.path_for(cuda, bf16, cross + 1)[0] == "fused"
    monkeypatch.setattr(qe, "DECODE_MAX_TOKENS", 3)
    assert m.path_for(cuda, bf16, 3)[0] == "decode" and m.path_for(cuda, bf16, 4)[0] == "fused"
    assert m.path_for(cuda, torch.float32, 1)[0] == "dequant"
    assert m.path_for(cuda, torch.float16, 1) == ("dequant", "scales dtype torch.bfloat16 differs from activations "
                                                             "torch.float16")
    assert "bits" in mk(8).path_for(cuda, bf16, 100)[1] and mk(8).path_for(cuda, bf16, 100)[0] == "dequant"
    assert mk(4, act=True).path_for(cuda, bf16, 1) == ("dequant", "act-order (g_idx)")
    assert mk(4, g=8).path_for(cuda, bf16, 100)[0] == "dequant"
    monkeypatch.setattr(qe, "_decode_kernel_missing", lambda: "not built")
    assert m.path_for(cuda, bf16, 1)[0] == "fused"  # no decode kernel: the Triton kernel takes small batches too
    monkeypatch.setattr(qe, "_fused_kernel_missing", lambda: "no triton")
    assert m.path_for(cuda, bf16, 1)[0] == "dequant"

    lin = QuantLinear(random_packed((), 64, 128, 4, 128, True, False, bf16, gen))
    assert lin.path_for(cuda, bf16)[0] == "int4mm" and lin.path_for("cpu", bf16)[0] == "dequant"
    assert lin.path_for(cuda, torch.float16)[0] == "dequant"
    assert QuantLinear(random_packed((), 64, 128, 4, 16, True, False, bf16, gen)).path_for(cuda, bf16)[0] == "dequant"


@pytest.mark.skipif(not ops.available(), reason="moequant._C is not built")
def test_decode_path_wiring_on_cpu():
    """The decode path hands the op its arguments in the right order (the op's CPU build runs here)."""
    gen = torch.Generator().manual_seed(3)
    E, H, I, n = 8, 64, 32, 5
    w13 = random_packed((E,), 2 * I, H, 4, 32, False, False, torch.float32, gen)
    w2 = random_packed((E,), H, I, 4, 32, False, False, torch.float32, gen)
    mod = QuantExperts(w13, w2)
    x = torch.randn(n, H, generator=gen)
    ids, wts = routing(n, E, 2, gen)
    ref = fused_moe_w4a16_ref(x, w13, w2, ids, wts)
    got = mod.run("decode", x, ids, wts)
    assert ((got.double() - ref).norm() / ref.norm()).item() < 1e-5


def test_fused_path_wiring_in_triton_interpreter(monkeypatch):
    """The fused path prepares the kernel layout and calls the Triton kernel correctly (interpreter, fp16)."""
    triton = pytest.importorskip("triton")
    monkeypatch.setattr(triton.knobs.runtime, "interpret", True)
    gen = torch.Generator().manual_seed(4)
    E, H, I, n = 4, 64, 32, 6
    w13 = random_packed((E,), 2 * I, H, 4, 32, True, False, torch.float16, gen)
    w2 = random_packed((E,), H, I, 4, 32, True, False, torch.float16, gen)
    mod = QuantExperts(w13, w2)
    x = torch.randn(n, H, generator=gen).to(torch.float16)
    ids, wts = routing(n, E, 2, gen)
    ref = fused_moe_w4a16_ref(x, w13, w2, ids, wts)
    got = mod.run("fused", x, ids, wts)
    assert got.dtype == torch.float16 and ((got.double() - ref).norm() / ref.norm()).item() < 2e-3


def test_install_quantized_names_match_the_checkpoint():
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(tiny_config("qwen2_moe")).eval()
    spec = QuantSpec(bits=4, group_size=32)
    state = model.state_dict()
    names = ["model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj",
             "model.layers.0.self_attn.q_proj", "model.layers.0.mlp.shared_expert.down_proj", "model.layers.0.mlp.gate"]
    packed = {n: quantize_rtn(state[n] if n in state else state[n + ".weight"], spec) for n in names}
    done = install_quantized(model, packed)
    assert done == {"experts": ["model.layers.0.mlp.experts"],
                    "linear": ["model.layers.0.mlp.shared_expert.down_proj", "model.layers.0.self_attn.q_proj"],
                    "dense": ["model.layers.0.mlp.gate"]}
    sd = model.state_dict()
    for n, p in packed.items():
        if n.endswith(".mlp.gate"):  # the router keeps its own forward: dequantized in place
            assert torch.equal(sd[n + ".weight"], dequantize(p, torch.float32))
        else:
            for k, t in p.tensors(n).items():
                assert torch.equal(sd[k], t), k
    assert isinstance(model.model.layers[0].self_attn.q_proj, QuantLinear)
    assert ("experts", "dequant/dequant", "not on CUDA") in describe_paths(model)
    with pytest.raises(ValueError, match="names no nn.Linear"):
        install_quantized(model, {"model.layers.0.no_such_proj": packed[names[2]]})
    with pytest.raises(ValueError, match="the module's weight is"):
        install_quantized(model, {"model.layers.0.input_layernorm": packed[names[2]]})
    with pytest.raises(ValueError, match="quantized whole"):
        install_quantized(model, {"model.layers.1.mlp.experts.down_proj": packed[names[1]]})


# -- GPU --------------------------------------------------------------------------------------------------------


@gpu
@pytest.mark.parametrize("group,sym", [(128, True), (64, False), (32, True)])
def test_quant_linear_int4mm_cuda(group, sym):
    gen = torch.Generator().manual_seed(group)
    p = random_packed((), 2048, 2048, 4, group, sym, False, torch.bfloat16, gen).to("cuda")
    lin = QuantLinear(p, torch.randn(2048, generator=gen).to(torch.bfloat16).cuda())
    assert lin.prepare(torch.bfloat16) == "int4mm"
    for M in (1, 16, 100):
        x = torch.randn(M, 2048, generator=gen).to(torch.bfloat16).cuda()
        ref = x.double() @ dequantize(p, torch.float64).T + lin.bias.double()
        got = lin(x)
        assert got.dtype == torch.bfloat16
        assert ((got.double() - ref).norm() / ref.norm()).item() < 1e-2


@gpu
@pytest.mark.parametrize("M", [1, 4, 16, 64, 300])
def test_quant_experts_kernels_cuda(M):
    gen = torch.Generator().manual_seed(M)
    E, H, I, k = 16, 2048, 1408, 6  # DeepSeek-V2-Lite's expert shape (fewer experts: the CPU reference is slow)
    spec = QuantSpec(bits=4, group_size=128, sym=True)
    w13 = quantize_rtn(torch.randn(E, 2 * I, H, generator=gen) / H ** 0.5, spec, torch.bfloat16)
    w2 = quantize_rtn(torch.randn(E, H, I, generator=gen) / I ** 0.5, spec, torch.bfloat16)
    x = torch.randn(M, H, generator=gen).to(torch.bfloat16)
    ids, wts = routing(M, E, k, gen)
    ref = fused_moe_w4a16_ref(x, w13, w2, ids, wts)
    mod = QuantExperts(w13.to("cuda"), w2.to("cuda")).cuda()
    path = mod.path_for(torch.device("cuda"), torch.bfloat16, M)[0]
    assert path == ("decode" if M <= qe.decode_max_tokens() else "fused")
    got = mod(x.cuda(), ids.cuda(), wts.cuda())
    assert ((got.double().cpu() - ref).norm() / ref.norm()).item() < 1e-2


@gpu
def test_loaded_model_on_cuda_generates(tmp_path):
    import moequant

    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(tiny_config("qwen3_moe", hidden=128, moe_inter=128),
                                               dtype=torch.bfloat16).eval()
    calib = torch.randint(3, 256, (4, 32))
    moequant.quantize(model, method="rtn", bits=4, group_size=32, output_dir=str(tmp_path / "q"), progress=False,
                      device="cpu")
    cpu = moequant.load(str(tmp_path / "q"))
    gpu_model = moequant.load(str(tmp_path / "q"), device="cuda")
    paths = describe_paths(gpu_model)
    assert any(k[0] == "experts" and k[1] == "decode/fused" for k in paths), paths
    with torch.no_grad():
        a, b = cpu(calib).logits.float(), gpu_model(calib.cuda()).logits.float().cpu()
    assert ((a - b).norm() / a.norm()).item() < 5e-2
    out = gpu_model.generate(calib[:2, :8].cuda(), max_new_tokens=8, do_sample=False)
    assert out.shape == (2, 16)
