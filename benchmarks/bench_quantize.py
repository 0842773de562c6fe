"""Quantization time at real shapes: seconds per layer, per expert linear, and for the whole model, on one GPU.

    python benchmarks/bench_quantize.py [--cases mixtral-8x7b:3,deepseek-v2-lite,qwen3-30b-a3b]
                                        [--samples 128] [--seq-len 2048] [--baseline mixtral-8x7b,...]
                                        [--solve-bench] [--factor-bench] [--no-overlap] [--out DIR]

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
and its split (load, capture, hessian, solve, write, rerun: what the run waits for; the copies overlapped in the
background are listed apart), GPU-seconds per expert linear (MoE-layer time over 3·E: gate, up and down of every
expert; attention and shared experts included in the layer time, like the peers' figures), the whole-model time
(measured, or extrapolated from the mean layer), and the peak GPU memory of a layer against the up-front estimate.

--baseline NAMES: the same-run baseline, one MoE layer of each named shape quantized the plain way: per-expert
(one matrix at a time) textbook GPTQ — the Python column loop, H⁻¹ by Cholesky / inverse / Cholesky, the lazy
right-looking update — on Hessians from per-expert fp32 torch matmuls, the layer's full forward in the capture, and
no overlap of transfers and compute. The table gives its seconds, its split and the ratio to the fast path's MoE
layer of the same shape measured in the same run.
--solve-bench: the GPTQ solve alone at Mixtral's expert shapes on random Hessians: the previous default (right
update, reversed-recursive H⁻¹ factor, cuSOLVER Cholesky) against the variants (left update; blocked Cholesky),
with the codes' agreement and proxy-loss ratio against the previous default.
--factor-bench: the H⁻¹ factorisations (moequant.quant.gptq) at the real expert shapes.
--profile-layer N: run layer N of each case under torch.profiler (benchmarks/quantize_profile.py: the split by
stage, GPU busy time, kernels, blocking CUDA calls); that layer is left out of the per-layer means.
--hash: a digest of every packed tensor per case in the JSON (to compare the bits of two runs, e.g. of two code
versions: benchmarks/gpu_quantize.sh does so for its "base" and "bench" steps).
--lanes N / --weights-back-pinned: the pipeline's solve lanes and write-back mode (default: the package's).
Results go to DIR/bench_quantize[_TAG].json and .md (DIR defaults to $OUT or bench_out; --tag names the run).
On the device machine (no editable install) run it through benchmarks/gpu_quantize.sh, which makes `kernels/`
importable as `moequant.kernels` and runs the GPU tests first.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import hashlib
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
from moequant import pipeline as pipeline_mod
from moequant.pipeline import OVERLAPPED, STAGES, quantize_model
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


LAYER_STAGES = STAGES  # what a layer's time sums (the overlapped background seconds are reported apart)


def layer_s(m) -> float:
    return sum(m["times"][k] for k in LAYER_STAGES)


def packed_digests(packed: dict) -> dict[str, str]:
    """A digest of each packed weight's tensors (codes, scales, zeros, g_idx), to compare the bits of two runs."""
    out = {}
    for k in sorted(packed):
        h = hashlib.blake2b(digest_size=16)
        for f in ("qweight", "scales", "qzeros", "g_idx"):
            t = getattr(packed[k], f)
            if t is not None:
                h.update(f.encode())
                h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().data)
        out[k] = h.hexdigest()
    return out


