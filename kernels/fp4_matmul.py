"""Triton kernels for ``y = x @ W.T (+ b)`` with W in fp4fmt's packed form (spec §4-§6): codes ``[N, padded_k/2]``
(element 2i in the low nibble), block scales ``[N, n_blocks]`` (or the swizzled layout of §6.4, read in
place), and for NVFP4 the float32 tensor scale.

Two paths:

* ``weight_only``: activations BF16/FP16/FP32, weights decoded in registers exactly as spec §5.3
  (fl32(E2M1 * fl32(scale * tensor_scale))), rounded once to the activation dtype, then ``tl.dot`` with float32
  accumulation. Runs on any GPU Triton supports (Hopper included) and in the interpreter.
* ``dot_scaled``: ``tl.dot_scaled`` with the packed E2M1 weights and their scales as the hardware block-scaled
  MMA takes them (MXFP4: E8M0 bytes, 32-wide groups; NVFP4: E4M3 bytes, 16-wide groups, tensor scale applied
  to the accumulator). Native on sm_100+, emulated by Triton elsewhere; activations are BF16.

Both split K across programs when M is small (decode): each split writes float32 partial sums to
``[splits, M, N]``, added in a fixed order afterwards (deterministic, no atomics).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _e2m1_to_f32(nib):
    """E2M1 codes (uint32, 0..15) -> float32 by building the bits: 0.5 is 0x3F000000, other non-zero
    magnitudes are (1 + m/2) * 2^(e-1), i.e. exponent field 126 + e and mantissa bit 22 = m."""
    mag = nib & 7
    e = mag >> 1
    m = mag & 1
    bits = tl.where(e == 0, m * 0x3F000000, ((e + 126) << 23) | (m << 22))
    return (bits | ((nib & 8) << 28)).to(tl.float32, bitcast=True)


@triton.jit
def _scale_to_f32(s, NV: tl.constexpr):
    """Block scale bytes (int32) -> float32: E4M3 (NVFP4, non-negative by §3.3) or E8M0 2^(s-127) (MXFP4)."""
    if NV:
        e = (s >> 3) & 15
        m = s & 7
        normal = (((e + 120) << 23) | (m << 20)).to(tl.float32, bitcast=True)
        return tl.where(e == 0, m.to(tl.float32) * 0.001953125, normal)
    else:
        return tl.where(s == 0, 0x00400000, s << 23).to(tl.float32, bitcast=True)


@triton.jit
def _scale_offsets(rn, rb, ssn, SCB, SWIZZLED: tl.constexpr):
    """Byte offsets of scales (row rn, block rb): linear rows of stride ssn, or the 128x4 tiles of §6.4."""
    if SWIZZLED:
        return (((rn[:, None] // 128) * SCB + rb[None, :] // 4) * 512 + (rn[:, None] % 32) * 16
                + ((rn[:, None] % 128) // 32) * 4 + rb[None, :] % 4)
    else:
        return rn[:, None] * ssn + rb[None, :]


@triton.jit
def _load_tile(x_ptr, c_ptr, s_ptr, rm, rn, k0, k_hi, M, N, NB, SCB, sxm, sxk, scn, ssn,
               GROUP: tl.constexpr, SWIZZLED: tl.constexpr, BLOCK_K: tl.constexpr):
    """One K step's operands: activations [BLOCK_M, BLOCK_K] (0 past k_hi), packed codes [BLOCK_N, BLOCK_K/2]
    and scale bytes [BLOCK_N, BLOCK_K/GROUP] (0 past the row's blocks)."""
    rk = k0 + tl.arange(0, BLOCK_K)
    x = tl.load(x_ptr + rm[:, None] * sxm + rk[None, :] * sxk, mask=(rm[:, None] < M) & (rk[None, :] < k_hi), other=0.0)
    rc = k0 // 2 + tl.arange(0, BLOCK_K // 2)
    c = tl.load(c_ptr + rn[:, None] * scn + rc[None, :], mask=(rn[:, None] < N) & (rc[None, :] < NB * (GROUP // 2)),
                other=0)
    rb = k0 // GROUP + tl.arange(0, BLOCK_K // GROUP)
    s = tl.load(s_ptr + _scale_offsets(rn, rb, ssn, SCB, SWIZZLED), mask=(rn[:, None] < N) & (rb[None, :] < NB),
                other=0)
    return x, c, s


@triton.jit
def _store(y_ptr, acc, b_ptr, rm, rn, M, N, sym, syn, sys, pid_s, SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr):
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    if SPLIT == 1:
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + rm[:, None] * sym + rn[None, :] * syn, acc.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(y_ptr + pid_s * sys + rm[:, None] * sym + rn[None, :] * syn, acc, mask=mask)


@triton.jit
def weight_only_kernel(
    x_ptr, c_ptr, s_ptr, ts_ptr, b_ptr, y_ptr,
    M, N, K, NB, SCB, K_SPLIT,
    sxm, sxk, scn, ssn, sym, syn, sys,
    GROUP: tl.constexpr, NV: tl.constexpr, SWIZZLED: tl.constexpr, HAS_BIAS: tl.constexpr,
    SPLIT: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if NV:
        ts = tl.load(ts_ptr)
    k_lo = pid_s * K_SPLIT
    k_hi = tl.minimum(k_lo + K_SPLIT, K)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        x, c, s = _load_tile(x_ptr, c_ptr, s_ptr, rm, rn, k0, k_hi, M, N, NB, SCB, sxm, sxk, scn, ssn,
                             GROUP, SWIZZLED, BLOCK_K)
        c = c.to(tl.uint32)
        w = tl.interleave(_e2m1_to_f32(c & 15), _e2m1_to_f32(c >> 4))  # [BLOCK_N, BLOCK_K], element 2i low
        f = _scale_to_f32(s.to(tl.int32), NV)
        if NV:
            f = f * ts
        w = tl.reshape(tl.reshape(w, (BLOCK_N, BLOCK_K // GROUP, GROUP)) * f[:, :, None], (BLOCK_N, BLOCK_K))
        if IEEE:
            acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc)
    _store(y_ptr, acc, b_ptr, rm, rn, M, N, sym, syn, sys, pid_s, SPLIT, HAS_BIAS)


@triton.jit
def dot_scaled_kernel(
    x_ptr, c_ptr, s_ptr, ts_ptr, b_ptr, y_ptr,
    M, N, K, NB, SCB, K_SPLIT,
    sxm, sxk, scn, ssn, sym, syn, sys,
    GROUP: tl.constexpr, NV: tl.constexpr, SWIZZLED: tl.constexpr, HAS_BIAS: tl.constexpr,
    SPLIT: tl.constexpr, X_FORMAT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_lo = pid_s * K_SPLIT
    k_hi = tl.minimum(k_lo + K_SPLIT, K)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        x, c, s = _load_tile(x_ptr, c_ptr, s_ptr, rm, rn, k0, k_hi, M, N, NB, SCB, sxm, sxk, scn, ssn,
                             GROUP, SWIZZLED, BLOCK_K)
        if NV:
            s = s.to(tl.float8e4nv, bitcast=True)
        acc = tl.dot_scaled(x, None, X_FORMAT, tl.trans(c), s, "e2m1", acc)
    if NV:
        acc = acc * tl.load(ts_ptr)
    _store(y_ptr, acc, b_ptr, rm, rn, M, N, sym, syn, sys, pid_s, SPLIT, HAS_BIAS)
