"""The quality table: every method on the project's trained reference models -> QUALITY.md + a plot.

    python benchmarks/quality.py                      # full grid (both models, 3 seeds) -> QUALITY.md, quality.png
    python benchmarks/quality.py --quick              # one seed, W3 only: a smoke run

Rows: float, RTN, GPTQ (text), AGQ (text), GPTQ (EBSS), MoEQuant (EBSS + AGQ), at W4 g128, W3 g128, W2 g64, with the
same number of calibration tokens for every method. Metrics on the test split (never used for training or
calibration): perplexity, mean KL(float ‖ quantized) per token, top-1 agreement. Calibration is random (text
windows, EBSS start tokens), so every calibrated cell runs with several seeds and reports mean ± spread
(half the max-min range). `--paper-grid` adds the paper's configuration (issue 9): per-channel symmetric W4/W3,
GPTQ and MoEQuant, with and without Hadamard rotation and MSE clipping.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from moequant import QuantConfig, quantize  # noqa: E402
from moequant.calib.text import text_calibration  # noqa: E402
from moequant.eval import compare, load_eval_windows  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
MODELS = {"tiny-mixtral": os.path.join(ROOT, "zoo", "tiny-mixtral"),
          "tiny-qwenmoe": os.path.join(ROOT, "zoo", "tiny-qwenmoe")}
SETTINGS = {"W4 g128": (4, 128), "W3 g128": (3, 128), "W2 g64": (2, 64)}
# (row label, method, calibration source)
ROWS = [("RTN", "rtn", None), ("GPTQ (text)", "gptq", "text"), ("AGQ (text)", "agq", "text"),
        ("GPTQ (EBSS)", "gptq", "ebss"), ("MoEQuant (EBSS + AGQ)", "agq", "ebss")]
PAPER_ROWS = [("GPTQ", "gptq", "text"), ("MoEQuant", "agq", "ebss")]
PAPER_VARIANTS = {"plain": {}, "+MSE clip": {"mse_clip": True}, "+rotation": {"rotate": "hadamard"},
                  "+rotation +MSE clip": {"rotate": "hadamard", "mse_clip": True}}


def load_model(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True).eval()
    return model, AutoTokenizer.from_pretrained(path, local_files_only=True)


def calib_tokens(source, model, tok, n, L, seed, cache):
    key = (source, seed)
    if key not in cache:
        if source == "text":
            cache[key] = text_calibration(tok, n, L, seed=seed)
        else:
            from moequant.calib.ebss import EBSSConfig, ebss_generate

            res = ebss_generate(model, EBSSConfig(num_sequences=n, seq_len=L, seed=seed), tokenizer=tok,
                                progress=False)
            cache[key] = res.tokens
    return cache[key]


def run_grid(name, path, args, rows, settings, variants, device):
    base, tok = load_model(path)
    ref = copy.deepcopy(base).to(device)
    ctx = min(args.eval_ctx, base.config.max_position_embeddings)
    windows = load_eval_windows(tok, ctx, None, args.eval_tokens)
    fp = compare(ref, ref, windows)
    out = {"float": {"ppl": fp["ppl"], "tokens": fp["tokens"]}, "cells": []}
    cache = {}
    for vname, extra in variants.items():
        for sname, (bits, group) in settings.items():
            for label, method, source in rows:
                seeds = [0] if source is None else list(range(args.seeds))
                runs = []
                for seed in seeds:
                    model = copy.deepcopy(base)
                    tokens = None if source is None else calib_tokens(source, base, tok, args.num_samples,
                                                                      args.seq_len, seed, cache)
                    cfg = QuantConfig(method=method, bits=bits, group_size=group, seed=seed, device=device,
                                      batch_size=args.batch_size, **extra)
                    t0 = time.perf_counter()
                    quantize(model, cfg, calib_tokens=tokens, progress=False)
                    r = compare(ref, model.to(device), windows)
                    r["seconds"] = time.perf_counter() - t0
                    runs.append(r)
                    del model
                cell = {"variant": vname, "setting": sname, "row": label, "seeds": seeds, "runs": runs}
                out["cells"].append(cell)
                print(f"{name:13s} {vname:20s} {sname:8s} {label:24s} " + _fmt(cell), flush=True)
    return out


def _ms(vals):
    m = statistics.fmean(vals)
    return m, (max(vals) - min(vals)) / 2


def _fmt(cell):
    parts = []
    for key, f in (("ppl", "{:.2f}"), ("kl", "{:.4f}"), ("top1", "{:.3f}")):
        m, s = _ms([r[key] for r in cell["runs"]])
        parts.append((f + " ± " + f).format(m, s) if len(cell["runs"]) > 1 else f.format(m))
    return " | ".join(parts)


def markdown(results, args, title):
    lines = [f"## {title}", "",
             f"Measured {datetime.date.today()} on {platform.node() or 'this machine'} "
             f"({'GPU ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'}), command: "
             f"`python benchmarks/quality.py {' '.join(sys.argv[1:])}`.",
             f"Calibration: {args.num_samples} sequences × {args.seq_len} tokens for every calibrated method "
             f"(text: random windows of moequant/data/calib_en.txt, train split; EBSS: self-generated, width 4, "
             f"τ 1.2). Evaluation: {args.eval_tokens} tokens of the test split in windows of {args.eval_ctx}. "
             f"Calibrated cells: mean ± half-range over seeds {list(range(args.seeds))}; RTN needs no seed.", ""]
    for name, res in results.items():
        lines += [f"### {name} (float perplexity {res['float']['ppl']:.2f})", "",
                  "| variant | setting | method | perplexity | KL(float‖q) | top-1 agree |",
                  "|---|---|---|---|---|---|"]
        for c in res["cells"]:
            ppl, kl, top = _fmt(c).split(" | ")
            lines.append(f"| {c['variant']} | {c['setting']} | {c['row']} | {ppl} | {kl} | {top} |")
        lines.append("")
    return "\n".join(lines)


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4), squeeze=False)
    for ax, (name, res) in zip(axes[0], results.items()):
        settings = list(dict.fromkeys(c["setting"] for c in res["cells"]))
        rows = list(dict.fromkeys(c["row"] for c in res["cells"]))
        w = 0.8 / len(rows)
        for i, row in enumerate(rows):
            vals = [statistics.fmean(r["kl"] for r in c["runs"]) for s in settings for c in res["cells"]
                    if c["setting"] == s and c["row"] == row and c["variant"] == "plain"]
            ax.bar([j + i * w for j in range(len(vals))], vals, w, label=row)
        ax.set_xticks([j + 0.4 - w / 2 for j in range(len(settings))], settings)
        ax.set_yscale("log")
        ax.set_ylabel("KL(float ‖ quantized), test split")
        ax.set_title(name)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--num-samples", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--eval-tokens", type=int, default=65536)
    p.add_argument("--eval-ctx", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--quick", action="store_true", help="one seed, W3 g128 only")
    p.add_argument("--paper-grid", action="store_true", help="per-channel W4/W3, with/without rotation + MSE clip")
    p.add_argument("--out", default=os.path.join(ROOT, "QUALITY.md"))
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=os.path.join(ROOT, "benchmarks", "quality.png"))
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.quick:
        args.seeds = 1
    if args.paper_grid:
        rows, settings, variants = PAPER_ROWS, {"W4 per-channel": (4, -1), "W3 per-channel": (3, -1)}, PAPER_VARIANTS
        title = "The paper's configuration: per-channel symmetric, rotation and MSE clipping"
    else:
        rows, variants = ROWS, {"plain": {}}
        settings = {"W3 g128": SETTINGS["W3 g128"]} if args.quick else SETTINGS
        title = "Methods on the reference models"
    results = {m: run_grid(m, MODELS[m], args, rows, settings, variants, device) for m in args.models}
    md = markdown(results, args, title)
    with open(args.out, "a" if os.path.exists(args.out) and args.paper_grid else "w") as f:
        f.write(("# Quality\n\n" if not args.paper_grid else "\n") + md + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    if not args.paper_grid:
        plot(results, args.plot)
    print(md)


if __name__ == "__main__":
    main()
