"""Public entry points: `moequant.quantize(model, config)` and `moequant.load(path)`."""
from __future__ import annotations

import json
import logging
import os
import shutil

import torch
from torch import nn

from . import checkpoint as ck
from .calib.text import text_calibration
from .config import QuantConfig
from .models.adapter import get_adapter
from .packing import dequantize
from .distributed import Sharding
from .pipeline import QuantizationResult, capture_layer_inputs, quantize_model, _layer_out

log = logging.getLogger("moequant")


def max_context(model) -> int:
    return int(getattr(model.config, "max_position_embeddings", 2048) or 2048)


def calibration_tokens(model, cfg: QuantConfig, tokenizer=None, progress=True):
    """Calibration token ids [N, L] and a record of where they came from (saved in the checkpoint)."""
    seq_len = min(cfg.seq_len, max_context(model))
    if cfg.method == "moequant":
        try:
            from .calib.ebss import EBSSConfig, ebss_generate
        except ImportError as e:  # pragma: no cover - EBSS ships with the package
            raise RuntimeError("method 'moequant' needs EBSS (moequant.calib.ebss), which is missing") from e
        ecfg = EBSSConfig(**{"num_sequences": cfg.num_samples, "seq_len": seq_len, "seed": cfg.seed, **cfg.ebss})
        device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        home = next(model.parameters()).device
        if device.type == "cuda" and home.type != "cuda":  # EBSS runs where the model is: put it on the GPU if it fits
            need = sum(p.numel() * p.element_size() for p in model.parameters())
            free = torch.cuda.mem_get_info(device)[0]
            if need < 0.8 * free:
                model.to(device)
            else:
                log.warning(f"EBSS runs on the CPU: the model ({need / 2**30:.1f} GiB) does not fit the GPU's free "
                            f"{free / 2**30:.1f} GiB")
        try:
            res = ebss_generate(model, ecfg, tokenizer=tokenizer, progress=progress)
        finally:
            model.to(home)
        return res.tokens, {"source": "ebss", **res.params}
    ids = text_calibration(tokenizer, cfg.num_samples, seq_len, cfg.calib_file, cfg.seed)
    return ids, {"source": "text", "file": cfg.calib_file or "moequant/data/calib_en.txt",
                 "num_samples": cfg.num_samples, "seq_len": seq_len, "seed": cfg.seed}


def load_layer_shards_into(model, layer_ids, path, index, qcfg):
    """Put the quantized values of finished layers back into a float model (resume; dense loading)."""
    state = model.state_dict()
    packed = {}
    for i in layer_ids:
        shard = ck.layer_shard(i)
        tensors = ck.verify_and_load_shard(os.path.join(path, shard), index.get(shard))
        bases, plain = ck.split_packed(tensors)
        with torch.no_grad():
            for base in bases:
                p = ck.packed_from_tensors(tensors, base, qcfg)
                packed[base] = p
                dst = state[ck.dense_param_name(base, state)]
                dst.copy_(dequantize(p, torch.float32).to(dst.dtype))
            for k, v in plain.items():
                state[k].copy_(v)
    return packed


LOW_CPU_MEM_FRACTION = 0.8  # "auto": stream the layers when the weights exceed this share of the available RAM


