"""Property tests of the RTN quantizer and its decoder (spec §5, §6): fp4fmt.quantize / dequantize / QTensor.

The block factor f of every block is recomputed here from the stored scale codes with ml_dtypes
(f = fl32(e4m3 * tensor_scale) for NVFP4, 2^(code - 127) for MXFP4, spec §5.3), so the properties below
hold the quantizer to the spec rather than to its own helpers. Both implementations are covered: the
numpy reference and the C accelerator, which must give identical bytes.
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import fp4fmt
from fp4fmt import FormatError, QTensor, QuantizationError, _native, codec

F32_MAX = float(np.finfo(np.float32).max)
U = 2.0**-24  # unit roundoff of float32 (round to nearest)
TINY = 2.0**-150  # half the smallest float32 subnormal: the absolute rounding error below 2^-126
F32_NORMAL_MIN = 2.0**-126

DTYPES: dict[str, np.dtype] = {
    "f32": np.dtype(np.float32),
    "bf16": np.dtype(ml_dtypes.bfloat16),
    "f16": np.dtype(np.float16),
    "f64": np.dtype(np.float64),
}
# Binary exponents spanned by each dtype's finite non-zero values (f64 kept inside float32's range: the
# quantizer works in float32, see test_f64_beyond_float32_range_is_rejected).
EXP_RANGE: dict[str, tuple[int, int]] = {
    "f32": (-149, 127),
    "bf16": (-133, 127),
    "f16": (-24, 15),
    "f64": (-149, 127),
}
MAX_ABS: dict[str, float] = {
    "f32": F32_MAX,
    "bf16": float(ml_dtypes.finfo(ml_dtypes.bfloat16).max),
    "f16": float(np.finfo(np.float16).max),
    "f64": F32_MAX,
}
# Under the even and rceil rules a block max in [1.75 * 2^127, FLT_MAX] gets exponent 126 and rounds to
# 4 * 2^126 = 2^128, which float32 cannot hold (test_mx_even_rceil_top_binade_does_not_decode): properties
# that decode keep their inputs below it.
MX_DECODABLE = float(np.nextafter(np.float32(1.75 * 2.0**127), np.float32(0)))

CASES = [("nvfp4", "amax"), ("mxfp4", "floor"), ("mxfp4", "rceil"), ("mxfp4", "even")]
# numpy's float32 overflow warnings raised inside fp4fmt's reference path for valid but extreme input
# (6 * tensor_scale or x / f past FLT_MAX, which the spec's arithmetic takes to inf on purpose; float64
# input past float32's range): the results are what the assertions check.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")


# ----------------------------------------------------------------------------------------------------
# strategies


@st.composite
def shapes_and_axes(draw, min_dims: int = 1, min_side: int = 0, max_k: int = 100) -> tuple[tuple[int, ...], int]:
    """A logical shape (1-3 dims, zero-size dims possible) and a blocked axis (any, negative too)."""
    ndim = draw(st.integers(min_dims, 3))
    k = draw(st.integers(min_side, max_k))  # ragged: not a multiple of 16 or 32 in general
    shape = [draw(st.integers(min_side, 5)) for _ in range(ndim - 1)]
    axis = draw(st.integers(-ndim, ndim - 1))
    shape.insert(axis % ndim, k)
    return tuple(shape), axis


@st.composite
def float_arrays(
    draw, dtypes: tuple[str, ...] = tuple(DTYPES), min_dims: int = 1, min_side: int = 0, cap: float = F32_MAX
) -> tuple[np.ndarray, int]:
    """(array, axis): finite values of one dtype with a wide dynamic range, |x| <= cap.

    Either hypothesis draws every element (boundary-biased floats), or a seeded generator draws
    sign * m * 2^e with e in a random window of the dtype's exponents (subnormals included), m uniform
    or with 3 mantissa bits (so that grid values and exact rounding ties occur), and some signed zeros.
    """
    shape, axis = draw(shapes_and_axes(min_dims=min_dims, min_side=min_side))
    name = draw(st.sampled_from(dtypes))
    dt = DTYPES[name]
    limit = min(cap, MAX_ABS[name])
    n = math.prod(shape)
    if draw(st.booleans()):
        width = 16 if name == "f16" else 32
        elems = st.floats(-limit, limit, width=width, allow_nan=False, allow_infinity=False)
        vals = draw(hnp.arrays(np.float64, n, elements=elems))
    else:
        emin, emax = EXP_RANGE[name]
        lo = draw(st.integers(emin, emax))
        hi = min(lo + draw(st.sampled_from([0, 2, 8, 30, 300])), emax)
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        mant = rng.integers(8, 16, n) / 8 if draw(st.booleans()) else rng.uniform(1.0, 2.0, n)
        vals = np.ldexp(mant, rng.integers(lo, hi + 1, n)) * rng.choice([-1.0, 1.0], n)
        vals[rng.random(n) < draw(st.sampled_from([0.0, 0.1, 0.6]))] *= 0.0  # signed zeros
        vals = np.clip(vals, -limit, limit)
    x = vals.astype(dt)
    x[np.abs(x.astype(np.float64)) > limit] = 0  # a cast that rounded past the cap
    return x.reshape(shape), axis


# NVFP4 explicit tensor scales, tiny and huge included.
TENSOR_SCALES = st.one_of(
    st.floats(2.0**-149, F32_MAX, width=32),
    st.sampled_from([2.0**-149, 1e-40, 1e-30, 1e-12, 1.0, 1e12, 1e30, 3e38, F32_MAX]),
)


# ----------------------------------------------------------------------------------------------------
# helpers


def storage_rows(y: np.ndarray, axis: int) -> np.ndarray:
    """A logical array as ``[rows, k]`` with the blocked axis last (storage order)."""
    s = np.moveaxis(y, axis, -1)
    return s.reshape(math.prod(s.shape[:-1]), s.shape[-1])


def element_factors(qt: QTensor) -> np.ndarray:
    """The float32 block factor of every stored element, ``[rows, k]``, from the scale codes (§5.3)."""
    s = linear_scale_codes(qt)
    if qt.scheme == "mxfp4":
        f = s.view(ml_dtypes.float8_e8m0fnu).astype(np.float32)
    else:
        f = s.view(ml_dtypes.float8_e4m3fn).astype(np.float32) * np.float32(qt.tensor_scale)
    return np.repeat(f, qt.block_size, axis=1)[:, : qt.geometry.k]


def linear_scale_codes(qt: QTensor) -> np.ndarray:
    """The block scale codes of ``qt`` as uint8 ``[rows, n_blocks]``."""
    geo = qt.geometry
    return qt.scale_codes().reshape(geo.rows, geo.n_blocks)


def stored_codes(qt: QTensor) -> np.ndarray:
    """The E2M1 codes of ``qt``, ``[rows, padded_k]``."""
    geo = qt.geometry
    return codec.unpack_nibbles(qt.codes.reshape(geo.rows, geo.padded_k // 2))


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Bitwise-equal float32 arrays (signed zeros distinguished)."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return a.shape == b.shape and bool(np.array_equal(a.view(np.uint32), b.view(np.uint32)))


def assert_same_qtensor(a: QTensor, b: QTensor) -> None:
    """Identical codes, scale bytes, tensor scale bits and metadata."""
    def meta(q: QTensor) -> tuple:
        return (q.scheme, q.shape, q.axis, q.scale_layout, q.scale_rule)

    assert meta(a) == meta(b)
    np.testing.assert_array_equal(a.codes, b.codes)
    assert a.scales.dtype == b.scales.dtype
    np.testing.assert_array_equal(a.scales.view(np.uint8), b.scales.view(np.uint8))
    if a.tensor_scale is None:
        assert b.tensor_scale is None
    else:
        assert np.float32(a.tensor_scale).view(np.uint32) == np.float32(b.tensor_scale).view(np.uint32)


def rule_kw(scheme: str, rule: str) -> dict:
    """quantize() keyword for a scale rule (NVFP4's only rule is its default)."""
    return {"scale_rule": rule} if scheme == "mxfp4" else {}


# ----------------------------------------------------------------------------------------------------
# 5. payload round trips and quantize(dequantize(qt)) idempotence


@st.composite
def payloads(draw, scheme: str) -> QTensor:
    """A valid QTensor with random codes (zero padding), random scale codes and tensor scale.

    Re-encoding y / f reproduces a code exactly when y = fl32(v * f) carries v without loss, i.e. when
    f > 0, v * f does not round to a different grid point or overflow. The strategy keeps to that:
    * MXFP4: f = 2^e is exact; v * 2^e is exact down to e = -127 (0.5 * 2^-127 = 2^-128 is a float32
      subnormal) and finite up to 1.5 * 2^127, so code 253 (2^126) only carries |v| <= 3 and code 254
      (2^127) only |v| <= 1.5 (4 * 2^126 = 2^128 would overflow to inf, which dequantize refuses:
      test_dequantize_refuses_overflow).
    * NVFP4: f = fl32(e4m3 * ts) is kept a normal float32 (>= 2^-126) with 6 * f finite: then every
      rounding on the way (v * f, y / f) has relative error <= 2^-23, far below the smallest relative
      gap between a grid value and its decision threshold (1/6, at 6 vs 5). With a subnormal f,
      fl32(0.5 * 2^-149) = 0 and fl32(1.5 * 2^-149) = 2^-148 would decode to another grid value.
      A block with scale code 0 (f = 0) carries only signed zeros: the quantizer never writes anything
      else there, and 0 * f = 0 cannot carry a magnitude.
    """
    shape, axis = draw(shapes_and_axes())
    ndim = len(shape)
    storage = tuple(d for i, d in enumerate(shape) if i != axis % ndim) + (shape[axis],)
    block = 16 if scheme == "nvfp4" else 32
    k = storage[-1]
    nb = -(-k // block)
    rows = math.prod(storage[:-1])
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    codes = rng.integers(0, 16, (rows, nb * block)).astype(np.uint8)
    codes[:, k:] = 0  # padding is +0
    if scheme == "mxfp4":
        scales = rng.integers(0, 255, (rows, nb)).astype(np.uint8)
        e126 = np.repeat(scales == 253, block, axis=1) & ((codes & 7) >= 6)
        codes[e126] &= 0b1101  # 4 -> 2, 6 -> 3: |v| <= 3 under 2^126
        codes[np.repeat(scales == 254, block, axis=1)] &= 0b1011  # |v| <= 1.5 under 2^127
        tensor_scale = None
        scale_arr = scales
    else:
        tensor_scale = np.float32(draw(TENSOR_SCALES))
        e4m3 = codec.E4M3_VALUES[1:0x7F]
        with np.errstate(over="ignore"):
            f = e4m3 * tensor_scale
            ok = (f >= F32_NORMAL_MIN) & np.isfinite(np.float32(6) * f)
        valid = np.concatenate([[0], np.arange(1, 0x7F)[ok]]).astype(np.uint8)
        scales = valid[rng.integers(0, valid.size, (rows, nb))]
        zero = np.repeat(scales == 0, block, axis=1)
        codes[zero] &= 0b1000  # signed zeros only where f = 0
        scale_arr = scales.view(ml_dtypes.float8_e4m3fn)
    packed = codec.pack_nibbles(codes).reshape(storage[:-1] + (nb * block // 2,))
    return QTensor(
        scheme=scheme, shape=shape, axis=axis, codes=packed, scales=scale_arr.reshape(storage[:-1] + (nb,)),
        tensor_scale=tensor_scale,
    )


def reencode(y_rows: np.ndarray, f: np.ndarray, encode) -> np.ndarray:
    """E2M1 codes of q = fl32(y / f), a block with f == 0 giving signed zeros (§5)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(f == 0, y_rows * np.float32(0), y_rows / np.where(f == 0, np.float32(1), f))
    return encode(q.astype(np.float32))


def native_e2m1(q: np.ndarray) -> np.ndarray:
    """_native.encode_e2m1 on an array."""
    q = np.ascontiguousarray(q, dtype=np.float32)
    out = np.empty(q.shape, dtype=np.uint8)
    _native.encode_e2m1(q, out)
    return out


@pytest.mark.parametrize("scheme", ["nvfp4", "mxfp4"])
@settings(max_examples=250, deadline=None)
@given(data=st.data())
def test_payload_decodes_and_reencodes_to_same_bytes(scheme: str, data) -> None:
    """dequantize, then re-encode every element with its block factor: the same packed bytes come back."""
    qt = data.draw(payloads(scheme))
    y = fp4fmt.dequantize(qt)
    assert y.dtype == np.float32 and y.shape == qt.shape
    geo = qt.geometry
    f = element_factors(qt)
    for encode in (codec.encode_e2m1, native_e2m1):
        codes = np.zeros((geo.rows, geo.padded_k), dtype=np.uint8)
        codes[:, : geo.k] = reencode(storage_rows(y, qt.axis), f, encode)
        np.testing.assert_array_equal(codec.pack_nibbles(codes).reshape(qt.codes.shape), qt.codes)


@pytest.mark.parametrize("rule", ["floor", "even"])
@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_mxfp4_floor_even_quantize_is_idempotent(rule: str, data) -> None:
    """quantize(dequantize(qt)) == qt bytewise under floor and even.

    floor and even pick e so that the block max lands in [3.5, 8) * 2^e, which rounds to 4 or 6: the
    decoded block max is then 4 * 2^e or 6 * 2^e, for which both rules give back e.
    """
    x, axis = data.draw(float_arrays(cap=MX_DECODABLE))
    qt = fp4fmt.quantize(x, "mxfp4", axis=axis, scale_rule=rule)
    again = fp4fmt.quantize(fp4fmt.dequantize(qt), "mxfp4", axis=axis, scale_rule=rule)
    np.testing.assert_array_equal(again.codes, qt.codes)
    np.testing.assert_array_equal(again.scales, qt.scales)


def block_max_magnitude(qt: QTensor) -> np.ndarray:
    """max |E2M1 value| of each block, ``[rows, n_blocks]``."""
    geo = qt.geometry
    v = np.abs(codec.decode_e2m1(stored_codes(qt)))
    return v.reshape(geo.rows, geo.n_blocks, qt.block_size).max(axis=-1, initial=0.0)


@settings(max_examples=400, deadline=None)
@given(data=st.data())
def test_mxfp4_rceil_requantize_halves_scale_of_blocks_topping_at_3(data) -> None:
    """rceil is NOT idempotent bytewise, but is on values, and is a fixed point after one more step.

    Hypothesis finds it at once (x = [3.2, 0, ...]: e = 0, 3.2 -> 3; then amax 3 gives e = -1).
    rceil puts the block max in (3, 6] * 2^e (up to the float32 rounding of amax / 6), so it may round
    to 3; the decoded max 3 * 2^e then gives ceil(log2(3 * 2^e / 6)) = e - 1, and every v * 2^e
    re-encodes as 2v * 2^(e-1), all on the grid since |v| <= 3. So: exactly the blocks with max |v| == 3
    and e > -127 change (scale - 1, codes for 2v), the decoded values do not change, and quantizing
    again changes nothing.
    """
    x, axis = data.draw(float_arrays(cap=MX_DECODABLE))
    qt1 = fp4fmt.quantize(x, "mxfp4", axis=axis, scale_rule="rceil")
    y1 = fp4fmt.dequantize(qt1)
    qt2 = fp4fmt.quantize(y1, "mxfp4", axis=axis, scale_rule="rceil")
    assert same_bits(fp4fmt.dequantize(qt2), y1)
    s1, s2 = linear_scale_codes(qt1), linear_scale_codes(qt2)
    moved = (block_max_magnitude(qt1) == 3.0) & (s1 > 0)
    np.testing.assert_array_equal(s2, np.where(moved, s1 - 1, s1))
    v1 = codec.decode_e2m1(stored_codes(qt1))
    doubled = codec.encode_e2m1(np.where(np.repeat(moved, 32, axis=1), 2 * v1, v1))
    np.testing.assert_array_equal(stored_codes(qt2), doubled)
    qt3 = fp4fmt.quantize(fp4fmt.dequantize(qt2), "mxfp4", axis=axis, scale_rule="rceil")
    assert_same_qtensor(qt3, qt2)


def test_mxfp4_rceil_counterexample() -> None:
    """The smallest counterexample: [3.2, 0 x 31] -> (e=0, code 3.0) -> (e=-1, code 6.0), same value 3."""
    x = np.zeros(32, dtype=np.float32)
    x[0] = 3.2
    qt1 = fp4fmt.quantize(x, "mxfp4", scale_rule="rceil")
    qt2 = fp4fmt.quantize(fp4fmt.dequantize(qt1), "mxfp4", scale_rule="rceil")
    assert (int(qt1.scales[0]), int(qt1.codes[0])) == (127, 0b0101)  # 2^0, 3.0
    assert (int(qt2.scales[0]), int(qt2.codes[0])) == (126, 0b0111)  # 2^-1, 6.0
    assert fp4fmt.dequantize(qt2)[0] == fp4fmt.dequantize(qt1)[0] == 3.0


@settings(max_examples=400, deadline=None)
@given(data=st.data())
def test_nvfp4_quantize_is_idempotent_on_normal_scales(data) -> None:
    """quantize(dequantize(qt), tensor_scale=qt.tensor_scale) keeps every block whose scale is a normal
    E4M3 (code >= 0x08) with a normal float32 factor, and every all-zero block.

    There the block max x / f is 6 * amax / (6 ts E) within E4M3's 1/16 relative rounding of 6, so it
    encodes as 6; the decoded max 6f gives back E to within a few float32 ulps. With a subnormal E4M3
    scale the relative step is coarser and the block may move (test_nvfp4_subnormal_scale_counterexample).
    """
    x, axis = data.draw(float_arrays())
    ts = data.draw(st.none() | st.floats(2.0**-149, F32_MAX / 4096, width=32))
    qt1 = fp4fmt.quantize(x, "nvfp4", axis=axis, tensor_scale=ts)
    qt2 = fp4fmt.quantize(fp4fmt.dequantize(qt1), "nvfp4", axis=axis, tensor_scale=qt1.tensor_scale)
    geo = qt1.geometry
    s1, s2 = linear_scale_codes(qt1), linear_scale_codes(qt2)
    f1 = element_factors(qt1)[:, ::16] if geo.k else np.zeros(s1.shape, np.float32)
    keep = (s1 == 0) | ((s1 >= 0x08) & (f1 >= F32_NORMAL_MIN))
    np.testing.assert_array_equal(s2[keep], s1[keep])
    c1 = stored_codes(qt1).reshape(geo.rows, geo.n_blocks, 16)
    c2 = stored_codes(qt2).reshape(geo.rows, geo.n_blocks, 16)
    np.testing.assert_array_equal(c2[keep], c1[keep])


def test_nvfp4_subnormal_scale_counterexample() -> None:
    """A block with a subnormal E4M3 scale can move on requantization, values included.

    ts = 1, amax = 4.8 * 2^-8: amax / 6 = 1.6 * 2^-9 -> E = 2^-8 (code 2), 4.8 -> 4, decoded 2^-6.
    Requantized: 2^-6 / 6 = 1.33 * 2^-9 -> E = 2^-9 (code 1), 2^-6 / 2^-9 = 8 saturates to 6: 3 * 2^-8.
    """
    x = np.zeros(16, dtype=np.float32)
    x[0] = 4.8 * 2.0**-8
    qt1 = fp4fmt.quantize(x, "nvfp4", tensor_scale=1.0)
    qt2 = fp4fmt.quantize(fp4fmt.dequantize(qt1), "nvfp4", tensor_scale=1.0)
    assert (int(qt1.scales.view(np.uint8)[0]), int(qt1.codes[0])) == (2, 0b0110)
    assert (int(qt2.scales.view(np.uint8)[0]), int(qt2.codes[0])) == (1, 0b0111)
    assert fp4fmt.dequantize(qt1)[0] == 2.0**-6 and fp4fmt.dequantize(qt2)[0] == 3 * 2.0**-8


# ----------------------------------------------------------------------------------------------------
# 6. values already on the FP4 grid survive exactly

GRID = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
# Block exponents e for which every v * 2^e (v on the grid) is exact in the dtype and 6 * 2^e finite.
MX_GRID_EXPS = {"f32": (-127, 125), "bf16": (-127, 125), "f16": (-23, 13), "f64": (-127, 125)}


@st.composite
def mx_grid_tensors(draw) -> tuple[np.ndarray, int]:
    """Logical arrays whose blocks are grid values * 2^e with a ±4 or ±6 element (or all zeros)."""
    shape, axis = draw(shapes_and_axes(max_k=80))
    name = draw(st.sampled_from(tuple(DTYPES)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    s = np.moveaxis(np.zeros(shape), axis, -1)
    rows, k = math.prod(s.shape[:-1]), s.shape[-1]
    v = rng.choice(GRID, (rows, k)) * rng.choice([-1.0, 1.0], (rows, k))
    lo, hi = MX_GRID_EXPS[name]
    for b in range(-(-k // 32)):
        cols = slice(32 * b, min(32 * b + 32, k))
        top = rng.integers(0, cols.stop - cols.start, rows)  # where each block's ±4 or ±6 goes
        v[:, cols][np.arange(rows), top] = rng.choice([-6.0, -4.0, 4.0, 6.0], rows)
        e = rng.integers(lo, hi + 1, (rows, 1))
        v[:, cols] = np.ldexp(v[:, cols], e) * (rng.random((rows, 1)) > 0.1)  # some all-zero blocks
    x = np.moveaxis(v.reshape(s.shape), -1, axis).astype(DTYPES[name])
    assert np.array_equal(x.astype(np.float64), np.moveaxis(v.reshape(s.shape), -1, axis))  # exact
    return x, axis


@pytest.mark.parametrize("rule", ["floor", "rceil", "even"])
@settings(max_examples=150, deadline=None)
@given(case=mx_grid_tensors())
def test_mxfp4_grid_values_survive_exactly(rule: str, case) -> None:
    """A block of grid values * 2^e whose max is 4 or 6 * 2^e decodes bit-identically, every rule."""
    x, axis = case
    for impl in ("auto", "reference"):
        y = fp4fmt.dequantize(fp4fmt.quantize(x, "mxfp4", axis=axis, scale_rule=rule, implementation=impl))
        assert same_bits(y, x.astype(np.float32))


@st.composite
def nvfp4_grid_tensors(draw) -> tuple[np.ndarray, int, float]:
    """(x, axis, tensor_scale) with blocks of grid values * f, f = E * ts, each block max exactly 6f.

    ts = m * 2^j with m odd of few bits, so that E * ts (E an E4M3 value), 6 * ts and v * E * ts are
    exact in float32 and in the dtype; the draws that are not are rejected by assume().
    """
    shape, axis = draw(shapes_and_axes(max_k=60))
    name = draw(st.sampled_from(tuple(DTYPES)))
    mbits = {"f32": 12, "f64": 12, "f16": 4, "bf16": 2}[name]
    jlo, jhi = (-14, 0) if name == "f16" else (-110, 100)  # f16: every v * E * ts a multiple of 2^-24
    m = 2 * draw(st.integers(0, 2 ** (mbits - 1) - 1)) + 1
    ts = math.ldexp(m, draw(st.integers(jlo, jhi)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    s = np.moveaxis(np.zeros(shape), axis, -1)
    rows, k = math.prod(s.shape[:-1]), s.shape[-1]
    v = rng.choice(GRID, (rows, k)) * rng.choice([-1.0, 1.0], (rows, k))
    e4m3 = codec.E4M3_VALUES[: 0x7F].astype(np.float64)
    for b in range(-(-k // 16)):
        cols = slice(16 * b, min(16 * b + 16, k))
        top = rng.integers(0, cols.stop - cols.start, rows)  # where each block's ±6 goes
        v[:, cols][np.arange(rows), top] = rng.choice([-6.0, 6.0], rows)
        v[:, cols] *= rng.choice(e4m3, (rows, 1)) * ts  # code 0 (E = 0) gives an all-zero block
    x = np.moveaxis(v.reshape(s.shape), -1, axis)
    xd = x.astype(DTYPES[name])
    with np.errstate(over="ignore"):
        exact = np.array_equal(xd.astype(np.float64), x) and np.float32(ts) == ts and np.float32(6 * ts) == 6 * ts
        exact = exact and np.all(np.float32(e4m3 * ts) == e4m3 * ts)
    assume(exact)
    return xd, axis, ts


@settings(max_examples=200, deadline=None)
@given(case=nvfp4_grid_tensors())
def test_nvfp4_grid_values_survive_exactly(case) -> None:
    """With a tensor scale for which every block max is exactly 6 * E * ts, blocks decode bit-identically."""
    x, axis, ts = case
    for impl in ("auto", "reference"):
        qt = fp4fmt.quantize(x, "nvfp4", axis=axis, tensor_scale=ts, implementation=impl)
        assert same_bits(fp4fmt.dequantize(qt), x.astype(np.float32))


# ----------------------------------------------------------------------------------------------------
# 7. every decoded element lies within the rounding bound of its input


def half_step(a: np.ndarray) -> np.ndarray:
    """Half the E2M1 grid step around a magnitude a in [0, 6]: 0.25 below 2, 0.5 below 4, else 1."""
    return np.where(a < 2, 0.25, np.where(a < 4, 0.5, 1.0))


def assert_within_rounding_bound(x: np.ndarray, y: np.ndarray, f: np.ndarray) -> None:
    """|y - x| <= h(a) f + slack where a = |x| / f <= 6; y == ±fl32(6 f) where a > 6; signs kept.

    With q = fl32(x / f), v the E2M1 value nearest q and y = fl32(v f):
      |v - a| <= |v - q| + |q - a| <= (h(a) + |q - a|) + |q - a|   (v is a grid point nearest q)
      |q - a| <= U a + TINY                                         (float32 division, subnormal q too)
      |y - v f| <= U * 6 f + TINY                                   (float32 product, |v| <= 6)
    so |y - x| <= h(a) f + 2 f (U a + TINY) + 6 U f + TINY. The check runs in float64, whose own
    rounding (a dozen operations on non-negative terms, 2^-53 each) the factor 1 + 2^-48 covers.
    f == 0 (an underflowed NVFP4 factor) counts as saturated: y must be a signed zero.
    """
    x64, y64, f64 = x.astype(np.float64), y.astype(np.float64), f.astype(np.float64)
    np.testing.assert_array_equal(np.signbit(y), np.signbit(x))
    with np.errstate(divide="ignore", invalid="ignore"):
        a = np.where(f64 > 0, np.abs(x64) / np.where(f64 > 0, f64, 1.0), np.inf)
    sat = a > 6
    with np.errstate(over="ignore"):  # 6f of a block without saturated elements may overflow, unused
        six_f = (np.float32(6) * f).astype(np.float32)
    assert same_bits(np.abs(y[sat]), six_f[sat]), "saturated elements must decode to ±6f"
    an, fn = a[~sat], f64[~sat]
    bound = half_step(an) * fn + 2 * fn * (U * an + TINY) + 6 * U * fn + TINY
    err = np.abs(y64[~sat] - x64[~sat])
    bad = np.flatnonzero(err > bound * (1 + 2.0**-48))
    if bad.size:
        i = bad[0]
        raise AssertionError(f"x={x64[~sat][i]!r} y={y64[~sat][i]!r} f={fn[i]!r} err/bound={err[i] / bound[i]}")


@pytest.mark.parametrize("scheme,rule", CASES)
@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_decoded_values_within_rounding_bound(scheme: str, rule: str, data) -> None:
    """Both schemes, every rule, dtypes f32/bf16/f16, any shape and axis, wide dynamic range."""
    cap = F32_MAX if rule in ("amax", "floor") else MX_DECODABLE
    x, axis = data.draw(float_arrays(dtypes=("f32", "bf16", "f16"), cap=cap))
    ts = None
    if scheme == "nvfp4":
        ts = data.draw(st.none() | st.floats(2.0**-149, F32_MAX / 4096, width=32))
    qt = fp4fmt.quantize(x, scheme, axis=axis, tensor_scale=ts, **rule_kw(scheme, rule))
    y = fp4fmt.dequantize(qt)
    assert y.shape == x.shape and y.dtype == np.float32
    assert_within_rounding_bound(storage_rows(x, axis), storage_rows(y, axis), element_factors(qt))


# ----------------------------------------------------------------------------------------------------
# 8. native == reference


@pytest.mark.parametrize("scheme,rule", CASES)
@settings(max_examples=400, deadline=None)
@given(data=st.data())
def test_native_equals_reference(scheme: str, rule: str, data) -> None:
    """The C accelerator and the numpy reference give identical codes, scales and tensor scale.

    float64 has no native path (implementation="native" is refused, naming the tensor); "auto" then
    runs the reference, and the native path on the float32 rounding of the input gives the same bytes.
    """
    x, axis = data.draw(float_arrays())
    ts = data.draw(st.none() | TENSOR_SCALES) if scheme == "nvfp4" else None
    kw = dict(axis=axis, tensor_scale=ts, **rule_kw(scheme, rule))
    ref = fp4fmt.quantize(x, scheme, implementation="reference", **kw)
    if x.dtype == np.float64:
        with pytest.raises(QuantizationError, match="'w64'.*native accelerator is not available"):
            fp4fmt.quantize(x, scheme, implementation="native", name="w64", **kw)
        assert_same_qtensor(fp4fmt.quantize(x, scheme, **kw), ref)
        native = fp4fmt.quantize(x.astype(np.float32), scheme, implementation="native", **kw)
    else:
        native = fp4fmt.quantize(x, scheme, implementation="native", **kw)
    assert_same_qtensor(native, ref)


@pytest.mark.parametrize("scheme,rule", CASES)
@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_native_error_stats_match_float64_reference(scheme: str, rule: str, data) -> None:
    """quantize_with_error's single-pass statistics (float32 lanes per row, rows added in float64) agree
    with sums over the decoded values in float64: the largest |x - y| to float32 rounding, the sums to a
    relative 1e-4 (plus float32 underflow of each square). Magnitudes up to 2^50, where x^2 fits float32."""
    x, axis = data.draw(float_arrays(dtypes=("f32", "bf16", "f16"), cap=2.0**50))
    kw = dict(axis=axis, **rule_kw(scheme, rule))
    qt, stats = fp4fmt.quantize_with_error(x, scheme, implementation="native", **kw)
    assert_same_qtensor(qt, fp4fmt.quantize(x, scheme, implementation="reference", **kw))
    xd = x.astype(np.float64).reshape(-1)
    err = xd - fp4fmt.dequantize(qt).astype(np.float64).reshape(-1)
    assert stats.numel == x.size
    floor = x.size * 2.0**-126
    assert stats.sum_sq_signal == pytest.approx(float(xd @ xd), rel=1e-4, abs=floor)
    assert stats.sum_sq_error == pytest.approx(float(err @ err), rel=1e-4, abs=floor)
    assert stats.max_abs_error == pytest.approx(float(np.abs(err).max(initial=0.0)), rel=2.0**-23, abs=2.0**-149)
    _, ref_stats = fp4fmt.quantize_with_error(x, scheme, implementation="reference", **kw)
    assert ref_stats.sum_sq_error == pytest.approx(float(err @ err), rel=1e-12, abs=0.0)


@pytest.mark.parametrize("scheme", ["nvfp4", "mxfp4"])
@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_native_dequantize_equals_reference(scheme: str, data) -> None:
    """Decoding by the C accelerator and by numpy gives the same float32 bits for any codes (padding nibbles
    included), any valid scale codes and tensor scale (subnormal and overflowing factors too), any axis
    and both scale layouts; where the values overflow float32 both refuse."""
    shape, axis = data.draw(shapes_and_axes(min_side=1))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    sch = fp4fmt.SCHEMES[scheme]
    layout_name = data.draw(st.sampled_from(["linear", "swizzled"])) if len(shape) >= 2 else "linear"
    geo = fp4fmt.layout.geometry(shape, axis, sch.block_size, layout_name)
    codes = rng.integers(0, 256, geo.codes_shape).astype(np.uint8)
    if scheme == "nvfp4":
        sc = rng.integers(0, 0x7F, geo.linear_scales_shape).astype(np.uint8)
        ts = np.float32(data.draw(TENSOR_SCALES))
    else:
        sc = rng.integers(0, 255, geo.linear_scales_shape).astype(np.uint8)
        ts = None
    if layout_name == "swizzled":
        sc = fp4fmt.layout.swizzle_scales(sc)
    scales = sc.view(ml_dtypes.float8_e4m3fn) if scheme == "nvfp4" else sc
    qt = QTensor(scheme=scheme, shape=shape, axis=axis, codes=codes, scales=scales, tensor_scale=ts,
                 scale_layout=layout_name)
    try:
        ref = fp4fmt.dequantize(qt, implementation="reference")
    except FormatError:
        with pytest.raises(FormatError, match="overflow"):
            fp4fmt.dequantize(qt, implementation="native")
        return
    native = fp4fmt.dequantize(qt, implementation="native")
    assert native.shape == ref.shape and native.dtype == np.float32
    assert native.view(np.uint32).tobytes() == ref.view(np.uint32).tobytes()


@pytest.mark.parametrize("scheme", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("bf16", [False, True])
def test_native_dequantize_threads_do_not_change_the_result(scheme: str, bf16: bool) -> None:
    """Rows split over 1, 2, 3 or 7 threads (large enough that they all run) give the same bits: float32 equal
    to the reference, bfloat16 equal to its round-to-nearest-even."""
    rng = np.random.default_rng(5)
    rows, k = 1000, 1100  # ragged k: a partial last block in every row
    block = fp4fmt.SCHEMES[scheme].block_size
    pk = -(-k // block) * block
    codes = rng.integers(0, 256, (rows, pk // 2)).astype(np.uint8)
    scales = rng.integers(1, 0x7F if scheme == "nvfp4" else 200, (rows, pk // block)).astype(np.uint8)
    qt = QTensor(scheme, (rows, k), codes, scales.view(ml_dtypes.float8_e4m3fn) if scheme == "nvfp4" else scales,
                 np.float32(0.01) if scheme == "nvfp4" else None)
    want = fp4fmt.dequantize(qt, implementation="reference")
    want_bits = want.astype(ml_dtypes.bfloat16).view(np.uint16) if bf16 else want.view(np.uint32)
    for threads in (1, 2, 3, 7):
        out = np.full((rows, k), 0xFFFF if bf16 else 0xFFFFFFFF, np.uint16 if bf16 else np.uint32)
        _native.dequantize(codes, scales, rows, pk, k, block, 0 if scheme == "nvfp4" else 1,
                           0.01 if scheme == "nvfp4" else 0.0, out, bf16, threads)
        assert np.array_equal(out, want_bits), threads


@pytest.mark.parametrize("scheme", ["nvfp4", "mxfp4"])
def test_native_equals_reference_big_endian_and_strided(scheme: str) -> None:
    """Big-endian and non-contiguous inputs quantize identically through both implementations."""
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((6, 70)) * np.exp2(rng.integers(-30, 30, (6, 70)))).astype(np.float32)
    for variant in (x.astype(">f4"), x[:, ::2], x.T):
        for axis in (0, -1):
            assert_same_qtensor(
                fp4fmt.quantize(variant, scheme, axis=axis, implementation="native"),
                fp4fmt.quantize(variant, scheme, axis=axis, implementation="reference"),
            )


# ----------------------------------------------------------------------------------------------------
# 9. errors


def logical_index_of_first_in_storage(mask: np.ndarray, axis: int) -> list[int]:
    """Logical index of the first True of ``mask`` in storage order (blocked axis last, C order)."""
    s = np.moveaxis(mask, axis, -1)
    idx = list(np.unravel_index(int(np.flatnonzero(s.reshape(-1))[0]), s.shape))
    last = idx.pop()
    idx.insert(axis % mask.ndim, last)
    return [int(i) for i in idx]


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_non_finite_input_names_tensor_and_index(data) -> None:
    """NaN/±Inf raise QuantizationError naming the tensor and the logical index, both implementations
    reporting the same (first in storage order) element."""
    shape, axis = data.draw(shapes_and_axes(min_side=1))
    name = data.draw(st.sampled_from(["f32", "bf16", "f16", "f64"]))
    x = np.zeros(shape, dtype=DTYPES[name])
    n_bad = data.draw(st.integers(1, 3))
    for _ in range(n_bad):
        pos = tuple(data.draw(st.integers(0, d - 1)) for d in shape)
        x[pos] = data.draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    want = logical_index_of_first_in_storage(~np.isfinite(x.astype(np.float64)), axis)
    scheme = data.draw(st.sampled_from(["nvfp4", "mxfp4"]))
    impls = ("reference", "auto") if name == "f64" else ("reference", "native")
    for impl in impls:
        with pytest.raises(QuantizationError) as info:
            fp4fmt.quantize(x, scheme, axis=axis, name="layers.0.w", implementation=impl)
        msg = str(info.value)
        assert info.value.tensor == "layers.0.w" and "'layers.0.w'" in msg
        assert f"at index {want} " in msg and "not finite" in msg


def test_f64_beyond_float32_range_is_rejected() -> None:
    """A float64 value float32 cannot hold is refused (not silently saturated), naming where it is."""
    x = np.zeros((2, 16))
    x[1, 3] = 1e300
    with pytest.raises(QuantizationError, match=r"'big'.*\[1, 3\]"):
        fp4fmt.quantize(x, "nvfp4", name="big")


@pytest.mark.parametrize("dtype", [np.int8, np.int32, np.int64, np.uint8, np.bool_, np.complex64])
def test_non_float_dtypes_are_rejected(dtype) -> None:
    """Integer, bool and complex arrays raise QuantizationError naming the tensor and the dtype."""
    x = np.zeros((2, 32), dtype=dtype)
    for scheme in ("nvfp4", "mxfp4"):
        with pytest.raises(QuantizationError, match=rf"'ints'.*cannot quantize dtype {np.dtype(dtype)}") as info:
            fp4fmt.quantize(x, scheme, name="ints")
        assert info.value.tensor == "ints"


@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        (dict(scheme="fp4"), r"unknown scheme 'fp4'"),
        (dict(scheme="mxfp4", scale_rule="amax"), r"scale_rule 'amax' is not one of"),
        (dict(scheme="mxfp4", scale_rule="ceil"), r"scale_rule 'ceil' is not one of"),
        (dict(scheme="nvfp4", scale_rule="floor"), r"scale_rule 'floor' is not one of"),
        (dict(scheme="nvfp4", axis=2), r"axis 2 out of range"),
        (dict(scheme="mxfp4", axis=-3), r"axis -3 out of range"),
        (dict(scheme="nvfp4", tensor_scale=0.0), r"tensor_scale must be finite and > 0"),
        (dict(scheme="nvfp4", tensor_scale=-1.0), r"tensor_scale must be finite and > 0"),
        (dict(scheme="nvfp4", tensor_scale=float("nan")), r"tensor_scale must be finite and > 0"),
        (dict(scheme="nvfp4", tensor_scale=float("inf")), r"tensor_scale must be finite and > 0"),
        (dict(scheme="nvfp4", tensor_scale=1e-50), r"tensor_scale must be finite and > 0"),  # 0 in float32
        (dict(scheme="nvfp4", tensor_scale=1e39), r"tensor_scale must be finite and > 0"),  # inf in float32
        (dict(scheme="mxfp4", tensor_scale=1.0), r"mxfp4 has no tensor scale"),
        (dict(scheme="nvfp4", scale_layout="tiled"), r"unknown scale layout 'tiled'"),
        (dict(scheme="nvfp4", implementation="cuda"), r"implementation must be one of"),
    ],
)
def test_bad_options_are_rejected(kwargs: dict, pattern: str) -> None:
    """Bad scheme, rule, axis, tensor scale, layout or implementation: QuantizationError naming the tensor."""
    x = np.ones((3, 40), dtype=np.float32)
    with pytest.raises(QuantizationError, match=r"tensor 'w': " + pattern) as info:
        fp4fmt.quantize(x, name="w", **kwargs)
    assert info.value.tensor == "w"


def test_swizzled_layout_needs_two_dims() -> None:
    """The swizzled scale layout of a 1-D tensor is refused."""
    with pytest.raises(QuantizationError, match=r"'v'.*at least 2 dimensions"):
        fp4fmt.quantize(np.ones(64, np.float32), "mxfp4", scale_layout="swizzled", name="v")
    with pytest.raises(QuantizationError, match=r"'s'.*0-dimensional"):
        fp4fmt.quantize(np.float32(1.0), "mxfp4", name="s")


def with_scale_byte(qt: QTensor, block: int, code: int) -> QTensor:
    """``qt`` with the scale byte of one block (flat, linear layout) replaced."""
    raw = qt.scales.view(np.uint8).copy()
    raw.reshape(-1)[block] = code
    return QTensor(
        scheme=qt.scheme, shape=qt.shape, codes=qt.codes, scales=raw.view(qt.scales.dtype),
        tensor_scale=qt.tensor_scale, axis=qt.axis, dtype=qt.dtype, scale_rule=qt.scale_rule,
    )


@pytest.mark.parametrize(
    "scheme,code,pattern",
    [
        ("mxfp4", 0xFF, r"E8M0 scale 0xFF \(NaN\) is not allowed; found 0xFF at block \[1, 2\]"),
        ("nvfp4", 0x7F, r"E4M3 block scales must be non-negative and not NaN; found 0x7F at block \[1, 2\]"),
        ("nvfp4", 0xFF, r"E4M3 block scales must be non-negative and not NaN; found 0xFF at block \[1, 2\]"),
        ("nvfp4", 0xB8, r"E4M3 block scales must be non-negative and not NaN; found 0xB8 at block \[1, 2\]"),
    ],
)
def test_dequantize_refuses_bad_scales(scheme: str, code: int, pattern: str) -> None:
    """A NaN scale (E8M0 0xFF, E4M3 0x7F/0xFF) or a negative E4M3 scale (0xB8 = -1): FormatError
    naming the file, the tensor and the block."""
    qt = fp4fmt.quantize(np.ones((2, 96), dtype=np.float32), scheme)
    bad = with_scale_byte(qt, qt.geometry.n_blocks + 2, code)
    with pytest.raises(FormatError, match=r"^m\.safetensors: tensor 'w': " + pattern) as info:
        fp4fmt.dequantize(bad, name="w", file="m.safetensors")
    assert (info.value.file, info.value.tensor) == ("m.safetensors", "w")
    with pytest.raises(FormatError, match=pattern):  # the block is named in linear terms when swizzled too
        fp4fmt.dequantize(bad.with_scale_layout("swizzled"), name="w")
    fp4fmt.dequantize(qt, name="w")  # the unmodified tensor decodes


def test_dequantize_refuses_overflow() -> None:
    """An MXFP4 scale 2^127 on the element 6 decodes past float32: FormatError, not inf."""
    codes = np.zeros((1, 16), dtype=np.uint8)
    codes[0, 0] = 0x07  # element 0: 6.0
    qt = QTensor("mxfp4", (1, 32), codes, np.array([[254]], dtype=np.uint8))
    with pytest.raises(FormatError, match=r"tensor 'big': decoded values overflow float32"):
        fp4fmt.dequantize(qt, name="big")
    codes[0, 0] = 0x03  # 1.5 * 2^127 still fits
    fits = QTensor("mxfp4", (1, 32), codes, np.array([[254]], dtype=np.uint8))
    assert fp4fmt.dequantize(fits)[0, 0] == 1.5 * 2.0**127


@pytest.mark.parametrize("rule", ["even", "rceil"])
def test_mx_even_rceil_top_binade_does_not_decode(rule: str) -> None:
    """Known limit: under even/rceil a block max >= 1.75 * 2^127 gets e = 126 and rounds to 4 * 2^126 =
    2^128, past float32; the quantizer stores it and dequantize refuses it (floor keeps e = 125)."""
    x = np.zeros(32, dtype=np.float32)
    x[0] = 1.75 * 2.0**127
    qt = fp4fmt.quantize(x, "mxfp4", scale_rule=rule, implementation="reference")
    assert (int(qt.scales[0]), int(qt.codes[0])) == (127 + 126, 0b0110)
    with pytest.raises(FormatError, match="overflow"):
        fp4fmt.dequantize(qt)
    x[0] = MX_DECODABLE
    assert np.isfinite(fp4fmt.dequantize(fp4fmt.quantize(x, "mxfp4", scale_rule=rule))).all()
    floor = fp4fmt.quantize(np.full(32, F32_MAX, np.float32), "mxfp4", scale_rule="floor")
    assert fp4fmt.dequantize(floor)[0] == 6 * 2.0**125


def valid_fields(scheme: str) -> dict:
    """Constructor fields of a valid 2 x 40 QTensor of ``scheme`` (blocked along the last axis)."""
    qt = fp4fmt.quantize(np.ones((2, 40), dtype=np.float32), scheme)
    return dict(scheme=scheme, shape=qt.shape, codes=qt.codes, scales=qt.scales, tensor_scale=qt.tensor_scale)


@pytest.mark.parametrize(
    "scheme,change,pattern",
    [
        ("nvfp4", dict(codes=np.zeros((2, 24), np.int8)), r"codes must be uint8 of shape \(2, 24\), got int8"),
        ("nvfp4", dict(codes=np.zeros((2, 20), np.uint8)), r"codes must be uint8 of shape \(2, 24\), got uint8 \(2, 20\)"),
        ("mxfp4", dict(codes=np.zeros((2, 20), np.uint8)), r"codes must be uint8 of shape \(2, 32\)"),
        ("nvfp4", dict(scales=np.zeros((2, 3), np.uint8)), r"scales must be float8_e4m3fn of shape \(2, 3\), got uint8"),
        ("nvfp4", dict(scales=np.zeros((2, 2), ml_dtypes.float8_e4m3fn)), r"scales must be float8_e4m3fn of shape \(2, 3\)"),
        ("mxfp4", dict(scales=np.zeros((2, 2), ml_dtypes.float8_e8m0fnu)), r"scales must be uint8 of shape \(2, 2\)"),
        ("mxfp4", dict(scales=np.zeros((2, 1), np.uint8)), r"scales must be uint8 of shape \(2, 2\)"),
        ("nvfp4", dict(tensor_scale=None), r"nvfp4 needs a tensor_scale"),
        ("nvfp4", dict(tensor_scale=0.0), r"tensor_scale must be finite and > 0"),
        ("nvfp4", dict(tensor_scale=float("nan")), r"tensor_scale must be finite and > 0"),
        ("nvfp4", dict(tensor_scale=-2.0), r"tensor_scale must be finite and > 0"),
        ("mxfp4", dict(tensor_scale=1.0), r"mxfp4 has no tensor_scale"),
        ("nvfp4", dict(scheme="nvfp8"), r"unknown scheme 'nvfp8'"),
        ("mxfp4", dict(axis=2), r"axis 2 out of range"),
        ("mxfp4", dict(shape=()), r"0-dimensional"),
        ("mxfp4", dict(shape=(2, -40)), r"negative dimension"),
        ("mxfp4", dict(scale_rule="amax"), r"scale_rule 'amax' is not one of"),
        ("nvfp4", dict(dtype="I32"), r"original dtype 'I32' is not a float dtype"),
        ("mxfp4", dict(scale_layout="swizzled"), r"scales must be uint8 of shape \(32, 16\)"),
    ],
)
def test_qtensor_construction_validates(scheme: str, change: dict, pattern: str) -> None:
    """Wrong code/scale shapes or dtypes, tensor scales, scheme, axis, rule or dtype raise FormatError."""
    fields = valid_fields(scheme)
    QTensor(**fields)  # the unmodified fields are valid
    fields.update(change)
    with pytest.raises(FormatError, match=pattern):
        QTensor(**fields)


# ----------------------------------------------------------------------------------------------------
# 10. swizzled scale layout


@pytest.mark.parametrize("scheme,rule", [("nvfp4", "amax"), ("mxfp4", "floor")])
@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_swizzled_layout_decodes_like_linear(scheme: str, rule: str, data) -> None:
    """quantize(..., scale_layout="swizzled") has the linear tensor's codes and values, and
    with_scale_layout converts between the two exactly, both ways."""
    x, axis = data.draw(float_arrays(dtypes=("f32", "bf16"), min_dims=2, cap=MX_DECODABLE))
    lin = fp4fmt.quantize(x, scheme, axis=axis, **rule_kw(scheme, rule))
    sw = fp4fmt.quantize(x, scheme, axis=axis, scale_layout="swizzled", **rule_kw(scheme, rule))
    assert sw.scale_layout == "swizzled" and sw.scales.shape == sw.geometry.scales_shape
    np.testing.assert_array_equal(sw.codes, lin.codes)
    assert same_bits(fp4fmt.dequantize(sw), fp4fmt.dequantize(lin))
    np.testing.assert_array_equal(sw.scale_codes(), lin.scales.view(np.uint8))
    assert_same_qtensor(sw.with_scale_layout("linear"), lin)
    assert_same_qtensor(lin.with_scale_layout("swizzled"), sw)
    assert_same_qtensor(sw.with_scale_layout("linear").with_scale_layout("swizzled"), sw)
    assert lin.with_scale_layout("linear") is lin


@pytest.mark.parametrize("scheme", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("shape,axis", [((300, 200), -1), ((300, 200), 0), ((2, 130, 70), 1)])
def test_swizzled_layout_spanning_several_tiles(scheme: str, shape: tuple[int, ...], axis: int) -> None:
    """Tensors with several 128-row and 4-block scale tiles (and partial ones) decode alike in both layouts."""
    rng = np.random.default_rng(11)
    x = (rng.standard_normal(shape) * np.exp2(rng.integers(-20, 20, shape))).astype(np.float32)
    lin = fp4fmt.quantize(x, scheme, axis=axis)
    sw = fp4fmt.quantize(x, scheme, axis=axis, scale_layout="swizzled")
    assert sw.scales.shape != lin.scales.shape
    assert same_bits(fp4fmt.dequantize(sw), fp4fmt.dequantize(lin))
    assert_same_qtensor(sw.with_scale_layout("linear"), lin)
    assert_same_qtensor(lin.with_scale_layout("swizzled"), sw)
