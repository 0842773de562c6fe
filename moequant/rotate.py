"""Offline QuaRot-style rotation of the residual stream (QuaRot, arXiv 2404.00456; MoEQuant's GPTQ baseline).

Why it is the same function: an RMSNorm without its scale commutes with any orthogonal Q, because
mean((Qx)²) = mean(x²), so RMSNorm₁(Qx) = Q·RMSNorm₁(x). So once every norm's scale is folded into the linears
that read the norm's output (`fold_norms`), multiplying the whole residual stream by Q changes no output:

    embeddings (rows are residual vectors)       E ← E Qᵀ
    readers of the residual, W [.., out, H]      W ← W Qᵀ       (W Qᵀ · Q x = W x; input biases unchanged)
    writers to the residual, W [.., H, in], b    W ← Q W, b ← Q b
    lm_head (reads the final norm)               W ← W Qᵀ

Readers: attention q/k/v (MLA: q_proj or q_a_proj, kv_a_proj_with_mqa), every router (its logits, hence the
routing and DeepSeek-V3's e_score_correction_bias, are unchanged), routed experts' gate_up_proj, shared experts'
gate/up, Qwen2-MoE's shared_expert_gate, dense MLP gate/up. Writers: o_proj, experts' down_proj, shared and
dense down_proj. Norms that act inside a projection's output (Qwen3-MoE's per-head q_norm/k_norm, OLMoE's
q_norm/k_norm over the whole q/k projection, DeepSeek's q_a_layernorm/kv_a_layernorm) see unchanged projection
outputs and are left alone: no norm sits between the residual read and a projection in any supported family.

Q = H·diag(s)/√n with s random signs (seeded) and H a Hadamard matrix of order n = 2^a·m: Sylvester's H_{2^a}
⊗ a small Paley Hadamard matrix of order m (Paley I: m = q+1, q prime ≡ 3 mod 4; Paley II: m = 2(q+1),
q prime ≡ 1 mod 4). That covers 2048, 4096, 5120 = 2⁸·20, 7168 = 2⁸·28, 96 = 2³·12, 80 = 2²·20, ...
When no such factorisation exists (e.g. n = 92), Q is a seeded random orthogonal matrix (Haar, by QR), and a
warning says so.
Q is applied as Kronecker factors of order ≤ 64 (a blocked fast Hadamard transform), in float64, then cast to
the weight dtype.

Tied embeddings are untied first (the embedding gets Q only; lm_head also gets the final norm's scale) and
config.tie_word_embeddings is set False, so the rotated model saves and reloads as an ordinary HF checkpoint.
"""
from __future__ import annotations

import logging
import math

import torch
from torch import nn

from .models.adapter import get_adapter

log = logging.getLogger("moequant")

# Attention submodules by their role relative to the residual stream.
ATTN_READERS = ("q_proj", "k_proj", "v_proj", "q_a_proj", "kv_a_proj_with_mqa")
ATTN_WRITERS = ("o_proj",)
ATTN_INTERNAL = ("q_b_proj", "kv_b_proj", "q_norm", "k_norm", "q_a_layernorm", "kv_a_layernorm")
MLP_READERS = ("gate_proj", "up_proj")
MLP_WRITERS = ("down_proj",)


