"""A model larger than CPU RAM: decoder layers read from the checkpoint's safetensors shards one at a time.

    model, layers = open_streamed(path)        # skeleton on the meta device; embeddings, final norm, head in RAM
    layers.load(i)                             # layer i's tensors from the shards (CPU)
    ...                                        # quantize it
    layers.release(i)                          # back to the meta device: its memory is freed

The quantization pipeline takes `layers` (`quantize_model(..., layer_source=layers)`): it materialises each layer
just before it is processed (on CUDA straight into pinned staging buffers and the GPU, in the background while the
previous layer computes) and releases it once its packed weights are written. CPU RAM then holds the embeddings, the
head and about one layer (two on CUDA, where the next layer is prefetched), whatever the model size. The shards
are memory-mapped, so reading a tensor allocates nothing beyond its destination.

Names on disk vs in memory. transformers 5 keeps the experts of a block fused in memory (`experts.gate_up_proj`
[E, 2I, H], `experts.down_proj` [E, H, I]), while checkpoints keep one tensor per expert (`experts.{j}.gate_proj`,
`up_proj`, `down_proj`; Mixtral `block_sparse_moe.experts.{j}.w1/w3/w2`). transformers' own conversion mapping
(`transformers.conversion_mapping.get_model_conversion_mapping`) says which checkpoint key feeds which parameter:
we rename every key with it (`rename_source_key`, the function `from_pretrained` uses) and interpret its two
expert converters — stack experts (MergeModulelist) and then join gate and up (Concatenate along dim 1) — as
places in the fused tensor, so each expert is copied once, straight to its destination. A checkpoint that already
stores fused tensors matches the parameter names directly. Any other converter runs through transformers' own
`convert` (a temporary copy of that tensor). For the six supported families the result equals `from_pretrained`'s
tensor for tensor (tests/test_streaming.py).
"""
from __future__ import annotations

import json
import logging
import mmap
import os
import struct
from dataclasses import dataclass, field

import torch
from torch import nn

log = logging.getLogger("moequant")

_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}
INDEX = "model.safetensors.index.json"


class SafetensorsCheckpoint:
    """The tensors of a Hugging Face checkpoint folder (one `model.safetensors`, or shards listed by
    `model.safetensors.index.json`), read by name as zero-copy views of the memory-mapped files."""

    def __init__(self, path: str):
        self.path = path
        index = os.path.join(path, INDEX)
        if os.path.isfile(index):
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        else:
            files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        if not files:
            raise FileNotFoundError(
                f"{path} has no safetensors weights (model.safetensors or {INDEX}); streaming layer by layer reads "
                f"safetensors only: re-save the model with save_pretrained(), or quantize without --low-cpu-mem")
        self._maps = {}
        self._where = {}  # name -> (file, dtype, shape, begin, end)
        for fname in files:
            with open(os.path.join(path, fname), "rb") as f:
                n = struct.unpack("<Q", f.read(8))[0]
                header = json.loads(f.read(n))
            base = 8 + n
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                if info["dtype"] not in _DTYPES:
                    raise ValueError(f"{fname}: tensor {name} has dtype {info['dtype']}, which layer streaming does not "
                                     f"read ({', '.join(_DTYPES)}); quantized (e.g. fp8) checkpoints must be "
                                     f"dequantized first")
                b, e = info["data_offsets"]
                self._where[name] = (fname, _DTYPES[info["dtype"]], tuple(info["shape"]), base + b, base + e)

    def keys(self) -> list[str]:
        return list(self._where)

    def nbytes(self) -> int:
        return sum(e - b for _, _, _, b, e in self._where.values())

    def dtype(self, name: str) -> torch.dtype:
        return self._where[name][1]

    def shape(self, name: str) -> tuple:
        return self._where[name][2]

    def view(self, name: str) -> torch.Tensor:
        """The tensor as stored, backed by the mapped file (copy-on-write: never written back)."""
        fname, dtype, shape, b, e = self._where[name]
        if fname not in self._maps:
            with open(os.path.join(self.path, fname), "rb") as f:
                self._maps[fname] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        count = (e - b) // torch.empty(0, dtype=dtype).element_size()
        if count == 0:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(self._maps[fname], dtype=dtype, count=count, offset=b).view(shape)


# -- where each checkpoint tensor goes -----------------------------------------------------------------------------

@dataclass
class _Piece:
    key: str  # checkpoint key
    index: tuple = ()  # where in the destination tensor (an indexing tuple; () = the whole tensor)


@dataclass
class _Target:
    """How one model tensor (parameter or persistent buffer) is assembled from the checkpoint."""

    pieces: list = field(default_factory=list)
    converter: object = None  # a transformers WeightConverter this plan does not interpret: run its `convert`
    converter_keys: list = field(default_factory=list)  # (source pattern, checkpoint key) in load order


