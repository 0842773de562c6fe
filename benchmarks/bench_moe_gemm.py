"""Whole MoE layer, w4a16 g128 (moequant.kernels.fused_moe_w4a16) against the bf16 baselines, on one GPU.

    python benchmarks/bench_moe_gemm.py [--models mixtral,qwen3] [--ms 1,8,4096] [--out bench_out]

Per model shape and token count M it prints, side by side from the same run:
  ours     µs per layer (alignment + both GEMMs + top-k sum), replayed as a CUDA graph, median
  gmm      bf16 torch._grouped_mm layer (sort, grouped GEMM, SiLU·up, grouped GEMM, weighted scatter-add), CUDA graph
  loop     bf16 HF-style per-expert loop (eager: it syncs on the routing)
  floor    the physical limit: max(bytes / copy bandwidth, FLOPs / bf16 matmul rate), both measured in this run
           bytes = packed int4 weights + scales of the experts actually hit + x read + y written
and ours' achieved TB/s over those bytes and TFLOP/s (2·M·k·3·H·I). Small M rotates over 8 routings per graph
so the weights come from HBM, not from L2. Writes a CSV and a plot (when matplotlib is present) to --out.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import os
import statistics

import torch
import torch.nn.functional as F

from moequant.kernels import fused_moe_w4a16, prepare_moe_w4a16
from moequant.packing import PackedWeight, dequantize
from moequant.quant.quantizer import QuantSpec, quantize_rtn
from timing import median_ms  # noqa: E402  (benchmarks/timing.py)

MODELS = {  # name: (E, k, H, I)
    "mixtral": (8, 2, 4096, 14336),
    "dsv2lite": (64, 6, 2048, 1408),
    "qwen15moe": (60, 4, 2048, 1408),
    "qwen3": (128, 8, 2048, 768),
}
DEFAULT_MS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096, 16384]


def measure_ceilings():
    """Device copy bandwidth (read + write) and bf16 matmul rate, measured here."""
    n = 1 << 28
    a = torch.empty(n, dtype=torch.float32, device="cuda")
    b = torch.empty_like(a)
    t = time_fn(lambda: b.copy_(a), reps=20)
    bw = 2 * a.numel() * 4 / (t * 1e-6)
    del a, b
    x = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    y = torch.randn_like(x)
    t = time_fn(lambda: x @ y, reps=20)
    return bw, 2 * 8192 ** 3 / (t * 1e-6)


def time_fn(fn, reps=30, warmup=3):
    """Median µs of fn, timed with CUDA events."""
    return median_ms(fn, reps, warmup) * 1e3


def time_graph(fn_calls, budget_ms=300):
    """Capture all calls in one CUDA graph; median µs per call over replays."""
    for f in fn_calls:  # compile / warm up outside the capture
        f()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for f in fn_calls:
            f()
    one = time_fn(g.replay, reps=3, warmup=1)
    reps = int(max(5, min(100, budget_ms * 1e3 / max(one, 1.0))))
    t = time_fn(g.replay, reps=reps, warmup=2)
    del g
    return t / len(fn_calls)


def random_experts(E, out_f, in_f, spec, gen):
    """Random bf16 experts quantized with RTN, one expert at a time (bounded memory)."""
    parts = [quantize_rtn(torch.randn(out_f, in_f, device="cuda", generator=gen, dtype=torch.bfloat16) * in_f ** -0.5,
                          spec, torch.bfloat16) for _ in range(E)]
    stack = lambda ts: None if ts[0] is None else torch.stack(ts)
    return PackedWeight(stack([p.qweight for p in parts]), stack([p.scales for p in parts]),
                        stack([p.qzeros for p in parts]), None, spec.bits, parts[0].group_size)


def dequant_experts(q):
    return torch.stack([dequantize(PackedWeight(q.qweight[e], q.scales[e], None if q.qzeros is None else q.qzeros[e],
                                                None, q.bits, q.group_size), torch.bfloat16)
                        for e in range(q.qweight.shape[0])])


def gmm_layer(x, ids, tw, w13t, w2t):
    """bf16 layer through torch._grouped_mm (transformers' grouped_mm experts path, sync-free)."""
    M, k = ids.shape
    E = w13t.shape[0]
    I = w2t.shape[1]
    flat = ids.reshape(-1)
    order = torch.argsort(flat)
    counts = torch.zeros(E, dtype=torch.int32, device=x.device).scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    tok = order // k
    xs = x[tok]
    gu = torch._grouped_mm(xs, w13t, offs=offs)
    h = F.silu(gu[:, :I]) * gu[:, I:]
    o = torch._grouped_mm(h, w2t, offs=offs)
    o = o * tw.reshape(-1)[order].unsqueeze(1).to(o.dtype)
    return torch.zeros_like(x).index_add_(0, tok, o)


def loop_layer(x, ids, tw, w13, w2):
    """bf16 HF-style loop over the experts that were hit."""
    I = w2.shape[-1]
    y = torch.zeros_like(x)
    for e in torch.unique(ids).tolist():
        t, s = torch.where(ids == e)
        gu = F.linear(x[t], w13[e])
        h = F.silu(gu[:, :I]) * gu[:, I:]
        y.index_add_(0, t, F.linear(h, w2[e]) * tw[t, s, None].to(x.dtype))
    return y


def routing(M, E, k, gen):
    logits = torch.randn(M, E, device="cuda", generator=gen)
    w, ids = torch.topk(torch.softmax(logits, -1), k, dim=-1)
    return ids, (w / w.sum(-1, keepdim=True)).float()


def bench_model(name, ms, bw, flops_rate, rows, args):
    E, k, H, I = MODELS[name]
    gen = torch.Generator(device="cuda").manual_seed(0)
    spec = QuantSpec(bits=4, group_size=args.group, sym=True)
    q13 = random_experts(E, 2 * I, H, spec, gen)
    q2 = random_experts(E, H, I, spec, gen)
    p13, p2 = prepare_moe_w4a16(q13), prepare_moe_w4a16(q2)
    d13, d2 = dequant_experts(q13), dequant_experts(q2)  # bf16 baselines compute the same function
    d13t, d2t = d13.transpose(-2, -1), d2.transpose(-2, -1)
    has_gmm = hasattr(torch, "_grouped_mm")
    g = H if args.group == -1 else args.group
    bytes_per_expert = 3 * H * I * 0.5 + 3 * H * I // g * 2  # int4 codes + bf16 scales
    print(f"\n== {name}: E={E} k={k} H={H} I={I}, int4 g{args.group}, bf16 activations ==")
    print(f"{'M':>6} {'ours_us':>9} {'gmm_us':>9} {'loop_us':>9} {'floor_us':>9} {'ours_TB/s':>9} "
          f"{'ours_TF/s':>9} {'gmm/ours':>8} {'floor/ours':>10} {'err_vs_bf16':>11}")
    for M in ms:
        R = 8 if M <= 256 else 1  # rotate routings at small M so weights stream from HBM
        xs = [torch.randn(M, H, device="cuda", generator=gen, dtype=torch.bfloat16) for _ in range(R)]
        rts = [routing(M, E, k, gen) for _ in range(R)]
        hit = statistics.mean(len(torch.unique(ids)) for ids, _ in rts)
        nbytes = hit * bytes_per_expert + 2 * M * H * 2
        flops = 2 * M * k * 3 * H * I
        floor = max(nbytes / bw, flops / flops_rate) * 1e6
        ours = time_graph([lambda x=x, r=r: fused_moe_w4a16(x, p13, p2, r[0], r[1]) for x, r in zip(xs, rts)])
        gmm = (time_graph([lambda x=x, r=r: gmm_layer(x, r[0], r[1], d13t, d2t) for x, r in zip(xs, rts)])
               if has_gmm else float("nan"))
        loop = time_fn(lambda: loop_layer(xs[0], rts[0][0], rts[0][1], d13, d2), reps=5 if M >= 4096 else 10, warmup=1)
        y = fused_moe_w4a16(xs[0], p13, p2, rts[0][0], rts[0][1]).double()
        yr = (gmm_layer(xs[0], rts[0][0], rts[0][1], d13t, d2t) if has_gmm
              else loop_layer(xs[0], rts[0][0], rts[0][1], d13, d2)).double()
        err = ((y - yr).norm() / yr.norm()).item()
        row = dict(model=name, M=M, E=E, k=k, H=H, I=I, experts_hit=hit, bytes=nbytes, flops=flops,
                   ours_us=ours, gmm_us=gmm, loop_us=loop, floor_us=floor,
                   ours_tbs=nbytes / ours / 1e6, ours_tflops=flops / ours / 1e6, err=err)
        rows.append(row)
        print(f"{M:>6} {ours:>9.1f} {gmm:>9.1f} {loop:>9.1f} {floor:>9.1f} {row['ours_tbs']:>9.2f} "
              f"{row['ours_tflops']:>9.1f} {gmm / ours:>8.2f} {floor / ours:>10.2f} {err:>11.2e}", flush=True)
    del p13, p2, d13, d2, q13, q2
    torch.cuda.empty_cache()


def sweep(name, M, args):
    """Time a few tile configs for one shape (ours only) and report registers, spills and wgmma use."""
    from moequant.kernels import MoeConfig, default_config
    from moequant.kernels.fused_moe_w4a16 import LAST_COMPILED
    E, k, H, I = MODELS[name]
    gen = torch.Generator(device="cuda").manual_seed(1)
    spec = QuantSpec(bits=4, group_size=args.group, sym=True)
    p13 = prepare_moe_w4a16(random_experts(E, 2 * I, H, spec, gen))
    p2 = prepare_moe_w4a16(random_experts(E, H, I, spec, gen))
    R = 8 if M <= 256 else 1
    xs = [torch.randn(M, H, device="cuda", generator=gen, dtype=torch.bfloat16) for _ in range(R)]
    rts = [routing(M, E, k, gen) for _ in range(R)]
    base = default_config(M, k, E, H, I)
    import dataclasses
    cands = [base, dataclasses.replace(base, swap_ab=False)]
    if base.block_m >= 64:  # large M: the operand order with bigger token tiles
        for bm, bn1, bn2, bk, warps, stages in ((128, 64, 128, 64, 8, 3), (128, 128, 128, 64, 8, 3),
                                                (128, 64, 64, 64, 4, 4), (64, 64, 128, 64, 4, 4),
                                                (128, 128, 256, 64, 8, 3), (64, 128, 128, 64, 8, 3)):
            cands.append(MoeConfig(bm, bn1, bn2, bk, 1, warps, stages, swap_ab=False))
    seen = set()
    print(f"\n-- sweep {name} M={M} (default {base}) --")
    for cfg in cands:
        if cfg in seen:
            continue
        seen.add(cfg)
        try:
            t = time_graph([lambda x=x, r=r: fused_moe_w4a16(x, p13, p2, r[0], r[1], config=cfg) for x, r in zip(xs, rts)],
                           budget_ms=100)
            info = []
            for kname, ck in LAST_COMPILED.items():
                ptx = ck.asm.get("ptx", "")
                info.append(f"{kname}: regs {ck.n_regs} spills {ck.n_spills} wgmma {'wgmma' in ptx}")
            print(f"{t:9.1f} us  {cfg}  {'; '.join(info)}", flush=True)
        except Exception as exc:  # a config that does not compile or fit is reported, not fatal
            print(f"   failed  {cfg}: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
    del p13, p2
    torch.cuda.empty_cache()


def plot(rows, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    names = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names):
        rs = [r for r in rows if r["model"] == name]
        m = [r["M"] for r in rs]
        for key, label in (("ours_us", "w4a16 Triton (ours)"), ("gmm_us", "bf16 grouped_mm"),
                           ("loop_us", "bf16 per-expert loop"), ("floor_us", "physical limit")):
            ax.plot(m, [r[key] for r in rs], marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens M")
        ax.set_ylabel("µs per MoE layer")
        ax.set_title(name)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--ms", default=",".join(map(str, DEFAULT_MS)))
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--out", default="bench_out")
    ap.add_argument("--sweep", default="", help="model:M,model:M,... time tile configs for these points and exit")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if args.sweep:
        for point in args.sweep.split(","):
            name, M = point.split(":")
            sweep(name, int(M), args)
        return
    bw, rate = measure_ceilings()
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  date {datetime.date.today()}")
    print(f"measured ceilings: copy {bw / 1e12:.2f} TB/s (read+write), bf16 matmul 8192^3 {rate / 1e12:.0f} TFLOP/s")
    rows = []
    for name in args.models.split(","):
        bench_model(name, [int(m) for m in args.ms.split(",")], bw, rate, rows, args)
    with open(os.path.join(args.out, "bench_moe_gemm.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    plot(rows, os.path.join(args.out, "bench_moe_gemm.png"))


if __name__ == "__main__":
    main()
