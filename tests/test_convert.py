"""End to end tests of the checkpoint converter (``fp4fmt convert`` / ``fp4fmt.converters.convert_checkpoint``).

What these tests establish:

1. On the real SmolLM2-135M-Instruct BF16 checkpoint, for NVFP4 and MXFP4, through the library and (NVFP4)
   through the command line: every quantized tensor decodes to within the scheme's rounding bound of its
   source and onto the FP4 grid; every kept tensor is bit-identical to its source; ``fp4fmt verify`` passes;
   config.json carries the quantization_config; tokenizer and generation files are copied; the report's
   errors match an independent recomputation and every kept tensor has its reason.
2. Determinism and resume: two runs (library and CLI, workers 1 and 2) give byte-identical folders; a run
   stopped after its first shard (an exception inside the shard writer, SIGKILL, a full disk, a crash
   while the final files are written) never looks complete, and running again reuses the finished shards
   and gives the same bytes as an uninterrupted run, with no temporary file left.
3. The converted SmolLM2 still answers "What is the capital of France?" with Paris (weights replaced by
   the decoded FP4 values, greedy generation with transformers on CPU).
4. NVFP4 fused projections (q/k/v, gate/up) share one tensor scale, max amax of the group / 2688.
5. all-MiniLM-L6-v2 (FP32 BERT) converts as it is.
6. MoE experts (per-expert and fused 3-D tensors) are blocked along their input-feature axis; a fused
   layout that cannot be recognised is kept and warned about loudly.
7. --ignore and --overrides do what they say; bad override files are refused clearly.
8. Bad input is refused with an fp4fmt error naming the file (and tensor), the source is never touched and
   the destination never looks complete.

Small synthetic checkpoints are written here with a few lines of ``struct``/``json`` (independent of
fp4fmt's own writer), and the outputs are read back raw where bit-identity is checked.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import pickle
import re
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
from click.testing import CliRunner

import fp4fmt
from fp4fmt.cli import main
from fp4fmt.converters import Options, convert_checkpoint, load_overrides
from fp4fmt.converters import checkpoint as checkpoint_mod
from fp4fmt.errors import FormatError, FP4FmtError, QuantizationError, WriteError

REPO = Path(__file__).resolve().parents[1]
SCHEMES = ("nvfp4", "mxfp4")
BLOCK_SIZE = {"nvfp4": 16, "mxfp4": 32}  # spec §3: elements per block scale
NVFP4_TS_DIVISOR = np.float32(6.0 * 448.0)  # E2M1 max times E4M3 max: the default tensor scale is amax / 2688
DOUBLED_E2M1 = np.array([0, 1, 2, 3, 4, 6, 8, 12], dtype=np.float64)  # 2 * the non-negative E2M1 values
INDEX = "model.safetensors.index.json"
REPORT = "fp4fmt_report.json"
WORK = ".fp4fmt-convert"
TMP_SUFFIX = ".fp4fmt-tmp"
NP_DTYPES: dict[str, Any] = {
    "BF16": ml_dtypes.bfloat16,
    "F16": np.float16,
    "F32": np.float32,
    "F64": np.float64,
    "I64": np.int64,
    "U8": np.uint8,
}
CHAT_PROMPT = "What is the capital of France?"
SHARD_RE = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")


# ============================================================================================ raw safetensors


@dataclass(frozen=True)
class RawTensor:
    """One stored tensor as the file holds it."""

    dtype: str
    shape: tuple[int, ...]
    data: bytes

    def values(self) -> np.ndarray:
        """The tensor as a numpy array of its own dtype."""
        return np.frombuffer(self.data, dtype=NP_DTYPES[self.dtype]).reshape(self.shape)


def raw_header(path: Path) -> tuple[dict, int]:
    """(header JSON object, offset of the data buffer) of a safetensors file."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n)), 8 + n


def read_raw(path: Path) -> dict[str, RawTensor]:
    """Every stored tensor of one safetensors file, read with json/struct only."""
    header, start = raw_header(path)
    header.pop("__metadata__", None)
    blob = path.read_bytes()
    out = {}
    for name, e in header.items():
        begin, end = e["data_offsets"]
        out[name] = RawTensor(e["dtype"], tuple(e["shape"]), blob[start + begin : start + end])
    return out


def read_raw_dir(folder: Path) -> dict[str, RawTensor]:
    """Every stored tensor of every visible ``*.safetensors`` file of a folder."""
    out: dict[str, RawTensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        if not f.name.startswith("."):
            out.update(read_raw(f))
    return out


def write_raw(path: Path, tensors: dict[str, np.ndarray], *, dtype_names: dict[str, str] | None = None) -> None:
    """A plain safetensors file (names sorted, data in that order); ``dtype_names`` overrides header dtypes."""
    reverse = {np.dtype(v): k for k, v in NP_DTYPES.items()}
    header: dict[str, Any] = {}
    chunks, pos = [], 0
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name])
        raw = arr.tobytes()
        dtype = (dtype_names or {}).get(name, reverse[arr.dtype])
        header[name] = {"dtype": dtype, "shape": list(arr.shape), "data_offsets": [pos, pos + len(raw)]}
        chunks.append(raw)
        pos += len(raw)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(chunks))


# ================================================================================= synthetic checkpoints


def llama_tensors(*, layers: int = 4, hidden: int = 64, kv: int = 32, inter: int = 80, vocab: int = 96,
                  seed: int = 0) -> dict[str, np.ndarray]:
    """A small Llama-shaped BF16 state dict; fused partners get different spreads (different amax)."""
    rng = np.random.default_rng(seed)

    def w(*shape: int, std: float = 0.05) -> np.ndarray:
        return (rng.standard_normal(shape) * std).astype(ml_dtypes.bfloat16)

    def norm() -> np.ndarray:
        return (1 + 0.1 * rng.standard_normal(hidden)).astype(ml_dtypes.bfloat16)

    t = {"model.embed_tokens.weight": w(vocab, hidden, std=1.0), "model.norm.weight": norm(),
         "lm_head.weight": w(vocab, hidden, std=0.03)}
    for i in range(layers):
        p = f"model.layers.{i}."
        t[p + "self_attn.q_proj.weight"] = w(hidden, hidden, std=0.02 * (i + 1))
        t[p + "self_attn.k_proj.weight"] = w(kv, hidden, std=0.05 * (i + 1))
        t[p + "self_attn.v_proj.weight"] = w(kv, hidden, std=0.01 * (i + 1))
        t[p + "self_attn.o_proj.weight"] = w(hidden, hidden, std=0.03)
        t[p + "mlp.gate_proj.weight"] = w(inter, hidden, std=0.04)
        t[p + "mlp.up_proj.weight"] = w(inter, hidden, std=0.02)
        t[p + "mlp.down_proj.weight"] = w(hidden, inter, std=0.03)
        t[p + "input_layernorm.weight"] = norm()
        t[p + "post_attention_layernorm.weight"] = norm()
    return t


def llama_config(*, layers: int = 4, hidden: int = 64, kv: int = 32, inter: int = 80, vocab: int = 96) -> dict:
    """config.json of :func:`llama_tensors`."""
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
            "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": 4,
            "num_key_value_heads": 4 * kv // hidden, "vocab_size": vocab, "torch_dtype": "bfloat16"}


