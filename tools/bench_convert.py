"""Wall time, throughput and peak memory of ``fp4fmt convert`` (the checkpoint converter), run as a user runs it.

    python tools/bench_convert.py [--work DIR] [--synthetic-gb 2.2] [--json OUT]
                                  [--repeat N] [--schemes nvfp4,mxfp4] [--rss-method auto|time|rusage]

Every measurement is one run of the command line ``<venv>/bin/fp4fmt convert SRC DST --scheme S`` in a
fresh process (default options: one worker, 5 GB output shards), in this order:

1. **Fixed overhead.** The same command converting a tiny checkpoint (a few 64..256 x 64 BF16 tensors): its
   peak RSS is the interpreter, numpy, click and fp4fmt, i.e. what a conversion costs before any tensor.
2. **SmolLM2-135M** (``tools/smollm2_checkpoint.build()``, a ~270 MB BF16 Hugging Face checkpoint), ``--repeat``
   runs per scheme: median wall time, throughput in MB/s of source checkpoint bytes (the sizes of its
   ``.safetensors`` files, 1 MB = 10^6 bytes), peak RSS against the checkpoint size.
3. **Synthetic checkpoint** of ``--synthetic-gb`` GB (0 skips it), written to the work folder tensor by tensor in
   64 MiB pieces with fp4fmt's container layer (so it is never held in memory) and sharded (<= 1 GB shards plus
   ``model.safetensors.index.json``): a Llama-like BF16 model (hidden size 4096) whose layer 0 has a wide MLP,
   so ``gate_proj``/``up_proj``/``down_proj`` of that layer are the largest tensors (512 MiB each from 2 GB
   on); the embedding is kept, the rest quantized, q/k/v and gate/up share NVFP4 tensor scales. Reported:
   peak RSS, the largest tensor's bytes and ``(peak RSS - fixed overhead) / largest tensor``, whose target is
   below 2 (peak RSS under twice the largest tensor plus a fixed overhead).

For each checkpoint and scheme the same process also times the codec alone: ``fp4fmt.quantize`` (and
``fp4fmt.quantize_with_error``, which the converter calls) on the checkpoint's three largest quantized tensors,
read from it (real values and shapes), with ``bench_codec.time_median`` (median of 3 after a warm-up). The
codec MB/s is their bytes over the sum of their median times; ``conversion / codec`` is the conversion MB/s
over it (target: at least 0.5, i.e. conversion within 2x of the codec).

Where the time goes: each checkpoint is also converted once in this process under ``cProfile`` (first scheme),
and the exclusive time of the leaf calls is summed per stage: reading the source (``os.preadv``), native amax
scans, native quantization with its error statistics, sha256 checksums, ``os.pwrite``, ``fsync``, and the rest.
The table also gives the bytes read over the tensor bytes: members of a fused group (q/k/v, gate/up) are read
twice, once for their shared NVFP4 tensor scale and once to be quantized. Interpreter start-up is not in it;
the tiny checkpoint's wall time shows it.

Peak RSS comes from GNU time: ``/usr/bin/time -v`` ("Maximum resident set size"). Where it is missing,
install it with ``apt-get update && apt-get install -y time``; without it (or with ``--rss-method rusage``)
each run goes through a small Python wrapper process that runs the command and reads
``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss`` (a fresh wrapper per run, because that figure is a maximum
over every child a process has waited for). The report names the method used.

Caveats, as measured: the source is read from the page cache (it was just written or read), while the
output is written through to the disk (the converter fsyncs every shard), so wall times include this
machine's disk write speed. Thread-count variables are set to 1 (as in ``bench_codec.py``); the converter
itself is single-threaded with one worker. This is a benchmark, not a test.
"""

from __future__ import annotations

import os
import sys

TOOLS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, TOOLS)

import bench_codec  # noqa: E402  (sets the thread-count variables to 1 before numpy is imported)

import argparse  # noqa: E402
import cProfile  # noqa: E402
import json  # noqa: E402
import pstats  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402

import fp4fmt  # noqa: E402
from fp4fmt import container  # noqa: E402
from fp4fmt.converters.checkpoint import Options, convert_checkpoint, make_plan  # noqa: E402
from fp4fmt.converters.source import INDEX_NAME, SourceCheckpoint  # noqa: E402

