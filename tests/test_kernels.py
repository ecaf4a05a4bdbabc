"""fp4fmt.kernels: the Triton FP4 matmul kernels against a float64 reference.

Without a GPU they run in Triton's interpreter (``TRITON_INTERPRET=1``, set by conftest.py), with one
correction to it (``_triton_interpreter.install``: float8e4nv ``dot_scaled`` scales decoded as E4M3). On a
CUDA machine the same tests run compiled.

* Every path (weight-only, dot_scaled), both schemes, linear and swizzled scales, with and without bias, on
  random shapes including M=1, ragged K (not a multiple of the group or the tile) and N not a multiple of
  the tile, split-K and not: the result is within a bound of ``x @ fp4fmt.dequantize(W).T + b`` computed in
  float64. The bound is relative to ``|x| @ |W|.T + |b|`` (float32 accumulation; BF16 rounding where BF16 is
  used), far below the error of a wrong index, a wrong nibble order or a wrong scale.
* The output and the split-K workspace are filled with NaN before each run, so an element the kernel does
  not write fails the test.
* The dispatcher picks the path by device, plans split-K for decode shapes, honours overrides and rejects
  malformed inputs; FP4Linear pinned to a kernel path equals its torch path.
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fp4fmt
import fp4fmt.torch as ft
from fp4fmt.kernels import dispatch

import _triton_interpreter

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    _triton_interpreter.install()

GROUP = {"nvfp4": 16, "mxfp4": 32}


def make_weight(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    """Heavy-tailed rows of different magnitudes (so a wrong scale index shows), one row of zeros."""
    w = rng.standard_t(3, (n, k)) * np.exp2(rng.integers(-6, 7, (n, 1)))
    if n > 1:
        w[n // 2] = 0.0
    return w.astype(np.float32)


def reference(x: torch.Tensor, qt: fp4fmt.QTensor, bias: torch.Tensor | None) -> tuple[np.ndarray, np.ndarray]:
    """(x @ W.T + b in float64, |x| @ |W|.T + |b|) with W = fp4fmt.dequantize(qt) and x as the kernel sees it."""
    xd = x.double().cpu().numpy()
    w = fp4fmt.dequantize(qt).astype(np.float64)
    b = np.zeros(w.shape[0]) if bias is None else bias.double().cpu().numpy()
    return xd @ w.T + b, np.abs(xd) @ np.abs(w).T + np.abs(b)


def run(x, qt, bias, path, launch=None):
    """The kernel on poisoned output and workspace buffers."""
    p = ft.to_torch(qt, copy=True)
    codes, scales = p["codes"].to(DEVICE), p["scales"].to(DEVICE)
    ts = p["tensor_scale"].to(DEVICE) if "tensor_scale" in p else None
    m, k = x.shape
    n = qt.shape[0]
    out_dtype = torch.bfloat16 if (path == "dot_scaled" and x.dtype == torch.float32) else x.dtype
    cfg = launch or dispatch.plan_launch(path, m, n, k, GROUP[qt.scheme], dispatch._processors(torch.device(DEVICE)))
    out = torch.full((m, n), float("nan"), dtype=out_dtype, device=DEVICE)
    ws = torch.full((cfg.splits, m, n), float("nan"), dtype=torch.float32, device=DEVICE) if cfg.splits > 1 else None
    y = dispatch.fp4_linear(x.to(DEVICE), codes, scales, ts, k, bias=None if bias is None else bias.to(DEVICE),
                            scale_layout=qt.scale_layout, path=path, launch=cfg, out=out, workspace=ws)
    assert y is out
    return y.float().cpu().numpy(), cfg


def check(y: np.ndarray, ref: np.ndarray, mag: np.ndarray, rel: float) -> None:
    assert not np.isnan(y).any(), "an output element was not written"
    err = np.abs(y - ref)
    bad = err > rel * mag + rel * np.abs(ref) + 1e-30
    assert not bad.any(), f"{int(bad.sum())} elements off, worst {float((err / (mag + 1e-30)).max()):.3g} of |x||W|"


@st.composite
def problems(draw):
    scheme = draw(st.sampled_from(["nvfp4", "mxfp4"]))
    m = draw(st.sampled_from([1, 2, 3, 5, 16, 17, 33]))
    n = draw(st.integers(1, 150))
    k = draw(st.integers(1, 300))
    layout = draw(st.sampled_from(["linear", "swizzled"]))
    seed = draw(st.integers(0, 2**32 - 1))
    has_bias = draw(st.booleans())
    return scheme, m, n, k, layout, seed, has_bias


def build(scheme, m, n, k, layout, seed, has_bias, x_dtype):
    rng = np.random.default_rng(seed)
    qt = fp4fmt.quantize(make_weight(rng, n, k), scheme, scale_layout=layout)
    x = torch.from_numpy(rng.standard_normal((m, k)).astype(np.float32)).to(x_dtype)
    bias = torch.from_numpy(rng.standard_normal(n).astype(np.float32)).to(x_dtype) if has_bias else None
    return qt, x, bias


@settings(max_examples=40, deadline=None)
@given(p=problems())
def test_weight_only_float32_is_near_exact(p) -> None:
    """float32 activations: decoded weights and IEEE products, only float32 accumulation error."""
    qt, x, bias = build(*p, torch.float32)
    y, _ = run(x, qt, bias, "weight_only")
    ref, mag = reference(x, qt, bias)
    check(y, ref, mag, 2e-6 * math.sqrt(x.shape[1] + 1))


@pytest.mark.parametrize("path", dispatch.PATHS)
@settings(max_examples=30, deadline=None)
@given(p=problems())
def test_bf16_paths(path: str, p) -> None:
    """BF16 activations through both paths: within BF16 rounding of the weight and of the output."""
    qt, x, bias = build(*p, torch.bfloat16)
    y, _ = run(x, qt, bias, path)
    ref, mag = reference(x, qt, bias)
    check(y, ref, mag, 2.0**-7)


@pytest.mark.parametrize("scheme", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("path", dispatch.PATHS)
@pytest.mark.parametrize("splits", [1, 3])
def test_explicit_launches_with_split_k(scheme: str, path: str, splits: int) -> None:
    """A decode shape (M=1) and a prefill shape, K ragged, with fixed tiles and an explicit split count."""
    for m, n, k in [(1, 96, 200), (40, 70, 161)]:
        qt, x, bias = build(scheme, m, n, k, "linear", 5 + m, True, torch.bfloat16)
        block_k = 64
        k_split = math.ceil(math.ceil(k / block_k) / splits) * block_k
        cfg = dispatch.Launch(path, 16, 32, block_k, math.ceil(k / k_split), k_split)
        y, used = run(x, qt, bias, path, cfg)
        assert used.splits == math.ceil(k / k_split) and (used.splits > 1) == (splits > 1)
        ref, mag = reference(x, qt, bias)
        check(y, ref, mag, 2.0**-7)


def test_a_wrong_index_would_fail() -> None:
    """The bound has teeth: the same check on a result with one weight row's scale off by one step fails."""
    qt, x, bias = build("nvfp4", 4, 40, 64, "linear", 1, False, torch.float32)
    y, _ = run(x, qt, bias, "weight_only")
    ref, mag = reference(x, qt, bias)
    check(y, ref, mag, 2e-6 * 9)
    scales = qt.scales.view(np.uint8).copy()
    scales[3, 1] += 1
    wrong = fp4fmt.QTensor(qt.scheme, qt.shape, qt.codes, scales.view(ml_dtypes.float8_e4m3fn), qt.tensor_scale)
    y_wrong, _ = run(x, wrong, bias, "weight_only")
    with pytest.raises(AssertionError, match="elements off"):
        check(y_wrong, ref, mag, 2e-6 * 9)
    # and swapping the nibble order (element 2i in the high nibble) is caught too
    swapped = (qt.codes >> 4) | (qt.codes << 4)
    y_swap, _ = run(x, fp4fmt.QTensor(qt.scheme, qt.shape, swapped.astype(np.uint8), qt.scales, qt.tensor_scale),
                    bias, "weight_only")
    with pytest.raises(AssertionError, match="elements off"):
        check(y_swap, ref, mag, 2e-6 * 9)