def write_checkpoint(folder: Path, tensors: dict[str, np.ndarray], config: dict | None, *, shards: int = 1) -> Path:
    """A Hugging Face folder: weights (one file, or ``shards`` files with an index), config, tokenizer files."""
    folder.mkdir(parents=True, exist_ok=True)
    names = sorted(tensors)
    if shards == 1:
        write_raw(folder / "model.safetensors", tensors)
    else:
        weight_map = {}
        for i, part in enumerate(np.array_split(np.array(names, dtype=object), shards)):
            fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            write_raw(folder / fname, {n: tensors[n] for n in part})
            weight_map.update({n: fname for n in part})
        total = sum(a.nbytes for a in tensors.values())
        (folder / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "BPE", "vocab": {"a": 0}}}))
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 128}))
    (folder / "generation_config.json").write_text(json.dumps({"do_sample": False, "eos_token_id": 2}))
    return folder


@pytest.fixture()
def llama_src(tmp_path: Path) -> Path:
    """A 4-layer Llama-shaped BF16 checkpoint in two input shards with an index."""
    return write_checkpoint(tmp_path / "src", llama_tensors(), llama_config(), shards=2)


# =================================================================================================== helpers


def tree_digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (hidden ones included), by relative path."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h = hashlib.sha256()
            with open(p, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 22), b""):
                    h.update(chunk)
            out[str(p.relative_to(folder))] = h.hexdigest()
    return out


def assert_same_tree(a: Path, b: Path) -> None:
    """The two folders hold the same file names with the same bytes."""
    da, db = tree_digest(a), tree_digest(b)
    assert sorted(da) == sorted(db)
    differ = [name for name in da if da[name] != db[name]]
    assert not differ, f"files differ between {a} and {b}: {differ}"


def assert_incomplete(dst: Path) -> None:
    """A folder left by a failed or interrupted conversion must not look like a finished checkpoint."""
    for name in ("config.json", INDEX, REPORT):
        assert not (dst / name).exists(), f"{name} exists in an unfinished conversion"


def assert_no_temporaries(folder: Path) -> None:
    """No temporary file and no work folder left anywhere under ``folder``."""
    left = [str(p) for p in folder.rglob("*") if p.name.endswith(TMP_SUFFIX) or p.name == WORK]
    assert not left, left


def shard_files(folder: Path) -> list[str]:
    """Names of the finished (visible) shards of a folder."""
    return sorted(p.name for p in folder.glob("*.safetensors") if not p.name.startswith("."))


def run_cli(*args: str) -> Any:
    """``fp4fmt ARGS`` in-process; returns click's Result (``exit_code``, ``stdout``, ``stderr``)."""
    return CliRunner().invoke(main, [str(a) for a in args])


def block_factors(qt: fp4fmt.QTensor) -> np.ndarray:
    """Each block's float32 multiplier, ``[rows, n_blocks]`` in storage order, decoded with ml_dtypes."""
    assert qt.scale_layout == "linear"
    scales = np.asarray(qt.scales)
    if qt.scheme == "nvfp4":
        f = scales.astype(np.float32) * np.float32(qt.tensor_scale)  # E4M3 value times the tensor scale, in fp32
    else:
        f = np.ldexp(np.float32(1.0), scales.view(np.uint8).astype(np.int32) - 127).astype(np.float32)
    return f.reshape(-1, f.shape[-1])


