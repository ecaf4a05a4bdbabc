"""NVIDIA TensorRT Model Optimizer (modelopt) unified Hugging Face checkpoints, NVFP4 (spec §8.2): export an
fp4fmt NVFP4 checkpoint directory to the layout ``modelopt.torch.export.export_hf_checkpoint`` writes, and
import such a checkpoint into fp4fmt. Nothing is re-quantized in either direction: every code, block scale
and tensor scale is copied byte for byte.

What the export writes
----------------------

* **Quantized tensors.** An fp4fmt NVFP4 tensor ``NAME`` becomes three safetensors tensors. Their names
  follow modelopt's ``quantizer_attr_names``: for ``NAME = <module>.weight`` they are ``<module>.weight``
  (U8, the packed codes), ``<module>.weight_scale`` (F8_E4M3, the block scales) and
  ``<module>.weight_scale_2`` (F32, shape ``[]``, the tensor scale); for another leaf name, such as
  fused experts ``<module>.gate_up_proj``, they are ``NAME``, ``NAME_weight_scale`` and
  ``NAME_weight_scale_2``.
* **Values.** The codes are the same bytes (element ``2i`` in the low nibble, as modelopt packs
  ``q[..., 0::2] | q[..., 1::2] << 4``), the block scales are the same E4M3 bytes in the linear layout
  (swizzled fp4fmt scales are unswizzled, exactly), and ``weight_scale_2`` is the fp4fmt tensor scale,
  which is already in modelopt's decode direction (``amax / (6 * 448)``). modelopt dequantizes
  ``E2M1 * fl32(fl32(weight_scale) * weight_scale_2)``, the decoding of spec §5.3 in the same order, so
  every decoded float32 is bit-identical, with one difference of sign: modelopt's own
  ``NVFP4QTensor.dequantize`` table maps code 0x8 to +0.0, where E2M1 (and fp4fmt) give -0.0.
* **Axes.** modelopt stores a packed tensor in the order of its logical axes, with the blocked axis
  halved (two codes per byte) in ``weight`` and divided by 16 in ``weight_scale``. A linear weight
  ``[out, in]`` (axis 1) is stored as it is in fp4fmt. A 3-D fused-experts tensor blocked along axis 1,
  such as Hugging Face's ``gate_up_proj`` ``[E, in, out]``, is written ``[E, in/2, out]`` /
  ``[E, in/16, out]``: the bytes of fp4fmt's storage order ``[E, out, in/2]`` with the last two axes
  swapped, which is how modelopt exports the BMM-style experts of Llama 4 and gpt-oss. A ``.weight``
  tensor must be blocked along its last axis (modelopt's linear layers are).
* **Refused.** MXFP4 tensors (modelopt 0.47 documents no MXFP4 Hugging Face layout: its unified export
  and ``convert_hf_quant_config_format`` define NVFP4 and W4A16_NVFP4, and vLLM's documented modelopt
  ``quant_algo`` values are FP8, FP8_PER_CHANNEL_PER_TOKEN, FP8_PB_WO, NVFP4 and MXFP8; use the gpt-oss
  or compressed-tensors export for MXFP4); tensors whose blocked length is not a multiple of 16 (modelopt
  has no field for the logical length, so the padded length would replace it).
* **Plain tensors** are copied unchanged, in their own dtype.
* **Files.** Each fp4fmt shard becomes one safetensors shard of the same file name, laid out as the
  ``safetensors`` library lays it out (tensors by dtype, then name; header padded to 8 bytes), with the
  shard's user metadata (``"format": "pt"`` added if absent). Several shards get a Hugging Face
  ``model.safetensors.index.json`` (``total_size`` = bytes of tensor data). Tokenizer and other side files
  are copied.
* **Configs.** ``hf_quant_config.json`` and ``config.json["quantization_config"]`` as modelopt 0.47 writes
  them (``json.dump(..., indent=4)``): ``quant_algo`` is ``"W4A16_NVFP4"`` (modelopt's weight-only NVFP4:
  fp4fmt stores no activation scales), or ``"NVFP4"`` when every quantized module carries an
  ``input_scale`` tensor (a W4A4 checkpoint imported from modelopt); ``group_size`` 16;
  ``kv_cache_quant_algo`` null; ``exclude_modules`` / ``ignore`` = the modules whose 2-D+ float tensors
  are kept in high precision, plus ``lm_head``, less any module that holds a quantized tensor (fused
  experts keep 2-D biases beside their quantized weights); ``producer`` = fp4fmt. A checkpoint
  imported from modelopt whose configs differ from these keeps the originals (see below) and gets them
  back verbatim.

What the import reads
---------------------

``hf_quant_config.json`` / ``config.json`` with ``quant_algo`` NVFP4 or W4A16_NVFP4 (or MIXED_PRECISION
made only of those, group size 16). Every U8 tensor with its F8_E4M3 ``weight_scale`` and 0-dimensional
F32 ``weight_scale_2`` becomes one fp4fmt NVFP4 tensor: the blocked axis is the one where ``weight`` is 8
times longer than ``weight_scale`` (all other axes equal), the logical shape is ``weight``'s with that axis
doubled, and the codes and scales move to fp4fmt's storage order. The descriptor's ``dtype`` is the
model's (``config.json`` ``dtype`` / ``torch_dtype``), ``scale_rule`` ``"amax"``, ``quantizer`` ``"rtn"``,
``scale_layout`` ``"linear"``. modelopt's conventions are valid fp4fmt: an all-zero block keeps its scale
1.0 (0x38), ``-0.0`` inputs are code 0x0. Scale codes fp4fmt forbids (NaN 0x7F, negative) and per-expert
``weight_scale_2`` (one global scale per expert: spec §6.3) are refused, as are AWQ ``pre_quant_scale``
checkpoints. Other tensors (``input_scale``, ``k_scale``, ``v_scale``, BF16 weights, norms) are kept as
plain tensors. Each source shard becomes an fp4fmt shard of the same name (a quantized tensor goes to the
shard of its packed ``weight``); ``config.json`` keeps its key order and gets an fp4fmt
``quantization_config`` in the place of modelopt's.

Lossless both ways
------------------

* **fp4fmt -> modelopt -> fp4fmt.** Codes, scales, tensor scales and plain tensors come back byte for
  byte. Descriptor fields modelopt cannot hold (a ``dtype`` other than the model's, a swizzled scale
  layout, another ``quantizer``) travel in the shard's safetensors metadata under ``fp4fmt_descriptors``
  (JSON: tensor name -> the differing fields), written only for tensors that need it; the import applies
  and removes it, so the fp4fmt shards come back identical.
* **modelopt -> fp4fmt -> modelopt.** Tensors come back byte for byte, and so do the shard files when they
  were written by the ``safetensors`` library with one metadata key (what ``save_pretrained`` does) and
  every quantized tensor's parts are in one shard. When modelopt's ``hf_quant_config.json`` and
  ``quantization_config`` differ from what the export would write, the import keeps them in the fp4fmt
  ``quantization_config`` under ``imported_from`` (``{"format": "modelopt", "hf_quant_config": ...,
  "quantization_config": ...}``), and the export writes them back unchanged (if ``quant_algo`` still
  matches the tensors). A sharded source's index is rewritten from the tensors (extra index metadata such
  as ``total_parameters`` is not kept).
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ... import __version__, container, dtypes, layout
from ...descriptor import FORMAT_VERSION, TensorDescriptor
from ...errors import FormatError, FP4FmtError
from ...files import StreamingWriter, safe_open
from ...qtensor import QTensor, check_scales
from ...schemes import SCHEMES
from ..plan import fused_group
from ..source import INDEX_NAME, SourceCheckpoint
from .common import OutputDir, index_json, open_fp4_checkpoint

FORMAT = "modelopt"

HF_QUANT_CONFIG = "hf_quant_config.json"
HINTS_KEY = "fp4fmt_descriptors"  # safetensors metadata: descriptor fields the target format cannot hold
IMPORTED_FROM = "imported_from"  # fp4fmt quantization_config member: the source's own configs, when kept
NVFP4_ALGOS = ("NVFP4", "W4A16_NVFP4")
GROUP_SIZE = 16

Progress = Callable[[str, int, int], None] | None


@dataclass(frozen=True)
class InteropReport:
    """What an export or import wrote: the directory, its format, tensor counts, shard files and notes."""

    path: Path
    format: str
    quantized: int
    plain: int
    shards: tuple[str, ...]
    notes: tuple[str, ...] = ()


# ------------------------------------------------------------------------------------------------------
# helpers shared with the gpt-oss module (candidates for common.py)

# safetensors' Dtype enum order: its writer places tensors by this order, descending, then by name.
SAFETENSORS_DTYPE_ORDER = ("BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0",
                           "F8_E4M3FNUZ", "F8_E5M2FNUZ", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "C64",
                           "F64", "I64", "U64")
_RANK = {name: i for i, name in enumerate(SAFETENSORS_DTYPE_ORDER)}


def write_safetensors(path: Path, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None) -> int:
    """Write a plain safetensors file (no fp4fmt descriptor) with the bytes the ``safetensors`` library
    writes for the same tensors: data ordered by dtype (its enum order, descending) then name, compact
    header with ``__metadata__`` first (keys sorted), space-padded to 8 bytes. Returns the tensor bytes."""
    items = []
    for name, arr in tensors.items():
        a = np.asarray(arr)
        try:
            dt = dtypes.dtype_name(a.dtype)
        except ValueError as e:
            raise FP4FmtError(str(e), file=path, tensor=name) from None
        items.append((name, dt, a))
    items.sort(key=lambda it: (-_RANK[it[1]], it[0].encode("utf-8")))
    head: dict = {}
    if metadata:
        head[container.METADATA_KEY] = {k: metadata[k] for k in sorted(metadata)}
    pos = 0
    for name, dt, a in items:
        head[name] = {"dtype": dt, "shape": list(a.shape), "data_offsets": [pos, pos + a.nbytes]}
        pos += a.nbytes
    text = json.dumps(head, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for _, dt, a in items:
            c = np.ascontiguousarray(a, dtype=dtypes.numpy_dtype(dt)).reshape(-1)
            f.write(memoryview(c.view(np.uint8)))
    return pos


def write_export_shard(path: Path, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str],
                       hints: Mapping[str, dict]) -> int:
    """Write one exported shard: its tensors, and the source shard's metadata plus the descriptor fields the
    target cannot hold (``HINTS_KEY``, only when there are any); returns the bytes written."""
    meta = dict(metadata)
    if hints:
        meta[HINTS_KEY] = json.dumps(hints, separators=(",", ":"), sort_keys=True)
    return write_safetensors(path, tensors, meta)


def file_metadata(path: Path) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file (the fp4fmt descriptor left out)."""
    return {k: v for k, v in container.read_header(path).metadata.items() if k != "fp4fmt"}


