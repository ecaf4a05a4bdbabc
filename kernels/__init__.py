"""fp4fmt.kernels (extra ``[kernels]``): Triton kernels that consume fp4fmt packed weights directly.

``fp4_linear(x, codes, scales, tensor_scale, k, ...)`` picks a path by device (``dispatch.choose_path``):
``dot_scaled`` (block-scaled MMA, native on sm_100+) or ``weight_only`` (decode in registers, any GPU).
The kernels are in ``fp4_matmul``; with ``TRITON_INTERPRET=1`` they run on the CPU (how CI tests them).
Importing this package does not import Triton; calling ``fp4_linear`` does.
"""

from __future__ import annotations


def fp4_linear(*args, **kwargs):
    """See :func:`fp4fmt.kernels.dispatch.fp4_linear`."""
    from .dispatch import fp4_linear as run

    return run(*args, **kwargs)


__all__ = ["fp4_linear"]
