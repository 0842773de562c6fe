"""Export a moequant checkpoint in the GPTQ format other engines load (vLLM, transformers + gptqmodel).

    export_gptq(src_checkpoint_dir, out_dir, overwrite=False) -> quantization_config dict

Per-expert tensors under the names of the original Hugging Face checkpoint:
    Mixtral                  model.layers.{i}.block_sparse_moe.experts.{j}.w1 / w3 / w2   (gate / up / down)
    Qwen, DeepSeek, OLMoE    model.layers.{i}.mlp.experts.{j}.gate_proj / up_proj / down_proj
each with (GPTQ v1 packing)
    qweight  int32 [in*bits/32, out]   codes packed along the input dim, a little-endian bit stream per column
                                       (identical to moequant's own packing, so codes are copied, not re-packed)
    qzeros   int32 [in/G, out*bits/32] zero point MINUS ONE, packed the same way along the output dim
    scales   float16 [in/G, out]
    g_idx    int32 [in]                group of each input column (i // G without act-order)
Quantized linears (attention, dense MLP, shared experts) get the same four tensors under their own names.
config.json carries `quantization_config = {quant_method: "gptq", bits, group_size, desc_act, sym, ...}`.

What cannot be written exactly is said, never hidden: a zero point of 0 (GPTQ v1 stores zero - 1) is stored as 1
with a warning; scales that float16 cannot hold exactly are warned about; a router or shared-expert gate that was
quantized is written dequantized (engines keep them unquantized). Settings outside vLLM's fast MoE path
(symmetric 4/8-bit, desc_act false, group size in {-1, 32, 64, 128}) are warned about, naming the setting.
"""
from __future__ import annotations

import logging
import math
import os
import shutil

import torch

from . import checkpoint as ck
from .loading import read_checkpoint
from .packing import PackedWeight, dequantize, pack_int32

log = logging.getLogger("moequant")

VLLM_FAST_GROUP_SIZES = (-1, 32, 64, 128)
# On-disk names of (gate, up, down) of expert j, and the MoE block's name, per architecture.
EXPERT_NAMES = {"mixtral": ("w1", "w3", "w2")}
DEFAULT_EXPERT_NAMES = ("gate_proj", "up_proj", "down_proj")
BLOCK_NAMES = {"mixtral": "block_sparse_moe"}
UNQUANTIZED_IN_ENGINES = (".mlp.gate", ".mlp.shared_expert_gate")  # router, Qwen2-MoE shared-expert gate
EXPORT_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                "tokenizer.model", "generation_config.json", "chat_template.jinja")


def vllm_fast_path_warnings(bits: int, sym: bool, desc_act: bool, group_size: int) -> list[str]:
    """One message per setting that keeps a GPTQ MoE checkpoint off vLLM's fast (Marlin) MoE path."""
    out = []
    if bits not in (4, 8):
        out.append(f"bits={bits}: vLLM's fast GPTQ MoE path needs 4 or 8 bits")
    if not sym:
        out.append("sym=False: vLLM's fast GPTQ MoE path needs symmetric quantization")
    if desc_act:
        out.append("desc_act=True (act-order): vLLM's fast GPTQ MoE path needs desc_act=False")
    if group_size not in VLLM_FAST_GROUP_SIZES:
        out.append(f"group_size={group_size}: vLLM's fast GPTQ MoE path needs one of {VLLM_FAST_GROUP_SIZES}")
    return out


