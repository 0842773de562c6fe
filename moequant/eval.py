"""Evaluation metrics, one function each: perplexity, KL divergence from the float model, top-1 agreement.

All of them read text as non-overlapping windows of `ctx_len` tokens (the stated context length); every token
after the first of a window is scored once, predicted from the tokens before it in its window.
Expert-load statistics of a calibration set live in `moequant.calib.balance`.
"""
from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

DEFAULT_EVAL_TEXT = os.path.join(os.path.dirname(__file__), "data", "eval_en.txt")


def eval_windows(ids: torch.Tensor, ctx_len: int, max_tokens: int | None = None) -> torch.Tensor:
    """1-D token ids -> [W, ctx_len] non-overlapping windows (the tail that does not fill a window is dropped)."""
    ids = ids.flatten()
    if max_tokens is not None:
        ids = ids[:max_tokens]
    n = ids.numel() // ctx_len
    if n == 0:
        raise ValueError(f"the evaluation text has {ids.numel()} tokens, fewer than one window of {ctx_len}")
    return ids[: n * ctx_len].view(n, ctx_len)


def _device(model):
    return next(model.parameters()).device


@torch.no_grad()
def _logprobs(model, batch):
    logits = model(batch.to(_device(model))).logits[:, :-1].float()
    return F.log_softmax(logits, dim=-1)


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch_size: int = 8) -> float:
    """exp(mean next-token NLL) over [W, L] windows."""
    nll, n = 0.0, 0
    for batch in windows.split(batch_size):
        lp = _logprobs(model, batch)
        tgt = batch[:, 1:].to(lp.device)
        nll += -lp.gather(-1, tgt.unsqueeze(-1)).sum().item()
        n += tgt.numel()
    return math.exp(nll / n)


@torch.no_grad()
def compare(ref_model, model, windows: torch.Tensor, batch_size: int = 8) -> dict:
    """Perplexity of both, mean KL(P_ref ‖ P_model) per token, and top-1 agreement of `model` with `ref_model`."""
    nll_ref = nll = kl = agree = 0.0
    n = 0
    for batch in windows.split(batch_size):
        lp_ref, lp = _logprobs(ref_model, batch), _logprobs(model, batch)
        lp = lp.to(lp_ref.device)
        tgt = batch[:, 1:].to(lp.device).unsqueeze(-1)
        nll_ref += -lp_ref.gather(-1, tgt).sum().item()
        nll += -lp.gather(-1, tgt).sum().item()
        kl += (lp_ref.exp() * (lp_ref - lp)).sum().item()
        agree += (lp_ref.argmax(-1) == lp.argmax(-1)).sum().item()
        n += tgt.numel()
    return {"ppl_ref": math.exp(nll_ref / n), "ppl": math.exp(nll / n), "kl": kl / n, "top1": agree / n,
            "tokens": n}


def kl_divergence(ref_model, model, windows, batch_size: int = 8) -> float:
    return compare(ref_model, model, windows, batch_size)["kl"]


def top1_agreement(ref_model, model, windows, batch_size: int = 8) -> float:
    return compare(ref_model, model, windows, batch_size)["top1"]


def load_eval_windows(tokenizer, ctx_len: int, path: str | None = None, max_tokens: int | None = 32768):
    """Windows of the evaluation text (default: the test-split English text the package carries)."""
    from .calib.text import tokenize

    path = path or DEFAULT_EVAL_TEXT
    if not os.path.isfile(path):
        raise FileNotFoundError(f"evaluation text {path!r} not found; pass --eval-file PATH")
    with open(path, encoding="utf-8") as f:
        return eval_windows(tokenize(tokenizer, f.read()), ctx_len, max_tokens)
