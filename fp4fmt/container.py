"""The safetensors container (spec §2): parse and validate a header, lay out and write a file atomically.

This layer knows tensors only as (name, dtype name, shape, bytes). It knows nothing of quantization,
of torch, or of the fp4fmt descriptor, which lives in ``__metadata__`` and is handled by ``descriptor``.
"""

from __future__ import annotations

import json
import os
import secrets
import struct
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from . import dtypes
from .errors import FormatError, WriteError

MAX_HEADER_SIZE = 100_000_000  # bytes; the same limit as the safetensors reference implementation
HEADER_ALIGNMENT = 8  # the header is padded with spaces to a multiple of this
METADATA_KEY = "__metadata__"
_ENTRY_KEYS = {"dtype", "shape", "data_offsets"}


@dataclass(frozen=True)
class Entry:
    """One stored tensor: ``begin``/``end`` are byte offsets into the data buffer (end exclusive)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class Header:
    """A validated header: entries in data order, the ``__metadata__`` map, where the data starts."""

    entries: dict[str, Entry]
    metadata: dict[str, str]
    data_start: int
    data_len: int


def _reject_duplicates(pairs: list[tuple[str, object]]) -> dict:
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise _Duplicate(k)
        out[k] = v
    return out


class _Duplicate(Exception):
    pass


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


MAX_NDIM = 64 if np.lib.NumpyVersion(np.__version__) >= "2.0.0" else 32  # numpy's NPY_MAXDIMS


def shape_fits_numpy(shape: list[int] | tuple[int, ...], itemsize: int) -> bool:
    """True if numpy can make an array of this shape: at most MAX_NDIM dims and, zero dims aside,
    at most 2**63-1 bytes (numpy refuses larger shapes even for an empty array)."""
    if len(shape) > MAX_NDIM:
        return False
    nbytes = itemsize
    for d in shape:
        nbytes *= d or 1
    return nbytes < 2**63


def parse_header(prefix: bytes, total_len: int, *, file=None) -> Header:
    """Validate the header of a file of ``total_len`` bytes whose first bytes are ``prefix`` (§2.4).

    ``prefix`` must hold at least the 8-byte length and the header (call :func:`header_length` first).
    Checks: header size and bounds, UTF-8 JSON object with no duplicate keys, metadata of strings, known
    dtypes, shapes and offsets that are non-negative integers, byte sizes that match the shapes, and
    tensors that tile the data buffer exactly (no overlap, no hole, nothing after).
    """
    n = header_length(prefix, total_len, file=file)
    raw = bytes(prefix[8 : 8 + n])
    if raw[:1] != b"{":
        raise FormatError("the header must be a JSON object starting with '{' (§2.1)", file=file)
    try:
        text = raw.decode("utf-8")
        obj = json.loads(text, object_pairs_hook=_reject_duplicates)
    except _Duplicate as e:
        raise FormatError(f"duplicate key {e.args[0]!r} in the header (§2.4)", file=file) from None
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise FormatError(f"the header is not valid UTF-8 JSON ({type(e).__name__}: {str(e)[:200]}) (§2.1)", file=file) from None
    if not isinstance(obj, dict):
        raise FormatError("the header must be a JSON object (§2.1)", file=file)

    metadata = obj.pop(METADATA_KEY, None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise FormatError("__metadata__ must map strings to strings (§2.1)", file=file)

    data_start = 8 + n
    data_len = total_len - data_start
    entries = []
    for name, info in obj.items():
        if not isinstance(info, dict) or set(info) != _ENTRY_KEYS:
            raise FormatError("entry must have exactly the keys dtype, shape, data_offsets (§2.1)", file=file, tensor=name)
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str):
            raise FormatError("dtype must be a string (§2.3)", file=file, tensor=name)
        try:
            itemsize = dtypes.itemsize(dtype)
        except ValueError as e:
            raise FormatError(f"{e} (§2.3)", file=file, tensor=name) from None
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise FormatError("shape must be a list of non-negative integers (§2.1)", file=file, tensor=name)
        if not shape_fits_numpy(shape, itemsize):
            raise FormatError(
                f"shape of {len(shape)} dims cannot be an array (at most {MAX_NDIM} dims and 2**63-1 bytes) (§2.4)",
                file=file,
                tensor=name,
            )
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
            raise FormatError("data_offsets must be two integers [begin, end] (§2.1)", file=file, tensor=name)
        begin, end = offsets
        if not 0 <= begin <= end <= data_len:
            raise FormatError(
                f"data_offsets [{begin}, {end}] fall outside the data buffer of {data_len} bytes (§2.4)",
                file=file,
                tensor=name,
            )
        numel = 1
        for d in shape:
            numel *= d
        if numel * itemsize != end - begin:
            raise FormatError(
                f"shape {shape} of {dtype} needs {numel * itemsize} bytes but data_offsets span {end - begin} (§2.4)",
                file=file,
                tensor=name,
            )
        entries.append(Entry(name, dtype, tuple(shape), begin, end))

    entries.sort(key=lambda e: (e.begin, e.end))
    pos, prev = 0, None
    for e in entries:
        if e.begin < pos:
            raise FormatError(f"data overlaps tensor {prev!r} (§2.4)", file=file, tensor=e.name)
        if e.begin > pos:
            raise FormatError(f"hole of {e.begin - pos} bytes before this tensor's data (§2.4)", file=file, tensor=e.name)
        pos, prev = e.end, e.name
    if pos != data_len:
        raise FormatError(f"the data buffer has {data_len - pos} bytes not covered by any tensor (§2.4)", file=file)
    return Header({e.name: e for e in entries}, metadata, data_start, data_len)


def header_length(prefix: bytes, total_len: int, *, file=None) -> int:
    """The header size N read from the first 8 bytes, checked against the limit and the file size."""
    if total_len < 8 or len(prefix) < 8:
        raise FormatError(f"file of {total_len} bytes is too short to hold the 8-byte header length (§2.1)", file=file)
    (n,) = struct.unpack("<Q", bytes(prefix[:8]))
    if n > MAX_HEADER_SIZE:
        raise FormatError(f"header length {n} exceeds the limit of {MAX_HEADER_SIZE} bytes (§2.4)", file=file)
    if 8 + n > total_len:
        raise FormatError(f"header length {n} runs past the end of the {total_len}-byte file (§2.4)", file=file)
    return n


def read_header(path) -> Header:
    """The parsed header of the safetensors file at ``path``, reading only the header's bytes."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            n = header_length(prefix, size, file=path)
            prefix += f.read(n)
    except OSError as e:
        raise FormatError(f"cannot read: {e.strerror or e}", file=path) from None
    return parse_header(prefix, size, file=path)


