"""Property tests of fp4fmt's number formats (spec §4): E2M1, E4M3, E8M0, nibble packing, MX exponents.

Every encoder is held against an implementation that does not share code with fp4fmt: ml_dtypes' casts
for E2M1 / E4M3 / E8M0, and an exact rational (``fractions``) implementation of the MX scale rules
written below. Both the numpy codec and the C accelerator (``fp4fmt._native``) are checked, with
hypothesis for random inputs and exhaustive sweeps over the bit patterns where rounding decisions live.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from fractions import Fraction

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import fp4fmt
from fp4fmt import _native, codec

F32_MAX = float(np.finfo(np.float32).max)
E4M3_MAX = 448.0

# Every finite float32 (±0, subnormals, ±inf included), NaN excluded: NaN has no E2M1 encoding at all
# (ml_dtypes maps it to an arbitrary code), so the encoders are only specified on non-NaN input and the
# quantizer rejects NaN before encoding (test_quantize_rejects_nan below).
FLOAT32_NO_NAN = st.floats(width=32, allow_nan=False, allow_infinity=True, allow_subnormal=True)


# ----------------------------------------------------------------------------------------------------
# helpers


def f32_from_bits(bits: np.ndarray) -> np.ndarray:
    """float32 array with the given uint32 bit patterns."""
    return np.asarray(bits, dtype=np.uint32).view(np.float32)


def native_encode(fn: Callable[[np.ndarray, np.ndarray], None], x: np.ndarray) -> np.ndarray:
    """Run one of ``_native.encode_e2m1`` / ``encode_e4m3`` on float32 ``x`` and return the codes."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty(x.shape, dtype=np.uint8)
    fn(x, out)
    return out


def ml_e2m1(x: np.ndarray) -> np.ndarray:
    """E2M1 codes of float32 ``x`` according to ml_dtypes' float4_e2m1fn cast (RNE, saturating)."""
    return np.asarray(x, dtype=np.float32).astype(ml_dtypes.float4_e2m1fn).view(np.uint8)


def ml_e4m3(x: np.ndarray) -> np.ndarray:
    """E4M3 codes of float32 ``x`` according to ml_dtypes' float8_e4m3fn cast (RNE)."""
    return np.asarray(x, dtype=np.float32).astype(ml_dtypes.float8_e4m3fn).view(np.uint8)


def assert_codes_equal(got: np.ndarray, want: np.ndarray, x: np.ndarray) -> None:
    """Equal code arrays, or a message that shows the first differing input bit-exactly."""
    bad = np.flatnonzero(got.reshape(-1) != want.reshape(-1))
    if bad.size:
        i = int(bad[0])
        v = np.asarray(x, dtype=np.float32).reshape(-1)[i]
        raise AssertionError(
            f"{bad.size} mismatches; first: x={float(v)!r} (0x{int(v.view(np.uint32)):08X}) "
            f"got 0x{int(got.reshape(-1)[i]):02X} want 0x{int(want.reshape(-1)[i]):02X}"
        )


def neighbours_of(magnitudes: list[float], ulps: int) -> np.ndarray:
    """Every float32 within ±``ulps`` ulps of each magnitude, with both signs (non-negative bits only)."""
    base = np.array(magnitudes, dtype=np.float32).view(np.uint32).astype(np.int64)
    bits = (base[:, None] + np.arange(-ulps, ulps + 1)[None, :]).reshape(-1)
    bits = np.unique(bits[bits >= 0]).astype(np.uint32)
    return np.concatenate([f32_from_bits(bits), -f32_from_bits(bits)])


# ----------------------------------------------------------------------------------------------------
# 1. E2M1 rounding == ml_dtypes float4_e2m1fn, numpy codec and native

E2M1_ENCODERS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "codec": codec.encode_e2m1,
    "native": lambda x: native_encode(_native.encode_e2m1, x),
}

# Thresholds between E2M1 magnitudes and the magnitudes themselves: where rounding decisions live.
E2M1_CRITICAL = [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0]


def e2m1_sweep_inputs() -> np.ndarray:
    """All 65536 high-16-bit patterns x low 16 bits in {0, 1, 0x7FFF, 0x8000, 0xFFFF}, NaNs removed."""
    high = np.arange(1 << 16, dtype=np.uint32) << 16
    low = np.array([0, 1, 0x7FFF, 0x8000, 0xFFFF], dtype=np.uint32)
    x = f32_from_bits((high[:, None] | low[None, :]).reshape(-1))
    return x[~np.isnan(x)]


