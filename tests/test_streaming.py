"""Models larger than CPU RAM: decoder layers read from the checkpoint's safetensors shards one at a time."""
import json
import os
import subprocess
import sys

import pytest
import torch
import transformers as T
from safetensors.torch import load_file, save_file

import moequant
from conftest import make_tiny
from moequant import checkpoint as ck
from moequant.config import QuantConfig
from moequant.models import SUPPORTED_MODEL_TYPES, get_adapter
from moequant.pipeline import quantize_model
from moequant.streaming import open_streamed


def _save(model, path, **kw):
    model.save_pretrained(path, **kw)
    return str(path)


def _bytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("model_type", SUPPORTED_MODEL_TYPES)
def test_streamed_layers_equal_from_pretrained(tmp_path, model_type):
    """Per-expert names on disk (Mixtral w1/w3/w2, the others gate/up/down_proj) land in the fused parameters exactly
    where from_pretrained puts them; buffers (rotary frequencies) are computed the same way."""
    path = _save(make_tiny(model_type, layers=2), tmp_path / "m", max_shard_size="100KB")  # several shards + index
    assert os.path.isfile(os.path.join(path, "model.safetensors.index.json"))
    ref = T.AutoModelForCausalLM.from_pretrained(path)
    model, layers = open_streamed(path)
    assert all(p.is_meta for p in model.model.layers.parameters())  # nothing of the layers before load()
    for i in range(len(model.model.layers)):
        layers.load(i)
    got, want = model.state_dict(), ref.state_dict()
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
    for (name, a), (_, b) in zip(ref.named_buffers(), model.named_buffers()):
        assert torch.equal(a, b), name
    layers.release(0)
    assert all(p.is_meta for p in model.model.layers[0].parameters())


def test_fused_names_on_disk_and_a_dtype_change(tmp_path):
    """A checkpoint that stores the fused tensors under the model's own names loads directly; a bf16 model
    from an fp32 checkpoint gets from_pretrained's rounding."""
    m = make_tiny("qwen3_moe")
    m.config.save_pretrained(tmp_path)
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(tmp_path / "model.safetensors"))
    model, layers = open_streamed(str(tmp_path), dtype=torch.bfloat16)
    layers.load(1)
    for k, v in model.model.layers[1].state_dict().items():
        assert torch.equal(v, m.model.layers[1].state_dict()[k].to(torch.bfloat16)), k