def check_paths(src: Path, dst: Path) -> None:
    """The destination must not be, contain or lie inside the source (the source is never modified)."""
    s, d = src.resolve(), dst.resolve()
    if s == d or s in d.parents or d in s.parents:
        raise FP4FmtError("the destination must not be, contain or lie inside the source directory", file=dst)


def model_dtype(config: dict | None) -> str:
    """The safetensors name of the model's dtype from config.json (``dtype``, else ``torch_dtype``, also in
    ``text_config``); BF16 when it says nothing usable. The default ``dtype`` of imported tensors."""
    names = {"bfloat16": "BF16", "float16": "F16", "float32": "F32", "float64": "F64"}
    for cfg in (config or {}, (config or {}).get("text_config") or {}):
        if isinstance(cfg, dict):
            for key in ("dtype", "torch_dtype"):
                v = cfg.get(key)
                if isinstance(v, str) and v.removeprefix("torch.") in names:
                    return names[v.removeprefix("torch.")]
    return "BF16"


def kept_modules(plain: Mapping[str, tuple[str, tuple[int, ...]]]) -> list[str]:
    """Modules with a float tensor of rank >= 2 stored in high precision: the converter's ``ignore`` rule."""
    return sorted({n.rsplit(".", 1)[0] for n, (dt, shape) in plain.items()
                   if dt in dtypes.FLOAT_SOURCE_DTYPES and len(shape) >= 2})


