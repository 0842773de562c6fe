"""Offline Hadamard rotation: the rotated model is the same function, saves/reloads as plain HF, spreads outliers.

Tolerance for "same function" in float32: max|logits_rot − logits| / max|logits| < 1e-4 (measured ~5e-7).
"""
import logging
import math

import pytest
import torch
import transformers as T

import moequant
from moequant.models import SUPPORTED_MODEL_TYPES, get_adapter, tiny_config
from moequant.rotate import Rotation, fold_norms, hadamard_factor, random_hadamard, rotate_model

REL_TOL = 1e-4


def build(model_type, seed=0, dtype=torch.float32, tie=False, **cfg_kw):
    """A tiny model with non-trivial norm scales (so folding is really exercised), routers and V3's bias random."""
    cfg = tiny_config(model_type, **{k: v for k, v in cfg_kw.items() if k in ("hidden",)})
    for k, v in cfg_kw.items():
        if k != "hidden":
            setattr(cfg, k, v)
    cfg.tie_word_embeddings = tie
    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(cfg).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # residual norms and the internal q/k/kv_a norms alike
                p.copy_(torch.rand(p.shape, generator=g) * 1.5 + 0.25)
            elif name.endswith("mlp.gate.weight"):  # routers: make sure routing depends on the input
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        for _, b in get_adapter(model).moe_blocks():
            bias = getattr(b.router, "e_score_correction_bias", None)
            if bias is not None:
                bias.copy_(torch.rand(bias.shape, generator=g) * 0.1)
    return model.to(dtype)


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def residual_norms(model):
    a = get_adapter(model)
    return [a.backbone.norm] + [n for lay in a.layers for n in (lay.input_layernorm, lay.post_attention_layernorm)]


IDS = torch.randint(3, 256, (2, 24), generator=torch.Generator().manual_seed(7))


# -- the rotation matrix -------------------------------------------------------------------------------------------
def _sylvester(n):
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


