"""EBSS (moequant.calib.ebss) against a straightforward per-candidate implementation on tiny models."""
import json
import math

import pytest
import torch
import transformers as T

from moequant.calib.balance import expert_load, load_stats, model_sigma
from moequant.calib.ebss import EBSSConfig, EBSSResult, draw_start_tokens, ebss_generate
from moequant.models.adapter import get_adapter
from moequant.models.configs import tiny_config

INF = float("inf")


def _tiny(model_type, seed=0, fp64=False, **kw):
    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(tiny_config(model_type, **kw)).eval()
    if fp64:  # fp64 makes the cached and the uncached forward agree far below any gap between candidates
        model.set_experts_implementation("eager")  # grouped_mm has no fp64
        model = model.to(torch.float64)
    return model


@torch.no_grad()
def _logits_and_routing(model, x):
    """Full forward of x [1, l] without cache; routing recomputed with each block's own router on its input."""
    blocks = get_adapter(model).moe_blocks()
    inputs = {}
    hooks = [b.module.register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, a[0])) for i, b in blocks]
    try:
        logits = model(input_ids=x).logits[0, -1]
    finally:
        for h in hooks:
            h.remove()
    counts = torch.stack([torch.bincount(b.route(inputs[i])[0].flatten(), minlength=b.num_experts)
                          for i, b in blocks])
    return logits, counts


@torch.no_grad()
def reference_ebss(model, start: int, seq_len: int, width: int, tau: float) -> list[int]:
    """Straightforward EBSS: per candidate beam a full forward without cache, every vocabulary token expanded,
    sigma(S) of the parent recomputed from scratch (Eqs. 3-4, 11-14); tau = inf is plain beam search."""
    beams = [([start], 0.0)]
    costs = [0.0]
    for _ in range(seq_len - 1):
        cands = []
        for toks, R in beams:
            logits, counts = _logits_and_routing(model, torch.tensor([toks]))
            logp = torch.log_softmax(logits.double(), -1).tolist()
            sig = 0.0 if math.isinf(tau) else model_sigma(counts).item() / tau
            l = len(toks)
            cands += [(-(R + lp) / (l + 1) + sig, toks + [v], R + lp) for v, lp in enumerate(logp)]
        cands.sort(key=lambda c: c[0])
        beams = [(c[1], c[2]) for c in cands[:width]]
        costs = [c[0] for c in cands[:width]]
    return beams[min(range(width), key=costs.__getitem__)][0]


@pytest.mark.parametrize("model_type,tau", [("mixtral", INF), ("deepseek_v2", INF), ("mixtral", 1.2),
                                            ("qwen2_moe", 0.05)])
def test_matches_reference_beam_search(model_type, tau):
    """tau = inf: EBSS is plain beam search of width w; finite tau: the same with the deferred balance term."""
    model = _tiny(model_type, fp64=True)
    cfg = EBSSConfig(num_sequences=3, seq_len=8, width=3, tau=tau, seed=5, batch_size=2)  # 2 batches: 2 + 1
    res = ebss_generate(model, cfg, progress=False)
    assert res.tokens.shape == (3, 8) and res.tokens.dtype == torch.int64
    for i, start in enumerate(res.params["start_tokens"]):
        assert res.tokens[i].tolist() == reference_ebss(model, start, cfg.seq_len, cfg.width, tau)


def test_balance_term_changes_the_search():
    """The test above would pass for finite tau if sigma were ignored, unless the outputs differ from tau = inf."""
    model = _tiny("qwen2_moe")
    a = ebss_generate(model, EBSSConfig(num_sequences=3, seq_len=10, width=3, tau=0.05, seed=5), progress=False)
    b = ebss_generate(model, EBSSConfig(num_sequences=3, seq_len=10, width=3, tau=INF, seed=5), progress=False)
    assert torch.equal(a.tokens[:, 0], b.tokens[:, 0])
    assert not torch.equal(a.tokens, b.tokens)


def _imbalanced_mixtral():
    """Tiny Mixtral whose routers lean toward experts 0 and 1: their router rows get the mean direction of the
    router inputs, so plain text and plain beam search overload them."""
    model = _tiny("mixtral")
    blocks = get_adapter(model).moe_blocks()
    inputs = {}
    hooks = [b.router.register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, a[0])) for i, b in blocks]
    with torch.no_grad():
        model(input_ids=torch.randint(3, 256, (8, 64), generator=torch.Generator().manual_seed(0)))
    for h in hooks:
        h.remove()
    for i, b in blocks:
        d = inputs[i].reshape(-1, inputs[i].shape[-1]).mean(0)
        b.router.weight.data[:2] += d / d.norm() ** 2
    return model


def test_ebss_improves_balance_over_plain_beam_search():
    model = _imbalanced_mixtral()
    kw = dict(num_sequences=4, seq_len=32, width=4, seed=0, batch_size=4)
    plain = ebss_generate(model, EBSSConfig(tau=INF, **kw), progress=False)
    ebss = ebss_generate(model, EBSSConfig(tau=0.1, **kw), progress=False)
    text = load_stats(expert_load(model, torch.randint(3, 256, (4, 32), generator=torch.Generator().manual_seed(1))))
    assert ebss.params["sigma_set"] < 0.5 * plain.params["sigma_set"], (ebss.params, plain.params)
    assert ebss.params["sigma_per_sequence_mean"] < 0.6 * plain.params["sigma_per_sequence_mean"]
    assert ebss.params["sigma_set"] < 0.5 * text["sigma"]
    # The price is likelihood: the balanced sequences are less likely under the model than plain beam search's.
    assert ebss.params["nll_mean"] > plain.params["nll_mean"]


def test_counts_and_summary_match_recomputation():
    model = _tiny("deepseek_v3")
    res = ebss_generate(model, EBSSConfig(num_sequences=3, seq_len=16, width=2, tau=1.2, batch_size=2), progress=False)
    load = expert_load(model, res.tokens)
    assert torch.equal(res.expert_load, load)  # the routing the search tracked is the sequences' routing
    assert res.params["sigma_set"] == pytest.approx(load_stats(load)["sigma"], rel=1e-9)
    with torch.no_grad():
        logits = model(input_ids=res.tokens).logits.float()
    nll = -torch.log_softmax(logits[:, :-1], -1).gather(-1, res.tokens[:, 1:, None]).mean()
    assert res.params["nll_mean"] == pytest.approx(nll.item(), rel=1e-4)
    assert res.params["ppl"] == pytest.approx(math.exp(res.params["nll_mean"]))


def test_deterministic_and_seeded():
    model = _tiny("olmoe")
    cfg = dict(num_sequences=3, seq_len=8, width=2, tau=1.2)
    a = ebss_generate(model, EBSSConfig(seed=3, **cfg), progress=False)
    b = ebss_generate(model, EBSSConfig(seed=3, **cfg), progress=False)
    c = ebss_generate(model, EBSSConfig(seed=4, **cfg), progress=False)
    assert torch.equal(a.tokens, b.tokens)
    assert not torch.equal(a.tokens[:, 0], c.tokens[:, 0])
    d = ebss_generate(model, EBSSConfig(start_tokens=[9, 10, 11], **cfg), progress=False)
    assert d.tokens[:, 0].tolist() == [9, 10, 11]


def test_start_tokens_skip_special():
    config = tiny_config("mixtral", vocab_size=8)  # bos 1, eos 2, pad 0 -> eligible 3..7
    drawn = draw_start_tokens(config, 400, seed=0)
    assert set(drawn.tolist()) == {3, 4, 5, 6, 7}

    class Tok:  # a tokenizer's vocabulary can be shorter than the embedding matrix
        all_special_ids = [3, 4]

        def __len__(self):
            return 6

    assert set(draw_start_tokens(config, 400, seed=0, tokenizer=Tok()).tolist()) == {0, 1, 2, 5}


def test_save_load_roundtrip(tmp_path):
    model = _tiny("qwen3_moe")
    res = ebss_generate(model, EBSSConfig(num_sequences=2, seq_len=6, width=2, tau=INF), progress=False)
    st, js = res.save(tmp_path / "calib" / "ebss")
    assert st.name == "ebss.safetensors" and js.name == "ebss.json"
    assert json.loads(js.read_text())["config"]["tau"] == "inf"
    back = EBSSResult.load(st)
    assert torch.equal(back.tokens, res.tokens) and torch.equal(back.expert_load, res.expert_load)
    assert back.params == res.params
    assert EBSSConfig.from_dict(back.params["config"]) == EBSSConfig(num_sequences=2, seq_len=6, width=2, tau=INF)
    assert not [p for p in st.parent.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("kw,match", [
    (dict(width=0), "width must be >= 1"),
    (dict(num_sequences=0), "num_sequences must be >= 1"),
    (dict(seq_len=1), "seq_len must be >= 2"),
    (dict(tau=0.0), "tau must be > 0"),
    (dict(tau=-1.0), "tau must be > 0"),
    (dict(tau=float("nan")), "tau must be > 0"),
    (dict(final_select="best"), "final_select"),
    (dict(num_sequences=2, start_tokens=[5]), "one start token per sequence"),
])
def test_bad_config(kw, match):
    with pytest.raises(ValueError, match=match):
        EBSSConfig(**kw)


def test_bad_config_for_model():
    model = _tiny("mixtral")  # max_position_embeddings 256, vocab 256
    with pytest.raises(ValueError, match="longer than the model's context"):
        ebss_generate(model, EBSSConfig(num_sequences=1, seq_len=257), progress=False)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        ebss_generate(model, EBSSConfig(num_sequences=1, seq_len=4, start_tokens=[256]), progress=False)
    with pytest.raises(ValueError, match="exceeds the vocabulary"):
        ebss_generate(model, EBSSConfig(num_sequences=1, seq_len=4, width=300), progress=False)
