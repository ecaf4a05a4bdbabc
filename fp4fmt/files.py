"""The safetensors-shaped public API: ``save_file``, ``load_file``, ``safe_open``, ``save``, ``load``.

Values are ``QTensor`` (written as their parts plus a descriptor entry) or plain numpy arrays (written as
they are). Reading validates the container and the descriptor before any tensor is handed out.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Mapping

import numpy as np

from . import container, descriptor, dtypes, layout
from .errors import ChecksumError, FormatError, WriteError
from .qtensor import QTensor, check_scales

Tensor = "QTensor | np.ndarray"


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
    meta = dict(metadata or {})
    for k, v in meta.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise WriteError(f"metadata must map strings to strings; got {k!r}: {type(v).__name__}")
    if descriptor.DESCRIPTOR_KEY in meta:
        raise WriteError(f"metadata key {descriptor.DESCRIPTOR_KEY!r} is reserved for the fp4fmt descriptor")
    items, tds = _items(tensors)
    sums = {it.name: descriptor.checksum(it.data.reshape(-1).view(np.uint8)) for it in items}
    meta[descriptor.DESCRIPTOR_KEY] = descriptor.build(tds, sums)
    ordered = container.layout_order(items)
    return container.build_header(ordered, meta), ordered


def save_file(tensors: Mapping[str, object], filename: str | os.PathLike, metadata: Mapping[str, str] | None = None) -> None:
    """Write ``tensors`` (QTensors and numpy arrays) to ``filename`` atomically and deterministically."""
    try:
        header, items = _serialize(tensors, metadata)
    except WriteError as e:
        raise WriteError(e.rule, file=filename, tensor=e.tensor) from None
    container.write_atomic(filename, header, items)


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
