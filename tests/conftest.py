import os

import torch

# Without a GPU the Triton kernels run in Triton's interpreter; it must be chosen before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import transformers as T  # noqa: E402

from moequant.models import SUPPORTED_MODEL_TYPES, tiny_config  # noqa: E402

CALIB_TEXT = os.path.join(os.path.dirname(__file__), "..", "moequant", "data", "calib_en.txt")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one)")


def make_tiny(model_type, seed=0, **kw):
    torch.manual_seed(seed)
    return T.AutoModelForCausalLM.from_config(tiny_config(model_type, **kw)).eval()


def clone_model(model):
    m = T.AutoModelForCausalLM.from_config(model.config).eval()
    m.load_state_dict(model.state_dict())
    return m


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    """A 256-token byte-level BPE trained on the package's calibration text (a second, no network)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    with open(CALIB_TEXT, encoding="utf-8") as f:
        text = f.read()[:200_000]
    bpe.train_from_iterator([text], vocab_size=256 + 3 + 61, min_frequency=2,
                            special_tokens=["<pad>", "<s>", "</s>"], show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, pad_token="<pad>", bos_token="<s>",
                                  eos_token="</s>")
    d = tmp_path_factory.mktemp("tok")
    tok.save_pretrained(d)
    return tok


@pytest.fixture(scope="session")
def tiny_mixtral_dir(tmp_path_factory, tiny_tokenizer):
    """A tiny Mixtral built offline with from_config and saved as an ordinary HF folder (+ tokenizer)."""
    d = tmp_path_factory.mktemp("tiny-mixtral")
    model = make_tiny("mixtral", vocab_size=len(tiny_tokenizer))
    model.save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    return str(d)


@pytest.fixture(params=SUPPORTED_MODEL_TYPES)
def model_type(request):
    return request.param


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def interpreter_only(kernel):
    """Skip marker for CPU tests of a Triton kernel: they need Triton's interpreter, which Triton chooses when it is
    imported (its own standard library included). On a CUDA machine, or if triton was imported before
    TRITON_INTERPRET was set, run them in their own process with TRITON_INTERPRET=1."""
    import triton
    from triton.runtime.interpreter import InterpretedFunction

    on = isinstance(kernel, InterpretedFunction) and isinstance(triton.language.standard.cdiv, InterpretedFunction)
    return pytest.mark.skipif(not on, reason="CPU interpreter test: run with TRITON_INTERPRET=1 set before triton "
                                             "is imported")
