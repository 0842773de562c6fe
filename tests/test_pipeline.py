"""The layer-by-layer pipeline end to end on tiny models of all six architectures."""
import json
import logging

import pytest
import torch
import transformers as T
from safetensors.torch import load_file

import moequant
from conftest import clone_model, make_tiny
from moequant.models import get_adapter, tiny_config


def _rel_err(model, ref_logits, ids):
    with torch.no_grad():
        out = model(ids).logits
    return ((out - ref_logits).norm() / ref_logits.norm()).item()


@pytest.fixture(scope="module")
def calib():
    return torch.randint(3, 256, (8, 48), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("method", ["rtn", "gptq", "agq"])
def test_methods_run_end_to_end(model_type, method, calib):
    model = make_tiny(model_type)
    with torch.no_grad():
        ref = model(calib).logits
    q = clone_model(model)
    res = moequant.quantize(q, method=method, bits=4, group_size=32, calib_tokens=calib, progress=False,
                            batch_size=4)
    adapter = get_adapter(q)
    n_moe = len(adapter.moe_blocks())
    assert sum(k.endswith(".mlp.experts.gate_up_proj") for k in res.packed) == n_moe
    assert sum(k.endswith(".mlp.experts.down_proj") for k in res.packed) == n_moe
    for name, p in res.packed.items():  # what is in the model is exactly what was packed
        param = q.get_parameter(name if ".mlp.experts." in name + "." else name + ".weight")
        assert torch.equal(p.dequantize(param.dtype), param.data), name
    err = _rel_err(q, ref, calib)
    assert 0 < err < 0.3, err
    assert len(res.layers) == len(adapter.layers) and all("capture" in m["times"] for m in res.layers)


def test_error_grows_as_bits_shrink(model_type, calib):
    model = make_tiny(model_type)
    with torch.no_grad():
        ref = model(calib).logits
    errs = {}
    for bits in (8, 4, 3, 2):
        q = clone_model(model)
        moequant.quantize(q, method="gptq", bits=bits, group_size=32, calib_tokens=calib, progress=False)
        errs[bits] = _rel_err(q, ref, calib)
    assert errs[8] < 0.05, errs  # 8 bits: near-lossless (routing flips keep it above round-off)
    assert errs[8] < errs[4] < errs[3] < errs[2], errs


def test_gptq_and_agq_beat_rtn_on_calibration_data(calib):
    model = make_tiny("mixtral")
    with torch.no_grad():
        ref = model(calib).logits
    errs = {}
    for method in ("rtn", "gptq", "agq"):
        q = clone_model(model)
        moequant.quantize(q, method=method, bits=3, group_size=32, calib_tokens=calib, progress=False)
        errs[method] = _rel_err(q, ref, calib)
    assert errs["gptq"] < errs["rtn"] and errs["agq"] < errs["rtn"], errs


def _starve_expert(model, j):
    """Make expert j of every MoE block unreachable: the router's choices of j go to expert j+1 instead."""
    def reroute(_mod, _args, out):
        logits, weights, index = out
        return logits, weights, torch.where(index == j, j + 1, index)

    for _, b in get_adapter(model).moe_blocks():
        b.router.register_forward_hook(reroute)
    return model


def test_empty_expert_policies(calib, caplog):
    base = make_tiny("mixtral")
    with pytest.raises(RuntimeError, match=r"experts \[3\] received no calibration tokens"):
        moequant.quantize(_starve_expert(clone_model(base), 3), method="agq", group_size=32, calib_tokens=calib,
                          progress=False,
                          empty_expert="error")
    for policy in ("rtn", "identity"):
        q = _starve_expert(clone_model(base), 3)
        with caplog.at_level(logging.WARNING, logger="moequant"):
            res = moequant.quantize(q, method="agq", group_size=32, calib_tokens=calib, progress=False,
                                    empty_expert=policy)
        assert f"policy {policy}" in caplog.text
        rec = res.layers[0]["experts"]["gate_up_proj"]
        assert rec["empty_experts"] == [3] and rec["policy"] == policy and rec["tokens_per_expert"][3] == 0
        # the starved expert is quantized by the policy, never zeroed by GPTQ's dead-column rule
        w = q.model.layers[0].mlp.experts.gate_up_proj[3]
        assert w.abs().sum() > 0
        rtn = moequant.quantize(make_tiny("mixtral"), method="rtn", group_size=32, progress=False)
        torch.testing.assert_close(w, rtn.model.model.layers[0].mlp.experts.gate_up_proj[3])


def test_all_experts_calibration(calib):
    q = make_tiny("olmoe")
    res = moequant.quantize(q, method="gptq", group_size=32, calib_tokens=calib, progress=False,
                            calibration="all-experts")
    counts = res.layers[0]["experts"]["gate_up_proj"]["tokens_per_expert"]
    assert counts == [calib.numel()] * 8
    with pytest.raises(ValueError, match="routed affinity"):
        moequant.QuantConfig(method="agq", calibration="all-experts")


def test_act_order_roundtrip(tmp_path, calib):
    q = make_tiny("qwen3_moe")
    res = moequant.quantize(q, method="gptq", group_size=32, act_order=True, calib_tokens=calib, progress=False,
                            output_dir=str(tmp_path / "o"))
    p = res.packed["model.layers.0.mlp.experts.gate_up_proj"]
    assert p.g_idx is not None and p.g_idx.shape == (8, 64)
    loaded = moequant.load(str(tmp_path / "o"))
    with torch.no_grad():
        assert torch.equal(loaded(calib).logits, q(calib).logits)


def test_targets_choose_the_linears(calib):
    q = make_tiny("deepseek_v3")
    before = {k: v.clone() for k, v in q.state_dict().items()}
    res = moequant.quantize(q, method="rtn", group_size=32, targets=("experts",), progress=False)
    assert all("experts" in k for k in res.packed)
    after = q.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".mlp.experts." in k for k in changed)


