"""Number formats of fp4fmt v1 (spec §4): E2M1 elements, E4M3 and E8M0 scales, nibble packing.

Pure numpy functions, written from the rules in ``spec/fp4fmt-v1.md`` rather than delegated to another
library, so that the tests can hold them against independent implementations (ml_dtypes, torch).
Every encoder takes float32 and rounds to nearest, ties to even (RNE), saturating at the format's maximum.
"""

from __future__ import annotations

import numpy as np

# §4.1 E2M1: code 0bSEEM. The 16 codes in order (code 8 is negative zero).
E2M1_VALUES = np.array(
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], dtype=np.float32
)
E2M1_MAX = 6.0

# The seven decision points between neighbouring E2M1 magnitudes, and whether a value exactly on the
# point rounds up (to the even code above) or down (to the even code below).
E2M1_THRESHOLDS: tuple[tuple[float, bool], ...] = (
    (0.25, False),  # 0 | 0.5   -> tie to 0   (code 0)
    (0.75, True),  # 0.5 | 1   -> tie to 1   (code 2)
    (1.25, False),  # 1 | 1.5   -> tie to 1   (code 2)
    (1.75, True),  # 1.5 | 2   -> tie to 2   (code 4)
    (2.5, False),  # 2 | 3     -> tie to 2   (code 4)
    (3.5, True),  # 3 | 4     -> tie to 4   (code 6)
    (5.0, False),  # 4 | 6     -> tie to 4   (code 6)
)

# §4.2 E4M3 (float8_e4m3fn): bias 7, no infinities, 0x7F/0xFF are NaN, max 448, min subnormal 2^-9.
E4M3_MAX = 448.0
E4M3_MIN_SUBNORMAL = 2.0**-9

# §4.3 E8M0: unsigned exponent, bias 127, value 2^(code-127); 0xFF is NaN.
E8M0_BIAS = 127
E8M0_NAN = 0xFF
E8M0_MIN_EXP = -127
E8M0_MAX_EXP = 127


def encode_e2m1(x: np.ndarray) -> np.ndarray:
    """float32 -> E2M1 codes (uint8, one per element): RNE, saturating at ±6, sign kept (-0.0 -> 0x8).

    NaN has no E2M1 encoding; callers must reject it first (the quantizers do).
    """
    x = np.asarray(x, dtype=np.float32)
    a = np.abs(x)
    mag = np.zeros(x.shape, dtype=np.uint8)
    for threshold, tie_up in E2M1_THRESHOLDS:
        mag += (a >= threshold) if tie_up else (a > threshold)
    return mag | (np.signbit(x).astype(np.uint8) << 3)


def decode_e2m1(codes: np.ndarray) -> np.ndarray:
    """E2M1 codes (uint8, low 4 bits used) -> float32 values."""
    return E2M1_VALUES[np.asarray(codes, dtype=np.uint8) & 0x0F]


def pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """Pack E2M1 codes along the last axis: element 2i in the low nibble, 2i+1 in the high (§4.1).

    The last axis must have even length.
    """
    codes = np.asarray(codes, dtype=np.uint8)
    if codes.shape[-1] % 2:
        raise ValueError(f"pack_nibbles needs an even last dimension, got {codes.shape}")
    return (codes[..., 0::2] & 0x0F) | ((codes[..., 1::2] & 0x0F) << 4)


def unpack_nibbles(packed: np.ndarray) -> np.ndarray:
    """Inverse of :func:`pack_nibbles`: ``[..., n]`` bytes -> ``[..., 2n]`` codes."""
    packed = np.asarray(packed, dtype=np.uint8)
    out = np.empty(packed.shape[:-1] + (packed.shape[-1] * 2,), dtype=np.uint8)
    out[..., 0::2] = packed & 0x0F
    out[..., 1::2] = packed >> 4
    return out


def _floor_log2(a: np.ndarray) -> np.ndarray:
    """floor(log2(a)) for finite a > 0, exact (subnormals included); int32."""
    _, e = np.frexp(a)
    return (e - 1).astype(np.int32)


