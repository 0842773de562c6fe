"""Small helpers shared by the kernel launchers: where a kernel may run, and the interpreter switch."""
from __future__ import annotations

import torch
import triton
from triton.runtime import interpreter as _interp
from triton.runtime.interpreter import InterpretedFunction

def _patch_interpreter_index():
    """Triton 3.6's interpreter turns a scalar into a Python int with int(array of shape (1,)), which numpy >= 2.4
    rejects, so `range(0, K, BLOCK)` over a kernel argument fails under TRITON_INTERPRET=1. Take the element
    explicitly instead; compiled kernels are unaffected."""
    orig = getattr(_interp, "_patch_lang_tensor", None)
    if orig is None or getattr(orig, "_moequant_patched", False):
        return

    def patched(tensor, scope):
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._moequant_patched = True
    _interp._patch_lang_tensor = patched


_patch_interpreter_index()


def interpreting() -> bool:
    return bool(triton.knobs.runtime.interpret)


def kernel_for(kernel, device: torch.device, name: str):
    """The kernel to launch on tensors living on `device`.

    CUDA tensors run the compiled kernel. CPU tensors run only under the Triton interpreter, which must be
    on (TRITON_INTERPRET=1) before triton is imported: Triton decides it when functions are decorated,
    its own standard library included. There is no silent fallback to PyTorch.
    """
    if device.type == "cuda":
        return kernel
    if device.type != "cpu":
        raise ValueError(f"{name}: tensors on {device} are not supported (CUDA, or CPU with TRITON_INTERPRET=1)")
    if not isinstance(kernel, InterpretedFunction):
        raise RuntimeError(
            f"{name}: got CPU tensors, but the Triton kernel needs a CUDA GPU. Use the plain-PyTorch "
            f"reference in moequant.reference on CPU, or set TRITON_INTERPRET=1 (before importing triton) "
            f"to run the kernel in Triton's (slow) interpreter."
        )
    if not isinstance(triton.language.standard.cdiv, InterpretedFunction):
        raise RuntimeError(
            f"{name}: TRITON_INTERPRET=1 was set after triton had been imported, so Triton's own library is "
            f"compiled-only and the interpreter cannot run it; set the variable before anything imports triton."
        )
    return kernel


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())
