"""EBSS: expert-balanced self-sampling of calibration sequences (MoEQuant, arXiv 2505.03804, §4.2, Algorithm 1).

Each sequence starts from one token drawn uniformly from the vocabulary (special tokens skipped) and grows by a
beam search of width w whose objective (Eqs. 9-10) is PPL · exp(sigma/tau), i.e. mean NLL + sigma/tau, where sigma is
the expert-balance measure of the sequence (Eqs. 3-4, mean over all MoE layers; see balance.py). Every child S‖v of a
live beam S (length l, cumulative log-probability R_S) is scored (Eqs. 11-14)

    cost(S‖v) = -(R_S + log P(v | S)) / (l + 1) + sigma(S) / tau

with sigma taken on the parent S ("deferred imbalance": the child's routing is only known after the forward that
consumes v). The w lowest costs survive (the paper writes arg-top-k of a quantity derived from an argmin: we
minimise). After the last token the best of the w beams by the same cost is kept. No randomness after the first
token; sigma is per sequence and sequences are independent.

Implementation: several sequences × w beams are one batch with a KV cache, so each generated token costs one
forward for all live beams of all sequences in the batch. Routing of the token a forward consumes is read by hooks
on every MoE router in that same forward and added to the beam's counts [num_moe_layers, E]. Exact shortcut: the
children of one parent differ only in log P(v|S), so only each beam's top-w tokens can survive: w per beam are
expanded, never the whole vocabulary. Log-probabilities are computed in fp32 (or the logits' dtype if wider).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..checkpoint import atomic_write
from ..models.adapter import get_adapter
from .balance import RouterRecorder, count_selections, load_stats, model_sigma

FINAL_SELECT = ("deferred", "full")


@dataclass
class EBSSConfig:
    """Parameters of EBSS; defaults are the paper's (w = 4, tau = 1.2, 128 sequences of 512 tokens).

    tau: balance temperature (> 0); float("inf") turns the balance term off (plain beam search of width w).
    batch_size: sequences generated together (one forward feeds batch_size * width rows); memory, not results.
    start_tokens: explicit first-token ids, one per sequence; default: drawn uniformly with `seed`.
    final_select: "deferred" (paper): the best final beam by its cost (Eqs. 11-14) at the last pruning (sigma of
        its parent); "full": by -R/L + sigma/tau with sigma including the last token's routing.
    """

    num_sequences: int = 128
    seq_len: int = 512
    width: int = 4
    tau: float = 1.2
    seed: int = 0
    batch_size: int = 32
    start_tokens: list[int] | None = None
    final_select: str = "deferred"

    def __post_init__(self):
        self.tau = float(self.tau)
        if self.start_tokens is not None:
            self.start_tokens = [int(t) for t in self.start_tokens]
        self.validate()

    def validate(self, model_config=None) -> None:
        """Model-free checks always; with a model config also the context length and vocabulary."""
        for name in ("num_sequences", "width", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"EBSSConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.seq_len < 2:
            raise ValueError(f"EBSSConfig.seq_len must be >= 2 (a start token plus generated ones), got {self.seq_len}")
        if math.isnan(self.tau) or self.tau <= 0:
            raise ValueError(f"EBSSConfig.tau must be > 0 (or float('inf') for no balance term), got {self.tau}")
        if self.final_select not in FINAL_SELECT:
            raise ValueError(f"EBSSConfig.final_select must be one of {FINAL_SELECT}, got {self.final_select!r}")
        if self.start_tokens is not None and len(self.start_tokens) != self.num_sequences:
            raise ValueError(f"EBSSConfig.start_tokens has {len(self.start_tokens)} ids but num_sequences is "
                             f"{self.num_sequences}: give one start token per sequence (or None to draw them)")
        if model_config is None:
            return
        max_pos = getattr(model_config, "max_position_embeddings", None)
        if max_pos is not None and self.seq_len > max_pos:
            raise ValueError(f"EBSSConfig.seq_len={self.seq_len} is longer than the model's context "
                             f"(max_position_embeddings={max_pos}); lower seq_len to <= {max_pos}")
        vocab = model_config.vocab_size
        if self.width > vocab:
            raise ValueError(f"EBSSConfig.width={self.width} exceeds the vocabulary size {vocab}")
        if self.start_tokens is not None and not all(0 <= t < vocab for t in self.start_tokens):
            bad = [t for t in self.start_tokens if not 0 <= t < vocab][:5]
            raise ValueError(f"EBSSConfig.start_tokens {bad} are outside the vocabulary [0, {vocab})")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["tau"] = "inf" if math.isinf(self.tau) else self.tau  # strict JSON has no Infinity
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "EBSSConfig":
        return cls(**{**d, "tau": float(d["tau"])})


@dataclass
class EBSSResult:
    """tokens [num_sequences, seq_len] int64 (feed to calibration as is: no padding, no re-tokenisation);
    params: JSON-serialisable (config, start tokens, sigma / NLL / PPL summary, timing);
    expert_load [num_moe_layers, E] int64: routed selections over all tokens of `tokens`."""

    tokens: torch.Tensor
    params: dict
    expert_load: torch.Tensor | None = field(default=None)

    @staticmethod
    def _paths(path) -> tuple[Path, Path]:
        p = Path(path)
        stem = p.with_suffix("") if p.suffix in (".safetensors", ".json") else p
        return stem.with_name(stem.name + ".safetensors"), stem.with_name(stem.name + ".json")

    def save(self, path) -> tuple[Path, Path]:
        """Writes <stem>.safetensors (tokens, expert_load; params in its metadata) and <stem>.json (params), each
        atomically (temp file in the same folder, then os.replace). path: <stem>, <stem>.safetensors or .json."""
        from safetensors.torch import save_file

        st_path, json_path = self._paths(path)
        st_path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(self.params, indent=2, sort_keys=True)
        tensors = {"tokens": self.tokens.detach().cpu().to(torch.int64).contiguous()}
        if self.expert_load is not None:
            tensors["expert_load"] = self.expert_load.detach().cpu().to(torch.int64).contiguous()
        atomic_write(st_path, lambda tmp: save_file(tensors, tmp, metadata={"params": text}))
        atomic_write(json_path, lambda tmp: Path(tmp).write_text(text + "\n"))
        return st_path, json_path

    @classmethod
    def load(cls, path) -> "EBSSResult":
        from safetensors import safe_open

        st_path, json_path = cls._paths(path)
        with safe_open(str(st_path), framework="pt") as f:
            tokens = f.get_tensor("tokens")
            load = f.get_tensor("expert_load") if "expert_load" in f.keys() else None
            meta = f.metadata() or {}
        params = json.loads(json_path.read_text()) if json_path.exists() else json.loads(meta.get("params", "{}"))
        return cls(tokens=tokens, params=params, expert_load=load)


def _special_ids(model_config, tokenizer) -> set[int]:
    if tokenizer is not None:
        return set(int(t) for t in tokenizer.all_special_ids)
    ids = set()
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        v = getattr(model_config, name, None)
        for t in (v if isinstance(v, (list, tuple)) else [v]):
            if t is not None:
                ids.add(int(t))
    return ids


def draw_start_tokens(model_config, num_sequences: int, seed: int, tokenizer=None) -> torch.Tensor:
    """First tokens drawn uniformly from the vocabulary without special tokens (paper §4.2), CPU generator seeded
    by `seed`, so the draw does not depend on the device or batch size. With a tokenizer the vocabulary is the
    tokenizer's (ids past len(tokenizer) are embedding padding) and its special ids are skipped."""
    vocab = model_config.vocab_size if tokenizer is None else min(len(tokenizer), model_config.vocab_size)
    special = _special_ids(model_config, tokenizer)
    eligible = torch.tensor([t for t in range(vocab) if t not in special], dtype=torch.int64)
    if eligible.numel() == 0:
        raise ValueError("no non-special token to start from: the vocabulary is all special tokens")
    gen = torch.Generator().manual_seed(int(seed))
    return eligible[torch.randint(eligible.numel(), (num_sequences,), generator=gen)]


