"""Choosing and launching the FP4 matmul kernels: path by device capability, tile sizes and split-K by shape.

``fp4_linear(x, codes, scales, tensor_scale, k)`` computes ``x @ W.T (+ bias)`` for 2-D ``x [M, k]`` and a
packed weight W ``[N, k]`` (spec §4-§6); ``path`` overrides the choice: ``"weight_only"`` or ``"dot_scaled"``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from . import fp4_matmul

PATHS = ("weight_only", "dot_scaled")
_SCHEME_OF_SCALES = {torch.float8_e4m3fn: "nvfp4", torch.float8_e8m0fnu: "mxfp4"}
_GROUP = {"nvfp4": 16, "mxfp4": 32}


@dataclass(frozen=True)
class Launch:
    """One kernel launch: the path, tile sizes, K splits (elements of K per split) and warps."""

    path: str
    block_m: int
    block_n: int
    block_k: int
    splits: int
    k_split: int
    num_warps: int = 4
    num_stages: int = 3


def choose_path(device: torch.device) -> str:
    """``dot_scaled`` where the block-scaled MMA is native (CUDA capability 10.0 and up), else ``weight_only``."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 10:
        return "dot_scaled"
    return "weight_only"


def plan_launch(path: str, m: int, n: int, k: int, group: int, processors: int) -> Launch:
    """Tiles for an M x N x K problem. Small M (decode) gets narrow tiles and K split across programs until
    about two programs per processor exist: the weights are read once, spread over the whole GPU."""
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64 if m <= 64 else 128
    block_n = 64 if m <= 64 else 128
    block_k = 128 if m <= 64 else 64
    block_k = max(block_k, group)
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    chunks = triton.cdiv(k, block_k)
    splits = 1
    if tiles < 2 * processors:
        splits = max(1, min(chunks, (2 * processors) // tiles, 16))
    k_split = triton.cdiv(chunks, splits) * block_k
    splits = triton.cdiv(k, k_split) if k else 1
    warps = 4 if block_m * block_n <= 64 * 128 else 8
    return Launch(path, block_m, block_n, block_k, splits, k_split, warps)


def _processors(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: enough splits to exercise the split-K path


def fp4_linear(
    x: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    tensor_scale: torch.Tensor | None,
    k: int,
    *,
    bias: torch.Tensor | None = None,
    scheme: str | None = None,
    scale_layout: str = "linear",
    path: str = "auto",
    launch: Launch | None = None,
    out: torch.Tensor | None = None,
    workspace: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ W.T (+ bias)`` in ``x``'s dtype. ``scales`` are float8_e4m3fn (NVFP4) or float8_e8m0fnu (MXFP4),
    or their raw bytes with ``scheme`` given. ``out`` ([M, N]) and ``workspace`` (float32 ``[splits, M, N]``,
    used when K is split) may be passed in, e.g. for CUDA graphs; every element of both is written."""
    scheme = scheme or _SCHEME_OF_SCALES.get(scales.dtype)
    if scheme not in _GROUP:
        raise ValueError("pass scheme='nvfp4' or 'mxfp4' for raw uint8 scales")
    group = _GROUP[scheme]
    nv = scheme == "nvfp4"
    if x.dim() != 2 or x.shape[1] != k:
        raise ValueError(f"x must be [M, {k}], got {tuple(x.shape)}")
    n = codes.shape[0]
    nb = triton.cdiv(k, group)
    if codes.dtype != torch.uint8 or tuple(codes.shape) != (n, nb * group // 2) or codes.stride(1) != 1:
        raise ValueError(f"codes must be row-major uint8 [{n}, {nb * group // 2}], got {codes.dtype} {tuple(codes.shape)}")
    raw_scales = scales.view(torch.uint8)
    if scale_layout == "linear":
        want = (n, nb)
    elif scale_layout == "swizzled":
        want = (triton.cdiv(n, 128) * 32, triton.cdiv(nb, 4) * 16)
    else:
        raise ValueError(f"scale_layout must be 'linear' or 'swizzled', got {scale_layout!r}")
    if tuple(raw_scales.shape) != want or not raw_scales.is_contiguous():
        raise ValueError(f"{scale_layout} scales must be contiguous {want}, got {tuple(raw_scales.shape)}")
    if nv and tensor_scale is None:
        raise ValueError("NVFP4 needs its tensor scale")
    if path == "auto":
        path = choose_path(x.device)
    m = x.shape[0]
    cfg = launch or plan_launch(path, m, n, k, group, _processors(x.device))
    if cfg.path != path:
        cfg = Launch(path, *[getattr(cfg, f) for f in ("block_m", "block_n", "block_k", "splits", "k_split",
                                                       "num_warps", "num_stages")])
    if cfg.block_k % group or cfg.k_split % cfg.block_k:
        raise ValueError(f"block_k must be a multiple of {group} and k_split of block_k: {cfg}")
    if path == "dot_scaled" and x.dtype not in (torch.bfloat16, torch.float16):
        x = x.to(torch.bfloat16)
    out_dtype = x.dtype
    y = out if out is not None else torch.empty((m, n), dtype=out_dtype, device=x.device)
    if tuple(y.shape) != (m, n) or y.dtype != out_dtype:
        raise ValueError(f"out must be {out_dtype} [{m}, {n}]")
    if m == 0 or n == 0:
        return y
    if k == 0:
        return y.copy_(bias.to(out_dtype).expand(m, n) if bias is not None else torch.zeros_like(y))
    ts = tensor_scale.reshape(1).to(device=x.device, dtype=torch.float32) if nv else y
    b = bias if bias is not None else y
    if cfg.splits > 1:
        ws = workspace if workspace is not None else torch.empty((cfg.splits, m, n), dtype=torch.float32,
                                                                   device=x.device)
        if tuple(ws.shape) != (cfg.splits, m, n) or ws.dtype != torch.float32 or not ws.is_contiguous():
            raise ValueError(f"workspace must be contiguous float32 [{cfg.splits}, {m}, {n}]")
        target, strides = ws, (ws.stride(1), ws.stride(2), ws.stride(0))
    else:
        target, strides = y, (y.stride(0), y.stride(1), 0)
    grid = (triton.cdiv(m, cfg.block_m), triton.cdiv(n, cfg.block_n), cfg.splits)
    scb = triton.cdiv(nb, 4)
    common = dict(GROUP=group, NV=nv, SWIZZLED=scale_layout == "swizzled", HAS_BIAS=bias is not None,
                  SPLIT=cfg.splits, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                  num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    args = (x, codes, raw_scales, ts, b, target, m, n, k, nb, scb, cfg.k_split,
            x.stride(0), x.stride(1), codes.stride(0), raw_scales.stride(0), *strides)
    if path == "weight_only":
        fp4_matmul.weight_only_kernel[grid](*args, IEEE=x.dtype == torch.float32, **common)
    else:
        fmt = "bf16" if x.dtype == torch.bfloat16 else "fp16"
        fp4_matmul.dot_scaled_kernel[grid](*args, X_FORMAT=fmt, **common)
    if cfg.splits > 1:
        acc = target.sum(0)
        if bias is not None:
            acc += bias.to(torch.float32)
        y.copy_(acc)
    return y
