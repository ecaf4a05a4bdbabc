"""What ``fp4fmt inspect`` and ``fp4fmt verify`` report, as plain data (the CLI only prints it)."""

from __future__ import annotations

import json
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
    """``fp4fmt inspect`` as a JSON-ready dict: every file's tensors, each checkpoint directory's index and
    quantization_config, and the totals."""
    files = [inspect_file(f) for p in paths for f in safetensors_files(p)]
    checkpoints = [c for c in (checkpoint_info(p) for p in paths) if c is not None]
    return {"files": [asdict(fi) for fi in files], "checkpoints": checkpoints, "summary": summarize(files)}


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


INDEX_NAME = "model.safetensors.index.json"


def _read_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise FP4FmtError(f"cannot read JSON: {e}", file=path) from None
    if not isinstance(obj, dict):
        raise FP4FmtError("must hold a JSON object", file=path)
    return obj


def checkpoint_info(directory: str | os.PathLike) -> dict | None:
    """What a checkpoint directory says about itself: index shards and config quantization_config."""
    d = Path(directory)
    if not d.is_dir():
        return None
    info: dict = {"path": str(d), "index": None, "quantization_config": None}
    if (d / INDEX_NAME).exists():
        wm = _read_json(d / INDEX_NAME).get("weight_map", {})
        info["index"] = {"shards": sorted(set(wm.values())) if isinstance(wm, dict) else [], "tensors": len(wm)}
    if (d / "config.json").exists():
        info["quantization_config"] = _read_json(d / "config.json").get("quantization_config")
    return info


def verify_checkpoint(directory: str | os.PathLike) -> VerifyResult:
    """The directory as a whole: the index names exactly the shards' stored tensors, every shard exists,
    no other .safetensors file is present, and config.json's quantization_config (if any) says fp4fmt
    with the schemes the shards hold."""
    d = Path(directory)
    where = d / INDEX_NAME if (d / INDEX_NAME).exists() else d
    try:
        files = sorted(d.glob("*.safetensors"))
        stored: dict[str, str] = {}
        schemes_found: set[str] = set()
        for f in files:
            with safe_open(f) as h:
                for n in h.stored_keys():
                    stored[n] = f.name
                if h.descriptor:
                    schemes_found |= {td.scheme for td in h.descriptor.tensors.values()}
        if (d / INDEX_NAME).exists():
            wm = _read_json(d / INDEX_NAME).get("weight_map")
            if not isinstance(wm, dict):
                raise FP4FmtError("index has no weight_map", file=where)
            outside = sorted({str(v) for v in wm.values() if not isinstance(v, str) or Path(v).name != v or v in ("", ".", "..")})
            if outside:
                raise FP4FmtError(f"index names file(s) outside the checkpoint directory: {outside[:3]}", file=where)
            missing = sorted({v for v in wm.values() if not (d / v).exists()})
            if missing:
                raise FP4FmtError(f"shard(s) named by the index are missing: {missing[:5]}", file=where)
            wrong = [n for n, v in wm.items() if stored.get(n) != v]
            if wrong:
                raise FP4FmtError(f"index entries that do not match the shards, e.g. {wrong[:3]}", file=where)
            extra = sorted(n for n in stored if n not in wm)
            if extra:
                raise FP4FmtError(f"stored tensors the index does not list, e.g. {extra[:3]}", file=where)
        elif len(files) > 1:
            raise FP4FmtError(f"{len(files)} .safetensors files but no {INDEX_NAME}", file=d)
        if (d / "config.json").exists():
            qc = _read_json(d / "config.json").get("quantization_config")
            if qc is not None and schemes_found:
                if qc.get("quant_method") != "fp4fmt":
                    raise FP4FmtError(f"config.json quantization_config has quant_method {qc.get('quant_method')!r}, "
                                      "not 'fp4fmt'", file=d / "config.json")
                if qc.get("scheme") not in schemes_found:
                    raise FP4FmtError(f"config.json says scheme {qc.get('scheme')!r} but the shards hold "
                                      f"{sorted(schemes_found)}", file=d / "config.json")
        return VerifyResult(str(where), True, None, len(stored))
    except FP4FmtError as e:
        return VerifyResult(str(where), False, str(e), 0)


def verify_path(
    *paths: str | os.PathLike, progress: Callable[[Iterator[Path]], Iterator[Path]] | None = None
) -> list[VerifyResult]:
    """``fp4fmt verify``: one result per file (a directory's files in sorted order), plus one for each
    directory as a checkpoint (index, shards, config)."""
    files = [f for p in paths for f in safetensors_files(p)]
    it = progress(iter(files)) if progress else iter(files)
    results = [verify_file(p) for p in it]
    results += [verify_checkpoint(p) for p in paths if Path(p).is_dir()]
    return results
