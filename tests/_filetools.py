"""Helpers for tests that take fp4fmt files apart and put (possibly broken) ones back together.

A file is ``8-byte little-endian header length N | N bytes of JSON header | data``. These helpers work on
the raw bytes only (``json`` and ``struct``), independently of fp4fmt's own container code, so that a
test can craft exactly the file it needs: a valid one with one field changed, or a deliberately bad one.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable
from dataclasses import dataclass

DESCRIPTOR_KEY = "fp4fmt"
METADATA_KEY = "__metadata__"


@dataclass
class Stored:
    """One stored tensor of a file: safetensors dtype name, shape and raw bytes."""

    dtype: str
    shape: list[int]
    data: bytes


def split(blob: bytes) -> tuple[int, dict, bytes]:
    """(header length N, header JSON object in file order, data buffer) of a well-formed file."""
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + n].decode("utf-8"))
    return n, header, blob[8 + n :]


def header_bytes(text: bytes, *, align: int = 8) -> bytes:
    """``text`` padded with spaces to ``align`` bytes, preceded by its 8-byte length."""
    text += b" " * (-len(text) % align)
    return struct.pack("<Q", len(text)) + text


def join(header: dict, data: bytes) -> bytes:
    """A file from a header object (serialized as is, key order kept) and a data buffer."""
    return header_bytes(json.dumps(header, separators=(",", ":")).encode("utf-8")) + data


def edit_header(blob: bytes, edit: Callable[[dict], None]) -> bytes:
    """Apply ``edit`` to the parsed header of ``blob`` in place and re-serialize with a fresh length."""
    _, header, data = split(blob)
    edit(header)
    return join(header, data)


def descriptor_of(blob: bytes) -> dict:
    """The parsed fp4fmt descriptor of a file."""
    return json.loads(split(blob)[1][METADATA_KEY][DESCRIPTOR_KEY])


def edit_descriptor(blob: bytes, edit: Callable[[dict], None]) -> bytes:
    """Apply ``edit`` to the parsed descriptor document in place and rewrite the header around it."""

    def _edit(header: dict) -> None:
        doc = json.loads(header[METADATA_KEY][DESCRIPTOR_KEY])
        edit(doc)
        header[METADATA_KEY][DESCRIPTOR_KEY] = json.dumps(doc, separators=(",", ":"))

    return edit_header(blob, _edit)


def unpack(blob: bytes) -> tuple[dict, dict[str, Stored]]:
    """(``__metadata__``, {name: Stored}) of a well-formed file, tensors in data order."""
    _, header, data = split(blob)
    metadata = header.pop(METADATA_KEY, {})
    entries = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"])
    stored = {}
    for name, info in entries:
        begin, end = info["data_offsets"]
        stored[name] = Stored(info["dtype"], list(info["shape"]), data[begin:end])
    return metadata, stored


def pack(metadata: dict, stored: dict[str, Stored]) -> bytes:
    """A container with ``stored`` laid out back to back in dict order (offsets computed here)."""
    header: dict = {METADATA_KEY: metadata} if metadata else {}
    pos, chunks = 0, []
    for name, s in stored.items():
        header[name] = {"dtype": s.dtype, "shape": s.shape, "data_offsets": [pos, pos + len(s.data)]}
        pos += len(s.data)
        chunks.append(s.data)
    return join(header, b"".join(chunks))


def sha256(data: bytes) -> str:
    """The checksum string the descriptor records for ``data``."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def data_offset(blob: bytes, name: str) -> int:
    """Absolute file offset of the first byte of stored tensor ``name``."""
    n, header, _ = split(blob)
    return 8 + n + header[name]["data_offsets"][0]


def flip_byte(blob: bytes, offset: int, mask: int = 0xFF) -> bytes:
    """``blob`` with the byte at ``offset`` XORed with ``mask``."""
    out = bytearray(blob)
    out[offset] ^= mask
    return bytes(out)