@pytest.mark.parametrize("impl", sorted(E2M1_ENCODERS))
def test_e2m1_bit_pattern_sweep_matches_ml_dtypes(impl: str) -> None:
    """Every high-16-bit pattern (with 5 low-bit patterns) encodes as ml_dtypes does, ±inf included."""
    x = e2m1_sweep_inputs()
    # Only NaNs are dropped: per sign, high halves 0x7F81..0x7FFF (all 5 lows) and 0x7F80 with a non-zero low.
    assert x.size == 5 * 65536 - 2 * (127 * 5 + 4)
    assert_codes_equal(E2M1_ENCODERS[impl](x), ml_e2m1(x), x)


@pytest.mark.parametrize("impl", sorted(E2M1_ENCODERS))
def test_e2m1_near_thresholds_and_grid_matches_ml_dtypes(impl: str) -> None:
    """Every float32 within ±8 ulps of a threshold or grid value (both signs) rounds as ml_dtypes does."""
    x = neighbours_of(E2M1_CRITICAL, 8)
    assert_codes_equal(E2M1_ENCODERS[impl](x), ml_e2m1(x), x)


@pytest.mark.parametrize("impl", sorted(E2M1_ENCODERS))
def test_e2m1_ties_go_to_even(impl: str) -> None:
    """Exact midpoints pick the code with an even mantissa (checked against the hand-written grid)."""
    ties = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], dtype=np.float32)
    want_values = np.array([0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0], dtype=np.float32)
    for sign in (1, -1):
        codes = E2M1_ENCODERS[impl](sign * ties)
        assert np.all(codes & 1 == 0)  # even code = even mantissa bit
        np.testing.assert_array_equal(codec.decode_e2m1(codes), sign * want_values)
        assert_codes_equal(codes, ml_e2m1(sign * ties), sign * ties)


@settings(max_examples=400, deadline=None)
@given(hnp.arrays(np.float32, st.integers(1, 64), elements=FLOAT32_NO_NAN))
def test_e2m1_random_float32_matches_ml_dtypes(x: np.ndarray) -> None:
    """Random float32 (infinities, ±0 and subnormals included) encode as ml_dtypes does, both encoders."""
    want = ml_e2m1(x)
    for impl, encode in E2M1_ENCODERS.items():
        assert_codes_equal(encode(x), want, x)


def test_e2m1_decode_matches_ml_dtypes() -> None:
    """The 16 E2M1 codes decode to ml_dtypes' values, signed zero included."""
    codes = np.arange(16, dtype=np.uint8)
    want = codes.view(ml_dtypes.float4_e2m1fn).astype(np.float32)
    np.testing.assert_array_equal(codec.decode_e2m1(codes).view(np.uint32), want.view(np.uint32))


def test_quantize_rejects_nan() -> None:
    """NaN has no E2M1 code, so the quantizer refuses it (both implementations), naming the tensor."""
    x = np.zeros((2, 32), dtype=np.float32)
    x[1, 7] = np.nan
    for impl in ("native", "reference"):
        with pytest.raises(fp4fmt.QuantizationError, match=r"'w\.nan'.*\[1, 7\]") as info:
            fp4fmt.quantize(x, "mxfp4", name="w.nan", implementation=impl)
        assert info.value.tensor == "w.nan"


# ----------------------------------------------------------------------------------------------------
# 2. E4M3 encode == ml_dtypes float8_e4m3fn on values clamped to [0, 448]; decode of all codes


def e4m3_sweep_inputs(lo: float) -> np.ndarray:
    """Every float32 in [lo, 448] whose low 12 bits are one of {0, 1, 0x7FF, 0x800, 0x801, 0xFFF}."""
    lo_bits = int(np.float32(lo).view(np.uint32))
    hi_bits = int(np.float32(E4M3_MAX).view(np.uint32))
    high = np.arange(lo_bits >> 12, (hi_bits >> 12) + 1, dtype=np.uint32) << 12
    low = np.array([0, 1, 0x7FF, 0x800, 0x801, 0xFFF], dtype=np.uint32)
    x = f32_from_bits((high[:, None] | low[None, :]).reshape(-1))
    return x[(x >= np.float32(lo)) & (x <= np.float32(E4M3_MAX))]


