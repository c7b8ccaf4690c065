"""What every kernel module shares: the optional Triton import, the FP8 constants, and which tensors a dispatcher
may send to a Triton kernel.

- triton is optional: CPU runs need only the PyTorch references, so `triton` / `tl` are None where it is missing
  and `HAS_TRITON` says which.
- `BLOCK` (128) is the FP8 recipe's tile length and block side and the checkpoint's `weight_scale_inv` block
  (spec 2.3, TR 3.3); `FP8_MAX` the largest finite e4m3 value. dsv3.fp8 and dsv3.checkpoint take them from here.
- `use_triton(x, env, fp8)`: a CUDA tensor of a dtype Triton's kernels take (bf16, fp16, fp32: `tl.dot` has no
  fp64 on the GPU), triton importable, the environment switch `env` not set to "reference", and, for kernels that
  convert to or multiply e4m3 (`fp8e4nv`), a GPU of sm_89 or newer. Device capabilities are read once per device.
- `patch_interpreter_for_numpy2`: running these kernels on the CPU under TRITON_INTERPRET=1 (tests, dry runs).
- Programmatic dependent launch (PDL, sm_90+): inside `programmatic_launch()`, the decode kernels launch with
  `launch_pdl` (`pdl_launch(x)`: their launch keywords) and start with `pdl_entry(PDL)`: wait for the previous
  kernel's completion (`griddepcontrol.wait`), then let the next one launch. A kernel's launch and prologue then
  overlap the tail of the one before it instead of following it; nothing is read or written before the wait, so
  the order of memory effects is the stream's. The decode step of `lite` at batch 1 is ~546 kernels of a few us
  each (RESULTS.md, issue 16), where those gaps add up. On by default in the decode graphs (`EngineConfig.pdl`;
  +5-6% at batch 1 on an H100, RESULTS.md twenty-fourth session); CUDA graphs capture it.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
from collections.abc import Iterator

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None
    tl = None

HAS_TRITON = triton is not None
BLOCK = 128
FP8_MAX = 448.0
TRITON_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

__all__ = ["BLOCK", "FP8_MAX", "HAS_TRITON", "TRITON_DTYPES", "capability", "need_triton",
           "patch_interpreter_for_numpy2", "pdl_entry", "pdl_launch", "programmatic_launch", "tl", "triton",
           "use_triton"]


def need_triton(name: str) -> None:
    if not HAS_TRITON:
        raise RuntimeError(f"{name} needs triton (pip install triton)")


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def capability(device: torch.device) -> tuple[int, int]:
    """(major, minor) of a CUDA device, (0, 0) for any other."""
    if device.type != "cuda":
        return (0, 0)
    return _capability(device.index if device.index is not None else torch.cuda.current_device())


def use_triton(x: Tensor, env: str | None = None, fp8: bool = False) -> bool:
    """Whether a dispatcher should run its Triton kernel on x (module docstring)."""
    if not (HAS_TRITON and isinstance(x, Tensor) and x.is_cuda and x.dtype in TRITON_DTYPES):
        return False
    if env is not None and os.environ.get(env, "") == "reference":
        return False
    return not fp8 or capability(x.device) >= (8, 9)


def patch_interpreter_for_numpy2() -> None:
    """Triton 3.6's interpreter converts scalar tensors (numpy arrays of shape (1,)) with int(array), which numpy
    >= 2.4 refuses: `for i in range(start, end)` with run-time bounds then fails. Newer Triton squeezes first; do the
    same here (interpreter only: compiled kernels and the installed package are untouched)."""
    import numpy as np
    try:
        int(np.zeros(1, dtype=np.int32))
        return
    except TypeError:
        pass
    import triton.runtime.interpreter as interpreter
    original = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patched


_PDL = contextvars.ContextVar("dsv3_programmatic_launch", default=False)

if HAS_TRITON:
    try:
        from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
        _HAS_GDC = True
    except ImportError:  # pragma: no cover - a Triton without grid dependency control: PDL stays off
        _HAS_GDC = False

    @triton.jit
    def pdl_entry(PDL: tl.constexpr):
        """A kernel's first statement: with PDL, wait until the kernel before it has finished and its writes are
        visible, then allow the next kernel to launch (its own wait keeps it from reading this one's outputs)."""
        if PDL:
            gdc_wait()
            gdc_launch_dependents()
else:  # pragma: no cover - exercised where triton is absent
    _HAS_GDC = False
    pdl_entry = None


@contextlib.contextmanager
def programmatic_launch(on: bool = True) -> Iterator[None]:
    """Inside this block the decode kernels launch with programmatic dependent launch where the device has it
    (module docstring); `on=False` is a no-op block."""
    token = _PDL.set(bool(on))
    try:
        yield
    finally:
        _PDL.reset(token)


def pdl_launch(x: Tensor) -> dict:
    """The launch keywords of a kernel that starts with `pdl_entry(PDL)`, for its operand x: PDL on inside
    `programmatic_launch()` for a CUDA tensor of an sm_90+ device (never under the interpreter), else none (the
    kernel's PDL default, False)."""
    if not (_HAS_GDC and _PDL.get() and isinstance(x, Tensor) and x.is_cuda and capability(x.device) >= (9, 0)):
        return {}
    return {"PDL": True, "launch_pdl": True}
