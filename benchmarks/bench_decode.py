"""Decode throughput: greedy generation tokens/s of a 4-bit quantized MoE model vs the same model in bf16.

A model of a real MoE's shapes with random weights (moequant.models.real_config; `--layers` to cut layers when
memory requires, and the table says so) is built on the GPU in bf16 and measured; then every target weight
(experts, shared experts, attention, dense MLP; router, embeddings and lm_head stay bf16) is RTN-quantized to
4 bits on the GPU, the model's modules are swapped for moequant.nn.QuantExperts / QuantLinear exactly as
`moequant.load` does, and the same runs are repeated. Random weights do not change the work per token.

Modes (each at every batch size):
  eager   `model.generate(..., do_sample=False)`: transformers' loop with its dynamic KV cache, as a user runs it.
          Decode tok/s = B * (N - 1) / (t(N new tokens) - t(1 new token)): the prefill is taken out.
  graph   a static KV cache and one decode step captured in a CUDA graph, replayed per token (greedy argmax in
          the graph). Shows the kernels' speed without Python / launch overhead. On CPU (tests) the same loop
          runs without the graph ("static").

    python benchmarks/bench_decode.py --shape deepseek-v2-lite --batch 1 16 --new-tokens 64 --json out.json
    python benchmarks/bench_decode.py --tiny deepseek_v2 --device cpu     # a seconds-long check of the script
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import sys
import time
import traceback

import torch

from moequant.models import get_adapter, real_config, tiny_config
from moequant.nn import install_quantized, prepare_for_device
from moequant.quant.quantizer import QuantSpec, quantize_rtn


def build_model(args, device):
    import transformers as T

    cfg = tiny_config(args.tiny) if args.tiny else real_config(args.shape, args.layers)
    with torch.device(device):
        model = T.AutoModelForCausalLM.from_config(cfg, dtype=args.dtype).eval()
    return model


def quantize_in_place(model, bits: int, group_size: int) -> dict:
    """RTN every target weight on the model's device and install the quantized modules (as moequant.load does)."""
    adapter = get_adapter(model)
    notes = {"group_size_fallback": []}
    dtype = next(model.parameters()).dtype
    for i, layer in enumerate(adapter.layers):
        prefix = adapter.layer_prefix(i)
        packed = {}

        def spec_for(name, in_features):
            g = group_size
            while g > 16 and in_features % g:
                g //= 2  # e.g. DeepSeek's dense 10944-wide down_proj: 128 does not divide it, 64 does
            if g != group_size:
                notes["group_size_fallback"].append(f"{name}: {g}")
            return QuantSpec(bits=bits, group_size=g, sym=True)

        for name, (mod, _kind) in adapter.linears(layer, ("attn", "dense", "shared")).items():
            w = mod.weight.data
            packed[f"{prefix}.{name}"] = quantize_rtn(w, spec_for(f"{prefix}.{name}", w.shape[1]), dtype)
        block = adapter.moe_block(layer)
        if block is not None:
            for pname in ("gate_up_proj", "down_proj"):
                w = getattr(block.experts, pname).data
                name = f"{prefix}.mlp.experts.{pname}"
                packed[name] = quantize_rtn(w, spec_for(name, w.shape[-1]), dtype)
        install_quantized(model, packed)  # the dense weights of this layer are freed here
        del packed
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return notes


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def eager_run(model, ids, n_new):
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new, min_new_tokens=n_new,
                              do_sample=False, pad_token_id=0)


def eager_decode(model, ids, n_new, device, repeats):
    eager_run(model, ids, 3)  # warm up (kernel compilation, allocator)
    times = {}
    for n in (1, n_new):
        best = float("inf")
        for _ in range(repeats):
            sync(device)
            t0 = time.perf_counter()
            out = eager_run(model, ids, n)
            sync(device)
            best = min(best, time.perf_counter() - t0)
        times[n] = best
    B = ids.shape[0]
    return {"tok_s": B * (n_new - 1) / (times[n_new] - times[1]), "ms_per_step": 1e3 * (times[n_new] - times[1]) /
            (n_new - 1), "prefill_plus_1_s": times[1]}, out[:, ids.shape[1]:]


