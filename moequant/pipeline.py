"""Layer-by-layer quantization: capture → Hessians → solve → write back → next layer.

Only the current decoder layer and its inputs live on the accelerator. For each layer:
  1 capture   run the layer on its inputs with hooks that accumulate, per linear, the Hessian its solve needs;
              for MoE blocks a pre-hook on the fused experts sees (hidden, top_k_index, top_k_weights) — the
              affinities the model itself applies — and accumulates per-expert Hessians of gate_up and down inputs
  2 solve     GPTQ batched over the experts of a block (and per dense linear); RTN for method=rtn
  3 commit    write the dequantized weights back, so that
  4 re-run    the layer on the same inputs gives the next layer quantized inputs; then persist the layer
"""
from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from .config import QuantConfig
from .models.adapter import ModelAdapter, MoEBlock, get_adapter
from .packing import PackedWeight
from .quant.gptq import gptq_quantize
from .quant.hessian import dense_hessian_, expert_hessians
from .quant.quantizer import rtn, to_packed

log = logging.getLogger("moequant")

STAGES = ("capture", "solve", "write", "rerun")


@dataclass
class QuantizationResult:
    model: nn.Module  # the model, weights replaced in place by their quantized values
    packed: dict[str, PackedWeight]  # parameter path (without .weight) -> packed weight
    config: QuantConfig
    layers: list[dict] = field(default_factory=list)  # per-layer metadata: times, token counts, decisions
    calibration: dict = field(default_factory=dict)

    def times(self) -> dict[str, float]:
        tot = defaultdict(float)
        for m in self.layers:
            for k, v in m["times"].items():
                tot[k] += v
        return dict(tot)


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


class _StopForward(Exception):
    pass


