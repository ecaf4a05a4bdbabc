"""FP8 source checkpoints: recognise the convention and dequantize FP8 weights exactly.

Three conventions are read (docs: formats-reference §9):

* ``"deepseek"`` (DeepSeek-V3, Qwen3-FP8): ``quantization_config = {"quant_method": "fp8", "fmt": "e4m3",
  "weight_block_size": [128, 128], ...}``; ``<mod>.weight`` F8_E4M3 with ``<mod>.weight_scale_inv`` (F32 or BF16,
  ``[ceil(out/128), ceil(in/128)]``). Despite the name the scale MULTIPLIES. ``"scale_fmt": "ue8m0"`` promises
  power-of-two scales, which is checked.
* ``"compressed-tensors"``: ``quant_method "compressed-tensors"``, format ``float-quantized`` or
  ``naive-quantized``; ``<mod>.weight_scale`` per tensor ``[1]``, per channel ``[out, 1]`` or per block
  ``[ceil(out/b0), ceil(in/b1)]``, in the model dtype (BF16) or F32.
* ``"modelopt"``: ``quant_method "modelopt"`` / ``hf_quant_config.json`` with ``quant_algo "FP8"`` (per tensor,
  0-dim F32 ``weight_scale``) or ``"FP8_PER_CHANNEL_PER_TOKEN"`` (``[out]``).

Every convention dequantizes as ``w = q * s``. :meth:`FP8Source.dequantize` returns float32 values, each the
exact product (computed in float64, where an E4M3 or E5M2 value times an F32/BF16/F16/E8M0 scale is exact)
rounded once to float32 (round to nearest even).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import ml_dtypes
import numpy as np

from .. import dtypes
from ..errors import FP4FmtError, QuantizationError

CONVENTIONS = ("deepseek", "compressed-tensors", "modelopt")

# safetensors dtypes of FP8 element types a weight may have, and the ones this module dequantizes.
FP8_DTYPES = ("F8_E4M3", "F8_E5M2", "F8_E4M3FNUZ", "F8_E5M2FNUZ")
_FMT_DTYPE = {"e4m3": "F8_E4M3", "e5m2": "F8_E5M2"}

# Scale dtypes accepted, by their numpy dtype (all convert exactly to float64).
SCALE_DTYPES = ("F32", "BF16", "F16", "F64", "F8_E8M0")
_SCALE_NP = {np.dtype(dtypes.numpy_dtype(n)): n for n in SCALE_DTYPES}

# The last name component of a scale-like tensor (never an FP8 weight even when stored as F8).
_SCALE_LIKE = re.compile(r"scale(_inv|_2)?$")

# Auxiliary tensors of FP8 checkpoints that a weight-only FP4 output has no use for: last name component -> reason.
_AUX_RULES = (
    (re.compile(r"(^|_)input_scale$"), "static FP8 activation scale (input_scale); not used by weight-only FP4 output"),
    (re.compile(r"(^|_)output_scale$"), "static FP8 output-activation scale; not used by weight-only FP4 output"),
    (re.compile(r"^(k|v|q|kv|prob)_scale$"), "FP8 attention / KV-cache scale; not used by weight-only FP4 output"),
)

_CHUNK_ELEMENTS = 1 << 22  # elements dequantized per step (bounds the float64 temporaries to ~32 MiB)

# E4M3FN and E5M2 code -> float64 value (exact), indexed by the stored byte.
_DECODE = {
    np.dtype(ml_dtypes.float8_e4m3fn): np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float64),
    np.dtype(ml_dtypes.float8_e5m2): np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e5m2).astype(np.float64),
}


@dataclass(frozen=True)
class FP8Source:
    """How the FP8 weights of one checkpoint are stored and turned back into float32.

    ``kinds`` are the scale granularities the checkpoint's config declares (``"tensor"``, ``"channel"``,
    ``"block"``); a scale is accepted only in the shape of one of them. Left out, it is ``{"block"}`` when
    ``block`` is given and ``{"tensor", "channel"}`` otherwise. ``weight_dtype`` is the safetensors
    dtype the config declares for the FP8 weights; ``scale_fmt`` is ``"ue8m0"`` when scales must be powers of two.
    """

    convention: str
    block: tuple[int, int] | None
    kinds: frozenset[str] | None = None
    weight_dtype: str = "F8_E4M3"
    scale_fmt: str | None = None

    def __post_init__(self) -> None:
        if self.kinds is None:
            object.__setattr__(self, "kinds", frozenset({"block"} if self.block else {"tensor", "channel"}))
        if self.convention not in CONVENTIONS:
            raise ValueError(f"unknown FP8 convention {self.convention!r}; expected one of {', '.join(CONVENTIONS)}")
        if ("block" in self.kinds) != (self.block is not None):
            raise ValueError("block must be given exactly when block scaling is one of the kinds")

    # -- names ---------------------------------------------------------------------------------------------
    def scale_name(self, weight_name: str) -> str:
        """Name of the scale tensor of FP8 weight ``weight_name`` in this convention."""
        if self.convention == "deepseek":
            return weight_name + "_scale_inv"
        if self.convention == "modelopt" and weight_name.rsplit(".", 1)[-1] != "weight":
            return weight_name + "_weight_scale"  # modelopt prefixes the names of weights not called "weight"
        return weight_name + "_scale"

    def is_fp8_weight(self, name: str, dtype: str) -> bool:
        """True if stored tensor ``name`` of safetensors dtype ``dtype`` is an FP8 weight (not a scale)."""
        return is_fp8_weight(name, dtype)

    def auxiliary(self, name: str) -> str | None:
        """Why tensor ``name`` (not an FP8 weight) should be dropped from the output, or None to keep it.

        Dropped: activation scales (input/output), attention and KV-cache scales, and weight scales that
        are left over (the scale of an FP8 weight is consumed by :meth:`dequantize` instead).
        """
        last = name.rsplit(".", 1)[-1]
        for pattern, reason in _AUX_RULES:
            if pattern.search(last):
                return reason
        if self._is_weight_scale(name):
            return f"{self.convention} FP8 weight scale with no FP8 weight to apply it to"
        return None

    def _is_weight_scale(self, name: str) -> bool:
        last = name.rsplit(".", 1)[-1]
        if self.convention == "deepseek":
            return last.endswith("weight_scale_inv")
        return last.endswith("weight_scale")

    # -- numbers -------------------------------------------------------------------------------------------
    def dequantize(self, weight: np.ndarray, scale: np.ndarray, *, name: str | None = None) -> np.ndarray:
        """float32 values of FP8 ``weight`` ``[..., out, in]`` times its ``scale`` (see the module docstring).

        Raises QuantizationError (naming ``name``) for a weight of the wrong dtype or with NaN codes, a scale
        of an unknown dtype, of a shape that fits none of the declared granularities, with negative or
        non-finite values (or, for ``ue8m0``, values that are not powers of two), and for products that
        overflow float32.
        """
        weight = np.asarray(weight)
        scale = np.asarray(scale)
        self._check_weight_dtype(weight, name)
        s64 = self._scale_values(scale, name)
        kind = self._kind_of(weight.shape, scale.shape, name)
        if weight.size == 0:
            return np.zeros(weight.shape, np.float32)
        out_dim, in_dim = (weight.shape[-2], weight.shape[-1]) if weight.ndim >= 2 else (1, weight.shape[-1] if weight.ndim else 1)
        lead = weight.shape[:-2] if weight.ndim >= 2 else ()
        w3 = weight.reshape((-1, out_dim, in_dim))
        s3 = _scale_grid(s64, kind, lead, out_dim)
        lut = _DECODE[weight.dtype]
        result = np.empty(w3.shape, np.float32)
        rows = self._rows_per_chunk(kind, in_dim)
        with np.errstate(over="ignore"):  # an overflow is reported below, naming the tensor
            for b in range(w3.shape[0]):
                for r0 in range(0, out_dim, rows):
                    r1 = min(out_dim, r0 + rows)
                    w64 = lut[w3[b, r0:r1].view(np.uint8)]
                    result[b, r0:r1] = (w64 * self._expand(s3[b], kind, r0, r1, in_dim)).astype(np.float32)
        if not np.all(np.isfinite(result)):
            if not np.all(np.isfinite(lut[weight.view(np.uint8)])):
                raise QuantizationError("FP8 weight holds NaN or Inf codes", tensor=name)
            raise QuantizationError("the dequantized FP8 weight overflows float32 (scale too large)", tensor=name)
        return result.reshape(weight.shape)

    def _check_weight_dtype(self, weight: np.ndarray, name: str | None) -> None:
        try:
            st = dtypes.dtype_name(weight.dtype)
        except ValueError:
            st = str(weight.dtype)
        if st != self.weight_dtype:
            raise QuantizationError(
                f"FP8 weight has dtype {st}; the {self.convention} config declares {self.weight_dtype}", tensor=name
            )

    def _scale_values(self, scale: np.ndarray, name: str | None) -> np.ndarray:
        st = _SCALE_NP.get(scale.dtype.newbyteorder("<") if scale.dtype.byteorder == ">" else scale.dtype)
        if st is None:
            raise QuantizationError(
                f"scale of {self.convention} FP8 weight has dtype {scale.dtype}; expected one of {', '.join(SCALE_DTYPES)}",
                tensor=name,
            )
        s64 = scale.astype(np.float64)
        if not np.all(np.isfinite(s64)):
            raise QuantizationError("scale of FP8 weight holds NaN or Inf", tensor=name)
        if np.any(s64 < 0):
            raise QuantizationError(f"scale of FP8 weight is negative (min {float(s64.min())!r}); scales must be >= 0", tensor=name)
        if self.scale_fmt == "ue8m0":
            mant, _ = np.frexp(s64)
            if np.any(mant != 0.5):
                bad = float(s64[mant != 0.5].flat[0])
                raise QuantizationError(f"scale_fmt ue8m0 promises powers of two, but a scale is {bad!r}", tensor=name)
        return s64

    def _kind_of(self, wshape: tuple[int, ...], sshape: tuple[int, ...], name: str | None) -> str:
        """The declared granularity whose scale shape ``sshape`` is, for weight shape ``wshape``."""
        expected = {}
        for kind in ("tensor", "channel", "block"):
            if kind in self.kinds:
                shapes = _scale_shapes(kind, wshape, self.block)
                if sshape in shapes:
                    return kind
                expected[kind] = shapes
        wanted = "; ".join(f"{k}: {' or '.join(str(list(s)) for s in v)}" for k, v in expected.items()) or "none (weight must be 2-D)"
        raise QuantizationError(
            f"scale shape {list(sshape)} does not fit FP8 weight shape {list(wshape)} under the {self.convention} "
            f"convention (expected {wanted})",
            tensor=name,
        )

    def _rows_per_chunk(self, kind: str, in_dim: int) -> int:
        rows = max(1, _CHUNK_ELEMENTS // max(1, in_dim))
        if kind == "block":
            rows = max(self.block[0], rows - rows % self.block[0])
        return rows

    def _expand(self, s2: np.ndarray, kind: str, r0: int, r1: int, in_dim: int) -> np.ndarray:
        """Scales of rows ``r0:r1`` broadcastable to ``[r1 - r0, in_dim]`` (``s2`` as from ``_scale_grid``)."""
        if kind == "tensor":
            return s2
        if kind == "channel":
            return s2[r0:r1]
        b0, b1 = self.block
        rows = np.repeat(s2[r0 // b0 : -(-r1 // b0)], b0, axis=0)[r0 % b0 : r0 % b0 + (r1 - r0)]
        return np.repeat(rows, b1, axis=1)[:, :in_dim]


def _scale_shapes(kind: str, wshape: tuple[int, ...], block: tuple[int, int] | None) -> list[tuple[int, ...]]:
    """Accepted scale shapes of ``kind`` for a weight ``[..., out, in]`` (leading dims: stacked experts)."""
    if len(wshape) < 2:
        return [(), (1,)] if kind == "tensor" else []
    lead, out_dim, in_dim = tuple(wshape[:-2]), wshape[-2], wshape[-1]
    if kind == "tensor":
        shapes = [lead, lead + (1,), lead + (1, 1)]
        if lead:
            shapes += [(), (1,), (1, 1)]
        return shapes
    if kind == "channel":
        return [lead + (out_dim,), lead + (out_dim, 1)]
    return [lead + (-(-out_dim // block[0]), -(-in_dim // block[1]))]


def _scale_grid(s64: np.ndarray, kind: str, lead: tuple[int, ...], out_dim: int) -> np.ndarray:
    """Scales reshaped to ``[batch, 1, 1]`` (tensor), ``[batch, out, 1]`` (channel) or ``[batch, rb, cb]`` (block)."""
    batch = math.prod(lead)
    if kind == "tensor":
        return np.broadcast_to(s64.reshape(-1), (batch,)).reshape(batch, 1, 1) if s64.size != batch else s64.reshape(batch, 1, 1)
    if kind == "channel":
        return s64.reshape(batch, out_dim, 1)
    return s64.reshape((batch,) + s64.shape[-2:])


def is_fp8_weight(name: str, dtype: str) -> bool:
    """True for a stored tensor of an FP8 dtype whose name is not scale-like (``*scale``, ``*scale_inv``, ...)."""
    return dtype in FP8_DTYPES and not _SCALE_LIKE.search(name.rsplit(".", 1)[-1])


# ------------------------------------------------------------------------------------------------------------
# detection
# ------------------------------------------------------------------------------------------------------------
def detect_fp8(config: dict | None, hf_quant_config: dict | None, dtypes_by_name: dict[str, str]) -> FP8Source | None:
    """The FP8 convention of a checkpoint, or None if it stores no FP8 weight.

    ``config`` is config.json, ``hf_quant_config`` hf_quant_config.json (None when absent), ``dtypes_by_name``
    maps every stored tensor to its safetensors dtype. Raises FP4FmtError (naming config.json,
    hf_quant_config.json or the tensor) when FP8 weights are present but the convention is missing, unknown
    or unsupported, when a weight's dtype differs from the declared format, and when an FP8 weight has no
    scale tensor or its scale has an unusable dtype. Nothing is guessed from tensor names alone.
    """
    fp8 = sorted(n for n, d in dtypes_by_name.items() if is_fp8_weight(n, d))
    if not fp8:
        return None
    source = _source_from_configs(config, hf_quant_config, dtypes_by_name, fp8)
    for name in fp8:
        if dtypes_by_name[name] != source.weight_dtype:
            raise FP4FmtError(
                f"FP8 weight has dtype {dtypes_by_name[name]}, but the {source.convention} config declares "
                f"{source.weight_dtype}",
                tensor=name,
            )
        sname = source.scale_name(name)
        if sname not in dtypes_by_name:
            raise FP4FmtError(f"FP8 weight has no scale tensor {sname!r} ({source.convention} convention)", tensor=name)
        if dtypes_by_name[sname] not in SCALE_DTYPES:
            raise QuantizationError(
                f"scale tensor has dtype {dtypes_by_name[sname]}; expected one of {', '.join(SCALE_DTYPES)}", tensor=sname
            )
    return source


def _source_from_configs(config: dict | None, hq: dict | None, dtypes_by_name: dict[str, str], fp8: list[str]) -> FP8Source:
    qc = (config or {}).get("quantization_config")
    if qc is None and hq is None:
        scales = sorted(n for n, d in dtypes_by_name.items() if _SCALE_LIKE.search(n.rsplit(".", 1)[-1]))
        hint = f"; scale-like tensors: {', '.join(scales[:3])}" if scales else "; there are no scale tensors at all"
        raise FP4FmtError(
            f"{len(fp8)} FP8 tensors (e.g. {fp8[0]!r}) but config.json has no quantization_config and there is no "
            f"hf_quant_config.json, so the FP8 convention cannot be identified{hint}",
            file="config.json",
        )
    if qc is not None:
        if not isinstance(qc, dict):
            raise FP4FmtError("quantization_config must be a JSON object", file="config.json")
        method = qc.get("quant_method")
        if method == "fp8":
            return _deepseek(qc)
        if method == "compressed-tensors":
            return _compressed_tensors(qc)
        if method == "modelopt":
            return _modelopt(qc, hq)
        raise FP4FmtError(
            f"quantization_config.quant_method {method!r} is not an FP8 convention fp4fmt reads "
            "(expected 'fp8', 'compressed-tensors' or 'modelopt')",
            file="config.json",
        )
    return _modelopt(None, hq)


def _deepseek(qc: dict) -> FP8Source:
    fmt = qc.get("fmt", "e4m3")
    if fmt not in _FMT_DTYPE:
        raise FP4FmtError(f"quantization_config.fmt {fmt!r} is not e4m3 or e5m2", file="config.json")
    block = qc.get("weight_block_size")
    if block is None:
        raise FP4FmtError(
            "quant_method 'fp8' without weight_block_size (per-tensor FP8 with weight_scale) is not supported; "
            "only block-scaled weight_scale_inv checkpoints are",
            file="config.json",
        )
    block = _block(block, "quantization_config.weight_block_size")
    scale_fmt = qc.get("scale_fmt")
    if scale_fmt not in (None, "float", "ue8m0"):
        raise FP4FmtError(f"quantization_config.scale_fmt {scale_fmt!r} is not 'float' or 'ue8m0'", file="config.json")
    return FP8Source("deepseek", block, frozenset({"block"}), _FMT_DTYPE[fmt], "ue8m0" if scale_fmt == "ue8m0" else None)


def _block(value, field: str, file: str = "config.json") -> tuple[int, int]:
    if isinstance(value, str) and re.fullmatch(r"\d+x\d+", value):
        value = [int(v) for v in value.split("x")]
    if not (isinstance(value, (list, tuple)) and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
        raise FP4FmtError(f"{field} must be two positive integers, got {value!r}", file=file)
    return int(value[0]), int(value[1])


_CT_FP8_FORMATS = ("float-quantized", "naive-quantized")


def _compressed_tensors(qc: dict) -> FP8Source:
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise FP4FmtError("compressed-tensors quantization_config has no config_groups", file="config.json")
    kinds: set[str] = set()
    blocks: set[tuple[int, int]] = set()
    for gname, group in groups.items():
        w = (group or {}).get("weights") if isinstance(group, dict) else None
        if not isinstance(w, dict) or w.get("num_bits") != 8 or w.get("type") != "float":
            continue  # not an FP8 weight group (e.g. unquantized or a 4-bit group of a mixed checkpoint)
        fmt = group.get("format") or qc.get("format")
        where = f"quantization_config.config_groups.{gname}"
        if fmt not in _CT_FP8_FORMATS:
            raise FP4FmtError(
                f"{where}: FP8 weights in format {fmt!r} are not supported (expected {' or '.join(_CT_FP8_FORMATS)})",
                file="config.json",
            )
        if w.get("dynamic"):
            raise FP4FmtError(f"{where}: dynamic weight quantization stores no weight scale", file="config.json")
        strategy = w.get("strategy") or ("group" if w.get("group_size") else "tensor")
        if strategy == "block":
            blocks.add(_block(w.get("block_structure"), f"{where}.weights.block_structure"))
        elif strategy not in ("tensor", "channel"):
            raise FP4FmtError(
                f"{where}: FP8 weight strategy {strategy!r} is not supported (expected tensor, channel or block)",
                file="config.json",
            )
        kinds.add(strategy)
    if not kinds:
        raise FP4FmtError("compressed-tensors quantization_config declares no FP8 weight group "
                          "(weights num_bits 8, type float)", file="config.json")
    if len(blocks) > 1:
        raise FP4FmtError(f"config groups declare different FP8 block structures {sorted(blocks)}", file="config.json")
    return FP8Source("compressed-tensors", blocks.pop() if blocks else None, frozenset(kinds))


_MODELOPT_KINDS = {"FP8": "tensor", "FP8_PER_CHANNEL_PER_TOKEN": "channel"}


def _modelopt(qc: dict | None, hq: dict | None) -> FP8Source:
    algo_cfg = qc.get("quant_algo") if qc else None
    layers = (qc or {}).get("quantized_layers")
    algo_hq = None
    if hq is not None:
        q = hq.get("quantization") if isinstance(hq, dict) else None
        if not isinstance(q, dict):
            raise FP4FmtError("hf_quant_config.json has no 'quantization' object", file="hf_quant_config.json")
        algo_hq = q.get("quant_algo")
        layers = layers or q.get("quantized_layers")
    if algo_cfg is not None and algo_hq is not None and algo_cfg != algo_hq:
        raise FP4FmtError(f"config.json says quant_algo {algo_cfg!r} but hf_quant_config.json says {algo_hq!r}",
                          file="hf_quant_config.json")
    algo = algo_cfg or algo_hq
    file = "hf_quant_config.json" if algo_cfg is None and hq is not None else "config.json"
    if algo == "MIXED_PRECISION":
        algos = {cfg.get("quant_algo") for cfg in (layers or {}).values() if isinstance(cfg, dict)}
        unknown = sorted(str(a) for a in algos if a not in _MODELOPT_KINDS)
        if not algos or unknown:
            raise FP4FmtError(f"modelopt MIXED_PRECISION with per-layer algorithms {unknown or 'none'}: only FP8 and "
                              "FP8_PER_CHANNEL_PER_TOKEN layers are read as FP8 sources", file=file)
        return FP8Source("modelopt", None, frozenset(_MODELOPT_KINDS[a] for a in algos))
    if algo not in _MODELOPT_KINDS:
        raise FP4FmtError(f"modelopt quant_algo {algo!r} is not an FP8 weight format fp4fmt reads "
                          f"(expected {' or '.join(_MODELOPT_KINDS)})", file=file)
    return FP8Source("modelopt", None, frozenset({_MODELOPT_KINDS[algo]}))
