"""Quantizing at scale: the Triton GPTQ inner loop, the up-front memory plan, activation offload, the time split."""
import logging

import pytest
import torch
import transformers as T

from conftest import make_tiny
from test_pipeline import _starve_expert
from moequant.config import QuantConfig
from moequant.kernels._triton_utils import interpreting
from moequant.models import get_adapter, real_config
from moequant.pipeline import (OVERLAPPED, STAGES, InsufficientGPUMemoryError, check_group_sizes, estimate_layer_memory,
                               expert_intermediates, format_time_split, plan_memory, quantize_model)
import moequant.quant.gptq as gq
from moequant.quant.gptq import _inverse_cholesky_upper, _triu_inverse, gptq_quantize, proxy_loss
from moequant.quant.quantizer import QuantSpec

GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
GiB = 1 << 30


def _problem(B, R, C, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(B, 4 * C, C, generator=g) @ torch.randn(C, C, generator=g) * 0.3
    W = torch.randn(B, R, C, generator=g)
    return W.to(device), (X.transpose(1, 2) @ X).to(device)


# -- the Triton inner loop ----------------------------------------------------------------------------------------
# Under TRITON_INTERPRET=1 (CPU) the kernel does the torch loop's arithmetic in the same order (no fused
# multiply-adds), so codes and scales agree exactly; on a GPU they agree up to rare ties (see the GPU test).

KERNEL_SETTINGS = {  # group, block, sym, act_order, static, mse_clip, scale dtype: every way the kernel gets a grid
    "g32-in-block": (32, 64, True, False, False, False, torch.bfloat16),
    "g32-asym": (32, 64, False, False, False, False, torch.float16),
    "per-channel-mse": (-1, 32, True, False, False, True, torch.bfloat16),
    "g64-spans-blocks-actorder": (64, 32, False, True, False, False, torch.float32),
    "static-actorder": (32, 64, True, True, True, False, torch.bfloat16),
}


@pytest.mark.skipif(not interpreting(), reason="the CPU check runs the kernel in Triton's interpreter")
@pytest.mark.parametrize("name", list(KERNEL_SETTINGS))
def test_triton_inner_loop_matches_torch_loop(name):
    g, bs, sym, act_order, static, mse, sdt = KERNEL_SETTINGS[name]
    W, H = _problem(2, 24, 128, seed=1)  # 24 rows: the last row tile is partial
    spec = QuantSpec(bits=4, group_size=g, sym=sym, mse_clip=mse)
    kw = dict(block_size=bs, act_order=act_order, static_groups=static, scale_dtype=sdt)
    a = gptq_quantize(W, H, spec, backend="torch", **kw)
    b = gptq_quantize(W, H, spec, backend="triton", **kw)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scales, b.scales) and torch.equal(a.zeros, b.zeros)
    assert torch.equal(a.weight, b.weight)
    assert (a.g_idx is None and b.g_idx is None) or torch.equal(a.g_idx, b.g_idx)


def test_triton_backend_refuses_what_it_does_not_cover():
    W, H = _problem(1, 8, 64)
    with pytest.raises(ValueError, match="does not cover group size 16"):
        gptq_quantize(W, H, QuantSpec(bits=4, group_size=16, mse_clip=True), block_size=32, backend="triton")


@pytest.mark.parametrize("how", ["reversed", "reversed-recursive"])
def test_reversed_factorisations_give_the_same_factor(how):
    _, H = _problem(3, 1, 96, seed=2)
    Ua, _, _ = _inverse_cholesky_upper(H.double(), 0.01, how="inverse")
    Ub, _, _ = _inverse_cholesky_upper(H.double(), 0.01, how=how)
    torch.testing.assert_close(Ua, Ub, rtol=1e-9, atol=1e-9)
    assert (torch.tril(Ub, -1) == 0).all()