def static_decode(model, ids, n_new, device, use_graph, repeats):
    """Greedy decode with a static KV cache; one decode step (forward + argmax) captured in a CUDA graph."""
    from transformers import StaticCache

    B, L = ids.shape
    with torch.no_grad():
        cache = StaticCache(config=model.config, max_cache_len=L + n_new + 1)
        out = model(input_ids=ids, past_key_values=cache, cache_position=torch.arange(L, device=device), use_cache=True)
        first = out.logits[:, -1].argmax(-1, keepdim=True)
        tok = first.clone()
        pos = torch.tensor([L], device=device)

        def step():
            o = model(input_ids=tok, past_key_values=cache, cache_position=pos, use_cache=True)
            return o.logits[:, -1].argmax(-1, keepdim=True)

        if use_graph:
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):  # warm-up on a side stream, as graph capture requires
                for _ in range(2):
                    step()
            torch.cuda.current_stream().wait_stream(s)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                nxt = step()
            run = graph.replay
        else:
            nxt = None

            def run():
                nonlocal nxt
                nxt = step()

        def generate():
            tok.copy_(first)
            pos.fill_(L)
            for layer in cache.layers:  # transformers' static layers count their own length on the device
                layer.cumulative_length.fill_(L)
            toks = [first]
            for _ in range(n_new - 1):
                run()
                toks.append(nxt.clone())
                tok.copy_(nxt)
                pos.add_(1)
            return torch.cat(toks, 1)

        generate()  # warm-up
        best = float("inf")
        for _ in range(repeats):
            sync(device)
            t0 = time.perf_counter()
            toks = generate()
            sync(device)
            best = min(best, time.perf_counter() - t0)
    return {"tok_s": B * (n_new - 1) / best, "ms_per_step": 1e3 * best / (n_new - 1)}, toks