def fp4fmt_quantization_config(scheme: str, scale_rule: str, fused: bool, ignore: list[str],
                               imported_from: dict | None = None) -> dict:
    """The ``quantization_config`` of an fp4fmt checkpoint (fields of ``fp4fmt convert``, keys sorted)."""
    qc = {
        "block_size": 16 if scheme == "nvfp4" else 32,
        "format_version": FORMAT_VERSION,
        "fused_tensor_scales": fused,
        "ignore": ignore,
        "producer": {"name": "fp4fmt", "version": __version__},
        "quant_method": "fp4fmt",
        "scale_rule": scale_rule,
        "scheme": scheme,
    }
    if imported_from is not None:
        qc[IMPORTED_FROM] = imported_from
    return dict(sorted(qc.items()))


def with_quantization_config(config: dict, qc: dict) -> dict:
    """``config`` with ``quantization_config`` replaced in place (key order kept; appended if absent)."""
    out = dict(config)
    out["quantization_config"] = qc
    return out


def same_json(a, b) -> bool:
    """Equal as written JSON (member order included)."""
    return json.dumps(a) == json.dumps(b)


def hint_fields(td: TensorDescriptor, default: TensorDescriptor) -> dict:
    """The descriptor fields of ``td`` an import would not infer (those that differ from ``default``)."""
    return {k: getattr(td, k) for k in ("axis", "dtype", "scale_layout", "scale_rule", "quantizer")
            if getattr(td, k) != getattr(default, k)}


def read_hints(meta: Mapping[str, str], file: Path) -> dict[str, dict]:
    """The ``fp4fmt_descriptors`` hints of a shard's metadata: tensor name -> descriptor fields."""
    raw = meta.get(HINTS_KEY)
    if raw is None:
        return {}
    try:
        hints = json.loads(raw)
    except ValueError as e:
        raise FormatError(f"metadata {HINTS_KEY!r} is not JSON: {e}", file=file) from None
    if not isinstance(hints, dict) or not all(isinstance(v, dict) for v in hints.values()):
        raise FormatError(f"metadata {HINTS_KEY!r} must map tensor names to objects", file=file)
    return hints