def test_triangular_inverse_by_halves():
    g = torch.Generator().manual_seed(4)
    U = torch.triu(torch.randn(2, 300, 300, generator=g, dtype=torch.float64)) + 20 * torch.eye(300)
    Ui = _triu_inverse(U, leaf=32)  # several levels of halving, uneven halves
    torch.testing.assert_close(Ui @ U, torch.eye(300, dtype=torch.float64).expand(2, -1, -1), rtol=0, atol=1e-12)
    assert (torch.tril(Ui, -1) == 0).all()


def test_fp32_cholesky_failure_is_retried_in_fp64_before_raising_damp(monkeypatch, caplog):
    """A matrix whose fp32 factorisation fails keeps its damping if fp64 succeeds; the others are untouched."""
    import moequant.quant.gptq as gq

    real = gq._upper_factor_of_inverse

    def flaky(Hd, how):  # matrix 1 "fails" in fp32 only
        U, bad = real(Hd, how)
        if Hd.dtype == torch.float32 and Hd.shape[0] == 3:
            bad = bad.clone()
            bad[1] = True
        return U, bad

    monkeypatch.setattr(gq, "_upper_factor_of_inverse", flaky)
    _, H = _problem(3, 1, 64, seed=5)
    with caplog.at_level(logging.INFO, logger="moequant"):
        U, lam, notes = gq._inverse_cholesky_upper(H, 0.01)
    assert (lam == 0.01).all() and len(notes) == 1 and "matrices [1]" in notes[0] and "fp64" in notes[0]
    ref, _, _ = gq._inverse_cholesky_upper(H.double(), 0.01)
    torch.testing.assert_close(U.double(), ref, rtol=1e-4, atol=1e-4)


# -- the left-looking update and the blocked Cholesky -----------------------------------------------------------------

@pytest.mark.parametrize("name", list(KERNEL_SETTINGS) + ["g48-crosses-blocks"])
def test_left_update_equals_right_update(name):
    """In fp64 the two catch-up rules give the same codes (they are the same math); in fp32 they agree up to rare
    rounding ties. Groups that start inside a block and end past it (g48, block 32) read columns past the block."""
    g, bs, sym, act_order, static, mse, sdt = KERNEL_SETTINGS.get(name, (48, 32, True, False, False, False,
                                                                        torch.float64))
    W, H = _problem(2, 24, 192, seed=7)
    spec = QuantSpec(bits=4, group_size=g, sym=sym, mse_clip=mse)
    kw = dict(block_size=bs, act_order=act_order, static_groups=static, backend="torch")
    a = gptq_quantize(W.double(), H.double(), spec, update="right", scale_dtype=torch.float64, **kw)
    b = gptq_quantize(W.double(), H.double(), spec, update="left", scale_dtype=torch.float64, **kw)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scales, b.scales)
    torch.testing.assert_close(a.weight, b.weight, rtol=0, atol=0)
    a = gptq_quantize(W, H, spec, update="right", scale_dtype=sdt, **kw)
    b = gptq_quantize(W, H, spec, update="left", scale_dtype=sdt, **kw)
    assert (a.codes == b.codes).float().mean() > 0.99
    la, lb = proxy_loss(W, a.weight, H), proxy_loss(W, b.weight, H)
    assert ((la - lb).abs() / la).max() < 0.01


def test_blocked_cholesky(monkeypatch):
    g = torch.Generator().manual_seed(8)
    X = torch.randn(3, 300, 400, generator=g, dtype=torch.float64)
    A = X @ X.mT + 0.1 * torch.eye(300, dtype=torch.float64)
    A[2] = -torch.eye(300, dtype=torch.float64)  # not positive definite: flagged, the others unaffected
    L, bad = gq._cholesky_blocked(A.clone(), nb=64)  # uneven last block
    assert bad.tolist() == [False, False, True]
    torch.testing.assert_close(L[:2], torch.linalg.cholesky(A[:2]), rtol=0, atol=1e-12)
    assert (torch.triu(L, 1) == 0).all()
    monkeypatch.setattr(gq, "CHOLESKY_BLOCK", 64)  # the solver through the blocked path gives the same codes
    W, H = _problem(2, 16, 192, seed=9)
    spec = QuantSpec(bits=4, group_size=32)
    a = gptq_quantize(W.double(), H.double(), spec, scale_dtype=torch.float64)
    monkeypatch.setattr(gq, "CHOLESKY", "torch")
    b = gptq_quantize(W.double(), H.double(), spec, scale_dtype=torch.float64)
    assert torch.equal(a.codes, b.codes)


