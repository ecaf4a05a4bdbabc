"""The two schemes of fp4fmt v1 and their reference RTN quantizer (spec §5), in numpy.

A scheme fixes the block size, the scale format and whether there is a per-tensor scale. The functions
below work on a 2-D float32 matrix ``[rows, padded_k]`` in storage order (blocked axis last, zero
padded) and are the normative reference: the C accelerator must produce the same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import codec


@dataclass(frozen=True)
class Scheme:
    """What a scheme fixes (§3)."""

    name: str
    block_size: int
    scale_format: str  # "e4m3" or "e8m0"
    scale_dtype: str  # safetensors dtype of the stored block scales
    has_tensor_scale: bool
    scale_rules: tuple[str, ...]  # accepted values of the descriptor's scale_rule; the first is the default

    @property
    def default_rule(self) -> str:
        return self.scale_rules[0]


NVFP4 = Scheme("nvfp4", 16, "e4m3", "F8_E4M3", True, ("amax",))
MXFP4 = Scheme("mxfp4", 32, "e8m0", "U8", False, ("floor", "rceil", "even"))
SCHEMES: dict[str, Scheme] = {s.name: s for s in (NVFP4, MXFP4)}

# NVFP4 tensor scale: amax / (E2M1 max * E4M3 max), stored in "decode" direction (dequant multiplies).
NVFP4_TENSOR_SCALE_DIVISOR = np.float32(codec.E2M1_MAX * codec.E4M3_MAX)  # 2688


def get_scheme(name: str) -> Scheme:
    try:
        return SCHEMES[name]
    except KeyError:
        raise ValueError(f"unknown scheme {name!r} (expected one of {sorted(SCHEMES)})") from None


def nvfp4_tensor_scale(amax: float) -> np.float32:
    """Default NVFP4 tensor scale: fl32(amax / 2688); 1.0 when that is zero (an all-zero tensor)."""
    s = np.float32(amax) / NVFP4_TENSOR_SCALE_DIVISOR
    return np.float32(1.0) if s == 0 else np.float32(s)


def block_amax(x: np.ndarray, block_size: int) -> np.ndarray:
    """max |x| per block: ``[rows, padded_k]`` -> ``[rows, n_blocks]`` float32."""
    rows, pk = x.shape
    return np.abs(x).reshape(rows, pk // block_size, block_size).max(axis=-1, initial=np.float32(0))


def scale_codes_from_amax(amax: np.ndarray, scheme: Scheme, rule: str, tensor_scale: np.float32 | None) -> np.ndarray:
    """Block scale codes (uint8) from block amax (§5.1 NVFP4, §5.2 MXFP4)."""
    if scheme is NVFP4:
        v = amax / (np.float32(codec.E2M1_MAX) * tensor_scale)
        v = np.clip(v, np.float32(codec.E4M3_MIN_SUBNORMAL), np.float32(codec.E4M3_MAX)).astype(np.float32)
        return np.where(amax == 0, np.uint8(0), codec.encode_e4m3(v))
    return (codec.mx_scale_exponent(amax, rule) + codec.E8M0_BIAS).astype(np.uint8)


def block_factors(scale_codes: np.ndarray, scheme: Scheme, tensor_scale: np.float32 | None) -> np.ndarray:
    """The float32 multiplier of each block (§5.3): fl32(e4m3 * tensor_scale) or 2^(code - 127)."""
    if scheme is NVFP4:
        return (codec.decode_e4m3(scale_codes) * np.float32(tensor_scale)).astype(np.float32)
    return codec.decode_e8m0(scale_codes)


def quantize_blocks(
    x: np.ndarray, scheme: Scheme, rule: str, tensor_scale: np.float32 | None
) -> tuple[np.ndarray, np.ndarray]:
    """RTN quantize ``x`` (finite float32 ``[rows, padded_k]``) -> (packed codes, scale codes).

    q = fl32(x / f) with f the block's factor, then E2M1 RNE; a block whose factor is 0 encodes signed zeros.
    """
    rows, pk = x.shape
    b = scheme.block_size
    scale_codes = scale_codes_from_amax(block_amax(x, b), scheme, rule, tensor_scale)
    f = block_factors(scale_codes, scheme, tensor_scale)[..., None]
    xb = x.reshape(rows, pk // b, b)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(f == 0, xb * np.float32(0), xb / np.where(f == 0, np.float32(1), f))
    codes = codec.encode_e2m1(q.astype(np.float32)).reshape(rows, pk)
    return codec.pack_nibbles(codes), scale_codes


def dequantize_blocks(packed: np.ndarray, factors: np.ndarray) -> np.ndarray:
    """Decode ``[rows, padded_k/2]`` packed codes with the ``[rows, n_blocks]`` block factors -> float32.

    y = fl32(e2m1(code) * f), f the block factor of :func:`block_factors`.
    """
    rows, nb = factors.shape
    values = _E2M1_PAIRS[packed].reshape(rows, nb, -1)  # byte -> (low-nibble value, high-nibble value)
    with np.errstate(over="ignore", invalid="ignore"):
        return np.multiply(values, factors[..., None], dtype=np.float32).reshape(rows, -1)


# Every byte's two decoded elements, element 2i (low nibble) first: a single gather decodes a byte.
_E2M1_PAIRS = codec.decode_e2m1(codec.unpack_nibbles(np.arange(256, dtype=np.uint8)[:, None]))
