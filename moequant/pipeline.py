"""Layer-by-layer quantization: capture → Hessians → solve → write back → re-run → next layer.

Only the current decoder layer and its calibration inputs live on the accelerator (the inputs may instead stay in
pinned CPU memory and stream over batch by batch: `offload_activations`). For each layer:
  load      put the layer on the accelerator (on CUDA: wait for the copy prefetched while the last layer computed)
  capture   run the layer on its inputs with hooks that accumulate, per linear, the Hessian its solve needs (the
            routed experts' own forward is skipped: their Hessians come from their inputs, and this pass's output
            is not used);
  hessian   (timed inside capture) for MoE blocks a pre-hook on the fused experts sees (hidden, top_k_index,
            top_k_weights) — the affinities the model itself applies — and accumulates per-expert Hessians of the
            gate_up and down inputs (one kernel per batch on CUDA)
  solve     GPTQ batched over a chunk of experts (and per dense linear); RTN for method=rtn
  write     write the dequantized packed weights back into the layer (and, across ranks, exchange them first), then
            hand the layer to the persister: packed weights (and the quantized layer) back to CPU memory and the
            checkpoint (the resume point); on CUDA the copies and the checkpoint write run in the background
  rerun     run the quantized layer on the same inputs: the next layer's inputs see quantized weights
Each stage's seconds (of the main thread: what the run waits for), the background seconds, the layer's peak GPU
memory and the up-front estimate of it go into the layer's metadata; the split is printed at the end of the run.

Overlap on CUDA (`LayerLoader`, `LayerPersister`): layer i+1 is copied to the GPU (pinned staging, side stream,
worker thread) and layer i-1 copied back (side stream into pinned staging, worker thread) while layer i computes.
Events order the streams; the GPU holds up to three layers' weights at once, which the memory plan checks first.
The pinned staging is allocated once, before the first layer (pinning stalls the GPU while it runs), and nothing
copies from the GPU into pageable memory while a layer computes (such a copy stalls the compute stream too).
The capture queues its batches without host syncs; the solve runs a layer's GPTQ jobs on two streams at once
(`SolveLanes`) and writes each W_hat straight into the layer; the re-run uses transformers' grouped experts forward
without its sentinel masking (`unmasked_grouped_experts`). All of it gives the same bits as one stream, synced.
The layers may also come straight from the checkpoint's shards (`moequant.streaming`), for models larger than CPU RAM.

Across processes (`moequant.distributed`) each rank accumulates and solves its own share of the layer's units
(expert chunks, dense linears) and the results are exchanged before the write-back; the one-process run is the
same code with one rank.
"""
from __future__ import annotations

import logging
import math
import sys
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from .config import QuantConfig
from .distributed import Sharding
from .models.adapter import ModelAdapter, MoEBlock, get_adapter
from .packing import PackedWeight, dequantize, packed_rows
from .quant.gptq import _matmul_precision, gptq_quantize, gptq_workspace_bytes
from .quant.hessian import dense_hessian_, expert_hessians, uses_kernel
from .quant.quantizer import rtn, to_packed
from .streaming import put_tensor

log = logging.getLogger("moequant")

STAGES = ("load", "capture", "hessian", "solve", "write", "rerun")
# Seconds spent in the background threads (overlapped with the stages above; not part of a layer's time).
OVERLAPPED = ("overlapped_load", "overlapped_write")
LINEAR_TARGETS = ("attn", "dense", "shared", "router")
GiB = 1 << 30


class InsufficientGPUMemoryError(MemoryError):
    pass


@dataclass
class QuantizationResult:
    model: nn.Module  # the model, weights replaced in place by their quantized values
    packed: dict[str, PackedWeight]  # parameter path (without .weight) -> packed weight (on CPU)
    config: QuantConfig
    layers: list[dict] = field(default_factory=list)  # per-layer metadata: times, token counts, decisions, memory
    calibration: dict = field(default_factory=dict)

    def times(self) -> dict[str, float]:
        """Seconds per stage over all layers (and the overlapped background seconds, `OVERLAPPED`)."""
        tot = defaultdict(float)
        for m in self.layers:
            for k, v in m["times"].items():
                tot[k] += v
        return dict(tot)


def _is_cuda(device) -> bool:
    return torch.device(device).type == "cuda"


def _sync(device):
    """Wait for the work queued on the current (compute) stream; transfers on the side streams go on."""
    if _is_cuda(device):
        torch.cuda.current_stream(device).synchronize()


class _StageClock:
    """Wall seconds per stage; synchronises the compute stream at each boundary so that work lands in the stage that
    queued it (the background transfers of `LayerLoader` / `LayerPersister` are not waited for)."""

    def __init__(self, device):
        self.device = device
        self.times = dict.fromkeys(STAGES, 0.0)

    @contextmanager
    def __call__(self, stage: str):
        _sync(self.device)
        t0 = time.perf_counter()
        yield
        _sync(self.device)
        self.times[stage] += time.perf_counter() - t0


# -- calibration inputs -------------------------------------------------------------------------------------------

class _StopForward(Exception):
    pass


def _to_host(t: torch.Tensor) -> torch.Tensor:
    """A pinned CPU copy (pinned, so the copies to and from the GPU are asynchronous DMA)."""
    if not t.is_cuda:
        return t
    dst = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    dst.copy_(t, non_blocking=True)
    return dst