# ------------------------------------------------------------------------------------------------------
# dispatcher


def test_choose_path_and_plan() -> None:
    assert dispatch.choose_path(torch.device("cpu")) == "weight_only"
    decode = dispatch.plan_launch("weight_only", 1, 4096, 4096, 16, 132)
    assert decode.block_m == 16 and decode.splits > 1 and decode.k_split % decode.block_k == 0
    assert decode.splits * decode.k_split >= 4096 > (decode.splits - 1) * decode.k_split
    prefill = dispatch.plan_launch("weight_only", 256, 14336, 4096, 16, 132)
    assert prefill.splits == 1 and prefill.block_m == 128
    with pytest.raises(ValueError, match="path must be one of"):
        dispatch.plan_launch("fast", 1, 1, 1, 16, 1)


def test_fp4_linear_rejects_malformed_inputs() -> None:
    qt = fp4fmt.quantize(np.ones((8, 64), np.float32), "nvfp4")
    p = ft.to_torch(qt)
    x = torch.ones(2, 64)
    with pytest.raises(ValueError, match=r"x must be \[M, 64\]"):
        dispatch.fp4_linear(torch.ones(2, 63), p["codes"], p["scales"], p["tensor_scale"], 64)
    with pytest.raises(ValueError, match="NVFP4 needs its tensor scale"):
        dispatch.fp4_linear(x, p["codes"], p["scales"], None, 64)
    with pytest.raises(ValueError, match="pass scheme="):
        dispatch.fp4_linear(x, p["codes"], p["scales"].view(torch.uint8), p["tensor_scale"], 64)
    with pytest.raises(ValueError, match="codes must be row-major uint8"):
        dispatch.fp4_linear(x, p["codes"][:, :16], p["scales"], p["tensor_scale"], 64)
    with pytest.raises(ValueError, match="linear scales must be contiguous"):
        dispatch.fp4_linear(x, p["codes"], p["scales"][:, :2], p["tensor_scale"], 64)
    with pytest.raises(ValueError, match="out must be"):
        dispatch.fp4_linear(x, p["codes"], p["scales"], p["tensor_scale"], 64, out=torch.empty(2, 7))


@pytest.mark.parametrize("scheme", ["nvfp4", "mxfp4"])
def test_fp4linear_kernel_backend_equals_torch_backend(scheme: str) -> None:
    rng = np.random.default_rng(2)
    qt = fp4fmt.quantize(make_weight(rng, 48, 80), scheme, scale_layout="swizzled")
    bias = rng.standard_normal(48).astype(np.float32)
    x = torch.from_numpy(rng.standard_normal((2, 3, 80)).astype(np.float32))
    torch_layer = ft.FP4Linear.from_qtensor(qt, bias, dtype=torch.float32, backend="torch")
    kernel_layer = ft.FP4Linear.from_qtensor(qt, bias, dtype=torch.float32, backend="weight_only").to(DEVICE)
    want = torch_layer(x)
    got = kernel_layer(x.to(DEVICE)).cpu()
    assert got.shape == (2, 3, 48)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))
