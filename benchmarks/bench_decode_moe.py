"""Decode-path fused MoE layer (moe_w4a16_decode) at M = 1..16 vs bf16 baselines.

    python benchmarks/bench_decode_moe.py [--json out.json] [--shapes mixtral,dsv2lite,qwen3]

Per shape and M: our w4a16 decode op (CUDA graph of R calls on R different routings and
inputs, so the weights are not served from L2; and eager), the Triton fused_moe_w4a16 if the
package has it, and bf16 baselines on dense weights: the HF-style per-expert loop (eager) and
torch._grouped_mm (if present). Bytes = packed weights + scales of the experts actually routed,
the floor a weight-streaming kernel must read; % HBM is against 3.35 TB/s (H100 SXM peak) and
the measured copy bandwidth.
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from moequant import ops
from moequant.packing import PackedWeight
from timing import median_ms  # noqa: E402  (benchmarks/timing.py)

SHAPES = {  # E, k, H, I
    "mixtral": ("Mixtral-8x7B", 8, 2, 4096, 14336),
    "dsv2lite": ("DeepSeek-V2-Lite", 64, 6, 2048, 1408),
    "qwen3": ("Qwen3-30B-A3B", 128, 8, 2048, 768),
}
HBM_PEAK = 3.35e12
GROUP = 128
ROTATE = 16  # distinct routings / inputs per timed graph


def time_graph_ms(fn, reps=10):
    """fn runs ROTATE calls; capture it in a CUDA graph, replay, median per replay."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    return sorted(ts)[len(ts) // 2]


def time_eager_ms(fn, reps=10):
    return median_ms(fn, reps, warmup=2)


def copy_bandwidth():
    x = torch.randn(2**28, device="cuda", dtype=torch.bfloat16)
    y = torch.empty_like(x)
    ms = time_eager_ms(lambda: y.copy_(x), reps=20)
    return 2 * x.numel() * 2 / (ms * 1e-3)  # bytes/s, read + write


