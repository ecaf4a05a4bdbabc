"""``QTensor`` (a quantized tensor in memory) and the public ``quantize`` / ``dequantize`` (spec §5, §6)."""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np

from . import codec, dtypes, layout, schemes
from .errors import FormatError, QuantizationError

try:  # the optional C accelerator; the numpy reference is used without it
    from . import _native
except ImportError:  # pragma: no cover - exercised by the wheel-less fallback test
    _native = None

_NATIVE_DTYPES = {np.dtype(np.float32): 0, np.dtype(ml_dtypes.bfloat16): 1, np.dtype(np.float16): 2}
IMPLEMENTATIONS = ("auto", "native", "reference")


@dataclass(frozen=True, eq=False)
class QTensor:
    """A tensor quantized by one fp4fmt scheme: packed E2M1 codes, block scales, optional tensor scale.

    ``codes`` is uint8 of shape ``geometry.codes_shape``; ``scales`` is float8_e4m3fn (NVFP4) or uint8
    E8M0 codes (MXFP4) of shape ``geometry.scales_shape``; ``tensor_scale`` is a float32 (NVFP4 only).
    ``dtype`` is the safetensors name of the original dtype. Construction validates all of it.
    """

    scheme: str
    shape: tuple[int, ...]
    codes: np.ndarray
    scales: np.ndarray
    tensor_scale: np.float32 | None = None
    axis: int = -1
    dtype: str = "F32"
    scale_layout: str = "linear"
    scale_rule: str | None = None

    def __post_init__(self) -> None:
        try:
            sch = schemes.get_scheme(self.scheme)
            geo = layout.geometry(tuple(self.shape), self.axis, sch.block_size, self.scale_layout)
        except ValueError as e:
            raise FormatError(str(e)) from None
        object.__setattr__(self, "shape", geo.shape)
        object.__setattr__(self, "axis", geo.axis)
        rule = self.scale_rule if self.scale_rule is not None else sch.default_rule
        if rule not in sch.scale_rules:
            raise FormatError(f"scale_rule {rule!r} is not one of {sch.scale_rules} for {sch.name}")
        object.__setattr__(self, "scale_rule", rule)
        if self.dtype not in dtypes.FLOAT_SOURCE_DTYPES:
            raise FormatError(f"original dtype {self.dtype!r} is not a float dtype fp4fmt quantizes")
        codes = np.asarray(self.codes)
        if codes.dtype != np.uint8 or codes.shape != geo.codes_shape:
            raise FormatError(f"codes must be uint8 of shape {geo.codes_shape}, got {codes.dtype} {codes.shape}")
        scales = np.asarray(self.scales)
        want = dtypes.numpy_dtype(sch.scale_dtype)
        if scales.dtype != want or scales.shape != geo.scales_shape:
            raise FormatError(f"scales must be {want} of shape {geo.scales_shape}, got {scales.dtype} {scales.shape}")
        if sch.has_tensor_scale:
            if self.tensor_scale is None:
                raise FormatError(f"{sch.name} needs a tensor_scale")
            ts = np.float32(self.tensor_scale)
            if not (np.isfinite(ts) and ts > 0):
                raise FormatError(f"tensor_scale must be finite and > 0, got {ts}")
            object.__setattr__(self, "tensor_scale", ts)
        elif self.tensor_scale is not None:
            raise FormatError(f"{sch.name} has no tensor_scale")
        object.__setattr__(self, "codes", codes)
        object.__setattr__(self, "scales", scales)

    @property
    def geometry(self) -> layout.Geometry:
        return layout.geometry(self.shape, self.axis, schemes.SCHEMES[self.scheme].block_size, self.scale_layout)

    @property
    def block_size(self) -> int:
        return schemes.SCHEMES[self.scheme].block_size

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        """Bytes stored for this tensor: codes, scales and the tensor scale."""
        return self.codes.nbytes + self.scales.nbytes + (4 if self.tensor_scale is not None else 0)

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes / self.numel if self.numel else 0.0

    def scale_codes(self) -> np.ndarray:
        """Block scale codes as uint8 in the linear layout ``[..., n_blocks]``."""
        raw = self.scales.view(np.uint8)
        if self.scale_layout == "linear":
            return raw
        geo = self.geometry
        return layout.unswizzle_scales(raw, geo.storage_shape[-2], geo.n_blocks)

    def with_scale_layout(self, scale_layout: str) -> QTensor:
        """The same tensor with its block scales in another layout (bytes of the codes unchanged)."""
        if scale_layout == self.scale_layout:
            return self
        lin = self.scale_codes()
        raw = layout.swizzle_scales(lin) if scale_layout == "swizzled" else lin
        return _replace(self, scales=raw.view(self.scales.dtype), scale_layout=scale_layout)

    def __repr__(self) -> str:
        extra = f", tensor_scale={float(self.tensor_scale)!r}" if self.tensor_scale is not None else ""
        return (
            f"QTensor({self.scheme}, shape={self.shape}, axis={self.axis}, dtype={self.dtype}, "
            f"scale_layout={self.scale_layout}, scale_rule={self.scale_rule}{extra})"
        )


