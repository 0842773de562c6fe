"""Per-expert Hessians: moequant.kernels.expert_hessians against the torch per-expert loop, on one GPU.

    python benchmarks/bench_hessian.py [--tokens 8192,65536] [--modes GPTQ,AGQ-rows] [--out bench_out]
    python benchmarks/bench_hessian.py --sweep [--configs 128:32:4:5,...]   tile configs, E=64, K=2048, 64k tokens
    python benchmarks/bench_hessian.py --profile          each mode once on that case (run it under ncu)

Cases: gate_up inputs (x [T, K] with topk_ids [T, k]) for DeepSeek-V2-Lite (E=64, k=6, K=2048) and
Mixtral (E=8, k=2, K=4096); down_proj inputs (one row per (token, expert), topk_ids [N, 1]) for DeepSeek-V2-Lite
(K=I=1408). Baseline: the per-expert fp32 loop (moequant.reference.expert_hessians_ref) on the same GPU, timed once
per case and weighting. Modes:
  GPTQ       no weights: the kernel gathers each block of rows of x itself
  GPTQ-rows  no weights, the rows copied into sorted order first (`form_rows=True`): what the pass costs
  AGQ        affinity weights, one operand scaled by w inside the kernel (between load and dot)
  AGQ-sqrt   both operands scaled by √w inside the kernel (`sqrt_w=True, form_rows=False`)
  AGQ-rows   the rows x·√w formed in sorted order by one Triton pass, then the unweighted kernel on them
             (`sqrt_w=True`, the default): what the pipeline runs under AGQ; its time includes the pass
pass_ms is the pass alone (`sorted_rows`, after the alignment) for the -rows modes. TFLOP/s counts the full
symmetric product, 2 · pairs · K², the work the loop does; the kernel computes the upper triangle only (about half
of it). Times are medians of CUDA-event timings after warm-up, H zeroing excluded. Writes a CSV and a plot to --out.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import os

import torch

from moequant.kernels import expert_hessians, moe_align
from moequant.kernels.expert_hessians import sorted_rows
from moequant.reference import expert_hessians_ref
from timing import median_ms  # noqa: E402  (benchmarks/timing.py)

CASES = [  # name, E, k, K, rows per token (k for gate_up, down_proj rows are per pair)
    ("dsv2lite gate_up", 64, 6, 2048, False),
    ("dsv2lite down", 64, 6, 1408, True),
    ("mixtral gate_up", 8, 2, 4096, False),
]


def time_fn(fn, reps=10, warmup=2):
    """Median µs."""
    return median_ms(fn, reps, warmup) * 1e3


def inputs(T, E, k, K, down, weighted, gen):
    logits = torch.randn(T, E, device="cuda", generator=gen)
    aff, ids = torch.topk(torch.softmax(logits, -1), k, dim=-1)
    if down:  # one row per (token, expert): the expert's intermediate activation
        x = torch.randn(T * k, K, device="cuda", generator=gen, dtype=torch.bfloat16)
        return x, ids.reshape(-1, 1), (aff.reshape(-1, 1) if weighted else None)
    x = torch.randn(T, K, device="cuda", generator=gen, dtype=torch.bfloat16)
    return x, ids, (aff if weighted else None)


MODES = {  # name: (weighted, rows formed by `sorted_rows` first, keyword arguments of expert_hessians)
    "GPTQ": (False, False, {}),
    "GPTQ-rows": (False, True, {"form_rows": True}),
    "AGQ": (True, False, {}),
    "AGQ-sqrt": (True, False, {"sqrt_w": True, "form_rows": False}),
    "AGQ-rows": (True, True, {"sqrt_w": True}),
}


SWEEP = ((128, 32, 4, 5), (128, 32, 8, 5), (128, 32, 8, 4), (128, 64, 4, 4), (128, 64, 8, 3), (128, 64, 8, 4),
         (128, 128, 8, 3), (64, 64, 4, 4), (256, 64, 8, 3))  # (block_k, block_t, warps, stages)


def sweep(modes, configs=SWEEP):
    gen = torch.Generator(device="cuda").manual_seed(1)
    E, k, K, T = 64, 6, 2048, 65536
    for mode in modes:
        weighted, _, kw = MODES[mode]
        x, ids, w = inputs(T, E, k, K, False, weighted, gen)
        H = torch.zeros(E, K, K, device="cuda")
        Hr, _ = expert_hessians(x, ids, w, E, **kw)
        for bk, bt, warps, stages in configs:
            try:
                t = time_fn(lambda: expert_hessians(x, ids, w, E, H=H.zero_(), block_k=bk, block_t=bt,
                                                    num_warps=warps, num_stages=stages, **kw), reps=5)
                err = ((H - Hr).norm() / Hr.norm()).item()
                print(f"{mode} bk={bk} bt={bt} warps={warps} stages={stages}: {t / 1e3:.2f} ms (incl. zeroing H)  "
                      f"diff vs default {err:.1e}", flush=True)
            except Exception as exc:
                print(f"{mode} bk={bk} bt={bt} warps={warps} stages={stages}: failed {type(exc).__name__}: "
                      f"{str(exc)[:200]}")
        del x, H, Hr
        torch.cuda.empty_cache()


def profile(modes, out):
    """Each mode on DeepSeek-V2-Lite's gate_up inputs, 64k tokens, after a warm-up call on 256 tokens (compiles the
    same specialisation), for `ncu -k regex:'_expert_hessian|_sorted_rows'`. Writes the label of each launch the
    filter keeps, in order, to out/profile_order.txt (for `bench_moe_gemm.py --ncu-summary`)."""
    gen = torch.Generator(device="cuda").manual_seed(2)
    E, k, K, T = 64, 6, 2048, 65536
    labels = []
    for mode in modes:
        weighted, formed, kw = MODES[mode]
        H = torch.zeros(E, K, K, device="cuda")
        for tokens, tag in ((256, " warm-up"), (T, "")):
            x, ids, w = inputs(tokens, E, k, K, False, weighted, gen)
            expert_hessians(x, ids, w, E, H=H.zero_(), **kw)
            torch.cuda.synchronize()
            labels += ([f"rows pass {mode}{tag}"] if formed else []) + [f"{mode}{tag}"]
        print(f"profiled {mode}", flush=True)
        del x, H
        torch.cuda.empty_cache()
    with open(os.path.join(out, "profile_order.txt"), "w") as f:
        f.write("\n".join(labels))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="8192,65536")
    ap.add_argument("--out", default="bench_out")
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    ap.add_argument("--configs", help="for --sweep: block_k:block_t:warps:stages,... (default: SWEEP)")
    ap.add_argument("--sweep", action="store_true", help="time tile configs on the E=64, K=2048, 64k-token case and exit")
    ap.add_argument("--profile", action="store_true", help="run each of --modes once on that case (for ncu) and exit")
    args = ap.parse_args()
    modes = args.modes.split(",")
    for m in modes:
        if m not in MODES:
            ap.error(f"unknown mode {m!r}; choose from {', '.join(MODES)}")
    os.makedirs(args.out, exist_ok=True)
    if args.sweep:
        configs = SWEEP if not args.configs else [tuple(int(v) for v in c.split(":")) for c in args.configs.split(",")]
        sweep(modes, configs)
        return
    if args.profile:
        profile(modes, args.out)
        return
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  date {datetime.date.today()}")
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    print(f"{'case':<18} {'T':>6} {'mode':>9} {'pairs':>7} {'ours_ms':>8} {'pass_ms':>8} {'loop_ms':>8} "
          f"{'ours_TF/s':>9} {'loop_TF/s':>9} {'speedup':>8} {'rel_err':>9}")
    for name, E, k, K, down in CASES:
        for T in [int(t) for t in args.tokens.split(",")]:
            loop_ms = {}  # the loop's time depends on the weighting only
            for mode in modes:
                weighted, formed, kw = MODES[mode]
                x, ids, w = inputs(T, E, k, K, down, weighted, gen)
                H = torch.zeros(E, K, K, device="cuda")
                c = torch.zeros(E, dtype=torch.int64, device="cuda")

                def ours():
                    H.zero_(), c.zero_()
                    expert_hessians(x, ids, w, E, H=H, counts=c, **kw)

                t_ours = time_fn(ours)
                t_zero = time_fn(lambda: H.zero_())  # the zeroing is not part of the kernel's work
                t_ours -= t_zero
                t_pass = float("nan")
                if formed:
                    al = moe_align(ids, E, 32)  # the block the kernel uses for formed rows
                    t_pass = time_fn(lambda: sorted_rows(x, w, al, ids.shape[1]))
                    del al
                if weighted not in loop_ms:
                    loop_ms[weighted] = time_fn(lambda: expert_hessians_ref(x, ids, w, E), reps=3, warmup=1)
                t_loop = loop_ms[weighted]
                ours()
                Hr, cr = expert_hessians_ref(x, ids, w, E)
                err = ((H - Hr).norm() / Hr.norm()).item()
                assert torch.equal(c, cr)
                pairs = ids.numel()
                flops = 2 * pairs * K * K
                row = dict(case=name, T=T, mode=mode, E=E, K=K, pairs=pairs,
                           ours_ms=t_ours / 1e3, pass_ms=t_pass / 1e3, loop_ms=t_loop / 1e3,
                           ours_tflops=flops / t_ours / 1e6, loop_tflops=flops / t_loop / 1e6,
                           speedup=t_loop / t_ours, rel_err=err)
                rows.append(row)
                print(f"{name:<18} {T:>6} {mode:>9} {pairs:>7} {row['ours_ms']:>8.2f} {row['pass_ms']:>8.2f} "
                      f"{row['loop_ms']:>8.2f} {row['ours_tflops']:>9.1f} {row['loop_tflops']:>9.1f} "
                      f"{row['speedup']:>8.1f} {err:>9.1e}", flush=True)
                del H, Hr, x
                torch.cuda.empty_cache()
    with open(os.path.join(args.out, "bench_hessian.csv"), "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=list(rows[0]))
        wr.writeheader()
        wr.writerows(rows)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, ax = plt.subplots(figsize=(8, 4))
    labels = [f"{r['case']}\nT={r['T'] // 1024}k {r['mode']}" for r in rows]
    xs = range(len(rows))
    ax.bar([i - 0.2 for i in xs], [r["ours_tflops"] for r in rows], 0.4, label="expert_hessians (Triton)")
    ax.bar([i + 0.2 for i in xs], [r["loop_tflops"] for r in rows], 0.4, label="torch per-expert fp32 loop")
    ax.set_xticks(list(xs), labels, rotation=90, fontsize=6)
    ax.set_ylabel("TFLOP/s (2·pairs·K²)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "bench_hessian.png"), dpi=120)
    print(f"plot: {os.path.join(args.out, 'bench_hessian.png')}")


if __name__ == "__main__":
    main()
