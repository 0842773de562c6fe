"""Quantized modules that replace their dense counterparts in a transformers 5 MoE model.

    QuantLinear     nn.Linear with a packed weight (attention, dense MLP, shared experts, router if quantized)
    QuantExperts    fused experts with packed gate_up_proj / down_proj; the experts forward contract
    install_quantized(model, packed)   swap the modules named by a {name: PackedWeight} dict in place
    describe_paths(model, dtype)       which compute path each quantized module takes, for the load-time log
"""
from __future__ import annotations

import logging
from collections import Counter

import torch
from torch import nn

from ..packing import PackedWeight, dequantize
from .quant_experts import DECODE_MAX_TOKENS, QuantExperts, decode_max_tokens
from .quant_linear import PackedWeightBuffers, QuantLinear

log = logging.getLogger("moequant")

EXPERT_PARAMS = ("gate_up_proj", "down_proj")

__all__ = ["QuantLinear", "QuantExperts", "PackedWeightBuffers", "install_quantized", "describe_paths",
           "prepare_for_device", "DECODE_MAX_TOKENS", "decode_max_tokens"]


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, module)


def install_quantized(model: nn.Module, packed: dict[str, PackedWeight]) -> dict[str, list[str]]:
    """Replace, in place, every module a packed weight belongs to.

    packed: {name: PackedWeight} as the checkpoint / QuantizationResult names them: `<experts>.gate_up_proj` and
    `<experts>.down_proj` (both, for a fused experts module) or `<linear>` for an nn.Linear's weight.
    A packed weight of a module that is neither (the router, which has its own forward) is dequantized into
    that module's weight. Returns the names replaced / dequantized: {"experts": [...], "linear": [...], "dense": [...]}. Packed tensors become the new modules'
    buffers (not copied).
    """
    experts: dict[str, dict[str, PackedWeight]] = {}
    linears: dict[str, PackedWeight] = {}
    dense: dict[str, PackedWeight] = {}
    for name, p in packed.items():
        parent, _, attr = name.rpartition(".")
        mod = _module_or_none(model, name)
        if isinstance(mod, nn.Linear):
            linears[name] = p
        elif attr in EXPERT_PARAMS and isinstance(getattr(_module_or_none(model, parent), attr, None), nn.Parameter):
            experts.setdefault(parent, {})[attr] = p
        elif isinstance(getattr(mod, "weight", None), nn.Parameter):
            dense[name] = p  # a module with its own forward (the router): its weight is dequantized in place
        else:
            raise ValueError(f"packed weight {name!r} names no nn.Linear or fused experts parameter of this model")
    for name, ps in experts.items():
        missing = [a for a in EXPERT_PARAMS if a not in ps]
        if missing:
            raise ValueError(f"{name}: packed {sorted(ps)} but not {missing}; an experts module is quantized whole")
        old = model.get_submodule(name)
        _set_module(model, name, QuantExperts.from_experts(old, ps["gate_up_proj"], ps["down_proj"]))
    for name, p in linears.items():
        _set_module(model, name, QuantLinear.from_linear(model.get_submodule(name), p))
    with torch.no_grad():
        for name, p in dense.items():
            w = model.get_submodule(name).weight
            if tuple(w.shape) != (p.out_features, p.in_features):
                raise ValueError(f"packed weight {name!r} is [{p.out_features}, {p.in_features}], the module's weight "
                                 f"is {list(w.shape)}")
            w.copy_(dequantize(p, torch.float32).to(w.dtype))
    return {"experts": sorted(experts), "linear": sorted(linears), "dense": sorted(dense)}


def _module_or_none(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def describe_paths(model: nn.Module, dtype: torch.dtype | None = None) -> Counter:
    """Counter of (module kind, path, reason) over the quantized modules, for their current device."""
    paths = Counter()
    for mod in model.modules():
        if isinstance(mod, QuantExperts):
            dev, dt = mod.gate_up_proj.qweight.device, dtype or mod.gate_up_proj.scales.dtype
            small = mod.path_for(dev, dt, 1)
            large = mod.path_for(dev, dt, decode_max_tokens() + 1)
            paths[("experts", f"{small[0]}/{large[0]}", small[1] if small[0] == large[0] else
                   f"<= {decode_max_tokens()} tokens: {small[0]}, more: {large[0]}")] += 1
        elif isinstance(mod, QuantLinear):
            path, why = mod.path_for(mod.qweight.device, dtype or mod.scales.dtype)
            paths[("linear", path, why)] += 1
    return paths


def prepare_for_device(model: nn.Module, dtype: torch.dtype | None = None) -> Counter:
    """Build every quantized module's kernel layout for its current device, and log (once) the paths taken."""
    for mod in model.modules():
        if isinstance(mod, (QuantExperts, QuantLinear)):
            mod.prepare(dtype or (mod.scales.dtype if isinstance(mod, QuantLinear) else mod.gate_up_proj.scales.dtype))
    paths = describe_paths(model, dtype)
    for (kind, path, why), n in sorted(paths.items()):
        log.info(f"moequant: {n} quantized {kind} module(s) use the {path} path ({why})")
    return paths
