"""Storage geometry of a quantized tensor (spec §6): blocked axis, padding, stored shapes, scale layouts.

A logical tensor of shape S is blocked along ``axis``. Storage moves that axis last ("storage order"),
pads it with zeros to a multiple of the block size, packs two codes per byte, and keeps one scale per
block. The optional ``swizzled`` scale layout (§6.4) is the 128x4 tile order that Blackwell block-scaled
MMA (cuBLAS, CUTLASS, ``tl.dot_scaled``) reads directly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SCALE_LAYOUTS = ("linear", "swizzled")
SWIZZLE_ROWS = 128  # rows per scale tile
SWIZZLE_COLS = 4  # scale columns (blocks) per tile


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class Geometry:
    """Shapes implied by a logical shape, blocked axis, block size and scale layout."""

    shape: tuple[int, ...]
    axis: int
    block_size: int
    scale_layout: str

    @property
    def storage_shape(self) -> tuple[int, ...]:
        """Logical shape with ``axis`` moved last."""
        s = list(self.shape)
        k = s.pop(self.axis)
        return tuple(s) + (k,)

    @property
    def k(self) -> int:
        return self.shape[self.axis]

    @property
    def n_blocks(self) -> int:
        return ceil_div(self.k, self.block_size)

    @property
    def padded_k(self) -> int:
        return self.n_blocks * self.block_size

    @property
    def padding(self) -> int:
        return self.padded_k - self.k

    @property
    def rows(self) -> int:
        """Number of blocked rows: the product of all storage dims but the last."""
        return int(np.prod(self.storage_shape[:-1], dtype=np.int64))

    @property
    def codes_shape(self) -> tuple[int, ...]:
        return self.storage_shape[:-1] + (self.padded_k // 2,)

    @property
    def linear_scales_shape(self) -> tuple[int, ...]:
        return self.storage_shape[:-1] + (self.n_blocks,)

    @property
    def scales_shape(self) -> tuple[int, ...]:
        if self.scale_layout == "linear":
            return self.linear_scales_shape
        lead = self.storage_shape[:-2]
        r = self.storage_shape[-2]
        return lead + (ceil_div(r, SWIZZLE_ROWS) * 32, ceil_div(self.n_blocks, SWIZZLE_COLS) * 16)


def geometry(shape: tuple[int, ...], axis: int, block_size: int, scale_layout: str = "linear") -> Geometry:
    """Validated :class:`Geometry`; ``axis`` may be negative. Raises ValueError on impossible input."""
    shape = tuple(int(d) for d in shape)
    if len(shape) == 0:
        raise ValueError("a 0-dimensional tensor has no axis to block")
    if any(d < 0 for d in shape):
        raise ValueError(f"negative dimension in shape {shape}")
    if not -len(shape) <= axis < len(shape):
        raise ValueError(f"axis {axis} out of range for shape {shape}")
    if scale_layout not in SCALE_LAYOUTS:
        raise ValueError(f"unknown scale layout {scale_layout!r} (expected one of {SCALE_LAYOUTS})")
    if scale_layout == "swizzled" and len(shape) < 2:
        raise ValueError("the swizzled scale layout needs a tensor of at least 2 dimensions")
    return Geometry(shape, axis % len(shape), block_size, scale_layout)


def to_storage_order(x: np.ndarray, axis: int) -> np.ndarray:
    """Move the blocked axis last (a C-contiguous copy only when needed)."""
    return np.ascontiguousarray(np.moveaxis(x, axis, -1))


def from_storage_order(x: np.ndarray, axis: int) -> np.ndarray:
    return np.moveaxis(x, -1, axis)


def swizzle_scales(scales: np.ndarray) -> np.ndarray:
    """Linear ``[..., R, C]`` scales -> swizzled ``[..., ceil(R/128)*32, ceil(C/4)*16]`` (§6.4).

    Scale (r, c) of each trailing matrix lands at byte
    ``((r//128)*ceil(C/4) + c//4)*512 + (r%32)*16 + ((r%128)//32)*4 + c%4``; padding bytes are zero.
    """
    *lead, r, c = scales.shape
    rb, cb = ceil_div(r, SWIZZLE_ROWS), ceil_div(c, SWIZZLE_COLS)
    padded = np.zeros((*lead, rb * 128, cb * 4), dtype=scales.dtype)
    padded[..., :r, :c] = scales
    t = padded.reshape(*lead, rb, 4, 32, cb, 4)  # row = rb*128 + q*32 + i ; col = cb*4 + j
    n = len(lead)
    t = t.transpose(*range(n), n + 0, n + 3, n + 2, n + 1, n + 4)  # -> [rb, cb, i(32), q(4), j(4)]
    return np.ascontiguousarray(t).reshape(*lead, rb * 32, cb * 16)


def unswizzle_scales(swizzled: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Inverse of :func:`swizzle_scales`: recover the linear ``[..., rows, cols]`` scales."""
    *lead, r32, c16 = swizzled.shape
    rb, cb = r32 // 32, c16 // 16
    n = len(lead)
    t = swizzled.reshape(*lead, rb, cb, 32, 4, 4)  # [rb, cb, i, q, j]
    t = t.transpose(*range(n), n + 0, n + 3, n + 2, n + 1, n + 4)  # -> [rb, q, i, cb, j]
    return np.ascontiguousarray(t).reshape(*lead, rb * 128, cb * 4)[..., :rows, :cols]
