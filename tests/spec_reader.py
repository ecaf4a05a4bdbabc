"""A second, minimal reader of fp4fmt v1 files, written from the rules of the spec alone.

It does not import fp4fmt (nor safetensors, nor ml_dtypes): the container is parsed by hand, the number
formats are decoded with integer arithmetic, and the swizzled scales are read through the byte-offset
formula of §6.4. The conformance tests hold it against fp4fmt on every vector in spec/vectors/, which
shows that the format can be implemented from its rules.

    >>> tensors = read_file("spec/vectors/nvfp4_ties.fp4.safetensors")   # {name: float32 array}

Decoding (§5.3): y = fl32(E2M1(code) * f), with f = fl32(E4M3(scale) * tensor_scale) for NVFP4 and
f = 2^(scale - 127) for MXFP4. Each product is computed exactly in float64 (at most 4 x 24 significant
bits, far from float64's range limits) and rounded once to float32, which is the IEEE float32 product.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from dataclasses import dataclass

import numpy as np

BLOCK_SIZE = {"nvfp4": 16, "mxfp4": 32}
SCALE_DTYPE = {"nvfp4": "F8_E4M3", "mxfp4": "U8"}
ITEMSIZE = {"U8": 1, "F8_E4M3": 1, "F16": 2, "BF16": 2, "F32": 4, "F64": 8}


class SpecReaderError(ValueError):
    """The file breaks a rule this reader checks; the message names the file, the tensor and the rule."""


@dataclass(frozen=True)
class Stored:
    """One tensor of the container: its safetensors dtype, shape and raw little-endian bytes."""

    dtype: str
    shape: tuple[int, ...]
    data: bytes


@dataclass(frozen=True)
class Container:
    """A parsed safetensors file: its stored tensors and its ``__metadata__``."""

    path: str
    tensors: dict[str, Stored]
    metadata: dict[str, str]

    def fail(self, rule: str, tensor: str | None = None) -> SpecReaderError:
        where = f"{self.path}: tensor {tensor!r}: " if tensor else f"{self.path}: "
        return SpecReaderError(where + rule)


# -- container (§2) -----------------------------------------------------------------------------------------


def read_container(path: str) -> Container:
    """Parse a safetensors file: u64 little-endian header length N, N bytes of JSON, then the data."""
    with open(path, "rb") as f:
        blob = f.read()
    if len(blob) < 8:
        raise SpecReaderError(f"{path}: shorter than the 8-byte header length")
    (n,) = struct.unpack("<Q", blob[:8])
    if 8 + n > len(blob):
        raise SpecReaderError(f"{path}: header length {n} runs past the end of the file")
    header = json.loads(blob[8 : 8 + n].decode("utf-8"))
    data = blob[8 + n :]
    metadata = header.pop("__metadata__", None) or {}
    tensors = {}
    for name, entry in header.items():
        begin, end = entry["data_offsets"]
        shape = tuple(entry["shape"])
        size = math.prod(shape) * ITEMSIZE[entry["dtype"]]
        if not 0 <= begin <= end <= len(data) or end - begin != size:
            raise SpecReaderError(f"{path}: tensor {name!r}: data_offsets [{begin}, {end}] do not fit shape {list(shape)}")
        tensors[name] = Stored(entry["dtype"], shape, data[begin:end])
    return Container(path, tensors, metadata)


def plain_array(t: Stored) -> np.ndarray:
    """A stored tensor as numpy; BF16 is widened to float32 by shifting its 16 bits to the top."""
    if t.dtype == "BF16":
        bits = np.frombuffer(t.data, dtype="<u2").astype(np.uint32) << 16
        return bits.view(np.float32).reshape(t.shape)
    numpy_dtype = {"U8": np.uint8, "F8_E4M3": np.uint8, "F16": "<f2", "F32": "<f4", "F64": "<f8"}[t.dtype]
    return np.frombuffer(t.data, dtype=numpy_dtype).reshape(t.shape)


# -- number formats (§4) ------------------------------------------------------------------------------------


def e2m1_value(code: int) -> float:
    """E2M1 (§4.1): bit 3 sign, bits 2..1 exponent (bias 1), bit 0 mantissa; exponent 0 is subnormal."""
    sign = -1.0 if code & 0x8 else 1.0
    exp, man = (code >> 1) & 0x3, code & 0x1
    mag = man * 0.5 if exp == 0 else math.ldexp(1.0 + man / 2, exp - 1)
    return sign * mag


def e4m3_value(code: int) -> float:
    """E4M3 (§4.2): sign, 4 exponent bits (bias 7), 3 mantissa bits; S.1111.111 is NaN, no infinities."""
    if code & 0x7F == 0x7F:
        return math.nan
    sign = -1.0 if code & 0x80 else 1.0
    exp, man = (code >> 3) & 0xF, code & 0x7
    mag = math.ldexp(man, -9) if exp == 0 else math.ldexp(8 + man, exp - 10)
    return sign * mag


def e8m0_value(code: int) -> float:
    """E8M0 (§4.3): 2^(code - 127); 0xFF is NaN."""
    return math.nan if code == 0xFF else math.ldexp(1.0, code - 127)


E2M1_TABLE = np.array([e2m1_value(c) for c in range(16)], dtype=np.float64)
E4M3_TABLE = np.array([e4m3_value(c) for c in range(256)], dtype=np.float64)
E8M0_TABLE = np.array([e8m0_value(c) for c in range(256)], dtype=np.float64)


def unpack_codes(packed: np.ndarray) -> np.ndarray:
    """Packed bytes ``[rows, n]`` -> codes ``[rows, 2n]``: element 2i is the low nibble of byte i (§4.1)."""
    codes = np.empty((packed.shape[0], packed.shape[1] * 2), dtype=np.uint8)
    codes[:, 0::2] = packed & 0x0F
    codes[:, 1::2] = packed >> 4
    return codes


# -- scale layouts (§6.4) -----------------------------------------------------------------------------------


def swizzle_offsets(rows: int, cols: int) -> np.ndarray:
    """Byte offset of linear scale (r, c) inside one swizzled matrix (§6.4)."""
    r = np.arange(rows)[:, None]
    c = np.arange(cols)[None, :]
    col_tiles = -(-cols // 4)
    return ((r // 128) * col_tiles + c // 4) * 512 + (r % 32) * 16 + ((r % 128) // 32) * 4 + c % 4


def linear_scales(raw: np.ndarray, layout: str, lead: int, rows: int, cols: int) -> np.ndarray:
    """Scale codes ``[lead * rows, cols]`` from the stored bytes in either layout."""
    if layout == "linear":
        return raw.reshape(lead * rows, cols)
    per_matrix = raw.reshape(lead, -1)
    return per_matrix[:, swizzle_offsets(rows, cols)].reshape(lead * rows, cols)


# -- the descriptor and decoding (§3, §5.3, §6) ------------------------------------------------------------


@dataclass(frozen=True)
class Geometry:
    """Storage geometry of a quantized tensor: the blocked axis moved last and padded (§6, §6.2)."""

    shape: tuple[int, ...]
    axis: int
    block: int

    @property
    def storage_shape(self) -> tuple[int, ...]:
        rest = self.shape[: self.axis] + self.shape[self.axis + 1 :]
        return rest + (self.shape[self.axis],)

    @property
    def k(self) -> int:
        return self.shape[self.axis]

    @property
    def n_blocks(self) -> int:
        return -(-self.k // self.block)

    @property
    def rows(self) -> int:
        return math.prod(self.storage_shape[:-1])

    def scales_shape(self, layout: str) -> tuple[int, ...]:
        if layout == "linear":
            return self.storage_shape[:-1] + (self.n_blocks,)
        r = self.storage_shape[-2]
        return self.storage_shape[:-2] + (-(-r // 128) * 32, -(-self.n_blocks // 4) * 16)


def read_descriptor(c: Container) -> dict:
    """The fp4fmt descriptor in ``__metadata__["fp4fmt"]``; its major version must be 1 (§1.2, §3)."""
    if "fp4fmt" not in c.metadata:
        raise c.fail("no fp4fmt descriptor in __metadata__ (§3)")
    doc = json.loads(c.metadata["fp4fmt"])
    if str(doc.get("format_version", "")).split(".")[0] != "1":
        raise c.fail(f"format_version {doc.get('format_version')!r} is not 1.x (§1.2)")
    return doc


def check_checksums(c: Container, doc: dict) -> None:
    """Every stored tensor has a checksum, and each equals sha256 of the tensor's bytes (§3.3)."""
    sums = doc.get("checksums", {})
    for name, stored in c.tensors.items():
        want = sums.get(name)
        got = "sha256:" + hashlib.sha256(stored.data).hexdigest()
        if want != got:
            raise c.fail(f"checksum is {want!r} but the bytes hash to {got!r} (§3.3)", name)


def expect_part(c: Container, name: str, part: str, dtype: str, shape: tuple[int, ...]) -> Stored:
    """The stored part ``name + part``, which must have ``dtype`` and ``shape`` (§3.2)."""
    t = c.tensors.get(name + part)
    if t is None or t.dtype != dtype or t.shape != shape:
        found = None if t is None else (t.dtype, list(t.shape))
        raise c.fail(f"part {name + part!r} must be {dtype} {list(shape)}, found {found} (§3.2)", name)
    return t


def block_factors(c: Container, name: str, scheme: str, scale_codes: np.ndarray) -> np.ndarray:
    """float64 factor per block, each exactly a float32 (§5.3); NaN or negative scales are rejected."""
    if scheme == "mxfp4":
        if (scale_codes == 0xFF).any():
            raise c.fail("E8M0 scale 0xFF (NaN) (§4.3)", name)
        return E8M0_TABLE[scale_codes]
    if ((scale_codes & 0x80) | ((scale_codes & 0x7F) == 0x7F)).any():
        raise c.fail("E4M3 block scales must be non-negative and not NaN (§4.2)", name)
    (ts,) = struct.unpack("<f", expect_part(c, name, ".tensor_scale", "F32", ()).data)
    return (E4M3_TABLE[scale_codes] * ts).astype(np.float32).astype(np.float64)


def decode_tensor(c: Container, name: str, d: dict) -> np.ndarray:
    """Decode one quantized tensor to float32 of its logical shape."""
    scheme = d["scheme"]
    if scheme not in BLOCK_SIZE or d["block_size"] != BLOCK_SIZE[scheme]:
        raise c.fail(f"unknown scheme/block size {scheme!r}/{d['block_size']!r} (§3.1)", name)
    geo = Geometry(tuple(d["shape"]), d["axis"], BLOCK_SIZE[scheme])
    padded = geo.n_blocks * geo.block
    if d["padding"] != padded - geo.k:
        raise c.fail(f"padding must be {padded - geo.k} (§6.2)", name)
    codes_part = expect_part(c, name, ".codes", "U8", geo.storage_shape[:-1] + (padded // 2,))
    scales_part = expect_part(c, name, ".scales", SCALE_DTYPE[scheme], geo.scales_shape(d["scale_layout"]))
    codes = unpack_codes(plain_array(codes_part).reshape(geo.rows, padded // 2))
    lead = math.prod(geo.storage_shape[:-2]) if len(geo.shape) > 1 else 1
    rows_per_matrix = geo.storage_shape[-2] if len(geo.shape) > 1 else 1
    scale_codes = linear_scales(plain_array(scales_part), d["scale_layout"], lead, rows_per_matrix, geo.n_blocks)
    factors = block_factors(c, name, scheme, scale_codes)
    values = E2M1_TABLE[codes].reshape(geo.rows, geo.n_blocks, geo.block) * factors[:, :, None]
    with np.errstate(over="ignore"):
        y = values.reshape(geo.rows, padded)[:, : geo.k].astype(np.float32)
    if not np.isfinite(y).all():
        raise c.fail("decoded values overflow float32 (§5.3)", name)
    return np.moveaxis(y.reshape(geo.storage_shape), -1, geo.axis)


def read_file(path: str) -> dict[str, np.ndarray]:
    """Every tensor of an fp4fmt file: quantized ones decoded to float32, plain ones as stored."""
    c = read_container(path)
    doc = read_descriptor(c)
    check_checksums(c, doc)
    quantized = doc.get("tensors", {})
    parts = {name + suffix for name in quantized for suffix in (".codes", ".scales", ".tensor_scale")}
    out = {name: decode_tensor(c, name, d) for name, d in quantized.items()}
    out.update({name: plain_array(t) for name, t in c.tensors.items() if name not in parts})
    return out
