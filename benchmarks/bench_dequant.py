"""Dequantization throughput of moequant._C (CUDA) vs the device's copy bandwidth.

    python benchmarks/bench_dequant.py [--json out.json]

GB/s counts bytes read (qweight, scales, zeros) plus bytes written (the dense weight), the same
way the copy bandwidth counts read + write. Baseline: the plain-PyTorch packing.dequantize.
"""
from __future__ import annotations

import argparse
import json
import math

import torch

from moequant import ops
from moequant.packing import PackedWeight, dequantize as dequantize_torch
from timing import median_ms  # noqa: E402  (benchmarks/timing.py)


def time_ms(fn, iters=20, warmup=3):
    return median_ms(fn, iters, warmup)


def copy_bandwidth():
    x = torch.randn(2**28, device="cuda", dtype=torch.bfloat16)  # 512 MiB
    y = torch.empty_like(x)
    ms = time_ms(lambda: y.copy_(x))
    return 2 * x.numel() * x.element_size() / ms / 1e6  # GB/s, read + write


def random_packed(batch, out_f, in_f, bits, group, sym, dtype):
    rows = in_f * bits // 32
    qweight = torch.randint(-2**31, 2**31 - 1, (*batch, rows, out_f), dtype=torch.int32, device="cuda")
    G = in_f // group
    scales = (torch.rand(*batch, G, out_f, device="cuda") * 0.02 + 0.001).to(dtype)
    zeros = None if sym else torch.randint(0, 1 << bits, (*batch, G, out_f), device="cuda", dtype=torch.uint8)
    return PackedWeight(qweight, scales, zeros, None, bits, group)


def nbytes(p: PackedWeight, out_dtype):
    b = p.qweight.numel() * 4 + p.scales.numel() * p.scales.element_size()
    if p.qzeros is not None:
        b += p.qzeros.numel()
    return b + p.qweight.shape[:-2].numel() * p.out_features * p.in_features * torch.finfo(out_dtype).bits // 8


CASES = [  # name, batch, out, in, bits, group, sym
    ("Mixtral w13 (8 experts)", (8,), 28672, 4096, 4, 128, True),
    ("Mixtral w2 (8 experts)", (8,), 4096, 14336, 4, 128, True),
    ("Qwen3-30B w13 (128 experts)", (128,), 1536, 2048, 4, 128, True),
    ("Mixtral w13 asym", (8,), 28672, 4096, 4, 128, False),
    ("Mixtral w13 int8", (8,), 28672, 4096, 8, 128, True),
    ("Mixtral w13 int3", (8,), 28672, 4096, 3, 128, True),
    ("Mixtral w13 int2", (8,), 28672, 4096, 2, 128, True),
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    assert torch.cuda.is_available() and ops.cuda_available(), "needs a GPU and a CUDA build of moequant._C"
    dev = torch.cuda.get_device_name()
    copy = copy_bandwidth()
    print(f"device: {dev}; torch {torch.__version__}; copy bandwidth (read+write) {copy:.0f} GB/s")
    rows = []
    for name, batch, out_f, in_f, bits, group, sym in CASES:
        for dtype in (torch.bfloat16, torch.float16):
            if bits != 4 and dtype == torch.float16:
                continue
            p = random_packed(batch, out_f, in_f, bits, group, sym, dtype)
            ms = time_ms(lambda: ops.dequantize(p, dtype))
            base_ms = time_ms(lambda: dequantize_torch(p, dtype), iters=3, warmup=1) if bits == 4 and dtype == torch.bfloat16 else float("nan")
            gbs = nbytes(p, dtype) / ms / 1e6
            rows.append(dict(case=name, dtype=str(dtype).split(".")[-1], ms=ms, gbs=gbs, of_copy=gbs / copy,
                             torch_ms=base_ms, speedup=base_ms / ms))
            del p
            torch.cuda.empty_cache()
    print("\n| case | dtype | time (ms) | GB/s (r+w) | % of copy BW | torch ref (ms) | speed-up |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        ref = "- | -" if math.isnan(r["torch_ms"]) else f"{r['torch_ms']:.2f} | {r['speedup']:.0f}x"  # NaN: not run
        print(f"| {r['case']} | {r['dtype']} | {r['ms']:.3f} | {r['gbs']:.0f} | {100 * r['of_copy']:.0f}% | {ref} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=dev, copy_gbs=copy, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
