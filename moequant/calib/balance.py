"""Expert-load statistics: how many routed selections each expert of each MoE layer receives, and how balanced.

The balance measure is MoEQuant's (arXiv 2505.03804, Eqs. 3-4): for MoE layer l with E routed experts, u_l^e is
expert e's usage frequency (its share of the layer's top-k selections, so u_l sums to 1) and

    sigma_l = sqrt( 1/(E-1) * sum_e (u_l^e - mean(u_l))^2 )        (std with the 1/(E-1) correction)

The model-level sigma is the mean of sigma_l over MoE layers. Only routed experts count: shared experts see every
token and carry no balance information. Each token contributes top_k selections per layer.

Routing is read by forward hooks on the routers of all MoE blocks (the third element of a router's output is the
top_k_index the block hands its experts), so the counts are exactly the model's own routing.
"""
from __future__ import annotations

import math

import torch

from ..models.adapter import get_adapter


class RouterRecorder:
    """Context manager: forward hooks on every MoE router; `take()` returns the top-k ids of the last forward.

    take() -> LongTensor [T, num_moe_layers, k] (T = tokens of that forward, flattened batch-major, the order the
    routers see them). Raises if a router did not run since the last take (e.g. a forward that stopped early).
    """

    def __init__(self, model: torch.nn.Module):
        self.blocks = get_adapter(model).moe_blocks()
        if not self.blocks:
            raise ValueError("the model has no MoE blocks: expert-load statistics need at least one routed layer")
        experts = {b.num_experts for _, b in self.blocks}
        if len(experts) != 1:
            raise ValueError(f"MoE layers have different expert counts {sorted(experts)}; one count is required")
        self.num_experts = experts.pop()
        self.layer_ids = [i for i, _ in self.blocks]
        self._ids: list[torch.Tensor | None] = [None] * len(self.blocks)
        self._handles = []

    def __enter__(self):
        for slot, (_, block) in enumerate(self.blocks):
            self._handles.append(block.router.register_forward_hook(self._hook(slot)))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        return False

    def _hook(self, slot: int):
        def hook(module, args, output):
            self._ids[slot] = output[2].detach()
        return hook

    def take(self) -> torch.Tensor:
        missing = [self.layer_ids[s] for s, ids in enumerate(self._ids) if ids is None]
        if missing:
            raise RuntimeError(f"routers of MoE layers {missing} did not run in the last forward")
        dev = self._ids[0].device  # a model dispatched over devices routes each layer on its own device
        ids = torch.stack([t.reshape(-1, t.shape[-1]).to(dev) for t in self._ids], dim=1)
        self._ids = [None] * len(self.blocks)
        return ids


def count_selections(ids: torch.Tensor, num_experts: int, dtype=torch.int64) -> torch.Tensor:
    """ids [..., num_layers, k] top-k expert ids -> counts [..., num_layers, E] (selections per expert)."""
    counts = torch.zeros(*ids.shape[:-1], num_experts, dtype=dtype, device=ids.device)
    return counts.scatter_add_(-1, ids.long(), torch.ones_like(ids, dtype=dtype))


