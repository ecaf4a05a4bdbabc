"""What every exporter and importer shares: reading an fp4fmt checkpoint directory tensor by tensor, and
writing an output directory atomically (built in a hidden sibling folder, renamed into place when complete).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ...errors import FP4FmtError
from ...files import safe_open
from ...qtensor import QTensor
from ..source import INDEX_NAME, side_files


@dataclass(frozen=True)
class FP4Checkpoint:
    """An fp4fmt checkpoint directory: its shards (index order), config.json (with ``quantization_config``)
    and side files (tokenizer, generation config, ...)."""

    path: Path
    shards: tuple[Path, ...]
    config: dict
    side_files: tuple[Path, ...]

    @property
    def quantization_config(self) -> dict:
        return self.config["quantization_config"]

    def tensors(self) -> Iterator[tuple[str, QTensor | np.ndarray, Path]]:
        """(name, QTensor or plain array, shard) for every logical tensor, shard by shard, name order within
        a shard; values are read-only zero-copy views of the memory-mapped shard (copy what you keep)."""
        for shard in self.shards:
            with safe_open(shard) as f:
                for name in f.keys():
                    yield name, f.get_tensor(name), shard


def open_fp4_checkpoint(path: str | os.PathLike) -> FP4Checkpoint:
    """An fp4fmt checkpoint directory, checked: config.json with an fp4fmt ``quantization_config``, and its
    shards (from the index, else every ``*.safetensors``)."""
    p = Path(path)
    if not p.is_dir():
        raise FP4FmtError("expected an fp4fmt checkpoint directory", file=p)
    cfg_file = p / "config.json"
    try:
        config = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise FP4FmtError(f"cannot read config.json: {e}", file=cfg_file) from None
    if (config.get("quantization_config") or {}).get("quant_method") != "fp4fmt":
        raise FP4FmtError("config.json has no fp4fmt quantization_config (convert the checkpoint first)", file=cfg_file)
    index = p / INDEX_NAME
    if index.exists():
        try:
            names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise FP4FmtError(f"bad index: {e}", file=index) from None
        shards = []
        for n in names:
            f = (p / n).resolve()
            if f.parent != p.resolve() or not f.is_file():
                raise FP4FmtError(f"the index names {n!r}, which is not a file in the directory", file=index)
            shards.append(p / n)
    else:
        shards = sorted(p.glob("*.safetensors"))
    if not shards:
        raise FP4FmtError("no .safetensors shards", file=p)
    return FP4Checkpoint(p, tuple(shards), config, tuple(side_files(p)))


@dataclass
class OutputDir:
    """A destination directory written atomically: files go to a hidden temporary sibling, and
    :meth:`commit` moves it into place (replacing ``path`` only when ``overwrite``). Use as a context
    manager: an exception discards the temporary folder and leaves ``path`` as it was."""

    path: Path
    overwrite: bool = False
    tmp: Path = field(init=False)

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        if self.path.exists() and (not self.path.is_dir() or any(self.path.iterdir())) and not self.overwrite:
            raise FP4FmtError("exists and is not empty; pass --overwrite to replace it", file=self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.", suffix=".fp4fmt-tmp", dir=self.path.parent))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; the output gets the usual permissions

    def file(self, name: str) -> Path:
        """Where to write ``name`` (a relative path) inside the output."""
        p = self.tmp / name
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def write_json(self, name: str, obj) -> None:
        self.file(name).write_text(json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n", encoding="utf-8")

    def copy_side_files(self, files) -> None:
        """Copy tokenizer and other small files (and folders) unchanged."""
        for f in files:
            f = Path(f)
            if f.is_dir():
                shutil.copytree(f, self.tmp / f.name, dirs_exist_ok=True)
            else:
                shutil.copyfile(f, self.file(f.name))

    def commit(self) -> Path:
        if self.path.exists():
            shutil.rmtree(self.path) if self.path.is_dir() else self.path.unlink()
        os.replace(self.tmp, self.path)
        return self.path

    def discard(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> OutputDir:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()


def index_json(weight_map: dict[str, str], total_size: int) -> dict:
    """A Hugging Face ``model.safetensors.index.json`` object."""
    return {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}


__all__ = ["FP4Checkpoint", "INDEX_NAME", "OutputDir", "index_json", "open_fp4_checkpoint"]