def test_gptq_ignores_a_process_wide_tf32_setting(monkeypatch):
    """The solve runs its products in fp32 whatever torch.backends says, unless tf32=True is asked for."""
    seen = []
    real = torch.baddbmm
    monkeypatch.setattr(torch, "baddbmm", lambda *a, **k: (seen.append(torch.backends.cuda.matmul.allow_tf32),
                                                            real(*a, **k))[1])
    W, H = _problem(1, 8, 128, seed=10)
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        gptq_quantize(W, H, QuantSpec(bits=4, group_size=32), block_size=32)
        assert seen and not any(seen) and torch.backends.cuda.matmul.allow_tf32  # restored afterwards
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
    seen.clear()
    gptq_quantize(W, H, QuantSpec(bits=4, group_size=32), block_size=32, tf32=True)
    assert seen and all(seen)


@GPU
@pytest.mark.gpu
def test_left_update_and_blocked_cholesky_on_gpu():
    W, H = _problem(8, 256, 1536, seed=11, device="cuda")
    spec = QuantSpec(bits=4, group_size=128)
    a = gptq_quantize(W, H, spec, update="right", scale_dtype=torch.bfloat16)
    b = gptq_quantize(W, H, spec, update="left", scale_dtype=torch.bfloat16)  # blocked Cholesky (1536 > 512)
    assert (a.codes == b.codes).float().mean() > 0.99
    la, lb = proxy_loss(W, a.weight, H), proxy_loss(W, b.weight, H)
    assert ((la - lb).abs() / la).max() < 0.01
    Hd = H + 0.01 * H.diagonal(dim1=-2, dim2=-1).mean(-1)[:, None, None] * torch.eye(1536, device="cuda")
    L, bad = gq._cholesky_blocked(Hd.clone())
    ref = torch.linalg.cholesky(Hd)
    assert not bad.any() and ((L - ref).norm() / ref.norm()) < 1e-5


@GPU
@pytest.mark.gpu
@pytest.mark.parametrize("name", list(KERNEL_SETTINGS) + ["g128-default"])
def test_triton_inner_loop_on_gpu(name):
    g, bs, sym, act_order, static, mse, sdt = KERNEL_SETTINGS.get(name, (128, 128, True, False, False, False,
                                                                        torch.bfloat16))
    W, H = _problem(8, 256, 512, seed=3, device="cuda")
    spec = QuantSpec(bits=4, group_size=g, sym=sym, mse_clip=mse)
    kw = dict(block_size=bs, act_order=act_order, static_groups=static, scale_dtype=sdt)
    a = gptq_quantize(W, H, spec, backend="torch", **kw)
    b = gptq_quantize(W, H, spec, backend="triton", **kw)
    assert (a.codes == b.codes).float().mean() > 0.99  # fused multiply-adds move rare rounding ties
    la, lb = proxy_loss(W, a.weight, H), proxy_loss(W, b.weight, H)
    assert ((la - lb).abs() / la).max() < 0.02


# -- memory plan --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mixtral_on_meta():
    """One Mixtral-8x7B-shaped layer without memory behind it: the estimate reads shapes and dtypes only."""
    with torch.device("meta"):
        model = T.AutoModelForCausalLM.from_config(real_config("mixtral-8x7b", 1), dtype=torch.bfloat16)
    return model


