"""The `moequant` command line: quantize, eval, export (bench: see benchmarks/)."""
from __future__ import annotations

import argparse
import copy
import logging
import os
import sys
import time

import torch

log = logging.getLogger("moequant")

DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CLIError(Exception):
    pass


def load_hf_model(path: str, dtype: str = "auto"):
    """A local HF checkpoint folder (moequant never downloads) -> (model, tokenizer or None)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress bars are per layer; keep stderr for errors
    if not os.path.isdir(path) or not os.path.isfile(os.path.join(path, "config.json")):
        raise CLIError(f"model folder {path!r} not found or has no config.json (moequant reads local folders only)")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype] or "auto", local_files_only=True)
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError):
        tok = None
    return model.eval(), tok


def load_model_for_quantization(path: str, dtype: str = "auto", low_cpu_mem="auto", copies: int = 1):
    """(model, tokenizer or None, layer source or None): the whole model, or (low_cpu_mem) a skeleton whose layers
    the pipeline reads from the checkpoint one at a time (`moequant.api.open_model`)."""
    from transformers import AutoTokenizer

    from .api import open_model

    if not os.path.isdir(path) or not os.path.isfile(os.path.join(path, "config.json")):
        raise CLIError(f"model folder {path!r} not found or has no config.json (moequant reads local folders only)")
    model, source = open_model(path, low_cpu_mem, DTYPES[dtype], copies=copies)
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError):
        tok = None
    return model, tok, source


def load_tokenizer(path):
    from transformers import AutoTokenizer

    if not os.path.isdir(path):
        raise CLIError(f"tokenizer folder {path!r} not found")
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def _table(rows, header):
    cols = [header] + [[str(c) for c in r] for r in rows]
    w = [max(len(r[i]) for r in cols) for i in range(len(header))]
    line = lambda r: "  ".join(c.rjust(w[i]) if i else c.ljust(w[i]) for i, c in enumerate(r))
    return "\n".join([line(cols[0]), "  ".join("-" * x for x in w)] + [line(r) for r in cols[1:]])


def cmd_quantize(a) -> int:
    from . import QuantConfig, quantize
    from .eval import compare, load_eval_windows

    ebss = {k: v for k, v in {"width": a.ebss_width, "tau": a.ebss_tau, "batch_size": a.ebss_batch_size}.items()
            if v is not None}
    cfg = QuantConfig(method=a.method, bits=a.bits, group_size=a.group_size, sym=not a.asym, mse_clip=a.mse_clip,
                      act_order=a.act_order, static_groups=a.static_groups, damp=a.damp, targets=tuple(a.targets),
                      calibration=a.calibration, empty_expert=a.empty_expert, affinity_power=a.affinity_power,
                      num_samples=a.num_samples, seq_len=a.seq_len, calib_file=a.calib_file,
                      batch_size=a.batch_size, seed=a.seed, device=a.device, rotate=a.rotate, ebss=ebss,
                      offload_activations=a.offload_activations, expert_chunk=a.expert_chunk,
                      memory_check=not a.no_memory_check, gptq_backend=a.gptq_backend)
    if a.calib_file and not os.path.isfile(a.calib_file):
        raise CLIError(f"calibration file {a.calib_file!r} not found")
    from .distributed import init_from_env

    sharding = init_from_env()  # under torchrun: this rank's share of the experts; otherwise one process
    lead = sharding.rank == 0
    if sharding.distributed and cfg.device in (None, "cuda") and torch.cuda.is_available():
        cfg.device = f"cuda:{torch.cuda.current_device()}"
    low = {"auto": "auto", "on": True, "off": False}[a.low_cpu_mem]
    model, tok, source = load_model_for_quantization(a.model, a.dtype, low, copies=1 if a.no_eval else 2)
    if a.tokenizer:
        tok = load_tokenizer(a.tokenizer)
    out = a.out or os.path.join("out", os.path.basename(os.path.normpath(a.model)) + f"-{a.method}-w{a.bits}")
    windows = None
    if source is not None and not a.no_eval and lead:
        print("moequant: the layers are read from the checkpoint one at a time (--low-cpu-mem), so the before/after "
              f"evaluation (which needs the float model in memory) is skipped; afterwards run: moequant eval {out} "
              f"--ref {a.model}", file=sys.stderr)
        a.no_eval = True
    if not a.no_eval and lead:
        if tok is None:
            raise CLIError("evaluation needs a tokenizer (the model folder has none): pass --tokenizer or --no-eval")
        ctx = min(a.eval_ctx, int(getattr(model.config, "max_position_embeddings", a.eval_ctx)))
        windows = load_eval_windows(tok, ctx, a.eval_file, a.eval_tokens)
        ref = copy.deepcopy(model)
    t0 = time.perf_counter()
    result = quantize(model, cfg, tokenizer=tok, output_dir=out, resume=a.resume, overwrite=a.overwrite,
                      progress=not a.quiet, sharding=sharding, layer_source=source)
    seconds = time.perf_counter() - t0
    if not lead:
        return 0
    print(f"\nquantized {a.model} with {a.method} W{a.bits} g{a.group_size} in {seconds:.1f} s -> {out}")
    t = result.times()
    print("time split (s): " + ", ".join(f"{k} {v:.2f}" for k, v in t.items()))
    empty = {m["layer"]: {k: v["empty_experts"] for k, v in m["experts"].items() if v.get("empty_experts")}
             for m in result.layers}
    empty = {k: v for k, v in empty.items() if v}
    if empty:
        print(f"experts with no calibration tokens (policy {cfg.empty_expert}): {empty}")
    if windows is not None:
        device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        r = compare(ref.to(device), model.to(device), windows)
        print(f"\nevaluation: {r['tokens']} tokens of {a.eval_file or 'moequant/data/eval_en.txt'} "
              f"(windows of {windows.shape[1]})")
        print(_table([["float", f"{r['ppl_ref']:.3f}", "0", "1.000"],
                      [f"{a.method} W{a.bits} g{a.group_size}", f"{r['ppl']:.3f}", f"{r['kl']:.4f}",
                       f"{r['top1']:.3f}"]], ["model", "perplexity", "KL(float‖q)", "top-1 agree"]))
    return 0


def cmd_eval(a) -> int:
    from .eval import compare, load_eval_windows, perplexity
    from .loading import load

    def open_any(path):
        if os.path.isfile(os.path.join(path, "config.json")) and '"moequant"' in open(os.path.join(path, "config.json")).read():
            return load(path), None
        return load_hf_model(path, a.dtype)

    model, tok = open_any(a.model)
    tok = load_tokenizer(a.tokenizer) if a.tokenizer else tok
    if tok is None:
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(a.model, local_files_only=True)
        except (OSError, ValueError):
            raise CLIError("no tokenizer in the model folder: pass --tokenizer PATH")
    ctx = min(a.eval_ctx, int(getattr(model.config, "max_position_embeddings", a.eval_ctx)))
    windows = load_eval_windows(tok, ctx, a.eval_file, a.eval_tokens)
    if a.ref:
        ref, _ = open_any(a.ref)
        r = compare(ref, model, windows)
        print(_table([["reference", f"{r['ppl_ref']:.3f}", "0", "1.000"],
                      ["model", f"{r['ppl']:.3f}", f"{r['kl']:.4f}", f"{r['top1']:.3f}"]],
                     ["model", "perplexity", "KL(ref‖model)", "top-1 agree"]))
    else:
        print(f"perplexity {perplexity(model, windows):.3f} on {windows.numel()} tokens (windows of {ctx})")
    return 0


def cmd_export(a) -> int:
    from .export import export_gptq

    if a.format != "gptq":
        raise CLIError(f"export format {a.format!r} is not supported (gptq)")
    export_gptq(a.checkpoint, a.out, overwrite=a.overwrite)
    print(f"exported {a.checkpoint} -> {a.out} (GPTQ format)")
    return 0


def cmd_bench(_a) -> int:
    print("benchmarks are scripts (they need a GPU): python benchmarks/bench_moe_gemm.py, bench_hessian.py, "
          "bench_dequant.py, bench_decode.py, bench_quantize.py, bench_ebss.py")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moequant", description="MoEQuant post-training quantization for MoE LLMs")
    sub = p.add_subparsers(dest="cmd", required=True)

    q = sub.add_parser("quantize", help="quantize a local HF MoE model folder")
    q.add_argument("model", help="local HF model folder (config.json + safetensors)")
    q.add_argument("--method", default="agq", help="rtn | gptq | agq | moequant (EBSS + AGQ)")
    q.add_argument("--bits", type=int, default=4, help="2, 3, 4 or 8")
    q.add_argument("--group-size", type=int, default=128, help="32, 64, 128 ... or -1 (per channel)")
    q.add_argument("--asym", action="store_true", help="asymmetric (zero points); default symmetric")
    q.add_argument("--mse-clip", action="store_true", help="search the clipping range minimising the error")
    q.add_argument("--act-order", action="store_true")
    q.add_argument("--static-groups", action="store_true")
    q.add_argument("--damp", type=float, default=0.01)
    q.add_argument("--targets", nargs="+", default=["experts", "shared", "attn", "dense"],
                   help="which linears: experts shared attn dense router")
    q.add_argument("--calibration", default="routed", help="routed | all-experts")
    q.add_argument("--empty-expert", default="rtn", help="policy for experts with no tokens: rtn | identity | error")
    q.add_argument("--affinity-power", type=int, default=1)
    q.add_argument("--num-samples", type=int, default=128, help="calibration sequences")
    q.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence (capped at the model context)")
    q.add_argument("--calib-file", help="calibration text (default: the package's English text)")
    q.add_argument("--tokenizer", help="tokenizer folder (default: the model folder)")
    q.add_argument("--ebss-width", type=int, help="EBSS beam width (paper: 4)")
    q.add_argument("--ebss-tau", type=float, help="EBSS balance temperature (paper: 1.2)")
    q.add_argument("--ebss-batch-size", type=int, help="EBSS sequences generated together (default 32)")
    q.add_argument("--rotate", choices=["hadamard"], help="offline Hadamard rotation before quantizing")
    q.add_argument("--batch-size", type=int, default=8)
    q.add_argument("--offload-activations", default="auto", choices=["auto", "on", "off"],
                   help="keep calibration activations in pinned CPU memory (auto: when they do not fit the GPU)")
    q.add_argument("--expert-chunk", type=int, default=0, help="experts solved together (0: automatic)")
    q.add_argument("--no-memory-check", action="store_true", help="skip the up-front GPU memory check")
    q.add_argument("--gptq-backend", default="auto", choices=["auto", "torch", "triton"])
    q.add_argument("--low-cpu-mem", default="auto", choices=["auto", "on", "off"],
                   help="read the decoder layers from the checkpoint's safetensors shards one at a time, so CPU RAM "
                        "holds about one layer plus the embeddings (auto: when the weights, twice over with the "
                        "before/after evaluation, exceed 80%% of the available RAM)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--device", help="cuda or cpu (default: cuda if available)")
    q.add_argument("--dtype", default="auto", choices=list(DTYPES))
    q.add_argument("--out", help="output folder (default out/<model>-<method>-w<bits>)")
    q.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    q.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    q.add_argument("--no-eval", action="store_true", help="skip the before/after evaluation")
    q.add_argument("--eval-file", help="evaluation text (default: the package's test-split English text)")
    q.add_argument("--eval-tokens", type=int, default=32768)
    q.add_argument("--eval-ctx", type=int, default=512)
    q.add_argument("--quiet", action="store_true")
    q.set_defaults(func=cmd_quantize)

    e = sub.add_parser("eval", help="perplexity (and KL / top-1 against --ref) on a text")
    e.add_argument("model", help="a moequant checkpoint or a local HF model folder")
    e.add_argument("--ref", help="reference (float) model folder for KL and top-1 agreement")
    e.add_argument("--tokenizer")
    e.add_argument("--eval-file")
    e.add_argument("--eval-tokens", type=int, default=32768)
    e.add_argument("--eval-ctx", type=int, default=512)
    e.add_argument("--dtype", default="auto", choices=list(DTYPES))
    e.set_defaults(func=cmd_eval)

    x = sub.add_parser("export", help="export a moequant checkpoint to another format")
    x.add_argument("checkpoint")
    x.add_argument("--format", default="gptq")
    x.add_argument("--out", required=True)
    x.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    x.set_defaults(func=cmd_export)

    b = sub.add_parser("bench", help="where the GPU benchmarks are")
    b.set_defaults(func=cmd_bench)
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="moequant: %(message)s")
    try:
        return args.func(args)
    except (CLIError, ValueError, FileNotFoundError, FileExistsError, RuntimeError) as e:
        if os.environ.get("MOEQUANT_DEBUG"):
            raise
        print(f"moequant: error: {e}", file=sys.stderr)  # one line; MOEQUANT_DEBUG=1 shows the traceback
        return 2


if __name__ == "__main__":
    sys.exit(main())
