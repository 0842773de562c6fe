"""Calibration from text: random windows of a tokenized text (GPTQ's usual recipe).

The default text is `moequant/data/calib_en.txt`, English prose from the train split of the project's corpus
(State of the Union addresses and Shakespeare, public domain; see zoo/README.md), shipped with the package.
"""
from __future__ import annotations

import os

import torch

DEFAULT_CALIB_TEXT = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data", "calib_en.txt")


def read_text(path: str | None) -> str:
    path = path or DEFAULT_CALIB_TEXT
    if not os.path.isfile(path):
        raise FileNotFoundError(f"calibration text {path!r} not found; pass --calib-file PATH to a UTF-8 text file")
    with open(path, encoding="utf-8") as f:
        return f.read()


def tokenize(tokenizer, text: str) -> torch.Tensor:
    # verbose=False: a long text is meant to exceed model_max_length here; it is cut into windows afterwards
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def sample_windows(ids: torch.Tensor, num_samples: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """`num_samples` windows of `seq_len` tokens at seeded random offsets -> LongTensor [num_samples, seq_len]."""
    if ids.numel() < seq_len + 1:
        raise ValueError(f"the calibration text has {ids.numel()} tokens, fewer than seq_len={seq_len}; "
                         f"use a longer text or a smaller --seq-len")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len, (num_samples,), generator=g)
    return torch.stack([ids[s:s + seq_len] for s in starts.tolist()])


def text_calibration(tokenizer, num_samples: int, seq_len: int, path: str | None = None, seed: int = 0):
    """Token windows for calibration from a text file (default: the English text the package carries)."""
    if tokenizer is None:
        raise ValueError("text calibration needs the model's tokenizer (the model folder has none): "
                         "pass --tokenizer PATH, or give calibration token ids directly")
    return sample_windows(tokenize(tokenizer, read_text(path)), num_samples, seq_len, seed)
