"""compressed-tensors interop (spec §8.1): export an fp4fmt checkpoint as ``nvfp4-pack-quantized`` or
``mxfp4-pack-quantized`` (the layout vLLM, SGLang and transformers load), and import such checkpoints.

**What the export writes.** One safetensors shard per fp4fmt shard, same file names. For each quantized
tensor ``<mod>.weight`` (2-D ``[out, in]``, blocked along ``in``, no padding):

* ``<mod>.weight_packed`` U8 ``[out, in/2]``: the bytes of ``NAME.codes``, unchanged (both put element
  ``2i`` in the low nibble; code 0x8 is -0 in both, and compressed-tensors' unpacker keeps the sign);
* ``<mod>.weight_scale``: the bytes of ``NAME.scales`` in the linear layout (a swizzled fp4fmt tensor is
  unswizzled), F8_E4M3 ``[out, in/16]`` for NVFP4, U8 biased E8M0 ``[out, in/32]`` for MXFP4. An all-zero
  NVFP4 block keeps fp4fmt's scale 0x00 (compressed-tensors' own compressor writes 0x20 = 0.125; both
  decode to zeros, signed as the codes say);
* NVFP4 only: ``<mod>.weight_global_scale`` F32 ``[1]``, the *encode-direction* global scale ``gs``
  (compressed-tensors divides: ``w = q * fl32(e4m3 / gs)``; fp4fmt multiplies: ``w = q * fl32(e4m3 * s2)``).

Plain tensors are copied unchanged. ``config.json`` gets a compressed-tensors ``quantization_config``
(one group, targets ``["Linear"]``, the NVFP4A16 / MXFP4A16 weight arguments, ``format``,
``quantization_status: "compressed"``, ``ignore`` = every module whose weight stayed plain, plus
``lm_head`` when it is tied to the embeddings), so compressed-tensors' loader and transformers accept it.

**The global scale, exactly.** ``gs = fl32(1 / s2)`` is not exact in general, and no float32 ``gs`` gives
``fl32(e / gs) = fl32(e * s2)`` for every E4M3 ``e`` except for about one ``s2`` in five. The export
therefore picks, among the float32 values within 8 ulps of ``fl32(1/s2)``, the one that ranks first by:

1. *bf16-exact*: compressed-tensors' decompressor (which always produces bfloat16: ``bf16(fl32(q *
   fl32(e / gs)))``) gives exactly ``bf16(fp4fmt.dequantize)`` — counted over every (block scale, element)
   pair of the code space, or, when no candidate is exact on all of them (or the only exact ones lose a
   possible round trip), over the pairs the tensors sharing this ``s2`` actually use;
2. *round trip*: ``fl32(1 / gs) == s2``, so that vLLM and SGLang, which invert ``gs`` and multiply
   (vLLM's NVFP4A16 Marlin path: ``weight_scale_2 = 1 / weight_global_scale``), use exactly ``s2``. No
   ``gs`` does this for about 17% of float32 values: the float32 reciprocal is not onto;
3. *f32-exact*: ``fl32(q * fl32(e / gs)) == fl32(q * fl32(e * s2))`` on the pairs checked (compressed-tensors'
   own dequantize called in float32);
4. the fewest ulps from ``fl32(1 / s2)``.

``gs`` depends on ``s2`` only (and on the pairs of the tensors that share it, in the fallback of 1), so
fused shards that share ``s2`` share ``gs``. The export report records, per tensor, which properties hold
on the pairs it uses. Where 1 fails — seen only for an ``s2`` with no float32 reciprocal and few
significant bits, e.g. ``s2 = 7 * 2^-13`` from a BF16 amax of 2.296875 (one BF16 mantissa in 128) — no
``gs`` near ``1/s2`` helps: some fp4fmt values ``q * e * s2`` are exact bfloat16 midpoints, and
compressed-tensors' factor, one float32 ulp off, rounds them the other way (those elements differ by one
bfloat16 ulp; the export warns).

**Lossless round trip.** Each shard's safetensors metadata (which loaders ignore) carries, under
``"fp4fmt_export"``, the fp4fmt descriptor fields compressed-tensors has no place for (source dtype,
scale rule, quantizer, scale layout), the exact ``s2`` bits, the ``gs`` bits written, the checksums of
the parts, the fp4fmt shard's own metadata and the fp4fmt ``quantization_config``. The import uses a
tensor's record only when the codes, scales and ``gs`` in the file still match it, so
``import(export(x))`` reproduces ``x`` byte for byte (shards, config.json, index, side files).

**Importing other compressed-tensors checkpoints** (e.g. written by compressed-tensors' own compressor):
codes and block scales are copied (an invalid code — negative or NaN E4M3, E8M0 0xFF — is an error); the
tensor scale is chosen among the float32 values within 8 ulps of ``fl32(1/gs)`` to make fp4fmt's decoding
equal compressed-tensors' own: first in float32 on the pairs the tensor uses, else in bfloat16 (the
decompressor's output), else the nearest to ``fl32(1/gs)``; the report says which held. MXFP4 values
are always exact. ``scale_rule`` is ``"even"`` for MXFP4 (compressed-tensors' rule), ``quantizer`` is
``"compressed-tensors"``, ``dtype`` the config's. ``input_global_scale`` (W4A4) is kept as a plain tensor.
The fp4fmt shard metadata keeps each such tensor's ``gs`` (``"fp4fmt_compressed_tensors_import"``), and
an export writes it back while the tensor scale is unchanged, so compressed-tensors -> fp4fmt ->
compressed-tensors gives back the same tensors.
Asymmetric weights, other formats (FP8, INT), sparsity, transforms and KV-cache quantization are refused.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import ml_dtypes
import numpy as np

from ... import __version__, codec, container, descriptor, dtypes, layout, schemes
from ...errors import FormatError, FP4FmtError
from ...files import StreamingWriter, safe_open
from ...qtensor import QTensor, check_scales
from ..plan import fused_group
from ..source import INDEX_NAME, SourceCheckpoint
from .common import FP4Checkpoint, OutputDir, index_json, open_fp4_checkpoint

FORMAT = "compressed-tensors"
QUANT_METHOD = "compressed-tensors"
NVFP4_FORMAT = "nvfp4-pack-quantized"
MXFP4_FORMAT = "mxfp4-pack-quantized"
FORMAT_OF_SCHEME = {"nvfp4": NVFP4_FORMAT, "mxfp4": MXFP4_FORMAT}
SCHEME_OF_FORMAT = {v: k for k, v in FORMAT_OF_SCHEME.items()}
#: compressed-tensors release whose on-disk layout the export follows (written as ``version``)
CT_LAYOUT_VERSION = "0.20.1"
#: key of the safetensors metadata entry that carries what compressed-tensors has no place for
METADATA_KEY = "fp4fmt_export"
METADATA_VERSION = 1
#: key of the fp4fmt shard metadata in which an import keeps the global scales of foreign tensors, so that
#: exporting the imported checkpoint writes them back unchanged
IMPORT_METADATA_KEY = "fp4fmt_compressed_tensors_import"
#: float32 ulps around the naive reciprocal searched for the best global / tensor scale
SEARCH_ULPS = 8
FOREIGN_QUANTIZER = "compressed-tensors"

PACKED, SCALE, GLOBAL_SCALE = "weight_packed", "weight_scale", "weight_global_scale"
ZERO_POINT, SHAPE, INPUT_GLOBAL_SCALE = "weight_zero_point", "weight_shape", "input_global_scale"

Progress = Callable[[str, int, int], None] | None

# ------------------------------------------------------------------------------------------------------
# numerics of the global scale

_F32 = np.float32
_E4M3 = codec.E4M3_VALUES.astype(_F32)  # value of each code; NaN for 0x7F / 0xFF
_MAGS = np.abs(codec.E2M1_VALUES[:8]).astype(_F32)  # E2M1 magnitude of each 3-bit magnitude code
_VALID_E4M3 = np.zeros(256, bool)
_VALID_E4M3[1:0x7F] = True  # positive, finite, non-zero scales: the only ones whose factor can disagree


def _all_pairs() -> np.ndarray:
    m = np.zeros((256, 8), bool)
    m[1:0x7F, 1:] = True
    return m


ALL_PAIRS = _all_pairs()
ALL_PAIRS.setflags(write=False)


@dataclass(frozen=True)
class ScaleMapping:
    """How an NVFP4 tensor scale ``s2`` (decode direction) and a compressed-tensors global scale ``gs``
    (encode direction) correspond, and which exactness properties hold on the pairs checked."""

    tensor_scale: float  # s2
    global_scale: float  # gs
    round_trip: bool  # fl32(1 / gs) == s2
    bf16_exact: bool  # bf16(fl32(q * fl32(e / gs))) == bf16(fl32(q * fl32(e * s2)))
    f32_exact: bool  # fl32(q * fl32(e / gs)) == fl32(q * fl32(e * s2))
    pairs: str  # "all" (every E4M3 x E2M1 pair) or "used" (the pairs the tensor(s) use)


def _neighbours(x: np.float32, n: int = SEARCH_ULPS) -> tuple[np.ndarray, np.ndarray]:
    """The positive finite float32 values within ``n`` ulps of ``x`` (x included), nearest first, and their
    offsets in ulps."""
    bits = int(np.array([x], _F32).view(np.int32)[0])
    offs = np.array(sorted(range(-n, n + 1), key=lambda o: (abs(o), o)), dtype=np.int64)
    offs = offs[(bits + offs > 0) & (bits + offs < 0x7F800000)]
    return (bits + offs).astype(np.int32).view(_F32), offs


def _mismatches(s2: np.ndarray, gs: np.ndarray, pairs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each (s2[i], gs[i]): how many of the (scale code, magnitude code) ``pairs`` decode differently in
    bfloat16 and in float32 (compressed-tensors: fl32(q * fl32(e / gs)); fp4fmt: fl32(q * fl32(e * s2)))."""
    codes, mags = np.nonzero(pairs & _VALID_E4M3[:, None] & (np.arange(8) > 0)[None, :])
    e, q = _E4M3[codes][None, :], _MAGS[mags][None, :]
    s2, gs = np.asarray(s2, _F32)[:, None], np.asarray(gs, _F32)[:, None]
    with np.errstate(all="ignore"):
        ct = (q * (e / gs).astype(_F32)).astype(_F32)
        ours = (q * (e * s2).astype(_F32)).astype(_F32)
    f32 = np.sum(ct.view(np.uint32) != ours.view(np.uint32), axis=1)
    bf16 = ml_dtypes.bfloat16
    bf = np.sum(ct.astype(bf16).view(np.uint16) != ours.astype(bf16).view(np.uint16), axis=1)
    return bf, f32


