"""Model configs built offline: tiny ones for tests, real-shaped ones (random weights) for benchmarks."""
from __future__ import annotations

import transformers as T

from .adapter import SUPPORTED_MODEL_TYPES


def tiny_config(model_type: str, vocab_size: int = 256, hidden: int = 64, layers: int = 2, experts: int = 8,
                top_k: int = 2, moe_inter: int = 64, max_pos: int = 256):
    """A few-hundred-KB model of each supported family; input dims are multiples of 32 (group size 32)."""
    common = dict(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                  max_position_embeddings=max_pos, num_experts_per_tok=top_k, tie_word_embeddings=False,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if model_type == "mixtral":
        return T.MixtralConfig(**common, intermediate_size=moe_inter, num_key_value_heads=2, num_local_experts=experts)
    if model_type == "qwen2_moe":
        return T.Qwen2MoeConfig(**common, intermediate_size=2 * moe_inter, moe_intermediate_size=moe_inter,
                                shared_expert_intermediate_size=2 * moe_inter, num_key_value_heads=2,
                                num_experts=experts, norm_topk_prob=False)
    if model_type == "qwen3_moe":
        return T.Qwen3MoeConfig(**common, intermediate_size=2 * moe_inter, moe_intermediate_size=moe_inter,
                                num_key_value_heads=2, head_dim=hidden // 4, num_experts=experts, norm_topk_prob=True)
    if model_type == "olmoe":
        return T.OlmoeConfig(**common, intermediate_size=moe_inter, num_key_value_heads=4, num_experts=experts)
    if model_type in ("deepseek_v2", "deepseek_v3"):
        mla = dict(kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=32, num_key_value_heads=4,
                   n_routed_experts=experts, n_shared_experts=1, moe_intermediate_size=moe_inter,
                   intermediate_size=2 * moe_inter, first_k_dense_replace=1, n_group=2, topk_group=1)
        common["num_hidden_layers"] = layers + 1  # the first layer is dense, as in the real models
        if model_type == "deepseek_v2":
            return T.DeepseekV2Config(**common, **mla, q_lora_rank=None, topk_method="group_limited_greedy",
                                      routed_scaling_factor=1.5)
        return T.DeepseekV3Config(**common, **mla, q_lora_rank=32, routed_scaling_factor=2.5, norm_topk_prob=True)
    raise ValueError(f"model type {model_type!r} is not supported; choose one of {', '.join(SUPPORTED_MODEL_TYPES)}")


# Real shapes (public configs, written out here: no hub access). Random weights are fine for speed work.
REAL_SHAPES = {
    "mixtral-8x7b": lambda n: T.MixtralConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=n, num_attention_heads=32,
        num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=32768,
        rope_theta=1e6),
    "deepseek-v2-lite": lambda n: T.DeepseekV2Config(
        vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
        num_hidden_layers=n, num_attention_heads=16, num_key_value_heads=16, n_routed_experts=64,
        n_shared_experts=2, num_experts_per_tok=6, first_k_dense_replace=1, kv_lora_rank=512, q_lora_rank=None,
        qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128, n_group=1, topk_group=1, topk_method="greedy",
        routed_scaling_factor=1.0, max_position_embeddings=163840),
    "qwen1.5-moe-a2.7b": lambda n: T.Qwen2MoeConfig(
        vocab_size=151936, hidden_size=2048, intermediate_size=5632, moe_intermediate_size=1408,
        shared_expert_intermediate_size=5632, num_hidden_layers=n, num_attention_heads=16, num_key_value_heads=16,
        num_experts=60, num_experts_per_tok=4, norm_topk_prob=False, max_position_embeddings=8192),
    "qwen3-30b-a3b": lambda n: T.Qwen3MoeConfig(
        vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=n,
        num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
        norm_topk_prob=True, max_position_embeddings=40960),
}
REAL_LAYERS = {"mixtral-8x7b": 32, "deepseek-v2-lite": 27, "qwen1.5-moe-a2.7b": 24, "qwen3-30b-a3b": 48}


def real_config(name: str, num_layers: int | None = None):
    if name not in REAL_SHAPES:
        raise ValueError(f"unknown shape {name!r}; choose one of {', '.join(REAL_SHAPES)}")
    return REAL_SHAPES[name](num_layers or REAL_LAYERS[name])
