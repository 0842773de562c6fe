"""Where one layer of `quantize_model` spends its time: torch.profiler around that layer, summarised by stage.

Used by `bench_quantize.py --profile-layer N`. The pipeline is instrumented from outside, through names its module
has had since v2 (`_quantize_one_layer`, `_StageClock`, `LayerCollector._timed`, and the functions it calls by
module-level name), so an older checkout of the pipeline is profiled the same way as the current one:

- each stage of the stage clock, each capture hook, and the named pieces (expert Hessians, the down_proj inputs,
  dense Hessians, GPTQ, packing, dequantization) become `record_function` ranges;
- the summary gives per stage: wall time, the union of GPU kernel time on all streams (busy) and its share of the
  wall time, the summed GPU time per range name (ranges of solve lanes overlap, so these may sum past the wall),
  the kernels by total time, and per host thread the CUDA API calls that block (syncs, pinned allocations, copies);
- the trace, stripped to GPU activity, annotations and the CUDA API calls over 20 µs, is written gzipped.
"""
from __future__ import annotations

import contextlib
import functools
import gzip
import json
import os
import tempfile
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile, record_function

# module-level names of the pipeline -> the label of their range (missing names are skipped)
RANGES = {
    "expert_hessians": "expert_hessians",
    "expert_intermediates": "down_inputs",
    "_dense_hessian": "dense_hessian",
    "gptq_quantize": "gptq",
    "to_packed": "to_packed",
    "dequantize": "dequantize",
}
GPU_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
API_CATS = ("cuda_runtime", "cuda_driver")


def _wrapped(fn, label):
    @functools.wraps(fn)
    def inner(*a, **k):
        with record_function(label):
            return fn(*a, **k)
    return inner


@contextlib.contextmanager
def profiled_layer(pipeline_mod, layer: int, out_prefix: str, log):
    """Inside this context, layer `layer` of every quantize_model call runs under the profiler; its summary is
    logged and written to OUT_PREFIX.txt, the stripped trace to OUT_PREFIX.json.gz."""
    saved = {}

    def patch(obj, name, new):
        saved[(obj, name)] = getattr(obj, name)
        setattr(obj, name, new)

    for name, label in RANGES.items():
        if hasattr(pipeline_mod, name):
            patch(pipeline_mod, name, _wrapped(getattr(pipeline_mod, name), label))
    clock_call = pipeline_mod._StageClock.__call__
    timed = pipeline_mod.LayerCollector._timed

    @contextlib.contextmanager
    def stage(self, name):
        with record_function(f"stage:{name}"), clock_call(self, name):
            yield

    @contextlib.contextmanager
    def hook(self):
        with record_function("hook"), timed(self):
            yield

    patch(pipeline_mod._StageClock, "__call__", stage)
    patch(pipeline_mod.LayerCollector, "_timed", hook)
    one_layer = pipeline_mod._quantize_one_layer

    def quantize_one_layer(i, *args, **kwargs):
        if i != layer:
            return one_layer(i, *args, **kwargs)
        cuda = torch.cuda.is_available()
        sync = torch.cuda.synchronize if cuda else (lambda: None)
        sync()
        with profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda) as prof:
            out = one_layer(i, *args, **kwargs)
            sync()
        summarise(prof, out_prefix, log)
        return out

    patch(pipeline_mod, "_quantize_one_layer", quantize_one_layer)
    try:
        yield
    finally:
        for (obj, name), val in saved.items():
            setattr(obj, name, val)


def _union(intervals) -> float:
    total, end = 0.0, -1.0
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def summarise(prof, out_prefix: str, log) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            trace = json.load(f)
    events = [e for e in trace["traceEvents"] if e.get("ph") == "X" and "dur" in e]
    threads = {e["tid"]: e["args"].get("name", "") for e in trace["traceEvents"]
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    stages = [(e["name"][len("stage:"):], e["ts"], e["ts"] + e["dur"]) for e in events
              if e.get("cat") == "user_annotation" and e["name"].startswith("stage:")]
    gpu = [e for e in events if e.get("cat") in GPU_CATS]
    lines = [f"profile of one layer: {len(gpu)} GPU activities; stage windows by the stage clock's ranges (it syncs "
             f"the compute stream at both ends); busy = union of kernel time on all streams"]
    for name, t0, t1 in stages:
        wall = (t1 - t0) / 1e3
        ks = [e for e in gpu if t0 <= e["ts"] < t1]
        kern = [e for e in ks if e["cat"] == "kernel"]
        busy = _union((e["ts"], e["ts"] + e["dur"]) for e in kern) / 1e3
        copies = sum(e["dur"] for e in ks if e["cat"] == "gpu_memcpy") / 1e3
        lines.append(f"\n== stage {name}: wall {wall:.1f} ms, GPU busy {busy:.1f} ms ({100 * busy / max(wall, 1e-9):.0f}%)"
                     f", kernels {len(kern)}, memcpy {copies:.1f} ms (all streams)")
        ranges = defaultdict(float)
        for e in events:
            if e.get("cat") == "gpu_user_annotation" and t0 <= e["ts"] < t1 and not e["name"].startswith("stage:"):
                ranges[e["name"]] += e["dur"] / 1e3
        if ranges:
            lines.append("  GPU span per range: " + ", ".join(f"{k} {v:.1f} ms" for k, v in
                                                               sorted(ranges.items(), key=lambda kv: -kv[1])))
        by = defaultdict(lambda: [0, 0.0])
        for e in kern:
            by[e["name"]][0] += 1
            by[e["name"]][1] += e["dur"] / 1e3
        for k, (n, ms) in sorted(by.items(), key=lambda kv: -kv[1][1])[:12]:
            lines.append(f"  {ms:8.1f} ms {n:6d}x  {k[:110]}")
        api = defaultdict(lambda: [0, 0.0])
        for e in events:
            if e.get("cat") in API_CATS and t0 <= e["ts"] < t1:
                key = (threads.get(e["tid"], str(e["tid"])), e["name"])
                api[key][0] += 1
                api[key][1] += e["dur"] / 1e3
        top = sorted(api.items(), key=lambda kv: -kv[1][1])[:8]
        lines.append("  CUDA API by thread: " + "; ".join(f"{t or '?'}: {n} {c}x {ms:.1f} ms" for (t, n), (c, ms) in top))
    text = "\n".join(lines)
    log(text)
    with open(out_prefix + ".txt", "w") as f:
        f.write(text + "\n")
    keep = [e for e in trace["traceEvents"] if e.get("ph") == "M" or (
        e.get("ph") == "X" and (e.get("cat") in GPU_CATS + ("user_annotation", "gpu_user_annotation")
                                or (e.get("cat") in API_CATS and e.get("dur", 0) > 20)))]
    with gzip.open(out_prefix + ".json.gz", "wt") as f:
        json.dump({"traceEvents": keep}, f)
