"""A Hugging Face checkpoint to read from: one safetensors file, or a directory (single file or sharded
with ``model.safetensors.index.json``), with its ``config.json``. Tensors are read one at a time with
``pread`` into fresh memory, so reading never maps more of the checkpoint than the tensor in hand.
"""

from __future__ import annotations

import json
import mmap
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import container, dtypes
from ..errors import FormatError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


@dataclass(frozen=True)
class SourceTensor:
    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in the file
    nbytes: int


def read_json(path: Path) -> dict:
    """A JSON file holding an object; FormatError naming the file otherwise."""
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (OSError, ValueError) as e:
        raise FormatError(f"cannot read JSON: {e}", file=path) from None
    if not isinstance(obj, dict):
        raise FormatError("must hold a JSON object", file=path)
    return obj


class SourceCheckpoint:
    """The tensors (name -> SourceTensor), config and side files of a checkpoint; validated on construction."""

    def __init__(self, path: str | os.PathLike):
        p = Path(path)
        if not p.exists():
            raise FormatError("no such file or directory", file=p)
        self.path = p
        self.dir = p if p.is_dir() else p.parent
        self.config: dict | None = None
        self.hf_quant_config: dict | None = None
        if p.is_dir():
            files = self._shard_files(p)
            if (p / "config.json").exists():
                self.config = read_json(p / "config.json")
            if (p / "hf_quant_config.json").exists():
                self.hf_quant_config = read_json(p / "hf_quant_config.json")
        else:
            if p.suffix != ".safetensors":
                self._refuse_pickle(p)
            files = [p]
        self.files = files
        self.tensors: dict[str, SourceTensor] = {}
        for f in files:
            h = container.read_header(f)
            for e in h.entries.values():
                if e.name in self.tensors:
                    raise FormatError(f"tensor also stored in {self.tensors[e.name].file.name}", file=f, tensor=e.name)
                self.tensors[e.name] = SourceTensor(e.name, f, e.dtype, e.shape, h.data_start + e.begin, e.nbytes)
            if h.metadata.get("fp4fmt") is not None:
                raise FormatError("already an fp4fmt file: nothing to convert", file=f)
        if p.is_dir() and (p / INDEX_NAME).exists():
            self._check_index(p / INDEX_NAME)

    @staticmethod
    def _refuse_pickle(p: Path) -> None:
        raise FormatError(
            "pickle-based checkpoints (.bin/.pt/.pth/.ckpt) are refused: loading them can run arbitrary code. "
            "Convert them to safetensors with a tool you trust first",
            file=p,
        )

    def _shard_files(self, d: Path) -> list[Path]:
        index = d / INDEX_NAME
        if index.exists():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise FormatError("index has no weight_map", file=index)
            names = sorted(set(weight_map.values()))
            files = []
            root = d.resolve()
            for name in names:
                f = (d / str(name))
                if not isinstance(name, str) or os.path.isabs(name) or f.resolve().parent != root:
                    raise FormatError(f"index names a file outside the checkpoint directory: {name!r}", file=index)
                if not f.exists():
                    raise FormatError(f"shard {name!r} named by the index is missing", file=index)
                files.append(f)
            return files
        if (d / SINGLE_NAME).exists():
            return [d / SINGLE_NAME]
        found = sorted(d.glob("*.safetensors"))
        if found:
            return found
        for pattern in PICKLE_PATTERNS:
            pickled = sorted(d.glob(pattern))
            if pickled:
                self._refuse_pickle(pickled[0])
        raise FormatError("no safetensors weights (model.safetensors or model.safetensors.index.json)", file=d)

    def _check_index(self, index: Path) -> None:
        weight_map = read_json(index)["weight_map"]
        for name, fname in weight_map.items():
            t = self.tensors.get(name)
            if t is None or t.file.name != fname:
                raise FormatError(f"index maps {name!r} to {fname!r} but that shard does not hold it", file=index)
        extra = [n for n in self.tensors if n not in weight_map]
        if extra:
            raise FormatError(f"shards hold tensors the index does not list, e.g. {extra[:3]}", file=index)

    def read(self, name: str) -> np.ndarray:
        """The tensor's values, in a fresh array of its own dtype and shape."""
        t = self.tensors[name]
        return self.read_range(name, 0, int(np.prod(t.shape, dtype=np.int64))).reshape(t.shape)

    def read_range(self, name: str, start: int, stop: int) -> np.ndarray:
        """Elements [start, stop) of the tensor in C order, as a fresh 1-D array (read with pread)."""
        t = self.tensors[name]
        dt = dtypes.numpy_dtype(t.dtype)
        out = np.empty(stop - start, dtype=dt)
        buf = memoryview(out.view(np.uint8))
        try:
            fd = os.open(t.file, os.O_RDONLY)
            try:
                pos, done = t.offset + start * dt.itemsize, 0
                while done < buf.nbytes:
                    n = os.preadv(fd, [buf[done:]], pos + done)
                    if n <= 0:
                        raise FormatError("file ended before the tensor's data (truncated?)", file=t.file, tensor=name)
                    done += n
            finally:
                os.close(fd)
        except OSError as e:
            raise FormatError(f"cannot read: {e.strerror or e}", file=t.file, tensor=name) from None
        return out

    def scan_pieces(self, name: str, piece_elements: int):
        """Yield (start, view) over the tensor's elements in C order, ``piece_elements`` at a time, as
        read-only views of a short-lived memory map (no copy): for a pass that only reads, like amax.
        Each piece's mapping goes away when its view is dropped."""
        t = self.tensors[name]
        dt = dtypes.numpy_dtype(t.dtype)
        total = t.nbytes // dt.itemsize
        fd = os.open(t.file, os.O_RDONLY)
        try:
            for start in range(0, total, piece_elements):
                stop = min(total, start + piece_elements)
                begin = t.offset + start * dt.itemsize
                aligned = begin - begin % mmap.ALLOCATIONGRANULARITY
                length = t.offset + stop * dt.itemsize - aligned
                mm = mmap.mmap(fd, length, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0),
                               prot=mmap.PROT_READ, offset=aligned)
                yield start, np.frombuffer(mm, dtype=dt, count=stop - start, offset=begin - aligned)
                del mm  # unmapped as soon as the caller drops the view
        except (OSError, ValueError) as e:
            raise FormatError(f"cannot read: {e}", file=t.file, tensor=name) from None
        finally:
            os.close(fd)

    def side_files(self) -> list[Path]:
        """Small files and folders to copy beside the converted weights (see :func:`side_files`)."""
        return side_files(self.dir) if self.path.is_dir() else []


def side_files(directory: Path) -> list[Path]:
    """Small files and folders of a checkpoint directory to copy beside converted weights (tokenizer,
    generation config, chat template, sentence-transformers module folders such as 1_Pooling/); never
    weights, the index, config.json or hf_quant_config.json."""
    skip = {INDEX_NAME, "config.json", "hf_quant_config.json"}
    out = []
    for f in sorted(Path(directory).iterdir()):
        if f.name in skip or f.name.startswith("."):
            continue
        files = [f] if f.is_file() else sorted(g for g in f.rglob("*") if g.is_file()) if f.is_dir() else []
        weights = any(g.suffix == ".safetensors" or any(g.match(p) for p in PICKLE_PATTERNS) for g in files)
        if files and not weights and sum(g.stat().st_size for g in files) <= 64 << 20:
            out.append(f)
    return out
