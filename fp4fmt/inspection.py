"""What ``fp4fmt inspect`` and ``fp4fmt verify`` report, as plain data (the CLI only prints it)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from . import dtypes
from .errors import FP4FmtError
from .files import safe_open


@dataclass(frozen=True)
class TensorInfo:
    """One logical tensor of a file."""

    name: str
    kind: str  # "nvfp4", "mxfp4" or "plain"
    shape: tuple[int, ...]
    dtype: str  # original dtype for quantized tensors, stored dtype for plain ones
    stored_bytes: int
    original_bytes: int  # bytes the tensor takes in its original dtype
    bits_per_weight: float
    scale_layout: str | None = None
    scale_rule: str | None = None


@dataclass(frozen=True)
class FileInfo:
    path: str
    format_version: str | None  # None: a plain safetensors file
    metadata: dict[str, str]
    tensors: list[TensorInfo] = field(default_factory=list)

    @property
    def stored_bytes(self) -> int:
        return sum(t.stored_bytes for t in self.tensors)

    @property
    def original_bytes(self) -> int:
        return sum(t.original_bytes for t in self.tensors)


def safetensors_files(path: str | os.PathLike) -> list[Path]:
    """The file itself, or every ``*.safetensors`` file of a directory (sorted)."""
    p = Path(path)
    if p.is_dir():
        files = sorted(p.glob("*.safetensors"))
        if not files:
            raise FP4FmtError("no .safetensors files in this directory", file=p)
        return files
    if not p.exists():
        raise FP4FmtError("no such file or directory", file=p)
    return [p]


def _tensor_info(f: safe_open, name: str) -> TensorInfo:
    td = f.tensor_descriptor(name)
    if td is None:
        e = f.header.entries[name]
        numel = int(np.prod(e.shape, dtype=np.int64))
        return TensorInfo(name, "plain", e.shape, e.dtype, e.nbytes, e.nbytes, 8.0 * e.nbytes / numel if numel else 0.0)
    stored = sum(f.header.entries[p].nbytes for p in td.part_names().values())
    numel = int(np.prod(td.shape, dtype=np.int64))
    original = numel * dtypes.itemsize(td.dtype)
    return TensorInfo(
        name, td.scheme, td.shape, td.dtype, stored, original, 8.0 * stored / numel if numel else 0.0,
        td.scale_layout, td.scale_rule,
    )


def inspect_file(path: str | os.PathLike) -> FileInfo:
    """Describe every logical tensor of one file (header and descriptor only; no data is read)."""
    with safe_open(path) as f:
        version = f.descriptor.version if f.descriptor else None
        return FileInfo(str(path), version, f.metadata(), [_tensor_info(f, n) for n in f.keys()])


def summarize(files: list[FileInfo]) -> dict:
    """Totals over files: tensors and parameters by kind, bytes, bits per weight, compression ratio."""
    by_kind: dict[str, dict[str, float]] = {}
    for fi in files:
        for t in fi.tensors:
            k = by_kind.setdefault(t.kind, {"tensors": 0, "params": 0, "stored_bytes": 0, "original_bytes": 0})
            k["tensors"] += 1
            k["params"] += int(np.prod(t.shape, dtype=np.int64))
            k["stored_bytes"] += t.stored_bytes
            k["original_bytes"] += t.original_bytes
    for k in by_kind.values():
        k["bits_per_weight"] = 8.0 * k["stored_bytes"] / k["params"] if k["params"] else 0.0
    stored = sum(fi.stored_bytes for fi in files)
    original = sum(fi.original_bytes for fi in files)
    return {
        "files": len(files),
        "stored_bytes": stored,
        "original_bytes": original,
        "compression_ratio": original / stored if stored else 1.0,
        "by_kind": by_kind,
    }


def inspect_path(*paths: str | os.PathLike) -> dict:
    """``fp4fmt inspect`` as a JSON-ready dict: every file's tensors and the totals."""
    files = [inspect_file(f) for p in paths for f in safetensors_files(p)]
    return {"files": [asdict(fi) for fi in files], "summary": summarize(files)}


@dataclass(frozen=True)
class VerifyResult:
    path: str
    ok: bool
    error: str | None
    tensors: int


def verify_file(path: str | os.PathLike) -> VerifyResult:
    """Structure, descriptor, checksums, scales and padding of one file; never raises on a bad file."""
    try:
        with safe_open(path) as f:
            f.verify()
            return VerifyResult(str(path), True, None, len(f.keys()))
    except FP4FmtError as e:
        return VerifyResult(str(path), False, str(e), 0)


def verify_path(
    *paths: str | os.PathLike, progress: Callable[[Iterator[Path]], Iterator[Path]] | None = None
) -> list[VerifyResult]:
    """``fp4fmt verify``: one result per file (a directory's files in sorted order)."""
    files = [f for p in paths for f in safetensors_files(p)]
    it = progress(iter(files)) if progress else iter(files)
    return [verify_file(p) for p in it]