def apply_hints(default: TensorDescriptor, hint: dict | None, *, file: Path) -> TensorDescriptor:
    """``default`` with the fields of ``hint`` (checked: known fields, valid values, same storage order)."""
    if not hint:
        return default
    fields = dict(axis=default.axis, dtype=default.dtype, scale_layout=default.scale_layout,
                  scale_rule=default.scale_rule, quantizer=default.quantizer)
    unknown = set(hint) - set(fields)
    if unknown:
        raise FormatError(f"{HINTS_KEY}: unknown fields {sorted(unknown)}", file=file, tensor=default.name)
    fields.update(hint)
    storage = layout.geometry(default.shape, default.axis, default.block_size).storage_shape
    axis = fields["axis"]
    ok = (type(axis) is int and 0 <= axis < len(storage) and fields["dtype"] in dtypes.FLOAT_SOURCE_DTYPES
          and fields["scale_layout"] in layout.SCALE_LAYOUTS and isinstance(fields["quantizer"], str)
          and fields["quantizer"] != "" and fields["scale_rule"] in SCHEMES[default.scheme].scale_rules
          and not (fields["scale_layout"] == "swizzled" and len(storage) < 2))
    if not ok:
        raise FormatError(f"{HINTS_KEY}: invalid descriptor fields {hint}", file=file, tensor=default.name)
    shape = list(storage[:-1])
    shape.insert(axis, storage[-1])
    return TensorDescriptor(default.name, default.scheme, tuple(shape), fields["dtype"], axis,
                            fields["scale_layout"], fields["scale_rule"], fields["quantizer"])


def fp4_shard_entries(shard: Path) -> tuple[dict[str, TensorDescriptor], dict[str, tuple[str, tuple[int, ...]]]]:
    """(quantized name -> descriptor, plain name -> (dtype, shape)) of one fp4fmt shard, from its header."""
    with safe_open(shard) as f:
        quant = dict(f.descriptor.tensors) if f.descriptor else {}
        plain = {n: (f.header.entries[n].dtype, tuple(f.header.entries[n].shape)) for n in f.keys() if n not in quant}
    return quant, plain


def write_fp4fmt_shard(path: Path, planned: list[tuple[str, TensorDescriptor | tuple]], metadata: Mapping[str, str],
                       read: Callable[[str], QTensor | np.ndarray], tick: Callable[[], None]) -> None:
    """Write one fp4fmt shard: ``planned`` lists (name, descriptor or (dtype, shape)); ``read(name)`` gives
    the value, a QTensor checked against its descriptor or a plain array. Parts are written as they are, so
    descriptor fields a QTensor does not carry (``quantizer``) are kept."""
    plan = dict(planned)
    with StreamingWriter(path, plan, metadata) as w:
        for name, spec in planned:
            value = read(name)
            if isinstance(spec, TensorDescriptor):
                parts = spec.part_names()
                w.add_part(parts["codes"], value.codes)
                w.add_part(parts["scales"], value.scales)
                if "tensor_scale" in parts:
                    w.add_part(parts["tensor_scale"], np.array(value.tensor_scale, dtype="<f4"))
            else:
                w.add(name, value)
            tick()


def qtensor_for(td: TensorDescriptor, codes: np.ndarray, scale_codes: np.ndarray, tensor_scale, *,
                file: Path) -> QTensor:
    """A validated QTensor of descriptor ``td`` from storage-order codes and linear scale codes (uint8
    view of the scales); swizzles the scales if ``td`` says so. FormatError on a bad shape or scale."""
    sch = SCHEMES[td.scheme]
    raw = np.ascontiguousarray(scale_codes).view(np.uint8)
    if td.scale_layout == "swizzled":
        raw = layout.swizzle_scales(raw)
    try:
        qt = QTensor(scheme=td.scheme, shape=td.shape, codes=np.ascontiguousarray(codes),
                     scales=raw.view(dtypes.numpy_dtype(sch.scale_dtype)), tensor_scale=tensor_scale, axis=td.axis,
                     dtype=td.dtype, scale_layout=td.scale_layout, scale_rule=td.scale_rule)
        check_scales(qt, name=td.name, file=file)
    except FP4FmtError as e:
        raise FormatError(e.rule, file=file, tensor=td.name) from None
    return qt


def write_fp4fmt_index(out: OutputDir, shard_names: list[str], weight_map: dict[str, str]) -> None:
    """The index ``fp4fmt convert`` writes (total_size = bytes of the shard files)."""
    total = sum(out.file(n).stat().st_size for n in shard_names)
    out.write_json(INDEX_NAME, {"metadata": {"total_size": total, "fp4fmt_format_version": FORMAT_VERSION},
                                "weight_map": dict(sorted(weight_map.items()))})