def run_case(name: str, num_layers: int | None, tokens: torch.Tensor, cfg: QuantConfig, log, overlap=None,
             skip_layers=(), digest=False) -> dict:
    total_layers = REAL_LAYERS[name]
    n = num_layers or total_layers
    t0 = time.perf_counter()
    model = build_model(name, n)
    build_s = time.perf_counter() - t0
    shape = moe_shape(model)
    log(f"\n== {name}: {n} of {total_layers} layers, E={shape['experts']} H={shape['hidden']} I={shape['inter']} "
        f"top-{shape['top_k']}; built in {build_s:.1f} s")

    def on_done(i, _packed, _meta, _state):  # progress (runs on the write-back thread)
        print(f"  layer {i:2d} written", flush=True)

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    res = quantize_model(model, cfg, tokens, progress=False, on_layer_done=on_done, overlap=overlap)
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    for m in res.layers:
        t = m["times"]
        log(f"  layer {m['layer']:2d}: {layer_s(m):6.2f} s  " + " ".join(f"{k} {t[k]:.2f}" for k in STAGES) +
            f"  (overlapped: to GPU {t['overlapped_load']:.2f}, back {t['overlapped_write']:.2f})"
            f"  peak {m.get('peak_gpu_bytes', 0) / GiB:.1f} GiB (est. {m['estimated_gpu_bytes'] / GiB:.1f})")
    # the first MoE layer also pays Triton's JIT compiles: the per-layer figures are over the others (and not over a
    # profiled layer)
    moe = [m for m in res.layers if m["layer"] in shape["moe_layers"]]
    steady = [m for m in moe[1:] if m["layer"] not in skip_layers] or moe
    dense = [m for m in res.layers if m["layer"] not in shape["moe_layers"]]
    # the model's last layer has no re-run (no next layer): its re-run is averaged over the layers that have one
    last = res.layers[-1]["layer"]
    split = {k: statistics.mean(m["times"][k] for m in (
        [m for m in steady if m["layer"] != last] or steady if k == "rerun" else steady)) for k in STAGES + OVERLAPPED}
    moe_mean = sum(split[k] for k in STAGES)
    n_moe_total = len(shape["moe_layers"]) * total_layers // n if num_layers else len(shape["moe_layers"])
    n_dense_total = total_layers - n_moe_total
    dense_mean = statistics.mean(layer_s(m) for m in dense) if dense else 0.0
    lead_in = wall - sum(layer_s(m) for m in res.layers)  # embeddings + first-layer input capture, memory plan
    # extrapolated: the measured run plus the missing layers at the steady-state means
    whole = wall if not num_layers else wall + moe_mean * (n_moe_total - len(moe)) + dense_mean * (
        n_dense_total - len(dense))
    notes = [n for m in res.layers for rec in list(m["experts"].values()) + list(m["linears"].values())
             for n in rec.get("notes", [])]
    with_rerun = [layer_s(m) for m in steady if m["layer"] != last]
    linears = 3 * shape["experts"]
    out = dict(case=name, layers_run=n, layers_total=total_layers, **{k: v for k, v in shape.items() if k != "moe_layers"},
               build_s=build_s, wall_s=wall, moe_layer_s=moe_mean, split_s=split,
               per_expert_linear_s=moe_mean / linears,
               whole_model_s=whole, whole_model_measured=not num_layers,
               whole_per_expert_linear_s=whole / (n_moe_total * linears),
               peak_gib=max(m.get("peak_gpu_bytes", 0) for m in res.layers) / GiB,
               estimated_gib=max(m["estimated_gpu_bytes"] for m in res.layers) / GiB,
               offload=res.layers[0]["offload_activations"], overlap=res.layers[0]["overlap"],
               targets=list(cfg.targets), first_moe_layer_s=layer_s(moe[0]), lead_in_s=lead_in,
               fp64_refactorisations=sum("fp64" in n for n in notes), damp_raised=sum("raising damp" in n for n in notes),
               max_layer_with_rerun_s=max(with_rerun, default=None), skipped_layers=list(skip_layers),
               layers=[dict(layer=m["layer"], total_s=layer_s(m), **m["times"],
                            peak_gib=m.get("peak_gpu_bytes", 0) / GiB) for m in res.layers])
    if digest:
        out["packed_digest"] = packed_digests(res.packed)
    log(f"  -> wall {wall:.1f} s; MoE layer {moe_mean:.2f} s (first {out['first_moe_layer_s']:.2f} s; slowest with a "
        f"re-run {out['max_layer_with_rerun_s'] or 0:.2f} s); "
        f"{out['per_expert_linear_s'] * 1e3:.1f} ms per expert linear; whole model "
        f"{'measured' if not num_layers else 'extrapolated'} {whole:.0f} s; H⁻¹ notes: "
        f"{out['fp64_refactorisations']} fp64 refactorisations, {out['damp_raised']} damping raises; "
        f"overlap {out['overlap']}")
    del res, model
    gc.collect()
    torch.cuda.empty_cache()
    return out


class textbook_settings:
    """The plain pipeline for the baseline: textbook H⁻¹ factor (Cholesky, inverse, Cholesky), lazy right-looking
    update, cuSOLVER Cholesky, and the layer's full forward in the capture."""

    def __enter__(self):
        self.saved = (gptq_mod.UPDATE, gptq_mod.INVERSE_FACTOR, gptq_mod.CHOLESKY, pipeline_mod.SKIP_ROUTED_EXPERTS)
        gptq_mod.UPDATE, gptq_mod.INVERSE_FACTOR, gptq_mod.CHOLESKY = "right", "inverse", "torch"
        pipeline_mod.SKIP_ROUTED_EXPERTS = False

    def __exit__(self, *exc):
        gptq_mod.UPDATE, gptq_mod.INVERSE_FACTOR, gptq_mod.CHOLESKY, pipeline_mod.SKIP_ROUTED_EXPERTS = self.saved


def baseline_layer(name: str, tokens: torch.Tensor, cfg: QuantConfig, log, ours: dict | None) -> dict:
    """One MoE layer quantized the plain way (module docstring), timed by the same stage clock."""
    n = 3 if name.startswith("deepseek") else 2  # DeepSeek's layer 0 is dense; one layer more for the re-run
    model = build_model(name, n)
    moe_layers = moe_shape(model)["moe_layers"]
    base = QuantConfig(**{**cfg.to_dict(), "gptq_backend": "torch", "hessian_backend": "torch", "expert_chunk": 1})
    gc.collect()
    torch.cuda.empty_cache()
    with textbook_settings():
        res = quantize_model(model, base, tokens, progress=False, overlap=False, end_layer=moe_layers[0] + 1)
    m = next(m for m in res.layers if m["layer"] in moe_layers)
    s = {k: m["times"][k] for k in STAGES}
    total = sum(s.values())
    out = dict(case=name, baseline_s=total, baseline_split=s,
               ours_s=ours["moe_layer_s"] if ours else None, ours_split=ours["split_s"] if ours else None)
    ratio = f" vs ours {ours['moe_layer_s']:.2f} s -> {total / ours['moe_layer_s']:.1f}x" if ours else ""
    log(f"  baseline {name}: {total:.2f} s ({' '.join(f'{k} {s[k]:.2f}' for k in STAGES)}){ratio}")
    del model, res
    gc.collect()
    torch.cuda.empty_cache()
    return out


def factor_bench(log) -> list[dict]:
    """Seconds of the H⁻¹ factorisations at real expert shapes (random SPD Hessians)."""
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


SOLVE_VARIANTS = {  # name: (update, Cholesky, Cholesky block)
    "previous (right, cuSOLVER)": ("right", "torch", 512),
    "left, cuSOLVER": ("left", "torch", 512),
    "left, blocked 256": ("left", "blocked", 256),
    "left, blocked 512": ("left", "blocked", 512),
    "left, blocked 1024": ("left", "blocked", 1024),
}


def _timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


SOLVE_SHAPES = (("mixtral down_proj", 8, 4096, 14336), ("mixtral gate_up_proj", 8, 28672, 4096))


def solve_bench(log, shapes=SOLVE_SHAPES, device="cuda", blocks=(256, 512, 1024)) -> list[dict]:
    """The GPTQ solve (W4 g128, bf16 scales) and the Cholesky alone at Mixtral's expert shapes, random Hessians."""
    from moequant.quant.quantizer import QuantSpec

    rows = []
    spec = QuantSpec(bits=4, group_size=128)
    saved = (gptq_mod.UPDATE, gptq_mod.CHOLESKY, gptq_mod.CHOLESKY_BLOCK)
    gen = torch.Generator(device=device).manual_seed(0)
    try:
        for label, B, R, C in shapes:
            A = torch.randn(B, C, C // 4, device=device, generator=gen) / C ** 0.5
            H = A @ A.mT  # rank C/4: the damping makes it definite, as with few routed tokens
            H.diagonal(dim1=-2, dim2=-1).add_(torch.rand(B, C, device=device, generator=gen))
            del A
            W = (torch.randn(B, R, C, device=device, generator=gen) * 0.02).to(torch.bfloat16)
            # the Cholesky alone: cuSOLVER (torch.linalg.cholesky_ex) vs blocked, and their difference
            Hd = H + 0.01 * H.diagonal(dim1=-2, dim2=-1).mean(-1)[:, None, None] * torch.eye(C, device=device)
            ref, t_ref = _timed(lambda: torch.linalg.cholesky_ex(Hd)[0])
            chol = {"cuSOLVER": t_ref}
            for nb in blocks:
                L, t = _timed(lambda: gptq_mod._cholesky_blocked(Hd.clone(), nb)[0])
                chol[f"blocked {nb}"] = t
                chol[f"blocked {nb} rel diff"] = ((L - ref).norm() / ref.norm()).item()
                del L
            ref = Hd = None
            log(f"  Cholesky {label} [{B}x{C}²]: " + ", ".join(f"{k} {v:.3g}" for k, v in chol.items()))
            runs = {}
            for name, (update, cholesky, nb) in SOLVE_VARIANTS.items():
                gptq_mod.UPDATE, gptq_mod.CHOLESKY, gptq_mod.CHOLESKY_BLOCK = update, cholesky, nb
                gptq_mod.gptq_quantize(W[:1, :256], H[:1], spec, scale_dtype=torch.bfloat16)  # warm-up
                res, t = _timed(lambda: gptq_mod.gptq_quantize(W, H, spec, scale_dtype=torch.bfloat16))
                runs[name] = (res, t)
            (ref_res, _) = runs["previous (right, cuSOLVER)"]
            ref_loss = gptq_mod.proxy_loss(W.float(), ref_res.weight, H)
            for name, (res, t) in runs.items():
                agree = (res.codes == ref_res.codes).float().mean().item()
                loss = (gptq_mod.proxy_loss(W.float(), res.weight, H) / ref_loss).max().item()
                rows.append(dict(shape=label, B=B, R=R, C=C, variant=name, seconds=t, codes_agree=agree,
                                 loss_ratio_max=loss, **{f"chol {k}": v for k, v in chol.items()}))
                log(f"  solve {label} [{B}x{R}x{C}] {name}: {t:.3f} s, codes agree {agree:.5f}, "
                    f"proxy loss / previous ≤ {loss:.5f}")
            runs = ref_res = W = H = None
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
    finally:
        gptq_mod.UPDATE, gptq_mod.CHOLESKY, gptq_mod.CHOLESKY_BLOCK = saved
    return rows


def markdown(meta: dict, cases: list[dict], baselines: list[dict], factors: list[dict], solves: list[dict]) -> str:
    L = [f"device: {meta['device']}; torch {meta['torch']}; {meta['date']}; GPTQ update '{meta.get('update')}', "
         f"Cholesky '{meta.get('cholesky')}' (block {meta.get('cholesky_block')})", f"command: `{meta['command']}`",
         f"calibration: {meta['samples']} x {meta['seq_len']} tokens, AGQ W4 g128, batch {meta['batch_size']}; "
         "per-layer columns: mean over the MoE layers after the first (which also pays Triton's JIT compiles; the "
         "re-run over those that have one: the last layer has none), s / MoE layer = their sum; stage seconds are "
         "what the run waits for; the copies overlapped with them are listed apart", "",
         "| model (layers run) | E | wall s | s / MoE layer | " + " | ".join(STAGES) +
         " | overlapped to GPU / back | ms / expert linear | whole model s | GPU-s / expert linear (whole) | "
         "peak GiB (est.) | fp64 / damp x10 |",
         "|---" * (10 + len(STAGES)) + "|"]
    for c in cases:
        kind = "measured" if c["whole_model_measured"] else "extrapolated"
        sp = c["split_s"]
        L.append(f"| {c['case']} ({c['layers_run']}/{c['layers_total']}) | {c['experts']} | {c['wall_s']:.1f} | "
                 f"{c['moe_layer_s']:.2f} | " + " | ".join(f"{sp[k]:.2f}" for k in STAGES) +
                 f" | {sp['overlapped_load']:.2f} / {sp['overlapped_write']:.2f}"
                 f" | {c['per_expert_linear_s'] * 1e3:.1f} | {c['whole_model_s']:.0f} ({kind}) | "
                 f"{c['whole_per_expert_linear_s']:.4f} | {c['peak_gib']:.1f} ({c['estimated_gib']:.1f}) | "
                 f"{c['fp64_refactorisations']} / {c['damp_raised']} |")
    for c in cases:
        L += ["", f"{c['case']} per layer (s){' — layers ' + str(c['skipped_layers']) + ' profiled, not in the means' if c.get('skipped_layers') else ''}:", "",
              "| layer | total | " + " | ".join(STAGES) + " | overlapped to GPU / back | peak GiB |",
              "|---" * (4 + len(STAGES)) + "|"]
        for m in c.get("layers", []):
            L.append(f"| {m['layer']} | {m['total_s']:.2f} | " + " | ".join(f"{m[k]:.2f}" for k in STAGES) +
                     f" | {m['overlapped_load']:.2f} / {m['overlapped_write']:.2f} | {m['peak_gib']:.1f} |")
    if baselines:
        L += ["", "Same-run baseline: one MoE layer, per-expert textbook GPTQ (Python column loop, Cholesky / inverse / "
              "Cholesky, lazy update), per-expert fp32 torch Hessians, full forward in the capture, no overlap.", "",
              "| one MoE layer | baseline s | ours s | speed-up | baseline split | ours split |", "|---|---|---|---|---|---|"]
        for b in baselines:
            sp = lambda d: " ".join(f"{k} {d[k]:.2f}" for k in STAGES)
            ours = f"{b['ours_s']:.2f}" if b["ours_s"] else "–"
            ratio = f"{b['baseline_s'] / b['ours_s']:.1f}x" if b["ours_s"] else "–"
            L.append(f"| {b['case']} | {b['baseline_s']:.2f} | {ours} | {ratio} | {sp(b['baseline_split'])} | "
                     f"{sp(b['ours_split']) if b['ours_split'] else '–'} |")
    if solves:
        L += ["", "GPTQ solve alone (W4 g128, bf16 scales, random Hessians; agreement and proxy loss against the "
              "previous default):", "", "| shape | variant | s | vs previous | codes agree | proxy loss ratio (max) |",
              "|---|---|---|---|---|---|"]
        prev = {r["shape"]: r["seconds"] for r in solves if r["variant"].startswith("previous")}
        for r in solves:
            L.append(f"| {r['shape']} [{r['B']}x{r['R']}x{r['C']}] | {r['variant']} | {r['seconds']:.3f} | "
                     f"{prev[r['shape']] / r['seconds']:.2f}x | {r['codes_agree']:.5f} | {r['loss_ratio_max']:.5f} |")
        seen = set()
        L += ["", "| Cholesky alone | " + " | ".join(k for k in solves[0] if k.startswith("chol ")) + " |",
              "|---" * (1 + sum(k.startswith("chol ") for k in solves[0])) + "|"]
        for r in solves:
            if r["shape"] not in seen:
                seen.add(r["shape"])
                L.append(f"| {r['shape']} | " + " | ".join(f"{r[k]:.3g}" for k in r if k.startswith("chol ")) + " |")
    if factors:
        L += ["", "| H⁻¹ factor | B x C | " + " | ".join(f"{h} s" for h in gptq_mod.FACTORISATIONS) + " |",
              "|---|---|" + "---|" * len(gptq_mod.FACTORISATIONS)]
        L += [f"| {f['shape']} | {f['B']} x {f['C']} | " + " | ".join(f"{f[h]:.3f}" for h in gptq_mod.FACTORISATIONS)
              + " |" for f in factors]
    return "\n".join(L)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", default="mixtral-8x7b:3,deepseek-v2-lite,qwen3-30b-a3b",
                    help="comma-separated name[:layers]; a bare name runs the whole model; '' runs none")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--baseline", default="", help="comma-separated shape names: the same-run baseline layer of each")
    ap.add_argument("--solve-bench", action="store_true", help="the GPTQ solve variants alone at Mixtral's shapes")
    ap.add_argument("--factor-bench", action="store_true")
    ap.add_argument("--no-overlap", action="store_true", help="move layers without overlapping the compute")
    ap.add_argument("--update", choices=gptq_mod.UPDATES, help="GPTQ catch-up rule (default: the package's)")
    ap.add_argument("--cholesky", choices=gptq_mod.CHOLESKIES, help="Cholesky (default: the package's)")
    ap.add_argument("--cholesky-block", type=int, help="columns per step of the blocked Cholesky")
    ap.add_argument("--profile-layer", type=int, help="run this layer of each case under torch.profiler")
    ap.add_argument("--hash", action="store_true", help="digests of the packed tensors in the JSON")
    ap.add_argument("--lanes", type=int, help="GPTQ solve lanes (pipeline.SOLVE_LANES)")
    ap.add_argument("--weights-back-pinned", action="store_true", help="pipeline.WEIGHTS_BACK_PINNED = True")
    ap.add_argument("--tag", default="", help="suffix of the output files")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_quantize needs a CUDA GPU")
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, "bench_quantize" + (f"_{args.tag}" if args.tag else ""))
    logf = open(stem + ".log", "a")

    def log(msg):
        print(msg, flush=True)
        logf.write(msg + "\n")
        logf.flush()

    gptq_mod.UPDATE = args.update or gptq_mod.UPDATE
    gptq_mod.CHOLESKY = args.cholesky or gptq_mod.CHOLESKY
    gptq_mod.CHOLESKY_BLOCK = args.cholesky_block or gptq_mod.CHOLESKY_BLOCK
    if args.lanes:
        pipeline_mod.SOLVE_LANES = args.lanes
    if args.weights_back_pinned:
        pipeline_mod.WEIGHTS_BACK_PINNED = True
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, date=datetime.date.today().isoformat(),
                command="python benchmarks/bench_quantize.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                samples=args.samples, seq_len=args.seq_len, batch_size=args.batch_size, update=gptq_mod.UPDATE,
                cholesky=gptq_mod.CHOLESKY, cholesky_block=gptq_mod.CHOLESKY_BLOCK,
                solve_lanes=getattr(pipeline_mod, "SOLVE_LANES", 1),
                weights_back_pinned=getattr(pipeline_mod, "WEIGHTS_BACK_PINNED", False),
                pipeline_file=pipeline_mod.__file__)
    log(str(meta))
    cfg = QuantConfig(method="agq", bits=4, group_size=128, batch_size=args.batch_size, device="cuda")
    cases, baselines, factors, solves = [], [], [], []

    def save():
        with open(stem + ".json", "w") as f:
            json.dump(dict(meta=meta, cases=cases, baselines=baselines, factors=factors, solves=solves), f, indent=1)
        with open(stem + ".md", "w") as f:
            f.write(markdown(meta, cases, baselines, factors, solves) + "\n")

    def tokens_for(name):
        vocab = real_config(name, 1).vocab_size
        return torch.randint(3, vocab, (args.samples, args.seq_len), generator=torch.Generator().manual_seed(0))

    if args.solve_bench:
        solves = solve_bench(log)
        save()
    if args.factor_bench:
        factors = factor_bench(log)
        save()
    want_baseline = list(filter(None, args.baseline.split(",")))
    for spec in filter(None, args.cases.split(",")):
        name, _, n = spec.partition(":")
        prof = contextlib.nullcontext()
        if args.profile_layer is not None:
            from quantize_profile import profiled_layer

            prof = profiled_layer(pipeline_mod, args.profile_layer,
                                  f"{stem}_profile_{name}_L{args.profile_layer}", log)
        with prof:
            cases.append(run_case(name, int(n) if n else None, tokens_for(name), case_config(name, cfg), log,
                                  overlap=False if args.no_overlap else None, digest=args.hash,
                                  skip_layers=() if args.profile_layer is None else (args.profile_layer,)))
        save()
        if name in want_baseline:  # right after its case: the ratio is in the results even if the run is cut short
            want_baseline.remove(name)
            baselines.append(baseline_layer(name, tokens_for(name), case_config(name, cfg), log, cases[-1]))
            save()
    for name in want_baseline:
        baselines.append(baseline_layer(name, tokens_for(name), case_config(name, cfg), log, None))
        save()
    log("\n" + markdown(meta, cases, baselines, factors, solves))


if __name__ == "__main__":
    main()
