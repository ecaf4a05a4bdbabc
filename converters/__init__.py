"""fp4fmt.converters: turning high-precision checkpoints into fp4fmt files.

v0.1 converts one safetensors file (see :mod:`fp4fmt.converters.safetensors_file`); whole Hugging Face
checkpoint directories, sharding, FP8 sources and resumable streaming come with the checkpoint converter.
"""

from .safetensors_file import DEFAULT_IGNORE, ConversionReport, convert_file, should_quantize

__all__ = ["DEFAULT_IGNORE", "ConversionReport", "convert_file", "should_quantize"]
