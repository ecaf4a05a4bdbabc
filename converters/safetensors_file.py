"""Convert one safetensors file into one fp4fmt file: the checkpoint converter with a single-file output.

Kept for small files and scripts; it runs exactly the same planning, quantization and streaming as
:func:`fp4fmt.converters.convert_checkpoint` and moves the single shard into place.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .checkpoint import Options, convert_checkpoint
from .plan import DEFAULT_IGNORE, decide


def should_quantize(name: str, shape: tuple[int, ...], dtype: str, ignore: Sequence[str] = DEFAULT_IGNORE) -> str | None:
    """None if the converter would quantize this tensor (no config, no overrides), else why it is kept."""
    a = decide(name, dtype, tuple(shape), scheme="nvfp4", config=None, ignore=ignore, overrides=())
    return None if a.kind == "quantize" else a.reason


@dataclass
class ConversionReport:
    """Per-tensor outcome of a file conversion: the report entries of the quantized tensors, and the reason
    each other tensor was kept."""

    scheme: str
    quantized: dict[str, dict] = field(default_factory=dict)
    kept: dict[str, str] = field(default_factory=dict)


def convert_file(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    scheme: str = "nvfp4",
    *,
    ignore: Sequence[str] = DEFAULT_IGNORE,
    scale_rule: str | None = None,
    progress: Callable | None = None,
) -> ConversionReport:
    """Quantize the linear weights of safetensors file ``src`` into fp4fmt file ``dst`` (src is only read)."""
    if os.path.abspath(src) == os.path.abspath(dst):
        raise ValueError("the destination must differ from the source")
    opts = Options(scheme=scheme, scale_rule=scale_rule, ignore=tuple(ignore), max_shard_bytes=1 << 62)
    parent = os.path.dirname(os.path.abspath(dst))
    with tempfile.TemporaryDirectory(prefix=".fp4fmt-convert-", dir=parent) as tmp:
        out = os.path.join(tmp, "out")
        ticks = (lambda stage, done, total: progress(stage, done, total)) if progress else None
        result = convert_checkpoint(src, out, opts, progress=ticks)
        os.replace(os.path.join(out, "model.safetensors"), dst)
    report = ConversionReport(scheme)
    for name, e in result.report["tensors"].items():
        if e["action"] == "quantized":
            report.quantized[name] = e
        else:
            report.kept[name] = e["reason"]
    return report
