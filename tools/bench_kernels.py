"""Check, then time, fp4fmt's Triton FP4 matmul kernels on a CUDA GPU against BF16 ``torch.matmul``.

    python tools/bench_kernels.py [--batches 1,4,16,64,256] [--reps 200] [--json OUT] [--quick]

1. **Correctness** on the GPU, before any timing: every path the device can run (weight-only; dot_scaled,
   native on sm_100+, emulated by Triton elsewhere), both schemes, linear and swizzled scales, on ragged
   shapes and on the benchmark shapes, against ``x @ fp4fmt.dequantize(W).T`` in float64 (bound relative to
   ``|x| @ |W|.T``, BF16 rounding). A failure stops the script with exit status 1: no timing of wrong code.
2. **Timing**: for each linear shape of an 8B Llama (K x N = 4096x4096, 4096x14336, 14336x4096) and each
   batch M, the median of ``--reps`` runs timed with CUDA events (after warm-up; the L2 cache is flushed by
   writing a 512 MB buffer between runs) of BF16 ``torch.matmul(x, W.T)`` and of each FP4 path. For each FP4
   path a few launch configurations are tried (the dispatcher's plan, and it with half and double the K
   splits and N tile), and the fastest is reported with its configuration.
3. **Bandwidth**: bytes each kernel must move (packed weight + activations + output) over its time, against
   the device copy bandwidth measured in the same process (``torch`` copy of a 1 GiB buffer, read + write).

Speed-ups are BF16 time / FP4 time in the same process. Targets (issue 4, H200): batch-1 decode at least 3x
faster than BF16, and no slower than BF16 at batch 256. Without a CUDA device the script says so and exits 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys

import numpy as np
import torch

import fp4fmt
import fp4fmt.torch as ft
from fp4fmt.kernels.dispatch import PATHS

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096)]  # (K, N): x [M, K] @ W.T, W [N, K]
GROUP = {"nvfp4": 16, "mxfp4": 32}


def make_weight(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    return (rng.standard_t(4, (n, k)) * 0.02).astype(np.float32)


def gpu_parts(qt: fp4fmt.QTensor, device) -> tuple:
    p = ft.to_torch(qt, copy=True)
    ts = p["tensor_scale"].to(device) if "tensor_scale" in p else None
    return p["codes"].to(device), p["scales"].to(device), ts


def check_one(rng, scheme, path, layout, m, n, k, device) -> float:
    """Worst error of one run as a fraction of the allowed bound (<= 1 passes)."""
    from fp4fmt.kernels.dispatch import fp4_linear

    qt = fp4fmt.quantize(make_weight(rng, n, k), scheme, scale_layout=layout)
    codes, scales, ts = gpu_parts(qt, device)
    x = torch.from_numpy(rng.standard_normal((m, k)).astype(np.float32)).to(device, torch.bfloat16)
    out = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device=device)
    y = fp4_linear(x, codes, scales, ts, k, scale_layout=layout, path=path, out=out).double().cpu().numpy()
    xd = x.double().cpu().numpy()
    w = fp4fmt.dequantize(qt).astype(np.float64)
    ref, mag = xd @ w.T, np.abs(xd) @ np.abs(w).T
    if np.isnan(y).any():
        return float("inf")
    bound = 2.0**-7 * (mag + np.abs(ref)) + 1e-30
    return float((np.abs(y - ref) / bound).max())


def correctness(device, quick: bool) -> list[dict]:
    rng = np.random.default_rng(0)
    shapes = [(1, 96, 200), (5, 130, 161), (33, 257, 4096 + 48)]
    if not quick:
        shapes += [(1, 4096, 4096), (16, 14336, 4096), (256, 4096, 14336)]
    rows = []
    for path in PATHS:
        for scheme in GROUP:
            for layout in ("linear", "swizzled"):
                for m, n, k in shapes:
                    worst = check_one(rng, scheme, path, layout, m, n, k, device)
                    rows.append(dict(path=path, scheme=scheme, layout=layout, m=m, n=n, k=k, worst=worst,
                                     ok=worst <= 1.0))
    return rows


class Timer:
    """Median time in ms of a callable, CUDA events around each call, the L2 flushed between calls."""

    def __init__(self, device, reps: int):
        self.reps = reps
        self.flush = torch.empty(512 << 20, dtype=torch.uint8, device=device)

    def __call__(self, fn) -> float:
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(self.reps):
            self.flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)


def copy_bandwidth(device, timer: Timer) -> float:
    """GB/s of a device-to-device copy of 1 GiB (bytes read + bytes written over the time)."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src))
    return 2 * src.numel() / (ms * 1e-3) / 1e9


