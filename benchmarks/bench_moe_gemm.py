"""Whole MoE layer, w4a16 g128 (moequant.kernels.fused_moe_w4a16) against the bf16 baselines, on one GPU.

    python benchmarks/bench_moe_gemm.py [--models mixtral,qwen3] [--ms 1,8,4096] [--out bench_out]
        [--v1 DIR]                    also time an earlier kernels/ folder (column v1_us, same run)
        [--sweep model:M,...]         time tile configs at these points (+ registers, spills, wgmma) and exit
        [--profile model:M,...]       run each point once per implementation (for ncu) and exit
        [--ncu-summary RAW_CSV]       condense an `ncu --page raw --csv` export into a table and exit

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

from moequant.kernels import default_config, fused_moe_w4a16, moe_align, prepare_moe_w4a16
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


def load_v1(path):
    """An earlier kernels/ folder (e.g. a copy of the previous version) as the package `moe_v1`."""
    import importlib.util
    import sys
    spec = importlib.util.spec_from_file_location("moe_v1", os.path.join(path, "__init__.py"),
                                                  submodule_search_locations=[path])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["moe_v1"] = mod
    spec.loader.exec_module(mod)
    return mod


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


def bench_model(name, ms, bw, flops_rate, rows, args, v1=None):
    E, k, H, I = MODELS[name]
    gen = torch.Generator(device="cuda").manual_seed(0)
    spec = QuantSpec(bits=4, group_size=args.group, sym=True)
    q13 = random_experts(E, 2 * I, H, spec, gen)
    q2 = random_experts(E, H, I, spec, gen)
    p13, p2 = prepare_moe_w4a16(q13), prepare_moe_w4a16(q2)
    v13, v2 = (v1.prepare_moe_w4a16(q13), v1.prepare_moe_w4a16(q2)) if v1 else (None, None)
    d13, d2 = dequant_experts(q13), dequant_experts(q2)  # bf16 baselines compute the same function
    d13t, d2t = d13.transpose(-2, -1), d2.transpose(-2, -1)
    has_gmm = hasattr(torch, "_grouped_mm")
    g = H if args.group == -1 else args.group
    bytes_per_expert = 3 * H * I * 0.5 + 3 * H * I // g * 2  # int4 codes + bf16 scales
    print(f"\n== {name}: E={E} k={k} H={H} I={I}, int4 g{args.group}, bf16 activations ==")
    print(f"{'M':>6} {'ours_us':>9} {'gmm_us':>9} {'loop_us':>9} {'floor_us':>9} {'ours_TB/s':>9} "
          f"{'ours_TF/s':>9} {'gmm/ours':>8} {'floor/ours':>10} {'err_vs_bf16':>11} {'align_us':>8}" + (f" {'v1_us':>9} {'v1/ours':>7}" if v1 else ""))
    for M in ms:
        R = 8 if M <= 256 else 1  # rotate routings at small M so weights stream from HBM
        xs = [torch.randn(M, H, device="cuda", generator=gen, dtype=torch.bfloat16) for _ in range(R)]
        rts = [routing(M, E, k, gen) for _ in range(R)]
        hit = statistics.mean(len(torch.unique(ids)) for ids, _ in rts)
        nbytes = hit * bytes_per_expert + 2 * M * H * 2
        flops = 2 * M * k * 3 * H * I
        floor = max(nbytes / bw, flops / flops_rate) * 1e6
        ours = time_graph([lambda x=x, r=r: fused_moe_w4a16(x, p13, p2, r[0], r[1]) for x, r in zip(xs, rts)])
        bm = default_config(M, k, E, H, I).block_m
        align = time_graph([lambda r=r: moe_align(r[0], E, bm) for r in rts])
        old = (time_graph([lambda x=x, r=r: v1.fused_moe_w4a16(x, v13, v2, r[0], r[1]) for x, r in zip(xs, rts)])
               if v1 else float("nan"))
        gmm = (time_graph([lambda x=x, r=r: gmm_layer(x, r[0], r[1], d13t, d2t) for x, r in zip(xs, rts)])
               if has_gmm else float("nan"))
        loop = time_fn(lambda: loop_layer(xs[0], rts[0][0], rts[0][1], d13, d2), reps=5 if M >= 4096 else 10, warmup=1)
        y = fused_moe_w4a16(xs[0], p13, p2, rts[0][0], rts[0][1]).double()
        yr = (gmm_layer(xs[0], rts[0][0], rts[0][1], d13t, d2t) if has_gmm
              else loop_layer(xs[0], rts[0][0], rts[0][1], d13, d2)).double()
        err = ((y - yr).norm() / yr.norm()).item()
        row = dict(model=name, M=M, E=E, k=k, H=H, I=I, experts_hit=hit, bytes=nbytes, flops=flops,
                   ours_us=ours, gmm_us=gmm, loop_us=loop, floor_us=floor, v1_us=old, align_us=align,
                   ours_tbs=nbytes / ours / 1e6, ours_tflops=flops / ours / 1e6, err=err)
        rows.append(row)
        print(f"{M:>6} {ours:>9.1f} {gmm:>9.1f} {loop:>9.1f} {floor:>9.1f} {row['ours_tbs']:>9.2f} "
              f"{row['ours_tflops']:>9.1f} {gmm / ours:>8.2f} {floor / ours:>10.2f} {err:>11.2e} {align:>8.1f}"
              + (f" {old:>9.1f} {old / ours:>7.2f}" if v1 else ""), flush=True)
    del p13, p2, d13, d2, q13, q2, v13, v2
    torch.cuda.empty_cache()


def sweep_candidates(M, k, E, H, I):
    """Tile configs around the default for one shape, by expected tokens per hit expert (the first is the default).
    Tokens on the left (swap_ab=False) only with <= 16 weight rows per warp (Triton 3.6 compile limit)."""
    from moequant.kernels import MoeConfig
    base = default_config(M, k, E, H, I)
    per_expert = M * k / min(E, M * k)
    T, F = True, False
    if per_expert <= 16:  # (bm, bn1, bn2, bk, split, warps, stages, swap)
        grid = [(16, 32, 64, 256, 1, 4, 4, T), (16, 32, 64, 256, 2, 4, 4, T), (16, 32, 64, 256, 4, 4, 4, T),
                (16, 64, 64, 256, 1, 4, 3, T), (16, 32, 64, 128, 2, 4, 4, T), (16, 32, 32, 256, 2, 4, 4, T),
                (32, 32, 64, 128, 1, 4, 4, T), (64, 64, 64, 64, 1, 4, 4, T)]
    elif per_expert <= 48:
        grid = [(64, 64, 64, 64, 1, 4, 4, T), (64, 64, 64, 64, 2, 4, 4, T), (32, 32, 64, 128, 1, 4, 4, T),
                (32, 32, 64, 256, 1, 4, 3, T), (64, 32, 64, 128, 1, 4, 3, T), (64, 64, 64, 64, 1, 8, 4, T),
                (16, 32, 64, 256, 1, 4, 4, T), (128, 64, 128, 64, 1, 8, 4, F)]
    else:
        grid = [(128, 64, 128, 64, 1, 8, 4, F), (128, 64, 128, 64, 1, 8, 3, F), (128, 128, 256, 64, 1, 16, 3, F),
                (256, 64, 128, 64, 1, 16, 3, F), (256, 64, 128, 64, 1, 8, 3, T), (64, 64, 64, 64, 1, 4, 4, T),
                (64, 32, 64, 128, 1, 4, 3, T), (64, 32, 64, 64, 1, 4, 4, F)]
    cands = [base] + [MoeConfig(bm, bn1, bn2, bk, split, warps, stages, swap_ab=swap)
                      for bm, bn1, bn2, bk, split, warps, stages, swap in grid]
    return list(dict.fromkeys(cands))


def sweep(name, M, args):
    """Time tile configs for one shape (ours only) and report registers, spills, shared memory and wgmma use."""
    from moequant.kernels.fused_moe_w4a16 import LAST_COMPILED
    E, k, H, I = MODELS[name]
    gen = torch.Generator(device="cuda").manual_seed(1)
    spec = QuantSpec(bits=4, group_size=args.group, sym=True)
    p13 = prepare_moe_w4a16(random_experts(E, 2 * I, H, spec, gen))
    p2 = prepare_moe_w4a16(random_experts(E, H, I, spec, gen))
    R = 8 if M <= 256 else 1
    xs = [torch.randn(M, H, device="cuda", generator=gen, dtype=torch.bfloat16) for _ in range(R)]
    rts = [routing(M, E, k, gen) for _ in range(R)]
    print(f"\n-- sweep {name} M={M} (first line = default_config) --", flush=True)
    for cfg in sweep_candidates(M, k, E, H, I):
        try:
            t = time_graph([lambda x=x, r=r: fused_moe_w4a16(x, p13, p2, r[0], r[1], config=cfg) for x, r in zip(xs, rts)],
                           budget_ms=100)
            info = []
            for kname, ck in LAST_COMPILED.items():
                info.append(f"{kname}: regs {ck.n_regs} spills {ck.n_spills} smem {ck.metadata.shared // 1024}K "
                            f"wgmma {'wgmma' in ck.asm.get('ptx', '')}")
            print(f"{t:9.1f} us  {cfg}  {'; '.join(info)}", flush=True)
        except Exception as exc:  # a config that does not compile or fit is reported, not fatal
            print(f"   failed  {cfg}: {type(exc).__name__}: {str(exc)[:160]}", flush=True)
    del p13, p2
    torch.cuda.empty_cache()


def profile(points, args, v1=None):
    """Run the layer once per point and implementation (v1 first, then ours), for `ncu -k regex:_moe_gemm`.
    Prints the launch order so that the profiler's kernel IDs can be named."""
    order = []
    for point in points.split(","):
        name, M = point.split(":")
        M = int(M)
        E, k, H, I = MODELS[name]
        gen = torch.Generator(device="cuda").manual_seed(2)
        spec = QuantSpec(bits=4, group_size=args.group, sym=True)
        q13, q2 = random_experts(E, 2 * I, H, spec, gen), random_experts(E, H, I, spec, gen)
        x = torch.randn(M, H, device="cuda", generator=gen, dtype=torch.bfloat16)
        ids, tw = routing(M, E, k, gen)
        impls = ([("v1", v1)] if v1 else []) + [("v2", None)]
        for tag, mod in impls:
            run = mod.fused_moe_w4a16 if mod else fused_moe_w4a16
            prep = mod.prepare_moe_w4a16 if mod else prepare_moe_w4a16
            p13, p2 = prep(q13), prep(q2)
            torch.cuda.synchronize()
            run(x, p13, p2, ids, tw)
            torch.cuda.synchronize()
            order += [f"{tag} {name} M={M} gemm1", f"{tag} {name} M={M} gemm2"]
            del p13, p2
        del q13, q2
        torch.cuda.empty_cache()
    print("profile launch order:", "; ".join(f"{i}: {o}" for i, o in enumerate(order)), flush=True)
    with open(os.path.join(args.out, "profile_order.txt"), "w") as f:
        f.write("\n".join(order) + "\n")