def _agreement(s2: np.ndarray, gs: np.ndarray, pairs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(bf16-exact, f32-exact) for each (s2[i], gs[i]) over ``pairs`` (see :func:`_mismatches`)."""
    bf, f32 = _mismatches(s2, gs, pairs)
    return bf == 0, f32 == 0


def _recip(x: np.float32) -> np.float32:
    with np.errstate(all="ignore"):
        return _F32(_F32(1) / _F32(x))


def _finite_positive(x) -> bool:
    return bool(np.isfinite(x) and x > 0)


def global_scale_for(s2: float, pairs: np.ndarray | None = None) -> ScaleMapping:
    """The compressed-tensors global scale written for tensor scale ``s2`` (ranking in the module doc).
    ``pairs`` (bool ``[256, 8]``: scale code x magnitude code) restricts the checks; default: all pairs."""
    s2 = _F32(s2)
    if not _finite_positive(s2):
        raise ValueError(f"tensor scale {float(s2)!r} is not a finite positive float32")
    center = _recip(s2)
    if not _finite_positive(center):
        raise ValueError(f"tensor scale {float(s2)!r} has no finite float32 reciprocal (compressed-tensors stores "
                         "the reciprocal)")
    cand, offs = _neighbours(center)
    mask = ALL_PAIRS if pairs is None else pairs
    bf, f32 = _mismatches(np.full(cand.shape, s2), cand, mask)
    rt = np.array([_recip(g) == s2 for g in cand])
    i = min(range(len(cand)), key=lambda j: (int(bf[j]), not rt[j], int(f32[j]) > 0, abs(int(offs[j]))))
    return ScaleMapping(float(s2), float(cand[i]), bool(rt[i]), bool(bf[i] == 0), bool(f32[i] == 0),
                        "all" if pairs is None else "used")


def round_trip_exists(s2: float) -> bool:
    """Whether some float32 ``gs`` has fl32(1 / gs) == s2 (false for about 17% of float32 values: the
    float32 reciprocal is not onto)."""
    s2 = _F32(s2)
    return any(_recip(g) == s2 for g in _neighbours(_recip(s2), 2)[0])


EXACT_SCALE_SEARCH_ULPS = 4096


def exact_tensor_scale(s2: float) -> np.float32:
    """For writers that target compressed-tensors (``fp4fmt convert --tensor-scale compressed-tensors``): the
    smallest float32 ``t >= s2``, within 4096 ulps, for which some global scale ``gs`` gives
    ``fl32(e / gs) == fl32(e * t)`` for every E4M3 code ``e`` and also ``fl32(1 / gs) == t`` (so the
    decompressed weights equal fp4fmt's bit for bit, whatever the codes); failing the second condition,
    the first alone; failing both, ``s2``. A larger tensor scale only makes block scales smaller, so no
    block can overflow (§5.1)."""
    s2 = _F32(s2)
    if not _finite_positive(s2):
        raise ValueError(f"tensor scale {float(s2)!r} is not a finite positive float32")
    bits = int(np.array([s2], _F32).view(np.int32)[0])
    fallback = None
    for n in range(EXACT_SCALE_SEARCH_ULPS + 1):
        if bits + n >= 0x7F800000:
            break
        t = np.array([bits + n], np.int32).view(_F32)[0]
        m = global_scale_for(t)
        if m.f32_exact and m.round_trip:
            return t
        if m.f32_exact and fallback is None:
            fallback = t
    return fallback if fallback is not None else s2


def tensor_scale_for(gs: float, pairs: np.ndarray) -> ScaleMapping:
    """The fp4fmt tensor scale for a compressed-tensors global scale ``gs``: the float32 within 8 ulps of
    fl32(1/gs) whose decoding equals compressed-tensors' on ``pairs`` in float32, else in bfloat16, else
    the nearest to fl32(1/gs)."""
    gs = _F32(gs)
    if not _finite_positive(gs):
        raise ValueError(f"global scale {float(gs)!r} is not a finite positive float32")
    center = _recip(gs)
    if not _finite_positive(center):
        raise ValueError(f"global scale {float(gs)!r} has no finite positive float32 reciprocal")
    cand, offs = _neighbours(center)
    bf, f32 = _mismatches(cand, np.full(cand.shape, gs), pairs)
    i = min(range(len(cand)), key=lambda j: (int(f32[j]) > 0, int(bf[j]), abs(int(offs[j]))))
    return ScaleMapping(float(cand[i]), float(gs), bool(_recip(gs) == cand[i]), bool(bf[i] == 0), bool(f32[i] == 0),
                        "used")


def used_pairs(codes: np.ndarray, scale_codes: np.ndarray, block_size: int, rows_per_chunk: int = 8192) -> np.ndarray:
    """bool ``[256, 8]``: which (block scale code, E2M1 magnitude code) pairs occur in a 2-D tensor of
    packed ``codes [rows, k/2]`` and linear ``scale_codes [rows, k/block_size]``."""
    out = np.zeros((256, 8), bool)
    rows = codes.shape[0]
    nb = scale_codes.shape[-1]
    shifts = np.arange(8, dtype=np.uint16)
    for r0 in range(0, rows, rows_per_chunk):
        c = np.asarray(codes[r0:r0 + rows_per_chunk])
        one = np.uint8(1)
        bits = np.left_shift(one, c & 7) | np.left_shift(one, (c >> 4) & 7)
        per_block = np.bitwise_or.reduce(bits.reshape(c.shape[0], nb, block_size // 2), axis=2)
        key = (np.asarray(scale_codes[r0:r0 + rows_per_chunk]).astype(np.uint16) << 8) | per_block
        present = np.flatnonzero(np.bincount(key.reshape(-1), minlength=1 << 16)).astype(np.uint16)
        if present.size:
            mags = ((present[:, None] & 0xFF) >> shifts[None, :]) & 1
            np.logical_or.at(out, present >> 8, mags.astype(bool))
    return out


# ------------------------------------------------------------------------------------------------------
# reports


@dataclass(frozen=True)
class TensorReport:
    """One quantized tensor moved between the formats."""

    name: str
    scheme: str
    shape: tuple[int, ...]
    mapping: ScaleMapping | None = None  # NVFP4 only
    restored: bool = False  # import: descriptor fields and tensor scale taken from the export record


@dataclass(frozen=True)
class ExportReport:
    """What :func:`export_checkpoint` wrote: shard names, the quantized tensors (with, for NVFP4, the
    global-scale mapping and its exactness on the pairs each tensor uses), the plain tensors, the
    compressed-tensors ignore list, and warnings (inexact tensors, fused groups with unequal scales)."""

    dst: Path
    scheme: str
    shards: tuple[str, ...]
    tensors: dict[str, TensorReport]
    plain: tuple[str, ...]
    ignore: tuple[str, ...]
    warnings: tuple[str, ...] = ()

    def count(self, prop: str) -> int:
        """How many NVFP4 tensors have ``prop`` (``round_trip``, ``bf16_exact``, ``f32_exact``) on the
        pairs they use."""
        return sum(1 for t in self.tensors.values() if t.mapping is not None and getattr(t.mapping, prop))


@dataclass(frozen=True)
class ImportReport:
    """What :func:`import_checkpoint` wrote: shard names, the quantized tensors (``restored`` when taken
    from an fp4fmt export record; for NVFP4 the mapping chosen and its exactness), the plain tensors,
    and warnings."""

    dst: Path
    scheme: str
    shards: tuple[str, ...]
    tensors: dict[str, TensorReport]
    plain: tuple[str, ...]
    warnings: tuple[str, ...] = ()

    @property
    def restored(self) -> int:
        return sum(1 for t in self.tensors.values() if t.restored)


# ------------------------------------------------------------------------------------------------------
# small helpers


def _f32_hex(x: float) -> str:
    return f"0x{int(np.array([x], _F32).view(np.uint32)[0]):08x}"


def _f32_from_hex(s: str) -> np.float32:
    v = int(s, 16)
    if not 0 <= v <= 0xFFFFFFFF:
        raise ValueError(s)
    return np.array([v], np.uint32).view(_F32)[0]


def _check_paths(src: Path, dst: Path) -> None:
    s, d = src.resolve(), dst.resolve()
    if s == d or d in s.parents or s in d.parents:
        raise FP4FmtError("the destination must not be, contain or lie inside the source directory", file=dst)


def _linear_scale_codes(f: safe_open, td: descriptor.TensorDescriptor) -> np.ndarray:
    """uint8 block scale codes ``[out, nb]`` of a stored 2-D tensor, in the linear layout."""
    raw = f.get_raw(td.part_names()["scales"]).view(np.uint8)
    if td.scale_layout == "linear":
        return raw
    geo = td.geometry
    return layout.unswizzle_scales(raw, geo.storage_shape[-2], geo.n_blocks)


def _write_safetensors(path: Path, tensors: list[tuple[str, str, tuple[int, ...], Callable[[], np.ndarray]]],
                       metadata: dict[str, str]) -> int:
    """Write a plain safetensors file (canonical order: larger items first, then by name); each tensor's
    data is produced when its turn comes, so one tensor at a time is in memory. Returns the data bytes."""
    slots = [container.Slot(n, dt, tuple(int(d) for d in shape)) for n, dt, shape, _ in tensors]
    make = {n: fn for n, _, _, fn in tensors}
    order = container.layout_order(slots)
    header = container.build_header(order, metadata)
    total = 0
    with open(path, "wb") as out:
        out.write(header)
        for sl in order:
            raw = np.ascontiguousarray(make[sl.name]()).reshape(-1).view(np.uint8)
            if raw.nbytes != sl.nbytes:
                raise FP4FmtError(f"internal: {raw.nbytes} bytes for a {sl.dtype} {list(sl.shape)} tensor",
                                  file=path, tensor=sl.name)
            out.write(memoryview(raw))
            total += raw.nbytes
    return total


def _shard_metadata(path: Path) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file (header only)."""
    return dict(container.read_header(path).metadata)


def _text_config(config: dict) -> dict:
    t = config.get("text_config")
    return t if isinstance(t, dict) else config


# ------------------------------------------------------------------------------------------------------
# export


def _ct_quantization_config(scheme: str, ignore: list[str]) -> dict:
    """The compressed-tensors ``quantization_config`` of a weight-only NVFP4 (NVFP4A16) or MXFP4
    (MXFP4A16) checkpoint, as compressed-tensors' ModelCompressor writes it."""
    fmt = FORMAT_OF_SCHEME[scheme]
    weights = {
        "num_bits": 4,
        "type": "float",
        "symmetric": True,
        "dynamic": False,
        "group_size": schemes.SCHEMES[scheme].block_size,
        "strategy": "tensor_group" if scheme == "nvfp4" else "group",
        "scale_dtype": "torch.float8_e4m3fn" if scheme == "nvfp4" else "torch.uint8",
    }
    return {
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                                      "output_activations": None, "format": fmt}},
        "format": fmt,
        "global_compression_ratio": None,
        "ignore": sorted(ignore),
        "kv_cache_scheme": None,
        "moe_sparsity_config": None,
        "quant_method": QUANT_METHOD,
        "quantization_status": "compressed",
        "sparsity_config": {},
        "transform_config": {},
        "version": CT_LAYOUT_VERSION,
    }


