"""The safetensors-shaped public API: ``save_file``, ``load_file``, ``safe_open``, ``save``, ``load``.

Values are ``QTensor`` (written as their parts plus a descriptor entry) or plain numpy arrays (written as
they are). Reading validates the container and the descriptor before any tensor is handed out.
"""

from __future__ import annotations

import dataclasses

import hashlib
import mmap
import os
import threading
from collections.abc import Mapping
from typing import Union

import numpy as np

from . import container, descriptor, dtypes, layout
from .errors import ChecksumError, FormatError, WriteError
from .qtensor import QTensor, check_scales


def _plain_item(name: str, value) -> container.Item:
    arr = np.asarray(value)
    try:
        st = dtypes.dtype_name(arr.dtype)
    except ValueError as e:
        raise WriteError(str(e), tensor=name) from None
    # np.ascontiguousarray promotes 0-dim arrays to shape (1,): keep the caller's shape.
    arr = np.ascontiguousarray(arr, dtype=dtypes.numpy_dtype(st)).reshape(arr.shape)
    return container.Item(name, st, tuple(arr.shape), arr)


def _descriptor_of(name: str, qt: QTensor) -> descriptor.TensorDescriptor:
    return descriptor.TensorDescriptor(name, qt.scheme, qt.shape, qt.dtype, qt.axis, qt.scale_layout, qt.scale_rule)


def _items(tensors: Mapping[str, object]) -> tuple[list[container.Item], dict[str, descriptor.TensorDescriptor]]:
    items: list[container.Item] = []
    tds: dict[str, descriptor.TensorDescriptor] = {}
    for name, value in tensors.items():
        if not isinstance(name, str) or not name:
            raise WriteError(f"tensor names must be non-empty strings, got {name!r}")
        if name == container.METADATA_KEY:
            raise WriteError("'__metadata__' is reserved by safetensors", tensor=name)
        if isinstance(value, QTensor):
            td = _descriptor_of(name, value)
            tds[name] = td
            parts = td.part_names()
            items.append(container.Item(parts["codes"], "U8", value.codes.shape, np.ascontiguousarray(value.codes)))
            scales = np.ascontiguousarray(value.scales)
            items.append(container.Item(parts["scales"], dtypes.dtype_name(scales.dtype), scales.shape, scales))
            if "tensor_scale" in parts:
                ts = np.array(value.tensor_scale, dtype="<f4")
                items.append(container.Item(parts["tensor_scale"], "F32", (), ts))
        else:
            items.append(_plain_item(name, value))
    seen: dict[str, str] = {}
    for it in items:
        if it.name in seen or it.name in tds:
            raise WriteError(f"stored name {it.name!r} is used twice (a quantized tensor's parts are NAME.codes, "
                             "NAME.scales, NAME.tensor_scale)", tensor=it.name)
        seen[it.name] = it.name
    return items, tds


def _serialize(tensors: Mapping[str, object], metadata: Mapping[str, str] | None) -> tuple[bytes, list[container.Item]]:
    meta = _check_metadata(metadata)
    items, tds = _items(tensors)
    sums = {it.name: descriptor.checksum(it.data.reshape(-1).view(np.uint8)) for it in items}
    meta[descriptor.DESCRIPTOR_KEY] = descriptor.build(tds, sums)
    ordered = container.layout_order(items)
    return container.build_header(ordered, meta), ordered


def save_file(tensors: Mapping[str, object], filename: str | os.PathLike, metadata: Mapping[str, str] | None = None) -> None:
    """Write ``tensors`` (QTensors and numpy arrays) to ``filename`` atomically and deterministically."""
    try:
        layout = layout_of(tensors)
    except WriteError as e:
        raise WriteError(e.rule, file=filename, tensor=e.tensor) from None
    with StreamingWriter(filename, layout, metadata) as w:
        for name, value in tensors.items():
            w.add(name, value)


PlannedTensor = Union[descriptor.TensorDescriptor, tuple]  # a quantized tensor, or (dtype name, shape)


