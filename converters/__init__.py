"""fp4fmt.converters: high-precision and FP8 Hugging Face checkpoints into fp4fmt.

* :func:`convert_checkpoint` converts a checkpoint directory (or one .safetensors file) into an fp4fmt
  checkpoint directory: streaming, sharded, resumable, parallel, with a per-tensor error report;
* :func:`convert_file` converts one safetensors file into one fp4fmt file (small files, tests);
* :mod:`.plan` decides what is quantized, :mod:`.source` reads checkpoints, :mod:`.fp8` reads FP8 ones.
"""

from .checkpoint import Options, Result, convert_checkpoint
from .plan import DEFAULT_IGNORE, Override, load_overrides
from .safetensors_file import ConversionReport, convert_file, should_quantize

__all__ = [
    "DEFAULT_IGNORE",
    "ConversionReport",
    "Options",
    "Override",
    "Result",
    "convert_checkpoint",
    "convert_file",
    "load_overrides",
    "should_quantize",
]