def encode_e4m3(x: np.ndarray) -> np.ndarray:
    """float32 -> E4M3 codes (uint8): RNE, saturating at ±448; NaN -> 0x7F (sign kept).

    Saturation happens before rounding (values above 448 become 448), as every NVFP4 producer does.
    """
    x = np.asarray(x, dtype=np.float32)
    sign = np.signbit(x).astype(np.uint8) << 7
    a = np.minimum(np.abs(x), np.float32(E4M3_MAX)).astype(np.float64)  # exact
    nan = np.isnan(x)
    a = np.where(nan, 0.0, a)
    # Each binade [2^e, 2^(e+1)) has 8 steps of 2^(e-3); below 2^-6 the step is fixed at 2^-9 (subnormals).
    e = np.where(a > 0, _floor_log2(np.where(a > 0, a, 1.0)), -6)
    e = np.maximum(e, -6)
    steps = np.rint(np.ldexp(a, 3 - e))  # RNE; 8..16 for normals, 0..8 for subnormals
    code = np.where(a >= 2.0**-6, ((e + 6) << 3) + steps, steps).astype(np.int64)
    code = np.minimum(code, 0x7E).astype(np.uint8)
    return np.where(nan, np.uint8(0x7F), code) | sign


def _e4m3_table() -> np.ndarray:
    codes = np.arange(256, dtype=np.int64)
    exp = (codes >> 3) & 0x0F
    man = codes & 0x07
    mag = np.where(exp == 0, man * 2.0**-9, (1.0 + man / 8.0) * np.exp2(exp - 7.0))
    val = np.where(codes & 0x80, -mag, mag)
    val[(codes & 0x7F) == 0x7F] = np.nan
    return val.astype(np.float32)


E4M3_VALUES = _e4m3_table()


def decode_e4m3(codes: np.ndarray) -> np.ndarray:
    """E4M3 codes (uint8) -> float32 (0x7F and 0xFF decode to NaN)."""
    return E4M3_VALUES[np.asarray(codes, dtype=np.uint8)]


def _e8m0_table() -> np.ndarray:
    exps = np.arange(E8M0_NAN) - E8M0_BIAS  # codes 0..254: 2^-127 .. 2^127, all exact in float32
    return np.append(np.ldexp(np.float64(1.0), exps), np.nan).astype(np.float32)


E8M0_VALUES = _e8m0_table()


def decode_e8m0(codes: np.ndarray) -> np.ndarray:
    """E8M0 codes (uint8) -> float32 2^(code-127); 0xFF decodes to NaN; code 0 is 2^-127 (subnormal)."""
    return E8M0_VALUES[np.asarray(codes, dtype=np.uint8)]


def mx_scale_exponent(amax: np.ndarray, rule: str) -> np.ndarray:
    """Shared exponent e (int32, in [-127, 127]) of an MXFP4 block whose max |x| is ``amax`` (§5.2).

    * ``floor`` (OCP MX v1.0): e = floor(log2(amax)) - 2;
    * ``rceil``: e = ceil(log2(amax / 6)), the quotient rounded to float32 first;
    * ``even``:  e = floor(log2(amax)) - 2, plus 1 when amax's significand is >= 1.75.

    amax == 0 gives -127 (code 0x00). amax must be finite and non-negative.
    """
    amax = np.asarray(amax, dtype=np.float32)
    pos = amax > 0
    safe = np.where(pos, amax, np.float32(1.0))
    if rule == "floor":
        e = _floor_log2(safe) - 2
    elif rule == "even":
        fl = _floor_log2(safe)
        significand = np.ldexp(safe.astype(np.float64), -fl)  # in [1, 2), exact
        e = fl + (significand >= 1.75) - 2
    elif rule == "rceil":
        d = (safe / np.float32(E2M1_MAX)).astype(np.float32)
        dpos = d > 0
        dsafe = np.where(dpos, d, np.float32(1.0))
        mant, ex = np.frexp(dsafe)  # dsafe = mant * 2^ex, mant in [0.5, 1)
        e = np.where(mant == 0.5, ex - 1, ex).astype(np.int32)
        e = np.where(dpos, e, E8M0_MIN_EXP)
    else:
        raise ValueError(f"unknown MX scale rule {rule!r} (expected 'floor', 'rceil' or 'even')")
    e = np.where(pos, e, E8M0_MIN_EXP)
    return np.clip(e, E8M0_MIN_EXP, E8M0_MAX_EXP).astype(np.int32)