@dataclass(frozen=True)
class _ExportItem:
    """One fp4fmt logical tensor of a shard as the export sees it."""

    name: str
    td: descriptor.TensorDescriptor | None  # None: a plain tensor
    dtype: str  # plain tensors: stored dtype
    shape: tuple[int, ...]
    tensor_scale: float | None = None


def _export_plan(ck: FP4Checkpoint) -> tuple[dict[Path, list[_ExportItem]], str | None]:
    """Per shard, its logical tensors (checked: exportable to compressed-tensors), and the scheme."""
    plan: dict[Path, list[_ExportItem]] = {}
    found: set[str] = set()
    for shard in ck.shards:
        items = []
        with safe_open(shard) as f:
            for name in f.keys():
                td = f.tensor_descriptor(name)
                if td is None:
                    e = f.header.entries[name]
                    items.append(_ExportItem(name, None, e.dtype, tuple(e.shape)))
                    continue
                geo = td.geometry
                if not name.endswith(".weight"):
                    raise FP4FmtError("compressed-tensors stores quantized weights as <module>.weight_packed; "
                                      "this quantized tensor is not named <module>.weight", file=shard, tensor=name)
                if len(td.shape) != 2 or td.axis != 1:
                    raise FP4FmtError(f"compressed-tensors holds 2-D [out, in] weights blocked along in; this tensor "
                                      f"has shape {list(td.shape)} blocked along axis {td.axis}",
                                      file=shard, tensor=name)
                if geo.padding:
                    raise FP4FmtError(f"in_features {td.shape[1]} is not a multiple of the block size "
                                      f"{td.block_size}: compressed-tensors has no padded layout (spec §8.1)",
                                      file=shard, tensor=name)
                ts = None
                if td.scheme == "nvfp4":
                    ts = float(f.get_raw(td.part_names()["tensor_scale"])[()])
                items.append(_ExportItem(name, td, "U8", tuple(td.shape), ts))
                found.add(td.scheme)
        plan[shard] = items
    if len(found) > 1:
        raise FP4FmtError("the checkpoint mixes NVFP4 and MXFP4 tensors; a compressed-tensors checkpoint written "
                          "by this exporter has one format", file=ck.path)
    for items in plan.values():  # a plain tensor must not collide with a name the export creates
        for it in items:
            if it.td is None and any(it.name.endswith("." + s) for s in (PACKED, SCALE, GLOBAL_SCALE)):
                mod = it.name.rsplit(".", 1)[0]
                if any(o.td is not None and o.name == mod + ".weight" for its in plan.values() for o in its):
                    raise FP4FmtError("plain tensor collides with a compressed-tensors name of a quantized weight",
                                      file=ck.path, tensor=it.name)
    return plan, (found.pop() if found else None)