NCU_METRICS = [  # (label, raw metric name) printed by --ncu-summary, in this order
    ("duration_us", "gpu__time_duration.sum"),
    ("SM_SOL_%", "sm__throughput.avg.pct_of_peak_sustained_elapsed"),
    ("mem_SOL_%", "gpu__compute_memory_throughput.avg.pct_of_peak_sustained_elapsed"),
    ("L1_LSU_wavefronts_%", "l1tex__data_pipe_lsu_wavefronts.avg.pct_of_peak_sustained_elapsed"),
    ("smem_LSU_wavefronts_%", "l1tex__data_pipe_lsu_wavefronts_mem_shared.sum.pct_of_peak_sustained_elapsed"),
    ("smem_bank_conflicts", "l1tex__data_bank_conflicts_pipe_lsu_mem_shared.sum"),
    ("dram_%", "gpu__dram_throughput.avg.pct_of_peak_sustained_elapsed"),
    ("dram_TB/s", "dram__bytes.sum.per_second"),
    ("L2_hit_%", "lts__t_sector_hit_rate.pct"),
    ("issue_active_%", "smsp__issue_active.avg.pct_of_peak_sustained_active"),
    ("tensor_pipe_%", "sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_active"),
    ("fma_pipe_%", "sm__pipe_fma_cycles_active.avg.pct_of_peak_sustained_active"),
    ("alu_pipe_%", "sm__pipe_alu_cycles_active.avg.pct_of_peak_sustained_active"),
    ("regs", "launch__registers_per_thread"),
    ("smem_KB", "launch__shared_mem_per_block_dynamic"),
    ("occ_theor_%", "sm__maximum_warps_per_active_cycle_pct"),
    ("occ_achieved_%", "sm__warps_active.avg.pct_of_peak_sustained_active"),
    ("blocks_per_SM_limit_regs", "launch__occupancy_limit_registers"),
    ("blocks_per_SM_limit_smem", "launch__occupancy_limit_shared_mem"),
    ("waves", "launch__waves_per_multiprocessor"),
    ("local_spill_requests", "sass__inst_executed_local_stores"),
    ("warp_cycles_per_issue", "smsp__average_warp_latency_per_inst_issued.ratio"),
]
_UNIT = {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3, "s": 1e6, "second": 1e6,
         "byte/s": 1e-12, "Kbyte/s": 1e-9, "Mbyte/s": 1e-6, "Gbyte/s": 1e-3, "Tbyte/s": 1.0,
         "byte/block": 1 / 1024, "Kbyte/block": 1000 / 1024, "Mbyte/block": 1e6 / 1024}


