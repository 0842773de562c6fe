"""Parts of the quantization pipeline in isolation, at Mixtral-8x7B's shapes, on one GPU.

    python benchmarks/bench_quantize_parts.py [--parts interference,hessian] [--out DIR]

interference: does a background copy or pinned allocation slow the compute thread? A foreground unit shaped like
  the capture (16 steps of a [16384 x 4096] @ [4096 x 6144] bf16 GEMM and 12 elementwise kernels, with a host sync
  after every step or only at the end) is repeated alone, and while a worker thread does one of: a pageable
  device-to-host copy of a layer (2.8 GB, as the write-back of the layer's weights), the same through pinned
  staging and a CPU copy, the loader's CPU copy into pinned staging and host-to-device DMA, pinning 0.75 GB afresh
  (the packed weights' first staging), allocating + filling 0.75 GB of fresh pageable memory. Reported: the
  median and the slowest unit while the worker ran, against the median alone.
hessian: the expert-Hessian kernel (moequant.kernels.expert_hessians) on the pipeline's inputs at Mixtral's shapes:
  down_proj (32768 rows of 14336, 8 experts), gate_up (32768 rows of 4096, 8 experts), a dense linear (16384 rows
  of 4096, one "expert"), for tile settings (block, rows per step, warps, stages, wide tiles). Median ms, TFLOP/s
  of the upper triangle (rows·K² flops: rows·K²/2 multiply-adds), and whether H is bit for bit the default's.
Results: DIR/bench_quantize_parts.{log,json}.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time

import torch

from moequant.kernels import expert_hessians
from timing import median_ms  # benchmarks/timing.py

GB = 1e9


@torch.no_grad()
def _timed(op) -> float:
    t0 = time.perf_counter()
    op()
    return time.perf_counter() - t0


def foreground(sync: bool, x, w, steps: int = 16):
    for _ in range(steps):
        y = x @ w
        for _ in range(12):
            y = y * 1.0001
        if sync:
            torch.cuda.synchronize()
    torch.cuda.synchronize()


def interference(log) -> list[dict]:
    dev = torch.device("cuda")
    x = torch.randn(16384, 4096, device=dev, dtype=torch.bfloat16)
    w = torch.randn(4096, 6144, device=dev, dtype=torch.bfloat16)
    layer = int(2.8 * GB)
    packed = int(0.75 * GB)
    src = torch.empty(layer, dtype=torch.uint8, device=dev).fill_(1)
    home = torch.empty(layer, dtype=torch.uint8).fill_(2)  # the model's CPU tensor: pageable, already faulted in
    pinned = torch.empty(layer, dtype=torch.uint8, pin_memory=True).fill_(3)
    side = torch.cuda.Stream()
    keep, pins = [], []  # pinned buffers stay alive: a freed one would be reused from PyTorch's host cache

    def pageable_d2h():
        with torch.cuda.stream(side):
            home.copy_(src)

    def pinned_d2h():
        with torch.cuda.stream(side):
            pinned.copy_(src, non_blocking=True)
        side.synchronize()
        home.copy_(pinned)

    def loader_h2d():
        pinned.copy_(home)
        with torch.cuda.stream(side):
            src.copy_(pinned, non_blocking=True)
        side.synchronize()

    def pin_fresh():
        pins.append(torch.empty(packed, dtype=torch.uint8, pin_memory=True))

    def pageable_fresh():
        keep.append(torch.empty(packed, dtype=torch.uint8).copy_(pinned[:packed]))

    ops = {"none": None, "pageable D2H 2.8 GB": pageable_d2h, "pinned D2H 2.8 GB + CPU copy": pinned_d2h,
           "CPU copy + pinned H2D 2.8 GB": loader_h2d, "pin 0.75 GB afresh": pin_fresh,
           "fresh pageable 0.75 GB + fill": pageable_fresh}
    rows = []
    for sync in (True, False):
        alone = []
        for _ in range(10):
            t0 = time.perf_counter()
            foreground(sync, x, w)
            alone.append(time.perf_counter() - t0)
        base = statistics.median(alone[2:])
        for name, op in ops.items():
            if op is None:
                continue
            units, took = [], []
            for _ in range(2):  # two runs of the background job, the foreground repeated while each runs
                torch.cuda.synchronize()
                th = threading.Thread(target=lambda: took.append(_timed(op)))
                th.start()
                while th.is_alive() or len(units) < 2:
                    t0 = time.perf_counter()
                    foreground(sync, x, w)
                    units.append(time.perf_counter() - t0)
                th.join()
                keep.clear()
            r = dict(foreground_sync=sync, background=name, alone_ms=1e3 * base,
                     median_ms=1e3 * statistics.median(units), slowest_ms=1e3 * max(units), units=len(units),
                     background_ms=1e3 * statistics.median(took))
            rows.append(r)
            log(f"  interference ({'sync every step' if sync else 'sync per unit'}) with {name}: unit "
                f"{r['median_ms']:.1f} ms median, {r['slowest_ms']:.1f} ms slowest, alone {r['alone_ms']:.1f} ms "
                f"({r['units']} units; background {r['background_ms']:.0f} ms)")
    return rows


HESSIAN_SETTINGS = {  # name: (block_k, block_t, warps, stages, wide)
    "default": (None, None, None, None, None),
    "sq bt64 w4 s4": (128, 64, 4, 4, 1),
    "sq bt64 w8 s3": (128, 64, 8, 3, 1),
    "wide bt32 w8 s4": (128, 32, 8, 4, 2),
    "wide bt32 w8 s5": (128, 32, 8, 5, 2),
    "wide bt64 w8 s3": (128, 64, 8, 3, 2),
    "wide bt64 w8 s4": (128, 64, 8, 4, 2),
}


def hessian(log) -> list[dict]:
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    T, k, E = 16384, 2, 8
    logits = torch.randn(T, E, device=dev, generator=gen)
    ids = torch.topk(logits, k, dim=-1).indices.reshape(-1)
    order = torch.argsort(ids, stable=True)
    shapes = {  # rows as the pipeline passes them: one per (token, expert) pair, grouped by expert for down_proj
        "down_proj K=14336": (torch.randn(T * k, 14336, device=dev, generator=gen).to(torch.bfloat16),
                              ids[order].unsqueeze(1), E),
        "gate_up K=4096": (torch.randn(T * k, 4096, device=dev, generator=gen).to(torch.bfloat16), ids.unsqueeze(1), E),
        "dense K=4096": (torch.randn(T, 4096, device=dev, generator=gen).to(torch.bfloat16),
                         torch.zeros(T, 1, dtype=torch.int64, device=dev), 1),
    }
    rows = []
    for shape, (x, sel, n) in shapes.items():
        K = x.shape[1]
        ref = None
        H = torch.zeros(n, K, K, device=dev)
        for name, (bk, bt, warps, stages, wide) in HESSIAN_SETTINGS.items():
            kw = dict(block_k=bk, block_t=bt, num_warps=warps, num_stages=stages, wide=wide)
            try:
                out, _ = expert_hessians(x, sel, None, n, H=torch.zeros(n, K, K, device=dev), **kw)
                ms = median_ms(lambda: expert_hessians(x, sel, None, n, H=H, **kw), reps=10, warmup=2)
            except Exception as e:  # noqa: BLE001 - a setting that does not compile is reported, not fatal
                log(f"  hessian {shape} {name}: failed: {type(e).__name__}: {str(e)[:200]}")
                continue
            if ref is None:
                ref = out
            same = bool(torch.equal(out, ref))
            tflops = x.shape[0] * K * K / (ms * 1e-3) / 1e12  # upper triangle: pairs·K²/2 multiply-adds, 2 flops each
            rows.append(dict(shape=shape, setting=name, ms=ms, tflops=tflops, bit_equal_default=same))
            log(f"  hessian {shape} {name}: {ms:.2f} ms, {tflops:.0f} TFLOP/s (upper triangle), "
                f"bits {'equal to' if same else 'DIFFER from'} default")
            del out
        del H, ref
        torch.cuda.empty_cache()
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parts", default="interference,hessian")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    logf = open(os.path.join(args.out, "bench_quantize_parts.log"), "a")

    def log(msg):
        print(msg, flush=True)
        logf.write(msg + "\n")
        logf.flush()

    log(f"{torch.cuda.get_device_name()} torch {torch.__version__} {time.strftime('%Y-%m-%d %H:%M:%S')}")
    res = {}
    for part in filter(None, args.parts.split(",")):
        res[part] = {"interference": interference, "hessian": hessian}[part](log)
        with open(os.path.join(args.out, "bench_quantize_parts.json"), "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
