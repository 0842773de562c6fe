"""Quantization time at real shapes: seconds per layer, per expert linear, and for the whole model, on one GPU.

    python benchmarks/bench_quantize.py [--cases mixtral-8x7b:4,deepseek-v2-lite,qwen3-30b-a3b]
                                        [--samples 128] [--seq-len 2048] [--baseline] [--factor-bench] [--out DIR]

Models have the public configs' shapes (moequant.models.real_config) and random bf16 weights, built offline: on the
meta device, then every tensor filled on the GPU (normal(0, 0.02); norms 1) and copied into CPU memory, so the
whole model sits in CPU RAM and the pipeline moves one decoder layer at a time to the GPU, as for a real checkpoint.
`name:N` builds N decoder layers and extrapolates to the model's layer count (Mixtral-8x7B's 32 layers, 93 GB in
bf16, are more than this benchmark keeps in CPU RAM): the measured run plus the missing layers at the mean of the
measured layers after the first (the first MoE layer also pays Triton's JIT compiles). A bare name builds all the
layers and runs end to end. DeepSeek-V2-Lite's dense first-layer MLP (10944 inputs, not a multiple of 128) is left
in bf16; its attention and all MoE layers are quantized.

Calibration: `--samples` × `--seq-len` random token ids (default 128 × 2048), AGQ W4 g128 (the package defaults).
Reported per case: the end-to-end wall time of `quantize_model` (input capture included), seconds per MoE layer
and its split (load, capture, hessian, solve, write, rerun), GPU-seconds per expert linear (MoE-layer time over
3·E: gate, up and down of every expert; attention and shared experts included in the layer time, like the
peers' figures), the whole-model time (measured, or extrapolated from the mean layer), and the peak GPU memory of a
layer against the up-front estimate.

--baseline: one MoE layer per case again with the torch paths (GPTQ column loop in Python, per-expert torch
Hessians): the same pipeline before the kernels, measured in the same run.
--factor-bench: the two factorisations of H⁻¹ (moequant.quant.gptq) at the real expert shapes; the cases then
use the faster one.
Results go to DIR/bench_quantize.json and DIR/bench_quantize.md (DIR defaults to $OUT or bench_out).
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import statistics
import sys
import time

import torch
import transformers as T

from moequant.config import QuantConfig
from moequant.models import get_adapter, real_config
from moequant.models.configs import REAL_LAYERS
from moequant.pipeline import STAGES, quantize_model
from moequant.quant import gptq as gptq_mod

GiB = 1 << 30


def build_model(name: str, num_layers: int, seed: int = 0, fill_device: str = "cuda"):
    """A real-shaped model with random bf16 weights in CPU memory, without initialising it on the CPU."""
    with torch.device("meta"):
        model = T.AutoModelForCausalLM.from_config(real_config(name, num_layers), dtype=torch.bfloat16)
    model.to_empty(device="cpu")
    gen = torch.Generator(device=fill_device).manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            buf = torch.empty(p.shape, dtype=p.dtype, device=fill_device)
            if p.dim() == 1:  # RMSNorm weights
                buf.fill_(1.0)
            else:
                buf.normal_(0.0, 0.02, generator=gen)
            p.copy_(buf)
            del buf
    rotary = model.model.rotary_emb  # its buffers are computed at construction, which the meta device skipped
    model.model.rotary_emb = type(rotary)(config=model.config)
    return model.eval()


def case_config(name: str, cfg: QuantConfig) -> QuantConfig:
    """DeepSeek-V2-Lite's dense first-layer MLP has 10944 inputs, which 128 does not divide: it stays in bf16."""
    if name.startswith("deepseek"):
        return QuantConfig(**{**cfg.to_dict(), "targets": ("experts", "shared", "attn")})
    return cfg


def moe_shape(model):
    adapter = get_adapter(model)
    blocks = adapter.moe_blocks()
    _, b = blocks[0]
    return dict(experts=b.num_experts, hidden=b.experts.gate_up_proj.shape[-1], inter=b.intermediate_size,
                top_k=model.config.num_experts_per_tok, moe_layers=[i for i, _ in blocks])