def ncu_summary(raw_csv, order_file=None):
    """Condense `ncu --import X --page raw --csv` into a table: one column per profiled kernel, the metrics above,
    then the warp stall reasons (average warps stalled per issued instruction, largest first)."""
    with open(raw_csv, newline="") as f:
        rows = list(csv.reader(f))
    head, units, data = rows[0], rows[1], rows[2:]
    col = {h: i for i, h in enumerate(head)}
    names = []
    if order_file and os.path.exists(order_file):
        names = open(order_file).read().split("\n")
    labels = [names[i] if i < len(names) and names[i] else f"id{i}" for i in range(len(data))]
    width = 22
    print(f"{'metric':<26}" + "".join(f"{l[:width]:>{width + 1}}" for l in labels))

    def num(v):
        try:
            return float(str(v).replace(",", ""))
        except ValueError:
            return float("nan")
    for label, m in NCU_METRICS:
        if m not in col:
            continue
        unit = units[col[m]]
        vals = [num(r[col[m]]) for r in data]
        if label in ("duration_us", "dram_TB/s", "smem_KB"):  # to µs, TB/s, KiB whatever unit ncu chose
            vals = [v * _UNIT.get(unit, float("nan")) for v in vals]
        print(f"{label:<26}" + "".join(f"{v:>{width + 1}.4g}" for v in vals))
    pipes = [h for h in head if "pipe_" in h and h.endswith("cycles_active.avg.pct_of_peak_sustained_active")
             and h not in dict(NCU_METRICS).values()]
    for h in pipes:  # every pipe utilisation the report has (% of peak while the SM is active)
        vals = [num(r[col[h]]) for r in data]
        if max(vals, default=0) >= 1:
            print(f"{h[len('sm__'):-len('_cycles_active.avg.pct_of_peak_sustained_active')][:25]:<26}"
                  + "".join(f"{v:>{width + 1}.4g}" for v in vals))
    stall = [h for h in head if h.startswith("smsp__average_warps_issue_stalled_") and h.endswith("_per_issue_active.ratio")]
    totals = {h: sum(num(r[col[h]]) for r in data) for h in stall}
    print("warp stalls (warps stalled per issued instruction, by reason):")
    for h in sorted(stall, key=lambda h: -totals[h])[:12]:
        reason = h[len("smsp__average_warps_issue_stalled_"):-len("_per_issue_active.ratio")]
        print(f"  {reason:<24}" + "".join(f"{num(r[col[h]]):>{width + 1}.3g}" for r in data))


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
    ap.add_argument("--profile", default="", help="model:M,... run each point once per implementation (ncu) and exit")
    ap.add_argument("--ncu-summary", default="", help="an `ncu --page raw --csv` export: print a summary and exit")
    ap.add_argument("--v1", default="", help="an earlier kernels/ folder to time side by side (column v1_us)")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if args.ncu_summary:
        ncu_summary(args.ncu_summary, os.path.join(args.out, "profile_order.txt"))
        return
    v1 = load_v1(args.v1) if args.v1 else None
    if args.profile:
        profile(args.profile, args, v1)
        return
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
        bench_model(name, [int(m) for m in args.ms.split(",")], bw, rate, rows, args, v1)
    with open(os.path.join(args.out, "bench_moe_gemm.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    plot(rows, os.path.join(args.out, "bench_moe_gemm.png"))


if __name__ == "__main__":
    main()