def test_layer_estimate_counts_what_the_layer_holds(mixtral_on_meta):
    adapter = get_adapter(mixtral_on_meta)
    layer = adapter.layers[0]
    cfg = QuantConfig(method="agq")
    H, I, E, T_ = 4096, 14336, 8, 128 * 2048
    est = estimate_layer_memory(layer, adapter, cfg, num_tokens=T_, batch_tokens=8 * 2048, offload=False)
    attn_in = 4 * H * H * 4  # q, k, v, o: [4096]² fp32 Hessians each (k, v have 4096 inputs too)
    assert est["hessians"] == E * (H * H + I * I) * 4 + attn_in
    assert est["activations"] == 2 * T_ * H * 2
    assert est["weights"] == sum(p.numel() * 2 for p in layer.parameters())
    assert est["peak"] == est["weights"] + est["hessians"] + est["activations"] + max(est["forward"], est["solve"])
    off = estimate_layer_memory(layer, adapter, cfg, num_tokens=T_, batch_tokens=8 * 2048, offload=True)
    assert off["activations"] == 2 * 8 * 2048 * H * 2
    chunk = estimate_layer_memory(layer, adapter, QuantConfig(method="agq", expert_chunk=2), num_tokens=T_,
                                  batch_tokens=8 * 2048, offload=False)
    assert chunk["solve"] < est["solve"] / 3


def _fake_gpu(monkeypatch, free_gib):
    import moequant.pipeline as pl

    monkeypatch.setattr(pl, "_is_cuda", lambda d: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d=None: (int(free_gib * GiB), 80 * GiB))


def test_plan_offloads_or_fails_before_work_naming_the_fix(mixtral_on_meta, monkeypatch):
    adapter = get_adapter(mixtral_on_meta)
    kw = dict(num_tokens=128 * 2048, batch_tokens=8 * 2048, device="cuda")
    _fake_gpu(monkeypatch, 80)
    assert plan_memory(adapter, QuantConfig(), **kw)[0] is False  # fits: activations stay on the GPU
    fits_only_offloaded = estimate_layer_memory(adapter.layers[0], adapter, QuantConfig(), num_tokens=128 * 2048,
                                                batch_tokens=8 * 2048, offload=True)["peak"] / GiB + 1.5
    _fake_gpu(monkeypatch, fits_only_offloaded)
    assert plan_memory(adapter, QuantConfig(), **kw)[0] is True  # auto: streamed from pinned CPU memory
    with pytest.raises(InsufficientGPUMemoryError, match="It fits with --offload-activations"):
        plan_memory(adapter, QuantConfig(offload_activations="off"), **kw)
    _fake_gpu(monkeypatch, 30)
    with pytest.raises(InsufficientGPUMemoryError, match=r"It fits with --offload-activations --expert-chunk \d"):
        plan_memory(adapter, QuantConfig(), **kw)
    _fake_gpu(monkeypatch, 2)
    with pytest.raises(InsufficientGPUMemoryError, match="torchrun"):
        plan_memory(adapter, QuantConfig(), **kw)
    assert plan_memory(adapter, QuantConfig(memory_check=False), **kw)[0] is False  # checked off: goes ahead


def test_group_size_must_divide_every_target_before_work():
    adapter = get_adapter(make_tiny("deepseek_v2"))  # hidden 64, kv_lora_rank 32
    with pytest.raises(ValueError, match=r"does not divide the input dim 64 of model.layers.0.*--group-size 32"):
        check_group_sizes(adapter, QuantConfig(group_size=128))
    check_group_sizes(adapter, QuantConfig(group_size=32))
    check_group_sizes(adapter, QuantConfig(group_size=-1))


def test_bad_scale_settings_are_refused():
    with pytest.raises(ValueError, match="offload_activations"):
        QuantConfig(offload_activations="yes")
    with pytest.raises(ValueError, match="expert_chunk"):
        QuantConfig(expert_chunk=-1)
    with pytest.raises(ValueError, match="gptq_backend"):
        QuantConfig(gptq_backend="cuda")


# -- the loop: stages, chunks ---------------------------------------------------------------------------------------

def _calib():
    return torch.randint(3, 256, (4, 32), generator=torch.Generator().manual_seed(0))