def counter(stage: str, total: int, progress: Progress) -> Callable[[], None]:
    done = [0]

    def tick() -> None:
        done[0] += 1
        if progress:
            progress(stage, done[0], total)

    return tick


# ------------------------------------------------------------------------------------------------------
# names and configs


def scale_names(name: str) -> tuple[str, str, str]:
    """(weight_scale, weight_scale_2, input_scale) names of packed tensor ``name`` (modelopt's
    ``quantizer_attr_names``: ``weight`` -> ``weight_scale``; any other leaf ``p`` -> ``p_weight_scale``)."""
    prefix, _, leaf = name.rpartition(".")
    if leaf == "weight":
        base = name[: -len("weight")]
        return base + "weight_scale", base + "weight_scale_2", base + "input_scale"
    return name + "_weight_scale", name + "_weight_scale_2", name + "_input_scale"


def excluded_modules(plain: Mapping[str, tuple[str, tuple[int, ...]]], quantized: Iterable[str]) -> list[str]:
    """Modules a loader must keep in high precision: those with a kept float tensor of rank >= 2, and
    ``lm_head``, less every module holding a quantized tensor (fused experts keep 2-D biases beside their
    quantized weights)."""
    modules = {n.rsplit(".", 1)[0] for n in quantized}
    return sorted((set(kept_modules(plain)) | {"lm_head"}) - modules)


def modelopt_configs(quant_algo: str, exclude: list[str], producer: dict | None = None) -> tuple[dict, dict]:
    """(hf_quant_config.json, config.json quantization_config) as modelopt 0.47 writes them for an NVFP4
    or W4A16_NVFP4 export (member order included), with ``exclude`` as exclude_modules / ignore."""
    producer = producer or {"name": "fp4fmt", "version": __version__}
    hf = {"producer": dict(producer),
          "quantization": {"quant_algo": quant_algo, "kv_cache_quant_algo": None, "group_size": GROUP_SIZE,
                           "exclude_modules": list(exclude)}}
    weights = {"dynamic": False, "num_bits": 4, "type": "float", "group_size": GROUP_SIZE}
    group = {"weights": weights, "targets": ["Linear"]}
    if quant_algo == "NVFP4":
        group = {"input_activations": dict(weights), **group}
    qc = {"config_groups": {"group_0": group}, "ignore": list(exclude), "quant_algo": quant_algo,
          "producer": dict(producer), "quant_method": "modelopt"}
    return hf, qc


def _source_quant_algo(src: SourceCheckpoint, cfg_file: Path) -> tuple[str, dict | None, dict | None]:
    """modelopt's quant_algo (NVFP4 or W4A16_NVFP4; MIXED_PRECISION of those), hf_quant_config and
    config quantization_config; FP4FmtError for anything else."""
    hf = src.hf_quant_config
    qc = (src.config or {}).get("quantization_config")
    details = (hf or {}).get("quantization") if hf else qc
    where = src.path / HF_QUANT_CONFIG if hf else cfg_file
    if not isinstance(details, dict):
        raise FP4FmtError("no modelopt quantization config (hf_quant_config.json or config.json "
                          "quantization_config with quant_method 'modelopt')", file=src.path)
    algo = details.get("quant_algo")
    if algo == "MIXED_PRECISION":
        layers = details.get("quantized_layers") or {}
        bad = {n: c.get("quant_algo") for n, c in layers.items() if not isinstance(c, dict)
               or c.get("quant_algo") not in NVFP4_ALGOS or c.get("group_size", GROUP_SIZE) != GROUP_SIZE}
        if bad or not layers:
            raise FP4FmtError(f"MIXED_PRECISION checkpoint with layers that are not NVFP4 (group size 16): "
                              f"{dict(list(bad.items())[:3])}; fp4fmt imports NVFP4 only", file=where)
    elif algo not in NVFP4_ALGOS:
        raise FP4FmtError(f"quant_algo {algo!r} is not imported: fp4fmt reads modelopt NVFP4 and W4A16_NVFP4 "
                          "checkpoints (MXFP4 has no documented modelopt layout; FP8, INT4 and AWQ variants are "
                          "other formats)", file=where)
    elif details.get("group_size", GROUP_SIZE) != GROUP_SIZE:
        raise FP4FmtError(f"group_size {details.get('group_size')} is not NVFP4's 16", file=where)
    return algo, hf, qc


def detect(path: str | os.PathLike) -> bool:
    """True if ``path`` is a modelopt checkpoint directory (hf_quant_config.json from modelopt, or
    config.json with ``quantization_config.quant_method == "modelopt"``). Never raises."""
    p = Path(path)
    try:
        if (p / HF_QUANT_CONFIG).is_file():
            hf = json.loads((p / HF_QUANT_CONFIG).read_text(encoding="utf-8"))
            if isinstance(hf, dict) and isinstance(hf.get("quantization"), dict) and (
                    (hf.get("producer") or {}).get("name") == "modelopt" or "quant_algo" in hf["quantization"]):
                return True
        if (p / "config.json").is_file():
            cfg = json.loads((p / "config.json").read_text(encoding="utf-8"))
            return isinstance(cfg, dict) and (cfg.get("quantization_config") or {}).get("quant_method") == "modelopt"
    except (OSError, ValueError, AttributeError, TypeError):
        return False
    return False