def open_model(path: str, low_cpu_mem: bool | str = "auto", dtype: torch.dtype | None = None, *,
               copies: int = 1):
    """A local HF model folder -> (model, layer source). moequant never downloads.

    low_cpu_mem: True: a skeleton on the meta device whose decoder layers are read from the safetensors shards one
    at a time during quantization (`moequant.streaming`; the source is returned, pass it on as `layer_source`);
    False: the whole model in CPU memory (source None); "auto": streamed when the checkpoint's weights, times
    `copies` (the caller's copies of the model), exceed 80% of the available RAM — the choice is logged.
    dtype: the model's dtype (default: the checkpoint's, as from_pretrained's dtype="auto").
    """
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from .streaming import available_ram, checkpoint_bytes, open_streamed

    if not os.path.isdir(path) or not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"model folder {path!r} not found or has no config.json (moequant reads local folders "
                                f"only)")
    if low_cpu_mem not in (True, False, "auto"):
        raise ValueError(f"low_cpu_mem must be True, False or 'auto', got {low_cpu_mem!r}")
    if low_cpu_mem == "auto":
        need, ram = checkpoint_bytes(path) * copies, available_ram()
        low_cpu_mem = bool(ram) and need > LOW_CPU_MEM_FRACTION * ram
        if low_cpu_mem:
            log.warning(f"the model's weights ({need / 2**30:.1f} GiB{f' x {copies}' if copies > 1 else ''}) exceed "
                        f"{LOW_CPU_MEM_FRACTION:.0%} of the available RAM ({ram / 2**30:.1f} GiB): its decoder layers "
                        f"are read from the checkpoint one at a time (low_cpu_mem)")
    if low_cpu_mem:
        return open_streamed(path, dtype)
    hf_logging.disable_progress_bar()  # our own progress bars are per layer; keep stderr for errors
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or "auto", local_files_only=True)
    return model.eval(), None


def quantize(model: nn.Module | str, config: QuantConfig | None = None, *, tokenizer=None, calib_tokens=None,
             output_dir: str | None = None, resume: bool = False, overwrite: bool = False, progress: bool = True,
             sharding: Sharding | None = None, low_cpu_mem: bool | str = "auto", layer_source=None,
             **overrides) -> QuantizationResult:
    """Quantize a supported HF MoE model in place (layer by layer) and optionally write the checkpoint.

    model: the model, or the path of a local HF folder (opened with `open_model(path, low_cpu_mem)`).
    config: a QuantConfig (or keyword overrides of its fields). calib_tokens: LongTensor [N, L] to calibrate on
    instead of text / EBSS. output_dir: where the checkpoint goes; resume=True continues an interrupted run there.
    sharding: this process's rank under torchrun (`moequant.distributed.init_from_env()`): experts are split across
    ranks, rank 0 makes the calibration tokens and writes the checkpoint; the result is bit-identical to one process.
    layer_source: a `moequant.streaming.StreamedLayers` when the model's layers are on the meta device (what
    `open_model(..., low_cpu_mem=True)` returns). Each layer is then read from the checkpoint just before it is
    quantized and released once written: CPU RAM holds the embeddings and head and about one layer. The result's
    model keeps no layer weights, and its packed weights are only in the checkpoint when output_dir is given (load
    it with `moequant.load`). Needs text or given calibration tokens (EBSS and the rotation need the whole model).
    """
    if isinstance(model, (str, os.PathLike)):
        model, layer_source = open_model(str(model), low_cpu_mem)
    cfg = config or QuantConfig(**overrides)
    sharding = sharding or Sharding()
    lead = sharding.rank == 0
    adapter = get_adapter(model)  # raises for unsupported architectures, naming the supported ones
    for _, b in adapter.moe_blocks():
        for p in (b.experts.gate_up_proj, b.experts.down_proj):
            cfg.spec.group_of(p.shape[-1])  # group size must divide every input dim: fail before any work
    model.eval()
    streamed = layer_source is not None
    if streamed and cfg.rotate:
        raise ValueError("the Hadamard rotation changes every layer at once and needs the whole model in memory; "
                         "quantize without rotate, or without low_cpu_mem (--low-cpu-mem off)")
    if streamed and cfg.method == "moequant" and calib_tokens is None and not resume:
        raise ValueError("EBSS (method 'moequant') generates calibration text with the whole model, which streaming "
                         "layer by layer does not hold: use --method agq (text calibration), give calibration tokens, "
                         "or quantize without low_cpu_mem")

    if cfg.rotate == "hadamard":  # the rotated model is the same function; its weights quantize better.
        from .rotate import rotate_model  # seeded, so a resumed run rotates identically

        rotate_model(model, seed=cfg.rotate_seed,  # float64 math on the accelerator when there is one
                     device=cfg.device or ("cuda" if torch.cuda.is_available() else None))
    start, prior_packed, prior_layers, inputs = 0, {}, [], None
    if resume and output_dir is not None:
        # The saved calibration tokens make the resumed run identical to an uninterrupted one (and spare EBSS).
        prog = _check_resume(cfg, output_dir)
        tokens, calib = _read_calibration(output_dir), prog["calibration"]
        start, prior_layers = len(prog["layers_done"]), prog["layers"]
        if not streamed:
            prior_packed = load_layer_shards_into(model, prog["layers_done"], output_dir, prog["sha256"],
                                                  cfg.to_dict())
        log.info(f"resuming {output_dir} after layer {start - 1}")
    else:
        if cfg.method == "rtn":
            tokens, calib = None, {"source": "none (rtn)"}
        elif calib_tokens is not None:
            tokens, calib = calib_tokens.long(), {"source": "tokens", "shape": list(calib_tokens.shape)}
        elif lead:
            tokens, calib = calibration_tokens(model, cfg, tokenizer, progress)
        else:
            tokens, calib = None, {}
        if sharding.distributed and cfg.method != "rtn":  # every rank calibrates on rank 0's tokens
            tokens = sharding.broadcast_tensor(tokens if lead else None)
            calib = sharding.all_gather_object(calib)[0]
        if output_dir is not None and lead:
            _fresh_output(output_dir, overwrite)
            if tokens is not None:
                ck.write_tensors(os.path.join(output_dir, CALIBRATION), {"input_ids": tokens})
        sharding.barrier()

    if start > 0 and tokens is not None:  # resume: replay the finished (quantized) layers to get layer `start` inputs
        device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        inputs = capture_layer_inputs(adapter, tokens.split(cfg.batch_size), device)
        with torch.no_grad():
            for i in range(start):
                if streamed:  # the float layer from the source, then its quantized values from the output shard
                    layer_source.load(i)
                    load_layer_shards_into(model, [i], output_dir, prog["sha256"], cfg.to_dict())
                layer = adapter.layers[i].to(device)
                inputs = [(_layer_out(layer(h, **kw)), kw) for h, kw in inputs]
                layer.to("cpu")
                if streamed:
                    layer_source.release(i)

    writer = None if output_dir is None or not lead else _LayerWriter(model, output_dir, cfg, calib, prior_layers)
    keep_packed = not (streamed and output_dir is not None)  # streamed into a checkpoint: RAM keeps no layer
    result = quantize_model(model, cfg, tokens, progress=progress, start_layer=start, layer_inputs=inputs,
                            on_layer_done=writer, sharding=sharding, layer_source=layer_source,
                            keep_packed=keep_packed)
    result.packed = {**prior_packed, **result.packed}
    result.layers = prior_layers + result.layers
    result.calibration = calib
    if output_dir is not None and lead:
        save(result, output_dir, tokenizer=tokenizer)
    sharding.barrier()
    return result


