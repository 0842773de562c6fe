"""AGQ Hessians: the affinities are what each model multiplies expert outputs by, paired with the right rows."""
import pytest
import torch
import torch.nn.functional as F

from conftest import interpreter_only, make_tiny
from moequant.config import QuantConfig
from moequant.kernels.expert_hessians import _expert_hessian_kernel
from moequant.models import get_adapter
from moequant.pipeline import LayerCollector, capture_layer_inputs
from moequant.reference import expert_hessians_ref


def _block_input(adapter, layer_idx, run):
    """The hidden states entering the MoE block of one layer, captured while run() does a forward (no grad)."""
    got = {}
    blk = adapter.moe_block(adapter.layers[layer_idx])

    def grab(_m, a):
        got.setdefault("x", a[0].reshape(-1, a[0].shape[-1]))  # returns None: the input stays unchanged

    h = blk.module.register_forward_pre_hook(grab)
    with torch.no_grad():
        run()
    h.remove()
    return got["x"], blk


def _measured_affinity(blk, x, j):
    """c_tj measured from the model: zero expert j's output weights and see how much the block output moves."""
    with torch.no_grad():
        y = blk.module(x.unsqueeze(0)).squeeze(0)
        saved = blk.experts.down_proj.data[j].clone()
        blk.experts.down_proj.data[j] = 0
        y0 = blk.module(x.unsqueeze(0)).squeeze(0)
        blk.experts.down_proj.data[j] = saved
        I = blk.intermediate_size
        gu = x.double() @ blk.experts.gate_up_proj[j].double().T
        e = (F.silu(gu[:, :I]) * gu[:, I:]) @ blk.experts.down_proj[j].double().T
    delta = (y - y0).double()
    return (delta * e).sum(-1) / (e * e).sum(-1)  # 0 for tokens not routed to j


def test_affinities_and_hessians_match_the_model(model_type):
    torch.manual_seed(0)
    model = make_tiny(model_type, experts=4)
    model.float()
    adapter = get_adapter(model)
    li, blk = adapter.moe_blocks()[0]
    ids = torch.randint(3, 256, (2, 24))
    x, blk = _block_input(adapter, li, lambda: model(ids))
    E = blk.num_experts

    # Hessians from the pipeline's capture hooks (AGQ, affinity power 1)
    cfg = QuantConfig(method="agq", bits=4, group_size=32, targets=("experts",))
    inputs = capture_layer_inputs(adapter, [ids], "cpu")
    col = LayerCollector(adapter.layers[li], adapter, cfg, "cpu")
    with torch.no_grad():
        for h in range(li):
            inputs = [(adapter.layers[h](hid, **kw), kw) for hid, kw in inputs]
        for hid, kw in inputs:
            adapter.layers[li](hid, **kw)
    col.remove()

    index, _ = blk.route(x)
    assert torch.equal(col.n_gate_up.cpu(), torch.bincount(index.flatten(), minlength=E))  # counts = top-k picks
    I = blk.intermediate_size
    for j in range(E):
        c = _measured_affinity(blk, x, j)
        routed = (index == j).any(-1)
        assert (c[~routed].abs() < 1e-6).all()
        assert (c[routed] > 0).all()
        H = (x[routed].double() * c[routed, None]).T @ x[routed].double()
        torch.testing.assert_close(col.H_gate_up[j].double(), H, rtol=2e-4, atol=2e-4)
        # down_proj inputs: this expert's own intermediate activations, weighted by the same token's affinity
        gu = x[routed].double() @ blk.experts.gate_up_proj[j].double().T
        hmid = F.silu(gu[:, :I]) * gu[:, I:]
        Hd = (hmid * c[routed, None]).T @ hmid
        torch.testing.assert_close(col.H_down[j].double(), Hd, rtol=2e-4, atol=2e-4)


def test_gptq_hessians_are_unweighted():
    model = make_tiny("mixtral", experts=4)
    adapter = get_adapter(model)
    ids = torch.randint(3, 256, (2, 16))
    inputs = capture_layer_inputs(adapter, [ids], "cpu")
    col = LayerCollector(adapter.layers[0], adapter, QuantConfig(method="gptq", group_size=32), "cpu")
    with torch.no_grad():
        adapter.layers[0](inputs[0][0], **inputs[0][1])
    col.remove()
    x, blk = _block_input(adapter, 0, lambda: model(ids))
    index, _ = blk.route(x)
    H, n = expert_hessians_ref(x, index, None, 4)
    torch.testing.assert_close(col.H_gate_up, H, rtol=1e-4, atol=1e-4)
    assert torch.equal(col.n_gate_up, n)


