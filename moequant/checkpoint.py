"""The quantized checkpoint on disk: safetensors shards, an index with checksums, config.json.

    out/
      config.json                       the model config + "quantization_config" (written last: marks completion)
      model-layer-00000.safetensors     one shard per decoder layer (packed + unquantized tensors of that layer)
      model-rest.safetensors            embeddings, final norm, lm_head
      model.safetensors.index.json      weight_map + sha256 of every shard
      progress.json                     layers finished so far (the resume point)
      tokenizer files                   copied when a tokenizer is given

Packed tensors are named `<parameter path without .weight>.{qweight,scales,qzeros,g_idx}` (moequant/packing.py).
Every file is written to a temporary name and renamed into place, so a crash never leaves a half-written file.
No pickle anywhere: tensors in safetensors, the rest JSON.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .packing import PackedWeight

FORMAT_VERSION = 1
INDEX = "model.safetensors.index.json"
PROGRESS = "progress.json"
PACKED_SUFFIXES = ("qweight", "scales", "qzeros", "g_idx")


class CorruptCheckpointError(RuntimeError):
    pass


def atomic_write(path, write) -> None:
    """Run write(tmp) on a temporary file beside `path`, then rename it into place (never a half-written file)."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=os.path.basename(path))
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json(path: str, obj) -> None:
    def w(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
    atomic_write(path, w)


def read_json(path: str):
    with open(path) as f:
        return json.load(f)


def write_tensors(path: str, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def layer_shard(i: int) -> str:
    return f"model-layer-{i:05d}.safetensors"


def layer_tensors(model_state: dict[str, torch.Tensor], prefix: str, packed: dict[str, PackedWeight]):
    """All tensors of one layer for its shard: packed weights, plus every other parameter/buffer of the layer."""
    out = {}
    for name, p in packed.items():
        out.update(p.tensors(name))
    quantized = set(packed)
    for name, t in model_state.items():
        if not name.startswith(prefix + "."):
            continue
        if name in quantized or (name.endswith(".weight") and name[: -len(".weight")] in quantized):
            continue  # stored packed: a fused experts parameter, or a Linear's weight (its bias stays plain)
        out[name] = t
    return out


def verify_and_load_shard(path: str, expected_sha: str | None) -> dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise CorruptCheckpointError(f"shard {path} is missing; the checkpoint is incomplete — re-run quantization "
                                     f"(with --resume to continue)")
    if expected_sha is not None and sha256(path) != expected_sha:
        raise CorruptCheckpointError(f"shard {path} does not match its checksum in {INDEX} (truncated or modified); "
                                     f"re-copy it or re-run quantization")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise CorruptCheckpointError(f"shard {path} cannot be read ({e}); re-copy it or re-run quantization") from e


def packed_from_tensors(tensors: dict[str, torch.Tensor], base: str, qcfg: dict) -> PackedWeight:
    get = lambda s: tensors.get(f"{base}.{s}")
    return PackedWeight(get("qweight"), get("scales"), get("qzeros"), get("g_idx"), qcfg["bits"],
                        _group_size(get("qweight"), get("scales"), qcfg))


def _group_size(qweight, scales, qcfg) -> int:
    in_f = qweight.shape[-2] * 32 // qcfg["bits"]
    return in_f // scales.shape[-2]


def dense_param_name(base: str, state_keys) -> str:
    """The model parameter a packed weight replaces: a fused experts tensor itself, or a Linear's `.weight`."""
    return base if base in state_keys else base + ".weight"


def split_packed(tensors: dict[str, torch.Tensor]) -> tuple[set[str], dict[str, torch.Tensor]]:
    """Names of packed weights (bases with a .qweight) and the remaining plain tensors."""
    bases = {k[: -len(".qweight")] for k in tensors if k.endswith(".qweight")}
    plain = {k: v for k, v in tensors.items() if not (k.rsplit(".", 1)[0] in bases and k.rsplit(".", 1)[1] in
                                                      PACKED_SUFFIXES)}
    return bases, plain
