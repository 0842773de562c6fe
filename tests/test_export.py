"""GPTQ-format export: unpacked by an independent decoder written here, compared bit for bit with our weights."""
import json
import logging
import os

import numpy as np
import pytest
import torch
import transformers as T
from safetensors.torch import load_file

import moequant
from moequant.export import export_gptq, gptq_tensors, vllm_fast_path_warnings
from moequant.loading import packed_weights, read_checkpoint
from moequant.models import tiny_config
from moequant.packing import PackedWeight, dequantize, pack_int32


def stream_values(words: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Values of a little-endian bit stream held in int32 words (1-D), the way GPTQ v1 lays codes out:
    value n occupies stream bits [n*bits, (n+1)*bits), word 0's least significant bit first."""
    raw = np.ascontiguousarray(words.astype("<i4")).view(np.uint8)
    stream = np.unpackbits(raw, bitorder="little")[: count * bits].reshape(count, bits).astype(np.int64)
    return (stream << np.arange(bits)).sum(axis=1)


def decode_gptq(qweight, qzeros, scales, g_idx, bits) -> torch.Tensor:
    """A straightforward GPTQ v1 decoder: W[o, i] = (q[i, o] - (qz[g, o] + 1)) * scale[g, o], g = g_idx[i]."""
    qw, qz = qweight.numpy(), qzeros.numpy()
    in_f, out_f = qw.shape[0] * 32 // bits, qw.shape[1]
    q = np.stack([stream_values(qw[:, o], bits, in_f) for o in range(out_f)])  # [out, in]
    z = np.stack([stream_values(qz[g, :], bits, out_f) for g in range(qz.shape[0])]) + 1  # [G, out]
    gi = g_idx.numpy().astype(np.int64)
    s = scales.float().numpy()
    w = (q.astype(np.float32) - z[gi].T.astype(np.float32)) * s[gi].T
    return torch.from_numpy(w)


def quantized_checkpoint(tmp_path, model_type, **cfg):
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(tiny_config(model_type), dtype=torch.bfloat16).eval()
    calib = torch.randint(3, 256, (4, 32), generator=torch.Generator().manual_seed(1))
    out = str(tmp_path / "q")
    moequant.quantize(model, calib_tokens=calib, output_dir=out, progress=False, batch_size=4, **cfg)
    return out


CASES = {
    "mixtral-w4-sym-g32": ("mixtral", dict(method="rtn", bits=4, group_size=32)),
    "qwen2_moe-w8-asym-actorder-router": ("qwen2_moe", dict(method="gptq", bits=8, group_size=32, sym=False,
                                                            act_order=True,
                                                            targets=("experts", "shared", "attn", "router"))),
    "deepseek_v2-w3-perchannel": ("deepseek_v2", dict(method="gptq", bits=3, group_size=-1)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_export_decodes_to_our_weights_bit_for_bit(tmp_path, case, caplog):
    model_type, cfg = CASES[case]
    src = quantized_checkpoint(tmp_path, model_type, **cfg)
    dst = str(tmp_path / "gptq")
    with caplog.at_level(logging.WARNING, logger="moequant"):
        qc = export_gptq(src, dst)
    _, qcfg, tensors = read_checkpoint(src)
    ours = packed_weights(tensors, qcfg)
    exported = {}
    for f in os.listdir(dst):
        if f.endswith(".safetensors"):
            exported.update(load_file(os.path.join(dst, f)))
    config = json.load(open(os.path.join(dst, "config.json")))
    assert config["quantization_config"] == qc
    assert qc["quant_method"] == "gptq" and qc["bits"] == cfg["bits"] and qc["group_size"] == cfg["group_size"]
    assert qc["sym"] == cfg.get("sym", True) and qc["desc_act"] == cfg.get("act_order", False)
    index = json.load(open(os.path.join(dst, "model.safetensors.index.json")))
    assert set(index["weight_map"]) == set(exported)

    block = "block_sparse_moe" if model_type == "mixtral" else "mlp"
    gate_n, up_n, down_n = ("w1", "w3", "w2") if model_type == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    bits = cfg["bits"]
    checked = set()

    def check(prefix, ref):
        got = decode_gptq(exported[f"{prefix}.qweight"], exported[f"{prefix}.qzeros"], exported[f"{prefix}.scales"],
                          exported[f"{prefix}.g_idx"], bits)
        assert exported[f"{prefix}.qweight"].dtype == torch.int32 and exported[f"{prefix}.scales"].dtype == torch.float16
        assert torch.equal(got, ref), prefix
        checked.update(f"{prefix}.{s}" for s in ("qweight", "qzeros", "scales", "g_idx"))

    for base, p in ours.items():
        dense = dequantize(p, torch.float32)
        if base.endswith(".mlp.experts.gate_up_proj") or base.endswith(".mlp.experts.down_proj"):
            experts = base.rsplit(".", 1)[0].replace(".mlp.", f".{block}.")
            I = dense.shape[1] // 2
            for j in range(dense.shape[0]):
                if base.endswith("gate_up_proj"):
                    check(f"{experts}.{j}.{gate_n}", dense[j, :I])
                    check(f"{experts}.{j}.{up_n}", dense[j, I:])
                else:
                    check(f"{experts}.{j}.{down_n}", dense[j])
        elif base.endswith(".mlp.gate") or base.endswith(".mlp.shared_expert_gate"):  # engines keep these dense
            assert torch.equal(exported[base + ".weight"], dense.to(torch.bfloat16)), base
            checked.add(base + ".weight")
        else:
            check(base.replace(".mlp.", f".{block}."), dense)
    n_experts = tiny_config(model_type).to_dict().get("num_local_experts") or 8
    assert sum(k.endswith(f".{down_n}.qweight") and ".experts." in k for k in checked) == n_experts * sum(
        b.endswith(".mlp.experts.down_proj") for b in ours)
    # Every other tensor is carried unchanged, under the original checkpoint's name.
    _, plain = moequant.checkpoint.split_packed(tensors)
    for name, t in plain.items():
        disk = name.replace(".mlp.", f".{block}.")
        assert torch.equal(exported[disk], t), name
        checked.add(disk)
    assert checked == set(exported)

    warned = " ".join(r.getMessage() for r in caplog.records)
    for msg in vllm_fast_path_warnings(bits, cfg.get("sym", True), cfg.get("act_order", False), cfg["group_size"]):
        assert msg in warned
    if "router" in cfg.get("targets", ()):
        assert "written dequantized" in warned
    if case.startswith("mixtral"):
        assert not warned, warned  # symmetric 4-bit g32: vLLM's fast path, nothing to say


def test_zero_point_zero_is_clamped_with_a_warning():
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (32, 64), generator=gen)
    zeros = torch.randint(1, 16, (2, 32), generator=gen).to(torch.uint8)
    zeros[0, 3] = 0
    p = PackedWeight(pack_int32(codes, 4), (torch.rand(2, 32, generator=gen) + 0.5).to(torch.float16), zeros, None,
                     4, 32)
    notes = {}
    t = gptq_tensors(p, "x", notes)
    assert notes == {"zero_clamped": 1}
    z = decode_gptq(t["x.qweight"], t["x.qzeros"], t["x.scales"], t["x.g_idx"], 4)
    fixed = PackedWeight(p.qweight, p.scales, zeros.clamp(min=1), None, 4, 32)
    assert torch.equal(z, dequantize(fixed, torch.float32))


def test_export_refuses_a_nonempty_directory(tmp_path):
    src = quantized_checkpoint(tmp_path, "olmoe", method="rtn", bits=4, group_size=32)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("")
    with pytest.raises(FileExistsError, match="overwrite"):
        export_gptq(src, str(tmp_path / "busy"))
