"""Convert a Hugging Face checkpoint (BF16/FP16/FP32 or FP8) into an fp4fmt checkpoint directory.

Streaming: one tensor in memory per worker (read with pread, quantized, written at its planned offset).
Sharded output of bounded size with an index; resumable (finished shards are verified and kept) and
deterministic (the same input and options give the same bytes, interrupted or not); atomic in the sense
that ``config.json`` and the index, which make the directory loadable, are written last.
"""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import os
import shutil
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .. import __version__, descriptor, dtypes, layout, schemes
from ..errors import FormatError, FP4FmtError, QuantizationError
from ..files import StreamingWriter, safe_open
from ..qtensor import ErrorStats, absmax, absmax_or_nan, quantize_with_error
from . import plan as planning
from .source import INDEX_NAME, SourceCheckpoint

WORK_DIR = ".fp4fmt-convert"  # plan and per-shard reports while a conversion is under way
REPORT_NAME = "fp4fmt_report.json"
DEFAULT_MAX_SHARD_BYTES = 5_000_000_000
HIGH_PRECISION_WARN_SHARE = 0.10  # warn when more than this share of linear-layer parameters stays unquantized


@dataclass(frozen=True)
class Options:
    scheme: str = "nvfp4"
    scale_rule: str | None = None
    ignore: tuple[str, ...] = planning.DEFAULT_IGNORE
    overrides: tuple[planning.Override, ...] = ()
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES
    share_fused_scales: bool = True
    tensor_scale: str = "amax"  # NVFP4: "amax" (spec §5.1) or "compressed-tensors" (see tensor_scale_of)

    def __post_init__(self) -> None:
        if self.tensor_scale not in TENSOR_SCALE_QUANTIZER:
            raise FP4FmtError(f"tensor_scale must be one of {sorted(TENSOR_SCALE_QUANTIZER)}, not {self.tensor_scale!r}")


# the descriptor's ``quantizer`` for each tensor-scale choice: "rtn" is spec §5 exactly; the other is §5 with
# the tensor scale moved up to the nearest float32 that compressed-tensors' divisor form represents exactly
TENSOR_SCALE_QUANTIZER = {"amax": "rtn", "compressed-tensors": "rtn-ct-scale"}


def tensor_scale_of(amax: float, opts: Options) -> float:
    """The NVFP4 tensor scale a conversion writes for ``amax``: fl32(amax / 2688) (§5.1), or with
    ``tensor_scale="compressed-tensors"`` the smallest float32 at or above it whose compressed-tensors global
    scale decompresses every (scale, code) pair bit-identically (``interop.compressed_tensors.exact_tensor_scale``;
    typically a few ulps up)."""
    s2 = schemes.nvfp4_tensor_scale(amax)
    if opts.tensor_scale == "compressed-tensors":
        from .interop.compressed_tensors import exact_tensor_scale

        s2 = exact_tensor_scale(s2)
    return float(s2)


@dataclass
class Result:
    dst: Path
    report: dict
    warnings: list[str] = field(default_factory=list)
    shards_written: int = 0
    shards_reused: int = 0


# ----------------------------------------------------------------------------------------------------------
# planning


def _fp8_source(src: SourceCheckpoint):
    from . import fp8

    return fp8.detect_fp8(src.config, src.hf_quant_config, {n: t.dtype for n, t in src.tensors.items()})


def make_plan(src: SourceCheckpoint, opts: Options) -> list[planning.Action]:
    """One action per source tensor, in name order."""
    from .fp8 import is_fp8_weight

    fp8 = _fp8_source(src)
    consumed: set[str] = set()
    if fp8 is not None:
        for n, t in src.tensors.items():
            if is_fp8_weight(n, t.dtype) and fp8.scale_name(n) in src.tensors:
                consumed.add(fp8.scale_name(n))
    actions = []
    for n in sorted(src.tensors):
        t = src.tensors[n]
        if n in consumed:
            continue
        if fp8 is not None:
            why = fp8.auxiliary(n)
            if why:
                actions.append(planning.Action(n, "drop", why, t.dtype, t.shape))
                continue
        fp8_scale = None
        if fp8 is not None and is_fp8_weight(n, t.dtype):
            fp8_scale = fp8.scale_name(n)
            if fp8_scale not in src.tensors:
                raise FormatError(f"FP8 weight without its scale tensor {fp8_scale!r}", file=t.file, tensor=n)
        dtype = t.dtype if fp8_scale is None else "F32"  # FP8 weights are dequantized to float32 first
        a = planning.decide(n, dtype, t.shape, scheme=opts.scheme, config=src.config, ignore=opts.ignore,
                            overrides=opts.overrides, fp8_scale=fp8_scale)
        if fp8_scale is not None:
            a = planning.Action(**{**asdict(a), "dtype": t.dtype})
        actions.append(a)
    if not opts.share_fused_scales:
        actions = [planning.Action(**{**asdict(a), "group": None}) for a in actions]
    return planning.finalize_groups(actions)