@pytest.fixture(scope="module")
def calib():
    return torch.randint(3, 256, (4, 32), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe", "deepseek_v2"])
def test_streamed_quantization_is_bit_identical_and_holds_one_layer(tmp_path, calib, model_type):
    path = _save(make_tiny(model_type, layers=4), tmp_path / "m")
    cfg = QuantConfig(method="agq", group_size=32, batch_size=2, device="cpu")
    normal = quantize_model(T.AutoModelForCausalLM.from_pretrained(path), cfg, calib, progress=False)

    model, layers = open_streamed(path)
    decoder = get_adapter(model).layers
    layer_bytes = [_bytes(layers.meta_tensor(n) for n in names) for names in layers.layer_names]
    peak = [0]

    def resident(*_):  # decoder-layer bytes materialised right now, read from the model itself
        peak[0] = max(peak[0], _bytes(p for p in decoder.parameters() if not p.is_meta))

    for layer in decoder:
        layer.register_forward_pre_hook(resident)
    streamed = quantize_model(model, cfg, calib, progress=False, layer_source=layers,
                              on_layer_done=lambda *a: resident())
    assert streamed.packed.keys() == normal.packed.keys()
    for k, p in normal.packed.items():
        q = streamed.packed[k]
        assert torch.equal(p.qweight, q.qweight) and torch.equal(p.scales, q.scales), k
    assert peak[0] == max(layer_bytes)  # one layer at a time ...
    assert peak[0] < sum(layer_bytes) / 3  # ... never the model (4 or 5 layers here)
    assert all(p.is_meta for p in decoder.parameters())  # all released


def test_streamed_checkpoint_through_the_api_matches_and_resumes(tmp_path, calib, monkeypatch):
    path = _save(make_tiny("deepseek_v3", layers=2), tmp_path / "m")
    kw = dict(method="agq", group_size=32, batch_size=2, calib_tokens=calib, progress=False, device="cpu")
    moequant.quantize(T.AutoModelForCausalLM.from_pretrained(path), output_dir=str(tmp_path / "normal"), **kw)
    res = moequant.quantize(path, low_cpu_mem=True, output_dir=str(tmp_path / "streamed"), **kw)
    assert res.packed == {}  # written to the checkpoint, not kept in RAM

    # interrupted after layer 0, then resumed (also streamed): the same checkpoint again
    write_layer = moequant.api._LayerWriter.__call__

    def interrupt(self, i, *args):
        write_layer(self, i, *args)
        if i == 0:
            raise KeyboardInterrupt

    monkeypatch.setattr(moequant.api._LayerWriter, "__call__", interrupt)
    with pytest.raises(KeyboardInterrupt):
        moequant.quantize(path, low_cpu_mem=True, output_dir=str(tmp_path / "cut"), **kw)
    monkeypatch.setattr(moequant.api._LayerWriter, "__call__", write_layer)
    moequant.quantize(path, low_cpu_mem=True, output_dir=str(tmp_path / "cut"), resume=True,
                      **{**kw, "calib_tokens": None})
    shards = sorted(f for f in os.listdir(tmp_path / "normal") if f.endswith(".safetensors"))
    for run in ("streamed", "cut"):
        assert sorted(f for f in os.listdir(tmp_path / run) if f.endswith(".safetensors")) == shards
        for f in shards:
            a, b = load_file(str(tmp_path / "normal" / f)), load_file(str(tmp_path / run / f))
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), (run, f)
    index = json.load(open(tmp_path / "streamed" / ck.INDEX))
    assert index["weight_map"] == json.load(open(tmp_path / "normal" / ck.INDEX))["weight_map"]
    loaded = moequant.load(str(tmp_path / "streamed"))
    with torch.no_grad():
        assert torch.isfinite(loaded(calib).logits).all()


def test_streaming_refuses_what_needs_the_whole_model(tmp_path):
    path = _save(make_tiny("olmoe"), tmp_path / "m")
    with pytest.raises(ValueError, match="whole model"):
        moequant.quantize(path, low_cpu_mem=True, rotate="hadamard", method="rtn", group_size=32, progress=False)
    with pytest.raises(ValueError, match="EBSS"):
        moequant.quantize(path, low_cpu_mem=True, method="moequant", group_size=32, progress=False)
    (tmp_path / "bin").mkdir()
    make_tiny("olmoe").config.save_pretrained(tmp_path / "bin")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        moequant.quantize(str(tmp_path / "bin"), low_cpu_mem=True, method="rtn", group_size=32, progress=False)


def test_auto_streams_when_the_weights_exceed_the_ram(tmp_path, monkeypatch, caplog):
    import moequant.streaming as st

    path = _save(make_tiny("mixtral"), tmp_path / "m")
    monkeypatch.setattr(st, "available_ram", lambda: 10 * st.checkpoint_bytes(path))
    assert moequant.api.open_model(path)[1] is None  # fits: loaded whole
    monkeypatch.setattr(st, "available_ram", lambda: st.checkpoint_bytes(path))
    model, source = moequant.api.open_model(path)
    assert source is not None and "one at a time" in caplog.text
    assert all(p.is_meta for p in model.model.layers.parameters())


def test_cli_low_cpu_mem(tiny_mixtral_dir, tmp_path):
    out = tmp_path / "q"
    r = subprocess.run([sys.executable, "-m", "moequant.cli", "quantize", tiny_mixtral_dir, "--low-cpu-mem", "on",
                        "--method", "agq", "--group-size", "32", "--num-samples", "4", "--seq-len", "32",
                        "--out", str(out), "--quiet"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "evaluation" in r.stderr and "skipped" in r.stderr  # said, not silently dropped
    assert json.load(open(out / "config.json"))["quantization_config"]["method"] == "agq"
    assert moequant.load(str(out)) is not None
