"""safetensors dtype names <-> numpy dtypes (spec §2.3). bfloat16 and float8 come from ml_dtypes."""

from __future__ import annotations

import ml_dtypes
import numpy as np

# Every safetensors dtype an fp4fmt reader materializes, with its numpy dtype (little-endian).
_DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype(np.uint8),
    "I8": np.dtype(np.int8),
    "U16": np.dtype("<u2"),
    "I16": np.dtype("<i2"),
    "U32": np.dtype("<u4"),
    "I32": np.dtype("<i4"),
    "U64": np.dtype("<u8"),
    "I64": np.dtype("<i8"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F32": np.dtype("<f4"),
    "F64": np.dtype("<f8"),
    "C64": np.dtype("<c8"),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "F8_E4M3FNUZ": np.dtype(ml_dtypes.float8_e4m3fnuz),
    "F8_E5M2FNUZ": np.dtype(ml_dtypes.float8_e5m2fnuz),
    "F8_E8M0": np.dtype(ml_dtypes.float8_e8m0fnu),
}
_NAMES: dict[np.dtype, str] = {v: k for k, v in _DTYPES.items()}

# Dtypes a weight may have before quantization (recorded as the descriptor's "dtype").
FLOAT_SOURCE_DTYPES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "F8_E4M3FNUZ", "F8_E5M2FNUZ")

# safetensors names that exist but that fp4fmt v1 does not materialize (sub-byte or exotic).
KNOWN_UNSUPPORTED = ("F4", "F6_E2M3", "F6_E3M2")


def numpy_dtype(name: str) -> np.dtype:
    """numpy dtype for a safetensors dtype name; ValueError if unknown."""
    try:
        return _DTYPES[name]
    except KeyError:
        if name in KNOWN_UNSUPPORTED:
            raise ValueError(f"dtype {name} (sub-byte) is not materialized by fp4fmt v1; store packed U8") from None
        raise ValueError(f"unknown dtype {name!r}") from None


def dtype_name(dtype: np.dtype) -> str:
    """safetensors dtype name of a numpy dtype (byte order ignored); ValueError if it has none."""
    dt = np.dtype(dtype)
    if dt.byteorder == ">":
        dt = dt.newbyteorder("<")
    try:
        return _NAMES[dt]
    except KeyError:
        raise ValueError(f"numpy dtype {dt} has no safetensors equivalent") from None


def source_dtype_name(dtype: np.dtype) -> str:
    """Name of a dtype that may be quantized; ValueError for ints, bools and anything else."""
    try:
        name = dtype_name(dtype)
    except ValueError:
        name = None
    if name not in FLOAT_SOURCE_DTYPES:
        raise ValueError(f"cannot quantize dtype {np.dtype(dtype)}: expected one of {', '.join(FLOAT_SOURCE_DTYPES)}")
    return name


def itemsize(name: str) -> int:
    return numpy_dtype(name).itemsize
