"""The quantized checkpoint: save -> load -> generate, integrity checks, config.json, and resume."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

import moequant
from moequant import checkpoint as ck
from moequant.nn import QuantExperts, QuantLinear
from conftest import clone_model, make_tiny


@pytest.fixture(scope="module")
def calib():
    return torch.randint(3, 256, (4, 32), generator=torch.Generator().manual_seed(0))


def _quantize(model, out, calib, **kw):
    cfg = dict(method="gptq", bits=4, group_size=32, calib_tokens=calib, output_dir=str(out), progress=False,
               batch_size=4)
    return moequant.quantize(model, **{**cfg, **kw})


def _generate(model, prompt, n=12):
    with torch.no_grad():
        return model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False)


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe", "deepseek_v3"])
def test_save_load_generates_the_same_tokens(tmp_path, calib, model_type):
    model = make_tiny(model_type)
    _quantize(model, tmp_path / "q", calib)  # the in-memory model now holds the quantized weights
    loaded = moequant.load(str(tmp_path / "q"))
    n_moe = sum(isinstance(m, QuantExperts) for m in loaded.modules())
    assert n_moe == len(moequant.get_adapter(model).moe_blocks()) and n_moe > 0
    assert any(isinstance(m, QuantLinear) for m in loaded.modules())
    prompt = calib[:2, :6]
    with torch.no_grad():
        ref, got = model(calib).logits, loaded(calib).logits
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(_generate(loaded, prompt), _generate(model, prompt))
    # dequantize=True: the same numbers in the model's own dense parameters
    dense = moequant.load(str(tmp_path / "q"), dequantize=True)
    assert not any(isinstance(m, (QuantExperts, QuantLinear)) for m in dense.modules())
    with torch.no_grad():
        torch.testing.assert_close(dense(calib).logits, ref, rtol=1e-5, atol=1e-5)


def test_config_json_records_the_quantization(tmp_path):
    model = make_tiny("olmoe")
    two_tokens = torch.tensor([[5, 9]])  # 2 tokens x top-2 = 4 routed pairs < 8 experts: some experts get none
    res = _quantize(model, tmp_path / "q", two_tokens, method="agq", sym=False, batch_size=1)
    cfg = json.load(open(tmp_path / "q" / "config.json"))
    qc = cfg["quantization_config"]
    assert cfg["model_type"] == "olmoe"
    assert (qc["quant_method"], qc["method"], qc["bits"], qc["group_size"], qc["sym"], qc["act_order"]) == (
        "moequant", "agq", 4, 32, False, False)
    assert qc["calibration"] == {"source": "tokens", "shape": [1, 2]}
    assert qc["empty_expert_policy"] == "rtn"
    for layer in res.layers:  # the per-layer empty-expert decisions, as the run made them
        for pname, rec in layer["experts"].items():
            empty = [j for j, n in enumerate(rec["tokens_per_expert"]) if n == 0]
            assert len(empty) >= 8 - 4
            assert qc["empty_experts"][str(layer["layer"])][pname] == empty
    files = os.listdir(tmp_path / "q")
    assert all(f.endswith((".json", ".safetensors")) for f in files), files  # no pickle anywhere
    assert not any(f.startswith(".tmp-") for f in files)  # no temp file left behind


def test_truncated_or_tampered_shard_fails_to_load(tmp_path, calib):
    _quantize(make_tiny("mixtral"), tmp_path / "q", calib, method="rtn")
    shard = tmp_path / "q" / ck.layer_shard(1)
    data = shard.read_bytes()

    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(ck.CorruptCheckpointError, match="checksum"):
        moequant.load(str(tmp_path / "q"))

    flipped = bytearray(data)
    flipped[-7] ^= 0x01  # one bit of one tensor value
    shard.write_bytes(bytes(flipped))
    with pytest.raises(ck.CorruptCheckpointError, match="checksum"):
        moequant.load(str(tmp_path / "q"))

    shard.write_bytes(data)
    moequant.load(str(tmp_path / "q"))  # restored: loads again

    os.remove(shard)
    with pytest.raises(ck.CorruptCheckpointError, match="missing"):
        moequant.load(str(tmp_path / "q"))


def test_unfinished_checkpoint_is_not_loadable(tmp_path, calib):
    _quantize(make_tiny("mixtral"), tmp_path / "q", calib, method="rtn")
    os.remove(tmp_path / "q" / "config.json")  # config.json is written last: without it the run did not finish
    with pytest.raises(FileNotFoundError, match="resume"):
        moequant.load(str(tmp_path / "q"))


def test_atomic_write_leaves_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "x.safetensors"
    ck.write_tensors(str(target), {"a": torch.arange(4)})

    def crash(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(ck, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        ck.write_tensors(str(target), {"a": torch.arange(8)})
    assert torch.equal(load_file(str(target))["a"], torch.arange(4))  # the old file is intact
    assert os.listdir(tmp_path) == ["x.safetensors"]  # and no temp file is left


class Interrupted(Exception):
    pass


@pytest.mark.parametrize("model_type,stop_after", [("deepseek_v2", 1), ("qwen2_moe", 0)])
def test_resume_gives_the_same_checkpoint_bit_for_bit(tmp_path, calib, monkeypatch, model_type, stop_after):
    base = make_tiny(model_type, layers=3)
    n_layers = len(moequant.get_adapter(base).layers)
    _quantize(clone_model(base), tmp_path / "full", calib, method="agq")

    write_layer = moequant.api._LayerWriter.__call__

    def interrupt_after(self, i, *args):
        write_layer(self, i, *args)  # layer i is persisted (shard + progress.json) ...
        if i == stop_after:
            raise Interrupted  # ... and the run dies before layer i + 1

    monkeypatch.setattr(moequant.api._LayerWriter, "__call__", interrupt_after)
    with pytest.raises(Interrupted):
        _quantize(clone_model(base), tmp_path / "cut", calib, method="agq")
    monkeypatch.setattr(moequant.api._LayerWriter, "__call__", write_layer)
    prog = json.load(open(tmp_path / "cut" / ck.PROGRESS))
    assert prog["layers_done"] == list(range(stop_after + 1))
    assert not (tmp_path / "cut" / "config.json").exists()

    with pytest.raises(FileExistsError, match="resume"):
        _quantize(clone_model(base), tmp_path / "cut", calib, method="agq")
    with pytest.raises(ValueError, match="different settings"):
        _quantize(clone_model(base), tmp_path / "cut", calib, method="agq", bits=3, resume=True)

    resumed_layers = []
    monkeypatch.setattr(moequant.api._LayerWriter, "__call__",
                        lambda self, i, *a: (resumed_layers.append(i), write_layer(self, i, *a)))
    _quantize(clone_model(base), tmp_path / "cut", None, method="agq", resume=True)
    assert resumed_layers == list(range(stop_after + 1, n_layers))  # restarts at layer L + 1

    for f in sorted(os.listdir(tmp_path / "full")):
        if f.endswith(".safetensors"):
            a, b = load_file(str(tmp_path / "full" / f)), load_file(str(tmp_path / "cut" / f))
            assert a.keys() == b.keys(), f
            for k in a:
                assert torch.equal(a[k], b[k]), f"{f}: {k}"
    qa = json.load(open(tmp_path / "full" / "config.json"))["quantization_config"]
    qb = json.load(open(tmp_path / "cut" / "config.json"))["quantization_config"]
    strip = lambda q: {k: v for k, v in q.items() if k not in ("times", "layers")}
    assert strip(qa) == strip(qb)