GNU_TIME = "/usr/bin/time"
HIDDEN = 4096
WIDE_INTERMEDIATE = 65536  # layer 0's MLP width from 2 GB on: [65536, 4096] BF16 = 512 MiB per matrix
SOURCE_SHARD_BYTES = 1_000_000_000
CHUNK_BYTES = 64 << 20  # the synthetic writer's piece size
CODEC_TENSORS = 3  # largest quantized tensors timed with the codec alone
CODEC_REPEAT = 3
MB = 1e6

# Leaf calls of an in-process conversion under cProfile (substring of pstats' function name) -> stage.
STAGES = (
    ("posix.preadv", "read source tensors (os.preadv)"),
    ("_native.scan", "amax scans (native)"),
    ("_native.quantize", "quantize + error stats (native)"),
    ("openssl_sha256", "sha256 checksums of the output"),
    ("posix.pwrite", "write output (os.pwrite)"),
    ("posix.fsync", "fsync of the output"),
)

# Run by the rusage fallback: runs argv[1:], prints {"rc", "wall_s", "maxrss_kib"} of that child on stdout.
RUSAGE_WRAPPER = """
import json, resource, subprocess, sys, time
t0 = time.perf_counter()
rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE).returncode
wall = time.perf_counter() - t0
print(json.dumps({"rc": rc, "wall_s": wall, "maxrss_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
"""


# ----------------------------------------------------------------------------------------------------------
# running the command line under a peak-RSS probe


@dataclass(frozen=True)
class Run:
    """One measured run of a command: wall time and the peak resident set size of its process."""

    wall_s: float
    peak_rss_bytes: int


def gnu_time_available() -> bool:
    """True if /usr/bin/time is GNU time (it understands -v and reports the maximum resident set size)."""
    if not os.access(GNU_TIME, os.X_OK):
        return False
    p = subprocess.run([GNU_TIME, "-v", "true"], capture_output=True, text=True)
    return p.returncode == 0 and "Maximum resident set size" in p.stderr


def pick_rss_method(requested: str) -> str:
    """``time`` (GNU time -v) when available or asked for, else ``rusage``."""
    if requested == "time" and not gnu_time_available():
        raise SystemExit(f"--rss-method time: {GNU_TIME} is not GNU time; apt-get update && apt-get install -y time")
    if requested == "auto":
        return "time" if gnu_time_available() else "rusage"
    return requested


def _run_gnu_time(cmd: list[str]) -> Run:
    t0 = time.perf_counter()
    p = subprocess.run([GNU_TIME, "-v", *cmd], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t0
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr)
    if p.returncode != 0 or m is None:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {p.returncode}):\n{p.stderr[-3000:]}")
    return Run(wall, int(m.group(1)) * 1024)


def _run_rusage(cmd: list[str]) -> Run:
    p = subprocess.run([sys.executable, "-c", RUSAGE_WRAPPER, *cmd], capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"rusage wrapper failed (exit {p.returncode}):\n{p.stderr[-3000:]}")
    r = json.loads(p.stdout.strip().splitlines()[-1])
    if r["rc"] != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {r['rc']})")
    return Run(r["wall_s"], int(r["maxrss_kib"]) * 1024)  # Linux reports ru_maxrss in KiB


def fp4fmt_cli() -> str:
    """The ``fp4fmt`` console script beside this interpreter (the venv's), else the one on PATH."""
    beside = Path(sys.executable).parent / "fp4fmt"
    found = str(beside) if beside.exists() else shutil.which("fp4fmt")
    if not found:
        raise SystemExit("the fp4fmt command line is not installed beside this Python nor on PATH")
    return found


def convert_once(src: Path, dst: Path, scheme: str, method: str) -> Run:
    """Time ``fp4fmt convert src dst --scheme scheme`` in a fresh process, then delete dst."""
    shutil.rmtree(dst, ignore_errors=True)
    # Start every run from the same state: no dirty pages of an earlier write (the synthetic checkpoint,
    # a previous output) still being flushed to disk while this run reads and writes.
    os.sync()
    time.sleep(1.0)  # and let the disk go idle after the flush
    cmd = [fp4fmt_cli(), "convert", str(src), str(dst), "--scheme", scheme]
    run = _run_gnu_time(cmd) if method == "time" else _run_rusage(cmd)
    if not (dst / "fp4fmt_report.json").exists():
        raise RuntimeError(f"{' '.join(cmd)} exited 0 but wrote no report")
    shutil.rmtree(dst)
    return run


