"""Generate the fp4fmt v1 conformance vectors (spec/vectors/).

    python tools/make_vectors.py [--out DIR]        # default: spec/vectors next to this tool

Every vector is a triplet of files plus an entry in ``manifest.json``:

* ``<name>.input.safetensors``    the float source tensors, in their source dtype (BF16, F16 or F32);
* ``<name>.fp4.safetensors``      the fp4fmt file: each input quantized with the vector's parameters;
* ``<name>.expected.safetensors`` the float32 values that decoding the fp4 file must give, bit for bit.

The inputs are built on purpose so that each vector hits the rules it names (ties exactly on the E2M1
thresholds, subnormal E4M3 scales, saturation, signed zeros, padding, swizzle padding, ...), and the
generator *checks* that it does before writing anything. The output is byte-for-byte deterministic:
the pseudo-random inputs come from integer arithmetic (splitmix64), not from numpy's distributions, and
quantization uses fp4fmt's numpy reference implementation.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import ml_dtypes
import numpy as np

import fp4fmt
from fp4fmt import codec, layout, schemes

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "spec", "vectors")
MANIFEST = "manifest.json"
FILE_KINDS = ("input", "fp4", "expected")

# The seven decision points between neighbouring E2M1 magnitudes (§4.1), written out from the spec
# table rather than read from fp4fmt, so the generator states what it means to hit.
E2M1_TIES = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
E4M3_MIN_SUBNORMAL = 2.0**-9
E4M3_MAX = 448.0

BF16 = np.dtype(ml_dtypes.bfloat16)
F16 = np.dtype(np.float16)
F32 = np.dtype(np.float32)


class VectorCheckError(AssertionError):
    """A vector does not hit the rule it claims to exercise (the generator refuses to write it)."""


def require(condition: bool, vector: str, what: str) -> None:
    """Raise VectorCheckError naming the vector unless ``condition`` holds (kept under ``python -O``)."""
    if not condition:
        raise VectorCheckError(f"vector {vector!r}: {what}")


# ---------------------------------------------------------------------------------------------------------
# Deterministic inputs
# ---------------------------------------------------------------------------------------------------------


def uniform(seed: int, n: int) -> np.ndarray:
    """``n`` floats k/2^24 in [0, 1), float64, from splitmix64 (identical on every platform and numpy)."""
    mask = (1 << 64) - 1
    start = (seed * 0xD1B54A32D192ED03 + 0x632BE59BD9B4E019) & mask
    with np.errstate(over="ignore"):
        z = np.uint64(start) + np.arange(1, n + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(40)).astype(np.float64) / 2.0**24


def bell(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    """Bell-shaped, heavy-tailed float32 values (mean 0, |x| < 8): a sum of uniforms, exact in float64.

    One element in twenty is multiplied by 4 so that blocks have outliers, as real weights do.
    """
    n = int(np.prod(shape, dtype=np.int64))
    u = uniform(seed, 5 * n).reshape(5, n)
    x = (u[0] + u[1] + u[2] + u[3] - 2.0) * np.where(u[4] < 0.05, 4.0, 1.0)
    return x.astype(np.float32).reshape(shape)


def pow2_grid(shape: tuple[int, ...], exponent: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> np.ndarray:
    """float64 array of 2^exponent(row, block) over the last axis split into 16-element blocks."""
    rows, k = int(np.prod(shape[:-1], dtype=np.int64)), shape[-1]
    r = np.arange(rows)[:, None]
    c = (np.arange(k) // 16)[None, :]
    return np.ldexp(1.0, exponent(r, c)).reshape(shape)


# ---------------------------------------------------------------------------------------------------------
# Vectors and the probe that checks them
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One source tensor and the ``fp4fmt.quantize`` parameters of its vector."""

    name: str
    source: np.ndarray
    scheme: str
    axis: int = -1
    scale_rule: str | None = None
    scale_layout: str = "linear"
    tensor_scale: float | None = None

    def quantize(self, implementation: str = "reference") -> fp4fmt.QTensor:
        """The tensor quantized with this case's parameters (the numpy reference by default)."""
        return fp4fmt.quantize(
            self.source,
            self.scheme,
            axis=self.axis,
            tensor_scale=self.tensor_scale,
            scale_rule=self.scale_rule,
            scale_layout=self.scale_layout,
            name=self.name,
            implementation=implementation,
        )

    def parameters(self) -> dict:
        """The manifest record: everything needed to re-run the quantization."""
        qt = self.quantize()
        params = {
            "name": self.name,
            "scheme": qt.scheme,
            "shape": list(qt.shape),
            "axis": qt.axis,
            "scale_rule": qt.scale_rule,
            "scale_layout": qt.scale_layout,
            "dtype": qt.dtype,
        }
        if self.tensor_scale is not None:
            ts = np.float32(self.tensor_scale)
            if float(ts) != float(self.tensor_scale):
                raise VectorCheckError(f"tensor {self.name!r}: explicit tensor_scale {self.tensor_scale!r} is not a float32")
            params["tensor_scale"] = float(ts)
        return params