def assert_within_rounding_bound(x: np.ndarray, y: np.ndarray, qt: fp4fmt.QTensor, name: str) -> None:
    """Every decoded element is on the FP4 grid of its block and within the RTN bound of its source value.

    With f the block factor and r = |x| / f: |x - y| <= half the E2M1 step at r (0.25, 0.5 or 1, times f), or
    |x| - 6 f when r > 6 (saturated); plus float32 slack (the division and the product each round once).
    """
    b = BLOCK_SIZE[qt.scheme]
    xs = np.moveaxis(np.asarray(x, dtype=np.float64), qt.axis, -1)
    ys = np.moveaxis(np.asarray(y, dtype=np.float64), qt.axis, -1)
    k = xs.shape[-1]
    f = block_factors(qt).astype(np.float64)
    rows, nb = f.shape
    assert nb == -(-k // b) and rows * k == xs.size, (name, f.shape, xs.shape)
    pad = ((0, 0), (0, nb * b - k))
    xb = np.pad(xs.reshape(rows, k), pad).reshape(rows, nb, b)
    yb = np.pad(ys.reshape(rows, k), pad).reshape(rows, nb, b)
    fb = np.broadcast_to(f[..., None], xb.shape)
    ax = np.abs(xb)
    positive = fb > 0
    r = np.divide(ax, fb, out=np.zeros_like(ax), where=positive)
    half_step = np.where(r < 2, 0.25, np.where(r < 4, 0.5, 1.0))
    bound = np.where(r > 6, ax - 6 * fb, half_step * fb) + 2.0**-22 * (ax + 6 * fb)
    err = np.abs(xb - yb)
    bad = np.argwhere(err > bound)
    if bad.size:
        i = tuple(bad[0])
        pytest.fail(f"{name}: {len(bad)} elements outside the rounding bound, e.g. block {i[:2]}: x={xb[i]!r} "
                    f"y={yb[i]!r} factor={fb[i]!r} bound={bound[i]!r}")
    doubled = np.divide(2 * np.abs(yb), fb, out=np.zeros_like(ax), where=positive)
    nearest = np.rint(doubled)
    on_grid = (np.abs(doubled - nearest) <= 2.0**-20 * np.maximum(nearest, 1)) & np.isin(nearest, DOUBLED_E2M1)
    assert on_grid.all(), f"{name}: {int((~on_grid).sum())} decoded values are not E2M1 values times their factor"
    assert not np.any(yb[~positive]), f"{name}: a block with factor 0 decodes to non-zero values"


def assert_report_matches(entry: dict, x: np.ndarray, y: np.ndarray, name: str) -> None:
    """The report's sqnr_db / rel_rmse / max_abs_error equal a float64 recomputation from source and output."""
    xd = np.asarray(x, dtype=np.float64).reshape(-1)
    e = xd - np.asarray(y, dtype=np.float64).reshape(-1)
    signal, noise = float(xd @ xd), float(e @ e)
    assert entry["max_abs_error"] == pytest.approx(float(np.abs(e).max(initial=0.0)), rel=1e-6, abs=1e-30), name
    assert entry["rel_rmse"] == pytest.approx(math.sqrt(noise / signal) if signal else 0.0, rel=1e-6, abs=1e-30), name
    if noise == 0:
        assert entry["sqnr_db"] is None, name
    else:
        assert entry["sqnr_db"] == pytest.approx(10 * math.log10(signal / noise), rel=1e-6, abs=1e-9), name


@dataclass
class Output:
    """A converted folder read back: quantized tensors (QTensor views) and kept tensors (raw bytes)."""

    quantized: dict[str, fp4fmt.QTensor]
    kept: dict[str, RawTensor]
    report: dict


def read_output(dst: Path) -> Output:
    """The converted tensors of ``dst`` (every shard) and its report."""
    quantized: dict[str, fp4fmt.QTensor] = {}
    kept: dict[str, RawTensor] = {}
    for shard in shard_files(dst):
        raw = read_raw(dst / shard)
        with fp4fmt.safe_open(dst / shard) as f:
            for name in f.keys():
                if f.tensor_descriptor(name) is None:
                    kept[name] = raw[name]
                else:
                    quantized[name] = f.get_tensor(name)
    return Output(quantized, kept, json.loads((dst / REPORT).read_text()))


def check_output(src: Path, dst: Path, *, axes: dict[str, int] | None = None) -> Output:
    """Check a finished conversion of ``src`` into ``dst`` against the source, tensor by tensor.

    Quantized: descriptor dtype is the source dtype, decoded values within the rounding bound, report errors
    recomputed (``axes`` pins the expected blocked axis of some tensors). Kept: bit-identical, reason given.
    The folder also passes ``fp4fmt verify`` (every shard, and the folder as a checkpoint).
    """
    source = read_raw_dir(src)
    out = read_output(dst)
    assert out.quantized and set(out.quantized) | set(out.kept) == set(source)
    assert not set(out.quantized) & set(out.kept)
    entries = out.report["tensors"]
    assert set(entries) == set(source) and out.report["dropped"] == {}  # one entry per source tensor
    for name, qt in out.quantized.items():
        entry = entries[name]
        assert entry["action"] == "quantized" and entry["scheme"] == qt.scheme and entry["axis"] == qt.axis
        assert qt.dtype == source[name].dtype and qt.shape == source[name].shape
        if axes and name in axes:
            assert qt.axis == axes[name], (name, qt.axis)
        x = source[name].values().astype(np.float32)
        y = fp4fmt.dequantize(qt)
        assert_within_rounding_bound(x, y, qt, name)
        assert_report_matches(entry, x, y, name)
    for name, raw in out.kept.items():
        src_raw = source[name]
        assert (raw.dtype, raw.shape) == (src_raw.dtype, src_raw.shape), name
        assert raw.data == src_raw.data, f"kept tensor {name} is not bit-identical to the source"
        assert entries[name]["action"] == "kept" and entries[name]["reason"], name
    r = run_cli("verify", dst)
    assert r.exit_code == 0, r.output
    passed = set(re.findall(r"^PASS  (\S+)$", r.stdout, re.M))
    assert passed == {str(dst / s) for s in shard_files(dst)} | {str(dst / INDEX if (dst / INDEX).exists() else dst)}
    assert "FAIL" not in r.stdout
    return out


def linear_weight_names(tensors: dict[str, RawTensor] | dict[str, np.ndarray]) -> set[str]:
    """The tensors a weight-only FP4 conversion quantizes by default: 2-D float ``.weight`` matrices that are
    not embeddings, norms, the LM head or a router (stated here independently of the converter's patterns)."""
    out = set()
    for name, t in tensors.items():
        dtype = t.dtype if isinstance(t, RawTensor) else str(t.dtype)
        if len(t.shape) != 2 or not name.endswith(".weight") or dtype in ("I64", "int64"):
            continue
        if any(s in name for s in ("embed", "norm", "lm_head", "mlp.gate.weight", "router")):
            continue
        out.add(name)
    return out


# ================================================================================ 1. SmolLM2, both schemes


@dataclass
class SmolRuns:
    """The SmolLM2 conversions shared by the tests of this module."""

    src: Path
    lib: dict[str, Path]  # scheme -> folder written by convert_checkpoint
    results: dict[str, Any]  # scheme -> Result
    cli: Path  # NVFP4 folder written by the fp4fmt command
    cli_proc: subprocess.CompletedProcess
    digest_before: dict[str, str]
    digest_after: dict[str, str]


@pytest.fixture(scope="module")
def smol(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> SmolRuns:
    """SmolLM2 converted once per scheme with the library, and once (NVFP4) with the fp4fmt command."""
    base = tmp_path_factory.mktemp("smollm2")
    before = tree_digest(smollm2_dir)
    lib, results = {}, {}
    for scheme in SCHEMES:
        lib[scheme] = base / scheme
        results[scheme] = convert_checkpoint(smollm2_dir, lib[scheme], Options(scheme=scheme))
    cli = base / "nvfp4-cli"
    command = [sys.executable, "-m", "fp4fmt.cli", "convert", str(smollm2_dir), str(cli), "--scheme", "nvfp4"]
    proc = subprocess.run(command, capture_output=True, text=True, cwd=base, timeout=300)
    return SmolRuns(smollm2_dir, lib, results, cli, proc, before, tree_digest(smollm2_dir))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_smollm2_tensors_bound_identity_report_and_verify(smol: SmolRuns, scheme: str) -> None:
    """Every projection quantized within the rounding bound, everything else bit-identical, report exact."""
    dst = smol.lib[scheme]
    out = check_output(smol.src, dst)
    source = read_raw_dir(smol.src)
    # what is quantized follows the default rules: every projection of every layer, nothing else
    assert set(out.quantized) == linear_weight_names(source) and len(out.quantized) == 30 * 7
    assert all(qt.scheme == scheme and qt.axis == 1 for qt in out.quantized.values())
    reasons = {n: e["reason"] for n, e in out.report["tensors"].items() if e["action"] == "kept"}
    assert "embed_tokens" in reasons["model.embed_tokens.weight"]
    assert all("norm" in why for n, why in reasons.items() if "norm" in n)
    assert set(reasons) == {"model.embed_tokens.weight"} | {n for n in source if "norm" in n}
    assert smol.results[scheme].warnings == [] and out.report["warnings"] == []
    # a single output file (default 5 GB shards), no index, nothing temporary left
    assert shard_files(dst) == ["model.safetensors"] and not (dst / INDEX).exists()
    assert_no_temporaries(dst)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_smollm2_config_and_side_files(smol: SmolRuns, scheme: str) -> None:
    """config.json gains only quantization_config; tokenizer and generation files are copied as they are."""
    dst = smol.lib[scheme]
    src_config = json.loads((smol.src / "config.json").read_text())
    config = json.loads((dst / "config.json").read_text())
    qc = config.pop("quantization_config")
    assert config == src_config  # everything else unchanged
    assert qc["quant_method"] == "fp4fmt" and qc["scheme"] == scheme
    assert qc["format_version"] == fp4fmt.FORMAT_VERSION
    assert qc["block_size"] == BLOCK_SIZE[scheme]
    assert qc["ignore"] == ["model.embed_tokens"]  # the one matrix kept (lm_head is tied to it)
    assert qc["fused_tensor_scales"] is (scheme == "nvfp4")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        assert (dst / name).read_bytes() == (smol.src / name).read_bytes(), name


def test_smollm2_cli_matches_library_and_source_untouched(smol: SmolRuns) -> None:
    """``fp4fmt convert`` writes the library's bytes (so every check above holds for it); the source is only
    read."""
    assert smol.cli_proc.returncode == 0, smol.cli_proc.stderr
    assert f"wrote {smol.cli}" in smol.cli_proc.stdout and "210 tensors" in smol.cli_proc.stdout
    assert "WARNING" not in smol.cli_proc.stderr
    assert_same_tree(smol.cli, smol.lib["nvfp4"])  # two runs (library, command line): the same bytes
    assert smol.digest_after == smol.digest_before  # the source folder was only read


# ============================================================================== 3. the model still answers


@pytest.fixture(scope="module")
def smol_model(smollm2_dir: Path) -> tuple[Any, Any]:
    """(model, tokenizer) of the BF16 SmolLM2 checkpoint, float32 on CPU."""
    import torch
    import transformers

    torch.set_num_threads(2)
    tok = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    return model, tok


@pytest.mark.parametrize("scheme", SCHEMES)
def test_converted_smollm2_answers_paris(smol: SmolRuns, smol_model: tuple[Any, Any], scheme: str) -> None:
    """SmolLM2 with every quantized weight replaced by its decoded FP4 values still knows the capital of France."""
    import torch

    model, tok = smol_model
    params = dict(model.named_parameters())
    out = read_output(smol.lib[scheme])
    changed = 0
    with torch.no_grad():
        for name, qt in out.quantized.items():  # every quantized weight replaced by its decoded FP4 values
            w = torch.from_numpy(fp4fmt.dequantize(qt))
            changed += int(not torch.equal(params[name], w))
            params[name].copy_(w)
    assert len(out.quantized) == 210 and changed == 210
    messages = [{"role": "user", "content": CHAT_PROMPT}]
    inputs = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        ids = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = tok.decode(ids[0, inputs["input_ids"].shape[1]:])
    print(f"{scheme} greedy answer: {answer!r}")
    assert "Paris" in answer


# ============================================================================ 4. fused NVFP4 tensor scales


def source_amax(source: dict[str, RawTensor], name: str) -> np.float32:
    """max |x| of a source tensor, in float32 (what the tensor scale is computed from)."""
    return np.float32(np.abs(source[name].values().astype(np.float32)).max())


def test_smollm2_fused_projections_share_tensor_scale(smol: SmolRuns) -> None:
    """NVFP4: q/k/v and gate/up of each layer share fl32(max amax of the group / 2688); o/down keep their own."""
    source = read_raw_dir(smol.src)
    q = read_output(smol.lib["nvfp4"]).quantized
    groups = {"self_attn": ("q_proj", "k_proj", "v_proj"), "mlp": ("gate_proj", "up_proj")}
    for i in range(30):
        for module, members in groups.items():
            names = [f"model.layers.{i}.{module}.{m}.weight" for m in members]
            want = max(source_amax(source, n) for n in names) / NVFP4_TS_DIVISOR
            got = {q[n].tensor_scale.tobytes() for n in names}
            assert got == {np.float32(want).tobytes()}, (i, module, [q[n].tensor_scale for n in names], want)
        for single in ("self_attn.o_proj", "mlp.down_proj"):  # not fused: their own amax / 2688
            n = f"model.layers.{i}.{single}.weight"
            assert q[n].tensor_scale == source_amax(source, n) / NVFP4_TS_DIVISOR


def test_unshared_fused_scales_differ(smol: SmolRuns, tmp_path: Path) -> None:
    """share_fused_scales=False: every projection gets its own amax / 2688."""
    dst = tmp_path / "unshared"
    convert_checkpoint(smol.src, dst, Options(scheme="nvfp4", share_fused_scales=False))
    source = read_raw_dir(smol.src)
    q = read_output(dst).quantized
    distinct_layers = 0
    for i in range(30):
        names = [f"model.layers.{i}.self_attn.{m}.weight" for m in ("q_proj", "k_proj", "v_proj")]
        names += [f"model.layers.{i}.mlp.{m}.weight" for m in ("gate_proj", "up_proj")]
        for n in names:
            assert q[n].tensor_scale == source_amax(source, n) / NVFP4_TS_DIVISOR, n
        scales = [float(q[n].tensor_scale) for n in names]
        distinct_layers += len(set(scales[:3])) > 1 and len(set(scales[3:])) > 1
    assert distinct_layers == 30
    assert json.loads((dst / "config.json").read_text())["quantization_config"]["fused_tensor_scales"] is False


# ============================================================================ 5. all-MiniLM-L6-v2 (FP32 BERT)


def test_minilm_fp32_bert_converts(tmp_path: Path) -> None:
    """all-MiniLM-L6-v2 (FP32 BERT, with an I64 buffer) converts as it is, with the right tensors kept."""
    import smollm2_checkpoint

    src = smollm2_checkpoint.minilm_dir()
    before = tree_digest(src)
    result = convert_checkpoint(src, tmp_path / "minilm", Options(scheme="nvfp4"))
    out = check_output(src, tmp_path / "minilm")
    assert tree_digest(src) == before
    dense = {f"encoder.layer.{i}.{m}.weight" for i in range(6) for m in
             ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
              "intermediate.dense", "output.dense")}
    assert set(out.quantized) == dense | {"pooler.dense.weight"}
    assert all(qt.dtype == "F32" for qt in out.quantized.values())
    reasons = {n: e["reason"] for n, e in out.report["tensors"].items() if e["action"] == "kept"}
    for emb in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        assert "ignore" in reasons[f"embeddings.{emb}.weight"] and "embeddings" in reasons[f"embeddings.{emb}.weight"]
    assert all("not a matrix" in why for n, why in reasons.items() if "LayerNorm" in n or n.endswith(".bias"))
    assert "pooler.dense.bias" in reasons and "I64" in reasons["embeddings.position_ids"]
    # no linear layer stayed in high precision, so no warning
    assert out.report["summary"]["linear_params_high_precision"] == 0 and result.warnings == []


# ======================================================================= 2. determinism, resume, interruption

SMALL_SHARDS = 20_000  # bytes: the 4-layer synthetic model splits into several output shards


def small_opts(**kw: Any) -> Options:
    """Options that split the small synthetic models into several output shards."""
    return Options(max_shard_bytes=SMALL_SHARDS, **kw)


@pytest.fixture()
def reference(llama_src: Path, tmp_path: Path) -> Path:
    """An uninterrupted conversion of ``llama_src`` into small shards."""
    dst = tmp_path / "reference"
    result = convert_checkpoint(llama_src, dst, small_opts())
    assert result.shards_written == len(shard_files(dst)) >= 4 and result.shards_reused == 0
    return dst


def test_sharded_output_is_complete_and_deterministic(llama_src: Path, reference: Path, tmp_path: Path) -> None:
    """Several shards with a consistent index, each within the size limit; a second run gives the same bytes."""
    check_output(llama_src, reference)
    shards = shard_files(reference)
    assert all(SHARD_RE.fullmatch(s) for s in shards)
    index = json.loads((reference / INDEX).read_text())
    stored = {}
    for s in shards:
        stored.update({k: s for k in read_raw(reference / s)})
    assert index["weight_map"] == stored
    assert index["metadata"]["total_size"] == sum((reference / s).stat().st_size for s in shards)
    for s in shards:  # each shard's data within the size limit, unless it holds a single tensor
        _, start = raw_header(reference / s)
        with fp4fmt.safe_open(reference / s) as f:
            n_tensors = len(f.keys())
        assert (reference / s).stat().st_size - start <= SMALL_SHARDS or n_tensors == 1, s
    again = tmp_path / "again"
    convert_checkpoint(llama_src, again, small_opts())
    assert_same_tree(reference, again)
    assert_no_temporaries(reference)


def test_two_workers_give_the_same_bytes(llama_src: Path, reference: Path, tmp_path: Path) -> None:
    """``--workers 2`` (a process pool) writes the same bytes as one process."""
    dst = tmp_path / "two-workers"
    r = run_cli("convert", llama_src, dst, "--workers", "2", "--max-shard-size", f"{SMALL_SHARDS}B")
    assert r.exit_code == 0, r.output
    assert_same_tree(reference, dst)  # the reference was written by one process


def _failing_writer(fail_on: str) -> type:
    """A StreamingWriter that raises as soon as tensor data is written into a file whose name contains
    ``fail_on`` (whole tensors with ``add``, or pieces with ``write_part``)."""

    class Failing(fp4fmt.files.StreamingWriter):
        def _check(self, name: str) -> None:
            if fail_on in os.path.basename(self.filename):
                raise RuntimeError(f"simulated crash while writing {name}")

        def add(self, name: str, value: Any) -> None:
            self._check(name)
            super().add(name, value)

        def write_part(self, slot_name: str, *args: Any, **kwargs: Any) -> None:
            self._check(slot_name)
            super().write_part(slot_name, *args, **kwargs)

    return Failing


def interrupt_in_second_shard(src: Path, dst: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run the conversion and let it fail inside write_shard while the second shard is being written."""
    with monkeypatch.context() as m:
        m.setattr(checkpoint_mod, "StreamingWriter", _failing_writer("-00002-of-"))
        with pytest.raises(RuntimeError, match="simulated crash"):
            convert_checkpoint(src, dst, small_opts())
    assert shard_files(dst) == [planned_shard(dst, 1)]
    assert not [p for p in dst.iterdir() if p.name.endswith(TMP_SUFFIX)]  # the second shard's temp file is gone
    assert_incomplete(dst)


def planned_shard(dst: Path, i: int) -> str:
    """Name of output shard ``i`` (1-based) as planned in the work folder of an interrupted conversion."""
    return json.loads((dst / WORK / "plan.json").read_text())["shards"][i - 1]


def test_resume_after_failure_in_second_shard(llama_src: Path, reference: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash inside write_shard during shard 2, then the same call: shard 1 reused, same bytes."""
    dst = tmp_path / "resumed"
    interrupt_in_second_shard(llama_src, dst, monkeypatch)
    first = dst / shard_files(dst)[0]
    mtime = first.stat().st_mtime_ns
    result = convert_checkpoint(llama_src, dst, small_opts())
    assert result.shards_reused == 1 and result.shards_written == len(shard_files(reference)) - 1
    assert first.stat().st_mtime_ns == mtime  # reused, not rewritten
    assert_same_tree(reference, dst)
    assert_no_temporaries(dst)


def test_resume_rewrites_a_damaged_finished_shard(llama_src: Path, reference: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A finished shard whose checksum no longer matches is not trusted on resume."""
    dst = tmp_path / "damaged"
    interrupt_in_second_shard(llama_src, dst, monkeypatch)
    first = dst / shard_files(dst)[0]
    blob = bytearray(first.read_bytes())
    blob[-3] ^= 0x10  # one bit of tensor data: the checksum no longer matches
    first.write_bytes(bytes(blob))
    result = convert_checkpoint(llama_src, dst, small_opts())
    assert result.shards_reused == 0 and result.shards_written == len(shard_files(reference))
    assert_same_tree(reference, dst)


def test_resume_with_other_options_is_refused(llama_src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A half-finished folder of another plan is not mixed with a new one (unless --overwrite)."""
    dst = tmp_path / "other-options"
    interrupt_in_second_shard(llama_src, dst, monkeypatch)
    with pytest.raises(FP4FmtError, match="unfinished conversion") as e:
        convert_checkpoint(llama_src, dst, small_opts(scheme="mxfp4"))
    assert e.value.file == str(dst)
    assert_incomplete(dst)
    result = convert_checkpoint(llama_src, dst, small_opts(scheme="mxfp4"), overwrite=True)
    assert result.shards_reused == 0
    check_output(llama_src, dst)


@pytest.mark.parametrize("last_file", [REPORT, INDEX])
def test_crash_while_writing_final_files_never_looks_complete(llama_src: Path, reference: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch, last_file: str) -> None:
    """config.json is what makes a folder loadable: a crash before the other final files are in place must
    leave it out (and the rerun then finishes the job)."""
    dst = tmp_path / "final-files"
    real = checkpoint_mod._write_json

    def crash_on(path: Path, obj: Any) -> None:
        if Path(path).name == last_file:
            raise RuntimeError(f"simulated crash writing {last_file}")
        real(path, obj)

    with monkeypatch.context() as m:
        m.setattr(checkpoint_mod, "_write_json", crash_on)
        with pytest.raises(RuntimeError, match="simulated crash"):
            convert_checkpoint(llama_src, dst, small_opts())
    assert not (dst / "config.json").exists() and not (dst / INDEX).exists()
    result = convert_checkpoint(llama_src, dst, small_opts())
    assert result.shards_reused == len(shard_files(reference)) and result.shards_written == 0
    assert_same_tree(reference, dst)


STALLING_CLI = """\
import os, sys, time
from fp4fmt import files
from fp4fmt.cli import main


def stalling(method):
    def wrapper(self, *args, **kwargs):  # the disk stalls in the middle of the second shard
        method(self, *args, **kwargs)
        if "-00002-of-" in os.path.basename(self.filename):
            time.sleep(600)
    return wrapper


for name in ("add", "write_part"):
    if hasattr(files.StreamingWriter, name):
        setattr(files.StreamingWriter, name, stalling(getattr(files.StreamingWriter, name)))
main()
"""


def test_resume_after_sigkill(llama_src: Path, reference: Path, tmp_path: Path) -> None:
    """``fp4fmt convert`` killed with SIGKILL mid-shard, then the same command: same bytes as uninterrupted."""
    n_shards = len(shard_files(reference))
    script = tmp_path / "stalling_fp4fmt.py"
    script.write_text(STALLING_CLI)
    dst = tmp_path / "killed"
    args = ["convert", str(llama_src), str(dst), "--max-shard-size", f"{SMALL_SHARDS}B"]
    proc = subprocess.Popen([sys.executable, str(script), *args], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        # poll until the first shard is finished and the second is being written, then kill the process
        while time.monotonic() < deadline and proc.poll() is None:
            if dst.is_dir() and shard_files(dst) and any(p.name.endswith(TMP_SUFFIX) for p in dst.iterdir()):
                break
            time.sleep(0.01)
        assert proc.poll() is None, "the conversion ended before it could be interrupted"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:  # the test failed before its kill: do not leave the stalled process behind
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert shard_files(dst) == [planned_shard(dst, 1)] and n_shards > 2
    assert any(p.name.endswith(TMP_SUFFIX) for p in dst.iterdir())  # the half-written second shard
    assert_incomplete(dst)

    r = run_cli(*args)  # the same command again
    assert r.exit_code == 0, r.output
    reused = re.search(r"(\d+) shard\(s\) reused from an interrupted run", r.stdout)
    assert reused and int(reused.group(1)) == 1, r.stdout
    assert_same_tree(reference, dst)
    assert_no_temporaries(dst)


def test_full_disk_leaves_no_partial_shard(llama_src: Path, reference: Path, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """ENOSPC during shard 2: a WriteError naming the shard, nothing partial; rerun finishes the job."""
    real_pwrite = os.pwrite

    def pwrite(fd: int, data: Any, pos: int) -> int:
        if "-00002-of-" in os.readlink(f"/proc/self/fd/{fd}"):  # the disk fills up during the second shard
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_pwrite(fd, data, pos)

    dst = tmp_path / "full"
    with monkeypatch.context() as m:
        m.setattr(fp4fmt.files.os, "pwrite", pwrite)
        with pytest.raises(WriteError, match="No space left on device") as e:
            convert_checkpoint(llama_src, dst, small_opts())
        assert "-00002-of-" in e.value.file and e.value.tensor is not None
        r = run_cli("convert", llama_src, tmp_path / "full-cli", "--max-shard-size", f"{SMALL_SHARDS}B")
        assert r.exit_code != 0 and "No space left on device" in r.output and "-00002-of-" in r.output
    for d in (dst, tmp_path / "full-cli"):
        assert len(shard_files(d)) == 1  # the first shard is whole; nothing of the second
        assert not [p for p in d.iterdir() if p.name.endswith(TMP_SUFFIX)]
        assert_incomplete(d)
    result = convert_checkpoint(llama_src, dst, small_opts())
    assert result.shards_reused == 1
    assert_same_tree(reference, dst)


# ================================================================================================= 6. MoE


def moe_tensors(experts: dict[str, np.ndarray], *, hidden: int = 64, seed: int = 1) -> dict[str, np.ndarray]:
    """Attention, norms, embeddings and a router around the given expert tensors (layer 0)."""
    rng = np.random.default_rng(seed)

    def w(*shape: int, std: float = 0.05) -> np.ndarray:
        return (rng.standard_normal(shape) * std).astype(ml_dtypes.bfloat16)

    t = {"model.embed_tokens.weight": w(32, hidden, std=1.0), "lm_head.weight": w(32, hidden),
         "model.norm.weight": np.ones(hidden, ml_dtypes.bfloat16),
         "model.layers.0.input_layernorm.weight": np.ones(hidden, ml_dtypes.bfloat16),
         "model.layers.0.mlp.gate.weight": w(4, hidden)}
    for m in ("q_proj", "k_proj", "v_proj", "o_proj"):
        t[f"model.layers.0.self_attn.{m}.weight"] = w(hidden, hidden)
    t.update(experts)
    return t


def moe_config(*, hidden: int = 64, inter: int = 48) -> dict:
    """config.json of the MoE checkpoints (hidden_size and moe_intermediate_size locate the input axis)."""
    return {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": hidden,
            "moe_intermediate_size": inter, "intermediate_size": 4 * inter, "num_experts": 4, "num_hidden_layers": 1}


def expert_values(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Expert weights whose spread differs along every axis, so that blocking the wrong axis shows."""
    rng = np.random.default_rng(seed)
    spread = np.ones(shape)
    for ax, n in enumerate(shape):
        view = [1] * len(shape)
        view[ax] = n
        spread = spread * np.exp(rng.uniform(-1.5, 1.5, n)).reshape(view)
    return (0.02 * rng.standard_normal(shape) * spread).astype(ml_dtypes.bfloat16)


def assert_quantized_like_reference(qt: fp4fmt.QTensor, x: np.ndarray, axis: int, tensor_scale: Any = None) -> None:
    """``qt`` has the bytes of fp4fmt.quantize(x) blocked along ``axis`` (the reference quantizer)."""
    ref = fp4fmt.quantize(x, qt.scheme, axis=axis, tensor_scale=tensor_scale)
    assert qt.axis == axis and ref.axis == axis
    assert np.array_equal(np.asarray(qt.codes), ref.codes) and np.array_equal(np.asarray(qt.scales).view(np.uint8),
                                                                              ref.scales.view(np.uint8))
    assert np.array_equal(fp4fmt.dequantize(qt), fp4fmt.dequantize(ref))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_moe_per_expert_weights(tmp_path: Path, scheme: str) -> None:
    """Per-expert 2-D weights are blocked along in_features; gate/up of an expert share one NVFP4 scale."""
    experts = {}
    for e in range(4):
        p = f"model.layers.0.mlp.experts.{e}."
        experts[p + "gate_proj.weight"] = expert_values((48, 64), 10 * e)
        experts[p + "up_proj.weight"] = expert_values((48, 64), 10 * e + 1)
        experts[p + "down_proj.weight"] = expert_values((64, 48), 10 * e + 2)
    src = write_checkpoint(tmp_path / "src", moe_tensors(experts), moe_config())
    result = convert_checkpoint(src, tmp_path / "dst", Options(scheme=scheme))
    out = check_output(src, tmp_path / "dst", axes={n: 1 for n in experts})
    assert set(experts) <= set(out.quantized) and "model.layers.0.mlp.gate.weight" in out.kept
    assert "ignore pattern" in out.report["tensors"]["model.layers.0.mlp.gate.weight"]["reason"]
    for e in range(4):
        p = f"model.layers.0.mlp.experts.{e}."
        shared = None
        if scheme == "nvfp4":  # each expert's gate/up pair shares its own tensor scale
            amax = max(np.abs(experts[p + m].astype(np.float32)).max() for m in ("gate_proj.weight", "up_proj.weight"))
            shared = np.float32(amax) / NVFP4_TS_DIVISOR
        for m in ("gate_proj.weight", "up_proj.weight"):
            assert_quantized_like_reference(out.quantized[p + m], experts[p + m], 1, shared)
        assert_quantized_like_reference(out.quantized[p + "down_proj.weight"], experts[p + "down_proj.weight"], 1)
    assert result.warnings == []


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("layout,gate_up,down,axis", [
    ("in-major", (4, 64, 96), (4, 48, 64), 1),  # [E, in, out] (gpt-oss style): input features on axis 1
    ("out-major", (4, 96, 64), (4, 64, 48), 2),  # [E, out, in] (nn.Linear stacked): input features on axis 2
])
def test_moe_fused_3d_experts(tmp_path: Path, scheme: str, layout: str, gate_up: tuple, down: tuple, axis: int) -> None:
    """Fused 3-D expert tensors are blocked along the axis the config says holds the input features."""
    experts = {"model.layers.0.mlp.experts.gate_up_proj": expert_values(gate_up, 3),
               "model.layers.0.mlp.experts.down_proj": expert_values(down, 4)}
    src = write_checkpoint(tmp_path / "src", moe_tensors(experts), moe_config(hidden=64, inter=48))
    result = convert_checkpoint(src, tmp_path / "dst", Options(scheme=scheme))
    out = check_output(src, tmp_path / "dst", axes={n: axis for n in experts})
    for name, x in experts.items():
        assert_quantized_like_reference(out.quantized[name], x, axis)
        assert "fused MoE experts" in out.report["tensors"][name]["what"]
    assert result.warnings == [] and out.report["warnings"] == []


def test_unrecognised_fused_experts_are_kept_with_a_loud_warning(tmp_path: Path) -> None:
    """An ambiguous fused-experts layout is kept, and the report and the CLI say so loudly."""
    # hidden 64 and 2 * moe_intermediate_size 64: gate_up_proj [4, 64, 64] has "hidden" on both axes
    name = "model.layers.0.mlp.experts.gate_up_proj"
    experts = {name: expert_values((4, 64, 64), 5),
               "model.layers.0.mlp.experts.down_proj": expert_values((4, 32, 64), 6)}
    tensors = moe_tensors(experts)
    src = write_checkpoint(tmp_path / "src", tensors, moe_config(hidden=64, inter=32))
    result = convert_checkpoint(src, tmp_path / "dst", Options())
    out = check_output(src, tmp_path / "dst", axes={"model.layers.0.mlp.experts.down_proj": 1})
    assert name in out.kept and "UNRECOGNISED" in out.report["tensors"][name]["reason"]
    # independent share of linear parameters left in high precision: the ambiguous tensor over all linear ones
    linear = linear_weight_names(tensors) | set(experts)
    share = tensors[name].size / sum(tensors[n].size for n in linear)
    assert share > 0.10
    assert any(name in w and "unrecognised" in w for w in result.warnings)
    assert any("high precision" in w and f"{100 * share:.1f}%" in w for w in result.warnings)
    assert out.report["warnings"] == result.warnings
    r = run_cli("convert", src, tmp_path / "dst-cli")
    assert r.exit_code == 0, r.output
    assert "UNRECOGNISED" in r.stdout and name in r.stdout  # the kept line with its reason
    warned = [line for line in r.stderr.splitlines() if line.startswith("WARNING:")]
    assert any(name in line for line in warned) and any("high precision" in line for line in warned)


# ============================================================================================= 7. options


def test_high_precision_warning_threshold(llama_src: Path, tmp_path: Path) -> None:
    """The high-precision warning fires exactly when more than 10% of linear parameters are kept."""
    tensors = llama_tensors()
    linear = linear_weight_names(tensors)
    total = sum(tensors[n].size for n in linear)
    cases = {"o_proj-of-layer-0": r"layers\.0\.self_attn\.o_proj", "all-of-layer-0": r"layers\.0\."}
    fired = {}
    for label, pattern in cases.items():
        result = convert_checkpoint(llama_src, tmp_path / label, Options(ignore=Options().ignore + (pattern,)))
        kept_linear = [n for n in linear if re.search(pattern, n)]
        share = sum(tensors[n].size for n in kept_linear) / total
        warned = [w for w in result.warnings if "high precision" in w]
        assert bool(warned) == (share > 0.10), (label, share, result.warnings)
        assert result.report["summary"]["linear_share_high_precision"] == pytest.approx(share)
        fired[label] = bool(warned)
    assert fired == {"o_proj-of-layer-0": False, "all-of-layer-0": True}


def test_ignore_and_overrides_do_what_they_say(llama_src: Path, tmp_path: Path) -> None:
    """--ignore keeps a layer; override rules keep one, force MXFP4 on one and quantize the LM head."""
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps({"rules": [
        {"pattern": r"layers\.0\.self_attn\.o_proj", "action": "keep"},
        {"pattern": r"layers\.2\.mlp\.down_proj", "action": "mxfp4"},
        {"pattern": r"^lm_head\.", "action": "nvfp4"},  # an override wins over the default ignore list
    ]}))
    dst = tmp_path / "dst"
    r = run_cli("convert", llama_src, dst, "--ignore", r"layers\.1\.mlp\.down_proj", "--overrides", rules)
    assert r.exit_code == 0, r.output
    out = check_output(llama_src, dst)
    entries = out.report["tensors"]
    assert "model.layers.1.mlp.down_proj.weight" in out.kept
    assert repr(r"layers\.1\.mlp\.down_proj") in entries["model.layers.1.mlp.down_proj.weight"]["reason"]
    assert "model.layers.0.self_attn.o_proj.weight" in out.kept
    assert "override" in entries["model.layers.0.self_attn.o_proj.weight"]["reason"]
    assert out.quantized["model.layers.2.mlp.down_proj.weight"].scheme == "mxfp4"
    assert out.quantized["lm_head.weight"].scheme == "nvfp4"
    expected_q = (linear_weight_names(llama_tensors()) | {"lm_head.weight"}) - {
        "model.layers.1.mlp.down_proj.weight", "model.layers.0.self_attn.o_proj.weight"}
    assert set(out.quantized) == expected_q
    others = {qt.scheme for n, qt in out.quantized.items() if n != "model.layers.2.mlp.down_proj.weight"}
    assert others == {"nvfp4"}
    ignore = json.loads((dst / "config.json").read_text())["quantization_config"]["ignore"]
    assert "model.layers.1.mlp.down_proj" in ignore and "model.layers.0.self_attn.o_proj" in ignore
    assert "lm_head" not in ignore


@pytest.mark.parametrize("text,needle", [
    ("{not json", "cannot read the override file"),
    (json.dumps({"rules": {"pattern": "x", "action": "keep"}}), "rules"),
    (json.dumps([{"pattern": "x", "action": "keep"}]), "rules"),
    (json.dumps({"rules": [{"pattern": "x", "action": "int8"}]}), "rule 0"),
    (json.dumps({"rules": [{"action": "keep"}]}), "rule 0"),
    (json.dumps({"rules": [{"pattern": "ok", "action": "keep"}, {"pattern": "(unclosed", "action": "keep"}]}),
     "rule 1: bad regular expression"),
])
def test_bad_override_files_are_refused(llama_src: Path, tmp_path: Path, text: str, needle: str) -> None:
    """Malformed override files: an FP4FmtError naming the file and the rule, nothing written."""
    rules = tmp_path / "bad-rules.json"
    rules.write_text(text)
    with pytest.raises(FP4FmtError) as e:
        load_overrides(rules)
    assert e.value.file == str(rules) and needle in str(e.value)
    r = run_cli("convert", llama_src, tmp_path / "dst", "--overrides", rules)
    assert r.exit_code != 0 and str(rules) in r.output and needle in r.output
    assert not (tmp_path / "dst").exists()


# ============================================================================================ 8. bad input


def _remove_second_shard(src: Path, tmp: Path) -> None:
    """Delete a shard the index names."""
    (src / "model-00002-of-00002.safetensors").unlink()


def _truncate_first_shard(src: Path, tmp: Path) -> None:
    """Cut the last 100 bytes off the first shard."""
    f = src / "model-00001-of-00002.safetensors"
    f.write_bytes(f.read_bytes()[:-100])


def _index_points_outside(src: Path, tmp: Path) -> None:
    """Move one tensor to ../evil.safetensors and point the index at it."""
    index = json.loads((src / INDEX).read_text())
    moved = "model.layers.3.mlp.down_proj.weight"
    owner = src / index["weight_map"][moved]
    tensors = {n: t.values() for n, t in read_raw(owner).items()}
    write_raw(tmp / "evil.safetensors", {moved: tensors.pop(moved)})  # a valid file, just outside the folder
    write_raw(owner, tensors)
    index["weight_map"][moved] = "../evil.safetensors"
    (src / INDEX).write_text(json.dumps(index))


def _unknown_dtype(src: Path, tmp: Path) -> None:
    """Give one tensor a dtype safetensors does not define."""
    f = src / "model-00001-of-00002.safetensors"
    tensors = {n: t.values() for n, t in read_raw(f).items()}
    write_raw(f, tensors, dtype_names={"model.layers.0.mlp.down_proj.weight": "Q4_K"})


def _nan_in(name: str, index: tuple[int, int]) -> Callable[[Path, Path], None]:
    """An edit that puts a NaN at ``index`` of tensor ``name``."""
    def edit(src: Path, tmp: Path) -> None:
        f = next(p for p in src.glob("*.safetensors") if name in read_raw(p))
        tensors = {n: t.values().copy() for n, t in read_raw(f).items()}
        tensors[name][index] = np.nan
        write_raw(f, tensors)
    return edit


def _pickle_only(src: Path, tmp: Path) -> None:
    """Replace the safetensors weights by a (booby-trapped) pytorch_model.bin."""
    for p in list(src.iterdir()):
        if p.suffix == ".safetensors" or p.name == INDEX:
            p.unlink()
    (src / "pytorch_model.bin").write_bytes(booby_trapped_pickle(tmp / "UNPICKLED"))


def booby_trapped_pickle(marker: Path) -> bytes:
    """A pickle that creates the folder ``marker`` if anything ever unpickles it."""

    class Trap:
        def __reduce__(self) -> tuple:
            return os.mkdir, (str(marker),)

    return pickle.dumps(Trap())


@dataclass(frozen=True)
class BadInput:
    """A way to break a source checkpoint and the error it must produce."""

    edit: Callable[[Path, Path], None]
    error: type
    file: str  # expected in the message (and the error's file)
    needles: tuple[str, ...]
    tensor: str | None = None


# the tensor whose data ends the first input shard of ``llama_src`` (names sorted, split in two)
LAST_OF_FIRST_SHARD = str(np.array_split(np.array(sorted(llama_tensors()), dtype=object), 2)[0][-1])

BAD_INPUTS = {
    "missing-shard": BadInput(_remove_second_shard, FormatError, INDEX,
                              ("model-00002-of-00002.safetensors", "missing")),
    "truncated-shard": BadInput(_truncate_first_shard, FormatError, "model-00001-of-00002.safetensors",
                                ("data_offsets",), LAST_OF_FIRST_SHARD),
    "index-outside": BadInput(_index_points_outside, FormatError, INDEX, ("../evil.safetensors", "outside")),
    "unknown-dtype": BadInput(_unknown_dtype, FormatError, "model-00001-of-00002.safetensors", ("Q4_K",),
                              "model.layers.0.mlp.down_proj.weight"),
    "nan-fused-q": BadInput(_nan_in("model.layers.1.self_attn.q_proj.weight", (3, 5)), FP4FmtError, ".safetensors",
                            ("not finite", "[3, 5]"), "model.layers.1.self_attn.q_proj.weight"),
    "nan-o-proj": BadInput(_nan_in("model.layers.2.self_attn.o_proj.weight", (7, 60)), QuantizationError,
                           ".safetensors", ("not finite", "[7, 60]"), "model.layers.2.self_attn.o_proj.weight"),
    "pickle-only": BadInput(_pickle_only, FormatError, "pytorch_model.bin", ("pickle",)),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_refused_and_source_untouched(llama_src: Path, tmp_path: Path, case: str,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Each bad source: the right fp4fmt error (file, tensor), CLI exit != 0, source bytes unchanged."""
    bad = BAD_INPUTS[case]
    bad.edit(llama_src, tmp_path)
    outside = [tmp_path / "evil.safetensors"] if (tmp_path / "evil.safetensors").exists() else []
    before = tree_digest(llama_src), [p.read_bytes() for p in outside]

    def no_unpickling(*a: Any, **k: Any) -> None:
        raise AssertionError("the converter unpickled something")

    monkeypatch.setattr(pickle, "load", no_unpickling)
    monkeypatch.setattr(pickle, "loads", no_unpickling)
    monkeypatch.setattr(pickle, "Unpickler", no_unpickling)

    for scheme in SCHEMES:
        dst = tmp_path / f"dst-{scheme}"
        with pytest.raises(bad.error) as e:
            convert_checkpoint(llama_src, dst, Options(scheme=scheme))
        message = str(e.value)
        assert e.value.file is not None and e.value.file.endswith(bad.file), (e.value.file, message)
        assert all(n in message for n in bad.needles), message
        if bad.tensor:
            assert e.value.tensor == bad.tensor and repr(bad.tensor) in message
        r = run_cli("convert", llama_src, tmp_path / f"cli-{scheme}", "--scheme", scheme)
        assert r.exit_code != 0
        assert "error: " in r.output and bad.file in r.output and all(n in r.output for n in bad.needles)
        for d in (dst, tmp_path / f"cli-{scheme}"):
            if d.exists():
                assert_incomplete(d)
                assert not [p for p in d.iterdir() if p.name.endswith(TMP_SUFFIX)]
    assert (tree_digest(llama_src), [p.read_bytes() for p in outside]) == before
    assert not (tmp_path / "UNPICKLED").exists()


def test_pickle_file_given_directly_is_refused(tmp_path: Path) -> None:
    """A .bin file given as SRC is refused by name, never unpickled."""
    src = tmp_path / "pytorch_model.bin"
    src.write_bytes(booby_trapped_pickle(tmp_path / "UNPICKLED"))
    with pytest.raises(FormatError, match="pickle") as e:
        convert_checkpoint(src, tmp_path / "dst")
    assert e.value.file == str(src)
    r = run_cli("convert", src, tmp_path / "dst-cli")
    assert r.exit_code != 0 and "pickle" in r.output and str(src) in r.output
    assert not (tmp_path / "UNPICKLED").exists()


def test_existing_destination_needs_overwrite(llama_src: Path, tmp_path: Path) -> None:
    """A non-empty DST is left alone without --overwrite and replaced with it."""
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "precious.txt").write_text("keep me")
    before = tree_digest(llama_src)
    with pytest.raises(FP4FmtError, match="not empty") as e:
        convert_checkpoint(llama_src, dst)
    assert e.value.file == str(dst)
    r = run_cli("convert", llama_src, dst)
    assert r.exit_code != 0 and str(dst) in r.output and "--overwrite" in r.output
    assert [p.name for p in dst.iterdir()] == ["precious.txt"] and (dst / "precious.txt").read_text() == "keep me"
    r = run_cli("convert", llama_src, dst, "--overwrite")
    assert r.exit_code == 0, r.output
    assert not (dst / "precious.txt").exists()
    check_output(llama_src, dst)
    assert tree_digest(llama_src) == before


def test_destination_in_the_source_is_refused(llama_src: Path) -> None:
    """DST equal to or inside SRC is refused before anything is created there."""
    before = tree_digest(llama_src)
    for dst in (llama_src / "fp4", llama_src):
        with pytest.raises(FP4FmtError, match="source directory") as e:
            convert_checkpoint(llama_src, dst)
        assert e.value.file == str(dst)
        r = run_cli("convert", llama_src, dst)
        assert r.exit_code != 0 and "source directory" in r.output
    assert tree_digest(llama_src) == before and not (llama_src / "fp4").exists()