# -- Hadamard matrices ---------------------------------------------------------------------------------------------
def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, math.isqrt(q) + 1))


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[i, j] = χ(j − i) with χ the quadratic character mod the prime q (χ(0) = 0)."""
    chi = torch.full((q,), -1.0, dtype=torch.float64)
    chi[0] = 0.0
    chi[[(x * x) % q for x in range(1, q)]] = 1.0
    idx = torch.arange(q)
    return chi[(idx[None, :] - idx[:, None]) % q]


def _paley(m: int) -> torch.Tensor | None:
    """A ±1 Hadamard matrix of order m from Paley's constructions with a prime q, or None."""
    q = m - 1
    if _is_prime(q) and q % 4 == 3:  # Paley I: I + S, S = [[0, 1ᵀ], [−1, Q]] skew-symmetric
        s = torch.zeros(m, m, dtype=torch.float64)
        s[0, 1:], s[1:, 0], s[1:, 1:] = 1.0, -1.0, _jacobsthal(q)
        return torch.eye(m, dtype=torch.float64) + s
    q = m // 2 - 1
    if m % 2 == 0 and _is_prime(q) and q % 4 == 1:  # Paley II from the symmetric conference matrix C
        c = torch.zeros(m // 2, m // 2, dtype=torch.float64)
        c[0, 1:], c[1:, 0], c[1:, 1:] = 1.0, 1.0, _jacobsthal(q)
        a = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
        b = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
        return torch.kron(c, a) + torch.kron(torch.eye(m // 2, dtype=torch.float64), b)
    return None


def hadamard_factor(n: int) -> tuple[int, torch.Tensor] | None:
    """(2^a, K) with n = 2^a · m and K a ±1 Hadamard matrix of order m (the smallest m that works), or None."""
    if n < 1:
        raise ValueError(f"rotation size must be positive, got {n}")
    p2 = n & -n  # largest power of two dividing n
    while p2 >= 1:
        m = n // p2
        k = torch.ones(1, 1, dtype=torch.float64) if m == 1 else _paley(m)
        if k is not None:
            if not torch.equal(k @ k.T, m * torch.eye(m, dtype=torch.float64)):  # construction guard
                raise AssertionError(f"Paley matrix of order {m} is not Hadamard")
            return p2, k
        p2 //= 2
    return None


def sylvester(n: int) -> torch.Tensor:
    """The ±1 Sylvester Hadamard matrix of order n = 2^a (symmetric): H_2n = [[H_n, H_n], [H_n, −H_n]]."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


class Rotation:
    """An orthogonal n×n matrix Q, applied to float64 rows: `right(w)` = w Qᵀ, `left(w)` = Q w."""

    def __init__(self, n: int, seed: int = 0):
        self.n = n
        g = torch.Generator().manual_seed(seed)
        factor = hadamard_factor(n)
        if factor is None:
            # Haar-random orthogonal: QR of a Gaussian with R's diagonal signs moved into Q.
            qm, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
            self.dense = qm * torch.sign(torch.diagonal(r))[None, :]
            self.p2 = self.small = self.signs = self.factors = None
            log.warning(f"rotate: no Hadamard factorisation known for size {n} (2^a × Paley order); "
                        f"using a seeded random orthogonal matrix instead")
        else:
            self.p2, self.small = factor
            self.signs = torch.randint(0, 2, (n,), generator=g).to(torch.float64) * 2 - 1
            self.dense = None
            # H_{2^a} = H_{d1} ⊗ H_{d2} ⊗ ... with each d ≤ 64, so Qᵀ is applied as a few small matmuls, one per
            # Kronecker axis (x viewed as [d1, d2, ..., m]): n·(Σd) flops per row instead of n².
            bits = self.p2.bit_length() - 1
            self.factors = [sylvester(2 ** min(6, bits - b)) for b in range(0, bits, 6)]
            if self.small.shape[0] > 1:
                self.factors.append(self.small.T)

    @property
    def kind(self) -> str:
        if self.dense is not None:
            return f"random orthogonal {self.n}"
        m = self.small.shape[0]
        return f"randomised Hadamard {self.n} = {self.p2}·{m}" if m > 1 else f"randomised Hadamard {self.n}"

    def right(self, w: torch.Tensor) -> torch.Tensor:
        """w [..., n] (float64) → w Qᵀ.

        Q = (H_{2^a} ⊗ K) diag(s) / √n, so Qᵀ = diag(s) (H_{2^a} ⊗ Kᵀ) / √n (Sylvester matrices are symmetric)."""
        if w.shape[-1] != self.n:
            raise ValueError(f"rotation of size {self.n} applied to a tensor of shape {tuple(w.shape)}")
        if self.dense is not None:
            return w @ self.dense.to(w.device).T
        # row vector x times A ⊗ B ⊗ ..., x viewed as [d1, d2, ...]: per axis y[.., l, ..] = Σ_i x[.., i, ..] F[i, l]
        x = (w * self.signs.to(w.device)).reshape(-1, self.n)
        rows, pre = x.shape[0], 1
        for f in self.factors:
            f = f.to(w.device)
            d = f.shape[0]
            post = self.n // (pre * d)
            x3 = x.reshape(rows * pre, d, post)
            x = x3.squeeze(-1) @ f if post == 1 else torch.matmul(f.T, x3)
            pre *= d
        return x.reshape(w.shape) / math.sqrt(self.n)

    def left(self, w: torch.Tensor) -> torch.Tensor:
        """w [..., n, k] (float64) → Q w."""
        return self.right(w.transpose(-1, -2)).transpose(-1, -2)

    def matrix(self) -> torch.Tensor:
        return self.left(torch.eye(self.n, dtype=torch.float64))


def random_hadamard(n: int, seed: int = 0) -> torch.Tensor:
    """The orthogonal rotation Q [n, n] (float64) that `rotate_model` uses for hidden size n and this seed."""
    return Rotation(n, seed).matrix()


# -- in-place weight updates ---------------------------------------------------------------------------------------
_CHUNK = 1 << 22  # float64 elements per block of rows: bounds the temporary memory on big experts


@torch.no_grad()
def _map_rows_(t: torch.Tensor, fn, device=None) -> None:
    """t[..., r, :] ← fn(t[..., r, :] in float64), in place, on 1-, 2- or 3-D views (3-D: one slice at a time)."""
    if t.dim() == 1:
        t = t[None]
    if t.dim() == 3:
        for s in t:
            _map_rows_(s, fn, device)
        return
    step = max(1, _CHUNK // max(1, t.shape[1]))
    for r in range(0, t.shape[0], step):
        blk = t[r:r + step]
        blk.copy_(fn(blk.to(device or blk.device, torch.float64)).to(blk.device, blk.dtype))


def _rotate_outputs_(p: nn.Parameter, rot: Rotation, device=None) -> None:
    """p [.., H, in] (or a bias [H]) writes the residual: p ← Q p."""
    _map_rows_(p.data if p.dim() == 1 else p.data.transpose(-1, -2), rot.right, device)


# -- which tensors read / write the residual stream ----------------------------------------------------------------
def _layer_roles(adapter, i: int, layer: nn.Module):
    """(attention readers, mlp readers, writers): parameters of decoder layer i by role.

    Readers are weights whose last dim is H; writers are weights whose dim -2 is H, and biases [H]. Every other
    parameter of the layer must be a known internal one, else we stop: rotating a model we do not understand
    would silently change its function.
    """
    attn, mlp = layer.self_attn, layer.mlp
    attn_readers = [getattr(attn, n).weight for n in ATTN_READERS if getattr(attn, n, None) is not None]
    writers, internal = [], [layer.input_layernorm.weight, layer.post_attention_layernorm.weight]
    for n in ATTN_READERS:
        if getattr(attn, n, None) is not None and getattr(attn, n).bias is not None:
            internal.append(getattr(attn, n).bias)  # an input-side bias is unchanged by W Qᵀ
    for n in ATTN_WRITERS:
        writers += [p for p in (getattr(attn, n).weight, getattr(attn, n).bias) if p is not None]
    for n in ATTN_INTERNAL:
        if getattr(attn, n, None) is not None:
            internal += list(getattr(attn, n).parameters())

    def dense(mod):  # an MLP (dense layer or shared expert): gate/up read, down writes
        r = [getattr(mod, n).weight for n in MLP_READERS]
        w = [p for n in MLP_WRITERS for p in (getattr(mod, n).weight, getattr(mod, n).bias) if p is not None]
        b = [getattr(mod, n).bias for n in MLP_READERS if getattr(mod, n).bias is not None]
        return r, w, b

    block = adapter.moe_block(layer)
    if block is None:
        mlp_readers, w, b = dense(mlp)
        writers += w
        internal += b
    else:
        mlp_readers = [block.router.weight, block.experts.gate_up_proj]
        writers.append(block.experts.down_proj)
        if block.shared is not None:
            r, w, b = dense(block.shared)
            mlp_readers += r
            writers += w
            internal += b
        if block.shared_gate is not None:
            mlp_readers.append(block.shared_gate.weight)
            if block.shared_gate.bias is not None:
                internal.append(block.shared_gate.bias)

    known = {id(p) for p in attn_readers + mlp_readers + writers + internal}
    unknown = [n for n, p in layer.named_parameters() if id(p) not in known]
    if unknown:
        raise NotImplementedError(
            f"rotate: layer {i} of this {adapter.model_type} model has parameters {unknown} whose relation to the "
            f"residual stream is unknown; rotation supports the stock transformers layouts only")
    return attn_readers, mlp_readers, writers


def _check_rmsnorm(norm: nn.Module, where: str) -> None:
    """Folding is exact only for y = weight · x / sqrt(mean(x²) + eps): probe the module to make sure."""
    params = list(norm.parameters())
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    if len(params) != 1 or params[0] is not getattr(norm, "weight", None) or eps is None:
        raise NotImplementedError(f"rotate: {where} ({type(norm).__name__}) is not an RMSNorm with one scale vector")
    w = norm.weight
    x = torch.randn(4, w.shape[0], generator=torch.Generator().manual_seed(0)).to(w.device, w.dtype)
    with torch.no_grad():
        x32 = x.float()
        want = w.float() * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps))
        got = norm(x).float()
    tol = 1e-5 if w.dtype == torch.float32 else 2e-2
    if not torch.allclose(got, want, rtol=tol, atol=tol * want.abs().max().item()):
        raise NotImplementedError(f"rotate: {where} ({type(norm).__name__}) does not compute weight·x/rms(x); "
                                  f"its scale cannot be folded")


# -- the public transforms -----------------------------------------------------------------------------------------
def untie_embeddings(model: nn.Module) -> bool:
    """Give lm_head its own copy of the embedding matrix and set config.tie_word_embeddings = False.

    Returns True when the weights were tied. Needed before folding or rotating: the embedding gets Q only, lm_head
    also the final norm's scale."""
    adapter = get_adapter(model)
    emb, head = adapter.embed_tokens.weight, adapter.lm_head.weight
    tied = head is emb or head.data_ptr() == emb.data_ptr()
    if tied:
        adapter.lm_head.weight = nn.Parameter(emb.detach().clone(), requires_grad=emb.requires_grad)
        log.info("rotate: untied lm_head from the input embeddings (config.tie_word_embeddings = False)")
    model.config.tie_word_embeddings = False
    if hasattr(model, "all_tied_weights_keys"):  # transformers 5 keeps its own record of what to tie on save/load
        model.all_tied_weights_keys = model.get_expanded_tied_weights_keys(all_submodels=True)
    return tied


def _fold_and_rotate(model: nn.Module, rot: Rotation | None, device=None) -> None:
    """Readers W ← W·diag(norm scale)·Qᵀ in one float64 pass (one rounding), norms ← 1; writers, embeddings ← Q."""
    adapter = get_adapter(model)
    if getattr(adapter.lm_head, "bias", None) is not None:
        raise NotImplementedError("rotate: lm_head has a bias; not supported")
    roles = [_layer_roles(adapter, i, layer) for i, layer in enumerate(adapter.layers)]
    _check_rmsnorm(adapter.backbone.norm, "final norm")  # check everything before changing anything
    for i, layer in enumerate(adapter.layers):
        _check_rmsnorm(layer.input_layernorm, f"layer {i} input_layernorm")
        _check_rmsnorm(layer.post_attention_layernorm, f"layer {i} post_attention_layernorm")
    untie_embeddings(model)
    pairs = [(adapter.backbone.norm, [adapter.lm_head.weight])]
    for layer, (attn_readers, mlp_readers, _) in zip(adapter.layers, roles):
        pairs += [(layer.input_layernorm, attn_readers), (layer.post_attention_layernorm, mlp_readers)]

    for norm, readers in pairs:
        scale = norm.weight.detach().to(torch.float64)

        def fold(w, scale=scale):
            w = w * scale.to(w.device)
            return w if rot is None else rot.right(w)

        for p in readers:
            _map_rows_(p.data, fold, device)
        with torch.no_grad():
            norm.weight.fill_(1.0)
    if rot is None:
        return
    _map_rows_(adapter.embed_tokens.weight.data, rot.right, device)  # rows of E are residual vectors: E ← E Qᵀ
    for _, _, writers in roles:
        for p in writers:
            _rotate_outputs_(p, rot, device)


def fold_norms(model: nn.Module, device=None) -> None:
    """Fold every residual-stream RMSNorm's scale into the linears that read its output; set the scales to one.

    The same function (up to round-off): each reader W becomes W·diag(scale). Unties tied embeddings first."""
    _fold_and_rotate(model, None, device)


def rotate_model(model: nn.Module, seed: int = 0, device=None) -> None:
    """Fold the norms and rotate the residual stream by a seeded randomised Hadamard Q, in place.

    The model computes the same function (to float round-off) and stays an ordinary HF model: norm weights are
    one, embeddings and lm_head untied. Each weight is rounded to its dtype once, after the float64 products.
    device: where the float64 products run (default: where each weight lives; "cuda" speeds up big models)."""
    hidden = get_adapter(model).embed_tokens.weight.shape[1]
    rot = Rotation(hidden, seed)
    log.info(f"rotate: residual stream of size {hidden} by a {rot.kind} (seed {seed})")
    _fold_and_rotate(model, rot, device)