def layout_of(tensors: Mapping[str, object]) -> dict[str, PlannedTensor]:
    """What :class:`StreamingWriter` needs to know up front about ``tensors``."""
    out: dict[str, PlannedTensor] = {}
    for name, value in tensors.items():
        if isinstance(value, QTensor):
            out[name] = _descriptor_of(name, value)
        else:
            try:
                out[name] = (dtypes.dtype_name(np.asarray(value).dtype), tuple(np.shape(value)))
            except ValueError as e:
                raise WriteError(str(e), tensor=name) from None
    return out


_PLACEHOLDER_SUM = descriptor.CHECKSUM_ALGORITHM + ":" + "0" * 64


class StreamingWriter:
    """Write an fp4fmt file one tensor at a time, holding no more than the tensor being added.

    The names, dtypes and shapes are fixed up front (``layout``: name -> TensorDescriptor for a quantized
    tensor, or (dtype name, shape) for a plain one), so every tensor's offset is known; ``add`` writes each
    tensor's bytes at its place in a temporary file and hashes them; ``close`` writes the header (checksums
    have a fixed length, so it does not move) and renames the file into place. The bytes equal what
    :func:`save` produces for the same tensors. On an exception inside ``with``, nothing is left behind.
    """

    def __init__(self, filename: str | os.PathLike, layout: Mapping[str, PlannedTensor], metadata: Mapping[str, str] | None = None):
        self.filename = os.fspath(filename)
        try:
            meta = _check_metadata(metadata)
            self._slots = self._plan(layout)
            self._tds = {n: td for n, td in layout.items() if isinstance(td, descriptor.TensorDescriptor)}
            self._layout = dict(layout)
            self._order = container.layout_order(self._slots.values())
            self._offsets = container.offsets(self._order)
            self._meta = meta
            header = self._header({n: _PLACEHOLDER_SUM for n in self._slots})
        except WriteError as e:
            raise WriteError(e.rule, file=self.filename, tensor=e.tensor) from None
        self._data_start = len(header)
        self._sums: dict[str, str] = {}
        self._pieces: dict[str, int] = {}
        self._lock = threading.Lock()
        try:
            self._fd, self._tmp = container._create_temp(os.path.dirname(os.path.abspath(self.filename)),
                                                         os.path.basename(self.filename))
        except OSError as e:
            raise WriteError(f"writing failed: {e.strerror or e}", file=self.filename) from e
        try:
            os.ftruncate(self._fd, self._data_start + sum(sl.nbytes for sl in self._order))
        except OSError as e:
            self.abort()
            raise WriteError(f"writing failed: {e.strerror or e}", file=self.filename) from e

    @staticmethod
    def _plan(layout: Mapping[str, PlannedTensor]) -> dict[str, container.Slot]:
        slots: dict[str, container.Slot] = {}
        quantized = {n for n, v in layout.items() if isinstance(v, descriptor.TensorDescriptor)}
        for name, spec in layout.items():
            if not isinstance(name, str) or not name:
                raise WriteError(f"tensor names must be non-empty strings, got {name!r}")
            if name == container.METADATA_KEY:
                raise WriteError("'__metadata__' is reserved by safetensors", tensor=name)
            if isinstance(spec, descriptor.TensorDescriptor):
                new = [container.Slot(part, dt, tuple(shape)) for part, (dt, shape) in spec.part_specs().items()]
            else:
                dt, shape = spec
                dtypes.numpy_dtype(dt)
                new = [container.Slot(name, dt, tuple(int(d) for d in shape))]
            for sl in new:
                if sl.name in slots or sl.name in quantized:
                    raise WriteError(f"stored name {sl.name!r} is used twice (a quantized tensor's parts are "
                                     "NAME.codes, NAME.scales, NAME.tensor_scale)", tensor=sl.name)
                slots[sl.name] = sl
        return slots

    def _header(self, sums: dict[str, str]) -> bytes:
        meta = dict(self._meta)
        meta[descriptor.DESCRIPTOR_KEY] = descriptor.build(self._tds, sums)
        return container.build_header(self._order, meta)

    def _put(self, slot_name: str, data: np.ndarray) -> None:
        sl = self._slots[slot_name]
        if slot_name in self._sums:
            raise WriteError("tensor written twice", file=self.filename, tensor=slot_name)
        raw = memoryview(np.ascontiguousarray(data).reshape(-1).view(np.uint8))
        if raw.nbytes != sl.nbytes:
            raise WriteError(f"expected {sl.nbytes} bytes, got {raw.nbytes}", file=self.filename, tensor=slot_name)
        self._pwrite(slot_name, raw, 0)
        self._sums[slot_name] = descriptor.checksum(raw)

    def _pwrite(self, slot_name: str, raw: memoryview, offset: int) -> None:
        """Write all of ``raw`` at ``offset`` within stored tensor ``slot_name``."""
        pos = self._data_start + self._offsets[slot_name] + offset
        try:
            while raw.nbytes:
                n = os.pwrite(self._fd, raw, pos)
                raw, pos = raw[n:], pos + n
        except OSError as e:
            raise WriteError(f"writing failed: {e.strerror or e}", file=self.filename, tensor=slot_name) from e

    def add(self, name: str, value) -> None:
        """Write one tensor of the layout (a QTensor matching its descriptor, or a plain array)."""
        spec = self._layout.get(name)
        if spec is None:
            raise WriteError("not in the layout given to the writer", file=self.filename, tensor=name)
        if isinstance(spec, descriptor.TensorDescriptor):
            # a QTensor does not carry the quantizer's name: the writer's plan records it
            if not isinstance(value, QTensor) or dataclasses.replace(_descriptor_of(name, value),
                                                                      quantizer=spec.quantizer) != spec:
                raise WriteError("value does not match its planned quantized descriptor", file=self.filename, tensor=name)
            parts = spec.part_names()
            self._put(parts["codes"], value.codes)
            self._put(parts["scales"], value.scales)
            if "tensor_scale" in parts:
                self._put(parts["tensor_scale"], np.array(value.tensor_scale, dtype="<f4"))
        else:
            if isinstance(value, QTensor):
                raise WriteError("planned as a plain tensor but given a QTensor", file=self.filename, tensor=name)
            try:
                item = _plain_item(name, value)
            except WriteError as e:
                raise WriteError(e.rule, file=self.filename, tensor=name) from None
            if (item.dtype, item.shape) != (spec[0], tuple(spec[1])):
                raise WriteError(f"planned as {spec[0]} {list(spec[1])}, got {item.dtype} {list(item.shape)}",
                                 file=self.filename, tensor=name)
            self._put(name, item.data)

    def write_part(self, slot_name: str, offset: int, data) -> None:
        """Write bytes of stored tensor ``slot_name`` (a part name, or a plain tensor's name) at ``offset``
        within it: for tensors produced in pieces, possibly from several threads. The pieces must tile the
        tensor exactly; its checksum is computed from the file when the writer closes."""
        sl = self._slots.get(slot_name)
        if sl is None:
            raise WriteError("not a stored tensor of this file's layout", file=self.filename, tensor=slot_name)
        raw = memoryview(np.ascontiguousarray(data).reshape(-1).view(np.uint8))
        if offset < 0 or offset + raw.nbytes > sl.nbytes:
            raise WriteError(f"piece [{offset}, {offset + raw.nbytes}) outside the tensor's {sl.nbytes} bytes",
                             file=self.filename, tensor=slot_name)
        self._pwrite(slot_name, raw, offset)
        with self._lock:
            self._pieces[slot_name] = self._pieces.get(slot_name, 0) + raw.nbytes

    def _checksum_from_file(self, slot_name: str) -> str:
        sl = self._slots[slot_name]
        h = hashlib.sha256()
        pos, end = self._data_start + self._offsets[slot_name], self._data_start + self._offsets[slot_name] + sl.nbytes
        while pos < end:
            try:
                chunk = os.pread(self._fd, min(16 << 20, end - pos), pos)
            except OSError as e:
                raise WriteError(f"reading back failed: {e.strerror or e}", file=self.filename, tensor=slot_name) from e
            if not chunk:
                raise WriteError("file shorter than planned", file=self.filename, tensor=slot_name)
            h.update(chunk)
            pos += len(chunk)
        return f"{descriptor.CHECKSUM_ALGORITHM}:{h.hexdigest()}"

    def add_part(self, slot_name: str, data) -> None:
        """Write one whole stored tensor (a part name, or a plain tensor's name) and checksum it now."""
        self._put(slot_name, data)

    def pieced_slots(self) -> list[str]:
        """Stored tensors written with :meth:`write_part` that are not checksummed yet."""
        with self._lock:
            return [n for n in self._pieces if n not in self._sums]

    def finish_part(self, slot_name: str) -> None:
        """Checksum a tensor written with :meth:`write_part` once all its pieces are in (thread-safe; lets the
        hashing of one tensor overlap the work on the next). ``close`` does it for any not finished."""
        with self._lock:
            n = self._pieces.get(slot_name, 0)
        if n != self._slots[slot_name].nbytes:
            raise WriteError(f"pieces cover {n} of {self._slots[slot_name].nbytes} bytes", file=self.filename,
                             tensor=slot_name)
        digest = self._checksum_from_file(slot_name)
        with self._lock:
            self._sums[slot_name] = digest

    def close(self) -> None:
        """Write the header and move the file into place (atomically)."""
        for name in [n for n in self._pieces if n not in self._sums]:
            try:
                self.finish_part(name)
            except WriteError:
                self.abort()
                raise
        missing = [n for n in self._slots if n not in self._sums]
        if missing:
            self.abort()
            raise WriteError(f"{len(missing)} planned tensor(s) never written, e.g. {missing[:3]}", file=self.filename)
        header = self._header(self._sums)
        assert len(header) == self._data_start, "checksums have a fixed length"
        try:
            os.pwrite(self._fd, header, 0)
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None
            os.replace(self._tmp, self.filename)
        except OSError as e:
            self.abort()
            raise WriteError(f"writing failed: {e.strerror or e}", file=self.filename) from e
        container.fsync_directory(os.path.dirname(os.path.abspath(self.filename)))

    def abort(self) -> None:
        """Discard the temporary file; the destination is left as it was."""
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = None
        try:
            os.unlink(self._tmp)
        except OSError:
            pass

    def __enter__(self) -> StreamingWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _check_metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
    meta = dict(metadata or {})
    for k, v in meta.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise WriteError(f"metadata must map strings to strings; got {k!r}: {type(v).__name__}")
    if descriptor.DESCRIPTOR_KEY in meta:
        raise WriteError(f"metadata key {descriptor.DESCRIPTOR_KEY!r} is reserved for the fp4fmt descriptor")
    return meta


