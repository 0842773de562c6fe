"""Expert load of EBSS calibration against the same number of tokens of plain text, on the reference models.

    python benchmarks/ebss_balance.py            # prints the table, writes benchmarks/results/ebss_balance_<model>.png

For each model: σ (MoEQuant Eqs. 3-4) per MoE layer, min / max tokens per expert, experts with no tokens, and the
share of distinct token ids in the sequences (a repetition measure), for EBSS (paper defaults: width 4, τ 1.2) and for
random windows of the package's calibration text (train split).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from moequant.calib.balance import expert_load, format_load_table, plot_load  # noqa: E402
from moequant.calib.ebss import EBSSConfig, ebss_generate  # noqa: E402
from moequant.calib.text import text_calibration  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def distinct_share(tokens: torch.Tensor) -> float:
    return sum(len(set(t.tolist())) for t in tokens) / tokens.numel()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["tiny-mixtral", "tiny-qwenmoe"])
    p.add_argument("--num-samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for name in args.models:
        path = os.path.join(ROOT, "zoo", name)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True).eval()
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        ebss = ebss_generate(model, EBSSConfig(num_sequences=args.num_samples, seq_len=args.seq_len, seed=args.seed),
                             tokenizer=tok, progress=False).tokens
        text = text_calibration(tok, args.num_samples, args.seq_len, seed=args.seed)
        sources = {"EBSS": expert_load(model, ebss), "text": expert_load(model, text)}
        print(f"\n### {name}: {args.num_samples} × {args.seq_len} tokens per source, seed {args.seed}\n")
        print(format_load_table(sources))
        print(f"\ndistinct token ids per sequence (share): EBSS {distinct_share(ebss):.3f}, "
              f"text {distinct_share(text):.3f}")
        print("first EBSS sequence:", repr(tok.decode(ebss[0][:80])))
        out = os.path.join(ROOT, "benchmarks", "results", f"ebss_balance_{name}.png")
        plot_load(sources, out)
        print(f"plot: {os.path.relpath(out, ROOT)}")


if __name__ == "__main__":
    main()