def _log_probs(logits: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)


@torch.no_grad()
def _generate_batch(model, rec: RouterRecorder, start: torch.Tensor, cfg: EBSSConfig, step_done=None):
    """Beam search for the sequences whose start tokens are `start` [B]. Returns (tokens [B, L], R [B] summed
    log-probs of the L-1 generated tokens, counts [B, num_layers, E] routing of all L tokens, cost [B])."""
    from transformers import DynamicCache

    B, w, L, E = start.shape[0], cfg.width, cfg.seq_len, rec.num_experts
    dev = start.device
    cache = DynamicCache(config=model.config)
    tokens = torch.zeros(B, w, L, dtype=torch.int64, device=dev)
    tokens[:, :, 0] = start[:, None]
    # R_S: cumulative log-probability per beam. Only beam 0 of each sequence is live at the start (all w beams hold
    # the same start token); the others get R = -inf so every child of theirs costs +inf and is never kept.
    R = torch.full((B, w), -math.inf, dtype=torch.float64, device=dev)
    R[:, 0] = 0.0
    counts = torch.zeros(B, w, len(rec.blocks), E, dtype=torch.int32, device=dev)
    row_base = (torch.arange(B, device=dev) * w)[:, None]
    inv_tau = 0.0 if math.isinf(cfg.tau) else 1.0 / cfg.tau
    cost = torch.zeros(B, w, dtype=torch.float64, device=dev)
    inp = tokens[:, :, 0].reshape(B * w, 1)

    for t in range(L - 1):  # beams hold l = t + 1 tokens; this forward consumes token t
        logits = model(input_ids=inp, past_key_values=cache, use_cache=True).logits[:, -1]
        counts += count_selections(rec.take(), E, dtype=torch.int32).view(B, w, -1, E)
        logp = _log_probs(logits).view(B, w, -1)
        sigma = model_sigma(counts)  # sigma(S) of each parent over its l tokens (Eqs. 3-4): deferred imbalance
        top_lp, top_tok = logp.topk(w, dim=-1)  # exact shortcut: only a parent's top-w children can survive
        child_R = R[:, :, None] + top_lp.to(torch.float64)  # R_{S‖v} = R_S + log P(v|S)
        child_cost = -child_R / (t + 2) + (sigma * inv_tau)[:, :, None]  # Eqs. 11-14 cost, l + 1 = t + 2
        cost, pick = child_cost.view(B, w * w).topk(w, dim=-1, largest=False)  # prune to the w lowest costs
        parent = torch.div(pick, w, rounding_mode="floor")
        R = child_R.view(B, w * w).gather(1, pick)
        new_tok = top_tok.view(B, w * w).gather(1, pick)
        cache.reorder_cache((row_base + parent).view(-1))
        tokens = tokens.gather(1, parent[:, :, None].expand(B, w, L))
        tokens[:, :, t + 1] = new_tok
        counts = counts.gather(1, parent[:, :, None, None].expand_as(counts))
        inp = new_tok.view(B * w, 1)
        if step_done is not None:
            step_done()

    # The last token's routing: one more forward of the decoder stack (no lm_head) completes the counts.
    get_adapter(model).backbone(input_ids=inp, past_key_values=cache, use_cache=True)
    counts += count_selections(rec.take(), E, dtype=torch.int32).view(B, w, -1, E)
    if cfg.final_select == "full":
        cost = -R / L + model_sigma(counts) * inv_tau
    best = cost.argmin(dim=1)  # the best of the w final beams by the same cost (paper: deferred)
    take = lambda x: x[torch.arange(B, device=dev), best]  # noqa: E731
    return take(tokens), take(R), take(counts).to(torch.int64), take(cost)


