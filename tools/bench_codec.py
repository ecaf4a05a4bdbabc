"""Single-thread throughput of fp4fmt's codec against a memory copy and torchao's NVFP4 quantizer.

    python tools/bench_codec.py [--rows R --cols C --repeat N --json OUT]

One process, one thread (the thread-count variables are set before numpy and torch are imported, and
torch.set_num_threads(1)). The input is a bfloat16 weight (default 4096 x 4096, Student-t values with 4
degrees of freedom, so blocks have outliers). Every row is the median wall time over the repeats, reported
as MB/s of the bfloat16 input (1 MB = 10^6 bytes):

* ``memcpy (np.copyto)``: the same bytes into a preallocated array, the ceiling for a streaming pass;
* ``torch clone``: the same bytes through torch, for reference;
* ``fp4fmt quantize nvfp4`` / ``mxfp4``: the public ``fp4fmt.quantize`` (scan, tensor scale, block scales,
  E2M1 codes, nibble packing) returning a QTensor;
* ``fp4fmt dequantize nvfp4``: ``fp4fmt.dequantize`` of that QTensor to float32;
* ``torchao to_nvfp4``: ``NVFP4Tensor.to_nvfp4`` on CPU with a per-tensor scale (its amax included, as
  fp4fmt computes its own), the same two-level scheme as fp4fmt's nvfp4.

Ratios: fp4fmt nvfp4 quantize over torchao, and over the memory copy. This is a benchmark, not a test.
"""

from __future__ import annotations

import os

THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS", "VECLIB_MAXIMUM_THREADS")
for _var in THREAD_VARS:
    os.environ[_var] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable  # noqa: E402

import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

try:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import torchao  # noqa: E402
        from torchao.prototype.mx_formats.nvfp4_tensor import NVFP4Tensor, per_tensor_amax_to_scale  # noqa: E402
except ImportError:  # pragma: no cover - torchao is a dev dependency
    torchao = None

import fp4fmt  # noqa: E402
from fp4fmt import qtensor  # noqa: E402

torch.set_num_threads(1)

# torchao's eager quantizer is far slower than a copy; above this many seconds per call it gets fewer repeats.
SLOW_CALL_S = 2.0


def make_weight(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """A bfloat16 [rows, cols] weight with Student-t (4 dof) values scaled like a linear layer."""
    rng = np.random.default_rng(seed)
    return (rng.standard_t(4, (rows, cols)) * 0.02).astype(np.float32).astype(ml_dtypes.bfloat16)


def time_median(fn: Callable[[], object], repeat: int, warmup: int = 1) -> tuple[float, int]:
    """Median wall time of ``fn()`` over ``repeat`` calls after ``warmup`` untimed calls -> (seconds, calls)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), repeat


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    return {
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "threads": 1,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "torchao": getattr(torchao, "__version__", None),
        "fp4fmt": fp4fmt.__version__,
        "fp4fmt_native": qtensor._native is not None,
    }


def run(rows: int, cols: int, repeat: int) -> dict:
    """Time every row of the benchmark on one [rows, cols] bfloat16 weight."""
    x = make_weight(rows, cols)
    nbytes = x.nbytes
    t = torch.from_numpy(x.view(np.int16).copy()).view(torch.bfloat16)
    dst = np.empty_like(x)

    # The public API, native path when available (checked, so the report says which one ran).
    implementation = "native" if qtensor._native is not None else "reference"
    qt_nv = fp4fmt.quantize(x, "nvfp4", implementation=implementation)
    fp4fmt.quantize(x, "mxfp4", implementation=implementation)

    cases: list[tuple[str, Callable[[], object]]] = [
        ("memcpy (np.copyto)", lambda: np.copyto(dst, x)),
        ("torch clone", lambda: t.clone()),
        ("fp4fmt quantize nvfp4", lambda: fp4fmt.quantize(x, "nvfp4")),
        ("fp4fmt quantize mxfp4", lambda: fp4fmt.quantize(x, "mxfp4")),
        ("fp4fmt dequantize nvfp4", lambda: fp4fmt.dequantize(qt_nv)),
    ]
    if torchao is not None:

        def torchao_nvfp4() -> object:
            return NVFP4Tensor.to_nvfp4(t, per_tensor_scale=per_tensor_amax_to_scale(t.abs().amax()))

        cases.append(("torchao to_nvfp4", torchao_nvfp4))

    results = {}
    for name, fn in cases:
        reps = repeat
        if name.startswith("torchao"):
            t0 = time.perf_counter()
            fn()  # also the warm-up
            first = time.perf_counter() - t0
            reps = max(1, min(repeat, int(SLOW_CALL_S * repeat / first))) if first > SLOW_CALL_S else repeat
            seconds, calls = time_median(fn, reps, warmup=0)
        else:
            seconds, calls = time_median(fn, reps)
        results[name] = {"seconds": seconds, "repeats": calls, "mb_per_s": nbytes / seconds / 1e6}

    nv = results["fp4fmt quantize nvfp4"]["mb_per_s"]
    ratios = {"nvfp4_quantize_over_memcpy": nv / results["memcpy (np.copyto)"]["mb_per_s"]}
    if "torchao to_nvfp4" in results:
        ratios["nvfp4_quantize_over_torchao"] = nv / results["torchao to_nvfp4"]["mb_per_s"]
    return {
        "shape": [rows, cols],
        "input_dtype": "bfloat16",
        "input_bytes": nbytes,
        "implementation": implementation,
        "machine": machine_info(),
        "results": results,
        "ratios": ratios,
    }


def markdown(report: dict) -> str:
    """The report as a Markdown table plus the ratios and machine line."""
    m = report["machine"]
    rows, cols = report["shape"]
    lines = [
        f"Codec throughput, {rows} x {cols} bfloat16 ({report['input_bytes'] / 1e6:.1f} MB), one thread, "
        f"fp4fmt {report['implementation']} path",
        "",
        "| operation | median time (ms) | repeats | MB/s of bf16 input |",
        "|---|---:|---:|---:|",
    ]
    for name, r in report["results"].items():
        lines.append(f"| {name} | {r['seconds'] * 1e3:.2f} | {r['repeats']} | {r['mb_per_s']:.0f} |")
    lines.append("")
    ratios = report["ratios"]
    if "nvfp4_quantize_over_torchao" in ratios:
        lines.append(f"- fp4fmt nvfp4 quantize / torchao to_nvfp4: {ratios['nvfp4_quantize_over_torchao']:.1f}x")
    lines.append(f"- fp4fmt nvfp4 quantize / memcpy: {ratios['nvfp4_quantize_over_memcpy'] * 100:.1f}%")
    lines.append(
        f"- machine: {m['cpu']} ({m['logical_cpus']} logical CPUs, 1 used); python {m['python']}, numpy {m['numpy']}, "
        f"torch {m['torch']}, torchao {m['torchao']}, fp4fmt {m['fp4fmt']} (native accelerator: "
        f"{'yes' if m['fp4fmt_native'] else 'no'})"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=7, help="timed calls per row (median reported)")
    ap.add_argument("--json", metavar="OUT", help="also write the report as JSON to OUT")
    args = ap.parse_args(argv)
    if args.rows < 1 or args.cols < 1 or args.repeat < 1:
        ap.error("--rows, --cols and --repeat must be positive")
    report = run(args.rows, args.cols, args.repeat)
    print(markdown(report))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
