"""EBSS speed on a real-shaped MoE with random weights (GPU), and the balance it reaches.

    python benchmarks/bench_ebss.py [--shape deepseek-v2-lite] [--layers 27] [--num-sequences 128] [--seq-len 512]
        [--width 4] [--tau 1.2] [--batch-sizes 128,32] [--json out.json] [--time-budget 420]
    python benchmarks/bench_ebss.py --tiny   # CPU smoke run on a tiny DeepSeek-V2

Phases, in one process on one model (bf16 on the GPU):
  1. baseline: a plain decode with a DynamicCache over the same rows (batch_size * width) and steps, no hooks and
     no beam bookkeeping: what one forward per generated token costs by itself. --baseline replay (default) feeds
     EBSS's own output tokens, so the routing (and the grouped expert GEMMs' load) is EBSS's; --baseline greedy
     decodes argmax from random tokens, whose routing differs (random-weight greedy decoding repeats tokens);
  2. EBSS with the paper's defaults (w=4, tau=1.2, 128 x 512) at each batch size: sequences/s, ms per step, and the
     ratio to the baseline (the cost of hooks, top-k, sigma and cache reordering);
  3. plain beam search (tau = inf), same size: the same search without the balance term;
and the balance sigma (Eqs. 3-4) of each set next to uniformly random tokens of the same size (no text corpus on
the device; with random weights, sigma measures the router, not language). Phases past --time-budget are skipped.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import time

import torch
import transformers as T

from moequant.calib.balance import expert_load, format_load_table, load_stats
from moequant.calib.ebss import EBSSConfig, draw_start_tokens, ebss_generate
from moequant.models.configs import real_config, tiny_config


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


@torch.no_grad()
def greedy_decode_seconds(model, rows: int, steps: int, dev) -> float:
    """Plain decode of `rows` sequences for `steps` tokens with a DynamicCache (argmax; no hooks, no reordering)."""
    cache = T.DynamicCache(config=model.config)
    inp = torch.randint(3, model.config.vocab_size, (rows, 1), device=dev, generator=torch.Generator(dev).manual_seed(0))
    sync(dev)
    t0 = time.perf_counter()
    for _ in range(steps):
        inp = model(input_ids=inp, past_key_values=cache, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
    sync(dev)
    return time.perf_counter() - t0


@torch.no_grad()
def replay_decode_seconds(model, tokens: torch.Tensor, width: int, dev) -> float:
    """Plain decode that feeds given sequences [B, L] token by token (each repeated `width` times, so the rows match
    EBSS's): the same forwards and the same routing as the search, without hooks, top-k or cache reordering."""
    cache = T.DynamicCache(config=model.config)
    rows = tokens.to(dev).repeat_interleave(width, dim=0)
    sync(dev)
    t0 = time.perf_counter()
    for t in range(rows.shape[1] - 1):
        model(input_ids=rows[:, t:t + 1], past_key_values=cache, use_cache=True).logits[:, -1].argmax(-1)
    sync(dev)
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="deepseek-v2-lite")
    ap.add_argument("--layers", type=int, default=27, help="decoder layers (DeepSeek-V2-Lite has 27: 1 dense + 26 MoE)")
    ap.add_argument("--num-sequences", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--width", type=int, default=4)
    ap.add_argument("--tau", type=float, default=1.2)
    ap.add_argument("--batch-sizes", default="128,32", help="sequences per batch; EBSS runs once per value")
    ap.add_argument("--baseline", choices=("replay", "greedy"), default="replay",
                    help="replay: decode EBSS's own tokens (same routing; fair); greedy: argmax decode from random "
                         "tokens (its routing differs: random-weight greedy decoding repeats tokens)")
    ap.add_argument("--no-plain", action="store_true", help="skip the tau=inf beam search")
    ap.add_argument("--time-budget", type=float, default=420.0, help="seconds; later phases are skipped past it")
    ap.add_argument("--json", default=None)
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run on a tiny deepseek_v2")
    args = ap.parse_args()
    t_start = time.perf_counter()
    over = lambda: time.perf_counter() - t_start > args.time_budget  # noqa: E731

    if args.tiny:
        dev, dtype, cfg = torch.device("cpu"), torch.float32, tiny_config("deepseek_v2")
        desc = "tiny deepseek_v2 (CPU smoke run)"
    else:
        dev, dtype, cfg = torch.device("cuda"), torch.bfloat16, real_config(args.shape, args.layers)
        desc = f"{args.shape} shape, {args.layers} layers, random weights, bf16"
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with torch.device(dev):
        model = T.AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
    sync(dev)
    n_params = sum(p.numel() for p in model.parameters())
    device_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(f"{desc}: {n_params / 1e9:.2f} B params, built in {time.perf_counter() - t0:.1f} s on {device_name}",
          flush=True)

    # Warm-up (kernel selection, allocator) on a small problem.
    ebss_generate(model, EBSSConfig(num_sequences=2, seq_len=8, width=args.width, tau=args.tau, batch_size=2),
                  progress=False)
    greedy_decode_seconds(model, 8, 4, dev)

    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    base_kw = dict(num_sequences=args.num_sequences, seq_len=args.seq_len, width=args.width, seed=0)
    report = dict(device=device_name, date=datetime.date.today().isoformat(), model=desc, params_b=n_params / 1e9,
                  torch=torch.__version__, transformers=T.__version__, config=base_kw | {"tau": args.tau}, runs=[])
    rows_table, loads = [], {}

    def record(name, bs, seconds, res=None):
        steps = math.ceil(args.num_sequences / bs) * (args.seq_len - 1)
        r = dict(run=name, batch_size=bs, rows=bs * args.width, seconds=seconds, ms_per_step=1e3 * seconds / steps,
                 sequences_per_second=args.num_sequences / seconds,
                 peak_gib=torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None)
        if res is not None:
            r.update({k: res.params[k] for k in ("sigma_set", "sigma_per_sequence_mean", "nll_mean", "ppl")})
        report["runs"].append(r)
        rows_table.append(r)
        print(json.dumps(r), flush=True)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)  # peak per phase
        if args.json:  # written after every run, so a run cut short still leaves its numbers
            with open(args.json, "w") as f:
                json.dump(report, f, indent=2)

    for i, bs in enumerate(batch_sizes):
        if over():
            print(f"time budget reached: skipping batch size {bs}")
            break
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        # Baseline: the same number of forwards over the same rows, nothing else (one batch, times the batches).
        chunks = math.ceil(args.num_sequences / bs)
        if args.baseline == "greedy":
            record("greedy decode (baseline)", bs, chunks * greedy_decode_seconds(model, bs * args.width,
                                                                                   args.seq_len - 1, dev))
        res = ebss_generate(model, EBSSConfig(tau=args.tau, batch_size=bs, **base_kw), progress=False)
        record(f"EBSS tau={args.tau}", bs, res.params["seconds"], res)
        if args.baseline == "replay":
            record("replay decode (baseline)", bs, chunks * replay_decode_seconds(model, res.tokens[:bs], args.width,
                                                                                   dev))
        if i == 0:
            loads[f"EBSS tau={args.tau}"] = res.expert_load
            if not args.no_plain and not over():
                plain = ebss_generate(model, EBSSConfig(tau=math.inf, batch_size=bs, **base_kw), progress=False)
                record("beam search tau=inf", bs, plain.params["seconds"], plain)
                loads["beam search tau=inf"] = plain.expert_load

    if not over():
        start = draw_start_tokens(model.config, args.num_sequences * args.seq_len, seed=1)
        rand = start.view(args.num_sequences, args.seq_len)
        loads["uniform random tokens"] = expert_load(model, rand, batch_size=16)
    layer_ids = [i for i in range(cfg.num_hidden_layers) if i >= getattr(cfg, "first_k_dense_replace", 0)]
    report["load_stats"] = {k: load_stats(v, layer_ids) for k, v in loads.items()}

    print()
    print(f"{'run':<26} {'batch':>5} {'rows':>5} {'seconds':>8} {'ms/step':>8} {'seq/s':>7} {'x base':>7}"
          f" {'sigma':>8} {'ppl':>8} {'peak GiB':>8}")
    base = {r["batch_size"]: r["seconds"] for r in rows_table if "(baseline)" in r["run"]}
    for r in rows_table:
        ratio = r["seconds"] / base[r["batch_size"]]
        sig = f"{r['sigma_set']:.5f}" if "sigma_set" in r else "-"
        ppl = f"{r['ppl']:.1f}" if "ppl" in r else "-"
        peak = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "-"
        print(f"{r['run']:<26} {r['batch_size']:>5} {r['rows']:>5} {r['seconds']:>8.1f} {r['ms_per_step']:>8.2f}"
              f" {r['sequences_per_second']:>7.2f} {ratio:>7.2f} {sig:>8} {ppl:>8} {peak:>8}")
    print()
    print(format_load_table(loads, layer_ids))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