@dataclass(frozen=True)
class Vector:
    """A named set of cases, the spec rules they exercise, and a one-line description."""

    name: str
    description: str
    rules: tuple[str, ...]
    cases: tuple[Case, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class Probe:
    """What quantizing a case produced, block by block, in storage order ``[rows, n_blocks, block]``.

    ``ratio`` is fl32(x / f), the value the E2M1 encoder rounds (§5.1, §5.2); ``raw_scale`` is the NVFP4
    block scale before clamping and E4M3 rounding, amax / fl32(6 * tensor_scale).
    """

    qt: fp4fmt.QTensor
    x: np.ndarray
    valid: np.ndarray
    scale_codes: np.ndarray
    factors: np.ndarray
    ratio: np.ndarray
    codes: np.ndarray
    raw_scale: np.ndarray | None
    decoded: np.ndarray

    @classmethod
    def of(cls, case: Case) -> Probe:
        qt = case.quantize()
        sch = schemes.SCHEMES[qt.scheme]
        geo = qt.geometry
        b = geo.block_size
        xs = layout.to_storage_order(np.asarray(case.source).astype(np.float32), geo.axis).reshape(geo.rows, geo.k)
        x = np.zeros((geo.rows, geo.padded_k), np.float32)
        x[:, : geo.k] = xs
        valid = np.zeros_like(x, dtype=bool)
        valid[:, : geo.k] = True
        scale_codes = qt.scale_codes().reshape(geo.rows, geo.n_blocks)
        f = schemes.block_factors(scale_codes, sch, qt.tensor_scale)
        xb = x.reshape(geo.rows, geo.n_blocks, b)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(f[..., None] == 0, xb * np.float32(0), xb / f[..., None]).astype(np.float32)
        codes = codec.unpack_nibbles(qt.codes.reshape(geo.rows, -1)).reshape(geo.rows, geo.n_blocks, b)
        raw = None
        if qt.tensor_scale is not None:
            amax = np.abs(xb).max(axis=-1)
            raw = (amax / (np.float32(6.0) * qt.tensor_scale)).astype(np.float32)
        return cls(qt, xb, valid.reshape(xb.shape), scale_codes, f, ratio, codes, raw, fp4fmt.dequantize(qt))

    def has_ratio(self, value: float) -> bool:
        """Whether some real (non-padding) element has x/f exactly equal to ``value`` (sign included)."""
        hit = (self.ratio == np.float32(value)) & (np.signbit(self.ratio) == np.signbit(np.float32(value)))
        return bool((hit & self.valid).any())

    def decodes_exactly(self, source: np.ndarray) -> bool:
        """Whether decoding gives back the float32 source bit for bit (signs of zeros included)."""
        src = np.asarray(source).astype(np.float32)
        return bool(np.array_equal(self.decoded.view(np.uint32), src.view(np.uint32)))


# ---------------------------------------------------------------------------------------------------------
# The vectors: one function each
# ---------------------------------------------------------------------------------------------------------

# A fixed order of the 16 E2M1 values (both zeros) in which neighbouring pairs differ, so that a reader
# that swaps the nibbles of a byte decodes different values.
E2M1_ORDER = (0.5, -6.0, 1.0, -0.0, 6.0, -1.5, 0.0, 3.0, -2.0, 4.0, -0.5, 1.5, -4.0, 2.0, -3.0, -1.0)


def rotated_e2m1(row: int) -> np.ndarray:
    """The 16 E2M1 values in :data:`E2M1_ORDER`, rotated by ``row`` places (float64)."""
    return np.roll(np.array(E2M1_ORDER, dtype=np.float64), row)


def nvfp4_e2m1_exact() -> Vector:
    """§4.1, §4.2, §5.1, §5.3: every E2M1 value times a block factor that is exact, so decode == input.

    tensor_scale 2^-4 and block scales that are E4M3 values (normal, subnormal, max) make f = s * 2^-4
    exact; every block holds all 16 codes, so each code is decoded at several scales.
    """
    ts = 2.0**-4
    block_scales = (1.0, 1.125, 448.0, 2.0**-9, 5 * 2.0**-9, 2.0**-6, 13.0, 0.3125)
    x = np.stack([rotated_e2m1(i) * s * ts for i, s in enumerate(block_scales)]).astype(np.float32)
    case = Case("w", x, "nvfp4", tensor_scale=ts)
    p = Probe.of(case)
    require(p.decodes_exactly(x), "nvfp4_e2m1_exact", "inputs did not decode to themselves")
    require(all(set(p.codes[r, 0].tolist()) == set(range(16)) for r in range(len(block_scales))),
            "nvfp4_e2m1_exact", "a block misses an E2M1 code")
    require({0x7E, 0x01, 0x05} <= set(p.scale_codes.ravel().tolist()), "nvfp4_e2m1_exact", "max/subnormal scales missing")
    return Vector("nvfp4_e2m1_exact", "Every E2M1 code (both zeros) at eight NVFP4 block scales; decodes to the input exactly.",
                  ("§4.1", "§4.2", "§5.1", "§5.3"), (case,))


def mxfp4_e2m1_exact() -> Vector:
    """§4.1, §4.3, §5.2, §5.3: every E2M1 value times 2^e for e from -127 (code 0x00) to 125, decode == input.

    Each 32-element block holds the 16 values twice (in two orders); amax 6 * 2^e gives e under the
    floor rule, and e = -127 makes float32-subnormal inputs and outputs.
    """
    exponents = (-127, -126, -20, -1, 0, 1, 17, 125)
    rows = [np.concatenate([rotated_e2m1(i), rotated_e2m1(i + 5)]) * 2.0**e for i, e in enumerate(exponents)]
    x = np.stack(rows).astype(np.float32)
    case = Case("w", x, "mxfp4", scale_rule="floor")
    p = Probe.of(case)
    require(p.decodes_exactly(x), "mxfp4_e2m1_exact", "inputs did not decode to themselves")
    require(p.scale_codes.ravel().tolist() == [e + 127 for e in exponents], "mxfp4_e2m1_exact", "unexpected scale exponents")
    require(all(set(p.codes[r, 0].tolist()) == set(range(16)) for r in range(len(exponents))),
            "mxfp4_e2m1_exact", "a block misses an E2M1 code")
    return Vector("mxfp4_e2m1_exact", "Every E2M1 code at E8M0 scales 2^-127 (code 0x00) .. 2^125; decodes to the input exactly.",
                  ("§4.1", "§4.3", "§5.2", "§5.3"), (case,))


def tie_block(scale: float, width: int) -> np.ndarray:
    """A block with amax 6*scale whose other elements sit exactly on the seven E2M1 thresholds, ±."""
    ties = np.array(E2M1_TIES)
    half = np.concatenate([[6.0], ties, [-6.0], -ties])
    block = half if width == 16 else np.concatenate([half, -ties[::-1], ties[::-1], [0.0, -0.0]])
    return block * scale


def check_ties(p: Probe, vector: str) -> None:
    """Every threshold ±t occurs as an exact x/f ratio of some element."""
    for t in E2M1_TIES:
        require(p.has_ratio(t) and p.has_ratio(-t), vector, f"no element with x/f == ±{t}")


def nvfp4_ties() -> Vector:
    """§4.1, §5.1: elements whose x/f is exactly each E2M1 threshold, ±; RNE picks the even code.

    tensor_scale 1 and block amax 6f make the block factor f exactly an E4M3 value (normal, subnormal).
    """
    factors = (1.0, 0.875, 3 * 2.0**-9, 320.0, 2.0**-6)
    x = np.stack([tie_block(f, 16) for f in factors]).astype(np.float32)
    case = Case("w", x, "nvfp4", tensor_scale=1.0)
    check_ties(Probe.of(case), "nvfp4_ties")
    return Vector("nvfp4_ties", "x/f exactly on each of the seven E2M1 thresholds, positive and negative, at five block factors.",
                  ("§4.1", "§5.1", "§5.3"), (case,))


def mxfp4_ties() -> Vector:
    """§4.1, §5.2: x/2^e exactly on each E2M1 threshold, ±, from a BF16 source (the ties are exact in BF16)."""
    exponents = (-126, -3, 0, 7)
    x = np.stack([tie_block(2.0**e, 32) for e in exponents]).astype(BF16)
    case = Case("w", x, "mxfp4", scale_rule="floor")
    check_ties(Probe.of(case), "mxfp4_ties")
    return Vector("mxfp4_ties", "x/2^e exactly on each of the seven E2M1 thresholds, positive and negative; BF16 source.",
                  ("§4.1", "§5.2", "§5.3"), (case,))


def nvfp4_saturation() -> Vector:
    """§4.2, §5.1: an explicit small tensor_scale (2^-10) so block scales clamp at 448 and elements clip at 6.

    Rows: amax 10 (raw scale 1706.7), amax 2.7 (raw 460.8), amax 2820/1024 (raw 470, which rounding
    alone would take to 480), and a contrast row whose scale (100) is not clamped.
    """
    row_a = [10.0, -10.0, 7.5, -7.5, 3.0, -3.0, 2.625, -2.625, 2.2, -1.9, 1.0, -0.5, 0.3, 0.1, 0.0, -0.0]
    row_b = [2.7, -2.7, 2.65, -2.6, 2.0, 1.5, -1.0, 0.75, 0.5, -0.25, 0.2, 0.125, -0.1, 0.05, 0.01, 0.0]
    row_c = [2820 / 1024, -2820 / 1024] + [2820 / 1024 * (i / 16) for i in range(14)]
    row_d = [600 / 1024] + [-600 / 1024 * (i / 15) for i in range(15)]
    x = np.array([row_a, row_b, row_c, row_d], dtype=np.float32)
    case = Case("w", x, "nvfp4", tensor_scale=2.0**-10)
    p = Probe.of(case)
    clamped = p.raw_scale[:, 0] > E4M3_MAX
    require(clamped.tolist() == [True, True, True, False], "nvfp4_saturation", "expected three clamped block scales")
    require((p.scale_codes[:3, 0] == 0x7E).all(), "nvfp4_saturation", "clamped scales must be code 0x7E (448)")
    over = np.abs(p.ratio) > 6
    require(bool((over & (p.ratio > 0)).any() and (over & (p.ratio < 0)).any()), "nvfp4_saturation", "no clipped element of each sign")
    require(bool(((p.codes == 0x7) & over).any() and ((p.codes == 0xF) & over).any()), "nvfp4_saturation", "clipped elements must be ±6")
    return Vector("nvfp4_saturation", "Explicit tensor_scale 2^-10: block scales clamp at 448 (0x7E), elements clip to ±6.",
                  ("§4.2", "§5.1", "§5.3"), (case,))


def nvfp4_scale_rounding() -> Vector:
    """§4.2, §5.1: raw block scales that E4M3 must round (RNE, ties included), normal and subnormal.

    tensor_scale 1, block amax 6v: v = 4.25 ties down to 4 (then amax/f = 6.375 clips to 6), 4.75 ties
    up to 5, 1.0625 and 1.1875 tie at 1.x, 2^-6 * 1.0625 ties in the smallest normal binade, 1.5 * 2^-9
    and 2.5 * 2^-9 tie between subnormals, 300 and 0.0171 are plain roundings.
    """
    raw = (4.25, 4.75, 1.0625, 1.1875, 2.0**-6 * 1.0625, 1.5 * 2.0**-9, 2.5 * 2.0**-9, 300.0, 0.0171)
    rows = [np.array([6.0, -5.5, 4.0, -3.1, 2.9, -2.0, 1.3, -1.0, 0.8, -0.6, 0.45, -0.3, 0.2, -0.1, 0.05, 0.0]) * v for v in raw]
    x = np.array(rows, dtype=np.float32)
    case = Case("w", x, "nvfp4", tensor_scale=1.0)
    p = Probe.of(case)
    rounded = codec.decode_e4m3(p.scale_codes[:, 0])
    require(bool((rounded != p.raw_scale[:, 0]).all()), "nvfp4_scale_rounding", "every raw scale must need rounding")
    require(bool(p.ratio[0, 0, 0] > 6 and p.codes[0, 0, 0] == 0x7), "nvfp4_scale_rounding", "the 4.25 row must clip its amax to 6")
    return Vector("nvfp4_scale_rounding", "Raw NVFP4 block scales that E4M3 rounds (RNE ties, normal and subnormal).",
                  ("§4.2", "§5.1", "§5.3"), (case,))


def mxfp4_floor_saturation() -> Vector:
    """§5.2: the floor rule with amax significand > 1.5 puts amax/2^e in (6, 8), so elements saturate at ±6."""
    amaxes = (7.0, -7.9, 1.9375 * 2.0**-3, 1.99 * 2.0**20)
    rows = []
    for i, a in enumerate(amaxes):
        body = bell(100 + i, (31,)).astype(np.float64) / 8.0 * abs(a)
        rows.append(np.concatenate([[a], body]))
    x = np.array(rows, dtype=np.float32)
    x[0, 5] = -6.5  # a negative element past 6 in the first block
    case = Case("w", x, "mxfp4", scale_rule="floor")
    p = Probe.of(case)
    over = np.abs(p.ratio) > 6
    require(bool(over.any(axis=-1).all()), "mxfp4_floor_saturation", "every block must have an element past 6")
    require(bool(((p.codes == 0x7) & over).any() and ((p.codes == 0xF) & over).any()), "mxfp4_floor_saturation", "no ±6 saturation")
    return Vector("mxfp4_floor_saturation", "MXFP4 floor rule, amax significand > 1.5: elements past 6*2^e saturate to ±6.",
                  ("§4.1", "§5.2", "§5.3"), (case,))


def signed_zero_rows(scale: float, width: int) -> np.ndarray:
    """Two rows of ``width`` elements: signed zeros, small negatives, a -0.25 tie, an all-zero block."""
    b = width // 2
    first = np.zeros(b)
    first[:8] = [6.0, -0.0, 0.0, -0.1, -0.25, 0.1, -0.0, -0.2]
    second = np.array([-0.0 if i % 3 else 0.0 for i in range(b)])  # all-zero block, mixed signs
    row0 = np.concatenate([first, second]) * scale
    row1 = np.concatenate([second[::-1], -first]) * scale
    return np.stack([row0, row1])


def check_signed_zeros(p: Probe, vector: str, zero_block_scale: int) -> None:
    """-0.0 inputs and small negatives both give code 0x8; an all-zero block gets scale ``zero_block_scale``."""
    neg_zero_in = (p.x == 0) & np.signbit(p.x) & p.valid
    small_neg = (p.x < 0) & (p.codes == 0x8)
    require(bool(neg_zero_in.any() and (p.codes[neg_zero_in] == 0x8).all()), vector, "-0.0 inputs must encode as 0x8")
    require(bool(small_neg.any()), vector, "no small negative rounding to -0 (code 0x8)")
    require(p.has_ratio(-0.25), vector, "no -0.25 tie to -0")
    zero_blocks = (p.x == 0).all(axis=-1)
    require(bool(zero_blocks.any() and (p.scale_codes[zero_blocks] == zero_block_scale).all()), vector,
            f"all-zero blocks must have scale code 0x{zero_block_scale:02X}")


def check_signed_zeros_all(p: Probe, vector: str) -> None:
    """An all-zero tensor: every scale code 0x00 and every element keeps its sign (0x0 / 0x8)."""
    require(bool((p.scale_codes == 0).all()), vector, "all-zero tensor must have scale codes 0x00")
    require(bool((p.codes[p.valid] == np.where(np.signbit(p.x[p.valid]), 8, 0)).all()), vector, "zero signs not kept")


def nvfp4_signed_zeros() -> Vector:
    """§4.1, §5.1, §5.3: -0.0 kept as code 0x8, small negatives round to -0, all-zero blocks get scale 0x00.

    Tensor ``w`` uses tensor_scale 1 (so the -0.25 tie is exact); tensor ``zeros`` is all zero with the
    default tensor scale, which is then 1.0.
    """
    w = Case("w", signed_zero_rows(1.0, 32).astype(np.float32), "nvfp4", tensor_scale=1.0)
    zeros = Case("zeros", np.array([[0.0, -0.0] * 8] * 3, dtype=np.float32), "nvfp4")
    check_signed_zeros(Probe.of(w), "nvfp4_signed_zeros", 0x00)
    pz = Probe.of(zeros)
    check_signed_zeros_all(pz, "nvfp4_signed_zeros")
    require(pz.qt.tensor_scale == np.float32(1.0), "nvfp4_signed_zeros", "an all-zero tensor must get tensor_scale 1.0")
    return Vector("nvfp4_signed_zeros", "NVFP4 signed zeros: -0.0 -> 0x8, small negatives -> -0, all-zero blocks and tensor.",
                  ("§4.1", "§5.1", "§5.3"), (w, zeros))


def mxfp4_signed_zeros() -> Vector:
    """§4.1, §4.3, §5.2, §5.3: -0.0 kept as 0x8, small negatives round to -0, an all-zero block gets E8M0 0x00."""
    case = Case("w", signed_zero_rows(0.5, 64).astype(np.float32), "mxfp4", scale_rule="floor")
    check_signed_zeros(Probe.of(case), "mxfp4_signed_zeros", 0x00)
    return Vector("mxfp4_signed_zeros", "MXFP4 signed zeros: -0.0 -> 0x8, small negatives -> -0, all-zero block scale 0x00.",
                  ("§4.1", "§4.3", "§5.2", "§5.3"), (case,))


def nvfp4_tiny_tensor_scale() -> Vector:
    """§5.1, §5.3: tensor_scale 2^-149 (the smallest float32): one block factor underflows to 0 (the block
    encodes signed zeros), another is a float32 subnormal, so decoded values are subnormal."""
    unit = 2.0**-149
    block0 = np.array([1, -1, 0, 1, -1, 1, 0, -1, 1, 1, -1, 0, 1, -1, 1, -0.0]) * unit  # amax 2^-149: f -> 0
    block1 = np.array([512, -512, 300, -200, 100, 64, -50, 33, 20, -10, 5, 3, 2, -1, 1, 0]) * unit  # f = 88 * 2^-149
    x = np.stack([block0, block1]).astype(np.float32)
    case = Case("w", x, "nvfp4", tensor_scale=unit)
    p = Probe.of(case)
    require(bool(p.factors[0, 0] == 0 and p.scale_codes[0, 0] != 0), "nvfp4_tiny_tensor_scale", "block 0 factor must underflow to 0")
    tiny = np.float32(np.finfo(np.float32).tiny)
    require(bool(0 < p.factors[1, 0] < tiny), "nvfp4_tiny_tensor_scale", "block 1 factor must be float32-subnormal")
    require(bool((p.codes[0, 0] & 0x7 == 0).all()), "nvfp4_tiny_tensor_scale", "a zero-factor block must encode zeros")
    return Vector("nvfp4_tiny_tensor_scale", "tensor_scale 2^-149: a block factor that underflows to 0 and one that is subnormal.",
                  ("§5.1", "§5.3"), (case,))


def nvfp4_subnormal_scales() -> Vector:
    """§4.2, §5.1: subnormal E4M3 block scales 0x01..0x07, the clamp to 2^-9, and subnormal scale ties.

    Block amax 2688 makes the default tensor scale exactly 1.0, so the raw block scale is amax/6:
    m * 2^-9 for m = 1..7, 0.25 * 2^-9 (clamped up to 2^-9), and 1.5 / 2.5 * 2^-9 (RNE ties).
    """
    raw = [448.0] + [m * 2.0**-9 for m in range(1, 8)] + [0.25 * 2.0**-9, 1.5 * 2.0**-9, 2.5 * 2.0**-9]
    rows = []
    for i, v in enumerate(raw):
        body = np.clip(bell(200 + i, (15,)).astype(np.float64) / 4.0, -1, 1) * 6 * v
        rows.append(np.concatenate([[6 * v * (-1) ** i], body]))
    x = np.array(rows, dtype=np.float32)
    case = Case("w", x, "nvfp4")
    p = Probe.of(case)
    require(p.qt.tensor_scale == np.float32(1.0), "nvfp4_subnormal_scales", "default tensor scale must be exactly 1.0")
    require(set(range(1, 8)) <= set(p.scale_codes.ravel().tolist()), "nvfp4_subnormal_scales", "scale codes 0x01..0x07 missing")
    clamped = (p.raw_scale > 0) & (p.raw_scale < E4M3_MIN_SUBNORMAL)
    require(bool(clamped.any() and (p.scale_codes[clamped] == 0x01).all()), "nvfp4_subnormal_scales", "no scale clamped to 2^-9")
    return Vector("nvfp4_subnormal_scales", "Subnormal E4M3 block scales 0x01..0x07, the 2^-9 clamp, subnormal ties; default tensor scale 1.0.",
                  ("§4.2", "§5.1", "§5.3"), (case,))


def ragged_k() -> Vector:
    """§6.2: K = 1, 17, 33, 47 for both schemes: the last block is padded with zero codes, dropped on decode."""
    cases = []
    for scheme, seed in (("nvfp4", 300), ("mxfp4", 400)):
        for k in (1, 17, 33, 47):
            cases.append(Case(f"{scheme}_k{k}", bell(seed + k, (3, k)), scheme))
    for c in cases:
        require(c.quantize().geometry.padding > 0, "ragged_k", f"{c.name} must be padded")
    return Vector("ragged_k", "Ragged K (1, 17, 33, 47) for NVFP4 and MXFP4: zero padding to the block size.",
                  ("§5.3", "§6.2"), tuple(cases))


def one_dim() -> Vector:
    """§6, §6.2: 1-D tensors (a bias-like vector) are one row of blocks; both need padding."""
    cases = (Case("nvfp4", bell(500, (40,)), "nvfp4"), Case("mxfp4", bell(501, (50,)), "mxfp4"))
    for c in cases:
        require(c.quantize().geometry.padding > 0, "one_dim", f"{c.name} must be padded")
    return Vector("one_dim", "1-D tensors of 40 (NVFP4) and 50 (MXFP4) elements.", ("§6", "§6.2"), cases)


def blocked_axis() -> Vector:
    """§6: blocking along an axis that is not the last: [40, 6] NVFP4 axis 0, [2, 40, 3] MXFP4 axis 1.

    Each position of the non-blocked axes has its own magnitude, so a reader that forgets to move the
    blocked axis back (or moves the wrong one) decodes different values.
    """
    a = bell(600, (40, 6)) * np.ldexp(1.0, np.arange(6) - 3)[None, :].astype(np.float32)
    b = bell(601, (2, 40, 3)) * np.ldexp(1.0, np.arange(6).reshape(2, 1, 3) * 2 - 5).astype(np.float32)
    cases = (Case("nvfp4_axis0", a.astype(np.float32), "nvfp4", axis=0), Case("mxfp4_axis1", b.astype(np.float32), "mxfp4", axis=1))
    for c in cases:
        p = Probe.of(c)
        require(p.qt.axis != len(p.qt.shape) - 1, "blocked_axis", f"{c.name} must block a non-last axis")
        require(len(set(p.scale_codes[:, 0].tolist())) > 1, "blocked_axis", f"{c.name} scales must vary across rows")
    return Vector("blocked_axis", "Blocking along axis 0 of [40, 6] (NVFP4) and axis 1 of [2, 40, 3] (MXFP4), with padding.",
                  ("§6", "§6.2", "§5.3"), cases)


def moe_3d() -> Vector:
    """§6: 3-D MoE expert weights [E, N, K] = [4, 8, 64], blocked along K, each expert at its own magnitude."""
    mag = np.ldexp(1.0, np.arange(4) * 2 - 3).reshape(4, 1, 1)
    x = (bell(700, (4, 8, 64)) * mag).astype(BF16)
    cases = (Case("experts_nvfp4", x, "nvfp4"), Case("experts_mxfp4", x, "mxfp4", scale_rule="rceil"))
    for c in cases:
        require(c.quantize().codes.shape == (4, 8, 32), "moe_3d", f"{c.name} codes must be [4, 8, 32]")
    return Vector("moe_3d", "3-D MoE-shaped [4, 8, 64] BF16 tensor, NVFP4 and MXFP4 (rceil).", ("§5.1", "§5.2", "§6"), cases)


def mxfp4_scale_rules() -> Vector:
    """§5.2: the same blocks under the floor, rceil and even rules, on amax values where they disagree.

    Block amax: 3.0 and 6.0 (all agree), 6.01 (rceil +1), 7.0 (even and rceil +1), 12.01 (rceil +1
    over even and floor), -7.0 (sign ignored), 6.9996 (significand just under 1.75), the float32 just
    above 6 (rceil +1), 0.75 = 6 * 2^-3.
    """
    amaxes = (3.0, 6.0, 6.01, 7.0, 12.01, -7.0, 6.9996, float(np.nextafter(np.float32(6), np.float32(7))), 0.75)
    blocks = []
    for i, a in enumerate(amaxes):
        body = np.clip(bell(800 + i, (31,)).astype(np.float64) / 4.0, -1, 1) * abs(a)
        blocks.append(np.concatenate([[a], body]))
    x = np.concatenate(blocks).reshape(1, -1).astype(np.float32)
    cases = tuple(Case(f"w_{rule}", x, "mxfp4", scale_rule=rule) for rule in ("floor", "rceil", "even"))
    codes = {c.scale_rule: Probe.of(c).scale_codes[0] for c in cases}
    for r1, r2, amax in (("floor", "rceil", 6.01), ("floor", "even", 7.0), ("even", "rceil", 12.01)):
        i = amaxes.index(amax)
        require(codes[r1][i] != codes[r2][i], "mxfp4_scale_rules", f"{r1} and {r2} must disagree on amax {amax}")
    require(bool((codes["floor"][:2] == codes["rceil"][:2]).all() and (codes["floor"][:2] == codes["even"][:2]).all()),
            "mxfp4_scale_rules", "the rules must agree on amax 3.0 and 6.0")
    return Vector("mxfp4_scale_rules", "One F32 input under the floor, rceil and even MXFP4 scale rules (amax 6.01, 7.0, 12.01, ...).",
                  ("§4.3", "§5.2", "§5.3"), cases)


def check_swizzle_case(c: Case, vector: str) -> None:
    """The tensor has > 128 rows and a block count that is not a multiple of 4, and varied scales."""
    p = Probe.of(c)
    geo = p.qt.geometry
    require(geo.storage_shape[-2] > 128 and geo.n_blocks % 4 != 0, vector, f"{c.name}: needs rows > 128, blocks % 4 != 0")
    require(len(set(p.scale_codes.ravel().tolist())) >= 8, vector, f"{c.name}: scales must vary so misplacement shows")
    require(geo.scales_shape != geo.linear_scales_shape, vector, f"{c.name}: swizzled scales must be padded")


def nvfp4_swizzled() -> Vector:
    """§6.4: NVFP4 [130, 72] (5 blocks a row) with swizzled scales: two row tiles, two column tiles, padding.

    Block magnitudes 2^(((7r + 3c) mod 11) - 5) make the scale codes differ from tile slot to slot.
    """
    mag = pow2_grid((130, 72), lambda r, c: ((7 * r + 3 * c) % 11) - 5)
    x = (bell(900, (130, 72)) * mag).astype(BF16)
    case = Case("w", x, "nvfp4", scale_layout="swizzled")
    check_swizzle_case(case, "nvfp4_swizzled")
    return Vector("nvfp4_swizzled", "NVFP4 [130, 72] BF16 with 128x4-tile swizzled scales (rows and blocks padded).",
                  ("§5.1", "§6.2", "§6.4"), (case,))


def mxfp4_swizzled() -> Vector:
    """§6.4: MXFP4 [3, 129, 96] (3 blocks a row) with swizzled scales, one swizzled matrix per leading index."""
    mag = pow2_grid((3, 129, 96), lambda r, c: ((5 * r + 3 * (c // 2)) % 9) - 4)
    x = (bell(901, (3, 129, 96)) * mag).astype(BF16)
    case = Case("w", x, "mxfp4", scale_layout="swizzled")
    check_swizzle_case(case, "mxfp4_swizzled")
    return Vector("mxfp4_swizzled", "MXFP4 [3, 129, 96] BF16 with swizzled scales per expert (rows and blocks padded).",
                  ("§5.2", "§6.2", "§6.4"), (case,))


def source_dtypes() -> Vector:
    """§5.1, §5.2: the same kind of data from BF16, F16 and F32 sources, default tensor scale / floor rule.

    Rows span 2^-3 .. 2^2; the F16 tensor's last row is scaled by 2^-20, so it holds F16 subnormals.
    """
    cases = []
    for i, dt in enumerate((BF16, F16, F32)):
        x = bell(1000 + i, (6, 64)) * np.ldexp(1.0, np.arange(6) - 3)[:, None].astype(np.float32)
        if dt == F16:
            x[-1] *= np.float32(2.0**-20)
        x = x.astype(dt)
        label = fp4fmt.dtypes.dtype_name(dt).lower()
        cases += [Case(f"nvfp4_{label}", x, "nvfp4"), Case(f"mxfp4_{label}", x, "mxfp4")]
    for c in cases:
        require(c.quantize().dtype == fp4fmt.dtypes.dtype_name(c.source.dtype), "source_dtypes", f"{c.name}: wrong dtype")
    f16 = next(c.source for c in cases if c.name == "nvfp4_f16")
    require(bool((np.abs(f16[-1]) < np.finfo(np.float16).tiny).any()), "source_dtypes", "F16 source must hold subnormals")
    return Vector("source_dtypes", "Pseudo-random weights from BF16, F16 (with subnormals) and F32 sources, both schemes.",
                  ("§5.1", "§5.2", "§5.3"), tuple(cases))


def mxfp4_extremes() -> Vector:
    """§4.3, §5.2: E8M0 exponent bounds under floor: float32 max (e = 125, saturates), amax 2^-130 and
    1.3 * 2^-126 (e clamped up to -127, code 0x00, elements underflow or round)."""
    big = float(np.finfo(np.float32).max)
    b0 = np.concatenate([[big, -big / 3], bell(1100, (30,)).astype(np.float64) * 2.0**120])
    b1 = np.concatenate([[2.0**-130, -(2.0**-131)], np.round(bell(1101, (30,)).astype(np.float64) * 4) * 2.0**-134])
    b2 = np.concatenate([[1.3 * 2.0**-126, -(2.0**-127)], bell(1102, (30,)).astype(np.float64) * 2.0**-128])
    x = np.stack([b0, b1, b2]).astype(np.float32)
    case = Case("w", x, "mxfp4", scale_rule="floor")
    p = Probe.of(case)
    require(p.scale_codes[:, 0].tolist() == [252, 0, 0], "mxfp4_extremes", f"scale codes {p.scale_codes[:, 0].tolist()}")
    require(bool(p.ratio[0, 0, 0] > 6 and p.codes[0, 0, 0] == 0x7), "mxfp4_extremes", "float32 max must saturate to 6")
    require(bool((p.codes[1, 0] & 0x7 == 0).all() and (p.x[1, 0] != 0).any()), "mxfp4_extremes", "block 1 must underflow to zeros")
    return Vector("mxfp4_extremes", "MXFP4 at the E8M0 bounds: float32 max (scale 2^125, saturating) and tiny blocks clamped to 2^-127.",
                  ("§4.3", "§5.2", "§5.3"), (case,))


VECTORS: tuple[Callable[[], Vector], ...] = (
    nvfp4_e2m1_exact,
    mxfp4_e2m1_exact,
    nvfp4_ties,
    mxfp4_ties,
    nvfp4_saturation,
    nvfp4_scale_rounding,
    mxfp4_floor_saturation,
    nvfp4_signed_zeros,
    mxfp4_signed_zeros,
    nvfp4_tiny_tensor_scale,
    nvfp4_subnormal_scales,
    ragged_k,
    one_dim,
    blocked_axis,
    moe_3d,
    mxfp4_scale_rules,
    nvfp4_swizzled,
    mxfp4_swizzled,
    source_dtypes,
    mxfp4_extremes,
)


# ---------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------


def file_name(vector: str, kind: str) -> str:
    """``<vector>.<kind>.safetensors`` for kind in input, fp4, expected."""
    return f"{vector}.{kind}.safetensors"


def sha256_of(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def write_vector(vec: Vector, out: str) -> dict:
    """Write the triplet of ``vec`` into ``out`` and return its manifest entry."""
    qts = {c.name: c.quantize() for c in vec.cases}
    triplet = {
        "input": {c.name: c.source for c in vec.cases},
        "fp4": qts,
        "expected": {name: fp4fmt.dequantize(qt, name=name) for name, qt in qts.items()},
    }
    files = {}
    for kind in FILE_KINDS:
        path = os.path.join(out, file_name(vec.name, kind))
        fp4fmt.save_file(triplet[kind], path)
        files[kind] = {"path": file_name(vec.name, kind), "sha256": sha256_of(path)}
    return {
        "name": vec.name,
        "description": vec.description,
        "rules": list(vec.rules),
        "tensors": [c.parameters() for c in vec.cases],
        "files": files,
    }


def build_vectors() -> list[Vector]:
    """Construct and check every vector (raises VectorCheckError if one misses its rule)."""
    vectors = [make() for make in VECTORS]
    names = [v.name for v in vectors]
    if len(set(names)) != len(names):
        raise VectorCheckError(f"duplicate vector names in {names}")
    return vectors


def generate(out: str) -> dict:
    """Write every vector and ``manifest.json`` into ``out`` (created if missing); return the manifest."""
    os.makedirs(out, exist_ok=True)
    manifest = {
        "format_version": fp4fmt.FORMAT_VERSION,
        "generator": "tools/make_vectors.py",
        "vectors": [write_vector(v, out) for v in build_vectors()],
    }
    with open(os.path.join(out, MANIFEST), "w", encoding="utf-8", newline="\n") as f:
        json.dump(manifest, f, indent=2, sort_keys=True, ensure_ascii=False)
        f.write("\n")
    return manifest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.normpath(DEFAULT_OUT), help="output directory (default: spec/vectors)")
    args = ap.parse_args(argv)
    manifest = generate(args.out)
    total = sum(os.path.getsize(os.path.join(args.out, f["path"])) for v in manifest["vectors"] for f in v["files"].values())
    print(f"wrote {len(manifest['vectors'])} vectors ({total} bytes) and {MANIFEST} to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