# ------------------------------------------------------------------------------------------------------
# export


def _default_descriptor(name: str, shape: tuple[int, ...], axis: int, dtype: str) -> TensorDescriptor:
    return TensorDescriptor(name, "nvfp4", tuple(shape), dtype, axis, "linear", "amax", "rtn")


def _export_names(shards: Iterable[Path]) -> tuple[dict, dict, dict]:
    """Descriptors and plain tensors of every shard: (shard -> quantized, shard -> plain, all plain)."""
    quant, plain, every_plain = {}, {}, {}
    for shard in shards:
        q, p = fp4_shard_entries(shard)
        quant[shard], plain[shard] = q, p
        every_plain.update(p)
    return quant, plain, every_plain


def _kept_configs(fp4_qc: dict, with_input: bool) -> tuple[dict | None, dict | None] | None:
    """The modelopt configs an import kept (``imported_from``), if they still fit the tensors: W4A16_NVFP4
    loaders ignore input scales, NVFP4 (W4A4) needs one for every quantized module."""
    kept = fp4_qc.get(IMPORTED_FROM)
    if not isinstance(kept, dict) or kept.get("format") != FORMAT:
        return None
    hf, qc = kept.get("hf_quant_config"), kept.get("quantization_config")
    if not all(c is None or isinstance(c, dict) for c in (hf, qc)) or (hf is None and qc is None):
        return None
    algo = (hf.get("quantization") or {}).get("quant_algo") if hf else qc.get("quant_algo")
    if algo in ("W4A16_NVFP4", "MIXED_PRECISION") or (algo == "NVFP4" and with_input):
        return hf, qc
    return None


def export_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, *, overwrite: bool = False,
                      progress: Progress = None) -> InteropReport:
    """Write fp4fmt NVFP4 checkpoint directory ``src`` as a modelopt unified HF checkpoint in ``dst``
    (module docstring). The source is only read; ``dst`` appears complete or not at all. FP4FmtError for an
    MXFP4 tensor, a padded one, a ``.weight`` not blocked along its last axis, or a name collision."""
    ck = open_fp4_checkpoint(src)
    out_path = Path(dst)
    check_paths(ck.path, out_path)
    quant, plain, every_plain = _export_names(ck.shards)
    dtype = model_dtype(ck.config)
    quantized: list[str] = []
    stored: set[str] = set()
    for shard in ck.shards:
        for name, td in quant[shard].items():
            if td.scheme != "nvfp4":
                raise FP4FmtError("is MXFP4: modelopt documents no MXFP4 Hugging Face layout (quant_algo NVFP4 / "
                                  "W4A16_NVFP4 only); export it with --to gpt-oss or compressed-tensors, or convert "
                                  "with --scheme nvfp4", file=shard, tensor=name)
            geo = td.geometry
            if geo.padding:
                raise FP4FmtError(f"blocked length {geo.k} is not a multiple of 16: modelopt stores whole blocks and "
                                  "has no field for the logical length", file=shard, tensor=name)
            if name.rpartition(".")[2] == "weight" and td.axis != len(td.shape) - 1:
                raise FP4FmtError(f"a modelopt .weight is packed along its last (input) axis; this one is blocked "
                                  f"along axis {td.axis} of {list(td.shape)}", file=shard, tensor=name)
            quantized.append(name)
            for n in (name, *scale_names(name)[:2]):
                if n in stored or (n != name and n in every_plain):
                    raise FP4FmtError(f"output name {n!r} is used twice (a plain tensor has a modelopt part's name)",
                                      file=shard, tensor=name)
                stored.add(n)
        for name in plain[shard]:
            if name in stored:
                raise FP4FmtError(f"output name {name!r} is used twice", file=shard, tensor=name)
            stored.add(name)
    if not quantized:
        raise FP4FmtError("no quantized tensor: nothing to export as NVFP4", file=ck.path)

    with_input = all(scale_names(n)[2] in every_plain for s in ck.shards for n in quant[s])
    algo = "NVFP4" if with_input else "W4A16_NVFP4"
    hf, qc = modelopt_configs(algo, excluded_modules(every_plain, quantized))
    notes = []
    kept = _kept_configs(ck.quantization_config, with_input)
    if kept is not None:
        hf, qc = kept
        notes.append("configs restored from the modelopt checkpoint this one was imported from")
    elif IMPORTED_FROM in ck.quantization_config:
        notes.append("the configs kept from an import do not match the tensors (or another format's); written anew")

    total = sum(len(quant[s]) + len(plain[s]) for s in ck.shards)
    tick = counter("exporting", total, progress)
    weight_map: dict[str, str] = {}
    total_bytes = 0
    with OutputDir(out_path, overwrite) as out:
        for shard in ck.shards:
            tensors: dict[str, np.ndarray] = {}
            hints: dict[str, dict] = {}
            with safe_open(shard) as f:
                for name in f.keys():
                    td = quant[shard].get(name)
                    if td is None:
                        tensors[name] = f.get_tensor(name)
                    else:
                        qt = f.get_tensor(name)
                        s_name, s2_name, _ = scale_names(name)
                        tensors[name] = np.moveaxis(qt.codes, -1, td.axis)
                        scales = qt.scale_codes().view(dtypes.numpy_dtype("F8_E4M3"))
                        tensors[s_name] = np.moveaxis(scales, -1, td.axis)
                        tensors[s2_name] = np.array(qt.tensor_scale, dtype="<f4")
                        h = hint_fields(td, _default_descriptor(name, td.shape, td.axis, dtype))
                        if h:
                            hints[name] = h
                    tick()
                meta = {"format": "pt", **f.metadata()}
            total_bytes += write_export_shard(out.file(shard.name), tensors, meta, hints)
            weight_map.update({n: shard.name for n in tensors})
        if len(ck.shards) > 1:
            out.write_json(INDEX_NAME, index_json(weight_map, total_bytes))
        if hf is not None:
            out.file(HF_QUANT_CONFIG).write_text(json.dumps(hf, indent=4), encoding="utf-8")
        cfg = with_quantization_config(ck.config, qc) if qc is not None else \
            {k: v for k, v in ck.config.items() if k != "quantization_config"}
        out.file("config.json").write_text(json.dumps(cfg, indent=4), encoding="utf-8")
        out.copy_side_files(ck.side_files)
    return InteropReport(out_path, FORMAT, len(quantized), total - len(quantized), tuple(s.name for s in ck.shards),
                         tuple(notes))