@torch.no_grad()
def expert_load(model: torch.nn.Module, input_ids: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """Routed selections per expert per MoE layer over the sequences input_ids [N, L] (no padding: every token counts).

    Returns int64 [num_moe_layers, E] on CPU (row i is the i-th MoE layer of get_adapter(model).moe_blocks()).
    One forward of the decoder stack per batch of `batch_size` sequences; the lm_head is skipped.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [N, L], got shape {tuple(input_ids.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    adapter = get_adapter(model)
    device = adapter.embed_tokens.weight.device
    with RouterRecorder(model) as rec:
        counts = torch.zeros(len(rec.blocks), rec.num_experts, dtype=torch.int64, device=device)
        for start in range(0, input_ids.shape[0], batch_size):
            batch = input_ids[start:start + batch_size].to(device)
            adapter.backbone(input_ids=batch, use_cache=False)
            counts += count_selections(rec.take(), rec.num_experts).sum(0)
    return counts.cpu()


def balance_sigma(counts: torch.Tensor) -> torch.Tensor:
    """sigma of each row of counts [..., E] (Eqs. 3-4), float64 [...].

    Eq. 3: u^e = counts^e / sum_e counts^e (usage frequency). Eq. 4: std of u over the E experts with the 1/(E-1)
    correction. A row without any selection has sigma 0. Model-level sigma: balance_sigma(counts).mean(-1) over the
    layer dimension (see model_sigma).
    """
    if counts.shape[-1] < 2:
        raise ValueError(f"balance needs at least 2 experts, got counts of shape {tuple(counts.shape)}")
    c = counts.to(torch.float64)
    u = c / c.sum(-1, keepdim=True).clamp_min(1.0)  # Eq. 3
    return u.std(dim=-1, correction=1)  # Eq. 4


def model_sigma(counts: torch.Tensor) -> torch.Tensor:
    """counts [..., num_layers, E] -> mean over MoE layers of sigma_l (the model-level balance measure)."""
    return balance_sigma(counts).mean(-1)


def load_stats(counts: torch.Tensor, layer_ids: list[int] | None = None) -> dict:
    """Summary of counts [num_layers, E]: model sigma plus, per layer, sigma, min/max selections per expert and the
    number of experts with zero selections. JSON-serialisable."""
    if counts.dim() != 2:
        raise ValueError(f"counts must be [num_layers, E], got shape {tuple(counts.shape)}")
    counts = counts.detach().cpu().to(torch.int64)
    sig = balance_sigma(counts)
    layer_ids = list(range(counts.shape[0])) if layer_ids is None else list(layer_ids)
    layers = [
        dict(layer=int(layer_ids[i]), sigma=float(sig[i]), min=int(counts[i].min()), max=int(counts[i].max()),
             zero_experts=int((counts[i] == 0).sum()), selections=int(counts[i].sum()))
        for i in range(counts.shape[0])
    ]
    return dict(
        sigma=float(sig.mean()), min=int(counts.min()), max=int(counts.max()),
        zero_experts=int((counts == 0).sum()), num_layers=counts.shape[0], num_experts=counts.shape[1],
        selections=int(counts.sum()), layers=layers,
    )


def format_load_table(sources: dict[str, torch.Tensor], layer_ids: list[int] | None = None) -> str:
    """A per-source summary (model sigma, min/max selections per expert over all layers, experts with zero
    selections summed over layers) followed by per-layer detail with one column group per source."""
    if not sources:
        raise ValueError("format_load_table needs at least one source")
    stats = {name: load_stats(c, layer_ids) for name, c in sources.items()}
    w = max(8, *(len(n) for n in stats))
    lines = [f"{'source':<{w}} {'sigma':>9} {'min':>8} {'max':>8} {'zero':>6} {'selections':>12}"]
    for name, s in stats.items():
        lines.append(f"{name:<{w}} {s['sigma']:>9.5f} {s['min']:>8d} {s['max']:>8d} {s['zero_experts']:>6d}"
                     f" {s['selections']:>12d}")
    lines.append("")
    cell = 34
    lines.append(f"{'layer':>5} " + " | ".join(f"{n[:cell]:^{cell}}" for n in stats))
    lines.append(f"{'':>5} " + " | ".join(f"{'sigma':>9} {'min':>8} {'max':>8} {'zero':>6}" for _ in stats))
    first = next(iter(stats.values()))
    for i, layer in enumerate(first["layers"]):
        row = []
        for s in stats.values():
            d = s["layers"][i] if i < len(s["layers"]) else None
            row.append(f"{d['sigma']:>9.5f} {d['min']:>8d} {d['max']:>8d} {d['zero_experts']:>6d}" if d
                       else f"{'-':>{cell}}")
        lines.append(f"{layer['layer']:>5} " + " | ".join(row))
    return "\n".join(lines)


def plot_load(sources: dict[str, torch.Tensor], path, layer_ids: list[int] | None = None, sort: bool = True,
              max_layers: int = 8) -> None:
    """Selections per expert, one line per source, one subplot per MoE layer (at most max_layers, evenly spaced).

    sort=True orders experts by load (descending) per source, which shows the shape of the imbalance; sort=False
    plots by expert id. Sources should hold the same number of tokens to be comparable.
    """
    if not sources:
        raise ValueError("plot_load needs at least one source")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = {n: c.detach().cpu().to(torch.int64) for n, c in sources.items()}
    num_layers = next(iter(counts.values())).shape[0]
    layer_ids = list(range(num_layers)) if layer_ids is None else list(layer_ids)
    picks = sorted({round(j * (num_layers - 1) / max(1, min(max_layers, num_layers) - 1))
                    for j in range(min(max_layers, num_layers))})
    cols = min(4, len(picks))
    rows = math.ceil(len(picks) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    for ax, i in zip(axes.flat, picks):
        for name, c in counts.items():
            y = c[i].sort(descending=True).values if sort else c[i]
            ax.plot(range(len(y)), y.numpy(), label=f"{name} (σ={balance_sigma(c[i]).item():.4f})")
        ax.set_title(f"MoE layer {layer_ids[i]}")
        ax.set_xlabel("expert (sorted by load)" if sort else "expert id")
        ax.set_ylabel("selections")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(picks):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