def test_every_layer_records_the_split_and_chunks_do_not_change_cpu_results():
    model = make_tiny("qwen3_moe")
    base = quantize_model(model, QuantConfig(method="agq", group_size=32, device="cpu"), _calib(), progress=False)
    for m in base.layers:
        assert set(m["times"]) == set(STAGES + OVERLAPPED) and all(v >= 0 for v in m["times"].values())
        assert m["times"]["capture"] > 0 and m["times"]["hessian"] > 0 and m["times"]["solve"] > 0
        assert m["estimated_gpu_bytes"] > 0
    table = format_time_split(base.layers)
    assert all(s in table for s in STAGES)
    chunked = quantize_model(make_tiny("qwen3_moe"), QuantConfig(method="agq", group_size=32, device="cpu",
                                                                 expert_chunk=3), _calib(), progress=False)
    for k, p in base.packed.items():  # experts solved 3 at a time: the same bits on CPU
        assert torch.equal(p.qweight, chunked.packed[k].qweight) and torch.equal(p.scales, chunked.packed[k].scales)


def test_worker_threads_give_the_same_bits_and_report_errors(tmp_path):
    """overlap=True on CPU: streamed layers are read and finished layers handed to `on_layer_done` by worker
    threads (what CUDA does besides its side streams). Same bits, callbacks in order, errors re-raised."""
    from moequant.streaming import open_streamed

    make_tiny("qwen2_moe", layers=3).save_pretrained(tmp_path / "m")
    cfg = QuantConfig(method="agq", group_size=32, device="cpu", batch_size=2)
    ref = quantize_model(T.AutoModelForCausalLM.from_pretrained(tmp_path / "m"), cfg, _calib(), progress=False)
    done = []
    model, layers = open_streamed(str(tmp_path / "m"))
    res = quantize_model(model, cfg, _calib(), progress=False, overlap=True, layer_source=layers,
                         on_layer_done=lambda i, packed, meta, state: done.append((i, sorted(state))))
    assert [i for i, _ in done] == [0, 1, 2] and all(m["overlap"] for m in res.layers)
    assert all(any(n.endswith("input_layernorm.weight") for n in names) for _, names in done)
    for k, p in ref.packed.items():
        assert torch.equal(p.qweight, res.packed[k].qweight) and torch.equal(p.scales, res.packed[k].scales), k

    def fail(i, *_):
        if i == 1:
            raise KeyError("disk full")
    with pytest.raises(KeyError, match="disk full"):
        quantize_model(T.AutoModelForCausalLM.from_pretrained(tmp_path / "m"), cfg, _calib(), progress=False,
                       overlap=True, on_layer_done=fail)


@GPU
@pytest.mark.gpu
def test_gpu_offload_is_exact_and_memory_is_recorded():
    runs = {}
    for offload in ("off", "on"):
        model = make_tiny("mixtral").to(torch.bfloat16)
        cfg = QuantConfig(method="agq", group_size=32, device="cuda", offload_activations=offload)
        runs[offload] = quantize_model(model, cfg, _calib(), progress=False)
    for k, p in runs["off"].packed.items():
        assert torch.equal(p.qweight, runs["on"].packed[k].qweight), k
        assert torch.equal(p.scales, runs["on"].packed[k].scales), k
    for m in runs["on"].layers:
        assert m["offload_activations"] is True and m["peak_gpu_bytes"] > 0


@GPU
@pytest.mark.gpu
def test_grouped_gemm_expert_intermediates_on_gpu():
    """The CUDA path (one grouped GEMM) gives the CPU per-expert loop's rows, in the same order, with the same ids."""
    model = make_tiny("qwen3_moe").to(torch.bfloat16)
    block = get_adapter(model).moe_block(model.model.layers[0])
    g = torch.Generator().manual_seed(6)
    x = torch.randn(50, 64, generator=g).to(torch.bfloat16)
    ids = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(50)])
    ids[:, 0] = torch.where(ids[:, 0] == 5, 6, ids[:, 0])  # an expert with fewer rows
    ids[ids == 3] = 7  # and one with none (its group is empty)
    w = torch.rand(50, 2, generator=g)
    cpu = expert_intermediates(block.experts, x, ids, w)
    gpu = expert_intermediates(block.experts.cuda(), x.cuda(), ids.cuda(), w.cuda())
    torch.testing.assert_close(gpu[0].cpu().float(), cpu[0].float(), rtol=2e-2, atol=2e-2)
    assert torch.equal(gpu[1].cpu(), cpu[1]) and torch.equal(gpu[2].cpu(), cpu[2])