# ------------------------------------------------------------------------------------------------------
# import


@dataclass(frozen=True)
class _Quantized:
    td: TensorDescriptor
    weight: str  # source names of the parts
    scale: str
    scale_2: str
    packed_axis: int  # the blocked axis in the source (logical) order


def _blocked_axis(w_shape: tuple[int, ...], s_shape: tuple[int, ...]) -> int | None:
    """The axis along which packed weight ``w_shape`` is 8 times its scales ``s_shape`` (others equal)."""
    if len(w_shape) != len(s_shape) or not w_shape:
        return None
    hits = [i for i in range(len(w_shape))
            if w_shape[i] == 8 * s_shape[i] and all(w_shape[j] == s_shape[j] for j in range(len(w_shape)) if j != i)]
    if len(hits) > 1:  # only with zero-length axes: take the last
        hits = [hits[-1]]
    return hits[0] if hits else None


def _plan_import(src: SourceCheckpoint, dtype: str) -> tuple[dict[str, _Quantized], set[str]]:
    """The quantized tensors of a modelopt checkpoint (by packed weight name) and the source names they use."""
    found: dict[str, _Quantized] = {}
    used: set[str] = set()
    for name in sorted(src.tensors):
        t = src.tensors[name]
        if t.dtype != "U8":
            continue
        s_name, s2_name, _ = scale_names(name)
        if s_name not in src.tensors and s2_name not in src.tensors:
            continue
        prefix = name[: -len("weight")] if name.rpartition(".")[2] == "weight" else name + "_"
        if prefix + "pre_quant_scale" in src.tensors:
            raise FP4FmtError("has an AWQ pre_quant_scale: NVFP4_AWQ checkpoints scale the activations, which fp4fmt "
                              "cannot store", file=t.file, tensor=name)
        s, s2 = src.tensors.get(s_name), src.tensors.get(s2_name)
        if s is None or s2 is None:
            raise FP4FmtError(f"packed NVFP4 weight without its {'weight_scale' if s is None else 'weight_scale_2'} "
                              f"({s_name if s is None else s2_name!r})", file=t.file, tensor=name)
        if s.dtype != "F8_E4M3":
            raise FP4FmtError(f"{s_name} is {s.dtype}, expected F8_E4M3 block scales", file=s.file, tensor=s_name)
        if s2.dtype != "F32" or s2.shape != ():
            raise FP4FmtError(f"{s2_name} is {s2.dtype} {list(s2.shape)}: fp4fmt imports one F32 tensor scale "
                              "(shape []) per tensor; per-expert global scales are not supported (spec §6.3)",
                              file=s2.file, tensor=s2_name)
        axis = _blocked_axis(t.shape, s.shape)
        if axis is None:
            raise FP4FmtError(f"packed shape {list(t.shape)} does not match scales {list(s.shape)} (one axis 8 times "
                              "longer, the others equal)", file=t.file, tensor=name)
        shape = list(t.shape)
        shape[axis] *= 2
        found[name] = _Quantized(_default_descriptor(name, tuple(shape), axis, dtype), name, s_name, s2_name, axis)
        used.update((name, s_name, s2_name))
    return found, used