def _replace(qt: QTensor, **changes) -> QTensor:
    fields = dict(
        scheme=qt.scheme,
        shape=qt.shape,
        codes=qt.codes,
        scales=qt.scales,
        tensor_scale=qt.tensor_scale,
        axis=qt.axis,
        dtype=qt.dtype,
        scale_layout=qt.scale_layout,
        scale_rule=qt.scale_rule,
    )
    fields.update(changes)
    return QTensor(**fields)


def _first_bad_index(x: np.ndarray, flat_index: int, axis: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Logical index of the element at ``flat_index`` of the storage-order array ``x``."""
    storage_idx = np.unravel_index(flat_index, x.shape)
    idx = list(storage_idx[:-1])
    idx.insert(axis, storage_idx[-1])
    return tuple(int(i) for i in idx)


@dataclass(frozen=True)
class ErrorStats:
    """How far a quantized tensor's decoded values y are from its input x (sums over all elements)."""

    numel: int
    sum_sq_signal: float  # sum of x^2
    sum_sq_error: float  # sum of (x - y)^2
    max_abs_error: float

    @property
    def sqnr_db(self) -> float:
        """10 log10(sum x^2 / sum (x-y)^2); inf for an exact result."""
        if self.sum_sq_error == 0:
            return float("inf")
        if self.sum_sq_signal == 0:
            return float("-inf")
        return float(10.0 * np.log10(self.sum_sq_signal / self.sum_sq_error))

    @property
    def rel_rmse(self) -> float:
        """sqrt(sum (x-y)^2 / sum x^2): the error relative to the tensor's energy."""
        return float(np.sqrt(self.sum_sq_error / self.sum_sq_signal)) if self.sum_sq_signal else 0.0


def _amax_storage(values: np.ndarray, xs: np.ndarray, geo: layout.Geometry, name: str | None) -> np.float32:
    """max |x| of a storage-order array; QuantizationError naming the logical index of a NaN/Inf."""
    if values.dtype in _NATIVE_DTYPES and _native is not None:
        amax, bad = _native.scan(values, _NATIVE_DTYPES[values.dtype])
    else:
        finite = np.isfinite(values)
        bad = -1 if finite.all() else int(np.argmin(finite.reshape(-1)))
        amax = float(np.abs(values).max()) if values.size and bad < 0 else 0.0
    if bad >= 0:
        idx = _first_bad_index(xs, bad, geo.axis, geo.shape)
        value = xs.reshape(-1)[bad]
        raise QuantizationError(f"value {value} at index {list(idx)} is not finite; NaN and Inf cannot be quantized", tensor=name)
    return np.float32(amax)


def absmax_or_nan(array) -> float:
    """max |x| of a float array, or NaN if it holds a NaN or Inf (no exception, no float32 copy where the
    accelerator reads the dtype in place)."""
    try:
        return absmax(array)
    except QuantizationError:
        return float("nan")


def absmax(array, *, name: str | None = None) -> float:
    """max |x| of a float array without a float32 copy where the accelerator can read it in place;
    QuantizationError (naming the tensor and index) on NaN/Inf. This is the amax of the NVFP4 tensor scale."""
    x = np.asarray(array)
    if x.ndim == 0:
        x = x.reshape(1)
    try:
        dtypes.source_dtype_name(x.dtype)
    except ValueError as e:
        raise QuantizationError(str(e), tensor=name) from None
    xs = np.ascontiguousarray(x)
    if xs.dtype.byteorder == ">":
        xs = xs.astype(xs.dtype.newbyteorder("<"))
    geo = layout.geometry(xs.shape, -1, 16)
    values = xs if (xs.dtype in _NATIVE_DTYPES and _native is not None) else xs.astype(np.float32)
    return float(_amax_storage(values, xs, geo, name))


def quantize(
    array,
    scheme: str = "nvfp4",
    *,
    axis: int = -1,
    tensor_scale: float | None = None,
    scale_rule: str | None = None,
    scale_layout: str = "linear",
    name: str | None = None,
    implementation: str = "auto",
) -> QTensor:
    """Quantize a float array to ``scheme`` with the fp4fmt v1 RTN quantizer (§5).

    ``axis`` is the reduction axis the blocks run along (the last, ``in_features``, for a linear weight).
    ``tensor_scale`` (NVFP4) overrides the default amax/2688, e.g. to share one scale across fused layers.
    ``scale_rule`` (MXFP4) is ``floor`` (default, OCP), ``rceil`` or ``even``. ``name`` only labels errors.
    Raises QuantizationError on NaN/Inf values, a non-float dtype or bad options.
    """
    return _quantize(array, scheme, axis, tensor_scale, scale_rule, scale_layout, name, implementation, False)[0]


def quantize_with_error(
    array,
    scheme: str = "nvfp4",
    *,
    axis: int = -1,
    tensor_scale: float | None = None,
    scale_rule: str | None = None,
    scale_layout: str = "linear",
    name: str | None = None,
    implementation: str = "auto",
) -> tuple[QTensor, ErrorStats]:
    """:func:`quantize`, plus the error of the decoded values against the input (computed in the same pass
    by the accelerator, from :func:`dequantize` by the reference)."""
    qt, stats = _quantize(array, scheme, axis, tensor_scale, scale_rule, scale_layout, name, implementation, True)
    return qt, stats


def _quantize(array, scheme, axis, tensor_scale, scale_rule, scale_layout, name, implementation, want_stats):
    try:
        sch = schemes.get_scheme(scheme)
    except ValueError as e:
        raise QuantizationError(str(e), tensor=name) from None
    if implementation not in IMPLEMENTATIONS:
        raise QuantizationError(f"implementation must be one of {IMPLEMENTATIONS}", tensor=name)
    rule = scale_rule if scale_rule is not None else sch.default_rule
    if rule not in sch.scale_rules:
        raise QuantizationError(f"scale_rule {rule!r} is not one of {sch.scale_rules} for {sch.name}", tensor=name)
    x = np.asarray(array)
    try:
        src_dtype = dtypes.source_dtype_name(x.dtype)
        geo = layout.geometry(x.shape, axis, sch.block_size, scale_layout)
    except ValueError as e:
        raise QuantizationError(str(e), tensor=name) from None
    if tensor_scale is not None:
        if not sch.has_tensor_scale:
            raise QuantizationError(f"{sch.name} has no tensor scale", tensor=name)
        tensor_scale = np.float32(tensor_scale)
        if not (np.isfinite(tensor_scale) and tensor_scale > 0):
            raise QuantizationError(f"tensor_scale must be finite and > 0, got {tensor_scale}", tensor=name)

    xs = layout.to_storage_order(x, geo.axis)
    if xs.dtype.byteorder == ">":
        xs = xs.astype(xs.dtype.newbyteorder("<"))
    rows, k = geo.rows, geo.k
    use_native = _native is not None and implementation != "reference" and xs.dtype in _NATIVE_DTYPES
    if implementation == "native" and not use_native:
        raise QuantizationError("the native accelerator is not available for this input", tensor=name)

    if not use_native:
        xf = xs.astype(np.float32)
    amax = _amax_storage(xs if use_native else xf, xs, geo, name)

    if sch.has_tensor_scale and tensor_scale is None:
        tensor_scale = schemes.nvfp4_tensor_scale(amax)

    if use_native:
        packed = np.empty((rows, geo.padded_k // 2), dtype=np.uint8)
        scode = np.empty((rows, geo.n_blocks), dtype=np.uint8)
        rule_code = {"floor": 0, "rceil": 1, "even": 2}.get(rule, 0)
        sums = _native.quantize(
            xs, _NATIVE_DTYPES[xs.dtype], rows, k, sch.block_size, 0 if sch is schemes.NVFP4 else 1,
            rule_code, float(tensor_scale) if tensor_scale is not None else 0.0, packed, scode, want_stats,
        )
    else:
        padded = np.zeros((rows, geo.padded_k), dtype=np.float32)
        padded[:, :k] = xf.reshape(rows, k)
        packed, scode = schemes.quantize_blocks(padded, sch, rule, tensor_scale)

    packed = packed.reshape(geo.codes_shape)
    scode = scode.reshape(geo.linear_scales_shape)
    if scale_layout == "swizzled":
        scode = layout.swizzle_scales(scode)
    qt = QTensor(
        scheme=sch.name,
        shape=geo.shape,
        codes=packed,
        scales=scode.view(dtypes.numpy_dtype(sch.scale_dtype)),
        tensor_scale=tensor_scale,
        axis=geo.axis,
        dtype=src_dtype,
        scale_layout=scale_layout,
        scale_rule=rule,
    )
    if not want_stats:
        return qt, None
    if not use_native:
        xd = xs.astype(np.float64).reshape(-1)
        err = xd - layout.to_storage_order(dequantize(qt, name=name), geo.axis).astype(np.float64).reshape(-1)
        sums = (float(xd @ xd), float(err @ err), float(np.abs(err).max(initial=0.0)))
    return qt, ErrorStats(geo.rows * k, *sums)


def check_scales(qt: QTensor, *, name: str | None = None, file=None) -> None:
    """Raise FormatError if a block scale is a code the spec forbids (NaN, negative E4M3)."""
    codes = qt.scale_codes()
    if qt.scheme == "mxfp4":
        bad = np.flatnonzero(codes.reshape(-1) == 0xFF)
        what = "E8M0 scale 0xFF (NaN) is not allowed"
    else:
        bad = np.flatnonzero((codes.reshape(-1) & 0x80) | ((codes.reshape(-1) & 0x7F) == 0x7F))
        what = "E4M3 block scales must be non-negative and not NaN"
    if bad.size:
        idx = [int(i) for i in np.unravel_index(int(bad[0]), codes.shape)]
        raise FormatError(f"{what}; found 0x{int(codes.reshape(-1)[bad[0]]):02X} at block {idx}", file=file, tensor=name)


def dequantize(qt: QTensor, *, name: str | None = None, file=None, implementation: str = "auto") -> np.ndarray:
    """Decode a QTensor to a float32 array of its logical shape (§5.3).

    ``implementation``: "auto" (the C accelerator when built), "native" or "reference" (numpy); both give the
    same bits. Raises FormatError if a scale is NaN or the decoded values do not fit in float32.
    """
    if implementation not in IMPLEMENTATIONS:
        raise FormatError(f"implementation must be one of {IMPLEMENTATIONS}", file=file, tensor=name)
    if implementation == "native" and _native is None:
        raise FormatError("the native accelerator is not available", file=file, tensor=name)
    check_scales(qt, name=name, file=file)
    geo = qt.geometry
    if geo.rows == 0 or geo.k == 0:  # no element to decode (and reshape(rows, 0, -1) is ambiguous)
        return np.zeros(geo.shape, dtype=np.float32)
    sch = schemes.SCHEMES[qt.scheme]
    rows = geo.rows
    packed = qt.codes.reshape(rows, geo.padded_k // 2)
    scode = qt.scale_codes().reshape(rows, geo.n_blocks)
    # the largest factor: E4M3 and E8M0 factors grow with the (non-negative) scale code
    max_factor = float(schemes.block_factors(scode.max(initial=0).reshape(1, 1), sch, qt.tensor_scale)[0, 0])
    if _native is not None and implementation != "reference":
        out = np.empty((rows, geo.k), dtype=np.float32)
        _native.dequantize(np.ascontiguousarray(packed), np.ascontiguousarray(scode), rows, geo.padded_k, geo.k,
                           sch.block_size, 0 if sch is schemes.NVFP4 else 1,
                           float(qt.tensor_scale) if qt.tensor_scale is not None else 0.0, out)
    else:
        factors = schemes.block_factors(scode, sch, qt.tensor_scale)
        out = schemes.dequantize_blocks(packed, factors)[:, : geo.k]
    if max_factor * codec.E2M1_MAX >= float(np.finfo(np.float32).max) and not np.isfinite(out).all():
        raise FormatError("decoded values overflow float32 (scale too large)", file=file, tensor=name)
    out = out.reshape(geo.storage_shape)
    return np.ascontiguousarray(layout.from_storage_order(out, geo.axis))