def packed_experts(E, out_f, in_f):
    q = torch.randint(-2**31, 2**31 - 1, (E, in_f // 8, out_f), dtype=torch.int32, device="cuda")
    s = (torch.rand(E, in_f // GROUP, out_f, device="cuda") * 0.002 + 0.0005).to(torch.bfloat16)
    return PackedWeight(q, s, None, None, 4, GROUP)


def routing(M, E, k, gen):
    logits = torch.randn(M, E, device="cuda", generator=gen)
    w, ids = torch.topk(torch.softmax(logits, -1), k, dim=-1)
    return ids, (w / w.sum(-1, keepdim=True)).to(torch.bfloat16)


def hf_loop(x, w13, w2, ids, wts):
    """transformers' eager experts loop on bf16 weights."""
    y = torch.zeros_like(x)
    I = w2.shape[-1]
    mask = F.one_hot(ids, w13.shape[0]).permute(2, 1, 0)
    for e in torch.nonzero(mask.sum((-1, -2)) > 0).flatten().tolist():
        kk, t = torch.where(mask[e])
        gu = F.linear(x[t], w13[e])
        h = F.silu(gu[:, :I]) * gu[:, I:]
        y.index_add_(0, t, (F.linear(h, w2[e]) * wts[t, kk, None]).to(x.dtype))
    return y


def grouped_mm(x, w13t, w2t, ids, wts):
    """torch._grouped_mm over tokens sorted by expert (w13t [E, H, 2I], w2t [E, I, H])."""
    M, k = ids.shape
    flat = ids.flatten()
    order = torch.argsort(flat)
    offs = F.one_hot(flat, w13t.shape[0]).sum(0).cumsum(0).to(torch.int32)  # no host sync: capturable
    xs = x[order // k]
    gu = torch._grouped_mm(xs, w13t, offs=offs)
    I = w2t.shape[1]
    h = F.silu(gu[:, :I]) * gu[:, I:]
    out = torch._grouped_mm(h, w2t, offs=offs)
    y = torch.zeros(M * k, x.shape[1], device=x.device, dtype=torch.float32)
    y[order] = out.float()
    return (y.view(M, k, -1) * wts.float().unsqueeze(-1)).sum(1).to(x.dtype)


def triton_fused():
    """(fused_moe_w4a16, prepare_moe_w4a16), or None where the Triton kernel does not import."""
    try:
        from moequant.kernels.fused_moe_w4a16 import fused_moe_w4a16, prepare_moe_w4a16  # type: ignore
        return fused_moe_w4a16, prepare_moe_w4a16
    except Exception as e:
        print(f"(Triton fused_moe_w4a16 not available: {type(e).__name__}: {e})")
        return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--shapes", default="mixtral,dsv2lite,qwen3")
    ap.add_argument("--ms", default="1,2,4,8,16,32")
    ap.add_argument("--no-baselines", action="store_true")
    args = ap.parse_args()
    assert torch.cuda.is_available() and ops.cuda_available(), "needs a GPU and a CUDA build of moequant._C"
    dev = torch.cuda.get_device_name()
    copy = copy_bandwidth()
    print(f"device: {dev}; torch {torch.__version__}; copy bandwidth (read+write) {copy / 1e9:.0f} GB/s")
    triton = triton_fused()
    has_gmm = hasattr(torch, "_grouped_mm")
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for key in args.shapes.split(","):
        name, E, k, H, I = SHAPES[key]
        w13 = packed_experts(E, 2 * I, H)
        w2 = packed_experts(E, H, I)
        dense13 = dense2 = None
        if not args.no_baselines:
            dense13 = ops.dequantize(w13, torch.bfloat16)  # [E, 2I, H]
            dense2 = ops.dequantize(w2, torch.bfloat16)    # [E, H, I]
            w13t, w2t = dense13.transpose(1, 2), dense2.transpose(1, 2)  # strided views for _grouped_mm
        if triton is not None:  # the Triton kernel's own layout, built once as the quantized layer does
            t13, t2 = triton[1](w13, "w13"), triton[1](w2, "w2")
        per_expert = 3 * H * I * (0.5 + 2 / GROUP)
        for M in [int(m) for m in args.ms.split(",")]:
            xs = [torch.randn(M, H, device="cuda", generator=gen).to(torch.bfloat16) for _ in range(ROTATE)]
            rts = [routing(M, E, k, gen) for _ in range(ROTATE)]
            active = sum(torch.unique(ids).numel() for ids, _ in rts) / ROTATE
            nbytes = active * per_expert
            # correctness spot check against the CPU op on the same inputs
            ref = ops.moe_w4a16_decode(xs[0].cpu(), w13.to("cpu"), w2.to("cpu"), rts[0][0].cpu(), rts[0][1].cpu()) if M == 1 and key != "mixtral" else None
            got = ops.moe_w4a16_decode(xs[0], w13, w2, *rts[0])
            if ref is not None:
                err = ((got.float().cpu() - ref.float()).norm() / ref.float().norm()).item()
                assert err < 1e-2, f"decode mismatch vs CPU: {err}"
            ours_g = time_graph_ms(lambda: [ops.moe_w4a16_decode(xs[i], w13, w2, *rts[i]) for i in range(ROTATE)]) / ROTATE
            ours_e = time_eager_ms(lambda: ops.moe_w4a16_decode(xs[1], w13, w2, *rts[1]))
            r = dict(shape=name, M=M, active_experts=active, bytes=nbytes, ours_graph_us=ours_g * 1e3,
                     ours_eager_us=ours_e * 1e3, hbm_pct=100 * nbytes / (ours_g * 1e-3) / HBM_PEAK,
                     copy_pct=100 * nbytes / (ours_g * 1e-3) / copy)
            if triton is not None:
                try:
                    r["triton_graph_us"] = 1e3 * time_graph_ms(
                        lambda: [triton[0](xs[i], t13, t2, *rts[i]) for i in range(ROTATE)]) / ROTATE
                except Exception as e:
                    print(f"Triton fused_moe_w4a16 failed at {name} M={M}: {type(e).__name__}: {e}")
            if dense13 is not None:
                r["hf_loop_us"] = 1e3 * time_eager_ms(lambda: hf_loop(xs[1], dense13, dense2, *rts[1]))
                if has_gmm:
                    try:
                        r["grouped_mm_graph_us"] = 1e3 * time_graph_ms(
                            lambda: [grouped_mm(xs[i], w13t, w2t, *rts[i]) for i in range(ROTATE)]) / ROTATE
                    except Exception as e:
                        print(f"torch._grouped_mm failed: {type(e).__name__}: {e}")
                        has_gmm = False
            rows.append(r)
            print({kk: (round(v, 2) if isinstance(v, float) else v) for kk, v in r.items()}, flush=True)
        del w13, w2, dense13, dense2
        t13 = t2 = None
        torch.cuda.empty_cache()
    print(f"\ndevice {dev}; copy {copy / 1e9:.0f} GB/s (r+w); HBM peak 3350 GB/s; group {GROUP}, sym, bf16")
    print("| shape | M | experts read | MB read | ours graph (µs) | % HBM peak | % copy BW | ours eager (µs) "
          "| Triton w4a16 (µs) | HF bf16 loop (µs) | grouped_mm bf16 (µs) | vs Triton | vs HF loop | vs grouped_mm |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        f = lambda key: f"{r[key]:.1f}" if key in r else "-"
        vs = lambda key: f"{r[key] / r['ours_graph_us']:.1f}x" if key in r else "-"
        print(f"| {r['shape']} | {r['M']} | {r['active_experts']:.1f} | {r['bytes'] / 1e6:.1f} | {r['ours_graph_us']:.1f} | "
              f"{r['hbm_pct']:.0f}% | {r['copy_pct']:.0f}% | {r['ours_eager_us']:.1f} | {f('triton_graph_us')} | "
              f"{f('hf_loop_us')} | {f('grouped_mm_graph_us')} | {vs('triton_graph_us')} | {vs('hf_loop_us')} | "
              f"{vs('grouped_mm_graph_us')} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(device=dev, copy_Bps=copy, rows=rows), fh, indent=1)


if __name__ == "__main__":
    main()