def run_case(name: str, num_layers: int | None, tokens: torch.Tensor, cfg: QuantConfig, log) -> dict:
    total_layers = REAL_LAYERS[name]
    n = num_layers or total_layers
    t0 = time.perf_counter()
    model = build_model(name, n)
    build_s = time.perf_counter() - t0
    shape = moe_shape(model)
    log(f"\n== {name}: {n} of {total_layers} layers, E={shape['experts']} H={shape['hidden']} I={shape['inter']} "
        f"top-{shape['top_k']}; built in {build_s:.1f} s")

    def on_done(i, _packed, meta, _inputs):  # progress (the write stage is still running: final times below)
        print(f"  layer {i:2d} done", flush=True)

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    res = quantize_model(model, cfg, tokens, progress=False, on_layer_done=on_done)
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    for m in res.layers:
        t = m["times"]
        log(f"  layer {m['layer']:2d}: {sum(t.values()):6.2f} s  " + " ".join(f"{k} {t[k]:.2f}" for k in STAGES) +
            f"  peak {m.get('peak_gpu_bytes', 0) / GiB:.1f} GiB (est. {m['estimated_gpu_bytes'] / GiB:.1f})")
    # the first MoE layer also pays Triton's JIT compiles: the per-layer figures are over the others
    moe = [m for m in res.layers if m["layer"] in shape["moe_layers"]]
    steady = moe[1:] or moe
    dense = [m for m in res.layers if m["layer"] not in shape["moe_layers"]]
    layer_s = lambda m: sum(m["times"].values())
    moe_mean = statistics.mean(layer_s(m) for m in steady)
    split = {k: statistics.mean(m["times"][k] for m in steady) for k in STAGES}
    n_moe_total = len(shape["moe_layers"]) * total_layers // n if num_layers else len(shape["moe_layers"])
    n_dense_total = total_layers - n_moe_total
    dense_mean = statistics.mean(layer_s(m) for m in dense) if dense else 0.0
    lead_in = wall - sum(layer_s(m) for m in res.layers)  # embeddings + first-layer input capture, memory plan
    # extrapolated: the measured run plus the missing layers at the steady-state means
    whole = wall if not num_layers else wall + moe_mean * (n_moe_total - len(moe)) + dense_mean * (
        n_dense_total - len(dense))
    notes = [n for m in res.layers for rec in list(m["experts"].values()) + list(m["linears"].values())
             for n in rec.get("notes", [])]
    linears = 3 * shape["experts"]
    out = dict(case=name, layers_run=n, layers_total=total_layers, **{k: v for k, v in shape.items() if k != "moe_layers"},
               build_s=build_s, wall_s=wall, moe_layer_s=moe_mean, split_s=split,
               per_expert_linear_s=moe_mean / linears,
               whole_model_s=whole, whole_model_measured=not num_layers,
               whole_per_expert_linear_s=whole / (n_moe_total * linears),
               peak_gib=max(m.get("peak_gpu_bytes", 0) for m in res.layers) / GiB,
               estimated_gib=max(m["estimated_gpu_bytes"] for m in res.layers) / GiB,
               offload=res.layers[0]["offload_activations"], targets=list(cfg.targets),
               first_moe_layer_s=layer_s(moe[0]), lead_in_s=lead_in,
               fp64_refactorisations=sum("fp64" in n for n in notes), damp_raised=sum("raising damp" in n for n in notes))
    log(f"  -> wall {wall:.1f} s; MoE layer {moe_mean:.2f} s (first {out['first_moe_layer_s']:.2f} s); "
        f"{out['per_expert_linear_s'] * 1e3:.1f} ms per expert linear; whole model "
        f"{'measured' if not num_layers else 'extrapolated'} {whole:.0f} s; H⁻¹ notes: "
        f"{out['fp64_refactorisations']} fp64 refactorisations, {out['damp_raised']} damping raises")
    del res, model
    gc.collect()
    torch.cuda.empty_cache()
    return out


