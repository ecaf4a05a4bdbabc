"""fp4fmt: a versioned on-disk format, codec and toolkit for microscaled FP4 (NVFP4, MXFP4) weights.

    >>> import numpy as np, fp4fmt
    >>> qt = fp4fmt.quantize(np.random.randn(256, 512).astype(np.float32), scheme="nvfp4")
    >>> fp4fmt.save_file({"w": qt, "bias": np.zeros(256, np.float32)}, "model.fp4.safetensors")
    >>> w = fp4fmt.dequantize(fp4fmt.load_file("model.fp4.safetensors")["w"])

The format is specified in spec/fp4fmt-v1.md; module names follow its sections.
"""

from .descriptor import FORMAT_VERSION
from .errors import ChecksumError, FormatError, FP4FmtError, QuantizationError, UnsupportedVersionError, WriteError
from .files import load, load_file, safe_open, save, save_file
from .qtensor import ErrorStats, QTensor, dequantize, quantize, quantize_with_error
from .schemes import MXFP4, NVFP4, SCHEMES

__version__ = "0.1.0"

__all__ = [
    "FORMAT_VERSION",
    "MXFP4",
    "NVFP4",
    "SCHEMES",
    "ChecksumError",
    "ErrorStats",
    "FP4FmtError",
    "FormatError",
    "QTensor",
    "QuantizationError",
    "UnsupportedVersionError",
    "WriteError",
    "dequantize",
    "load",
    "load_file",
    "quantize",
    "quantize_with_error",
    "safe_open",
    "save",
    "save_file",
]