@dataclass(frozen=True)
class Slot:
    """A tensor's place in a file to be written: name, safetensors dtype name and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = dtypes.itemsize(self.dtype)
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class Item(Slot):
    """A tensor to write: a slot plus its C-contiguous little-endian data."""

    data: np.ndarray = None  # type: ignore[assignment]


def layout_order(items: Iterable[Slot]) -> list:
    """Data order of the writer (§2.2): larger itemsize first (keeps every tensor aligned), then name."""
    return sorted(items, key=lambda it: (-dtypes.itemsize(it.dtype), it.name.encode("utf-8")))


def build_header(items: list[Slot], metadata: dict[str, str]) -> bytes:
    """Canonical header bytes (§2.2) for slots in data order: 8-byte length, compact JSON, space padded."""
    obj: dict = {}
    if metadata:
        obj[METADATA_KEY] = {k: metadata[k] for k in sorted(metadata)}
    pos = 0
    for it in items:
        obj[it.name] = {"dtype": it.dtype, "shape": list(it.shape), "data_offsets": [pos, pos + it.nbytes]}
        pos += it.nbytes
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=True).encode("ascii")
    text += b" " * (-len(text) % HEADER_ALIGNMENT)
    if len(text) > MAX_HEADER_SIZE:
        raise WriteError(f"header of {len(text)} bytes exceeds the limit of {MAX_HEADER_SIZE}")
    return struct.pack("<Q", len(text)) + text


def _create_temp(directory: str, basename: str) -> tuple[int, str]:
    """Create a new hidden temporary file beside the target with mode 0644 less the umask (as open() would)."""
    for _ in range(100):
        tmp = os.path.join(directory, f".{basename}.{secrets.token_hex(6)}.fp4fmt-tmp")
        try:
            return os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary file in {directory}")


def offsets(items: list[Slot]) -> dict[str, int]:
    """Byte offset of each slot in the data buffer, for slots in data order."""
    out, pos = {}, 0
    for it in items:
        out[it.name] = pos
        pos += it.nbytes
    return out


def fsync_directory(directory: str) -> None:
    """Best-effort fsync of a directory, so that a rename in it is durable."""
    try:
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass
