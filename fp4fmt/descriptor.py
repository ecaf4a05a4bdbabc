"""The fp4fmt descriptor (spec §3): the JSON document stored under ``__metadata__["fp4fmt"]``.

It says which stored tensors are the parts of which quantized tensor, with everything needed to decode
them, and a checksum of every stored tensor. ``parse`` validates a descriptor against a container
header; ``build`` writes one.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass

from . import dtypes, layout, schemes
from .container import Header, _Duplicate, _reject_duplicates, shape_fits_numpy
from .errors import FormatError, UnsupportedVersionError

FORMAT_VERSION = "1.0"
SUPPORTED_MAJOR = 1
DESCRIPTOR_KEY = "fp4fmt"
CHECKSUM_ALGORITHM = "sha256"

# §3.2: the stored parts of a quantized tensor NAME are NAME + suffix.
CODES_SUFFIX = ".codes"
SCALES_SUFFIX = ".scales"
TENSOR_SCALE_SUFFIX = ".tensor_scale"

_VERSION_RE = re.compile(r"^(0|[1-9][0-9]{0,8})\.(0|[1-9][0-9]{0,8})$")
_REQUIRED = ("scheme", "shape", "dtype", "axis", "block_size", "padding", "scale_layout", "scale_rule", "quantizer")


@dataclass(frozen=True)
class TensorDescriptor:
    """Everything the descriptor says about one quantized tensor (§3.1)."""

    name: str
    scheme: str
    shape: tuple[int, ...]
    dtype: str
    axis: int
    scale_layout: str
    scale_rule: str
    quantizer: str = "rtn"

    @property
    def block_size(self) -> int:
        return schemes.SCHEMES[self.scheme].block_size

    @property
    def geometry(self) -> layout.Geometry:
        return layout.geometry(self.shape, self.axis, self.block_size, self.scale_layout)

    def part_names(self) -> dict[str, str]:
        """Stored tensor names of the parts: codes, scales and (NVFP4) tensor_scale."""
        names = {"codes": self.name + CODES_SUFFIX, "scales": self.name + SCALES_SUFFIX}
        if schemes.SCHEMES[self.scheme].has_tensor_scale:
            names["tensor_scale"] = self.name + TENSOR_SCALE_SUFFIX
        return names

    def part_specs(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        """Expected (dtype, shape) of each stored part."""
        geo = self.geometry
        sch = schemes.SCHEMES[self.scheme]
        names = self.part_names()
        specs = {names["codes"]: ("U8", geo.codes_shape), names["scales"]: (sch.scale_dtype, geo.scales_shape)}
        if "tensor_scale" in names:
            specs[names["tensor_scale"]] = ("F32", ())
        return specs

    def to_json(self) -> dict:
        geo = self.geometry
        return {
            "scheme": self.scheme,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "axis": self.axis,
            "block_size": self.block_size,
            "padding": geo.padding,
            "scale_layout": self.scale_layout,
            "scale_rule": self.scale_rule,
            "quantizer": self.quantizer,
        }


@dataclass(frozen=True)
class Descriptor:
    """A parsed descriptor: its version, the quantized tensors, and the checksum of each stored tensor."""

    version: str
    tensors: dict[str, TensorDescriptor]
    checksums: dict[str, str]

    def owner_of(self) -> dict[str, str]:
        """stored part name -> name of the quantized tensor it belongs to."""
        return {part: name for name, td in self.tensors.items() for part in td.part_names().values()}


def checksum(data) -> str:
    """``sha256:<hex>`` of a tensor's stored bytes (§3.3)."""
    return f"{CHECKSUM_ALGORITHM}:{hashlib.sha256(memoryview(data).cast('B')).hexdigest()}"


def build(tensors: dict[str, TensorDescriptor], checksums: dict[str, str]) -> str:
    """The descriptor JSON string written by fp4fmt (compact, keys sorted: deterministic)."""
    doc = {
        "format_version": FORMAT_VERSION,
        "tensors": {name: tensors[name].to_json() for name in sorted(tensors)},
        "checksums": {name: checksums[name] for name in sorted(checksums)},
    }
    return json.dumps(doc, separators=(",", ":"), sort_keys=True, ensure_ascii=True)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def parse_version(v, *, file=None) -> tuple[int, int]:
    if not isinstance(v, str) or not _VERSION_RE.match(v):
        raise FormatError(f"format_version must be a string 'MAJOR.MINOR', got {v!r} (§1.2)", file=file)
    major, minor = (int(p) for p in v.split("."))
    if major != SUPPORTED_MAJOR:
        raise UnsupportedVersionError(
            f"format version {v} is not supported: this reader implements {SUPPORTED_MAJOR}.x (§1.2)", file=file
        )
    return major, minor


def _tensor_descriptor(name: str, d, *, file) -> TensorDescriptor:
    def bad(rule: str) -> FormatError:
        return FormatError(f"descriptor: {rule} (§3.1)", file=file, tensor=name)

    if not isinstance(d, dict):
        raise bad("entry must be a JSON object")
    missing = [k for k in _REQUIRED if k not in d]
    if missing:
        raise bad(f"missing field(s) {', '.join(missing)}")
    scheme = d["scheme"]
    if not isinstance(scheme, str) or scheme not in schemes.SCHEMES:
        raise bad(f"unknown scheme {scheme!r}; this reader knows {sorted(schemes.SCHEMES)}")
    sch = schemes.SCHEMES[scheme]
    shape = d["shape"]
    if not isinstance(shape, list) or not shape or not all(_is_int(x) and x >= 0 for x in shape):
        raise bad("shape must be a non-empty list of non-negative integers")
    if not shape_fits_numpy(shape, 4):  # dequantize makes a float32 array of this shape
        raise bad("shape is too large for an array")
    if d["dtype"] not in dtypes.FLOAT_SOURCE_DTYPES:
        raise bad(f"dtype must be one of {list(dtypes.FLOAT_SOURCE_DTYPES)}, got {d['dtype']!r}")
    axis = d["axis"]
    if not _is_int(axis) or not 0 <= axis < len(shape):
        raise bad(f"axis must be an integer in [0, {len(shape)}), got {axis!r}")
    if d["block_size"] != sch.block_size or not _is_int(d["block_size"]):
        raise bad(f"block_size of {scheme} must be {sch.block_size}, got {d['block_size']!r}")
    if d["scale_layout"] not in layout.SCALE_LAYOUTS:
        raise bad(f"scale_layout must be one of {list(layout.SCALE_LAYOUTS)}, got {d['scale_layout']!r}")
    if d["scale_layout"] == "swizzled" and len(shape) < 2:
        raise bad("the swizzled scale layout needs at least 2 dimensions")
    if d["scale_rule"] not in sch.scale_rules:
        raise bad(f"scale_rule of {scheme} must be one of {list(sch.scale_rules)}, got {d['scale_rule']!r}")
    if not isinstance(d["quantizer"], str) or not d["quantizer"]:
        raise bad("quantizer must be a non-empty string")
    td = TensorDescriptor(name, scheme, tuple(shape), d["dtype"], axis, d["scale_layout"], d["scale_rule"], d["quantizer"])
    if d["padding"] != td.geometry.padding or not _is_int(d["padding"]):
        raise bad(f"padding must be {td.geometry.padding} for this shape and block size, got {d['padding']!r}")
    return td


def parse(header: Header, *, file=None) -> Descriptor | None:
    """Parse and validate the descriptor of ``header`` (§3.4); None for a plain safetensors file.

    Unknown fields are ignored (minor-version additions); an unknown major version raises
    UnsupportedVersionError.
    """
    text = header.metadata.get(DESCRIPTOR_KEY)
    if text is None:
        return None
    try:
        doc = json.loads(text, object_pairs_hook=_reject_duplicates)
    except _Duplicate as e:
        raise FormatError(f"duplicate key {e.args[0]!r} in __metadata__['fp4fmt'] (§3.4)", file=file) from None
    except (ValueError, RecursionError) as e:
        raise FormatError(f"__metadata__['fp4fmt'] is not valid JSON ({str(e)[:200]}) (§3)", file=file) from None
    if not isinstance(doc, dict):
        raise FormatError("__metadata__['fp4fmt'] must be a JSON object (§3)", file=file)
    if "format_version" not in doc:
        raise FormatError("descriptor has no format_version (§3)", file=file)
    parse_version(doc["format_version"], file=file)
    raw_tensors = doc.get("tensors", {})
    raw_sums = doc.get("checksums")
    if not isinstance(raw_tensors, dict):
        raise FormatError("descriptor 'tensors' must be a JSON object (§3)", file=file)
    if not isinstance(raw_sums, dict):
        raise FormatError("descriptor 'checksums' must be a JSON object (§3)", file=file)

    tensors: dict[str, TensorDescriptor] = {}
    owners: dict[str, str] = {}
    for name, d in raw_tensors.items():
        if name in header.entries:
            raise FormatError("a quantized tensor's name must not also be a stored tensor (§3.2)", file=file, tensor=name)
        td = _tensor_descriptor(name, d, file=file)
        for part, (want_dtype, want_shape) in td.part_specs().items():
            if part in owners:
                raise FormatError(f"stored tensor {part!r} is claimed by both {owners[part]!r} and {name!r} (§3.2)", file=file, tensor=name)
            owners[part] = name
            e = header.entries.get(part)
            if e is None:
                raise FormatError(f"part {part!r} is missing from the file (§3.2)", file=file, tensor=name)
            if e.dtype != want_dtype or e.shape != want_shape:
                raise FormatError(
                    f"part {part!r} must be {want_dtype} {list(want_shape)}, found {e.dtype} {list(e.shape)} (§3.2)",
                    file=file,
                    tensor=name,
                )
        tensors[name] = td

    sums: dict[str, str] = {}
    for stored, value in raw_sums.items():
        if stored not in header.entries:
            raise FormatError(f"checksum listed for tensor {stored!r}, which is not in the file (§3.3)", file=file)
        if not isinstance(value, str) or not re.fullmatch(r"sha256:[0-9a-f]{64}", value):
            raise FormatError("checksum must be 'sha256:' and 64 lowercase hex digits (§3.3)", file=file, tensor=stored)
        sums[stored] = value
    unlisted = [n for n in header.entries if n not in sums]
    if unlisted:
        raise FormatError(f"no checksum for stored tensor(s) {unlisted[:5]} (§3.3)", file=file)
    return Descriptor(doc["format_version"], tensors, sums)