def test_expert_hessians_ref_is_the_weighted_sum():
    torch.manual_seed(1)
    T, K, E, k = 40, 16, 5, 2
    x = torch.randn(T, K)
    ids = torch.stack([torch.randperm(E)[:k] for _ in range(T)])
    w = torch.rand(T, k)
    H, n = expert_hessians_ref(x, ids, w, E)
    H2, n2 = expert_hessians_ref(x[:10], ids[:10], w[:10], E)
    expert_hessians_ref(x[10:], ids[10:], w[10:], E, H2, n2)  # accumulates across calls
    for j in range(E):
        ref = sum(w[t, s] * torch.outer(x[t], x[t]) for t in range(T) for s in range(k) if ids[t, s] == j)
        torch.testing.assert_close(H[j], ref if torch.is_tensor(ref) else torch.zeros(K, K), rtol=1e-5, atol=1e-5)
        assert n[j] == (ids == j).sum()
    torch.testing.assert_close(H, H2)


def test_qwen2_shared_expert_is_affinity_weighted():
    """Qwen2-MoE's shared expert output is scaled by sigmoid(shared_expert_gate(x)): AGQ weights its Hessian so."""
    model = make_tiny("qwen2_moe", experts=4)
    adapter = get_adapter(model)
    ids = torch.randint(3, 256, (2, 16))
    inputs = capture_layer_inputs(adapter, [ids], "cpu")
    col = LayerCollector(adapter.layers[0], adapter, QuantConfig(method="agq", group_size=32), "cpu")
    with torch.no_grad():
        adapter.layers[0](inputs[0][0], **inputs[0][1])
    col.remove()
    x, blk = _block_input(adapter, 0, lambda: model(ids))
    c = torch.sigmoid(blk.shared_gate(x)).squeeze(-1)
    H = (x * c[:, None]).T @ x
    torch.testing.assert_close(col.dense_H["mlp.shared_expert.gate_proj"], H, rtol=1e-4, atol=1e-4)


@interpreter_only(_expert_hessian_kernel)
def test_hessian_backends_agree_on_agq():
    """The Triton path of the capture hooks (the √w rows of gate_up and down formed by the kernel, `sqrt_w`) against
    the torch path, on one AGQ layer: the same rows' Gram matrices. CPU: through Triton's interpreter, in fp16."""
    torch.manual_seed(2)
    model = make_tiny("mixtral", experts=4).half()
    adapter = get_adapter(model)
    ids = torch.randint(3, 256, (2, 12))
    inputs = capture_layer_inputs(adapter, [ids], "cpu")
    got = {}
    for backend in ("torch", "triton"):
        col = LayerCollector(adapter.layers[0], adapter, QuantConfig(method="agq", group_size=32,
                                                                     hessian_backend=backend), "cpu")
        with torch.no_grad():
            adapter.layers[0](inputs[0][0], **inputs[0][1])
        col.remove()
        got[backend] = col
    t, k = got["torch"], got["triton"]
    assert torch.equal(t.n_gate_up, k.n_gate_up) and torch.equal(t.n_down, k.n_down)
    for a, b in ((t.H_gate_up, k.H_gate_up), (t.H_down, k.H_down)):
        assert a.abs().sum() > 0 and torch.equal(b, b.transpose(1, 2))
        assert ((a - b).norm() / a.norm()).item() < 1e-5  # the same fp16 rows; fp32 sums in another order


@interpreter_only(_expert_hessian_kernel)
def test_shared_expert_hessian_on_the_kernel_is_the_gram_matrix_of_its_rows():
    """Qwen2-MoE's gated shared expert on the Triton path: H = Σ_t r_t r_tᵀ with r_t = x_t·√c_t rounded once to fp16,
    the Gram matrix of the rows the kernel multiplies (PSD), not c_t x_t x_tᵀ with c on one side. CPU: interpreter."""
    torch.manual_seed(3)
    model = make_tiny("qwen2_moe", experts=4).half()
    adapter = get_adapter(model)
    ids = torch.randint(3, 256, (2, 16))
    inputs = capture_layer_inputs(adapter, [ids], "cpu")
    col = LayerCollector(adapter.layers[0], adapter, QuantConfig(method="agq", group_size=32,
                                                                 hessian_backend="triton"), "cpu")
    x, blk = _block_input(adapter, 0, lambda: adapter.layers[0](inputs[0][0], **inputs[0][1]))
    col.remove()
    with torch.no_grad():
        c = torch.sigmoid(blk.shared_gate(x)).float().squeeze(-1)  # the gate as the model applies it (fp16)
    x = x.float()
    rows = (x * c.sqrt()[:, None]).half().float()
    H = col.dense_H["mlp.shared_expert.gate_proj"]
    assert ((H - rows.T @ rows).norm() / H.norm()).item() < 1e-5
    one_sided = (x * c[:, None]).half().float().T @ x
    assert ((H - one_sided).norm() / H.norm()).item() > 1e-4  # the test tells the two roundings apart
