"""Convert one safetensors file of float weights to an fp4fmt file (RTN, NVFP4 or MXFP4).

Linear-layer weights (tensors of 2 or more dims whose name ends in ``.weight``) are quantized along their
last axis; embeddings, ``lm_head``, norms, biases and anything matching an ignore pattern stay as they are.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from .. import dtypes
from ..errors import FP4FmtError
from ..files import safe_open, save_file
from ..qtensor import dequantize, quantize

from .plan import DEFAULT_IGNORE


def should_quantize(name: str, shape: tuple[int, ...], dtype: str, ignore: Sequence[str] = DEFAULT_IGNORE) -> str | None:
    """None if the tensor should be quantized, else the reason it is kept."""
    if dtype not in dtypes.FLOAT_SOURCE_DTYPES:
        return f"dtype {dtype} is not a float weight"
    if len(shape) < 2:
        return "not a matrix (bias, norm or scalar)"
    if not name.endswith(".weight"):
        return "not a .weight tensor"
    for pattern in ignore:
        if re.search(pattern, name):
            return f"matches ignore pattern {pattern!r}"
    return None


@dataclass
class ConversionReport:
    """Per-tensor outcome of a conversion: SQNR of the quantized ones, the reason for the kept ones."""

    scheme: str
    quantized: dict[str, dict] = field(default_factory=dict)
    kept: dict[str, str] = field(default_factory=dict)


def _sqnr_db(x: np.ndarray, y: np.ndarray) -> float:
    noise = float(np.sum((x - y) ** 2, dtype=np.float64))
    signal = float(np.sum(x.astype(np.float64) ** 2))
    if noise == 0:
        return float("inf")
    return 10.0 * np.log10(signal / noise) if signal > 0 else float("-inf")


def convert_file(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    scheme: str = "nvfp4",
    *,
    ignore: Sequence[str] = DEFAULT_IGNORE,
    scale_rule: str | None = None,
    progress: Callable | None = None,
) -> ConversionReport:
    """Quantize the linear weights of safetensors file ``src`` into fp4fmt file ``dst`` (src is only read)."""
    if os.path.abspath(src) == os.path.abspath(dst):
        raise ValueError("the destination must differ from the source")
    report = ConversionReport(scheme)
    out: dict[str, object] = {}
    with safe_open(src) as f:
        names = f.keys()
        it = progress(names) if progress else names
        for name in it:
            value = f.get_tensor(name)
            if not isinstance(value, np.ndarray):  # already quantized: keep as is
                out[name] = value
                report.kept[name] = "already quantized"
                continue
            reason = should_quantize(name, value.shape, dtypes.dtype_name(value.dtype), ignore)
            if reason is not None:
                out[name] = np.array(value)
                report.kept[name] = reason
                continue
            try:
                qt = quantize(value, scheme, scale_rule=scale_rule, name=name)
            except FP4FmtError as e:
                raise type(e)(e.rule, file=src, tensor=e.tensor) from None
            x = value.astype(np.float32)
            y = dequantize(qt, name=name)
            report.quantized[name] = {
                "shape": list(value.shape),
                "sqnr_db": _sqnr_db(x, y),
                "max_abs_error": float(np.max(np.abs(x - y))) if x.size else 0.0,
                "bits_per_weight": qt.bits_per_weight,
            }
            out[name] = qt
        metadata = f.metadata()
    save_file(out, dst, metadata=metadata)
    return report
