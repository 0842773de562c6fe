"""Loading a moequant checkpoint back into a ready Hugging Face model."""
from __future__ import annotations

import logging
import os

import torch
from torch import nn

from . import checkpoint as ck
from .nn import install_quantized, prepare_for_device
from .packing import PackedWeight
from .packing import dequantize as dequantize_packed

log = logging.getLogger("moequant")


def read_checkpoint(path: str):
    """(model config dict, quantization config, {name: tensor}) of a finished checkpoint, checksums verified."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        hint = " (an interrupted run: finish it with --resume)" if os.path.isfile(os.path.join(path, ck.PROGRESS)) else ""
        raise FileNotFoundError(f"{path} is not a moequant checkpoint: no config.json{hint}")
    cfg = ck.read_json(cfg_path)
    qcfg = cfg.pop("quantization_config", None)
    if not qcfg or qcfg.get("quant_method") != "moequant":
        raise ValueError(f"{path}/config.json has no moequant quantization_config; load it with transformers")
    if qcfg.get("format_version") != ck.FORMAT_VERSION:
        raise ValueError(f"{path} has format version {qcfg.get('format_version')}; this moequant reads "
                         f"{ck.FORMAT_VERSION}")
    index = ck.read_json(os.path.join(path, ck.INDEX))
    tensors = {}
    for shard, digest in sorted(index["metadata"]["sha256"].items()):
        tensors.update(ck.verify_and_load_shard(os.path.join(path, shard), digest))
    return cfg, qcfg, tensors


def build_model(cfg: dict, dtype=None, init_weights: bool = True):
    """An HF causal LM from a config dict. init_weights=False leaves the parameters uninitialised (fast): only for
    a model whose every tensor is loaded next."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(cfg)
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    dtype = dtype or getattr(config, "dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if init_weights:
        return AutoModelForCausalLM.from_config(config, dtype=dtype)
    from transformers.initialization import no_init_weights

    with no_init_weights():
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def packed_weights(tensors: dict[str, torch.Tensor], qcfg: dict) -> dict[str, PackedWeight]:
    """{name: PackedWeight} of every packed weight among a checkpoint's tensors."""
    bases, _ = ck.split_packed(tensors)
    return {base: ck.packed_from_tensors(tensors, base, qcfg) for base in sorted(bases)}


def load(path: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
         dequantize: bool = False) -> nn.Module:
    """Load a moequant checkpoint as a ready HF model (`model.generate()` works).

    By default the quantized weights stay packed: fused experts become `moequant.nn.QuantExperts`, linears
    `moequant.nn.QuantLinear` (4-bit kernels on CUDA, a dequantize path on CPU; the path of each module is logged).
    dequantize=True instead writes the dequantized weights into the model's own dense parameters.
    dtype: the activation / dense dtype (default: the checkpoint's); packed scales keep their stored dtype.
    """
    cfg, qcfg, tensors = read_checkpoint(path)
    model = build_model(cfg, dtype, init_weights=False)
    packed = packed_weights(tensors, qcfg)
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    with torch.no_grad():
        if dequantize:
            state = model.state_dict()
            _, plain = ck.split_packed(tensors)
            for base, p in packed.items():
                name = ck.dense_param_name(base, state)
                plain[name] = dequantize_packed(p, torch.float32).to(state[name].dtype)
            expect_missing = tied
        else:
            dense_bases = set(install_quantized(model, packed)["dense"])
            if dense_bases:
                log.info(f"moequant: {len(dense_bases)} quantized weight(s) of modules with their own forward (the "
                         f"router) are dequantized into their dense parameter")
            plain = {k: v for k, v in tensors.items()
                     if not (k.rsplit(".", 1)[0] in dense_bases and k.rsplit(".", 1)[1] in ck.PACKED_SUFFIXES)}
            expect_missing = tied | {b + ".weight" for b in dense_bases}
        missing, unexpected = model.load_state_dict(plain, strict=False)
    if unexpected or set(missing) - expect_missing:
        raise ck.CorruptCheckpointError(f"{path}: tensors missing {sorted(set(missing) - expect_missing)[:5]} / "
                                        f"unexpected {sorted(unexpected)[:5]}")
    if tied:  # stored once (as the embedding); from_config does not tie by itself, so share it explicitly
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    model.quantization_config = qcfg
    model = model.to(device).eval()
    if not dequantize:
        prepare_for_device(model, dtype)
    return model
