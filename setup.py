"""Build moequant and its extension moequant._C.

    pip install --no-build-isolation -e .

`--no-build-isolation` builds against the torch already installed (an isolated build would
download another torch). CUDA sources in csrc/ are compiled when torch has CUDA and nvcc is
found (arches from TORCH_CUDA_ARCH_LIST, default "8.0;9.0"); otherwise only the CPU sources,
with a one-line message. A failing CUDA compile is an error, never a silent CPU-only build.
"""
import glob
import os

from setuptools import setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError as e:  # an isolated build env, or torch not installed yet
    raise SystemExit("moequant builds against an installed torch: `pip install torch==2.13.0` (CPU) or a CUDA "
                     "build first, then `pip install --no-build-isolation -e .`") from e

ROOT = os.path.dirname(os.path.abspath(__file__))


def extension():
    cpp = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cu = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    if not cpp:
        return []
    # No -std flag: torch's cpp_extension picks the standard its headers need (C++17 up to
    # torch 2.13, C++20 from 2.14); forcing one breaks the build against the other.
    cxx = ["-O3"]
    want_cuda = os.environ.get("MOEQUANT_NO_CUDA", "0") != "1"
    if want_cuda and torch.version.cuda is not None and CUDA_HOME is not None and cu:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        print(f"moequant: building _C with CUDA (arch {os.environ['TORCH_CUDA_ARCH_LIST']}, CUDA_HOME={CUDA_HOME})")
        return [CUDAExtension(
            "moequant._C", cpp + cu,
            define_macros=[("MOEQUANT_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--use_fast_math", "-lineinfo"]},
        )]
    why = "torch has no CUDA" if torch.version.cuda is None else ("nvcc not found" if CUDA_HOME is None else "MOEQUANT_NO_CUDA=1")
    print(f"moequant: building _C for CPU only ({why})")
    return [CppExtension("moequant._C", cpp, extra_compile_args={"cxx": cxx})]


setup(
    name="moequant",
    version="0.1.0",
    description="MoEQuant (EBSS + AGQ) post-training quantization and fused 4-bit kernels for MoE LLMs",
    python_requires=">=3.10",
    packages=["moequant", "moequant.quant", "moequant.calib", "moequant.models", "moequant.nn", "moequant.data",
              "moequant.kernels"],
    # kernels/ is installed as moequant.kernels: a top-level `kernels` module would shadow
    # Hugging Face's `kernels` package, which transformers imports when present.
    package_dir={"moequant": "moequant", "moequant.kernels": "kernels"},
    package_data={"moequant.data": ["*.txt"]},
    ext_modules=extension(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    install_requires=[
        "torch>=2.6",
        "transformers>=5.15,<6",
        "safetensors>=0.4",
        "tokenizers>=0.21",
        "tqdm",
        "numpy",
    ],
    extras_require={"triton": ["triton>=3.3"], "test": ["pytest"], "plot": ["matplotlib"]},
    entry_points={"console_scripts": ["moequant=moequant.cli:main"]},
)