def ebss_generate(model, config: EBSSConfig | None = None, tokenizer=None, progress: bool = True) -> EBSSResult:
    """Generate config.num_sequences calibration sequences of config.seq_len tokens with EBSS on the model's device.

    Deterministic for a given config (seed, start tokens) on a given device and batch size.
    """
    cfg = config or EBSSConfig()
    cfg.validate(model.config)
    rec = RouterRecorder(model)
    dev = model.get_input_embeddings().weight.device
    if cfg.start_tokens is not None:
        start = torch.tensor(cfg.start_tokens, dtype=torch.int64)
    else:
        start = draw_start_tokens(model.config, cfg.num_sequences, cfg.seed, tokenizer)

    chunks = list(torch.split(start, cfg.batch_size))
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(chunks) * (cfg.seq_len - 1), desc="EBSS", unit="tok")
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    outs = []
    try:
        with rec:
            for chunk in chunks:
                outs.append(_generate_batch(model, rec, chunk.to(dev), cfg,
                                            step_done=(lambda: bar.update(1)) if bar is not None else None))
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    seconds = time.perf_counter() - t0

    tokens, R, counts, cost = (torch.cat([o[i] for o in outs]).cpu() for i in range(4))
    nll = -R / (cfg.seq_len - 1)  # mean NLL per generated token of each sequence (the model's own PPL on it)
    seq_sigma = model_sigma(counts)
    set_load = counts.sum(0)
    stats = load_stats(set_load, rec.layer_ids)
    params = dict(
        method="ebss",
        config=cfg.to_dict(),
        start_tokens=start.tolist(),
        model_type=model.config.model_type,
        vocab_size=int(model.config.vocab_size),
        moe_layers=rec.layer_ids,
        num_experts=rec.num_experts,
        top_k=int(rec.blocks[0][1].top_k),
        sigma_set=stats["sigma"],  # sigma of the whole set's expert load (what the paper reports)
        sigma_per_sequence_mean=float(seq_sigma.mean()),  # the quantity the search minimises, averaged
        zero_experts_set=stats["zero_experts"],
        nll_mean=float(nll.mean()),
        ppl=float(torch.exp(nll.mean())),
        cost_mean=float(cost.mean()),
        seconds=seconds,
        sequences_per_second=cfg.num_sequences / seconds,
        device=str(dev),
    )
    return EBSSResult(tokens=tokens, params=params, expert_load=set_load)