@GPU
@pytest.mark.gpu
def test_gpu_overlap_and_streaming_are_exact(tmp_path):
    """Prefetch + background write-back, and layers streamed from the checkpoint, give the same bits as moving
    layers synchronously; the model in CPU memory ends up holding exactly the packed values."""
    from moequant.streaming import open_streamed

    base = make_tiny("mixtral", layers=4).to(torch.bfloat16)
    base.save_pretrained(tmp_path / "m")
    cfg = QuantConfig(method="agq", group_size=32, device="cuda", batch_size=2)
    runs = {}
    for name, overlap in (("sync", False), ("overlap", True)):
        model = T.AutoModelForCausalLM.from_pretrained(tmp_path / "m")
        runs[name] = quantize_model(model, cfg, _calib(), progress=False, overlap=overlap)
        assert all(m["overlap"] is overlap for m in runs[name].layers)
        for k, p in runs[name].packed.items():
            param = model.get_parameter(k if ".mlp.experts." in k + "." else k + ".weight")
            assert param.device.type == "cpu" and torch.equal(p.dequantize(param.dtype), param.data), k
    model, layers = open_streamed(str(tmp_path / "m"))
    runs["streamed"] = quantize_model(model, cfg, _calib(), progress=False, overlap=True, layer_source=layers)
    assert all(p.is_meta for p in model.model.layers.parameters())
    for name in ("overlap", "streamed"):
        assert runs[name].packed.keys() == runs["sync"].packed.keys()
        for k, p in runs["sync"].packed.items():
            q = runs[name].packed[k]
            assert q.qweight.device.type == "cpu"
            assert torch.equal(p.qweight, q.qweight) and torch.equal(p.scales, q.scales), (name, k)


# -- solve lanes, the solved weights in the layer, the pinned staging, sync-free capture pieces ---------------------


@pytest.mark.parametrize("dtype,settings", [
    (torch.bfloat16, dict()),
    (torch.float32, dict(sym=False, act_order=True)),
    (torch.float16, dict(static_groups=True, act_order=True)),
])
def test_solved_weights_in_the_layer_are_the_packed_values(dtype, settings):
    """The solve writes GPTQ's W_hat into the layer and the write stage skips those weights: what the model holds is
    still exactly what was packed (dequantized). An expert RTN'd by the empty-expert policy is written from its
    packed codes instead."""
    model = make_tiny("mixtral").to(dtype)
    _starve_expert(model, 2)
    res = quantize_model(model, QuantConfig(method="agq", group_size=32, device="cpu", **settings), _calib(),
                         progress=False)
    assert any(2 in rec.get("empty_experts", ()) for m in res.layers for rec in m["experts"].values())
    for k, p in res.packed.items():
        param = model.get_parameter(k if ".mlp.experts." in k + "." else k + ".weight")
        assert torch.equal(p.dequantize(param.dtype), param.data), k


