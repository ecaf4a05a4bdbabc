"""The one exception family of fp4fmt. Every message names the file, the tensor and the rule broken."""

from __future__ import annotations

import os


class FP4FmtError(ValueError):
    """Base of every error fp4fmt raises on bad input or a bad file.

    ``file`` and ``tensor`` are None when they do not apply; ``rule`` is the plain-language rule broken,
    with the spec section where there is one.
    """

    def __init__(self, rule: str, *, file: str | os.PathLike | None = None, tensor: str | None = None):
        self.rule = rule
        self.file = os.fspath(file) if file is not None else None
        self.tensor = tensor
        parts = []
        if self.file is not None:
            parts.append(self.file)
        if tensor is not None:
            parts.append(f"tensor {tensor!r}")
        parts.append(rule)
        super().__init__(": ".join(parts))

    def __reduce__(self):  # keep pickling across processes (converter workers) working
        return (_rebuild, (type(self), self.rule, self.file, self.tensor))


def _rebuild(cls, rule, file, tensor):
    return cls(rule, file=file, tensor=tensor)


class FormatError(FP4FmtError):
    """The file breaks the container or descriptor rules of the spec (truncated, lying header, ...)."""


class UnsupportedVersionError(FormatError):
    """The file declares a major format version this reader does not implement."""


class ChecksumError(FormatError):
    """A tensor's bytes do not match the checksum recorded in its descriptor."""


class QuantizationError(FP4FmtError):
    """The input cannot be quantized as asked (NaN/Inf values, wrong dtype, bad options)."""


class WriteError(FP4FmtError):
    """Writing failed (bad tensor names or metadata, I/O errors); nothing partial is left behind."""