def _choose_global_scales(plan: dict[Path, list[_ExportItem]]) -> dict[float, ScaleMapping]:
    """The global scale of every distinct tensor scale: from all pairs, or (when that cannot be made
    bf16-exact, or costs a round trip that is possible) from the pairs its tensors use."""
    by_s2: dict[float, list[tuple[Path, _ExportItem]]] = {}
    for shard, items in plan.items():
        for it in items:
            if it.tensor_scale is not None:
                by_s2.setdefault(it.tensor_scale, []).append((shard, it))
    out: dict[float, ScaleMapping] = {}
    for s2, users in by_s2.items():
        try:
            m = global_scale_for(s2)
        except ValueError as e:
            shard, it = users[0]
            raise FP4FmtError(str(e), file=shard, tensor=it.name) from None
        if not m.bf16_exact or (not m.round_trip and round_trip_exists(s2)):
            pairs = np.zeros((256, 8), bool)
            for shard, it in users:
                with safe_open(shard) as f:
                    pairs |= used_pairs(f.get_raw(it.td.part_names()["codes"]), _linear_scale_codes(f, it.td),
                                        it.td.block_size)
            m = global_scale_for(s2, pairs)  # never worse on the pairs that matter
        out[s2] = m
    return out


def _imported_global_scales(f: safe_open, shard: Path) -> dict[str, ScaleMapping]:
    """The global scales an import from compressed-tensors recorded for this shard's tensors (only where
    the tensor scale is still the one the record names)."""
    raw = f.metadata().get(IMPORT_METADATA_KEY)
    out: dict[str, ScaleMapping] = {}
    if raw is None:
        return out
    try:
        recs = json.loads(raw)["global_scales"]
        for name, rec in recs.items():
            td = f.tensor_descriptor(name) if name in f.keys() else None
            if td is None or td.scheme != "nvfp4":
                continue
            s2 = _F32(f.get_raw(td.part_names()["tensor_scale"])[()])
            gs = _f32_from_hex(rec["global_scale"])
            if _f32_hex(s2) == rec["tensor_scale"] and _finite_positive(gs):
                out[name] = ScaleMapping(float(s2), float(gs), bool(_recip(gs) == s2), False, False, "used")
    except (ValueError, KeyError, TypeError, AttributeError):
        return {}
    return out