def test_e4m3_codec_sweep_matches_ml_dtypes() -> None:
    """codec.encode_e4m3 on the [2^-10, 448] bit-pattern sweep, both signs, equals ml_dtypes."""
    x = e4m3_sweep_inputs(2.0**-10)
    assert x.size > 200_000
    x = np.concatenate([x, -x])
    assert_codes_equal(codec.encode_e4m3(x), ml_e4m3(x), x)


def test_e4m3_native_sweep_matches_ml_dtypes() -> None:
    """_native.encode_e4m3 on its domain [2^-9, 448] (the bit-pattern sweep) equals ml_dtypes."""
    x = e4m3_sweep_inputs(2.0**-9)
    assert x.size > 200_000
    assert_codes_equal(native_encode(_native.encode_e4m3, x), ml_e4m3(x), x)


def test_e4m3_near_every_code_matches_ml_dtypes() -> None:
    """±8 ulps around every E4M3 value and every midpoint between neighbours, both encoders."""
    values = codec.E4M3_VALUES[:0x7F].astype(np.float64)  # 0 .. 448
    mids = (values[:-1] + values[1:]) / 2  # exact in float64, and exactly float32 too
    x = neighbours_of(list(values) + list(mids), 8)
    x = x[(x >= 0) & (x <= E4M3_MAX)]
    assert_codes_equal(codec.encode_e4m3(x), ml_e4m3(x), x)
    xn = x[x >= 2.0**-9]
    assert_codes_equal(native_encode(_native.encode_e4m3, xn), ml_e4m3(xn), xn)


@settings(max_examples=400, deadline=None)
@given(hnp.arrays(np.float32, st.integers(1, 64), elements=FLOAT32_NO_NAN))
def test_e4m3_codec_saturates_like_clamped_ml_dtypes(x: np.ndarray) -> None:
    """codec.encode_e4m3 saturates: it equals ml_dtypes on x clamped to [-448, 448] (sign kept)."""
    clamped = np.clip(x, np.float32(-E4M3_MAX), np.float32(E4M3_MAX))
    assert_codes_equal(codec.encode_e4m3(x), ml_e4m3(clamped), x)
    positive = np.clip(x, np.float32(0), np.float32(E4M3_MAX))
    assert_codes_equal(codec.encode_e4m3(positive), ml_e4m3(positive), positive)


@settings(max_examples=400, deadline=None)
@given(hnp.arrays(np.float32, st.integers(1, 64), elements=st.floats(2.0**-9, E4M3_MAX, width=32)))
def test_e4m3_native_random_matches_ml_dtypes(x: np.ndarray) -> None:
    """_native.encode_e4m3 on random float32 of [2^-9, 448] equals ml_dtypes."""
    assert_codes_equal(native_encode(_native.encode_e4m3, x), ml_e4m3(x), x)


def test_e4m3_nan_keeps_its_sign() -> None:
    """NaN encodes to 0x7F / 0xFF by its sign bit, as ml_dtypes does."""
    x = np.array([np.nan, -np.nan], dtype=np.float32)
    np.testing.assert_array_equal(codec.encode_e4m3(x), [0x7F, 0xFF])
    np.testing.assert_array_equal(codec.encode_e4m3(x), ml_e4m3(x))


def assert_same_floats(got: np.ndarray, want: np.ndarray) -> None:
    """Bit-identical float32 arrays, except that any NaN matches any NaN."""
    nan = np.isnan(want)
    np.testing.assert_array_equal(np.isnan(got), nan)
    np.testing.assert_array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32))


def test_decode_e4m3_all_codes_match_ml_dtypes() -> None:
    """All 256 E4M3 codes decode like ml_dtypes float8_e4m3fn (0x7F/0xFF NaN, 0x80 negative zero)."""
    codes = np.arange(256, dtype=np.uint8)
    got = codec.decode_e4m3(codes)
    assert got.dtype == np.float32
    assert_same_floats(got, codes.view(ml_dtypes.float8_e4m3fn).astype(np.float32))
    assert np.isnan(got[[0x7F, 0xFF]]).all() and np.isnan(got).sum() == 2