def test_solve_lanes_give_the_same_bits_and_raise_errors(monkeypatch):
    """Jobs spread over lanes (threads; streams on CUDA) give the same packed bits as one after the other, longest
    first; an error in any lane reaches the caller after every lane has stopped."""
    from moequant import pipeline as pl

    model = make_tiny("qwen3_moe", experts=4)
    adapter = get_adapter(model)
    cfg = QuantConfig(method="agq", group_size=32, device="cpu")
    layer = adapter.layers[0]
    inputs = pl.capture_layer_inputs(adapter, [_calib()], "cpu")
    col = pl.LayerCollector(layer, adapter, cfg, "cpu")
    with torch.no_grad():
        layer(inputs[0][0], **inputs[0][1])
    col.remove()
    units = pl.solve_units(layer, adapter, cfg)
    one, _ = pl.solve_layer(layer, "p", units, col, adapter, cfg, write=False)
    lanes = pl.SolveLanes("cpu", 3)
    runs, run = [], lanes.run
    monkeypatch.setattr(lanes, "run", lambda *a: (runs.append(1), run(*a))[1])

    def same(many):
        assert [list(v) for v in many.values()] == [list(v) for v in one.values()]  # same order of names
        for u, names in one.items():
            for n, (p, rec) in names.items():
                q, rec2 = many[u][n]
                assert torch.equal(p.qweight, q.qweight) and torch.equal(p.scales, q.scales) and rec == rec2, n
    try:
        same(pl.solve_layer(layer, "p", units, col, adapter, cfg, lanes, write=False)[0])
        assert runs == []  # shapes seen for the first time: one after the other (kernels compile on one thread)
        same(pl.solve_layer(layer, "p", units, col, adapter, cfg, lanes, write=False)[0])
        assert runs == [1] and lanes.usable
        solve_job, failed = pl._solve_job, []

        def oom_once(*a, **k):  # a lane runs out of memory once: its job is redone after the others, no lanes after
            if not failed:
                failed.append(1)
                raise torch.OutOfMemoryError("no memory")
            return solve_job(*a, **k)
        monkeypatch.setattr(pl, "_solve_job", oom_once)
        same(pl.solve_layer(layer, "p", units, col, adapter, cfg, lanes, write=False)[0])
        assert failed and runs == [1, 1] and not lanes.usable
        ran = []

        def job(j):
            ran.append(j)
            if j == "b":
                raise KeyError("lane failed")
        with pytest.raises(KeyError, match="lane failed"):
            lanes.run(["a", "b", "c", "d"], job, {"a": 4, "b": 3, "c": 2, "d": 1}.get)
        assert sorted(ran[:3]) == ["a", "b", "c"]  # the three longest start first, one per lane
    finally:
        lanes.close()


def test_pinned_arena_reuses_one_buffer_and_grows_once(monkeypatch):
    from moequant import pipeline as pl

    made = []

    def fake_pinned(shape, dtype):  # no pinned allocator without a GPU: plain memory, counted
        made.append(shape)
        return torch.empty(shape, dtype=dtype)
    monkeypatch.setattr(pl, "_pinned_empty", fake_pinned)
    a = pl._PinnedArena("test")
    a.reserve(4096)
    x = a.take((10,), torch.float32)
    y = a.take((3, 5), torch.bfloat16)
    assert x.data_ptr() == a.buf.data_ptr() and y.data_ptr() == a.buf.data_ptr() + 512  # aligned, no overlap
    a.reset()
    assert a.take((10,), torch.float32).data_ptr() == x.data_ptr() and len(made) == 1  # reused, nothing pinned
    z = a.take((2000,), torch.float32)  # past the end: a buffer of its own now ...
    assert z.shape == (2000,) and len(made) == 2
    a.reset()  # ... and the arena grows to what the job needed
    assert a.capacity >= 512 + 8000 and len(made) == 3
    a.reset()
    a.take((2000,), torch.float32)
    assert len(made) == 3


@pytest.mark.parametrize("settings", [dict(), dict(method="gptq", sym=False, act_order=True), dict(group_size=-1),
                                      dict(act_order=True)])
def test_packed_bytes_estimate_is_what_the_write_back_stages(settings):
    from moequant import pipeline as pl

    model = make_tiny("qwen2_moe", layers=1)
    cfg = QuantConfig(**{"method": "rtn", "group_size": 32, "device": "cpu", **settings})
    adapter = get_adapter(model)
    expected = pl.packed_layer_bytes(adapter.layers[0], adapter, cfg)
    res = quantize_model(model, cfg, _calib(), progress=False)
    staged = sum(pl._aligned(t.numel() * t.element_size()) for p in res.packed.values()
                 for t in (p.qweight, p.scales, p.qzeros, p.g_idx) if t is not None)
    assert expected == staged