def gptq_tensors(p: PackedWeight, prefix: str, notes: dict) -> dict[str, torch.Tensor]:
    """One 2-D packed weight -> GPTQ v1 `{prefix}.qweight/.qzeros/.scales/.g_idx`."""
    if p.qweight.dim() != 2:
        raise ValueError(f"{prefix}: expected a 2-D packed weight, got qweight {tuple(p.qweight.shape)}")
    bits, in_f, out_f = p.bits, p.in_features, p.out_features
    G = p.scales.shape[0]
    zeros = (torch.full((G, out_f), 1 << (bits - 1), dtype=torch.int64) if p.qzeros is None
             else p.qzeros.to(torch.int64))
    n_zero = int((zeros == 0).sum())
    if n_zero:  # v1 stores zero - 1, so zero 0 has no code: the nearest one it has is 1
        notes["zero_clamped"] = notes.get("zero_clamped", 0) + n_zero
        zeros = zeros.clamp(min=1)
    # pack_int32 packs the last dim of [rows, cols] into [cols*bits/32, rows]: give it zeros as [G, out] so that the
    # stream runs along the output dim, and transpose the result back to [G, ceil(out*bits/32)]. When out*bits is
    # not a multiple of 32 (3 bits) the last word is padded with zero bits, as GPTQModel does.
    per = 32 // math.gcd(32, bits)
    zm1 = torch.nn.functional.pad(zeros - 1, (0, -out_f % per))
    qzeros = pack_int32(zm1, bits).T.contiguous()
    scales = p.scales.to(torch.float16)
    if not torch.equal(scales.to(p.scales.dtype), p.scales):
        notes["scales_rounded"] = notes.get("scales_rounded", 0) + int((scales.to(p.scales.dtype) != p.scales).sum())
    g_idx = (p.g_idx if p.g_idx is not None else torch.arange(in_f) // p.group_size).to(torch.int32)
    return {f"{prefix}.qweight": p.qweight.contiguous(), f"{prefix}.qzeros": qzeros,
            f"{prefix}.scales": scales.contiguous(), f"{prefix}.g_idx": g_idx.clone()}  # gate and up share g_idx


def _slice(p: PackedWeight, j: int, cols: slice | None = None) -> PackedWeight:
    """Expert j of a stacked packed weight, optionally only some output columns (gate or up rows)."""
    c = cols or slice(None)
    pick = lambda t: None if t is None else t[j][..., c]
    return PackedWeight(pick(p.qweight), pick(p.scales), pick(p.qzeros), None if p.g_idx is None else p.g_idx[j],
                        p.bits, p.group_size)


def _disk_name(name: str, model_type: str) -> str:
    """transformers 5 module path -> the original checkpoint's name (Mixtral: mlp -> block_sparse_moe)."""
    block = BLOCK_NAMES.get(model_type)
    return name.replace(".mlp.", f".{block}.") if block else name


def export_gptq(src_checkpoint_dir: str, out_dir: str, overwrite: bool = False) -> dict:
    """Write `src_checkpoint_dir` (a finished moequant checkpoint) as a GPTQ checkpoint in `out_dir`.

    Returns the `quantization_config` written into out_dir/config.json. Every file is written atomically;
    config.json last.
    """
    if os.path.abspath(src_checkpoint_dir) == os.path.abspath(out_dir):
        raise ValueError("export into a new directory, not the source checkpoint")
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        if not overwrite:
            raise FileExistsError(f"{out_dir} is not empty; pass overwrite=True (--overwrite) or choose another")
        shutil.rmtree(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    cfg, qcfg, tensors = read_checkpoint(src_checkpoint_dir)
    model_type = cfg["model_type"]
    bases, plain = ck.split_packed(tensors)
    packed = {b: ck.packed_from_tensors(tensors, b, qcfg) for b in bases}
    gate_n, up_n, down_n = EXPERT_NAMES.get(model_type, DEFAULT_EXPERT_NAMES)
    notes: dict = {}
    dense_dtype = next((t.dtype for t in plain.values() if t.is_floating_point()), torch.float16)

    out: dict[str, torch.Tensor] = {}
    for name, t in plain.items():
        out[_disk_name(name, model_type)] = t
    left_dense = []
    for base in sorted(packed):
        p = packed[base]
        if base.endswith(".mlp.experts.gate_up_proj") or base.endswith(".mlp.experts.down_proj"):
            experts = _disk_name(base.rsplit(".", 1)[0], model_type)
            E, I = p.qweight.shape[0], p.out_features // 2
            for j in range(E):
                if base.endswith("gate_up_proj"):
                    out.update(gptq_tensors(_slice(p, j, slice(0, I)), f"{experts}.{j}.{gate_n}", notes))
                    out.update(gptq_tensors(_slice(p, j, slice(I, 2 * I)), f"{experts}.{j}.{up_n}", notes))
                else:
                    out.update(gptq_tensors(_slice(p, j), f"{experts}.{j}.{down_n}", notes))
        elif base.endswith(UNQUANTIZED_IN_ENGINES):
            out[_disk_name(base, model_type) + ".weight"] = dequantize(p, torch.float32).to(dense_dtype)
            left_dense.append(base)
        else:
            out.update(gptq_tensors(p, _disk_name(base, model_type), notes))

    bits, group_size, sym, desc_act = qcfg["bits"], qcfg["group_size"], qcfg["sym"], qcfg["act_order"]
    for msg in vllm_fast_path_warnings(bits, sym, desc_act, group_size):
        log.warning(f"export_gptq: {msg}")
    if left_dense:
        log.warning(f"export_gptq: {len(left_dense)} router / shared-expert-gate weights were quantized "
                    f"(targets include 'router' or 'shared'); they are written dequantized in {dense_dtype}, "
                    f"because engines (vLLM) keep them unquantized")
    if notes.get("zero_clamped"):
        log.warning(f"export_gptq: {notes['zero_clamped']} groups have zero point 0, which GPTQ v1 (stores zero-1) "
                    f"cannot represent: written as zero point 1, a shift of one quantization step in those groups")
    if notes.get("scales_rounded"):
        log.warning(f"export_gptq: {notes['scales_rounded']} scales changed when rounded to float16 (GPTQ stores "
                    f"float16 scales); quantize a bf16/fp16 model for an exact export")

    shards: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in out.items():  # one shard per decoder layer, like the source checkpoint
        parts = name.split(".")
        shard = (ck.layer_shard(int(parts[2])) if name.startswith("model.layers.") else "model-rest.safetensors")
        shards.setdefault(shard, {})[name] = t
    weight_map = {}
    for shard, ts in sorted(shards.items()):
        ck.write_tensors(os.path.join(out_dir, shard), ts, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(ts, shard))
    ck.write_json(os.path.join(out_dir, "model.safetensors.index.json"), {
        "metadata": {"total_size": sum(t.numel() * t.element_size() for t in out.values())},
        "weight_map": dict(sorted(weight_map.items()))})
    for f in EXPORT_FILES:
        src = os.path.join(src_checkpoint_dir, f)
        if os.path.isfile(src):
            shutil.copyfile(src, os.path.join(out_dir, f))
    quant_config = {
        "quant_method": "gptq", "checkpoint_format": "gptq", "bits": bits, "group_size": group_size,
        "desc_act": desc_act, "sym": sym, "static_groups": qcfg.get("static_groups", False),
        "damp_percent": qcfg.get("damp", 0.01), "true_sequential": True, "lm_head": False,
        "meta": {"quantizer": "moequant", "method": qcfg.get("method"), "calibration": qcfg.get("calibration"),
                 "empty_experts": qcfg.get("empty_experts", {}), "left_unquantized": left_dense,
                 "zero_points_clamped": notes.get("zero_clamped", 0)},
    }
    cfg = dict(cfg)
    cfg["quantization_config"] = quant_config
    ck.write_json(os.path.join(out_dir, "config.json"), cfg)
    return quant_config
