"""Two corrections to Triton's CPU interpreter (``TRITON_INTERPRET=1``) used by the kernel tests.

Triton 3.9's interpreter, as measured here:

1. decodes every ``tl.dot_scaled`` scale byte as E8M0 (2^(b-127)), also when the scales are ``float8e4nv``:
   the E4M3, 16-wide-group scales of NVFP4 that the compiled path hands to the block-scaled MMA of sm_100+;
2. multiplies BF16 operands of ``tl.dot`` as integers: it keeps BF16 as uint16 bit patterns and hands them
   to ``np.matmul`` unchanged (a 16x16 BF16 product comes out around 1e10).

:func:`install` makes the interpreter decode ``float8e4nv`` scales as E4M3 (through ml_dtypes) and widen BF16
``tl.dot`` operands to float32 (exact) first; every other case goes to Triton's own code. The kernels are
then tested under the semantics the hardware implements.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np


def install() -> None:
    import triton.language as tl
    from triton.runtime import interpreter

    original = getattr(interpreter._dot_scaled_scale_to_f32, "__wrapped__", interpreter._dot_scaled_scale_to_f32)

    def scale_to_f32(scale_handle, compute_type):
        if scale_handle.dtype == tl.float8e4nv:
            return scale_handle.data.view(np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)
        return original(scale_handle, compute_type)

    scale_to_f32.__wrapped__ = original
    interpreter._dot_scaled_scale_to_f32 = scale_to_f32

    builder = interpreter.InterpreterBuilder
    create_dot = getattr(builder.create_dot, "__wrapped__", builder.create_dot)

    def widened(handle):
        if handle.dtype == tl.bfloat16:
            bits = handle.data.view(np.uint16).astype(np.uint32) << 16
            return interpreter.TensorHandle(bits.view(np.float32), tl.float32)
        return handle

    def dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return create_dot(self, widened(a), widened(b), d, input_precision, max_num_imprecise_acc)

    dot.__wrapped__ = create_dot
    builder.create_dot = dot