# ----------------------------------------------------------------------------------------------------------
# checkpoints


def write_safetensors(path: Path, specs: list[tuple[str, tuple[int, ...]]], seed: int) -> int:
    """Write a plain BF16 safetensors file, one CHUNK_BYTES piece of one tensor in memory at a time.

    Values: N(0, 0.02) for matrices, 1 + N(0, 0.02) for vectors (norm weights). Returns the file size.
    """
    slots = container.layout_order([container.Slot(n, "BF16", s) for n, s in specs])
    header = container.build_header(slots, {"format": "pt"})
    offsets = container.offsets(slots)
    rng = np.random.default_rng(seed)
    with open(path, "wb") as f:
        f.write(header)
        for sl in slots:
            cols = sl.shape[-1]
            rows = sl.nbytes // (2 * cols)
            step = max(1, CHUNK_BYTES // (2 * cols))
            for r in range(0, rows, step):
                n = min(step, rows - r)
                v = rng.standard_normal((n, cols), dtype=np.float32) * np.float32(0.02)
                if len(sl.shape) == 1:
                    v += np.float32(1.0)
                f.seek(len(header) + offsets[sl.name] + r * cols * 2)
                f.write(v.astype(ml_dtypes.bfloat16).tobytes())
    return path.stat().st_size


def _pow2_floor(x: float) -> int:
    return 1 << max(0, int(x).bit_length() - 1)


def synthetic_specs(target_bytes: int) -> list[tuple[str, tuple[int, ...]]]:
    """Tensor names and shapes of a Llama-like BF16 model of at least ``target_bytes`` (see the docstring)."""
    wide = min(WIDE_INTERMEDIATE, max(256, _pow2_floor(0.8 * target_bytes / (3 * 2 * HIDDEN))))
    vocab = min(32768, max(256, _pow2_floor(0.15 * target_bytes / (2 * HIDDEN))))
    specs: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, HIDDEN)), ("model.norm.weight", (HIDDEN,))]

    def attention(i: int) -> list:
        return [(f"model.layers.{i}.self_attn.{p}.weight", (HIDDEN, HIDDEN)) for p in ("q_proj", "k_proj", "v_proj", "o_proj")] + [
            (f"model.layers.{i}.input_layernorm.weight", (HIDDEN,))]

    def mlp(i: int, inter: int) -> list:
        return [(f"model.layers.{i}.mlp.gate_proj.weight", (inter, HIDDEN)), (f"model.layers.{i}.mlp.up_proj.weight", (inter, HIDDEN)),
                (f"model.layers.{i}.mlp.down_proj.weight", (HIDDEN, inter)), (f"model.layers.{i}.post_attention_layernorm.weight", (HIDDEN,))]

    specs += attention(0) + mlp(0, wide)
    layer = 1
    while _spec_bytes(specs) < target_bytes:  # filler layers, one attention or MLP block at a time
        specs += attention(layer)
        if _spec_bytes(specs) < target_bytes:
            specs += mlp(layer, HIDDEN)
        layer += 1
    return specs


def _spec_bytes(specs: list[tuple[str, tuple[int, ...]]]) -> int:
    return sum(2 * int(np.prod(s)) for _, s in specs)