def candidates(plan, k: int):
    """The dispatcher's launch and a few neighbours (K splits halved/doubled, N tile halved/doubled)."""
    out = [plan]
    for splits in {max(1, plan.splits // 2), plan.splits * 2}:
        chunks = -(-k // plan.block_k)
        k_split = -(-chunks // splits) * plan.block_k
        out.append(dataclasses.replace(plan, splits=-(-k // k_split), k_split=k_split))
    for bn in {max(32, plan.block_n // 2), plan.block_n * 2}:
        out.append(dataclasses.replace(plan, block_n=bn))
    uniq = []
    for c in out:
        if c not in uniq:
            uniq.append(c)
    return uniq


def timing(device, batches, reps) -> tuple[list[dict], float]:
    from fp4fmt.kernels.dispatch import _processors, fp4_linear, plan_launch

    timer = Timer(device, reps)
    bw = copy_bandwidth(device, timer)
    rng = np.random.default_rng(1)
    rows = []
    for k, n in SHAPES:
        w32 = make_weight(rng, n, k)
        w_bf16 = torch.from_numpy(w32).to(device, torch.bfloat16)
        packed = {s: gpu_parts(fp4fmt.quantize(w32, s), device) for s in GROUP}
        for m in batches:
            x = torch.randn((m, k), device=device, dtype=torch.bfloat16)
            t_bf16 = timer(lambda: torch.matmul(x, w_bf16.T))
            row = dict(k=k, n=n, m=m, bf16_ms=t_bf16,
                       bf16_gbps=(2 * n * k + 2 * m * k + 2 * m * n) / (t_bf16 * 1e-3) / 1e9)
            for scheme, (codes, scales, ts) in packed.items():
                weight_bytes = codes.numel() + scales.numel() + (4 if ts is not None else 0)
                for path in PATHS:
                    plan = plan_launch(path, m, n, k, GROUP[scheme], _processors(device))
                    best = None
                    for cfg in candidates(plan, k):
                        try:
                            ms = timer(lambda: fp4_linear(x, codes, scales, ts, k, path=path, launch=cfg))
                        except Exception as e:  # a configuration the compiler refuses on this device
                            print(f"  skipped {path} {cfg}: {type(e).__name__}: {e}"[:300], file=sys.stderr)
                            continue
                        if best is None or ms < best[0]:
                            best = (ms, cfg)
                    if best is None:
                        continue
                    ms, cfg = best
                    moved = weight_bytes + 2 * m * k + 2 * m * n
                    row[f"{scheme}_{path}_ms"] = ms
                    row[f"{scheme}_{path}_speedup"] = t_bf16 / ms
                    row[f"{scheme}_{path}_gbps"] = moved / (ms * 1e-3) / 1e9
                    row[f"{scheme}_{path}_cfg"] = dataclasses.asdict(cfg)
            rows.append(row)
            print(json.dumps({k2: v for k2, v in row.items() if not k2.endswith("_cfg")}), flush=True)
    return rows, bw


def print_tables(check_rows, rows, bw, device) -> None:
    name = torch.cuda.get_device_name(device)
    cap = torch.cuda.get_device_capability(device)
    print(f"\n{name} (sm_{cap[0]}{cap[1]}), torch {torch.__version__}, triton "
          f"{__import__('triton').__version__}; device copy {bw:.0f} GB/s\n")
    bad = [r for r in check_rows if not r["ok"]]
    print(f"correctness: {len(check_rows) - len(bad)}/{len(check_rows)} cases within bound, "
          f"worst {max(r['worst'] for r in check_rows):.3f} of the bound\n")
    cols = [c[:-3] for c in rows[0] if c.endswith("_ms") and c != "bf16_ms"]
    head = "| K x N | M | BF16 ms | " + " | ".join(f"{c} ms (x BF16, % copy BW)" for c in cols) + " |"
    print(head)
    print("|" + "---|" * (3 + len(cols)))
    for r in rows:
        cells = []
        for c in cols:
            if f"{c}_ms" in r:
                cells.append(f"{r[c + '_ms']:.4f} ({r[c + '_speedup']:.2f}x, {100 * r[c + '_gbps'] / bw:.0f}%)")
            else:
                cells.append("n/a")
        print(f"| {r['k']}x{r['n']} | {r['m']} | {r['bf16_ms']:.4f} | " + " | ".join(cells) + " |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", default="1,4,16,64,256")
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--json", default=None)
    ap.add_argument("--quick", action="store_true", help="small correctness set, 50 reps")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: this benchmark needs a GPU (the kernels are tested on the CPU by the test suite, "
              "in Triton's interpreter)", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    check_rows = correctness(device, args.quick)
    bad = [r for r in check_rows if not r["ok"]]
    for r in bad:
        print(f"FAILED correctness: {r}", file=sys.stderr)
    if bad:
        return 1
    batches = [int(b) for b in args.batches.split(",")]
    rows, bw = timing(device, batches, 50 if args.quick else args.reps)
    print_tables(check_rows, rows, bw, device)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(device), "copy_gbps": bw, "correctness": check_rows,
                       "timing": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