def baseline_layer(name: str, tokens: torch.Tensor, cfg: QuantConfig, log) -> dict:
    """One MoE layer with the torch paths (Python column loop, per-expert torch Hessians), for the ratio."""
    model = build_model(name, 2 if name.startswith("deepseek") else 1)  # DeepSeek's layer 0 is dense
    moe_layers = moe_shape(model)["moe_layers"]
    base = QuantConfig(**{**cfg.to_dict(), "gptq_backend": "torch", "hessian_backend": "torch"})
    fast = quantize_model(model, cfg, tokens, progress=False)  # the same layer with the kernels, same run
    model = build_model(name, 2 if name.startswith("deepseek") else 1)
    slow = quantize_model(model, base, tokens, progress=False)
    pick = lambda r: next(m["times"] for m in r.layers if m["layer"] in moe_layers)
    f, s = pick(fast), pick(slow)
    log(f"  baseline {name}: torch paths {sum(s.values()):.2f} s ({' '.join(f'{k} {s[k]:.2f}' for k in STAGES)}) "
        f"vs kernels {sum(f.values()):.2f} s -> {sum(s.values()) / sum(f.values()):.1f}x")
    del model, fast, slow
    gc.collect()
    torch.cuda.empty_cache()
    return dict(case=name, torch_s=sum(s.values()), torch_split=s, kernels_s=sum(f.values()), kernels_split=f)