def write_checkpoint(folder: Path, specs: list[tuple[str, tuple[int, ...]]], *, shard_bytes: int, seed: int = 0) -> Path:
    """A Hugging Face style BF16 checkpoint folder (config.json, shards of <= shard_bytes and their index)."""
    folder.mkdir(parents=True, exist_ok=True)
    shards: list[list] = [[]]
    size = 0
    for spec in specs:
        b = 2 * int(np.prod(spec[1]))
        if shards[-1] and size + b > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += b
    weight_map: dict[str, str] = {}
    total = 0
    for i, shard in enumerate(shards):
        name = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        total += write_safetensors(folder / name, shard, seed + i)
        weight_map.update({n: name for n, _ in shard})
    if len(shards) > 1:
        (folder / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    layers = 1 + max(int(n.split(".")[2]) for n, _ in specs if n.startswith("model.layers."))
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
              "intermediate_size": HIDDEN, "num_hidden_layers": layers, "num_attention_heads": 32,
              "num_key_value_heads": 32, "vocab_size": specs[0][1][0], "torch_dtype": "bfloat16",
              "tie_word_embeddings": True}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def tiny_specs() -> list[tuple[str, tuple[int, ...]]]:
    """A two-layer model of 64-wide tensors: every code path of the converter, next to no data."""
    h, inter, vocab = 64, 128, 256
    specs: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, h)), ("model.norm.weight", (h,))]
    for i in range(2):
        specs += [(f"model.layers.{i}.self_attn.{p}.weight", (h, h)) for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
        specs += [(f"model.layers.{i}.mlp.gate_proj.weight", (inter, h)), (f"model.layers.{i}.mlp.up_proj.weight", (inter, h)),
                  (f"model.layers.{i}.mlp.down_proj.weight", (h, inter)), (f"model.layers.{i}.input_layernorm.weight", (h,))]
    return specs


def checkpoint_bytes(src: SourceCheckpoint) -> int:
    """Bytes of the checkpoint's safetensors files (headers included)."""
    return sum(f.stat().st_size for f in src.files)


# ----------------------------------------------------------------------------------------------------------
# the codec alone, on the checkpoint's largest quantized tensors


def codec_throughput(src: SourceCheckpoint, scheme: str) -> dict:
    """MB/s of fp4fmt.quantize and quantize_with_error over the CODEC_TENSORS largest quantized tensors."""
    quantized = [a for a in make_plan(src, Options(scheme=scheme)) if a.kind == "quantize"]
    largest = sorted(quantized, key=lambda a: (-src.tensors[a.name].nbytes, a.name))[:CODEC_TENSORS]
    nbytes, t_q, t_qe = 0, 0.0, 0.0
    for a in largest:
        x = src.read(a.name)
        nbytes += x.nbytes
        t_q += bench_codec.time_median(lambda: fp4fmt.quantize(x, scheme, axis=a.axis), CODEC_REPEAT)[0]
        t_qe += bench_codec.time_median(lambda: fp4fmt.quantize_with_error(x, scheme, axis=a.axis), CODEC_REPEAT)[0]
    return {
        "tensors": [[a.name, list(a.shape)] for a in largest],
        "bytes": nbytes,
        "quantize_mb_per_s": nbytes / t_q / MB,
        "quantize_with_error_mb_per_s": nbytes / t_qe / MB,
    }


# ----------------------------------------------------------------------------------------------------------
# where the time goes: one in-process conversion under cProfile


def profile_stages(folder: Path, dst: Path, scheme: str, row: dict) -> dict:
    """Seconds per stage (STAGES, exclusive time of those calls) of one in-process conversion, the rest as
    "other"; the bytes the converter reads (fused-group members are read twice: amax scan, then quantize);
    the in-process MB/s over the codec MB/s of ``row`` (the measured row of this checkpoint and scheme)."""
    src = SourceCheckpoint(folder)
    actions = make_plan(src, Options(scheme=scheme))
    reread = sum(src.tensors[a.name].nbytes for a in actions if a.kind == "quantize" and a.group)
    shutil.rmtree(dst, ignore_errors=True)
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.runcall(convert_checkpoint, folder, dst, Options(scheme=scheme))
    total = time.perf_counter() - t0
    shutil.rmtree(dst)
    stats = pstats.Stats(prof).stats  # {(file, line, name): (cc, nc, tottime, cumtime, callers)}
    stages = {label: 0.0 for _, label in STAGES}
    for (_, _, name), (_, _, tottime, _, _) in stats.items():
        for key, label in STAGES:
            if key in name:
                stages[label] += tottime
    stages["other (Python, numpy, planning, JSON, side files)"] = total - sum(stages.values())
    tensor_bytes = sum(t.nbytes for t in src.tensors.values())
    mbps = checkpoint_bytes(src) / total / MB
    return {"scheme": scheme, "total_s": total, "mb_per_s": mbps, "stages_s": stages,
            "in_process_over_codec": mbps / row["codec"]["quantize_mb_per_s"],
            "tensor_bytes": tensor_bytes, "bytes_read": tensor_bytes + reread, "group_reread_bytes": reread}


# ----------------------------------------------------------------------------------------------------------
# the benchmark


def measure(label: str, folder: Path, work: Path, scheme: str, repeat: int, method: str, overhead: int) -> dict:
    """Convert ``folder`` ``repeat`` times with ``scheme``; one result row."""
    src = SourceCheckpoint(folder)
    label = f"{label}, {len(src.files)} file(s)"
    size = checkpoint_bytes(src)
    largest = max(src.tensors.values(), key=lambda t: t.nbytes)
    runs = [convert_once(folder, work / f"out-{scheme}", scheme, method) for _ in range(repeat)]
    wall = statistics.median(r.wall_s for r in runs)
    peak = max(r.peak_rss_bytes for r in runs)
    codec = codec_throughput(src, scheme)
    mbps = size / wall / MB
    return {
        "checkpoint": label,
        "scheme": scheme,
        "source_bytes": size,
        "tensors": len(src.tensors),
        "largest_tensor": largest.name,
        "largest_tensor_bytes": largest.nbytes,
        "runs": [asdict(r) for r in runs],
        "wall_s_median": wall,
        "mb_per_s": mbps,
        "peak_rss_bytes": peak,
        "peak_rss_over_source": peak / size,
        "fixed_overhead_bytes": overhead,
        "excess_over_largest_tensor": (peak - overhead) / largest.nbytes,
        "codec": codec,
        "conversion_over_codec": mbps / codec["quantize_mb_per_s"],
    }


def run(work: Path, synthetic_gb: float, repeat: int, schemes: list[str], method: str) -> dict:
    """Every measurement of the module docstring; the report as a dict."""
    import smollm2_checkpoint  # tools/ is on sys.path (top of this file)

    tiny = write_checkpoint(work / "tiny", tiny_specs(), shard_bytes=SOURCE_SHARD_BYTES)
    overhead = {s: [convert_once(tiny, work / f"out-{s}", s, method) for _ in range(repeat)] for s in schemes}
    fixed = {s: min(r.peak_rss_bytes for r in runs) for s, runs in overhead.items()}
    smol = smollm2_checkpoint.build()
    rows = [measure("SmolLM2-135M (HF BF16)", smol, work, s, repeat, method, fixed[s]) for s in schemes]
    profiles = {"SmolLM2-135M": profile_stages(smol, work / "out-profile", schemes[0], rows[0])}
    synthetic = None
    if synthetic_gb > 0:
        target = int(synthetic_gb * 1e9)
        free = shutil.disk_usage(work).free
        if free < 1.6 * target + (1 << 30):  # the source, one converted copy (~0.3x for FP4) and a margin
            raise SystemExit(f"{work}: {free / 1e9:.1f} GB free, not enough for a {synthetic_gb} GB synthetic checkpoint")
        t0 = time.perf_counter()
        folder = write_checkpoint(work / "synthetic", synthetic_specs(target), shard_bytes=SOURCE_SHARD_BYTES)
        synthetic = {"path": str(folder), "write_s": time.perf_counter() - t0,
                     "files": sorted(p.name for p in folder.glob("*.safetensors"))}
        # the median of `repeat` runs here too: the first run after writing 2 GB pays for the page cache
        # settling, and one run alone would report that rather than the converter
        rows += [measure(f"synthetic {synthetic_gb:g} GB (BF16)", folder, work, s, repeat, method, fixed[s])
                 for s in schemes]
        profiles[f"synthetic {synthetic_gb:g} GB"] = profile_stages(folder, work / "out-profile", schemes[0], rows[-len(schemes)])
        shutil.rmtree(folder)
    return {
        "rss_method": "GNU time -v (Maximum resident set size)" if method == "time" else
                      "resource.getrusage(RUSAGE_CHILDREN).ru_maxrss in a per-run wrapper process",
        "cli": fp4fmt_cli(),
        "repeat": repeat,
        "fixed_overhead": {s: {"runs": [asdict(r) for r in runs], "peak_rss_bytes_min": fixed[s],
                               "wall_s_median": statistics.median(r.wall_s for r in runs)} for s, runs in overhead.items()},
        "profiles": profiles,
        "smollm2": str(smol),
        "synthetic": synthetic,
        "machine": bench_codec.machine_info(),
        "rows": rows,
    }


def markdown(report: dict) -> str:
    """The report as a Markdown table plus notes."""
    lines = [
        "| checkpoint | scheme | source MB | largest tensor MB | runs | wall s (median) | MB/s | peak RSS MB "
        "| peak RSS / source | (peak - overhead) / largest | codec quantize MB/s | conversion / codec |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['checkpoint']} | {r['scheme']} | {r['source_bytes'] / MB:.1f} | {r['largest_tensor_bytes'] / MB:.1f} "
            f"| {len(r['runs'])} | {r['wall_s_median']:.2f} | {r['mb_per_s']:.0f} | {r['peak_rss_bytes'] / MB:.1f} "
            f"| {r['peak_rss_over_source']:.2f} | {r['excess_over_largest_tensor']:.2f} "
            f"| {r['codec']['quantize_mb_per_s']:.0f} | {r['conversion_over_codec']:.2f} |"
        )
    lines.append("")
    fixed = ", ".join(f"{s} {v['peak_rss_bytes_min'] / MB:.1f} MB (median wall {v['wall_s_median']:.2f} s)"
                      for s, v in report["fixed_overhead"].items())
    lines.append(f"- fixed overhead (peak RSS converting a tiny checkpoint, min of {report['repeat']} runs): {fixed}")
    for r in report["rows"]:
        c = r["codec"]
        walls = ", ".join(f"{x['wall_s']:.2f}" for x in r["runs"])
        lines.append(
            f"- {r['checkpoint']} {r['scheme']}: walls {walls} s; largest tensor {r['largest_tensor']}; codec on "
            f"{len(c['tensors'])} largest quantized tensors ({c['bytes'] / MB:.0f} MB): quantize {c['quantize_mb_per_s']:.0f} "
            f"MB/s, quantize_with_error {c['quantize_with_error_mb_per_s']:.0f} MB/s"
        )
    m = report["machine"]
    lines.append(f"- peak RSS from {report['rss_method']}; CLI {report['cli']}, default options (1 worker)")
    lines.append(
        f"- machine: {m['cpu']} ({m['logical_cpus']} logical CPUs); python {m['python']}, numpy {m['numpy']}, "
        f"fp4fmt {m['fp4fmt']} (native accelerator: {'yes' if m['fp4fmt_native'] else 'no'})"
    )
    if report["synthetic"]:
        lines.append(f"- synthetic checkpoint written in {report['synthetic']['write_s']:.1f} s as "
                     f"{len(report['synthetic']['files'])} shard(s), deleted afterwards")
    lines += ["", stage_table(report["profiles"])]
    return "\n".join(lines)


def stage_table(profiles: dict) -> str:
    """Where the time of one in-process conversion goes (no interpreter start-up), as a Markdown table."""
    names = list(profiles)
    first = profiles[names[0]]
    lines = [
        f"Where the time goes: one in-process `convert_checkpoint` per checkpoint under cProfile ({first['scheme']}; "
        "seconds and share of the total; no interpreter start-up)",
        "",
        "| stage | " + " | ".join(names) + " |",
        "|---|" + "---:|" * len(names),
    ]
    for stage in first["stages_s"]:
        cells = [f"{p['stages_s'][stage]:.2f} ({100 * p['stages_s'][stage] / p['total_s']:.0f}%)" for p in profiles.values()]
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    lines.append("| **total** | " + " | ".join(f"{p['total_s']:.2f} ({p['mb_per_s']:.0f} MB/s)" for p in profiles.values()) + " |")
    lines.append("| in-process conversion MB/s / codec quantize MB/s | "
                 + " | ".join(f"{p['in_process_over_codec']:.2f}" for p in profiles.values()) + " |")
    lines.append("| bytes read / tensor bytes (fused groups read twice) | "
                 + " | ".join(f"{p['bytes_read'] / p['tensor_bytes']:.2f}" for p in profiles.values()) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, help="folder for the generated checkpoints and outputs (default: a temp dir)")
    ap.add_argument("--synthetic-gb", type=float, default=2.2, help="size of the synthetic checkpoint in GB (0: skip)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per scheme on SmolLM2 and the tiny checkpoint")
    ap.add_argument("--schemes", default="nvfp4,mxfp4", help="comma-separated: nvfp4, mxfp4")
    ap.add_argument("--rss-method", choices=("auto", "time", "rusage"), default="auto")
    ap.add_argument("--json", metavar="OUT", help="also write the report as JSON to OUT")
    args = ap.parse_args(argv)
    schemes = [s.strip() for s in args.schemes.split(",") if s.strip()]
    if args.repeat < 1 or args.synthetic_gb < 0 or not schemes or any(s not in fp4fmt.SCHEMES for s in schemes):
        ap.error("--repeat must be positive, --synthetic-gb not negative, --schemes a list of nvfp4/mxfp4")
    method = pick_rss_method(args.rss_method)
    if args.work:
        args.work.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-convert-", dir=args.work))
    try:
        report = run(work, args.synthetic_gb, args.repeat, schemes, method)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(markdown(report))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