def test_sync_free_capture_pieces_match_the_plain_ops():
    from moequant import pipeline as pl
    from moequant.quant.hessian import scaled_pair_rows, scaled_rows

    g = torch.Generator().manual_seed(3)
    x = torch.randn(37, 24, generator=g).to(torch.bfloat16)
    w = torch.rand(37, 3, generator=g)
    rows = scaled_pair_rows(x, w)
    assert torch.equal(rows, scaled_rows(x.repeat_interleave(3, 0), w.reshape(-1, 1)))
    ids = torch.randint(0, 6, (37, 3), generator=g)
    ids[ids == 4] = 5  # an expert with no pairs
    counts = torch.ones(7, dtype=torch.int64)
    pl._count_into(counts, ids)
    assert torch.equal(counts, 1 + torch.bincount(ids.reshape(-1), minlength=7))


@GPU
@pytest.mark.gpu
def test_gpu_solve_lanes_and_pinned_write_back_are_exact(monkeypatch):
    """Solve lanes (side streams) and the pinned write-back of the layer's weights give the bits of one stream and
    the pageable copy; the model in CPU memory holds exactly the packed values."""
    from moequant import pipeline as pl

    base = make_tiny("mixtral", layers=3).to(torch.bfloat16)
    cfg = QuantConfig(method="agq", group_size=32, device="cuda", batch_size=2)
    runs = {}
    for name, lanes, pinned in (("one", 1, False), ("lanes", 2, False), ("lanes-pinned", 3, True)):
        monkeypatch.setattr(pl, "SOLVE_LANES", lanes)
        monkeypatch.setattr(pl, "WEIGHTS_BACK_PINNED", pinned)
        model = T.AutoModelForCausalLM.from_config(base.config).to(torch.bfloat16).eval()
        model.load_state_dict(base.state_dict())
        runs[name] = quantize_model(model, cfg, _calib(), progress=False, overlap=True)
        for k, p in runs[name].packed.items():
            param = model.get_parameter(k if ".mlp.experts." in k + "." else k + ".weight")
            assert param.device.type == "cpu" and torch.equal(p.dequantize(param.dtype), param.data), (name, k)
    for name in ("lanes", "lanes-pinned"):
        for k, p in runs["one"].packed.items():
            q = runs[name].packed[k]
            assert torch.equal(p.qweight, q.qweight) and torch.equal(p.scales, q.scales), (name, k)


def _compare_unmasked_experts(model_type, dtype, device):
    from transformers.integrations import moe as hf_moe

    from moequant import pipeline as pl

    model = make_tiny(model_type).to(dtype).to(device)
    ex = get_adapter(model).moe_blocks()[0][1].experts
    g = torch.Generator().manual_seed(5)
    T, E = 70, ex.num_experts
    x = torch.randn(T, ex.gate_up_proj.shape[-1], generator=g).to(dtype).to(device)
    ids = torch.stack([torch.randperm(E, generator=g)[:2] for _ in range(T)])
    ids[ids == 1] = 2  # an expert with no tokens: an empty group
    w = torch.rand(T, 2, generator=g)
    ids, w = ids.to(device), w.to(device)
    with torch.no_grad():
        ref = hf_moe.grouped_mm_experts_forward(ex, x, ids, w)
        ours = pl._grouped_experts_forward(ex, x, ids, w)
    assert ours.dtype == ref.dtype and torch.equal(ours, ref)
    return ex


@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_moe"])
def test_unmasked_grouped_experts_give_transformers_bits(model_type):
    """The re-run's experts forward is transformers' grouped_mm forward without the sentinel masking: the same bits
    (on CPU transformers takes the same torch grouped_mm path)."""
    _compare_unmasked_experts(model_type, torch.float32, "cpu")


@GPU
@pytest.mark.gpu
@pytest.mark.parametrize("model_type", ["mixtral", "deepseek_v2"])
def test_unmasked_grouped_experts_give_transformers_bits_on_gpu(model_type):
    from moequant import pipeline as pl

    ex = _compare_unmasked_experts(model_type, torch.bfloat16, "cuda")
    assert pl._runs_transformers_grouped_mm(ex)  # and the pipeline does take it there
