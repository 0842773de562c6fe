"""Model adapters: where the decoder layers, linears, routers and fused experts of an HF MoE model are.

transformers 5 gives all six supported families the same skeleton, so one adapter reads them all:

    model.model.embed_tokens, model.model.layers[i], model.model.norm, model.lm_head
    layer.self_attn.*           nn.Linear projections (MLA for DeepSeek)
    layer.mlp                   either a dense MLP (gate_proj/up_proj/down_proj; DeepSeek's first layers,
                                Qwen's mlp_only_layers) or an MoE block with
        .gate                   the router: forward(x) -> (logits, top_k_weights, top_k_index)
        .experts                fused experts: gate_up_proj [E, 2I, H], down_proj [E, H, I],
                                forward(hidden [T, H], top_k_index [T, k], top_k_weights [T, k])
        .shared_expert(+_gate)  Qwen2-MoE: shared MLP scaled by sigmoid(shared_expert_gate(x))
        .shared_experts         DeepSeek-V2/V3: shared MLP added unscaled

The routing rule of each family (softmax / sigmoid, group-limited top-k, renormalisation, routed scaling) lives
in its router's forward; the affinity AGQ needs is the `top_k_weights` the block hands its experts, so we read
it there (`route`, and the experts pre-hook in the pipeline) and never re-derive it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

SUPPORTED_MODEL_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3", "olmoe")

# Which linears of a decoder layer can be quantized. Routers are kept in full precision unless asked.
LINEAR_KINDS = ("attn", "dense", "shared", "router")
DEFAULT_TARGETS = ("experts", "shared", "attn", "dense")


class UnsupportedModelError(ValueError):
    pass


@dataclass
class MoEBlock:
    """One sparse MoE block of a decoder layer."""

    module: nn.Module
    router: nn.Module
    experts: nn.Module
    shared: nn.Module | None  # shared-expert MLP, if any
    shared_gate: nn.Linear | None  # Qwen2-MoE: output scaled by sigmoid(shared_gate(x))

    @property
    def num_experts(self) -> int:
        return self.experts.gate_up_proj.shape[0]

    @property
    def top_k(self) -> int:
        return self.router.top_k

    @property
    def intermediate_size(self) -> int:
        return self.experts.down_proj.shape[-1]

    def route(self, hidden: torch.Tensor):
        """(top_k_index [T, k], top_k_weights [T, k]) exactly as the block computes them for its experts."""
        _, weights, index = self.router(hidden.reshape(-1, hidden.shape[-1]))
        return index, weights


class ModelAdapter:
    """Reads the structure of a supported transformers 5 MoE causal LM."""

    def __init__(self, model: nn.Module):
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(
                f"model type {model_type!r} is not supported; moequant supports {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        self.model = model
        self.model_type = model_type

    # -- structure -------------------------------------------------------------------------------------------
    @property
    def backbone(self) -> nn.Module:
        return self.model.model

    @property
    def layers(self) -> nn.ModuleList:
        return self.backbone.layers

    @property
    def embed_tokens(self) -> nn.Module:
        return self.backbone.embed_tokens

    @property
    def lm_head(self) -> nn.Module:
        return self.model.lm_head

    def layer_prefix(self, i: int) -> str:
        return f"model.layers.{i}"

    def moe_block(self, layer: nn.Module) -> MoEBlock | None:
        mlp = getattr(layer, "mlp", None)
        experts = getattr(mlp, "experts", None)
        if experts is None or not hasattr(experts, "gate_up_proj"):
            return None
        shared = getattr(mlp, "shared_expert", None) or getattr(mlp, "shared_experts", None)
        return MoEBlock(mlp, mlp.gate, experts, shared, getattr(mlp, "shared_expert_gate", None))

    def moe_blocks(self) -> list[tuple[int, MoEBlock]]:
        return [(i, b) for i, layer in enumerate(self.layers) if (b := self.moe_block(layer)) is not None]

    def linears(self, layer: nn.Module, kinds=("attn", "dense", "shared")) -> dict[str, tuple[nn.Module, str]]:
        """Linears of one decoder layer by name relative to the layer -> (module, kind).

        kinds: attn (self-attention projections), dense (a dense MLP layer), shared (shared-expert MLP and its
        sigmoid gate), router (the MoE router weight [E, H]; never by default).
        """
        block = self.moe_block(layer)
        out = {}
        for name, mod in layer.named_modules():
            if name.startswith("self_attn.") and isinstance(mod, nn.Linear):
                kind = "attn"
            elif block is None and name.startswith("mlp.") and isinstance(mod, nn.Linear):
                kind = "dense"
            elif block is not None and isinstance(mod, nn.Linear) and (
                name.startswith("mlp.shared_expert.") or name.startswith("mlp.shared_experts.")
            ):
                kind = "shared"
            elif block is not None and name == "mlp.gate":
                kind = "router"
            else:
                continue
            if kind in kinds:
                out[name] = (mod, kind)
        return out


def get_adapter(model: nn.Module) -> ModelAdapter:
    return ModelAdapter(model)