def _export_ignore(ck: FP4Checkpoint, plan: dict[Path, list[_ExportItem]]) -> list[str]:
    """Modules compressed-tensors must leave alone: those whose weight stayed plain (and the fp4fmt ignore
    list), plus a tied ``lm_head`` (a Linear with no tensor of its own)."""
    ignore = set(x for x in ck.quantization_config.get("ignore", []) if isinstance(x, str))
    quantized_modules = set()
    for items in plan.values():
        for it in items:
            if it.td is None and len(it.shape) >= 2 and it.dtype in dtypes.FLOAT_SOURCE_DTYPES:
                ignore.add(it.name.rsplit(".", 1)[0])
            elif it.td is not None:
                quantized_modules.add(it.name[: -len(".weight")])
    tied = ck.config.get("tie_word_embeddings", _text_config(ck.config).get("tie_word_embeddings"))
    if tied and "lm_head" not in quantized_modules:
        ignore.add("lm_head")
    return sorted(ignore - quantized_modules)


def export_checkpoint(src, dst, *, overwrite: bool = False, progress: Progress = None) -> ExportReport:
    """Write the fp4fmt checkpoint directory ``src`` (NVFP4 or MXFP4) as a compressed-tensors
    ``nvfp4-pack-quantized`` / ``mxfp4-pack-quantized`` checkpoint directory ``dst``. Codes and block
    scales are copied byte for byte; the NVFP4 global scale is chosen as the module doc says."""
    src, dst = Path(src), Path(dst)
    ck = open_fp4_checkpoint(src)
    _check_paths(src, dst)
    plan, scheme = _export_plan(ck)
    if scheme is None:
        raise FP4FmtError("no quantized tensor to export", file=src)
    mappings = _choose_global_scales(plan) if scheme == "nvfp4" else {}
    ignore = _export_ignore(ck, plan)
    total = sum(len(items) for items in plan.values())
    done = 0
    reports: dict[str, TensorReport] = {}
    plain: list[str] = []
    weight_map: dict[str, str] = {}
    total_bytes = 0
    warnings: list[str] = []
    with OutputDir(dst, overwrite) as out:
        for shard, items in plan.items():
            with safe_open(shard) as f:
                entries = []
                record: dict[str, dict] = {}
                imported = _imported_global_scales(f, shard)
                for it in items:
                    if it.td is None:
                        entries.append((it.name, it.dtype, it.shape, lambda n=it.name: f.get_tensor(n)))
                        plain.append(it.name)
                        continue
                    qt = f.get_tensor(it.name)
                    check_scales(qt, name=it.name, file=shard)
                    td, mod = it.td, it.name[: -len(".weight")]
                    parts = td.part_names()
                    lin = _linear_scale_codes(f, td)
                    out_f, in_f = td.shape
                    scale_dt = schemes.SCHEMES[td.scheme].scale_dtype
                    entries.append((f"{mod}.{PACKED}", "U8", (out_f, in_f // 2),
                                    lambda p=parts["codes"]: f.get_raw(p)))
                    entries.append((f"{mod}.{SCALE}", scale_dt, lin.shape, lambda a=lin: a))
                    rec = {"scheme": td.scheme, "dtype": td.dtype, "scale_layout": td.scale_layout,
                           "scale_rule": td.scale_rule, "quantizer": td.quantizer,
                           "codes_checksum": f.descriptor.checksums[parts["codes"]],
                           "scales_checksum": f.descriptor.checksums[parts["scales"]]}
                    mapping = None
                    if td.scheme == "nvfp4":
                        chosen = imported.get(it.name) or mappings[it.tensor_scale]
                        bf, f32 = _agreement(np.array([chosen.tensor_scale]), np.array([chosen.global_scale]),
                                             used_pairs(f.get_raw(parts["codes"]), lin, td.block_size))
                        mapping = ScaleMapping(chosen.tensor_scale, chosen.global_scale,
                                               bool(_recip(_F32(chosen.global_scale)) == _F32(chosen.tensor_scale)),
                                               bool(bf[0]), bool(f32[0]), "used")
                        gs = np.array([chosen.global_scale], dtype="<f4")
                        entries.append((f"{mod}.{GLOBAL_SCALE}", "F32", (1,), lambda a=gs: a))
                        rec["tensor_scale"] = _f32_hex(chosen.tensor_scale)
                        rec["global_scale"] = _f32_hex(chosen.global_scale)
                    record[it.name] = rec
                    reports[it.name] = TensorReport(it.name, td.scheme, td.shape, mapping)
                meta = {"format": "pt", METADATA_KEY: json.dumps({
                    "version": METADATA_VERSION,
                    "producer": {"name": "fp4fmt", "version": __version__},
                    "format_version": descriptor.FORMAT_VERSION,
                    "metadata": f.metadata(),
                    "quantization_config": ck.quantization_config,
                    "tensors": record,
                }, sort_keys=True, separators=(",", ":"), allow_nan=False)}
                total_bytes += _write_safetensors(out.file(shard.name), entries, meta)
                for n, *_ in entries:
                    weight_map[n] = shard.name
                done += len(items)
                if progress:
                    progress("exporting", done, total)
        if len(plan) > 1:
            out.write_json(INDEX_NAME, index_json(weight_map, total_bytes))
        out.copy_side_files(ck.side_files)
        cfg = dict(ck.config)
        cfg["quantization_config"] = _ct_quantization_config(scheme, ignore)
        out.write_json("config.json", cfg)
        if scheme == "nvfp4":
            bad_bf16 = [n for n, t in reports.items() if t.mapping and not t.mapping.bf16_exact]
            if bad_bf16:
                warnings.append(f"{len(bad_bf16)} tensor(s) decompress in compressed-tensors to bfloat16 values that "
                                f"differ from fp4fmt's in some element: {bad_bf16[:3]} (their tensor scale has no exact "
                                f"compressed-tensors global scale; `fp4fmt convert --tensor-scale compressed-tensors` "
                                f"writes tensor scales that have one)")
            groups: dict[str, set[float]] = {}
            for n, t in reports.items():
                g = fused_group(n)
                if g and t.mapping:
                    groups.setdefault(g, set()).add(t.mapping.global_scale)
            unequal = sorted(g for g, v in groups.items() if len(v) > 1)
            if unequal:
                warnings.append(f"{len(unequal)} fused group(s) have unequal global scales; vLLM uses their max, "
                                f"which changes the other shards' values: {unequal[:3]}")
    return ExportReport(dst, scheme, tuple(plan_shard.name for plan_shard in plan), reports, tuple(plain),
                        tuple(ignore), tuple(warnings))


# ------------------------------------------------------------------------------------------------------
# detection and import


def _ct_config(config: dict | None) -> dict | None:
    qc = (config or {}).get("quantization_config")
    if isinstance(qc, dict) and qc.get("quant_method") == QUANT_METHOD:
        return qc
    return None


def _formats(qc: dict) -> set[str]:
    out = set()
    if isinstance(qc.get("format"), str):
        out.add(qc["format"])
    for g in (qc.get("config_groups") or {}).values():
        if isinstance(g, dict) and isinstance(g.get("format"), str):
            out.add(g["format"])
    return out


def detect(path) -> bool:
    """True if ``path`` is a compressed-tensors checkpoint directory in ``nvfp4-pack-quantized`` or
    ``mxfp4-pack-quantized`` format (judged by its config.json)."""
    p = Path(path)
    try:
        config = json.loads((p / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    qc = _ct_config(config) if isinstance(config, dict) else None
    return qc is not None and bool(_formats(qc) & set(SCHEME_OF_FORMAT))


def _check_import_config(qc: dict | None, file: Path) -> None:
    if qc is None:
        raise FP4FmtError(f"config.json has no quantization_config with quant_method {QUANT_METHOD!r}", file=file)
    fmts = _formats(qc) - {"dense"}
    others = fmts - set(SCHEME_OF_FORMAT)
    if others:
        raise FP4FmtError(f"compressed-tensors format(s) {sorted(others)} have no fp4fmt equivalent; only "
                          f"{NVFP4_FORMAT} and {MXFP4_FORMAT} import", file=file)
    if not fmts:
        raise FP4FmtError(f"no {NVFP4_FORMAT} or {MXFP4_FORMAT} format in the quantization_config", file=file)
    if len(fmts) > 1:
        raise FP4FmtError("the checkpoint mixes NVFP4 and MXFP4 groups; fp4fmt checkpoints have one scheme", file=file)
    sparsity = qc.get("sparsity_config")
    if sparsity and not (isinstance(sparsity, dict) and sparsity.get("format") in (None, "dense")
                         and not sparsity.get("targets")):
        raise FP4FmtError("compressed-tensors sparsity (sparsity_config) has no fp4fmt equivalent", file=file)
    transform = qc.get("transform_config")
    if transform and not (isinstance(transform, dict) and not transform.get("config_groups")):
        raise FP4FmtError("compressed-tensors transforms (transform_config: rotations) have no fp4fmt equivalent",
                          file=file)
    if qc.get("kv_cache_scheme") not in (None, {}):
        raise FP4FmtError("a quantized KV cache (kv_cache_scheme) has no fp4fmt equivalent", file=file)
    for name, g in (qc.get("config_groups") or {}).items():
        w = (g or {}).get("weights") if isinstance(g, dict) else None
        if isinstance(w, dict):
            if w.get("symmetric") is False:
                raise FP4FmtError(f"group {name!r} has asymmetric weights (zero points); fp4fmt is symmetric",
                                  file=file)
            if w.get("num_bits") not in (None, 4) or w.get("type") not in (None, "float"):
                raise FP4FmtError(f"group {name!r} quantizes weights to {w.get('num_bits')}-bit {w.get('type')}, "
                                  "not FP4", file=file)


@dataclass(frozen=True)
class _ImportItem:
    name: str  # fp4fmt logical name
    scheme: str | None  # None: plain
    shape: tuple[int, ...]
    dtype: str  # plain: stored dtype
    sources: dict[str, str] = field(default_factory=dict)  # role -> compressed-tensors name


def _import_plan(src: SourceCheckpoint) -> dict[Path, list[_ImportItem]]:
    """Per source shard (the one holding a module's ``weight_packed``), the fp4fmt tensors it becomes."""
    names = set(src.tensors)
    plan: dict[Path, list[_ImportItem]] = {f: [] for f in src.files}
    claimed: set[str] = set()
    for n in sorted(names):
        if not n.endswith("." + PACKED):
            continue
        mod = n[: -len(PACKED) - 1]
        t = src.tensors[n]
        sc = src.tensors.get(f"{mod}.{SCALE}")
        for bad, why in ((ZERO_POINT, "asymmetric weights (weight_zero_point)"),
                         (SHAPE, "an integer pack-quantized weight (weight_shape)")):
            if f"{mod}.{bad}" in names:
                raise FP4FmtError(f"{why} have no fp4fmt equivalent", file=src.tensors[f"{mod}.{bad}"].file,
                                  tensor=f"{mod}.{bad}")
        if sc is None:
            raise FP4FmtError(f"{mod}.{SCALE} is missing", file=t.file, tensor=n)
        if t.dtype != "U8" or len(t.shape) != 2 or len(sc.shape) != 2 or sc.shape[0] != t.shape[0]:
            raise FP4FmtError(f"expected U8 [out, in/2] packed weights with [out, in/B] scales, got {t.dtype} "
                              f"{list(t.shape)} and {sc.dtype} {list(sc.shape)}", file=t.file, tensor=n)
        in_f = 2 * t.shape[1]
        has_gs = f"{mod}.{GLOBAL_SCALE}" in names
        scheme = "nvfp4" if has_gs else "mxfp4"
        bs = schemes.SCHEMES[scheme].block_size
        want_scale = {"nvfp4": ("F8_E4M3", "F32", "BF16", "F16"), "mxfp4": ("U8",)}[scheme]
        if sc.dtype not in want_scale or sc.shape[1] * bs != in_f:
            raise FP4FmtError(f"{scheme} needs {want_scale[0]} scales of shape {[t.shape[0], in_f // bs]} "
                              f"(one per {bs} elements); got {sc.dtype} {list(sc.shape)}", file=sc.file, tensor=sc.name)
        src_names = {"codes": n, "scales": sc.name}
        if has_gs:
            g = src.tensors[f"{mod}.{GLOBAL_SCALE}"]
            if g.dtype not in ("F32", "BF16", "F16") or int(np.prod(g.shape, dtype=np.int64)) != 1:
                raise FP4FmtError(f"expected one float global scale, got {g.dtype} {list(g.shape)}", file=g.file,
                                  tensor=g.name)
            src_names["global_scale"] = g.name
        claimed.update(src_names.values())
        plan[t.file].append(_ImportItem(f"{mod}.weight", scheme, (t.shape[0], in_f), "U8", src_names))
    for n in sorted(names - claimed):
        t = src.tensors[n]
        if n.endswith("." + SCALE) or n.endswith("." + GLOBAL_SCALE) or n.endswith("." + ZERO_POINT):
            raise FP4FmtError("a compressed-tensors scale without a packed FP4 weight: a format (FP8, INT) fp4fmt "
                              "does not import", file=t.file, tensor=n)
        plan[t.file].append(_ImportItem(n, None, tuple(t.shape), t.dtype))
    for items in plan.values():
        items.sort(key=lambda it: it.name)
    logical = [it.name for items in plan.values() for it in items]
    if len(set(logical)) != len(logical):
        dup = sorted({x for x in logical if logical.count(x) > 1})
        raise FP4FmtError(f"a module has both a packed and a plain weight: {dup[:3]}", file=src.path)
    return plan


def _read_records(files: Iterable[Path]) -> tuple[dict[str, dict], dict[Path, dict], dict | None]:
    """The export records of every shard: per-tensor records, per-shard original metadata, and the fp4fmt
    quantization_config (None when absent or inconsistent)."""
    tensors: dict[str, dict] = {}
    shard_meta: dict[Path, dict] = {}
    qcs = []
    for f in files:
        raw = _shard_metadata(f).get(METADATA_KEY)
        if raw is None:
            qcs.append(None)
            continue
        try:
            doc = json.loads(raw)
            if not isinstance(doc, dict) or doc.get("version") != METADATA_VERSION:
                raise ValueError("unknown version")
            recs, meta = doc["tensors"], doc["metadata"]
            if not isinstance(recs, dict) or not isinstance(meta, dict) or not all(
                    isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
                raise ValueError("bad types")
        except (ValueError, KeyError, TypeError):
            qcs.append(None)
            continue
        tensors.update({k: v for k, v in recs.items() if isinstance(v, dict)})
        shard_meta[f] = meta
        qcs.append(doc.get("quantization_config"))
    qc = qcs[0] if qcs and all(q == qcs[0] for q in qcs) and isinstance(qcs[0], dict) else None
    return tensors, shard_meta, qc


def _config_dtype(config: dict) -> str:
    name = config.get("dtype") or config.get("torch_dtype") or _text_config(config).get("torch_dtype")
    return {"bfloat16": "BF16", "float16": "F16", "float32": "F32", "float64": "F64"}.get(str(name), "BF16")


@dataclass(frozen=True)
class _Decided:
    item: _ImportItem
    td: descriptor.TensorDescriptor | None
    tensor_scale: float | None
    mapping: ScaleMapping | None
    restored: bool


def _read_scale_codes(src: SourceCheckpoint, name: str) -> np.ndarray:
    """uint8 codes of a compressed-tensors NVFP4 / MXFP4 scale tensor (a float NVFP4 scale must hold
    E4M3 values exactly)."""
    t = src.tensors[name]
    a = src.read(name)
    if t.dtype in ("F8_E4M3", "U8"):
        return a.view(np.uint8)
    v = a.astype(_F32)
    if np.isnan(v).any():
        raise FP4FmtError("NVFP4 block scales must not be NaN", file=t.file, tensor=name)
    e = (codec.encode_e4m3(np.abs(v)) | np.where(np.signbit(v), np.uint8(0x80), np.uint8(0))).astype(np.uint8)
    if not np.array_equal(codec.decode_e4m3(e).astype(_F32).view(np.uint32), v.view(np.uint32)):
        raise FP4FmtError("NVFP4 block scales must be E4M3 values; this float scale tensor holds others",
                          file=t.file, tensor=name)
    return e


def _record_descriptor(name: str, shape: tuple[int, ...], rec: dict) -> descriptor.TensorDescriptor:
    """The descriptor an export record describes (ValueError if the record is not a valid one)."""
    sch = schemes.SCHEMES.get(rec.get("scheme"))
    if (sch is None or rec.get("scale_rule") not in sch.scale_rules
            or rec.get("dtype") not in dtypes.FLOAT_SOURCE_DTYPES
            or rec.get("scale_layout") not in layout.SCALE_LAYOUTS or not isinstance(rec.get("quantizer"), str)
            or not rec["quantizer"]):
        raise ValueError("not a valid export record")
    return descriptor.TensorDescriptor(name, sch.name, shape, rec["dtype"], 1, rec["scale_layout"], rec["scale_rule"],
                                       rec["quantizer"])


def _decide(src: SourceCheckpoint, it: _ImportItem, records: dict[str, dict], dtype: str) -> _Decided:
    """The fp4fmt descriptor and tensor scale of one imported tensor: from its export record when the file
    still matches it, else as for any compressed-tensors checkpoint."""
    if it.scheme is None:
        return _Decided(it, None, None, None, False)
    file = src.tensors[it.sources["codes"]].file
    codes = src.read(it.sources["codes"])
    scodes = _read_scale_codes(src, it.sources["scales"])
    gs = None
    if it.scheme == "nvfp4":
        gs = _F32(src.read(it.sources["global_scale"]).astype(_F32).reshape(-1)[0])
    rec = records.get(it.name)
    if rec is not None:
        try:
            td = _record_descriptor(it.name, it.shape, rec)
            stored_scales = layout.swizzle_scales(scodes) if td.scale_layout == "swizzled" else scodes
            ok = (td.scheme == it.scheme
                  and descriptor.checksum(codes.reshape(-1)) == rec["codes_checksum"]
                  and descriptor.checksum(stored_scales.reshape(-1)) == rec["scales_checksum"])
            s2 = None
            if ok and it.scheme == "nvfp4":
                s2 = _f32_from_hex(rec["tensor_scale"])
                ok = _f32_hex(gs) == rec["global_scale"] and _finite_positive(s2)
            if ok:
                mapping = None
                if s2 is not None:
                    bf, f32 = _agreement(np.array([s2]), np.array([gs]), used_pairs(codes, scodes, td.block_size))
                    mapping = ScaleMapping(float(s2), float(gs), bool(_recip(gs) == s2), bool(bf[0]), bool(f32[0]),
                                           "used")
                return _Decided(it, td, None if s2 is None else float(s2), mapping, True)
        except (KeyError, TypeError, ValueError):
            pass
    rule = "amax" if it.scheme == "nvfp4" else "even"
    td = descriptor.TensorDescriptor(it.name, it.scheme, it.shape, dtype, 1, "linear", rule, FOREIGN_QUANTIZER)
    if it.scheme == "mxfp4":
        return _Decided(it, td, None, None, False)
    try:
        mapping = tensor_scale_for(gs, used_pairs(codes, scodes, td.block_size))
    except ValueError as e:
        raise FP4FmtError(str(e), file=file, tensor=it.sources["global_scale"]) from None
    return _Decided(it, td, mapping.tensor_scale, mapping, False)


def _import_quantization_config(decided: list[_Decided], scheme: str) -> dict:
    quantized = [d for d in decided if d.td is not None]
    rules = sorted({d.td.scale_rule for d in quantized})
    ignore = sorted({d.item.name.rsplit(".", 1)[0] for d in decided
                     if d.td is None and len(d.item.shape) >= 2 and d.item.dtype in dtypes.FLOAT_SOURCE_DTYPES})
    fused = scheme == "nvfp4"
    if fused:
        groups: dict[str, set[float]] = {}
        for d in quantized:
            g = fused_group(d.item.name)
            if g:
                groups.setdefault(g, set()).add(d.tensor_scale)
        fused = all(len(v) == 1 for v in groups.values())
    return {
        "quant_method": "fp4fmt",
        "format_version": descriptor.FORMAT_VERSION,
        "scheme": scheme,
        "block_size": schemes.SCHEMES[scheme].block_size,
        "scale_rule": rules[0] if len(rules) == 1 else schemes.SCHEMES[scheme].default_rule,
        "fused_tensor_scales": fused,
        "ignore": ignore,
        "producer": {"name": "fp4fmt", "version": __version__},
    }


def import_checkpoint(src, dst, *, overwrite: bool = False, progress: Progress = None) -> ImportReport:
    """Write the compressed-tensors NVFP4 / MXFP4 checkpoint directory ``src`` as an fp4fmt checkpoint
    directory ``dst`` (lossless for checkpoints this module exported; see the module doc for others)."""
    src_p, dst = Path(src), Path(dst)
    if not src_p.is_dir():
        raise FP4FmtError("expected a compressed-tensors checkpoint directory", file=src_p)
    _check_paths(src_p, dst)
    ck = SourceCheckpoint(src_p)
    qc = _ct_config(ck.config)
    _check_import_config(qc, src_p / "config.json")
    scheme = SCHEME_OF_FORMAT[next(iter(_formats(qc) - {"dense"}))]
    plan = _import_plan(ck)
    wrong = [it for items in plan.values() for it in items if it.scheme not in (None, scheme)]
    if wrong:
        it = wrong[0]
        raise FP4FmtError(f"the config says {FORMAT_OF_SCHEME[scheme]} but this weight is stored as {it.scheme}",
                          file=ck.tensors[it.sources["codes"]].file, tensor=it.sources["codes"])
    if not any(it.scheme for items in plan.values() for it in items):
        raise FP4FmtError("no packed FP4 weight (<module>.weight_packed) in the checkpoint", file=src_p)
    records, shard_meta, fp4_qc = _read_records(ck.files)
    dtype = _config_dtype(ck.config or {})
    total = sum(len(v) for v in plan.values())
    done = 0
    decided_all: list[_Decided] = []
    warnings: list[str] = []
    shards = [f for f in ck.files if plan[f]]
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map: dict[str, str] = {}
    with OutputDir(dst, overwrite) as out:
        for shard, out_name in zip(shards, names):
            decided = [_decide(ck, it, records, dtype) for it in plan[shard]]
            layout_: dict = {}
            for d in decided:
                layout_[d.item.name] = d.td if d.td is not None else (d.item.dtype, d.item.shape)
            meta = shard_meta.get(shard)
            if meta is None:  # a foreign shard keeps its own metadata
                meta = {k: v for k, v in _shard_metadata(shard).items()
                        if k not in (METADATA_KEY, IMPORT_METADATA_KEY, descriptor.DESCRIPTOR_KEY)}
            foreign_gs = {d.item.name: {"tensor_scale": _f32_hex(d.tensor_scale),
                                        "global_scale": _f32_hex(d.mapping.global_scale)}
                          for d in decided if d.mapping is not None and not d.restored}
            if foreign_gs:  # so that an export writes compressed-tensors' own global scales back
                meta = dict(meta, **{IMPORT_METADATA_KEY: json.dumps({"global_scales": foreign_gs}, sort_keys=True,
                                                                      separators=(",", ":"))})
            target = out.file(out_name)
            with StreamingWriter(target, layout_, meta) as w:
                for d in decided:
                    if d.td is None:
                        w.add(d.item.name, ck.read(d.item.name))
                    else:
                        codes = ck.read(d.item.sources["codes"])
                        lin = _read_scale_codes(ck, d.item.sources["scales"])
                        raw = layout.swizzle_scales(lin) if d.td.scale_layout == "swizzled" else lin
                        sch = schemes.SCHEMES[d.td.scheme]
                        scales = raw.view(dtypes.numpy_dtype(sch.scale_dtype))
                        try:
                            qt = QTensor(d.td.scheme, d.td.shape, codes, scales,
                                         _F32(d.tensor_scale) if d.tensor_scale is not None else None,
                                         1, d.td.dtype, d.td.scale_layout, d.td.scale_rule)
                            check_scales(qt, name=d.item.sources["scales"],
                                         file=ck.tensors[d.item.sources["scales"]].file)
                        except FormatError as e:
                            raise FormatError(e.rule, file=ck.tensors[d.item.sources["scales"]].file,
                                              tensor=e.tensor or d.item.name) from None
                        parts = d.td.part_names()
                        w.add_part(parts["codes"], qt.codes)
                        w.add_part(parts["scales"], qt.scales)
                        if "tensor_scale" in parts:
                            w.add_part(parts["tensor_scale"], np.array(qt.tensor_scale, dtype="<f4"))
                    done += 1
                    if progress:
                        progress("importing", done, total)
            with safe_open(target) as f:
                for stored in f.stored_keys():
                    weight_map[stored] = out_name
            decided_all += decided
        if len(names) > 1:
            size = sum(out.file(n).stat().st_size for n in names)
            out.write_json(INDEX_NAME, {"metadata": {"total_size": size,
                                                     "fp4fmt_format_version": descriptor.FORMAT_VERSION},
                                        "weight_map": weight_map})
        out.copy_side_files(ck.side_files())
        quantized = [d for d in decided_all if d.td is not None]
        cfg = dict(ck.config or {})
        if fp4_qc is not None and all(d.restored for d in quantized):
            cfg["quantization_config"] = fp4_qc
        else:
            cfg["quantization_config"] = _import_quantization_config(decided_all, scheme)
        out.write_json("config.json", cfg)
    inexact = [d.item.name for d in quantized if d.mapping is not None and not d.mapping.bf16_exact and not d.restored]
    if inexact:
        warnings.append(f"{len(inexact)} tensor(s) have no tensor scale that decodes exactly as compressed-tensors "
                        f"does (bfloat16); the nearest to 1/global_scale was taken: {inexact[:3]}")
    if any(n.endswith("." + INPUT_GLOBAL_SCALE) for n in ck.tensors):
        warnings.append("input_global_scale tensors (W4A4 activation scales) were kept as plain tensors; fp4fmt "
                        "quantizes weights only")
    reports = {d.item.name: TensorReport(d.item.name, d.td.scheme, d.td.shape, d.mapping, d.restored)
               for d in quantized}
    plain = tuple(d.item.name for d in decided_all if d.td is None)
    return ImportReport(dst, scheme, tuple(names), reports, plain, tuple(warnings))


__all__ = [
    "FORMAT",
    "ExportReport",
    "ImportReport",
    "ScaleMapping",
    "TensorReport",
    "detect",
    "export_checkpoint",
    "global_scale_for",
    "import_checkpoint",
    "round_trip_exists",
    "tensor_scale_for",
    "used_pairs",
]
