"""Per-expert Hessians: moequant.kernels.expert_hessians against the torch per-expert loop, on one GPU.

    python benchmarks/bench_hessian.py [--tokens 8192,65536] [--out bench_out]

Cases: gate_up inputs (x [T, K] with topk_ids [T, k]) for DeepSeek-V2-Lite (E=64, k=6, K=2048) and
Mixtral (E=8, k=2, K=4096), GPTQ (no weights) and AGQ (affinity weights); down_proj inputs (one row per
(token, expert), topk_ids [N, 1]) for DeepSeek-V2-Lite (K=I=1408). Baseline: the per-expert fp32 loop
(moequant.reference.expert_hessians_ref) on the same GPU. Modes: GPTQ (no weights), AGQ (the affinities handed to the
kernel, which scales one operand in registers) and AGQ-rows, what the pipeline does for AGQ: rows x·√w formed in one
torch pass (one row per (token, expert) pair, `moequant.quant.hessian.scaled_pair_rows` / `scaled_rows`), then the
unweighted kernel on them; its time includes that pass; AGQ-sqrt: the same rows' Hessian without forming them
(the kernel scales both operands by √w, `sqrt_w=True`). TFLOP/s counts the full symmetric product,
2 · pairs · K², the work the loop does; the kernel computes the upper triangle only (about half of it).
Times are medians of CUDA-event timings after warm-up. Writes a CSV and a plot to --out.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import os

import torch

from moequant.kernels import expert_hessians
from moequant.quant.hessian import scaled_pair_rows, scaled_rows
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


def sweep():
    gen = torch.Generator(device="cuda").manual_seed(1)
    E, k, K, T = 64, 6, 2048, 65536
    for weighted in (False, True):
        x, ids, w = inputs(T, E, k, K, False, weighted, gen)
        H = torch.zeros(E, K, K, device="cuda")
        Hr, _ = expert_hessians(x, ids, w, E)
        for bk, bt, warps, stages, scale_a in ((128, 64, 8, 3, True), (128, 128, 8, 3, True), (128, 64, 4, 4, True),
                                               (128, 128, 8, 4, True), (128, 32, 4, 5, True), (64, 64, 4, 4, True),
                                               (128, 64, 8, 3, False), (128, 128, 8, 3, False), (256, 64, 8, 3, True)):
            if scale_a is False and not weighted:
                continue
            try:
                t = time_fn(lambda: expert_hessians(x, ids, w, E, H=H.zero_(), block_k=bk, block_t=bt,
                                                    num_warps=warps, num_stages=stages, scale_a=scale_a), reps=5)
                err = ((H - Hr).norm() / Hr.norm()).item()
                print(f"{'AGQ' if weighted else 'GPTQ'} bk={bk} bt={bt} warps={warps} stages={stages} "
                      f"scale_a={scale_a}: {t / 1e3:.2f} ms (incl. zeroing H)  diff vs default {err:.1e}", flush=True)
            except Exception as exc:
                print(f"bk={bk} bt={bt} warps={warps} stages={stages}: failed {type(exc).__name__}: {str(exc)[:200]}")
        del x, H, Hr
        torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="8192,65536")
    ap.add_argument("--out", default="bench_out")
    ap.add_argument("--sweep", action="store_true", help="time tile configs on the E=64, K=2048, 64k-token case and exit")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if args.sweep:
        sweep()
        return
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  date {datetime.date.today()}")
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    print(f"{'case':<18} {'T':>6} {'mode':>8} {'pairs':>7} {'ours_ms':>8} {'loop_ms':>8} {'ours_TF/s':>9} "
          f"{'loop_TF/s':>9} {'speedup':>8} {'rel_err':>9}")
    for name, E, k, K, down in CASES:
        for T in [int(t) for t in args.tokens.split(",")]:
            for mode in ("GPTQ", "AGQ", "AGQ-rows", "AGQ-sqrt"):
                x, ids, w = inputs(T, E, k, K, down, mode != "GPTQ", gen)
                H = torch.zeros(E, K, K, device="cuda")
                c = torch.zeros(E, dtype=torch.int64, device="cuda")

                def ours():
                    H.zero_(), c.zero_()
                    if mode == "AGQ-rows":  # the pipeline's AGQ path: √w rows, then the unweighted kernel
                        rows = scaled_rows(x, w) if ids.shape[1] == 1 else scaled_pair_rows(x, w)
                        expert_hessians(rows, ids.reshape(-1, 1), None, E, H=H, counts=c)
                    else:
                        expert_hessians(x, ids, w, E, H=H, counts=c, sqrt_w=mode == "AGQ-sqrt")

                t_ours = time_fn(ours)
                t_zero = time_fn(lambda: H.zero_())  # the zeroing is not part of the kernel's work
                t_ours -= t_zero
                t_loop = time_fn(lambda: expert_hessians_ref(x, ids, w, E), reps=3, warmup=1)
                ours()
                Hr, cr = expert_hessians_ref(x, ids, w, E)
                err = ((H - Hr).norm() / Hr.norm()).item()
                assert torch.equal(c, cr)
                pairs = ids.numel()
                flops = 2 * pairs * K * K
                row = dict(case=name, T=T, mode=mode, E=E, K=K, pairs=pairs,
                           ours_ms=t_ours / 1e3, loop_ms=t_loop / 1e3, ours_tflops=flops / t_ours / 1e6,
                           loop_tflops=flops / t_loop / 1e6, speedup=t_loop / t_ours, rel_err=err)
                rows.append(row)
                print(f"{name:<18} {T:>6} {mode:>8} {pairs:>7} {row['ours_ms']:>8.2f} {row['loop_ms']:>8.2f} "
                      f"{row['ours_tflops']:>9.1f} {row['loop_tflops']:>9.1f} {row['speedup']:>8.1f} {err:>9.1e}",
                      flush=True)
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
