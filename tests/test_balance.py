"""Expert-load statistics (moequant.calib.balance) against straightforward recomputations on tiny models."""
import math

import numpy as np
import pytest
import torch
import transformers as T

from moequant.calib.balance import (RouterRecorder, balance_sigma, count_selections, expert_load, format_load_table,
                                    load_stats, model_sigma, plot_load)
from moequant.models.adapter import get_adapter
from moequant.models.configs import tiny_config


def _tiny(model_type, seed=0):
    torch.manual_seed(seed)
    return T.AutoModelForCausalLM.from_config(tiny_config(model_type)).eval()


def test_balance_sigma_matches_numpy():
    g = torch.Generator().manual_seed(1)
    counts = torch.randint(0, 50, (3, 5, 8), generator=g)
    counts[0, 0] = 0  # a layer with no selection: sigma 0 by definition
    counts[1, 2] = 0
    counts[1, 2, 3] = 17  # everything on one expert: the largest possible sigma
    got = balance_sigma(counts)
    c = counts.numpy().astype(np.float64)
    want = np.zeros(c.shape[:-1])
    for idx in np.ndindex(*c.shape[:-1]):
        row = c[idx]
        if row.sum() == 0:
            continue
        u = row / row.sum()  # Eq. 3: usage frequency
        want[idx] = math.sqrt(((u - u.mean()) ** 2).sum() / (len(u) - 1))  # Eq. 4: 1/(E-1)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-15)
    assert got[0, 0] == 0
    assert got[1, 2] == pytest.approx(math.sqrt((1 - 1 / 8) ** 2 / 7 + 7 * (1 / 8) ** 2 / 7))
    np.testing.assert_allclose(model_sigma(counts).numpy(), want.mean(-1), rtol=1e-12)
    # Scale invariance: sigma depends on frequencies, not on the number of tokens.
    np.testing.assert_allclose(balance_sigma(counts * 7).numpy(), want, rtol=1e-12, atol=1e-15)


def test_balance_sigma_rejects_single_expert():
    with pytest.raises(ValueError, match="at least 2 experts"):
        balance_sigma(torch.ones(3, 1))


def test_count_selections():
    ids = torch.tensor([[[0, 3], [1, 2]], [[3, 0], [1, 1]]])  # [T=2, layers=2, k=2]
    got = count_selections(ids, 4)
    want = torch.zeros(2, 2, 4, dtype=torch.int64)
    for t in range(2):
        for layer in range(2):
            for e in ids[t, layer]:
                want[t, layer, e] += 1
    assert torch.equal(got, want)


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe", "deepseek_v3"])
def test_expert_load_matches_route_recomputation(model_type):
    model = _tiny(model_type)
    adapter = get_adapter(model)
    g = torch.Generator().manual_seed(2)
    input_ids = torch.randint(3, model.config.vocab_size, (5, 11), generator=g)
    got = expert_load(model, input_ids, batch_size=2)  # 5 sequences in batches of 2, 2, 1

    # Straightforward: capture each MoE block's input in one full forward, route it with the block's own router.
    blocks = adapter.moe_blocks()
    inputs = {}
    handles = [b.module.register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, a[0])) for i, b in blocks]
    with torch.no_grad():
        model(input_ids=input_ids)
    for h in handles:
        h.remove()
    want = torch.zeros(len(blocks), blocks[0][1].num_experts, dtype=torch.int64)
    for row, (i, b) in enumerate(blocks):
        index, _ = b.route(inputs[i])
        want[row] = torch.bincount(index.flatten(), minlength=b.num_experts)
    assert torch.equal(got, want)
    assert (got.sum(1) == input_ids.numel() * blocks[0][1].top_k).all()


def test_router_recorder_reports_missing_forward():
    model = _tiny("olmoe")
    with RouterRecorder(model) as rec, pytest.raises(RuntimeError, match="did not run"):
        rec.take()
    with torch.no_grad(), RouterRecorder(model) as rec:
        model(input_ids=torch.tensor([[5, 6, 7]]))
        assert rec.take().shape == (3, 2, 2)
    assert all(not b.router._forward_hooks for _, b in get_adapter(model).moe_blocks())  # hooks removed


def test_load_stats_table_and_plot(tmp_path):
    g = torch.Generator().manual_seed(3)
    a = torch.randint(0, 40, (3, 8), generator=g)
    a[1, 5] = 0
    a[2, :2] = 0
    b = torch.randint(10, 30, (3, 8), generator=g)
    s = load_stats(a, layer_ids=[1, 2, 3])
    assert s["sigma"] == pytest.approx(balance_sigma(a).mean().item())
    assert s["zero_experts"] == int((a == 0).sum()) and s["min"] == 0 and s["max"] == int(a.max())
    for row, d in enumerate(s["layers"]):
        assert d["layer"] == row + 1
        assert (d["min"], d["max"], d["zero_experts"], d["selections"]) == (
            int(a[row].min()), int(a[row].max()), int((a[row] == 0).sum()), int(a[row].sum()))
        assert d["sigma"] == pytest.approx(balance_sigma(a[row]).item())
    table = format_load_table({"ebss": a, "wikitext": b}, layer_ids=[1, 2, 3])
    assert "ebss" in table and "wikitext" in table
    assert len(table.splitlines()) == 1 + 2 + 1 + 2 + 3  # header, 2 sources, blank, 2 headers, 3 layers
    assert f"{s['sigma']:.5f}" in table
    path = tmp_path / "load.png"
    plot_load({"ebss": a, "wikitext": b}, path)
    assert path.stat().st_size > 1000 and path.read_bytes()[:4] == b"\x89PNG"