@pytest.mark.parametrize("n, p2, m", [(64, 64, 1), (80, 4, 20), (96, 8, 12), (12, 1, 12), (28, 1, 28)])
def test_random_hadamard_is_a_signed_kronecker_hadamard(n, p2, m):
    q = random_hadamard(n, seed=3)
    assert torch.allclose(q @ q.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(q.abs(), torch.full_like(q, 1 / math.sqrt(n)), atol=1e-12)  # a Hadamard matrix / √n
    got_p2, k = hadamard_factor(n)
    assert (got_p2, k.shape[0]) == (p2, m)
    # independent construction: Q = (Sylvester_{2^a} ⊗ K) · diag(s) / √n, for the signs s the fast transform used
    had = torch.kron(_sylvester(p2), k)
    signs = torch.sign((had.T @ q).diagonal())
    assert torch.equal(signs.abs(), torch.ones(n, dtype=torch.float64))
    assert torch.allclose(q, had * signs[None, :] / math.sqrt(n), atol=1e-12)


def test_random_hadamard_seeding_and_fast_apply():
    assert torch.equal(random_hadamard(96, 5), random_hadamard(96, 5))
    assert not torch.equal(random_hadamard(96, 5), random_hadamard(96, 6))
    rot, w = Rotation(80, 1), torch.randn(3, 7, 80, dtype=torch.float64)
    q = rot.matrix()
    assert torch.allclose(rot.right(w), w @ q.T, atol=1e-12)
    assert torch.allclose(rot.left(w.transpose(-1, -2)), q @ w.transpose(-1, -2), atol=1e-12)
    for n in (5120, 7168, 2880):  # real hidden sizes (DeepSeek-V2, V3, ...) factor without the fallback
        assert hadamard_factor(n) is not None


def test_random_orthogonal_fallback_is_stated(caplog):
    assert hadamard_factor(92) is None  # 92 = 4·23: no Sylvester × Paley(prime) factorisation
    with caplog.at_level(logging.WARNING, logger="moequant"):
        q = random_hadamard(92, seed=0)
    assert "random orthogonal" in caplog.text
    assert torch.allclose(q @ q.T, torch.eye(92, dtype=torch.float64), atol=1e-12)


# -- the rotated model ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_type", SUPPORTED_MODEL_TYPES)
def test_rotation_keeps_logits_and_reloads(model_type, tmp_path):
    model = build(model_type)
    ref = logits(model, IDS)
    emb_before = get_adapter(model).embed_tokens.weight.detach().clone()
    rotate_model(model, seed=0)
    a = get_adapter(model)
    assert rel_err(logits(model, IDS), ref) < REL_TOL
    assert all(torch.equal(n.weight, torch.ones_like(n.weight)) for n in residual_norms(model))
    assert (a.embed_tokens.weight - emb_before).abs().max() > 0.1 * emb_before.abs().max()  # really rotated
    # internal norms (q/k norms, MLA's q_a/kv_a norms) are not on the residual stream: untouched
    internal = [p for n, p in model.named_parameters() if any(s in n for s in ("q_norm", "k_norm", "a_layernorm"))]
    assert len(internal) > 0 if model_type in ("qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3") else True
    assert all(not torch.equal(p, torch.ones_like(p)) for p in internal)

    model.save_pretrained(tmp_path)
    back = T.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert rel_err(logits(back, IDS), ref) < REL_TOL
    assert all(torch.equal(n.weight, torch.ones_like(n.weight)) for n in residual_norms(back))


def test_fold_norms_alone_keeps_logits():
    model = build("deepseek_v3")
    ref = logits(model, IDS)
    fold_norms(model)
    assert rel_err(logits(model, IDS), ref) < REL_TOL
    assert all(torch.equal(n.weight, torch.ones_like(n.weight)) for n in residual_norms(model))


@pytest.mark.parametrize("model_type, hidden, extra", [
    ("mixtral", 96, {}),  # 8·12
    ("qwen2_moe", 80, {}),  # 4·20
    ("qwen3_moe", 92, {"head_dim": 16}),  # no factorisation: random orthogonal
])
def test_non_power_of_two_hidden(model_type, hidden, extra):
    model = build(model_type, hidden=hidden, **extra)
    ref = logits(model, IDS)
    rotate_model(model, seed=1)
    assert rel_err(logits(model, IDS), ref) < REL_TOL


def test_tied_embeddings_are_untied(tmp_path):
    model = build("olmoe", tie=True)
    a = get_adapter(model)
    assert a.lm_head.weight is a.embed_tokens.weight
    ref = logits(model, IDS)
    rotate_model(model)
    assert model.config.tie_word_embeddings is False
    assert a.lm_head.weight.data_ptr() != a.embed_tokens.weight.data_ptr()
    assert rel_err(logits(model, IDS), ref) < REL_TOL
    model.save_pretrained(tmp_path)
    back = T.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert back.lm_head.weight.data_ptr() != back.model.embed_tokens.weight.data_ptr()
    assert rel_err(logits(back, IDS), ref) < REL_TOL


def test_bf16_model_keeps_dtype_and_function():
    model = build("deepseek_v2", dtype=torch.bfloat16)
    ref = logits(model, IDS)
    rotate_model(model)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert rel_err(logits(model, IDS), ref) < 5e-2  # bf16 weights rounded once after the float64 products


def test_rotation_spreads_an_outlier_channel():
    """A norm scale 30× larger in one channel (the classic activation outlier) makes one input column of every
    expert's gate_up huge once folded; after rotation that column is spread over all H inputs."""
    def outlier_model():
        m = build("mixtral")
        with torch.no_grad():
            for layer in m.model.layers:
                layer.post_attention_layernorm.weight[5] = 30.0
        return m

    def peak_over_rms(m):  # worst expert of any layer: max|W| / rms(W)
        return max((w.abs().amax(dim=(1, 2)) / w.pow(2).mean(dim=(1, 2)).sqrt()).max().item()
                   for w in (b.experts.gate_up_proj for _, b in get_adapter(m).moe_blocks()))

    folded, rotated = outlier_model(), outlier_model()
    fold_norms(folded)  # the same weights GPTQ would see without rotation
    rotate_model(rotated, seed=0)
    before, after = peak_over_rms(folded), peak_over_rms(rotated)
    assert before > 10  # the injected outlier is there
    assert after < 0.4 * before, (before, after)


def test_unknown_parameter_or_norm_is_refused():
    model = build("qwen3_moe")
    model.model.layers[0].self_attn.register_parameter("extra", torch.nn.Parameter(torch.ones(64)))
    with pytest.raises(NotImplementedError, match="extra"):
        rotate_model(model)

    class ShiftedRMSNorm(torch.nn.Module):  # Gemma-style (1 + w)·x/rms(x): folding w would be wrong
        def __init__(self, w):
            super().__init__()
            self.weight, self.variance_epsilon = torch.nn.Parameter(w.clone()), 1e-6

        def forward(self, x):
            return (1 + self.weight) * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)

    model = build("qwen3_moe")
    model.model.norm = ShiftedRMSNorm(model.model.norm.weight.detach())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(NotImplementedError, match="final norm"):
        rotate_model(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # refused before changing anything


def test_quantize_gptq_with_rotation_end_to_end():
    model = build("qwen2_moe")
    ref = logits(model, IDS)
    calib = torch.randint(3, 256, (4, 32), generator=torch.Generator().manual_seed(1))
    res = moequant.quantize(model, method="gptq", bits=4, group_size=-1, rotate="hadamard", calib_tokens=calib,
                            progress=False)
    assert res.packed  # really quantized
    assert all(torch.equal(n.weight, torch.ones_like(n.weight)) for n in residual_norms(model))
    out = logits(model, IDS)
    err = ((out - ref).norm() / ref.norm()).item()
    assert err < 0.25, err  # 4-bit per-channel on a 64-wide random model: ~0.09 measured; unrelated logits are ~1.5
