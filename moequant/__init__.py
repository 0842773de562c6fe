"""moequant: MoEQuant (EBSS + AGQ) post-training quantization and fused 4-bit kernels for MoE LLMs.

    import moequant
    result = moequant.quantize(model, moequant.QuantConfig(method="moequant", bits=4), output_dir="out")
    model = moequant.load("out")
"""
__version__ = "0.1.0"

from .api import quantize, save  # noqa: E402
from .loading import load  # noqa: E402
from .config import QuantConfig  # noqa: E402
from .models.adapter import SUPPORTED_MODEL_TYPES, UnsupportedModelError, get_adapter  # noqa: E402

__all__ = ["quantize", "load", "save", "QuantConfig", "get_adapter", "SUPPORTED_MODEL_TYPES", "UnsupportedModelError"]