def save(tensors: Mapping[str, object], metadata: Mapping[str, str] | None = None) -> bytes:
    """The bytes ``save_file`` would write."""
    header, items = _serialize(tensors, metadata)
    return header + b"".join(it.data.reshape(-1).view(np.uint8).tobytes() for it in items)


class safe_open:
    """Lazy, memory-mapped reader: ``get_tensor`` hands out read-only zero-copy views of the file.

    ``with fp4fmt.safe_open(path) as f: f.keys(); f.get_tensor(name)``. The header and descriptor are
    validated on open; ``verify()`` also checks every checksum and scale.
    """

    def __init__(self, filename: str | os.PathLike | bytes, framework: str = "numpy"):
        if framework not in ("numpy", "np"):
            raise ValueError("fp4fmt.safe_open yields numpy arrays; use fp4fmt.torch for torch tensors")
        if isinstance(filename, (bytes, bytearray, memoryview)):
            self.filename = "<bytes>"
            self._buf = memoryview(bytes(filename))
        else:
            self.filename = os.fspath(filename)
            try:
                with open(self.filename, "rb") as f:
                    size = os.fstat(f.fileno()).st_size
                    self._buf = memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)) if size else memoryview(b"")
            except OSError as e:
                raise FormatError(f"cannot open: {e.strerror or e}", file=self.filename) from None
        n = len(self._buf)
        self.header = container.parse_header(self._buf[: min(n, 8 + container.MAX_HEADER_SIZE)], n, file=self.filename)
        self.descriptor = descriptor.parse(self.header, file=self.filename)
        self._owner = self.descriptor.owner_of() if self.descriptor else {}

    def __enter__(self) -> safe_open:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Drop this reader's reference to the mapping; views already handed out stay valid."""
        self._buf = None

    # -- listing -----------------------------------------------------------------------------------------
    @property
    def is_fp4fmt(self) -> bool:
        return self.descriptor is not None

    def keys(self) -> list[str]:
        """Logical tensor names, sorted: quantized tensors by name, plain tensors as stored."""
        plain = [n for n in self.header.entries if n not in self._owner]
        quant = list(self.descriptor.tensors) if self.descriptor else []
        return sorted(plain + quant)

    def stored_keys(self) -> list[str]:
        """The names safetensors itself sees (parts included), in data order."""
        return list(self.header.entries)

    def metadata(self) -> dict[str, str]:
        """The user metadata (``__metadata__`` without the fp4fmt descriptor)."""
        return {k: v for k, v in self.header.metadata.items() if k != descriptor.DESCRIPTOR_KEY}

    def tensor_descriptor(self, name: str) -> descriptor.TensorDescriptor | None:
        """The descriptor of a quantized tensor, None for a plain one."""
        self._check_name(name)
        return self.descriptor.tensors.get(name) if self.descriptor else None

    # -- reading -----------------------------------------------------------------------------------------
    def _check_name(self, name: str) -> None:
        if name in self._owner or (name not in self.header.entries and not (self.descriptor and name in self.descriptor.tensors)):
            raise KeyError(f"{self.filename}: no tensor named {name!r}")

    def _view(self, stored: str) -> np.ndarray:
        if self._buf is None:
            raise FormatError("the reader is closed", file=self.filename, tensor=stored)
        e = self.header.entries[stored]
        dt = dtypes.numpy_dtype(e.dtype)
        start = self.header.data_start + e.begin
        arr = np.frombuffer(self._buf, dtype=dt, count=e.nbytes // dt.itemsize, offset=start) if e.nbytes else np.empty(0, dt)
        return arr.reshape(e.shape)

    def get_raw(self, stored: str) -> np.ndarray:
        """A stored tensor (a part included) as a zero-copy view."""
        if stored not in self.header.entries:
            raise KeyError(f"{self.filename}: no stored tensor named {stored!r}")
        return self._view(stored)

    def read_raw(self, stored: str) -> np.ndarray:
        """A stored tensor (a part included) as a fresh, writable array read with ``pread``: unlike
        :meth:`get_raw` it does not keep the file's pages mapped, so memory holds one copy of the data."""
        if stored not in self.header.entries:
            raise KeyError(f"{self.filename}: no stored tensor named {stored!r}")
        e = self.header.entries[stored]
        dt = dtypes.numpy_dtype(e.dtype)
        out = np.empty(e.nbytes // dt.itemsize, dtype=dt)
        if self._buf is None:
            raise FormatError("the reader is closed", file=self.filename, tensor=stored)
        if self.filename == "<bytes>":
            start = self.header.data_start + e.begin
            out.view(np.uint8)[:] = np.frombuffer(self._buf[start: start + e.nbytes], dtype=np.uint8)
            return out.reshape(e.shape)
        buf = memoryview(out.view(np.uint8))
        try:
            fd = os.open(self.filename, os.O_RDONLY)
            try:
                pos, done = self.header.data_start + e.begin, 0
                while done < e.nbytes:
                    n = os.preadv(fd, [buf[done:]], pos + done)
                    if n <= 0:
                        raise FormatError("file ended before the tensor's data (truncated?)", file=self.filename,
                                          tensor=stored)
                    done += n
            finally:
                os.close(fd)
        except OSError as err:
            raise FormatError(f"cannot read: {err.strerror or err}", file=self.filename, tensor=stored) from None
        return out.reshape(e.shape)

    def get_tensor(self, name: str):
        """A QTensor (zero-copy views of its parts) or a read-only numpy view of a plain tensor."""
        self._check_name(name)
        td = self.descriptor.tensors.get(name) if self.descriptor else None
        if td is None:
            return self._view(name)
        parts = td.part_names()
        ts = self._view(parts["tensor_scale"])[()] if "tensor_scale" in parts else None
        try:
            return QTensor(
                scheme=td.scheme,
                shape=td.shape,
                codes=self._view(parts["codes"]),
                scales=self._view(parts["scales"]),
                tensor_scale=ts,
                axis=td.axis,
                dtype=td.dtype,
                scale_layout=td.scale_layout,
                scale_rule=td.scale_rule,
            )
        except FormatError as e:
            raise FormatError(e.rule, file=self.filename, tensor=name) from None

    def verify(self) -> None:
        """Check every stored tensor's checksum, every block scale, and zero padding (§3.3, §5.4).

        Raises ChecksumError or FormatError on the first problem found.
        """
        if self.descriptor is None:
            raise FormatError("no fp4fmt descriptor: a plain safetensors file (§3)", file=self.filename)
        for stored, want in self.descriptor.checksums.items():
            got = descriptor.checksum(self._view(stored).reshape(-1).view(np.uint8))
            if got != want:
                raise ChecksumError(f"checksum mismatch: recorded {want}, computed {got} (§3.3)", file=self.filename, tensor=stored)
        for name in self.descriptor.tensors:
            qt = self.get_tensor(name)
            check_scales(qt, name=name, file=self.filename)
            check_padding(qt, name=name, file=self.filename)


def check_padding(qt: QTensor, *, name: str | None = None, file=None) -> None:
    """Padding codes (past the logical end of the blocked axis) and swizzle padding must be zero (§6.2, §6.4)."""
    geo = qt.geometry
    if geo.padding:
        first_pad = geo.k  # element index of the first padded element
        tail = qt.codes[..., first_pad // 2 :]
        if first_pad % 2:
            if np.any(tail[..., 0] >> 4) or np.any(tail[..., 1:]):
                raise FormatError("padding codes must be zero (§6.2)", file=file, tensor=name)
        elif np.any(tail):
            raise FormatError("padding codes must be zero (§6.2)", file=file, tensor=name)
    if qt.scale_layout == "swizzled":
        raw = qt.scales.view(np.uint8)
        lin = layout.unswizzle_scales(raw, geo.storage_shape[-2], geo.n_blocks)
        if not np.array_equal(layout.swizzle_scales(lin), raw):
            raise FormatError("padding of the swizzled scales must be zero (§6.4)", file=file, tensor=name)


def _materialize(value):
    if isinstance(value, QTensor):
        return QTensor(
            scheme=value.scheme,
            shape=value.shape,
            codes=np.array(value.codes),
            scales=np.array(value.scales),
            tensor_scale=value.tensor_scale,
            axis=value.axis,
            dtype=value.dtype,
            scale_layout=value.scale_layout,
            scale_rule=value.scale_rule,
        )
    return np.array(value)


def load_file(filename: str | os.PathLike) -> dict[str, object]:
    """Read every tensor of ``filename`` into memory (copies): {name: QTensor | np.ndarray}."""
    with safe_open(filename) as f:
        return {name: _materialize(f.get_tensor(name)) for name in f.keys()}


def load(data: bytes) -> dict[str, object]:
    """Like :func:`load_file`, from the bytes of a file."""
    with safe_open(data) as f:
        return {name: _materialize(f.get_tensor(name)) for name in f.keys()}