def profile_step(model, ids, device, steps=3, top=8) -> dict:
    """Kernels of one decode step (static cache, no graph) under torch.profiler: how many, their summed GPU time,
    and the most expensive ones. Summed kernel time against the graph's step time says how busy the GPU is."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    from transformers import StaticCache

    B, L = ids.shape
    with torch.no_grad():
        cache = StaticCache(config=model.config, max_cache_len=L + steps + 4)
        out = model(input_ids=ids, past_key_values=cache, cache_position=torch.arange(L, device=device), use_cache=True)
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        pos = torch.tensor([L], device=device)
        model(input_ids=tok, past_key_values=cache, cache_position=pos, use_cache=True)  # warm-up
        sync(device)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                pos.add_(1)
                model(input_ids=tok, past_key_values=cache, cache_position=pos, use_cache=True)
            sync(device)
    kernels = [e for e in prof.key_averages() if e.device_type == DeviceType.CUDA]
    t = lambda e: getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
    kernels.sort(key=t, reverse=True)
    return {"kernels_per_step": sum(e.count for e in kernels) / steps,
            "kernel_us_per_step": sum(t(e) for e in kernels) / steps,
            "top": [(e.key[:240], round(t(e) / steps, 1), e.count // steps) for e in kernels[:top]]}


def measure(model, label, args, device, results):
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    for B in args.batch:
        ids = torch.randint(3, vocab, (B, args.prompt_len), generator=gen).to(device)
        for mode in args.modes:
            row = {"model": label, "batch": B, "mode": mode if (mode != "graph" or device.type == "cuda") else "static"}
            try:
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                if mode == "eager":
                    r, toks = eager_decode(model, ids, args.new_tokens, device, args.repeats)
                else:
                    r, toks = static_decode(model, ids, args.new_tokens, device, device.type == "cuda", args.repeats)
                row.update(r)
                row["tokens_head"] = toks[0, :8].tolist()
                if args.profile and mode == "graph" and device.type == "cuda":
                    try:
                        row["profile"] = profile_step(model, ids, device)
                    except Exception as e:  # the timing above stands without it
                        row["profile_error"] = f"{type(e).__name__}: {e}"
                if device.type == "cuda":
                    row["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
            except Exception as e:  # one failing mode must not lose the others' numbers
                row["error"] = f"{type(e).__name__}: {e}"
                traceback.print_exc()
            results.append(row)
            print(json.dumps(row), flush=True)


def weights_gib(model) -> float:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total / 2**30


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="deepseek-v2-lite", help="a moequant.models.real_config name")
    ap.add_argument("--tiny", default=None, help="use tiny_config(MODEL_TYPE) instead (CPU check of the script)")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: the real model's)")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--modes", nargs="+", default=["eager", "graph"], choices=["eager", "graph"])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--decode-max-tokens", type=int, default=None,
                    help="override moequant.nn.quant_experts.DECODE_MAX_TOKENS (decode kernel up to this many tokens)")
    ap.add_argument("--profile", action="store_true", help="profile one decode step of each graph run")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if args.decode_max_tokens is not None:
        import moequant.nn.quant_experts as qe

        qe.DECODE_MAX_TOKENS = args.decode_max_tokens
    args.dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    t0 = time.perf_counter()
    model = build_model(args, device)
    n_layers = model.config.num_hidden_layers
    meta = {"shape": args.tiny or args.shape, "layers": n_layers, "date": datetime.date.today().isoformat(),
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "command": " ".join(["python"] + sys.argv), "bits": args.bits,
            "group_size": args.group_size, "dtype": str(args.dtype)}
    from moequant.nn import decode_max_tokens

    meta["decode_max_tokens"] = decode_max_tokens()
    print(f"built {meta['shape']} ({n_layers} layers) in {time.perf_counter() - t0:.1f}s", flush=True)
    results = []
    meta["dense_weights_gib"] = weights_gib(model)
    meta["dense_experts_implementation"] = model.config._experts_implementation
    dense_label = str(args.dtype).replace("torch.", "").replace("bfloat16", "bf16")
    measure(model, dense_label, args, device, results)

    t0 = time.perf_counter()
    meta["quant_notes"] = quantize_in_place(model, args.bits, args.group_size)
    paths = prepare_for_device(model, args.dtype)
    meta["paths"] = [f"{n} x {kind}: {path} ({why})" for (kind, path, why), n in sorted(paths.items())]
    meta["quantize_s"] = time.perf_counter() - t0
    meta["w4_weights_gib"] = weights_gib(model)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        meta["w4_allocated_gib"] = torch.cuda.memory_allocated() / 2**30  # packed + kernel layouts
    measure(model, f"w{args.bits}a16", args, device, results)

    base = {(r["batch"], r["mode"]): r for r in results if r["model"] == dense_label and "tok_s" in r}
    for r in results:
        b = base.get((r["batch"], r["mode"]))
        if r["model"] != dense_label and b and "tok_s" in r:
            r["speedup_vs_bf16"] = r["tok_s"] / b["tok_s"]
    print(json.dumps(meta, indent=1))
    print(f"\n| model | batch | mode | decode tok/s | ms/step | vs {dense_label} | peak GPU mem GiB |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        if "tok_s" in r:
            print(f"| {r['model']} | {r['batch']} | {r['mode']} | {r['tok_s']:.1f} | {r['ms_per_step']:.2f} | "
                  f"{r.get('speedup_vs_bf16', 1.0):.2f}x | {r.get('peak_mem_gib', float('nan')):.1f} |")
        else:
            print(f"| {r['model']} | {r['batch']} | {r['mode']} | error: {r['error'][:120]} | | | |")
    for r in results:
        if "profile" in r:
            p = r["profile"]
            busy = p["kernel_us_per_step"] / (1e3 * r["ms_per_step"])
            print(f"\n{r['model']} batch {r['batch']}: {p['kernels_per_step']:.0f} kernels/step, "
                  f"{p['kernel_us_per_step'] / 1e3:.2f} ms of kernel time/step ({busy:.0%} of the graph step)")
            for name, us, n in p["top"]:
                print(f"   {us:8.1f} us  x{n:<4d} {name}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=1)
    return results


if __name__ == "__main__":
    main()
