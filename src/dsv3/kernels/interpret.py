"""Running Triton kernels on the CPU under TRITON_INTERPRET=1 (tests and dry runs)."""


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