def _out_bytes(a: planning.Action, opts: Options) -> int:
    if a.kind == "drop":
        return 0
    if a.kind == "keep":
        return int(np.prod(a.shape, dtype=np.int64)) * dtypes.itemsize(a.out_dtype)
    sch = schemes.SCHEMES[a.scheme]
    geo = layout.geometry(a.shape, a.axis, sch.block_size)
    return geo.rows * geo.padded_k // 2 + geo.rows * geo.n_blocks + (4 if sch.has_tensor_scale else 0)


def shard_plan(actions: list[planning.Action], opts: Options) -> list[list[planning.Action]]:
    """Consecutive tensors (name order) packed into shards of at most max_shard_bytes (a larger tensor alone)."""
    shards: list[list[planning.Action]] = [[]]
    size = 0
    for a in actions:
        if a.kind == "drop":
            continue
        b = _out_bytes(a, opts)
        if shards[-1] and size + b > opts.max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(a)
        size += b
    return [s for s in shards if s]


def shard_names(n: int) -> list[str]:
    return ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


# ----------------------------------------------------------------------------------------------------------
# reading one tensor


def _load(src: SourceCheckpoint, a: planning.Action, fp8=None) -> np.ndarray:
    x = src.read(a.name)
    if a.fp8_scale is not None:
        x = fp8.dequantize(x, src.read(a.fp8_scale), name=a.name)
    return x


def group_tensor_scales(src: SourceCheckpoint, actions: list[planning.Action], progress: Callable | None = None,
                        opts: Options = Options()) -> dict[str, float]:
    """The shared NVFP4 tensor scale of each fused group: of the amax over all its members (tensor_scale_of)."""
    fp8 = _fp8_source(src) if any(a.fp8_scale for a in actions) else None
    amax: dict[str, float] = {}
    members = [a for a in actions if a.kind == "quantize" and a.group]
    for a in members:
        if a.fp8_scale is None:
            m = _scan_amax(src, a)
        else:
            try:
                m = absmax(_load(src, a, fp8), name=a.name)
            except FP4FmtError as e:
                raise type(e)(e.rule, file=src.tensors[a.name].file, tensor=a.name) from None
        amax[a.group] = max(amax.get(a.group, 0.0), m)
        if progress:
            progress(a.name)
    return {g: tensor_scale_of(v, opts) for g, v in sorted(amax.items())}


# ----------------------------------------------------------------------------------------------------------
# writing one shard (runs in a worker process when --workers > 1)


@dataclass(frozen=True)
class ShardTask:
    src_path: str
    dst_file: str
    actions: tuple[planning.Action, ...]
    opts: Options
    group_scales: dict
    plan_digest: str


def _json_float(v: float) -> float | None:
    return v if math.isfinite(v) else None


CHUNK_BYTES = 16 << 20  # source bytes per piece of work: bounds memory to a few pieces per thread