def test_unsupported_architecture_names_the_supported_ones():
    cfg = T.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=2)
    with pytest.raises(moequant.UnsupportedModelError, match="mixtral, qwen2_moe"):
        moequant.quantize(T.AutoModelForCausalLM.from_config(cfg), method="rtn")


def test_group_size_not_dividing_fails_before_work():
    with pytest.raises(ValueError, match="does not divide"):
        moequant.quantize(make_tiny("mixtral"), method="rtn", group_size=48)


def test_moequant_method_runs_ebss_then_agq(model_type, tmp_path):
    """--method moequant = EBSS calibration (self-generated, no text) + AGQ, end to end, checkpoint included."""
    q = make_tiny(model_type)
    res = moequant.quantize(q, method="moequant", bits=4, group_size=32, num_samples=3, seq_len=12,
                            ebss={"width": 2, "tau": 1.2}, progress=False, output_dir=str(tmp_path / "o"))
    assert res.calibration["source"] == "ebss" and res.calibration["config"]["width"] == 2
    qc = json.load(open(tmp_path / "o" / "config.json"))["quantization_config"]
    assert qc["method"] == "moequant" and qc["calibration"]["source"] == "ebss"
    tokens = load_file(str(tmp_path / "o" / "calibration.safetensors"))["input_ids"]
    assert tokens.shape == (3, 12)


@pytest.mark.parametrize("dequantize", [False, True])
def test_tied_embeddings_survive_save_and_load(tmp_path, calib, dequantize):
    """A model with tie_word_embeddings (the shipped zoo models) stores the matrix once and reloads it tied."""
    cfg = tiny_config("mixtral")
    cfg.tie_word_embeddings = True
    torch.manual_seed(0)
    q = T.AutoModelForCausalLM.from_config(cfg).eval()
    assert q.lm_head.weight.data_ptr() == q.model.embed_tokens.weight.data_ptr()
    moequant.quantize(q, method="gptq", group_size=32, calib_tokens=calib, progress=False,
                      output_dir=str(tmp_path / "o"))
    loaded = moequant.load(str(tmp_path / "o"), dequantize=dequantize)
    with torch.no_grad():
        torch.testing.assert_close(loaded(calib).logits, q(calib).logits)