def capture_layer_inputs(adapter: ModelAdapter, batches, device) -> list[tuple[torch.Tensor, dict]]:
    """Run the model up to its first decoder layer; return (hidden_states, layer kwargs) per batch."""
    backbone = adapter.backbone
    for name, child in backbone.named_children():
        if name != "layers":
            child.to(device)
    captured = []

    def grab(_mod, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append((hidden, {k: v for k, v in kwargs.items() if k != "hidden_states"}))
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
    return captured


def _layer_out(out):
    return out[0] if isinstance(out, tuple) else out


def _experts_args(args, kwargs):
    names = ("hidden_states", "top_k_index", "top_k_weights")
    vals = list(args) + [kwargs[n] for n in names[len(args):]]
    return vals[0], vals[1], vals[2]


def expert_intermediates(experts: nn.Module, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor | None):
    """down_proj inputs act(x W_gate_j) ⊙ (x W_up_j) for every (token, routed expert) pair.

    Returns rows [N, I], their expert ids [N, 1] and weights [N, 1] (or None), pairing each row with the affinity
    of the same (token, expert): MOEQUANT.md warns that mixing orders here is an easy bug.
    """
    I = experts.down_proj.shape[-1]
    rows, rid, rw = [], [], []
    for j in torch.unique(ids).tolist():
        t, s = torch.nonzero(ids == j, as_tuple=True)
        gu = nn.functional.linear(x[t], experts.gate_up_proj[j])
        rows.append(experts.act_fn(gu[:, :I]) * gu[:, I:])
        rid.append(torch.full_like(t, j))
        if weights is not None:
            rw.append(weights[t, s])
    rows = torch.cat(rows)
    return rows, torch.cat(rid).unsqueeze(1), (torch.cat(rw).unsqueeze(1) if weights is not None else None)


class LayerCollector:
    """Hooks on one decoder layer that accumulate every Hessian its quantization needs."""

    def __init__(self, layer: nn.Module, adapter: ModelAdapter, cfg: QuantConfig, device):
        self.cfg = cfg
        self.block: MoEBlock | None = adapter.moe_block(layer)
        kinds = [k for k in ("attn", "dense", "shared", "router") if k in cfg.targets]
        self.linears = adapter.linears(layer, kinds)
        self.dense_H = {n: torch.zeros(m.weight.shape[1], m.weight.shape[1], device=device) for n, (m, _) in
                        self.linears.items()}
        self.dense_n = defaultdict(int)
        self.handles = []
        self._shared_c = None
        self.hessian_seconds = 0.0
        if self.block is not None and "experts" in cfg.targets:
            E, H, I = self.block.num_experts, self.block.experts.gate_up_proj.shape[-1], self.block.intermediate_size
            self.H_gate_up = torch.zeros(E, H, H, device=device)
            self.H_down = torch.zeros(E, I, I, device=device)
            self.n_gate_up = torch.zeros(E, dtype=torch.int64, device=device)
            self.n_down = torch.zeros(E, dtype=torch.int64, device=device)
            self.handles.append(self.block.experts.register_forward_pre_hook(self._experts_hook, with_kwargs=True))
        weight_shared = (self.block is not None and self.block.shared_gate is not None and cfg.shared_affinity
                         and cfg.affinity_weighted)
        if weight_shared:  # Qwen2-MoE: the shared expert's output is scaled by sigmoid(shared_expert_gate(x))
            self.handles.append(self.block.module.register_forward_pre_hook(self._block_hook))
        for name, (mod, kind) in self.linears.items():
            use_c = weight_shared and kind == "shared"
            self.handles.append(mod.register_forward_pre_hook(self._dense_hook(name, use_c)))

    def _block_hook(self, _mod, args):
        x = args[0]
        self._shared_c = torch.sigmoid(self.block.shared_gate(x.reshape(-1, x.shape[-1]))).reshape(-1)

    def _dense_hook(self, name, use_c):
        def hook(_mod, args):
            t0 = time.perf_counter()
            x = args[0]
            dense_hessian_(self.dense_H[name], x, self._shared_c if use_c else None)
            self.dense_n[name] += x.numel() // x.shape[-1]
            self.hessian_seconds += time.perf_counter() - t0
        return hook

    def _experts_hook(self, mod, args, kwargs):
        t0 = time.perf_counter()
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
        backend = self.cfg.hessian_backend
        expert_hessians(x, ids, w, E, self.H_gate_up, self.n_gate_up, backend=backend)
        rows, rid, rw = expert_intermediates(mod, x, ids, w)
        expert_hessians(rows, rid, rw, E, self.H_down, self.n_down, backend=backend)
        self.hessian_seconds += time.perf_counter() - t0

    def remove(self):
        for h in self.handles:
            h.remove()
        self.handles = []


def _solve(W: torch.Tensor, H: torch.Tensor | None, cfg: QuantConfig):
    """Quantize W [B, R, C] with GPTQ (Hessians H [B, C, C]) or RTN (H None) -> (codes, scales, zeros, g_idx, W_hat)."""
    spec = cfg.spec
    dtype = W.dtype
    if H is None:
        codes, scales, zeros = rtn(W, spec, dtype)
        from .packing import dequantize_codes

        w_hat = dequantize_codes(codes, scales, zeros, spec.group_of(W.shape[-1]), None, spec.bits, torch.float32)
        return codes, scales, zeros, None, w_hat, []
    r = gptq_quantize(W, H, spec, damp=cfg.damp, block_size=cfg.block_size, act_order=cfg.act_order,
                      static_groups=cfg.static_groups, scale_dtype=dtype)
    return r.codes, r.scales, r.zeros, r.g_idx, r.weight, r.notes


def solve_experts(name: str, W: torch.Tensor, H: torch.Tensor | None, counts: torch.Tensor | None, cfg: QuantConfig):
    """Quantize a stack of experts [E, R, C]; apply the empty-expert policy. Returns (packed, W_hat, record)."""
    E, R, C = W.shape
    record = {"empty_experts": [], "policy": None, "notes": []}
    if H is None:  # RTN
        codes, scales, zeros, g_idx, w_hat, notes = _solve(W, None, cfg)
    else:
        empty = torch.nonzero(counts == 0).flatten().tolist()
        H = H.clone()
        if empty:
            record["empty_experts"], record["policy"] = empty, cfg.empty_expert
            msg = f"{name}: experts {empty} received no calibration tokens"
            if cfg.empty_expert == "error":
                raise RuntimeError(f"{msg}. Use more calibration data, --calibration all-experts, or "
                                   f"--empty-expert rtn|identity")
            log.warning(f"{msg}; policy {cfg.empty_expert}")
            if cfg.empty_expert == "identity":
                H[empty] = torch.eye(C, device=H.device)
        codes, scales, zeros, g_idx, w_hat, notes = _solve(W, H, cfg)
        if empty and cfg.empty_expert == "rtn":
            c2, s2, z2, _, w2, _ = _solve(W[empty], None, cfg)
            codes[empty], scales[empty], zeros[empty], w_hat[empty] = c2, s2, z2.to(zeros.dtype), w2.to(w_hat.dtype)
            if g_idx is not None:
                g_idx[empty] = (torch.arange(C, device=W.device) // cfg.spec.group_of(C)).to(g_idx.dtype)
        record["notes"] = notes
    return to_packed(codes, scales, zeros, cfg.spec, g_idx), w_hat, record


def quantize_layer(layer: nn.Module, prefix: str, collector: LayerCollector | None, adapter: ModelAdapter,
                   cfg: QuantConfig) -> tuple[dict[str, PackedWeight], dict]:
    """Solve every target weight of one layer and write the quantized values back in place."""
    packed, meta = {}, {"experts": {}, "linears": {}}
    block = adapter.moe_block(layer)
    kinds = [k for k in ("attn", "dense", "shared", "router") if k in cfg.targets]
    with torch.no_grad():
        for name, (mod, _kind) in adapter.linears(layer, kinds).items():
            W = mod.weight.data
            H = None if cfg.method == "rtn" else collector.dense_H[name].unsqueeze(0)
            counts = None if H is None else torch.tensor([collector.dense_n[name]], device=W.device)
            p, w_hat, rec = solve_experts(f"{prefix}.{name}", W.unsqueeze(0), H, counts, cfg)
            mod.weight.data.copy_(w_hat[0].to(W.dtype))
            packed[f"{prefix}.{name}"] = _unbatch(p)
            meta["linears"][name] = {"tokens": 0 if counts is None else int(counts[0])} | _slim(rec)
        if block is not None and "experts" in cfg.targets:
            ex = block.experts
            for pname, H, n in (("gate_up_proj", "H_gate_up", "n_gate_up"), ("down_proj", "H_down", "n_down")):
                W = getattr(ex, pname).data
                Hs = None if cfg.method == "rtn" else getattr(collector, H)
                counts = None if cfg.method == "rtn" else getattr(collector, n)
                p, w_hat, rec = solve_experts(f"{prefix}.mlp.experts.{pname}", W, Hs, counts, cfg)
                W.copy_(w_hat.to(W.dtype))
                packed[f"{prefix}.mlp.experts.{pname}"] = p
                meta["experts"][pname] = _slim(rec) | (
                    {"tokens_per_expert": counts.tolist()} if counts is not None else {})
    return packed, meta


def _unbatch(p: PackedWeight) -> PackedWeight:
    sq = lambda t: None if t is None else t[0]
    return PackedWeight(p.qweight[0], p.scales[0], sq(p.qzeros), sq(p.g_idx), p.bits, p.group_size)


def _slim(rec):
    return {k: v for k, v in rec.items() if v}


def quantize_model(model: nn.Module, cfg: QuantConfig, calib_tokens: torch.Tensor | None, *, progress: bool = True,
                   start_layer: int = 0, layer_inputs=None, on_layer_done=None) -> QuantizationResult:
    """The layer-by-layer loop. `calib_tokens` LongTensor [N, L] (unused for rtn)."""
    adapter = get_adapter(model)
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    result = QuantizationResult(model, {}, cfg)
    model.eval()
    needs_data = cfg.method != "rtn"
    inputs = layer_inputs
    if needs_data and inputs is None:
        batches = calib_tokens.split(cfg.batch_size)
        inputs = capture_layer_inputs(adapter, batches, device)
    layers = adapter.layers
    bar = tqdm(range(start_layer, len(layers)), desc=f"quantize ({cfg.method}, W{cfg.bits})", disable=not progress,
               unit="layer")
    for i in bar:
        layer = layers[i]
        prefix = adapter.layer_prefix(i)
        times = dict.fromkeys(STAGES, 0.0)
        layer.to(device)
        collector = None
        t0 = time.perf_counter()
        if needs_data:
            collector = LayerCollector(layer, adapter, cfg, device)
            with torch.no_grad():
                for hidden, kw in inputs:
                    layer(hidden, **kw)
            collector.remove()
            _sync(device)
        times["capture"] = time.perf_counter() - t0
        if collector is not None:
            times["hessian"] = collector.hessian_seconds  # part of capture, reported on its own
        t0 = time.perf_counter()
        packed, meta = quantize_layer(layer, prefix, collector, adapter, cfg)
        _sync(device)
        times["solve"] = time.perf_counter() - t0
        del collector
        t0 = time.perf_counter()
        if needs_data:
            with torch.no_grad():
                inputs = [(_layer_out(layer(hidden, **kw)), kw) for hidden, kw in inputs]
            _sync(device)
        times["rerun"] = time.perf_counter() - t0
        layer.to("cpu")
        t0 = time.perf_counter()
        meta = {"layer": i, **meta, "times": times}
        result.packed.update(packed)
        result.layers.append(meta)
        if on_layer_done is not None:
            on_layer_done(i, packed, meta, inputs)
        times["write"] = time.perf_counter() - t0
    for name, child in adapter.backbone.named_children():
        if name != "layers":
            child.to("cpu")
    return result