def _row_pieces(shape: tuple[int, ...], itemsize: int) -> list[tuple[int, int]]:
    """[r0, r1) row ranges of a tensor seen as [rows, last dim], about CHUNK_BYTES each."""
    rows = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
    row_bytes = max(1, shape[-1] * itemsize) if shape else itemsize
    step = max(1, CHUNK_BYTES // row_bytes)
    return [(r, min(r + step, rows)) for r in range(0, rows, step)] or [(0, 0)]


def _read_rows(src: SourceCheckpoint, name: str, r0: int, r1: int) -> np.ndarray:
    """Rows [r0, r1) of a tensor seen as [rows, last dim] (a 1-D tensor is one row)."""
    t = src.tensors[name]
    k = t.shape[-1] if t.shape else 1
    return src.read_range(name, r0 * k, r1 * k).reshape(r1 - r0, k)


def _scan_amax(src: SourceCheckpoint, a: planning.Action) -> float:
    """max |x| of a source tensor, read piece by piece; a NaN/Inf is reported with its logical index."""
    t = src.tensors[a.name]
    k = t.shape[-1] if t.shape else 1
    rows_per_piece = _row_pieces(t.shape, dtypes.itemsize(t.dtype))[0][1] or 1
    best = 0.0
    for start, view in src.scan_pieces(a.name, rows_per_piece * k):
        m = absmax_or_nan(view)
        if not np.isfinite(m):
            rows = np.array(view).reshape(-1, k)
            raise _nonfinite(t, rows, start // k)
        best = max(best, m)
    return best


def _nonfinite(t, rows: np.ndarray, r0: int) -> FP4FmtError:
    """The error for a NaN/Inf in ``rows`` (rows r0.. of tensor t seen as [rows, last dim]), with the
    element's index in the tensor's own shape."""
    finite = np.isfinite(rows.astype(np.float32))
    i, j = np.unravel_index(int(np.argmin(finite.reshape(-1))), rows.shape)
    idx = ([int(v) for v in np.unravel_index(r0 + i, t.shape[:-1])] if len(t.shape) > 1 else []) + [int(j)]
    return QuantizationError(f"value {rows[i, j]} at index {idx} is not finite; NaN and Inf cannot be quantized",
                             file=t.file, tensor=t.name)


def _pieced(a: planning.Action, t) -> bool:
    """Done in row pieces: a float (not FP8) source quantized along its last axis, or kept unchanged."""
    if a.fp8_scale is not None:
        return False
    if a.kind == "quantize":
        return a.axis == len(a.shape) - 1
    return a.out_dtype == a.dtype and bool(t.shape) and t.nbytes > 0


def write_shard(task: ShardTask, progress: Callable | None = None, threads: int = 1) -> dict:
    """Quantize and write one output shard; returns its per-tensor report entries.

    Tensors whose blocks run along their last axis are cut into row pieces of about CHUNK_BYTES, and the
    pieces of all of them go through one pool of ``threads`` threads (the native quantizer, reads, writes
    and hashing release the GIL), each piece written at its place in the file. Others (FP8 sources, other
    axes) are done whole first. Memory stays at a few pieces per thread plus the largest tensor that
    cannot be split.
    """
    src = SourceCheckpoint(task.src_path)
    fp8 = _fp8_source(src) if any(a.fp8_scale for a in task.actions) else None
    plan_layout: dict = {}
    for a in task.actions:
        if a.kind == "quantize":
            s = schemes.SCHEMES[a.scheme]
            rule = task.opts.scale_rule if (task.opts.scale_rule and a.scheme == "mxfp4") else s.default_rule
            dt = a.dtype if a.fp8_scale is None else "F32"
            quantizer = TENSOR_SCALE_QUANTIZER[task.opts.tensor_scale] if s.has_tensor_scale else "rtn"
            plan_layout[a.name] = descriptor.TensorDescriptor(a.name, a.scheme, a.shape, dt, a.axis, "linear", rule,
                                                              quantizer)
        else:
            plan_layout[a.name] = (a.out_dtype, a.shape)
    entries: dict[str, dict] = {}
    meta = {"format": "pt", "fp4fmt_plan": task.plan_digest}
    with StreamingWriter(task.dst_file, plan_layout, meta) as w, ThreadPoolExecutor(max(1, threads)) as pool, \
            ThreadPoolExecutor(1) as scan_ahead:
        pieced: list[tuple[planning.Action, int, Callable]] = []  # action, first job index, finalize(results)
        jobs: list[tuple[Callable, tuple[int, int]]] = []
        for a in task.actions:
            t = src.tensors[a.name]
            if _pieced(a, t):
                new_jobs, finalize = (_quantize_pieces(src, a, plan_layout[a.name], task, w, scan_ahead)
                                      if a.kind == "quantize" else _copy_pieces(src, a, w))
                pieced.append((a, len(jobs), finalize))
                jobs += new_jobs
                continue
            if a.kind == "quantize":  # whole: an FP8 source or blocks along another axis
                td = plan_layout[a.name]
                ts = task.group_scales.get(a.group) if a.group else None
                try:
                    x = _load(src, a, fp8)
                    if ts is None and schemes.SCHEMES[a.scheme].has_tensor_scale and task.opts.tensor_scale != "amax":
                        ts = tensor_scale_of(absmax(x, name=a.name), task.opts)
                    qt, st = quantize_with_error(x, a.scheme, axis=a.axis, tensor_scale=ts,
                                                 scale_rule=td.scale_rule, name=a.name)
                    x = None
                except FP4FmtError as e:
                    raise type(e)(e.rule, file=t.file, tensor=a.name) from None
                w.add(a.name, qt)
                entries[a.name] = _quantized_entry(a, t, st, qt.nbytes)
                qt = None  # free before the next tensor is read
            else:
                x = _load(src, a, fp8)
                value = x if a.out_dtype == a.dtype else x.astype(dtypes.numpy_dtype(a.out_dtype))
                w.add(a.name, value)
                entries[a.name] = _kept_entry(a, t, value.nbytes)
                x = value = None
            if progress:
                progress(a.name)
        # every piece of every pieced tensor through the pool; a tensor is reported when its last piece lands
        job_owner = [i for i, (_, first, _) in enumerate(pieced)
                     for _ in range(first, pieced[i + 1][1] if i + 1 < len(pieced) else len(jobs))]
        left = [0] * len(pieced)
        for i in job_owner:
            left[i] += 1

        def landed(j: int) -> None:
            left[job_owner[j]] -= 1
            if left[job_owner[j]] == 0 and progress:
                progress(pieced[job_owner[j]][0].name)

        results = _bounded_map(pool, lambda job: job[0](job[1]), jobs, 2 * max(1, threads), landed)
        for i, (a, first, finalize) in enumerate(pieced):
            end = pieced[i + 1][1] if i + 1 < len(pieced) else len(jobs)
            entries[a.name] = finalize(results[first:end])
        for f in [pool.submit(w.finish_part, slot) for slot in list(w.pieced_slots())]:
            f.result()
    return entries


def _quantized_entry(a: planning.Action, t, st: ErrorStats, nbytes: int) -> dict:
    return {
        "action": "quantized",
        "scheme": a.scheme,
        "shape": list(a.shape),
        "source_dtype": a.dtype,
        "axis": a.axis,
        "what": a.reason,
        "tensor_scale_group": a.group,
        "sqnr_db": _json_float(st.sqnr_db),
        "rel_rmse": st.rel_rmse,
        "max_abs_error": st.max_abs_error,
        "source_bytes": t.nbytes,
        "stored_bytes": nbytes,
        "bits_per_weight": 8.0 * nbytes / max(1, int(np.prod(a.shape, dtype=np.int64))),
    }


def _kept_entry(a: planning.Action, t, nbytes: int) -> dict:
    return {
        "action": "kept",
        "reason": a.reason + (" (FP8 dequantized, stored as BF16)" if a.fp8_scale else ""),
        "shape": list(a.shape),
        "dtype": a.out_dtype,
        "linear_like": planning.is_linear_like(a),
        "source_bytes": t.nbytes,
        "stored_bytes": nbytes,
    }


def _bounded_map(pool: ThreadPoolExecutor, fn: Callable, items: list, depth: int,
                 on_done: Callable[[int], None] | None = None) -> list:
    """pool.map with at most ``depth`` items in flight (bounds memory); results in item order;
    ``on_done(i)`` is called in this thread as item i completes."""
    results: list = [None] * len(items)
    pending: dict = {}

    def collect(done) -> None:
        for f in done:
            i = pending.pop(f)
            results[i] = f.result()
            if on_done:
                on_done(i)

    for i, item in enumerate(items):
        if len(pending) >= depth:
            collect(wait(pending, return_when=FIRST_COMPLETED)[0])
        pending[pool.submit(fn, item)] = i
    while pending:
        collect(wait(pending, return_when=FIRST_COMPLETED)[0])
    return results


def _quantize_pieces(src, a: planning.Action, td, task: ShardTask, w: StreamingWriter,
                     scan_ahead: ThreadPoolExecutor) -> tuple[list, Callable]:
    """The row-piece jobs of one quantized tensor, and the function that turns their results into its
    report entry. An NVFP4 tensor outside a fused group needs its own amax before its pieces can run:
    that zero-copy pass is queued on ``scan_ahead``, which runs ahead of the pieces."""
    t = src.tensors[a.name]
    sch = schemes.SCHEMES[a.scheme]
    geo = layout.geometry(a.shape, a.axis, sch.block_size)
    if sch.has_tensor_scale and not a.group:
        ts_future = scan_ahead.submit(lambda: tensor_scale_of(_scan_amax(src, a), task.opts))
        tensor_scale = ts_future.result
    else:
        fixed = task.group_scales[a.group] if sch.has_tensor_scale else None
        tensor_scale = lambda: fixed  # noqa: E731
    parts = td.part_names()
    row_codes, row_scales = geo.padded_k // 2, geo.n_blocks

    def piece(rng: tuple[int, int]) -> tuple[float, float, float]:
        r0, r1 = rng
        ts = tensor_scale()
        x = _read_rows(src, a.name, r0, r1)
        try:
            qt, st = quantize_with_error(x, a.scheme, tensor_scale=ts, scale_rule=td.scale_rule, name=a.name)
        except QuantizationError:
            raise _nonfinite(t, x, r0) from None
        w.write_part(parts["codes"], r0 * row_codes, qt.codes)
        w.write_part(parts["scales"], r0 * row_scales, qt.scales)
        return st.sum_sq_signal, st.sum_sq_error, st.max_abs_error

    def finalize(sums: list) -> dict:
        if "tensor_scale" in parts:
            w.add_part(parts["tensor_scale"], np.array(tensor_scale(), dtype="<f4"))
        e2 = x2 = emax = 0.0
        for sx, se, m in sums:  # in row order: the same floating-point sums however the threads ran
            x2 += sx
            e2 += se
            emax = max(emax, m)
        nbytes = geo.rows * (row_codes + row_scales) + (4 if "tensor_scale" in parts else 0)
        return _quantized_entry(a, t, ErrorStats(geo.rows * geo.k, x2, e2, emax), nbytes)

    return [(piece, rng) for rng in _row_pieces(a.shape, dtypes.itemsize(t.dtype))], finalize


def _copy_pieces(src, a: planning.Action, w: StreamingWriter) -> tuple[list, Callable]:
    """The row-piece jobs that copy one kept tensor unchanged, and its report entry."""
    t = src.tensors[a.name]
    k = t.shape[-1]
    isz = dtypes.itemsize(t.dtype)

    def piece(rng: tuple[int, int]) -> None:
        r0, r1 = rng
        w.write_part(a.name, r0 * k * isz, _read_rows(src, a.name, r0, r1))

    return [(piece, rng) for rng in _row_pieces(t.shape, isz)], lambda _: _kept_entry(a, t, t.nbytes)


def _run_task(args: tuple[ShardTask, int]) -> tuple[str, dict]:
    task, threads = args
    return task.dst_file, write_shard(task, threads=threads)


# ----------------------------------------------------------------------------------------------------------
# the whole conversion


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _prepare_dst(src: SourceCheckpoint, dst: Path, overwrite: bool, digest: str) -> bool:
    """Make dst ready; True if it holds a resumable conversion with the same plan."""
    s, d = src.path.resolve(), dst.resolve()
    if s == d or d in s.parents or (src.path.is_dir() and s in d.parents):
        raise FP4FmtError("the destination must not be, contain or lie inside the source directory or file",
                          file=dst)
    if dst.exists() and not dst.is_dir():
        raise FP4FmtError("exists and is not a directory", file=dst)
    if dst.exists() and any(dst.iterdir()):
        plan_file = dst / WORK_DIR / "plan.json"
        if overwrite:
            shutil.rmtree(dst)
        elif plan_file.exists() and json.loads(plan_file.read_text()).get("digest") == digest:
            for stale in dst.glob(".*.fp4fmt-tmp"):  # a shard being written when the last run was killed
                stale.unlink()
            return True
        elif plan_file.exists():
            raise FP4FmtError("holds an unfinished conversion with other inputs or options; pass --overwrite to "
                              "start again", file=dst)
        else:
            raise FP4FmtError("exists and is not empty; pass --overwrite to replace it", file=dst)
    (dst / WORK_DIR).mkdir(parents=True, exist_ok=True)
    return False


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.fp4fmt-tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _shard_done(path: Path, digest: str) -> bool:
    """A finished shard of this plan: it opens, carries the plan digest and its checksums verify."""
    if not path.exists():
        return False
    try:
        with safe_open(path) as f:
            if f.metadata().get("fp4fmt_plan") != digest:
                return False
            f.verify()
        return True
    except FP4FmtError:
        return False


def convert_checkpoint(
    src_path: str | os.PathLike,
    dst_path: str | os.PathLike,
    opts: Options = Options(),
    *,
    workers: int = 1,
    threads: int | None = None,
    overwrite: bool = False,
    progress: Callable[[str, int, int], None] | None = None,
) -> Result:
    """Convert ``src_path`` (checkpoint dir or one .safetensors file) into directory ``dst_path``.

    ``progress(stage, done, total)`` is called as tensors are processed. The source is only read.
    """
    src = SourceCheckpoint(src_path)
    dst = Path(dst_path)
    schemes.get_scheme(opts.scheme)
    if threads is None:  # share the CPUs between the worker processes
        threads = max(1, (os.cpu_count() or 1) // max(1, workers))
    actions = make_plan(src, opts)
    shards = shard_plan(actions, opts)
    names = shard_names(len(shards))
    fingerprint = {n: [t.file.name, t.dtype, list(t.shape), t.offset, t.nbytes] for n, t in src.tensors.items()}
    digest = _digest({"fp4fmt": __version__, "opts": asdict(opts), "actions": [asdict(a) for a in actions],
                      "source": fingerprint})
    resuming = _prepare_dst(src, dst, overwrite, digest)
    work = dst / WORK_DIR
    if not resuming:
        _write_json(work / "plan.json", {"digest": digest, "source": str(src.path), "shards": names})

    total = sum(1 for a in actions if a.kind != "drop")
    grouped = [a for a in actions if a.kind == "quantize" and a.group]
    done = {"n": 0}

    def tick(stage: str, count: int) -> Callable:
        def f(_name):
            done["n"] += 1
            if progress:
                progress(stage, done["n"], count)
        return f

    group_scales = group_tensor_scales(src, actions, tick("scanning fused groups", len(grouped)), opts)
    done["n"] = 0
    result = Result(dst, {})
    tasks = []
    for name, shard in zip(names, shards):
        rep = work / f"{name}.report.json"
        if resuming and rep.exists() and _shard_done(dst / name, digest):
            result.shards_reused += 1
            done["n"] += len(shard)
            continue
        tasks.append(ShardTask(str(src.path), str(dst / name), tuple(shard), opts, group_scales, digest))
    if progress:
        progress("converting", done["n"], total)
    if workers <= 1 or len(tasks) <= 1:
        for t in tasks:
            entries = write_shard(t, tick("converting", total), threads=threads)
            _write_json(work / f"{Path(t.dst_file).name}.report.json", entries)
            result.shards_written += 1
    else:
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(min(workers, len(tasks))) as pool:
            for dst_file, entries in pool.imap_unordered(_run_task, [(t, threads) for t in tasks]):
                _write_json(work / f"{Path(dst_file).name}.report.json", entries)
                result.shards_written += 1
                done["n"] += len(entries)
                if progress:
                    progress("converting", done["n"], total)

    tensors: dict[str, dict] = {}
    weight_map: dict[str, str] = {}
    for name in names:
        tensors.update(json.loads((work / f"{name}.report.json").read_text()))
        with safe_open(dst / name) as f:
            for stored in f.stored_keys():
                weight_map[stored] = name
    dropped = {a.name: a.reason for a in actions if a.kind == "drop"}
    report, warnings = _report(src, opts, actions, tensors, dropped, names, dst)
    result.report, result.warnings = report, warnings

    for f in src.side_files():
        if f.is_dir():
            shutil.copytree(f, dst / f.name, dirs_exist_ok=True)
        else:
            shutil.copyfile(f, dst / f.name)
    _write_json(dst / REPORT_NAME, report)
    total_size = sum((dst / n).stat().st_size for n in names)
    if len(names) > 1:
        _write_json(dst / INDEX_NAME, {"metadata": {"total_size": total_size, "fp4fmt_format_version":
                                                    descriptor.FORMAT_VERSION}, "weight_map": weight_map})
    if src.config is not None:  # last: config.json is what makes the folder loadable
        _write_json(dst / "config.json", _config_with_quantization(src.config, opts, actions))
    shutil.rmtree(work)
    return result


def _config_with_quantization(config: dict, opts: Options, actions: list[planning.Action]) -> dict:
    cfg = dict(config)
    sch = schemes.SCHEMES[opts.scheme]
    kept = sorted({a.name.rsplit(".", 1)[0] for a in actions
                   if a.kind == "keep" and len(a.shape) >= 2 and (a.fp8_scale or a.dtype in dtypes.FLOAT_SOURCE_DTYPES)})
    cfg["quantization_config"] = {
        "quant_method": "fp4fmt",
        "format_version": descriptor.FORMAT_VERSION,
        "scheme": opts.scheme,
        "block_size": sch.block_size,
        "scale_rule": opts.scale_rule if (opts.scale_rule and opts.scheme == "mxfp4") else sch.default_rule,
        "fused_tensor_scales": opts.share_fused_scales and opts.scheme == "nvfp4",
        "ignore": kept,
        "producer": {"name": "fp4fmt", "version": __version__},
    }
    if opts.tensor_scale != "amax" and opts.scheme == "nvfp4":
        cfg["quantization_config"]["tensor_scale"] = opts.tensor_scale
    return cfg


def _report(src, opts, actions, tensors, dropped, names, dst) -> tuple[dict, list[str]]:
    quantized = {n: e for n, e in tensors.items() if e["action"] == "quantized"}
    kept = {n: e for n, e in tensors.items() if e["action"] == "kept"}
    q_params = sum(int(np.prod(e["shape"])) for e in quantized.values())
    hp_linear = {n: e for n, e in kept.items() if e["linear_like"]}
    hp_params = sum(int(np.prod(e["shape"])) for e in hp_linear.values())
    share = hp_params / (hp_params + q_params) if hp_params + q_params else 0.0
    warnings = []
    if share > HIGH_PRECISION_WARN_SHARE:
        warnings.append(
            f"{100 * share:.1f}% of linear-layer parameters stayed in high precision ({len(hp_linear)} tensors, "
            f"e.g. {sorted(hp_linear)[:3]}); check the reasons in the report: an unrecognised layout must not pass "
            "unnoticed"
        )
    unrecognised = [n for n, e in kept.items() if "UNRECOGNISED" in e["reason"]]
    if unrecognised:
        warnings.append(f"{len(unrecognised)} fused-experts tensor(s) with an unrecognised layout were kept: {unrecognised[:5]}")
    source_bytes = sum(t.nbytes for t in src.tensors.values())
    out_bytes = sum((dst / n).stat().st_size for n in names)
    report = {
        "fp4fmt_report_version": 1,
        "producer": {"name": "fp4fmt", "version": __version__},
        "source": {"files": [f.name for f in src.files], "tensors": len(src.tensors), "bytes": source_bytes},
        "options": {"scheme": opts.scheme, "scale_rule": opts.scale_rule, "ignore": list(opts.ignore),
                    "overrides": [asdict(o) for o in opts.overrides], "max_shard_bytes": opts.max_shard_bytes,
                    "share_fused_scales": opts.share_fused_scales},
        "output": {"shards": names, "bytes": out_bytes},
        "summary": {
            "quantized_tensors": len(quantized),
            "quantized_params": q_params,
            "kept_tensors": len(kept),
            "dropped_tensors": len(dropped),
            "linear_params_high_precision": hp_params,
            "linear_share_high_precision": share,
            "min_sqnr_db": min((e["sqnr_db"] for e in quantized.values() if e["sqnr_db"] is not None), default=None),
            "compression_ratio": source_bytes / out_bytes if out_bytes else None,
        },
        "warnings": warnings,
        "tensors": {n: tensors[n] for n in sorted(tensors)},
        "dropped": dropped,
    }
    return report, warnings