def _conversion_plan(model: nn.Module, ckpt: SafetensorsCheckpoint, targets: dict[str, torch.Tensor]):
    """{model tensor name: _Target} and the checkpoint keys no model tensor takes."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import (Concatenate, MergeModulelist, WeightConverter, WeightRenaming,
                                                 dot_natural_key, rename_source_key)

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    plan: dict[str, _Target] = {}
    unexpected = []
    seen = {}  # (target, source pattern) -> number of keys so far: the expert's position, as transformers stacks them
    for key in sorted(ckpt.keys(), key=dot_natural_key):  # transformers' order: experts 0, 1, ..., 10, ...
        name, pattern = rename_source_key(key, renamings, converters, getattr(model, "base_model_prefix", None),
                                          targets)
        if name not in targets:
            unexpected.append(key)
            continue
        tgt = plan.setdefault(name, _Target())
        if pattern is None:  # stored under the model's own name (fused experts included): the whole tensor
            tgt.pieces.append(_Piece(key))
            continue
        conv = next(c for c in converters if pattern in c.source_patterns)
        ops = [type(op) for op in conv.operations]
        j = seen.get((name, pattern), 0)
        seen[(name, pattern)] = j + 1
        s = conv.source_patterns.index(pattern)
        rows = ckpt.shape(key)[0] if ckpt.shape(key) else 0
        if ops == [MergeModulelist] and len(conv.source_patterns) == 1 and conv.operations[0].dim == 0:
            tgt.pieces.append(_Piece(key, (j,)))  # stacked experts: expert j
        elif ops == [MergeModulelist, Concatenate] and conv.operations[0].dim == 0 and conv.operations[1].dim == 1:
            tgt.pieces.append(_Piece(key, (j, slice(s * rows, (s + 1) * rows))))  # expert j, gate rows then up rows
        else:
            tgt.converter = conv
            tgt.converter_keys.append((pattern, key))
    return plan, unexpected


def _state_slots(module: nn.Module):
    """(full name, owner module, attribute, is parameter) for every parameter and persistent buffer, tied ones once."""
    out, seen = [], set()
    for mname, mod in module.named_modules():
        for pname, p in mod._parameters.items():
            if p is not None and id(p) not in seen:
                seen.add(id(p))
                out.append((f"{mname}.{pname}" if mname else pname, mod, pname, True))
        for bname, b in mod._buffers.items():
            if b is not None and bname not in mod._non_persistent_buffers_set:
                out.append((f"{mname}.{bname}" if mname else bname, mod, bname, False))
    return out


def put_tensor(mod: nn.Module, attr: str, is_param: bool, t: torch.Tensor) -> None:
    """Point a module's parameter / buffer at `t` (to or from the meta device the object itself is replaced)."""
    cur = mod._parameters[attr] if is_param else mod._buffers[attr]
    if cur.device.type != "meta" and t.device.type != "meta":
        cur.data = t
    elif is_param:
        mod._parameters[attr] = nn.Parameter(t, requires_grad=cur.requires_grad)
    else:
        mod._buffers[attr] = t


