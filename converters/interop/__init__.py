"""Interop with the FP4 checkpoint formats runtimes load (spec §8): export an fp4fmt checkpoint to
compressed-tensors, modelopt, gpt-oss, GGUF or ONNX, and import compressed-tensors, modelopt and gpt-oss
checkpoints into fp4fmt without requantizing. One module per format; :mod:`.common` holds what they share.

    export_checkpoint(src, dst, to="compressed-tensors")   # fp4fmt checkpoint dir -> the target format
    import_checkpoint(src, dst)                            # format detected from config.json, or from_="..."
"""

from __future__ import annotations

import importlib
import os

from ...errors import FP4FmtError

# format name -> module in this package
EXPORTERS = {"compressed-tensors": "compressed_tensors", "modelopt": "modelopt", "gpt-oss": "gpt_oss",
             "gguf": "gguf", "onnx": "onnx_export"}
IMPORTERS = {"compressed-tensors": "compressed_tensors", "modelopt": "modelopt", "gpt-oss": "gpt_oss"}


def _module(name: str):
    return importlib.import_module(f"{__name__}.{name}")


def export_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, to: str, *, overwrite: bool = False,
                      progress=None, **options):
    """Write fp4fmt checkpoint ``src`` as format ``to`` at ``dst`` (see the format's module for what it writes)."""
    if to not in EXPORTERS:
        raise FP4FmtError(f"unknown export format {to!r}; one of {sorted(EXPORTERS)}")
    return _module(EXPORTERS[to]).export_checkpoint(src, dst, overwrite=overwrite, progress=progress, **options)


def detect_format(src: str | os.PathLike) -> str | None:
    """The importable FP4 format of checkpoint directory ``src`` (from its config files), or None."""
    found = [name for name, mod in IMPORTERS.items() if _module(mod).detect(src)]
    if len(found) > 1:
        raise FP4FmtError(f"matches several formats {found}; pass --from", file=src)
    return found[0] if found else None


def import_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, from_: str | None = None, *,
                      overwrite: bool = False, progress=None):
    """Write the FP4 checkpoint ``src`` (format ``from_``, else detected) as an fp4fmt checkpoint at ``dst``,
    moving codes and scales without requantizing."""
    fmt = from_ or detect_format(src)
    if fmt is None:
        raise FP4FmtError(f"not a checkpoint of an importable FP4 format ({sorted(IMPORTERS)})", file=src)
    if fmt not in IMPORTERS:
        raise FP4FmtError(f"cannot import {fmt!r}; importable: {sorted(IMPORTERS)}", file=src)
    return _module(IMPORTERS[fmt]).import_checkpoint(src, dst, overwrite=overwrite, progress=progress)


__all__ = ["EXPORTERS", "IMPORTERS", "detect_format", "export_checkpoint", "import_checkpoint"]