def import_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, *, overwrite: bool = False,
                      progress: Progress = None) -> InteropReport:
    """Write modelopt NVFP4 checkpoint directory ``src`` as an fp4fmt checkpoint in ``dst`` (module
    docstring). Lossless: codes, scales, tensor scales and every other tensor are copied unchanged."""
    sc = SourceCheckpoint(src)
    if not sc.path.is_dir() or sc.config is None:
        raise FP4FmtError("expected a modelopt checkpoint directory with config.json", file=sc.path)
    out_path = Path(dst)
    check_paths(sc.path, out_path)
    cfg_file = sc.path / "config.json"
    _algo, src_hf, src_qc = _source_quant_algo(sc, cfg_file)
    dtype = model_dtype(sc.config)
    found, used = _plan_import(sc, dtype)
    if not found:
        raise FP4FmtError("no NVFP4 tensor (U8 weight with weight_scale and weight_scale_2)", file=sc.path)

    hints = {f: read_hints(file_metadata(f), f) for f in sc.files}
    plans: dict[Path, list[tuple[str, TensorDescriptor | tuple]]] = {f: [] for f in sc.files}
    quant_tds: dict[str, TensorDescriptor] = {}
    plain: dict[str, tuple[str, tuple[int, ...]]] = {}
    for name in sorted(sc.tensors):
        t = sc.tensors[name]
        if name in found:
            td = apply_hints(found[name].td, hints[t.file].pop(name, None), file=t.file)
            if td.axis != found[name].td.axis or td.shape != found[name].td.shape:
                raise FormatError(f"{HINTS_KEY}: modelopt stores the axes in logical order; 'axis' cannot change",
                                  file=t.file, tensor=name)
            quant_tds[name] = td
            plans[t.file].append((name, td))
        elif name not in used:
            plain[name] = (t.dtype, t.shape)
            plans[t.file].append((name, (t.dtype, t.shape)))
    for f, left in hints.items():
        if left:
            raise FormatError(f"{HINTS_KEY} names tensors that are not quantized here: {sorted(left)[:3]}", file=f)

    # the fp4fmt quantization_config, keeping modelopt's configs when the export would not rewrite them
    groups: dict[str, set[float]] = {}
    for name, q in found.items():
        if fused_group(name):
            groups.setdefault(fused_group(name), set()).add(float(sc.read(q.scale_2)[()]))
    fused = all(len(v) == 1 for v in groups.values())
    with_input = all(scale_names(n)[2] in plain for n in found)
    fresh_hf, fresh_qc = modelopt_configs("NVFP4" if with_input else "W4A16_NVFP4", excluded_modules(plain, found))
    keep = None
    if not (src_hf is not None and same_json(src_hf, fresh_hf) and same_json(src_qc, fresh_qc)):
        keep = {"format": FORMAT, "hf_quant_config": src_hf, "quantization_config": src_qc}
    qc = fp4fmt_quantization_config("nvfp4", "amax", fused, kept_modules(plain), keep)

    def read(name: str):
        if name not in found:
            return sc.read(name)
        q = found[name]
        codes = np.moveaxis(sc.read(q.weight), q.packed_axis, -1)
        scales = np.moveaxis(sc.read(q.scale), q.packed_axis, -1)
        return qtensor_for(quant_tds[name], codes, scales, sc.read(q.scale_2)[()], file=sc.tensors[name].file)

    tick = counter("importing", len(found) + len(plain), progress)
    with OutputDir(out_path, overwrite) as out:
        weight_map: dict[str, str] = {}
        for f in sc.files:
            meta = {k: v for k, v in file_metadata(f).items() if k != HINTS_KEY}
            write_fp4fmt_shard(out.file(f.name), plans[f], meta, read, tick)
            with safe_open(out.file(f.name)) as g:
                weight_map.update({n: f.name for n in g.stored_keys()})
        if len(sc.files) > 1:
            write_fp4fmt_index(out, [f.name for f in sc.files], weight_map)
        out.file("config.json").write_text(json.dumps(with_quantization_config(sc.config, qc), indent=2) + "\n",
                                           encoding="utf-8")
        out.copy_side_files(sc.side_files())
    return InteropReport(out_path, "fp4fmt", len(found), len(plain), tuple(f.name for f in sc.files),
                         ("modelopt configs kept under quantization_config.imported_from",) if keep else ())


__all__ = ["FORMAT", "InteropReport", "detect", "export_checkpoint", "import_checkpoint", "modelopt_configs",
           "scale_names", "write_export_shard", "write_safetensors"]