def test_decode_e8m0_all_codes_match_ml_dtypes() -> None:
    """All 256 E8M0 codes decode like ml_dtypes float8_e8m0fnu (0 is 2^-127, 0xFF is NaN)."""
    codes = np.arange(256, dtype=np.uint8)
    got = codec.decode_e8m0(codes)
    assert got.dtype == np.float32
    assert_same_floats(got, codes.view(ml_dtypes.float8_e8m0fnu).astype(np.float32))
    assert np.isnan(got[0xFF]) and np.isnan(got).sum() == 1


# ----------------------------------------------------------------------------------------------------
# 3. MX scale exponent: floor / rceil / even against an exact rational implementation

MX_RULES = ("floor", "rceil", "even")


def exact_floor_log2(v: Fraction) -> int:
    """floor(log2(v)) of a positive rational, exactly."""
    e = v.numerator.bit_length() - v.denominator.bit_length()
    return e - 1 if Fraction(2) ** e > v else e


def round_to_float32(v: Fraction) -> Fraction:
    """The float32 nearest to a non-negative rational (ties to even), subnormals included.

    Overflow is not handled: callers only round values below the float32 maximum.
    """
    if v == 0:
        return Fraction(0)
    quantum = Fraction(2) ** max(exact_floor_log2(v) - 23, -149)
    scaled = v / quantum
    n = scaled.numerator // scaled.denominator
    rest = scaled - n
    if rest > Fraction(1, 2) or (rest == Fraction(1, 2) and n % 2 == 1):
        n += 1
    return n * quantum


def expected_mx_exponent(amax: float, rule: str) -> int:
    """The shared exponent the spec's rule gives for a block max ``amax`` (a float32 value, >= 0).

    floor: floor(log2 amax) - 2. even: the same, plus 1 when amax's significand is >= 1.75.
    rceil: ceil(log2 d), d = amax / 6 rounded to float32 (d == 0 -> -127). amax == 0 -> -127.
    Clamped to the E8M0 range [-127, 127]. Uses math.frexp and fractions only.
    """
    if amax == 0:
        return -127
    mant, ex = math.frexp(amax)  # amax = mant * 2^ex, mant in [0.5, 1), exact for subnormals too
    if rule == "floor":
        e = ex - 1 - 2
    elif rule == "even":
        e = ex - 1 - 2 + (mant >= 0.875)  # significand 2*mant >= 1.75
    else:
        d = round_to_float32(Fraction(amax) / 6)
        if d == 0:
            return -127
        e = exact_floor_log2(d)
        if Fraction(2) ** e < d:
            e += 1
    return min(max(e, -127), 127)


def mx_sweep_amax() -> np.ndarray:
    """Every float32 exponent (subnormal range included) with the significands where rules switch."""
    mantissas = [0, 1, 2, 3, 0x1FFFFF, 0x200000, 0x2AAAAB, 0x3FFFFF, 0x400000, 0x400001, 0x555555,
                 0x5FFFFF, 0x600000, 0x600001, 0x7FFFFE, 0x7FFFFF]  # fmt: skip
    exps = np.arange(0, 255, dtype=np.uint32) << 23
    x = f32_from_bits((exps[:, None] | np.array(mantissas, dtype=np.uint32)[None, :]).reshape(-1))
    return np.concatenate([np.float32([0.0]), x])


@pytest.mark.parametrize("rule", MX_RULES)
def test_mx_scale_exponent_sweep_matches_exact_rule(rule: str) -> None:
    """codec.mx_scale_exponent over every binade (and 0) equals the exact rational rule."""
    amax = mx_sweep_amax()
    got = codec.mx_scale_exponent(amax, rule)
    want = np.array([expected_mx_exponent(float(a), rule) for a in amax], dtype=np.int32)
    assert got.dtype == np.int32
    mism = np.flatnonzero(got != want)
    assert mism.size == 0, f"amax={float(amax[mism[0]])!r}: got {got[mism[0]]} want {want[mism[0]]}"


POSITIVE_FLOAT32 = st.floats(0.0, F32_MAX, width=32, allow_subnormal=True)