def factor_bench(log) -> list[dict]:
    """Seconds of the two H⁻¹ factorisations at real expert shapes (random SPD Hessians)."""
    rows = []
    for label, B, C in (("mixtral down", 8, 14336), ("mixtral gate_up", 8, 4096), ("qwen3 gate_up", 128, 2048)):
        X = torch.randn(B, C, 2 * C // 8, device="cuda") / C ** 0.5
        H = X @ X.transpose(1, 2)  # rank 2C/8 < C: damping does the rest, like a Hessian from few tokens
        del X
        r = dict(shape=label, B=B, C=C)
        for how in gptq_mod.FACTORISATIONS:
            gptq_mod._inverse_cholesky_upper(H[:1], 0.01, how=how)  # warm-up (handles, workspaces)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            U, _, _ = gptq_mod._inverse_cholesky_upper(H, 0.01, how=how)
            torch.cuda.synchronize()
            r[how] = time.perf_counter() - t0
            del U
        log(f"  factor {label} [{B}x{C}x{C}]: " + ", ".join(f"{h} {r[h]:.3f} s" for h in gptq_mod.FACTORISATIONS))
        rows.append(r)
        del H
        torch.cuda.empty_cache()
    return rows


def markdown(meta: dict, cases: list[dict], baselines: list[dict], factors: list[dict]) -> str:
    L = [f"device: {meta['device']}; torch {meta['torch']}; {meta['date']}; H⁻¹ factorisation "
         f"'{meta.get('factorisation')}'", f"command: `{meta['command']}`",
         f"calibration: {meta['samples']} x {meta['seq_len']} tokens, AGQ W4 g128, batch {meta['batch_size']}; "
         "per-layer columns: mean over the MoE layers after the first (which also pays Triton's JIT compiles)", "",
         "| model (layers run) | E | wall s | s / MoE layer | " + " | ".join(STAGES) +
         " | ms / expert linear | whole model s | GPU-s / expert linear (whole) | peak GiB (est.) | fp64 / damp x10 |",
         "|---" * (9 + len(STAGES)) + "|"]
    for c in cases:
        kind = "measured" if c["whole_model_measured"] else "extrapolated"
        L.append(f"| {c['case']} ({c['layers_run']}/{c['layers_total']}) | {c['experts']} | {c['wall_s']:.1f} | "
                 f"{c['moe_layer_s']:.2f} | " + " | ".join(f"{c['split_s'][k]:.2f}" for k in STAGES) +
                 f" | {c['per_expert_linear_s'] * 1e3:.1f} | {c['whole_model_s']:.0f} ({kind}) | "
                 f"{c['whole_per_expert_linear_s']:.4f} | {c['peak_gib']:.1f} ({c['estimated_gib']:.1f}) | "
                 f"{c['fp64_refactorisations']} / {c['damp_raised']} |")
    if baselines:
        L += ["", "| one MoE layer | torch paths s | kernels s | ratio | torch split | kernels split |",
              "|---|---|---|---|---|---|"]
        for b in baselines:
            sp = lambda d: " ".join(f"{k} {d[k]:.2f}" for k in STAGES)
            L.append(f"| {b['case']} | {b['torch_s']:.2f} | {b['kernels_s']:.2f} | "
                     f"{b['torch_s'] / b['kernels_s']:.1f}x | {sp(b['torch_split'])} | {sp(b['kernels_split'])} |")
    if factors:
        L += ["", "| H⁻¹ factor | B x C | " + " | ".join(f"{h} s" for h in gptq_mod.FACTORISATIONS) + " |",
              "|---|---|" + "---|" * len(gptq_mod.FACTORISATIONS)]
        L += [f"| {f['shape']} | {f['B']} x {f['C']} | " + " | ".join(f"{f[h]:.3f}" for h in gptq_mod.FACTORISATIONS)
              + " |" for f in factors]
    return "\n".join(L)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", default="mixtral-8x7b:3,qwen3-30b-a3b,deepseek-v2-lite",
                    help="comma-separated name[:layers]; a bare name runs the whole model")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--baseline", action="store_true", help="one layer per case with the torch paths, for the ratio")
    ap.add_argument("--factor-bench", action="store_true")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_quantize needs a CUDA GPU")
    os.makedirs(args.out, exist_ok=True)
    logf = open(os.path.join(args.out, "bench_quantize.log"), "a")

    def log(msg):
        print(msg, flush=True)
        logf.write(msg + "\n")
        logf.flush()

    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, date=datetime.date.today().isoformat(),
                command="python benchmarks/bench_quantize.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                samples=args.samples, seq_len=args.seq_len, batch_size=args.batch_size)
    log(str(meta))
    cfg = QuantConfig(method="agq", bits=4, group_size=128, batch_size=args.batch_size, device="cuda")
    cases, baselines, factors = [], [], []

    def save():
        with open(os.path.join(args.out, "bench_quantize.json"), "w") as f:
            json.dump(dict(meta=meta, cases=cases, baselines=baselines, factors=factors), f, indent=1)
        with open(os.path.join(args.out, "bench_quantize.md"), "w") as f:
            f.write(markdown(meta, cases, baselines, factors) + "\n")

    if args.factor_bench:  # and run the cases with the faster factorisation
        factors = factor_bench(log)
        gptq_mod.INVERSE_FACTOR = min(gptq_mod.FACTORISATIONS, key=lambda h: sum(f[h] for f in factors))
        log(f"cases use the '{gptq_mod.INVERSE_FACTOR}' factorisation")
        save()
    meta["factorisation"] = gptq_mod.INVERSE_FACTOR
    for spec in args.cases.split(","):
        name, _, n = spec.partition(":")
        vocab = real_config(name, 1).vocab_size
        tokens = torch.randint(3, vocab, (args.samples, args.seq_len), generator=torch.Generator().manual_seed(0))
        cases.append(run_case(name, int(n) if n else None, tokens, case_config(name, cfg), log))
        save()
    if args.baseline:
        for spec in args.cases.split(","):
            name = spec.partition(":")[0]
            vocab = real_config(name, 1).vocab_size
            tokens = torch.randint(3, vocab, (args.samples, args.seq_len), generator=torch.Generator().manual_seed(0))
            baselines.append(baseline_layer(name, tokens, case_config(name, cfg), log))
            save()
    log("\n" + markdown(meta, cases, baselines, factors))


if __name__ == "__main__":
    main()