CALIBRATION = "calibration.safetensors"


def _check_resume(cfg: QuantConfig, out: str) -> dict:
    prog_path = os.path.join(out, ck.PROGRESS)
    if not os.path.isfile(prog_path):
        raise FileNotFoundError(f"nothing to resume in {out} (no {ck.PROGRESS}); run without --resume")
    prog = ck.read_json(prog_path)
    if prog["config"] != json.loads(json.dumps(cfg.to_dict())):  # compare as saved (JSON turns tuples into lists)
        raise ValueError(f"{out} was started with different settings; resume with the same settings "
                         f"(saved in {prog_path}) or use a new output directory")
    if prog["layers_done"] != list(range(len(prog["layers_done"]))):
        raise ck.CorruptCheckpointError(f"{prog_path} lists non-contiguous layers {prog['layers_done']}")
    return prog


def _read_calibration(out: str):
    path = os.path.join(out, CALIBRATION)
    return ck.verify_and_load_shard(path, None)["input_ids"] if os.path.isfile(path) else None


def _fresh_output(out: str, overwrite: bool) -> None:
    if os.path.isdir(out) and os.listdir(out):
        if not overwrite:
            raise FileExistsError(f"output directory {out} is not empty; pass --resume to continue an interrupted "
                                  f"run, --overwrite to replace it, or choose another directory")
        shutil.rmtree(out)
    os.makedirs(out, exist_ok=True)


