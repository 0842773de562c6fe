"""Drive moe_w4a16_decode for a profiler (ncu / nsys): a few calls at one shape, nothing else on the GPU.

    ncu -k regex:moe_decode python benchmarks/profile_decode.py --shape mixtral --m 1
"""
import argparse

import torch

from moequant import ops
from bench_decode_moe import SHAPES, packed_experts, routing  # noqa: E402  (benchmarks/)

ap = argparse.ArgumentParser()
ap.add_argument("--shape", default="mixtral", choices=sorted(SHAPES))
ap.add_argument("--m", type=int, default=1)
ap.add_argument("--calls", type=int, default=3)
args = ap.parse_args()
_, E, k, H, I = SHAPES[args.shape]
gen = torch.Generator(device="cuda").manual_seed(0)
w13, w2 = packed_experts(E, 2 * I, H), packed_experts(E, H, I)
for _ in range(args.calls):
    x = torch.randn(args.m, H, device="cuda", generator=gen).to(torch.bfloat16)
    ops.moe_w4a16_decode(x, w13, w2, *routing(args.m, E, k, gen))
torch.cuda.synchronize()