@settings(max_examples=500, deadline=None)
@given(st.lists(POSITIVE_FLOAT32, min_size=1, max_size=40), st.sampled_from(MX_RULES))
def test_mx_scale_exponent_random_matches_exact_rule(values: list[float], rule: str) -> None:
    """Random non-negative float32 amax (subnormals, 0, the maximum) give the exact rule's exponent."""
    amax = np.array(values, dtype=np.float32)
    want = [expected_mx_exponent(float(a), rule) for a in amax]
    np.testing.assert_array_equal(codec.mx_scale_exponent(amax, rule), want)


@pytest.mark.parametrize("impl", ["native", "reference"])
@pytest.mark.parametrize("rule", MX_RULES)
def test_quantizer_scale_code_is_the_rule_exponent(rule: str, impl: str) -> None:
    """Both quantizers store exponent + 127 for single-element blocks of the sweep (signs mixed)."""
    amax = mx_sweep_amax()
    x = np.zeros((amax.size, 32), dtype=np.float32)
    x[:, 5] = np.where(np.arange(amax.size) % 2 == 0, amax, -amax)
    qt = fp4fmt.quantize(x, "mxfp4", scale_rule=rule, implementation=impl)
    want = np.array([expected_mx_exponent(float(a), rule) + 127 for a in amax], dtype=np.uint8)
    np.testing.assert_array_equal(qt.scales[:, 0], want)


def test_mx_scale_exponent_examples_from_peer_tools() -> None:
    """The scale-mode comparison table of the formats reference (torchao/microxcaling conventions)."""
    table = {3.0: (-1, -1, -1), 6.0: (0, 0, 0), 6.01: (0, 0, 1), 7.0: (0, 1, 1), 12.01: (1, 1, 2)}
    for amax, (floor, even, rceil) in table.items():
        a = np.float32(amax)
        assert codec.mx_scale_exponent(a, "floor") == floor
        assert codec.mx_scale_exponent(a, "even") == even
        assert codec.mx_scale_exponent(a, "rceil") == rceil


def test_mx_scale_exponent_rejects_unknown_rule() -> None:
    """An unknown rule name is refused, naming it."""
    with pytest.raises(ValueError, match="'ceil'"):
        codec.mx_scale_exponent(np.float32(1.0), "ceil")


# ----------------------------------------------------------------------------------------------------
# 4. nibble packing


def test_pack_nibbles_hand_made_example() -> None:
    """Element 2i goes in the low nibble, 2i+1 in the high nibble."""
    codes = np.array([[0x3, 0xA, 0xF, 0x0], [0x1, 0x8, 0x0, 0x7]], dtype=np.uint8)
    packed = codec.pack_nibbles(codes)
    np.testing.assert_array_equal(packed, np.array([[0xA3, 0x0F], [0x81, 0x70]], dtype=np.uint8))
    np.testing.assert_array_equal(codec.unpack_nibbles(packed), codes)


@settings(max_examples=200, deadline=None)
@given(
    hnp.arrays(
        np.uint8,
        hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=6).map(lambda s: s[:-1] + (2 * s[-1],)),
        elements=st.integers(0, 15),
    )
)
def test_pack_unpack_round_trip(codes: np.ndarray) -> None:
    """unpack(pack(codes)) == codes for codes < 16; each byte holds codes 2i (low) and 2i+1 (high)."""
    packed = codec.pack_nibbles(codes)
    assert packed.dtype == np.uint8 and packed.shape == codes.shape[:-1] + (codes.shape[-1] // 2,)
    np.testing.assert_array_equal(codec.unpack_nibbles(packed), codes)
    np.testing.assert_array_equal(packed, codes[..., 0::2] + 16 * codes[..., 1::2])


@settings(max_examples=200, deadline=None)
@given(hnp.arrays(np.uint8, hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=6)))
def test_unpack_pack_round_trip(packed: np.ndarray) -> None:
    """Every byte survives unpack then pack."""
    np.testing.assert_array_equal(codec.pack_nibbles(codec.unpack_nibbles(packed)), packed)


def test_pack_nibbles_needs_even_length() -> None:
    """An odd number of codes cannot be packed; the error names the shape."""
    with pytest.raises(ValueError, match=r"even last dimension.*\(2, 3\)"):
        codec.pack_nibbles(np.zeros((2, 3), dtype=np.uint8))