def capture_layer_inputs(adapter: ModelAdapter, batches, device, offload: bool = False) -> list[tuple[torch.Tensor, dict]]:
    """Run the model up to its first decoder layer; return (hidden_states, layer kwargs) per batch.

    offload: keep the hidden states in pinned CPU memory (the kwargs — position embeddings, masks — stay on device).
    """
    backbone = adapter.backbone
    for name, child in backbone.named_children():
        if name != "layers":
            child.to(device)
    captured = []

    def grab(_mod, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append((_to_host(hidden) if offload else hidden,
                         {k: v for k, v in kwargs.items() if k != "hidden_states"}))
        raise _StopForward

    handle = adapter.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            for ids in batches:
                try:
                    backbone(input_ids=ids.to(device), use_cache=False)
                except _StopForward:
                    pass
    finally:
        handle.remove()
    _sync(device)
    return captured


class LayerInputs:
    """The calibration hidden states entering the current layer, one tensor per batch.

    On the accelerator, or (offload) in pinned CPU memory, copied over one batch at a time as the layer runs.
    """

    def __init__(self, batches: list[tuple[torch.Tensor, dict]], device, offload: bool):
        self.device, self.offload = torch.device(device), offload
        self.batches = [(self._keep(h), kw) for h, kw in batches]

    def _keep(self, h):
        return _to_host(h) if self.offload else h.to(self.device)

    def __iter__(self):
        for h, kw in self.batches:
            yield h.to(self.device, non_blocking=True), kw

    def __len__(self):
        return len(self.batches)

    def advance(self, layer: nn.Module) -> None:
        """Replace every batch by the layer's output on it (the next layer's inputs)."""
        self.batches = [(self._keep(_layer_out(layer(h, **kw))), kw) for h, kw in self]


def _layer_out(out):
    return out[0] if isinstance(out, tuple) else out


# -- moving layers: prefetch onto the accelerator, write back in the background --------------------------------------

@dataclass
class _Slot:
    """One tensor of a layer: its owner, where it lives in CPU memory (None when streamed), its accelerator copy."""

    name: str  # full name, e.g. model.layers.3.mlp.experts.down_proj
    mod: nn.Module
    attr: str
    is_param: bool
    persistent: bool
    home: torch.Tensor | None = None
    dev: torch.Tensor | None = None

    def current(self) -> torch.Tensor:
        return self.mod._parameters[self.attr] if self.is_param else self.mod._buffers[self.attr]


def _layer_slots(layer: nn.Module, prefix: str) -> list[_Slot]:
    out = []
    for mname, mod in layer.named_modules():
        full = f"{prefix}.{mname}." if mname else f"{prefix}."
        out += [_Slot(full + n, mod, n, True, True) for n, p in mod._parameters.items() if p is not None]
        out += [_Slot(full + n, mod, n, False, n not in mod._non_persistent_buffers_set)
                for n, b in mod._buffers.items() if b is not None]
    return out


def _pinned_empty(shape, dtype) -> torch.Tensor:
    """Page-locked CPU memory: DMA to and from the GPU without a bounce buffer, so copies can be asynchronous."""
    return torch.empty(shape, dtype=dtype, pin_memory=True)


class _PinnedArena:
    """Staging memory in page-locked CPU memory: one buffer, allocated once and reused by every layer.

    Pinning is slow (about 1-2 GB/s) and holds the driver's lock, which stalls the compute thread's launches: measured
    on the H100, a layer whose prefetch had to pin 2.8 GB of fresh staging took 1.7 s longer in its Hessian stage, and
    a layer whose write-back pinned the packed weights' first staging took 0.4 s longer in its capture. So the arena is
    sized up front (`reserve`, with the largest layer's bytes) before the layer loop, and each job takes its buffers
    from it in turn (`reset`, then `take`). A job that asks for more than the arena holds gets a fresh pinned buffer
    for the excess (logged), and the next `reset` grows the arena to what that job needed.
    """

    ALIGN = 512  # bytes: every buffer starts on a DMA-friendly boundary

    def __init__(self, name: str):
        self.name = name
        self.buf: torch.Tensor | None = None
        self.used = 0
        self.needed = 0

    @property
    def capacity(self) -> int:
        return 0 if self.buf is None else self.buf.numel()

    def reserve(self, nbytes: int) -> None:
        """Make the arena hold at least nbytes (only while no buffer taken from it is in use)."""
        if nbytes > self.capacity:
            self.buf = None  # the old block goes back to PyTorch's host cache before the new one is pinned
            self.buf = _pinned_empty((nbytes,), torch.uint8)

    def reset(self) -> None:
        """Start a new job: every buffer taken before is free again (the caller made sure its copies are done)."""
        if self.needed > self.capacity:
            log.info(f"pinned staging ({self.name}): growing from {_fmt_gib(self.capacity)} to "
                     f"{_fmt_gib(self.needed)}")
            self.reserve(self.needed)
        self.used = self.needed = 0

    def take(self, shape, dtype) -> torch.Tensor:
        n = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
        start = -(-self.used // self.ALIGN) * self.ALIGN
        self.used = self.needed = start + n
        if start + n > self.capacity:  # more than reserved: a fresh buffer now, a larger arena from the next job
            return _pinned_empty(tuple(shape), dtype)
        return self.buf[start:start + n].view(dtype).view(shape)


def _aligned(n: int) -> int:
    return -(-n // _PinnedArena.ALIGN) * _PinnedArena.ALIGN


def _tensor_bytes(layer: nn.Module) -> int:
    """Arena bytes of a layer's parameters and buffers (meta tensors included: only shapes are read)."""
    return sum(_aligned(t.numel() * t.element_size()) for t in list(layer.parameters()) + list(layer.buffers()))


def _target_shapes(layer: nn.Module, adapter: ModelAdapter, cfg: QuantConfig) -> list[torch.Size]:
    """Shapes of the weights the run quantizes in a layer ([out, in] linears, [E, out, in] experts)."""
    kinds = [k for k in LINEAR_TARGETS if k in cfg.targets]
    shapes = [m.weight.shape for m, _ in adapter.linears(layer, kinds).values()]
    block = adapter.moe_block(layer)
    if block is not None and "experts" in cfg.targets:
        shapes += [getattr(block.experts, n).shape for n in ("gate_up_proj", "down_proj")]
    return shapes


def packed_layer_bytes(layer: nn.Module, adapter: ModelAdapter, cfg: QuantConfig) -> int:
    """Bytes of a layer's packed weights (qweight, scales, zeros, g_idx), each buffer rounded up to the arena's
    alignment: what the write-back stages on its way to CPU memory."""
    spec = cfg.spec
    scale_bytes = next(layer.parameters()).element_size()
    total = 0
    for shape in _target_shapes(layer, adapter, cfg):
        *batch, R, C = shape
        B, G = math.prod(batch), spec.groups(C)
        parts = [B * packed_rows(C, spec.bits) * R * 4, B * G * R * scale_bytes]
        parts += [] if spec.sym else [B * G * R]
        parts += [B * C * 4] if cfg.act_order and not cfg.static_groups and cfg.method != "rtn" else []
        total += sum(_aligned(n) for n in parts)
    return total


# The write-back copies a finished layer's weights into the model's CPU tensors by DMA into pinned staging and then a
# CPU copy (True), or by a plain copy from the GPU into the pageable memory (False). Measured on the H100
# (bench_quantize_parts.py, 2026-11-25): while a 2.8 GB pageable device-to-host copy ran on a side stream, compute on
# the main stream ran ~6x slower (44 -> 255 ms for a capture-like loop), against ~1.0-1.3x for the pinned DMA and
# CPU copy; the pinned way costs a larger pinned arena (the layer's bytes more), pinned once before the first layer.
WEIGHTS_BACK_PINNED = True


def writeback_staging_bytes(adapter: ModelAdapter, cfg: QuantConfig, streamed: bool, start_layer: int = 0) -> int:
    """Pinned staging the write-back needs for its largest layer: the packed weights, and for a streamed layer also
    the tensors stored unquantized (the rest of its weights go straight back into the model's CPU tensors, or with
    `WEIGHTS_BACK_PINNED` through the staging too)."""
    need = 0
    for layer in list(adapter.layers)[start_layer:]:
        n = packed_layer_bytes(layer, adapter, cfg)
        if WEIGHTS_BACK_PINNED and not streamed:
            n += _tensor_bytes(layer)
        elif streamed:
            n += _tensor_bytes(layer) - sum(_aligned(math.prod(sh) * next(layer.parameters()).element_size())
                                            for sh in _target_shapes(layer, adapter, cfg))
        need = max(need, n)
    return need


class InMemoryLayers:
    """The default layer source: the model's layers are in CPU memory already and get the quantized values back."""

    streamed = False

    def fill(self, name, dst):  # pragma: no cover - every tensor is resident
        raise RuntimeError(f"{name} is on the meta device; a model with meta tensors needs a streamed layer source")


class LayerLoader:
    """Puts layer i's tensors on the accelerator. On CUDA the next layer is copied (pageable or checkpoint → pinned
    staging → GPU, on a side stream, from a background thread) while the current one computes: `prefetch(i + 1)`,
    then `take(i + 1)` only waits for what is left of the copy. Streamed layers are read from the checkpoint here."""

    def __init__(self, adapter: ModelAdapter, device, source, prefetch: bool):
        self.adapter, self.device, self.source = adapter, torch.device(device), source
        self.cuda = self.device.type == "cuda"
        self.prefetching = prefetch
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="moequant-load") if self.prefetching else None
        self.pending = None  # (layer index, future)
        self.staging = _PinnedArena("loads")
        self.last_copy = None  # event: the previous layer's copies out of `staging` are done

    @torch.no_grad()  # grad mode is per thread: the worker's must be off too
    def _load(self, i: int):
        t0 = time.perf_counter()
        slots = _layer_slots(self.adapter.layers[i], self.adapter.layer_prefix(i))
        if self.cuda:
            torch.cuda.set_device(self.device)
            if self.last_copy is not None:  # the staging buffers are about to be refilled
                self.last_copy.synchronize()
            self.staging.reset()
            if self.staging.buf is None:  # the largest layer's size at once: no layer pins more later
                self.staging.reserve(max(_tensor_bytes(l) for l in self.adapter.layers))
        for s in slots:
            cur = s.current()
            streamed = cur.device.type == "meta"
            s.home = None if streamed else cur.data  # the CPU memory itself (the parameter object will move)
            if not self.cuda:
                s.dev = self.source.fill(s.name, torch.empty(cur.shape, dtype=cur.dtype)) if streamed else s.home
                continue
            staging = self.staging.take(cur.shape, cur.dtype)
            self.source.fill(s.name, staging) if streamed else staging.copy_(cur)
            with torch.cuda.stream(self.stream):  # allocated for, and copied on, the side stream
                s.dev = torch.empty(cur.shape, dtype=cur.dtype, device=self.device)
                s.dev.copy_(staging, non_blocking=True)
        event = None
        if self.cuda:
            event = self.last_copy = torch.cuda.Event()
            event.record(self.stream)
        return slots, event, time.perf_counter() - t0

    def prefetch(self, i: int) -> None:
        if self.prefetching and i < len(self.adapter.layers) and self.pending is None:
            self.pending = (i, self.pool.submit(self._load, i))

    def take(self, i: int) -> tuple[list[_Slot], float]:
        """Layer i's tensors on the accelerator (the layer's parameters now point there); and the seconds spent
        copying them (in the background when prefetched)."""
        if self.pending is not None and self.pending[0] == i:
            slots, event, seconds = self.pending[1].result()
            self.pending = None
        else:
            slots, event, seconds = self._load(i)
        if event is not None:
            main = torch.cuda.current_stream(self.device)
            main.wait_event(event)
            for s in slots:
                s.dev.record_stream(main)  # freed later: not reused before the compute stream is done with it
        for s in slots:
            if s.dev is not s.current():
                put_tensor(s.mod, s.attr, s.is_param, s.dev)
        return slots, seconds

    def close(self) -> None:
        if self.pending is not None:
            self.pending[1].result()
            self.pending = None
        if self.pool is not None:
            self.pool.shutdown(wait=True)


class LayerPersister:
    """Takes a finished layer off the accelerator: packed weights (and, for a model in CPU memory, the quantized
    layer) go back to CPU memory, then `on_layer_done(i, packed, meta, state)` runs (the checkpoint writer).

    On CUDA this happens in the background, while the next layer computes: a worker thread queues the copies on a
    side stream behind an event that marks the end of the layer's compute — the packed weights into pinned staging
    (then into fresh pageable memory), the layer's quantized weights into pinned staging too and from there into
    the model's own CPU tensors (`WEIGHTS_BACK_PINNED`) — waits for them and calls `on_layer_done`. At most one
    layer is in flight; `drain()` waits for it and re-raises its errors. A streamed layer is released (meta device)
    at once: only its packed weights and the tensors stored unquantized (norms, router, ...) are copied.
    """

    def __init__(self, device, on_layer_done, result, keep_packed: bool, background: bool):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.on_layer_done, self.result, self.keep_packed = on_layer_done, result, keep_packed
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="moequant-write") if background else None
        self.pending = None
        self.staging = _PinnedArena("write-back")  # used by one job at a time (jobs run one after the other)

    def submit(self, i: int, slots: list[_Slot], packed: dict[str, PackedWeight], meta: dict, lead: bool) -> None:
        quantized = set(packed)
        stored_packed = lambda n: n in quantized or (n.endswith(".weight") and n[: -len(".weight")] in quantized)
        copies = []  # (device tensor, CPU destination or None, name for the state or None)
        for s in slots:
            keep = s.persistent and not stored_packed(s.name)
            if s.home is not None:  # the model's own CPU tensor gets the quantized values back
                if s.dev is not s.home:
                    copies.append((s.dev, s.home, None))
                    put_tensor(s.mod, s.attr, s.is_param, s.home)
            else:  # streamed: released now; what the checkpoint stores unquantized is copied first
                if keep:
                    copies.append((s.dev, None, s.name))
                put_tensor(s.mod, s.attr, s.is_param, torch.empty(s.dev.shape, dtype=s.dev.dtype, device="meta"))
        state_from_home = {s.name: s.home for s in slots if s.home is not None and s.persistent}
        packed = packed if lead else {}
        event = None
        if self.cuda:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
        job = (i, event, copies, packed, meta, state_from_home, lead)
        self.drain()
        if self.pool is not None:
            self.pending = self.pool.submit(self._run, *job)
        else:
            self._run(*job)

    @torch.no_grad()  # grad mode is per thread: the worker's must be off too
    def _run(self, i, event, copies, packed, meta, state, lead):
        t0 = time.perf_counter()
        fields = ("qweight", "scales", "qzeros", "g_idx")
        flat = [getattr(p, f) for p in packed.values() for f in fields if getattr(p, f) is not None]
        if self.cuda:
            torch.cuda.set_device(self.device)
            with torch.cuda.stream(self.stream):
                self.stream.wait_event(event)
                self.staging.reset()
                stage = lambda t: self.staging.take(t.shape, t.dtype).copy_(t, non_blocking=True)
                staged_packed = [stage(t) for t in flat]
                via_staging = WEIGHTS_BACK_PINNED  # the layer's own weights too: DMA, then a CPU copy into home
                staged = [stage(d) if home is None or via_staging else None for d, home, _ in copies]
                for d, home, _ in copies:  # the model's own (pageable) memory: a plain copy, this thread waits
                    if home is not None and not via_staging:
                        home.copy_(d)
            self.stream.synchronize()
            pageable = lambda t: torch.empty(t.shape, dtype=t.dtype).copy_(t)
        else:
            staged, staged_packed = [d for d, _, _ in copies], flat
            pageable = lambda t: t
        for (_, home, name), t in zip(copies, staged):
            if home is None:
                state[name] = pageable(t)
            elif t is not None:
                home.copy_(t)
        it = iter(pageable(t) for t in staged_packed)
        cpu = {k: PackedWeight(*(next(it) if getattr(p, f) is not None else None for f in fields), p.bits,
                               p.group_size) for k, p in packed.items()}
        del copies, staged, staged_packed, flat  # the accelerator copies can go
        if self.keep_packed:
            self.result.packed.update(cpu)
        if self.pool is not None:
            meta["times"]["overlapped_write"] = time.perf_counter() - t0
        if self.on_layer_done is not None and lead:
            self.on_layer_done(i, cpu, meta, state)

    def drain(self) -> None:
        if self.pending is not None:
            fut, self.pending = self.pending, None
            fut.result()

    def close(self) -> None:
        try:
            self.drain()
        finally:
            if self.pool is not None:
                self.pool.shutdown(wait=True)

# -- capture: Hessians from hooks ---------------------------------------------------------------------------------

def _experts_args(args, kwargs):
    names = ("hidden_states", "top_k_index", "top_k_weights")
    vals = list(args) + [kwargs[n] for n in names[len(args):]]
    return vals[0], vals[1], vals[2]


def expert_intermediates(experts: nn.Module, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor | None):
    """down_proj inputs act(x W_gate_j) ⊙ (x W_up_j) for every (token, routed expert) pair.

    Returns rows [N, I], their expert ids [N, 1] and weights [N, 1] (or None), grouped by expert and in (token, slot)
    order inside an expert, pairing each row with the affinity of the same (token, expert): MOEQUANT.md warns that
    mixing orders here is an easy bug. On CUDA one grouped GEMM over all experts (empty groups cost nothing);
    on CPU one matrix product per expert.
    """
    I = experts.down_proj.shape[-1]
    W = experts.gate_up_proj  # [E, 2I, H]
    E = W.shape[0]
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)  # pairs grouped by expert, (token, slot) order kept inside
    xs = x[order // ids.shape[1]]
    grouped = getattr(nn.functional, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
    if x.is_cuda and grouped is not None and x.dtype == W.dtype == torch.bfloat16:
        # group ends from the sorted ids: no host sync (torch.bincount reads its maximum back to size its output)
        ends = torch.searchsorted(flat[order], torch.arange(E, device=x.device), right=True)
        gu = grouped(xs, W.transpose(-2, -1), offs=ends.to(torch.int32))
    else:
        counts = torch.bincount(flat, minlength=E)
        gu = torch.empty(xs.shape[0], W.shape[1], dtype=x.dtype, device=x.device)
        start = 0
        for j, n in enumerate(counts.tolist()):
            if n:
                gu[start:start + n] = nn.functional.linear(xs[start:start + n], W[j])
                start += n
    rows = experts.act_fn(gu[:, :I]) * gu[:, I:]
    rw = None if weights is None else weights.reshape(-1)[order].unsqueeze(1)
    return rows, flat[order].unsqueeze(1), rw


def _dense_hessian(H: torch.Tensor, x: torch.Tensor, c: torch.Tensor | None, backend: str) -> None:
    """H += Σ_t c_t x_t x_tᵀ. On CUDA through the expert-Hessian kernel as one expert (bf16 tensor cores, fp32 sums,
    upper triangle only); the product of two bf16 numbers is exact in fp32, so without c only the summation order
    differs. With c: the Gram matrix of the rows x·√c rounded once to x's dtype (`sqrt_w`), PSD like the experts'."""
    x = x.reshape(-1, x.shape[-1])
    if uses_kernel(x, backend):
        ids = torch.zeros(x.shape[0], 1, dtype=torch.int64, device=x.device)
        w = None if c is None else c.reshape(-1, 1).float()
        expert_hessians(x, ids, w, 1, H.unsqueeze(0), torch.zeros(1, dtype=torch.int64, device=x.device),
                        backend=backend, sqrt_w=True)
    else:
        dense_hessian_(H, x, c)


def _count_into(counts: torch.Tensor, ids: torch.Tensor) -> None:
    """counts[e] += number of ids equal to e, without a host sync (torch.bincount on CUDA reads its maximum back)."""
    s = ids.reshape(-1).sort().values
    edges = torch.searchsorted(s, torch.arange(counts.numel() + 1, device=ids.device))
    counts += edges.diff()


SKIP_ROUTED_EXPERTS = True  # skip the routed experts' forward in the capture pass (see below)


@contextmanager
def routed_experts_skipped(block: MoEBlock | None):
    """The capture pass throws the layer's output away (the re-run recomputes it with quantized weights), and nothing
    after the routed experts in a decoder layer needs a Hessian: their own forward is skipped (it returns zeros).
    The experts' pre-hook still sees their inputs, top-k ids and weights; their Hessians are unchanged."""
    if block is None or not SKIP_ROUTED_EXPERTS:
        yield
        return
    block.experts.forward = lambda hidden_states, *args, **kwargs: torch.zeros_like(hidden_states)
    try:
        yield
    finally:
        del block.experts.forward


# The re-run computes the routed experts with transformers' grouped_mm forward minus its masking of expert-parallel
# sentinel rows (`unmasked_grouped_experts`): the same numbers, three fewer passes over the expert rows.
UNMASKED_RERUN = True


def _grouped_experts_forward(experts: nn.Module, hidden_states, top_k_index, top_k_weights):
    """transformers' `integrations.moe.grouped_mm_experts_forward` (5.x) for gated, concatenated, bias-free,
    untransposed experts, op for op, without its three `masked_fill` passes for expert-parallel sentinel ids (ids past
    the last expert): every id the router gives here is a real expert, so those passes (two of them over the
    [pairs, 2I] gate/up output, ~60 ms per Mixtral layer on the H100) change nothing. Same numbers, bit for bit
    (tests/test_scale.py compares the two on the GPU)."""
    num_top_k, num_tokens, hidden_dim = top_k_index.size(-1), hidden_states.size(0), hidden_states.size(-1)
    sample_weights = top_k_weights.reshape(-1)
    expert_ids = top_k_index.reshape(-1)
    expert_ids_g, perm = torch.sort(expert_ids)
    selected = hidden_states[perm // num_top_k]
    sample_weights_g = sample_weights[perm]
    E = experts.num_experts
    counted = expert_ids_g.float() if hidden_states.device.type in ("cpu", "mps") else expert_ids_g.int()
    offsets = torch.cumsum(torch.histc(counted, bins=E, min=0, max=E - 1), dim=0, dtype=torch.int32)
    gate_up, down = experts.gate_up_proj, experts.down_proj
    proj = nn.functional.grouped_mm(selected.to(gate_up.dtype), gate_up.transpose(-2, -1), offs=offsets)
    proj = experts._apply_gate(proj)
    proj = nn.functional.grouped_mm(proj.to(down.dtype), down.transpose(-2, -1), offs=offsets)
    weighted = proj * sample_weights_g.unsqueeze(-1)
    inv_perm = torch.empty_like(perm)
    inv_perm[perm] = torch.arange(perm.size(0), device=hidden_states.device)
    weighted = weighted[inv_perm]
    return weighted.view(num_tokens, num_top_k, hidden_dim).sum(dim=1).to(hidden_states.dtype)


def _runs_transformers_grouped_mm(experts: nn.Module) -> bool:
    """Whether the experts' forward is transformers' own grouped_mm one, on its torch.grouped_mm path, for the layout
    `_grouped_experts_forward` covers."""
    try:
        from transformers.integrations import moe as hf_moe

        w = experts.gate_up_proj
        return (getattr(experts.config, "_experts_implementation", None) == "grouped_mm"
                and hf_moe.ALL_EXPERTS_FUNCTIONS["grouped_mm"] is hf_moe.grouped_mm_experts_forward
                and getattr(experts, "has_gate", False) and not getattr(experts, "has_bias", True)
                and not getattr(experts, "is_transposed", True) and getattr(experts, "is_concatenated", False)
                and hasattr(nn.functional, "grouped_mm") and w.is_cuda
                and torch.cuda.get_device_capability(w.device) >= (8, 0))
    except (AttributeError, ImportError, KeyError):
        return False


@contextmanager
def unmasked_grouped_experts(block: MoEBlock | None):
    """Within: the block's routed experts run `_grouped_experts_forward` (where the model's experts forward is
    transformers' grouped_mm one; otherwise nothing changes)."""
    if block is None or not UNMASKED_RERUN or not _runs_transformers_grouped_mm(block.experts):
        yield
        return
    ex = block.experts
    ex.forward = lambda *args, **kwargs: _grouped_experts_forward(ex, *_experts_args(args, kwargs))
    try:
        yield
    finally:
        del ex.forward


class LayerCollector:
    """Hooks on one decoder layer that accumulate every Hessian its quantization needs.

    owned_experts / owned_linears: the share of one rank (default: everything). The Hessians of owned experts are
    stored in ascending expert order: H_gate_up[local], local = position in `owned_experts`.
    """

    def __init__(self, layer: nn.Module, adapter: ModelAdapter, cfg: QuantConfig, device,
                 owned_experts: list[int] | None = None, owned_linears: set[str] | None = None):
        self.cfg = cfg
        self.device = device
        self.block: MoEBlock | None = adapter.moe_block(layer)
        kinds = [k for k in LINEAR_TARGETS if k in cfg.targets]
        self.linears = {n: v for n, v in adapter.linears(layer, kinds).items()
                        if owned_linears is None or n in owned_linears}
        self.dense_H = {n: torch.zeros(m.weight.shape[1], m.weight.shape[1], device=device) for n, (m, _) in
                        self.linears.items()}
        self.dense_n = defaultdict(int)
        self.handles = []
        self._shared_c = None
        self._host_seconds = 0.0  # CPU: hook seconds by the host clock
        self._events = []  # CUDA: (start, end) events around each hook's work
        if self.block is not None and "experts" in cfg.targets:
            E, H, I = self.block.num_experts, self.block.experts.gate_up_proj.shape[-1], self.block.intermediate_size
            self.owned = list(range(E)) if owned_experts is None else sorted(owned_experts)
            self.local_of = None  # global -> local expert index, only when this rank owns a part
            if len(self.owned) < E:
                self.local_of = torch.full((E,), -1, dtype=torch.int64, device=device)
                self.local_of[self.owned] = torch.arange(len(self.owned), device=device)
            n = len(self.owned)
            self.H_gate_up = torch.zeros(n, H, H, device=device)
            self.H_down = torch.zeros(n, I, I, device=device)
            self.n_gate_up = torch.zeros(n, dtype=torch.int64, device=device)
            self.n_down = torch.zeros(n, dtype=torch.int64, device=device)
            self.tokens_per_expert = torch.zeros(E, dtype=torch.int64, device=device)  # all experts, on every rank
            self.handles.append(self.block.experts.register_forward_pre_hook(self._experts_hook, with_kwargs=True))
        weight_shared = (self.block is not None and self.block.shared_gate is not None and cfg.shared_affinity
                         and cfg.affinity_weighted)
        if weight_shared:  # Qwen2-MoE: the shared expert's output is scaled by sigmoid(shared_expert_gate(x))
            self.handles.append(self.block.module.register_forward_pre_hook(self._block_hook))
        for name, (mod, kind) in self.linears.items():
            use_c = weight_shared and kind == "shared"
            self.handles.append(mod.register_forward_pre_hook(self._dense_hook(name, use_c)))

    @contextmanager
    def _timed(self):
        """Time a hook's Hessian work. On CUDA by events on the compute stream, not host syncs: the capture then
        queues its batches without waiting for the GPU (a sync in every hook left the GPU idle while Python caught
        up). Read `hessian_seconds` after the stream has been synchronised."""
        if not _is_cuda(self.device):
            t0 = time.perf_counter()
            yield
            self._host_seconds += time.perf_counter() - t0
            return
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        yield
        end.record()
        self._events.append((start, end))

    @property
    def hessian_seconds(self) -> float:
        """Seconds of Hessian work in the hooks so far (GPU time between each hook's events on CUDA)."""
        return self._host_seconds + sum(s.elapsed_time(e) for s, e in self._events) / 1e3

    def _block_hook(self, _mod, args):
        x = args[0]
        self._shared_c = torch.sigmoid(self.block.shared_gate(x.reshape(-1, x.shape[-1]))).reshape(-1)

    def _dense_hook(self, name, use_c):
        def hook(_mod, args):
            with self._timed():
                x = args[0]
                _dense_hessian(self.dense_H[name], x, self._shared_c if use_c else None, self.cfg.hessian_backend)
                self.dense_n[name] += x.numel() // x.shape[-1]
        return hook

    def _experts_hook(self, mod, args, kwargs):
        with self._timed():
            x, ids, w = _experts_args(args, kwargs)
            x = x.reshape(-1, x.shape[-1])
            E = self.block.num_experts
            if self.cfg.calibration == "all-experts":
                ids = torch.arange(E, device=x.device).expand(x.shape[0], E)
                w = None
            elif self.cfg.affinity_weighted:
                w = w.float() ** self.cfg.affinity_power  # AGQ, Eq. 19: H_j = Σ_i c_ij x_i x_iᵀ
            else:
                w = None  # GPTQ: every routed token counts once
            _count_into(self.tokens_per_expert, ids)
            if self.local_of is not None:  # this rank's pairs only: one row per (token, expert) pair it owns
                t, s = torch.nonzero(self.local_of[ids] >= 0, as_tuple=True)  # (token, slot) order; a host sync
                x, ids, w = x[t], ids[t, s].unsqueeze(1), (None if w is None else w[t, s].unsqueeze(1))
            local = (lambda i: i) if self.local_of is None else (lambda i: self.local_of[i])
            n = len(self.owned)
            backend = self.cfg.hessian_backend
            # AGQ: the Gram matrices of the rows x·√w, one row per (token, expert) pair (`scaled_rows`); the kernel
            # forms them in its sorted order, the torch path in (token, slot) order
            expert_hessians(x, local(ids), w, n, self.H_gate_up, self.n_gate_up, backend=backend, sqrt_w=True)
            rows, rid, rw = expert_intermediates(mod, x, ids, w)
            expert_hessians(rows, local(rid), rw, n, self.H_down, self.n_down, backend=backend, sqrt_w=True)

    def remove(self):
        for h in self.handles:
            h.remove()
        self.handles = []


# -- solve --------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SolveUnit:
    """One piece of a layer's solve, done by one rank: a dense linear, or experts [a, b) (gate_up and down)."""

    index: int
    linear: str | None = None  # name relative to the layer
    experts: tuple[int, int] | None = None


def expert_chunk_size(cfg: QuantConfig, num_experts: int, world_size: int = 1) -> int:
    """Experts per batched GPTQ solve: `expert_chunk`, or ceil(E / world_size) (all of them in one process)."""
    return min(num_experts, cfg.expert_chunk or math.ceil(num_experts / world_size))


def solve_units(layer: nn.Module, adapter: ModelAdapter, cfg: QuantConfig, world_size: int = 1) -> list[SolveUnit]:
    """The layer's units in a fixed order: expert chunks, then dense linears. Unit u belongs to rank u % world."""
    units = []
    block = adapter.moe_block(layer)
    if block is not None and "experts" in cfg.targets:
        E = block.num_experts
        c = expert_chunk_size(cfg, E, world_size)
        units += [SolveUnit(len(units) + k, experts=(a, min(a + c, E))) for k, a in enumerate(range(0, E, c))]
    kinds = [k for k in LINEAR_TARGETS if k in cfg.targets]
    units += [SolveUnit(len(units) + k, linear=n) for k, n in enumerate(adapter.linears(layer, kinds))]
    return units


def _solve(W: torch.Tensor, H: torch.Tensor | None, cfg: QuantConfig):
    """Quantize W [B, R, C] with GPTQ (Hessians H [B, C, C]) or RTN (H None)
    -> (codes, scales, zeros, g_idx, notes, W_hat fp32 or None for RTN)."""
    if H is None:
        codes, scales, zeros = rtn(W, cfg.spec, W.dtype)
        return codes, scales, zeros, None, [], None
    r = gptq_quantize(W, H, cfg.spec, damp=cfg.damp, block_size=cfg.block_size, act_order=cfg.act_order,
                      static_groups=cfg.static_groups, scale_dtype=W.dtype, backend=cfg.gptq_backend)
    return r.codes, r.scales, r.zeros, r.g_idx, r.notes, r.weight


def _solve_stack(name: str, W: torch.Tensor, H: torch.Tensor | None, counts: torch.Tensor | None, cfg: QuantConfig):
    """`solve_experts`, and also GPTQ's dequantized weights W_hat (fp32 [E, R, C]; None for RTN or when the
    empty-expert policy replaced some experts' codes afterwards)."""
    E, R, C = W.shape
    record = {"empty_experts": [], "policy": None, "notes": []}
    w_hat = None
    if H is None:  # RTN
        codes, scales, zeros, g_idx, _, _ = _solve(W, None, cfg)
    else:
        empty = torch.nonzero(counts == 0).flatten().tolist()
        if empty:
            record["empty_experts"], record["policy"] = empty, cfg.empty_expert
            msg = f"{name}: experts {empty} received no calibration tokens"
            if cfg.empty_expert == "error":
                raise RuntimeError(f"{msg}. Use more calibration data, --calibration all-experts, or "
                                   f"--empty-expert rtn|identity")
            log.warning(f"{msg}; policy {cfg.empty_expert}")
            if cfg.empty_expert == "identity":
                H = H.clone()
                H[empty] = torch.eye(C, device=H.device)
        codes, scales, zeros, g_idx, notes, w_hat = _solve(W, H, cfg)
        if empty and cfg.empty_expert == "rtn":
            c2, s2, z2, _, _, _ = _solve(W[empty], None, cfg)
            codes[empty], scales[empty], zeros[empty] = c2, s2, z2.to(zeros.dtype)
            if g_idx is not None:
                g_idx[empty] = (torch.arange(C, device=W.device) // cfg.spec.group_of(C)).to(g_idx.dtype)
            w_hat = None
        record["notes"] = notes
    return to_packed(codes, scales, zeros, cfg.spec, g_idx), record, w_hat


def solve_experts(name: str, W: torch.Tensor, H: torch.Tensor | None, counts: torch.Tensor | None, cfg: QuantConfig):
    """Quantize a stack of experts [E, R, C]; apply the empty-expert policy. Returns (packed, record)."""
    p, record, _ = _solve_stack(name, W, H, counts, cfg)
    return p, record


@dataclass(frozen=True)
class _SolveJob:
    """One weight of a unit: a dense linear, or the gate_up / down stack of the unit's experts."""

    unit: SolveUnit
    name: str  # name relative to the layer (a linear's, or mlp.experts.gate_up_proj / down_proj)


def _solve_jobs(units: list[SolveUnit]) -> list[_SolveJob]:
    return [_SolveJob(u, n) for u in units
            for n in ([u.linear] if u.linear is not None else ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])]


# The GPTQ result's W_hat goes straight into the layer when it is bit for bit what dequantizing the packed weight
# gives: (code − zero)·scale is exact in fp32 for 16-bit scales and codes of ≤ 8 bits, and fp32 models multiply the
# same fp32 operands, so both round once, alike, to the model dtype. The write stage then skips that dequantization.
_EXACT_W_HAT = (torch.bfloat16, torch.float16, torch.float32)


def _solve_job(layer: nn.Module, prefix: str, job: _SolveJob, collector: LayerCollector | None,
               adapter: ModelAdapter, cfg: QuantConfig, write: bool) -> tuple[PackedWeight, dict, bool]:
    """GPTQ (or RTN) of one job -> (packed, record, whether W_hat was written into the layer's weight)."""
    gptq = cfg.method != "rtn"
    unit = job.unit
    with torch.no_grad():
        if unit.linear is not None:
            W = layer.get_submodule(unit.linear).weight.data
            H = collector.dense_H[unit.linear].unsqueeze(0) if gptq else None
            counts = torch.tensor([collector.dense_n[unit.linear]], device=W.device) if gptq else None
            p, rec, w_hat = _solve_stack(f"{prefix}.{unit.linear}", W.unsqueeze(0), H, counts, cfg)
            p, rec = _unbatch(p), {"tokens": 0 if counts is None else collector.dense_n[unit.linear]} | rec
        else:
            a, b = unit.experts
            pname = job.name.rsplit(".", 1)[-1]
            hname = {"gate_up_proj": "H_gate_up", "down_proj": "H_down"}[pname]
            la = collector.owned.index(a) if gptq else 0  # local position of expert a in this rank's Hessians
            W = getattr(adapter.moe_block(layer).experts, pname).data[a:b]
            H = getattr(collector, hname)[la:la + b - a] if gptq else None
            counts = collector.tokens_per_expert[a:b] if gptq else None
            p, rec, w_hat = _solve_stack(f"{prefix}.{job.name}[{a}:{b}]", W, H, counts, cfg)
            rec["empty_experts"] = [a + j for j in rec["empty_experts"]]
            if counts is not None:
                rec["tokens_per_expert"] = counts.tolist()
        written = write and w_hat is not None and w_hat.dtype == torch.float32 and W.dtype in _EXACT_W_HAT
        if written:
            W.copy_(w_hat.view(W.shape))
    return p, rec, written


def solve_unit(layer: nn.Module, prefix: str, unit: SolveUnit, collector: LayerCollector | None,
               adapter: ModelAdapter, cfg: QuantConfig) -> dict[str, tuple[PackedWeight, dict]]:
    """GPTQ (or RTN) of one unit -> {name relative to the layer: (packed, record)}."""
    out = {}
    for job in _solve_jobs([unit]):
        p, rec, _ = _solve_job(layer, prefix, job, collector, adapter, cfg, write=False)
        out[job.name] = (p, rec)
    return out


def _job_shape(layer: nn.Module, adapter: ModelAdapter, job: _SolveJob) -> tuple[int, int, int]:
    """(matrices, rows, columns) of a job's weight."""
    if job.unit.linear is not None:
        return (1, *layer.get_submodule(job.unit.linear).weight.shape)
    R, C = getattr(adapter.moe_block(layer).experts, job.name.rsplit(".", 1)[-1]).shape[1:]
    return job.unit.experts[1] - job.unit.experts[0], R, C


def _job_seconds(layer: nn.Module, adapter: ModelAdapter, job: _SolveJob, cfg: QuantConfig) -> float:
    """A rough GPTQ time for scheduling: the Cholesky (C³/3) and catch-up (R·C²) multiply-adds of each matrix at
    ~30 TFLOP/s (fp32), plus ~0.5 ms per block of columns (the inner loop's launches; small solves are all this)."""
    B, R, C = _job_shape(layer, adapter, job)
    return B * C * C * (C / 3 + R) / 30e12 + math.ceil(C / cfg.block_size) * 5e-4


# On CUDA a layer's solve jobs run on this many streams at once, when the memory plan leaves room for that many
# solve workspaces side by side (`SolveLanes`); 1 = one after the other.
SOLVE_LANES = 2


class SolveLanes:
    """Runs a layer's solve jobs on several CUDA streams at once: this thread on the compute stream, the others on
    worker threads with side streams. GPTQ's small pieces (per-block launches, small Cholesky panels, B=1 dense
    solves) leave most of the GPU idle, so a second job fills it. Jobs go longest first onto the least-loaded lane.
    Every job runs the same kernels on the same inputs as it would alone: the results are bit for bit the same.
    (On CPU the lanes are plain threads; the pipeline uses lanes on CUDA only.)
    `solve_layer` runs jobs of shapes it has not seen before one after the other (their kernels compile then, on one
    thread), and stops using the lanes after an out-of-memory error (`usable`).
    """

    def __init__(self, device, lanes: int):
        self.device, self.lanes = torch.device(device), lanes
        self.cuda = self.device.type == "cuda"
        self.seen: set = set()  # job shapes solved before
        self.usable = True
        self.streams = [torch.cuda.Stream(self.device) if self.cuda else None for _ in range(lanes - 1)]
        self.pool = ThreadPoolExecutor(lanes - 1, thread_name_prefix="moequant-solve")
        if self.cuda:  # PyTorch loads its CUDA linear-algebra library on first use, and two threads doing that at once
            eye = torch.eye(2, device=self.device)  # fail ("lazy wrapper should be called at most once"): load it here
            torch.linalg.cholesky_ex(eye)
            torch.linalg.solve_triangular(eye, eye, upper=True)

    def run(self, jobs: list, fn, seconds) -> None:
        loads, plan = [0.0] * self.lanes, [[] for _ in range(self.lanes)]
        for job in sorted(jobs, key=seconds, reverse=True):
            k = min(range(self.lanes), key=loads.__getitem__)
            plan[k].append(job)
            loads[k] += seconds(job)
        main = torch.cuda.current_stream(self.device) if self.cuda else None
        ready = None
        if self.cuda:
            ready = torch.cuda.Event()
            ready.record(main)  # the Hessians are complete
        # TF32 is a process-wide switch that every GPTQ call sets and restores: held off here for the whole solve,
        # so that one lane restoring a caller's setting cannot switch it on under another
        with _matmul_precision(False):
            futures = [self.pool.submit(self._lane, stream, ready, part, fn)
                       for stream, part in zip(self.streams, plan[1:]) if part]
            error = None
            try:
                for job in plan[0]:
                    fn(job)
            except BaseException as e:  # noqa: BLE001 - re-raised below, after the other lanes are done
                error = e
            for f in futures:
                try:
                    done = f.result()
                    if done is not None:
                        main.wait_event(done)
                except BaseException as e:  # noqa: BLE001
                    error = error or e
        if error is not None:
            raise error

    @torch.no_grad()  # grad mode is per thread
    def _lane(self, stream, ready, jobs, fn):
        if not self.cuda:
            for job in jobs:
                fn(job)
            return None
        torch.cuda.set_device(self.device)
        with torch.cuda.stream(stream):
            stream.wait_event(ready)
            try:
                for job in jobs:
                    fn(job)
            except BaseException:
                stream.synchronize()  # nothing of this lane's is still running when its error reaches the loop
                raise
            done = torch.cuda.Event()
            done.record(stream)
        return done

    def close(self) -> None:
        self.pool.shutdown(wait=True)


def solve_layer(layer: nn.Module, prefix: str, units: list[SolveUnit], collector: LayerCollector | None,
                adapter: ModelAdapter, cfg: QuantConfig, lanes: SolveLanes | None = None, write: bool = True
                ) -> tuple[dict[int, dict], set[tuple[int, str]]]:
    """Solve the given units -> ({unit: {name: (packed, record)}}, the (unit, name) whose W_hat is in the layer).

    write: put each GPTQ W_hat into the layer as soon as it is solved (where exact, `_EXACT_W_HAT`).
    lanes: run the jobs side by side on several streams (`SolveLanes`); None runs them one after the other.
    """
    jobs = _solve_jobs(units)
    results = {}

    def run(job):
        results[job] = _solve_job(layer, prefix, job, collector, adapter, cfg, write)

    shapes = {_job_shape(layer, adapter, j) for j in jobs}
    if lanes is not None and lanes.usable and len(jobs) > 1 and shapes <= lanes.seen:
        try:
            lanes.run(jobs, run, lambda j: _job_seconds(layer, adapter, j, cfg))
        except torch.OutOfMemoryError:
            lanes.usable = False
            log.warning("out of GPU memory with GPTQ solves side by side: the jobs left, and every later layer's, "
                        "are solved one after the other")
    if len(results) < len(jobs) and lanes is not None and lanes.cuda:
        torch.cuda.empty_cache()
    for job in jobs:  # one after the other: without lanes, a job an out-of-memory error stopped, new shapes
        if job not in results:
            run(job)
    if lanes is not None:
        lanes.seen |= shapes
    solved, written = {u.index: {} for u in units}, set()
    for job in jobs:  # in unit order, as before: the metadata keeps its order
        p, rec, w = results[job]
        solved[job.unit.index][job.name] = (p, rec)
        if w:
            written.add((job.unit.index, job.name))
    return solved, written


# -- write back ---------------------------------------------------------------------------------------------------

def write_back(layer: nn.Module, prefix: str, units: list[SolveUnit], solved: dict[int, dict], adapter: ModelAdapter,
               written: set[tuple[int, str]] = frozenset()) -> tuple[dict[str, PackedWeight], dict]:
    """Put the dequantized packed weights into the layer (what is in the model is exactly what was packed).

    written: (unit, name) pairs whose values the solve already put into the layer (`solve_layer`): not redone.
    Returns the layer's packed weights by parameter path (expert chunks joined into one [E, ...] tensor each) and
    its metadata.
    """
    packed, meta = {}, {"experts": {}, "linears": {}}
    chunks = defaultdict(list)
    with torch.no_grad():
        for unit in sorted(units, key=lambda u: u.linear is None):  # linears first, then experts (stable order)
            for name, (p, rec) in solved[unit.index].items():
                done = (unit.index, name) in written
                if unit.linear is not None:
                    W = layer.get_submodule(name).weight
                    if not done:
                        W.data.copy_(dequantize(p, W.dtype))
                    packed[f"{prefix}.{name}"] = p
                    meta["linears"][name] = {"tokens": rec["tokens"]} | _slim(
                        {k: v for k, v in rec.items() if k != "tokens"})
                    continue
                a, _ = unit.experts
                W = layer.get_parameter(name)
                E, R, C = p.qweight.shape[0], p.out_features, p.in_features
                step = max(1, (1 << 27) // (R * C))  # experts at a time: unpacking makes int64 [step, C, R]
                for j in range(0, E if not done else 0, step):
                    k = min(j + step, E)
                    W.data[a + j:a + k].copy_(dequantize(_slice(p, j, k), W.dtype))
                chunks[name].append((p, rec))
    block = adapter.moe_block(layer)
    for name, parts in chunks.items():
        p = _concat([q for q, _ in parts])
        recs = [r for _, r in parts]
        rec = {"empty_experts": [e for r in recs for e in r["empty_experts"]],
               "policy": next((r["policy"] for r in recs if r["policy"]), None),
               "notes": [n for r in recs for n in r["notes"]]}
        out = _slim(rec)
        if "tokens_per_expert" in recs[0]:
            out["tokens_per_expert"] = [t for r in recs for t in r["tokens_per_expert"]]
        packed[f"{prefix}.{name}"] = p
        meta["experts"][name.rsplit(".", 1)[-1]] = out
    assert block is not None or not chunks
    return packed, meta


def _slice(p: PackedWeight, a: int, b: int) -> PackedWeight:
    ix = lambda t: None if t is None else t[a:b]
    return PackedWeight(p.qweight[a:b], p.scales[a:b], ix(p.qzeros), ix(p.g_idx), p.bits, p.group_size)


def _index(p: PackedWeight, j: int) -> PackedWeight:
    ix = lambda t: None if t is None else t[j]
    return PackedWeight(p.qweight[j], p.scales[j], ix(p.qzeros), ix(p.g_idx), p.bits, p.group_size)


def _concat(parts: list[PackedWeight]) -> PackedWeight:
    if len(parts) == 1:
        return parts[0]
    cat = lambda f: None if getattr(parts[0], f) is None else torch.cat([getattr(q, f) for q in parts])
    return PackedWeight(cat("qweight"), cat("scales"), cat("qzeros"), cat("g_idx"), parts[0].bits,
                        parts[0].group_size)


def _unbatch(p: PackedWeight) -> PackedWeight:
    return _index(p, 0)


def _slim(rec):
    return {k: v for k, v in rec.items() if v}


def quantize_layer(layer: nn.Module, prefix: str, collector: LayerCollector | None, adapter: ModelAdapter,
                   cfg: QuantConfig) -> tuple[dict[str, PackedWeight], dict]:
    """Solve every target weight of one layer (one process) and write the quantized values back in place."""
    units = solve_units(layer, adapter, cfg)
    solved, written = solve_layer(layer, prefix, units, collector, adapter, cfg)
    return write_back(layer, prefix, units, solved, adapter, written)


# -- memory -------------------------------------------------------------------------------------------------------

def estimate_layer_memory(layer: nn.Module, adapter: ModelAdapter, cfg: QuantConfig, *, num_tokens: int,
                          batch_tokens: int, offload: bool, sharding: Sharding = Sharding(),
                          solve_lanes: int = 1) -> dict[str, int]:
    """Peak accelerator bytes of quantizing one layer, by part (an estimate: ±20%).

    weights      the layer's parameters
    hessians     fp32: C² per owned dense linear; E_own·(H² + I²) for the owned experts (gate_up, down)
    activations  the hidden states entering the layer and leaving it during the re-run (2·T·H), or two batches
                 when offloaded
    forward      one batch through the layer: the experts' gate_up / activation / down-input rows (T_b·k·(3I + H))
                 and attention temporaries (~8·T_b·H), in the activation dtype (assumes SDPA/flash attention)
    solve        the largest owned weight's GPTQ workspace (`gptq_workspace_bytes`) and its int64 packing
                 transient; with `solve_lanes` > 1 the sum of that many of the largest (`SolveLanes`)
    peak = weights + hessians + activations + max(forward, solve)
    """
    p0 = next(layer.parameters())
    act = p0.element_size()
    hidden = adapter.model.config.hidden_size
    weights = sum(p.numel() * p.element_size() for p in layer.parameters())
    units = solve_units(layer, adapter, cfg, sharding.world_size)
    mine = [u for u in units if sharding.mine(u.index)]
    gptq = cfg.method != "rtn"
    hessians = 0
    solves = [0]
    block = adapter.moe_block(layer)
    for u in mine:
        if u.linear is not None:
            R, C = layer.get_submodule(u.linear).weight.shape
            B = 1
            shapes = [(R, C)]
        else:
            B = u.experts[1] - u.experts[0]
            shapes = [tuple(getattr(block.experts, n).shape[1:]) for n in ("gate_up_proj", "down_proj")]
        for R, C in shapes:
            hessians += B * C * C * 4 if gptq else 0
            solves.append((gptq_workspace_bytes(B, R, C) if gptq else B * R * C * 4) + 8 * B * R * C)
    solve = sum(sorted(solves, reverse=True)[:max(1, solve_lanes)])
    if block is not None:
        k = getattr(block.router, "top_k", None) or getattr(adapter.model.config, "num_experts_per_tok", 1)
        I = block.intermediate_size
        forward = batch_tokens * k * (3 * I + hidden) * act + 8 * batch_tokens * hidden * act
    else:
        inter = max((m.weight.shape[0] for n, (m, _) in adapter.linears(layer, ["dense"]).items()), default=hidden)
        forward = batch_tokens * (3 * inter + 8 * hidden) * act
    activations = 0 if not gptq else 2 * (batch_tokens if offload else num_tokens) * hidden * act
    parts = {"weights": weights, "hessians": hessians, "activations": activations, "forward": forward,
             "solve": solve}
    parts["peak"] = weights + hessians + activations + max(forward, solve)
    return parts


def _fmt_gib(n: int) -> str:
    return f"{n / GiB:.1f} GiB"


def plan_memory(adapter: ModelAdapter, cfg: QuantConfig, *, num_tokens: int, batch_tokens: int, device,
                sharding: Sharding = Sharding(), start_layer: int = 0) -> tuple[bool, list[dict]]:
    """Decide whether calibration activations are offloaded and check that every layer fits, before any work.

    Returns (offload, per-layer estimates). Raises InsufficientGPUMemoryError naming the option that makes it fit.
    Only checked on CUDA (free memory from the driver, less 1 GiB of headroom).
    """
    layers = list(adapter.layers)[start_layer:]

    def estimates(offload, chunk=None, batch=batch_tokens):
        c = cfg if chunk is None else _replace(cfg, expert_chunk=chunk)
        return [estimate_layer_memory(l, adapter, c, num_tokens=num_tokens, batch_tokens=batch, offload=offload,
                                      sharding=sharding) for l in layers]

    want = cfg.offload_activations
    if not _is_cuda(device) or not layers:
        return want == "on", estimates(want == "on") if layers else []
    free = _free_bytes(device)
    fits = lambda est: max(e["peak"] for e in est) <= free
    plain = estimates(want == "on")
    if want == "auto" and not fits(plain):
        off = estimates(True)
        if fits(off):
            log.info(f"calibration activations ({_fmt_gib(plain[0]['activations'])} per layer) do not fit next to "
                     f"the layer on the GPU: keeping them in pinned CPU memory (offload_activations=auto)")
            return True, off
    if fits(plain) or not cfg.memory_check:
        return want == "on", plain
    worst = max(plain, key=lambda e: e["peak"])
    parts = ", ".join(f"{k} {_fmt_gib(v)}" for k, v in worst.items() if k != "peak")
    msg = (f"a layer needs about {_fmt_gib(worst['peak'])} of GPU memory ({parts}), but {_fmt_gib(free)} are free "
           f"(less 1 GiB of headroom).")
    # the options that fit, mildest first: the largest expert chunk, the largest batch, activations kept on the GPU
    fixes = []
    E = max((b.num_experts for _, b in adapter.moe_blocks()), default=0)
    chunk0 = expert_chunk_size(cfg, E, sharding.world_size) if E else 0
    candidates = [(c, bt, off) for c in sorted({chunk0} | {c for c in (64, 32, 16, 8, 4, 2, 1) if c < chunk0},
                                                 reverse=True)
                  for bt in (batch_tokens, batch_tokens // 2, batch_tokens // 4) if bt >= 1
                  for off in dict.fromkeys((want == "on", True))]
    for chunk, bt, off in candidates:
        if fits(estimates(off, chunk if E else None, bt)):
            fixes = ["--offload-activations"] if off and want != "on" else []
            fixes += [f"--expert-chunk {chunk}"] if E and chunk != chunk0 else []
            fixes += [f"--batch-size {max(1, cfg.batch_size * bt // batch_tokens)}"] if bt != batch_tokens else []
            break
    if fixes:
        msg += " It fits with " + " ".join(fixes) + "."
    else:
        msg += (" No single-GPU setting fits: shard the experts over more GPUs with torchrun "
                "(Hessians and solves are split across ranks).")
    msg += " (--no-memory-check skips this check.)"
    raise InsufficientGPUMemoryError(msg)


def check_group_sizes(adapter: ModelAdapter, cfg: QuantConfig, start_layer: int = 0) -> None:
    """Fail before any work if the group size does not divide the input dim of a weight the run would quantize."""
    if cfg.group_size == -1:
        return
    kinds = [k for k in LINEAR_TARGETS if k in cfg.targets]
    dims = {}
    for i in range(start_layer, len(adapter.layers)):
        layer = adapter.layers[i]
        for name, (mod, _) in adapter.linears(layer, kinds).items():
            dims.setdefault(mod.weight.shape[1], f"{adapter.layer_prefix(i)}.{name}")
        block = adapter.moe_block(layer)
        if block is not None and "experts" in cfg.targets:
            for pname in ("gate_up_proj", "down_proj"):
                dims.setdefault(getattr(block.experts, pname).shape[-1], f"{adapter.layer_prefix(i)}.mlp.experts.{pname}")
    bad = {d: n for d, n in dims.items() if d % cfg.group_size}
    if bad:
        d, name = next(iter(bad.items()))
        ok = [g for g in (128, 64, 32) if all(k % g == 0 for k in dims)]
        hint = f"--group-size {ok[0]}" if ok else "--group-size -1 (per channel)"
        raise ValueError(f"group size {cfg.group_size} does not divide the input dim {d} of {name}; use {hint}, "
                         f"or leave that kind of linear out of --targets")


def _replace(cfg: QuantConfig, **kw) -> QuantConfig:
    from dataclasses import replace

    return replace(cfg, **kw)


# -- the loop -----------------------------------------------------------------------------------------------------

def _free_bytes(device) -> int:
    """Free accelerator bytes: the driver's, plus what PyTorch's allocator holds cached but unused, less 1 GiB."""
    dev = torch.device(device)
    return torch.cuda.mem_get_info(dev)[0] + torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev) - GiB


def quantize_model(model: nn.Module, cfg: QuantConfig, calib_tokens: torch.Tensor | None, *, progress: bool = True,
                   start_layer: int = 0, layer_inputs=None, on_layer_done=None,
                   sharding: Sharding | None = None, layer_source=None, overlap: bool | None = None,
                   keep_packed: bool = True, end_layer: int | None = None) -> QuantizationResult:
    """The layer-by-layer loop. `calib_tokens` LongTensor [N, L] (unused for rtn).

    sharding: this process's place among torchrun ranks (moequant.distributed.init_from_env); None = one process.
    In a distributed run every rank calls this with the same model and tokens; rank 0 alone calls `on_layer_done`
    and keeps the packed weights in the result.
    on_layer_done(i, packed, meta, state): called once layer i is finished, with its packed weights and the rest of
    its tensors (`state`, by full name), all in CPU memory. With overlap it runs on a worker thread, one layer at a
    time and in order; the loop waits for the last one before it returns.
    layer_source: where the layers' tensors come from: None, the model itself (in CPU memory); or a
    `moequant.streaming.StreamedLayers` for a model whose layers are on the meta device, read from the checkpoint
    one at a time and released (back to meta) once written. The result's model then holds no layer weights.
    overlap: on CUDA, prefetch the next layer onto the GPU and copy finished layers back in the background while the
    current one computes (None: whenever the memory plan leaves room for two more layers' weights). On CPU it is off
    unless asked for (True: streamed layers are read and finished layers written by worker threads).
    keep_packed: keep every layer's packed weights in the result (False: only `on_layer_done` sees them).
    end_layer: stop before this layer (benchmarks: time some layers of a model, each with its re-run).
    """
    adapter = get_adapter(model)
    sharding = sharding or Sharding()
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    source = layer_source or InMemoryLayers()
    result = QuantizationResult(model, {}, cfg)
    model.eval()
    needs_data = cfg.method != "rtn"
    layers = adapter.layers
    check_group_sizes(adapter, cfg, start_layer)
    n_tokens = calib_tokens.numel() if calib_tokens is not None else 0
    seq = calib_tokens.shape[1] if calib_tokens is not None else 0
    offload, estimates = plan_memory(adapter, cfg, num_tokens=n_tokens, batch_tokens=cfg.batch_size * seq,
                                     device=device, sharding=sharding, start_layer=start_layer)
    if device.type != "cuda":
        overlap = bool(overlap)  # on CPU only when asked (worker threads, no copies to overlap)
    elif estimates:
        room = _free_bytes(device) - max(e["peak"] for e in estimates) - 2 * max(e["weights"] for e in estimates)
        if overlap is None:
            overlap = room >= 0 or not cfg.memory_check
            if not overlap:
                log.info("no GPU memory left for two more layers' weights: layers are moved on and off the GPU "
                         "without overlapping the compute")
    extra = 2 * max((e["weights"] for e in estimates), default=0) if overlap else 0  # prefetched + being written
    lanes = None
    if device.type == "cuda" and needs_data and SOLVE_LANES > 1 and estimates:
        wide = [estimate_layer_memory(l, adapter, cfg, num_tokens=n_tokens, batch_tokens=cfg.batch_size * seq,
                                      offload=offload, sharding=sharding, solve_lanes=SOLVE_LANES)
                for l in list(layers)[start_layer:]]
        if _free_bytes(device) - max(e["peak"] for e in wide) - extra >= 0:
            estimates, lanes = wide, SolveLanes(device, SOLVE_LANES)
        else:
            log.info(f"no GPU memory for {SOLVE_LANES} GPTQ solves side by side: a layer's weights are solved one "
                     f"after the other")
    loader = LayerLoader(adapter, device, source, prefetch=bool(overlap))
    persister = LayerPersister(device, on_layer_done, result, keep_packed, background=bool(overlap))
    if persister.cuda:  # pinned now, before any layer computes (pinning stalls the compute thread's launches)
        persister.staging.reserve(writeback_staging_bytes(adapter, cfg, getattr(source, "streamed", False),
                                                          start_layer))
    try:
        loader.prefetch(start_layer)  # the first layer's copy overlaps the embedding forward
        inputs = None
        if needs_data:
            raw = layer_inputs if layer_inputs is not None else capture_layer_inputs(
                adapter, calib_tokens.split(cfg.batch_size), device, offload=offload)
            inputs = LayerInputs(raw, device, offload)
        bar = tqdm(range(start_layer, end_layer or len(layers)), desc=f"quantize ({cfg.method}, W{cfg.bits})",
                   disable=not progress or sharding.rank != 0, unit="layer")
        for i in bar:
            _quantize_one_layer(i, adapter, cfg, device, sharding, inputs, loader, persister, result,
                                offload, estimates[i - start_layer]["peak"] + extra, overlap=bool(overlap),
                                lanes=lanes)
        persister.drain()
    finally:
        loader.close()
        persister.close()
        if lanes is not None:
            lanes.close()
    for name, child in adapter.backbone.named_children():
        if name != "layers":
            child.to("cpu")
    if result.layers and sharding.rank == 0:
        table = format_time_split(result.layers)
        log.info("\n" + table)
        if progress:
            print(table, file=sys.stderr)
    return result


def _quantize_one_layer(i, adapter, cfg, device, sharding, inputs, loader, persister, result, offload, estimate,
                        overlap, lanes=None):
    layers, needs_data = adapter.layers, cfg.method != "rtn"
    prefix = adapter.layer_prefix(i)
    clock = _StageClock(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with clock("load"):  # 0 the layer on the accelerator (prefetched while the previous layer computed)
        slots, load_seconds = loader.take(i)
    loader.prefetch(i + 1)
    layer = layers[i]
    units = solve_units(layer, adapter, cfg, sharding.world_size)
    mine = [u for u in units if sharding.mine(u.index)]

    collector = None
    if needs_data:  # 1 capture: hooks accumulate this rank's Hessians (2) as the layer runs on its inputs
        owned_experts = [j for u in mine if u.experts for j in range(*u.experts)]
        collector = LayerCollector(layer, adapter, cfg, device, owned_experts=owned_experts,
                                   owned_linears={u.linear for u in mine if u.linear})
        with clock("capture"), torch.no_grad(), routed_experts_skipped(adapter.moe_block(layer)):
            for hidden, kw in inputs:
                layer(hidden, **kw)
        collector.remove()
        clock.times["capture"] -= collector.hessian_seconds
        clock.times["hessian"] = collector.hessian_seconds

    with clock("solve"):  # 3 solve this rank's units (their W_hat goes into the layer as each is solved)
        solved, written = solve_layer(layer, prefix, mine, collector, adapter, cfg, lanes)
        del collector

    with clock("write"):  # 4 exchange between ranks, write the other quantized weights back into the layer
        solved = sharding.exchange(solved, len(units))
        packed, meta = write_back(layer, prefix, units, solved, adapter, written)
        del solved

    if needs_data and i + 1 < len(layers):  # 5 re-run: the next layer sees this layer's quantized outputs
        with clock("rerun"), torch.no_grad(), unmasked_grouped_experts(adapter.moe_block(layer)):
            inputs.advance(layer)

    clock.times.update(overlapped_load=load_seconds if overlap else 0.0, overlapped_write=0.0)
    meta = {"layer": i, **meta, "times": clock.times, "offload_activations": offload, "overlap": overlap,
            "estimated_gpu_bytes": estimate}
    with clock("write"):  # 6 persist: packed weights (and the layer) back to CPU memory, the checkpoint
        persister.submit(i, slots, packed, meta, lead=sharding.rank == 0)
        del slots, packed
    if device.type == "cuda":
        meta["peak_gpu_bytes"] = torch.cuda.max_memory_allocated(device)
    result.layers.append(meta)


def format_time_split(layers: list[dict]) -> str:
    """The per-stage split of a run: total seconds, share, seconds per layer; and the peak GPU memory."""
    tot = defaultdict(float)
    for m in layers:
        for k, v in m["times"].items():
            tot[k] += v
    total = sum(tot[k] for k in STAGES) or 1.0
    n = len(layers)
    lines = [f"quantization time split over {n} layer{'s' * (n != 1)}: {total:.1f} s",
             f"  {'stage':<8} {'seconds':>9} {'share':>6} {'s/layer':>8}"]
    for k in STAGES:
        lines.append(f"  {k:<8} {tot[k]:>9.2f} {100 * tot[k] / total:>5.1f}% {tot[k] / n:>8.3f}")
    if any(m.get("overlap") for m in layers):
        lines.append(f"  overlapped with the stages (background threads, not in the total): copies to the GPU "
                     f"{tot['overlapped_load']:.2f} s, write-back and checkpoint {tot['overlapped_write']:.2f} s")
    peaks = [m["peak_gpu_bytes"] for m in layers if "peak_gpu_bytes" in m]
    if peaks:
        est = max(m.get("estimated_gpu_bytes", 0) for m in layers)
        lines.append(f"  peak GPU memory per layer: {_fmt_gib(max(peaks))} (estimated up front: {_fmt_gib(est)})")
    return "\n".join(lines)