class StreamedLayers:
    """Materialises the decoder layers of a meta-device model from a checkpoint, one at a time."""

    streamed = True

    def __init__(self, model: nn.Module, ckpt: SafetensorsCheckpoint):
        from .models.adapter import get_adapter

        self.model, self.ckpt = model, ckpt
        self.adapter = get_adapter(model)
        slots = _state_slots(model)
        self.slots = {n: (mod, attr, is_param) for n, mod, attr, is_param in slots}
        shapes = {n: (mod._parameters[a] if p else mod._buffers[a]) for n, (mod, a, p) in self.slots.items()}
        self.plan, unexpected = _conversion_plan(model, ckpt, shapes)
        if unexpected:
            log.info(f"{len(unexpected)} checkpoint tensors are not used by the model (e.g. {unexpected[:3]})")
        missing = [n for n in self.slots if n not in self.plan]
        if missing:
            raise ValueError(f"{ckpt.path}: the checkpoint has no tensors for {missing[:5]}"
                             f"{' ...' if len(missing) > 5 else ''} ({len(missing)} model tensors missing)")
        self.layer_names = []  # per layer: its tensor names
        for i in range(len(self.adapter.layers)):
            p = self.adapter.layer_prefix(i) + "."
            self.layer_names.append([n for n in self.slots if n.startswith(p)])
        in_layers = {n for names in self.layer_names for n in names}
        self.rest_names = [n for n in self.slots if n not in in_layers]

    # -- one tensor ---------------------------------------------------------------------------------------------------
    def meta_tensor(self, name: str) -> torch.Tensor:
        mod, attr, is_param = self.slots[name]
        return mod._parameters[attr] if is_param else mod._buffers[attr]

    def fill(self, name: str, dst: torch.Tensor) -> torch.Tensor:
        """Write model tensor `name` (as the model holds it: fused, in the model's dtype) into dst; returns dst."""
        tgt = self.plan[name]
        if tgt.converter is not None:  # a converter we do not interpret: transformers' own operations
            return dst.copy_(self._convert(name))
        for piece in tgt.pieces:
            src = self.ckpt.view(piece.key)
            part = dst[piece.index] if piece.index else dst
            if part.shape != src.shape:
                raise ValueError(f"checkpoint tensor {piece.key} {tuple(src.shape)} does not fit {name}"
                                 f"{list(piece.index) if piece.index else ''} {tuple(part.shape)}")
            part.copy_(src)
        return dst

    def _convert(self, name: str) -> torch.Tensor:
        import copy

        tgt = self.plan[name]
        conv = copy.deepcopy(tgt.converter)
        for pattern, key in tgt.converter_keys:
            conv.add_tensor(name, key, pattern, lambda key=key: self.ckpt.view(key).clone())
        out = conv.convert(name, model=self.model, config=self.model.config)
        return out[name] if name in out else next(iter(out.values()))

    def nbytes(self, names) -> int:
        return sum(self.meta_tensor(n).numel() * self.meta_tensor(n).element_size() for n in names)

    # -- whole layers -------------------------------------------------------------------------------------------------
    def entries(self, i: int):
        """[(name, module, attribute, is parameter)] of layer i."""
        return [(n, *self.slots[n]) for n in self.layer_names[i]]

    def load(self, i: int) -> None:
        """Layer i's tensors from the checkpoint into (pageable) CPU memory."""
        for name, mod, attr, is_param in self.entries(i):
            meta = self.meta_tensor(name)
            put_tensor(mod, attr, is_param, self.fill(name, torch.empty(meta.shape, dtype=meta.dtype)))

    def release(self, i: int) -> None:
        """Layer i back to the meta device (its memory is freed once nothing else holds it)."""
        for name, mod, attr, is_param in self.entries(i):
            cur = self.meta_tensor(name)
            put_tensor(mod, attr, is_param, torch.empty(cur.shape, dtype=cur.dtype, device="meta"))

    def load_rest(self) -> None:
        """Everything outside the decoder layers (embeddings, final norm, head) into CPU memory."""
        for name in self.rest_names:
            mod, attr, is_param = self.slots[name]
            meta = self.meta_tensor(name)
            put_tensor(mod, attr, is_param, self.fill(name, torch.empty(meta.shape, dtype=meta.dtype)))


# -- the model skeleton --------------------------------------------------------------------------------------------

def _checkpoint_dtype(config, ckpt: SafetensorsCheckpoint) -> torch.dtype:
    """What from_pretrained(dtype="auto") picks: the config's dtype, else the first floating tensor's."""
    dt = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dt, str):
        dt = getattr(torch, dt)
    if isinstance(dt, torch.dtype):
        return dt
    for name in ckpt.keys():
        if ckpt.dtype(name).is_floating_point:
            return ckpt.dtype(name)
    return torch.float32


def build_skeleton(path: str, dtype: torch.dtype | None = None, ckpt: SafetensorsCheckpoint | None = None):
    """The model of a local HF folder with its parameters on the meta device (no memory behind them); its
    non-persistent buffers (rotary frequencies) on the CPU, computed as from_pretrained computes them."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path, local_files_only=True)
    if getattr(config, "quantization_config", None):
        raise ValueError(f"{path} is an already quantized checkpoint ({config.quantization_config.get('quant_method')})"
                         f"; moequant quantizes float checkpoints")
    ckpt = ckpt or SafetensorsCheckpoint(path)
    dtype = dtype or _checkpoint_dtype(config, ckpt)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for mod in model.modules():  # as from_pretrained does after loading on the meta device: materialise, re-init
        names = [n for n, b in mod._buffers.items() if b is not None and n in mod._non_persistent_buffers_set]
        if names:
            for n in names:
                mod._buffers[n] = torch.empty_like(mod._buffers[n], device="cpu")
            model._init_weights(mod)
    return model.eval()


def open_streamed(path: str, dtype: torch.dtype | None = None):
    """(model, StreamedLayers): the skeleton with everything but the decoder layers loaded."""
    ckpt = SafetensorsCheckpoint(path)
    model = build_skeleton(path, dtype, ckpt)
    layers = StreamedLayers(model, ckpt)
    layers.load_rest()
    if getattr(model.config, "tie_word_embeddings", False):  # stored once; share it as from_pretrained does
        out, inp = model.get_output_embeddings(), model.get_input_embeddings()
        if out is not None and out.weight is not inp.weight:
            out.weight = inp.weight
    return model, layers


def checkpoint_bytes(path: str) -> int:
    """Bytes of a local checkpoint's weights (safetensors, else *.bin), 0 if none are found."""
    try:
        return SafetensorsCheckpoint(path).nbytes()
    except (FileNotFoundError, ValueError):
        return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".bin"))


def available_ram() -> int:
    """Bytes of memory available to a new allocation (MemAvailable), or 0 where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