class _LayerWriter:
    """Persists each finished layer (its shard, then progress.json): the resume point. Called by the pipeline (on a
    worker thread on CUDA) with the layer's packed weights and its other tensors (`state`), in CPU memory."""

    def __init__(self, model, out, cfg, calib, prior_layers):
        self.model, self.out, self.cfg, self.calib = model, out, cfg, calib
        self.layers = list(prior_layers)
        prog_path = os.path.join(out, ck.PROGRESS)
        self.sha = ck.read_json(prog_path)["sha256"] if os.path.isfile(prog_path) else {}

    def __call__(self, i, packed, meta, state):
        adapter = get_adapter(self.model)
        shard = ck.layer_shard(i)
        path = os.path.join(self.out, shard)
        ck.write_tensors(path, ck.layer_tensors(state, adapter.layer_prefix(i), packed))
        self.sha[shard] = ck.sha256(path)
        self.layers.append(meta)
        ck.write_json(os.path.join(self.out, ck.PROGRESS), {
            "config": self.cfg.to_dict(), "layers_done": [m["layer"] for m in self.layers],
            "layers": self.layers, "sha256": self.sha, "calibration": self.calib})


def quantization_config(result: QuantizationResult) -> dict:
    c = result.config
    empty = {m["layer"]: {k: v["empty_experts"] for k, v in m["experts"].items() if v.get("empty_experts")}
             for m in result.layers}
    return {
        "quant_method": "moequant", "format_version": ck.FORMAT_VERSION,
        "method": c.method, "bits": c.bits, "group_size": c.group_size, "sym": c.sym, "act_order": c.act_order,
        "static_groups": c.static_groups, "mse_clip": c.mse_clip, "damp": c.damp, "targets": list(c.targets),
        "calibration_mode": c.calibration, "affinity_power": c.affinity_power,
        "empty_expert_policy": c.empty_expert,
        "empty_experts": {str(k): v for k, v in empty.items() if v},
        "calibration": result.calibration,
        "config": c.to_dict(),
        "times": result.times(),
        "layers": result.layers,
    }


def save(result: QuantizationResult, out: str, tokenizer=None) -> None:
    """Write the full checkpoint (layer shards are written as layers finish; this adds the rest and the index)."""
    model = result.model
    adapter = get_adapter(model)
    n = len(adapter.layers)
    prog = ck.read_json(os.path.join(out, ck.PROGRESS))
    if prog["layers_done"] != list(range(n)):
        raise RuntimeError(f"only layers {prog['layers_done']} of {n} are written; cannot finalise {out}")
    rest, seen = {}, set()
    for name, t in model.state_dict().items():
        if name.startswith("model.layers."):
            continue
        if t.data_ptr() in seen:  # tied lm_head / embeddings: stored once
            continue
        seen.add(t.data_ptr())
        rest[name] = t
    ck.write_tensors(os.path.join(out, "model-rest.safetensors"), rest)
    sha = dict(prog["sha256"])
    sha["model-rest.safetensors"] = ck.sha256(os.path.join(out, "model-rest.safetensors"))
    weight_map = {}
    for i in range(n):
        prefix = adapter.layer_prefix(i) + "."
        for name in adapter.layers[i].state_dict(prefix=prefix):
            weight_map[name] = ck.layer_shard(i)
    for name in rest:
        weight_map[name] = "model-rest.safetensors"
    ck.write_json(os.path.join(out, ck.INDEX), {"metadata": {"format": "moequant", "sha256": sha},
                                                 "weight_map": weight_map})
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    cfg = model.config.to_dict()
    cfg["quantization_config"] = quantization_config(result)
    ck.write_json(os.path.join(out, "config.json"), cfg)  # last: a checkpoint with config.json is complete
