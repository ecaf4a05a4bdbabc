"""FP8 source checkpoints: tools/make_fp8_checkpoint.py writes them, fp4fmt.converters.fp8 reads them.

The checkpoints are made from the first two decoder layers of the real SmolLM2-135M checkpoint (hidden 576,
intermediate 1536, k/v 192: none a multiple of 128, so block scaling has partial edge blocks in both axes).
Every dequantized weight is compared bit for bit with a reference written here, which reads the files with
its own safetensors parser, decodes E4M3 and BF16 from their bit fields, broadcasts scales by index
arithmetic and multiplies in float64 before one rounding to float32.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file as st_save_file

import fp4fmt
import make_fp8_checkpoint as mk
from fp4fmt.converters import fp8
from fp4fmt.converters.fp8 import FP8Source, detect_fp8

ROOT = Path(__file__).resolve().parents[1]
LINEAR = re.compile(r"^model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight$")
LAYERS = 2

# Test-side description of each convention: the scale's name suffix and how one scale covers the weight.
VARIANTS: dict[str, dict] = {
    "deepseek-f32": dict(convention="deepseek", strategy="block", scale_dtype="F32", ue8m0=False),
    "deepseek-bf16": dict(convention="deepseek", strategy="block", scale_dtype="BF16", ue8m0=False),
    "deepseek-ue8m0": dict(convention="deepseek", strategy="block", scale_dtype="F32", ue8m0=True),
    "ct-tensor": dict(convention="compressed-tensors", strategy="tensor", scale_dtype="BF16", ue8m0=False),
    "ct-channel": dict(convention="compressed-tensors", strategy="channel", scale_dtype="BF16", ue8m0=False),
    "ct-block": dict(convention="compressed-tensors", strategy="block", scale_dtype="BF16", ue8m0=False),
    "ct-channel-f32": dict(convention="compressed-tensors", strategy="channel", scale_dtype="F32", ue8m0=False),
    "modelopt-tensor": dict(convention="modelopt", strategy="tensor", scale_dtype="F32", ue8m0=False),
    "modelopt-channel": dict(convention="modelopt", strategy="channel", scale_dtype="F32", ue8m0=False),
}


# ----------------------------------------------------------------------------------------------------------
# an independent reader and reference
# ----------------------------------------------------------------------------------------------------------
def read_raw(path: Path) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    """{name: (dtype, shape, bytes)} of a safetensors file, parsed here from the 8-byte length and JSON."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    header.pop("__metadata__", None)
    return {k: (v["dtype"], tuple(v["shape"]), data[8 + n + v["data_offsets"][0] : 8 + n + v["data_offsets"][1]])
            for k, v in header.items()}


def read_dir(path: Path) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    out: dict = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(read_raw(f))
    return out


def e4m3_value(b: np.ndarray) -> np.ndarray:
    """float64 value of E4M3FN codes from the bit fields: bias 7, 3 mantissa bits, S.1111.111 is NaN."""
    b = b.astype(np.int64)
    sign = np.where(b & 0x80, -1.0, 1.0)
    e, m = (b >> 3) & 0xF, b & 0x7
    mag = np.where(e == 0, m * 2.0**-9, (8 + m) * np.exp2(e - 10.0))
    return np.where((e == 15) & (m == 7), np.nan, sign * mag)


def e5m2_value(b: np.ndarray) -> np.ndarray:
    """float64 value of E5M2 codes: bias 15, 2 mantissa bits, exponent 31 is Inf/NaN."""
    b = b.astype(np.int64)
    sign = np.where(b & 0x80, -1.0, 1.0)
    e, m = (b >> 2) & 0x1F, b & 0x3
    mag = np.where(e == 0, m * 2.0**-16, (4 + m) * np.exp2(e - 17.0))
    return np.where(e == 31, np.where(m == 0, np.inf, np.nan), sign * mag)


def raw_value(dtype: str, shape: tuple[int, ...], buf: bytes) -> np.ndarray:
    """float64 values of a stored tensor (BF16 from its top 16 float32 bits; E4M3 from its bit fields)."""
    if dtype == "F8_E4M3":
        return e4m3_value(np.frombuffer(buf, np.uint8)).reshape(shape)
    if dtype == "BF16":
        return (np.frombuffer(buf, "<u2").astype(np.uint32) << 16).view(np.float32).astype(np.float64).reshape(shape)
    if dtype == "F32":
        return np.frombuffer(buf, "<f4").astype(np.float64).reshape(shape)
    raise AssertionError(f"unexpected dtype {dtype}")


def scale_per_element(strategy: str, s: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The scale of every element of an [out, in] weight, by index arithmetic."""
    out_dim, in_dim = shape
    if strategy == "tensor":
        return np.full(shape, s.reshape(-1)[0])
    if strategy == "channel":
        return np.repeat(s.reshape(-1)[:, None], in_dim, axis=1)
    rows, cols = np.arange(out_dim)[:, None] // 128, np.arange(in_dim)[None, :] // 128
    return s[rows, cols]


def reference(w: np.ndarray, s: np.ndarray, strategy: str) -> np.ndarray:
    """float32(exact float64 product): the value every dequantized element must have."""
    return (w * scale_per_element(strategy, s, w.shape)).astype(np.float32)


def expected_scale_shape(convention: str, strategy: str, shape: tuple[int, int]) -> tuple[int, ...]:
    out_dim, in_dim = shape
    if strategy == "block":
        return (-(-out_dim // 128), -(-in_dim // 128))
    if convention == "compressed-tensors":
        return (1,) if strategy == "tensor" else (out_dim, 1)
    return () if strategy == "tensor" else (out_dim,)


def scale_suffix(convention: str) -> str:
    return "_scale_inv" if convention == "deepseek" else "_scale"


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 (as float64), round to nearest even on the bits."""
    u = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint32) << 16
    return r.view(np.float32).astype(np.float64)


# ----------------------------------------------------------------------------------------------------------
# fixtures
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def source_dir(smollm2_dir: Path, tmp_path_factory) -> Path:
    """Two decoder layers of SmolLM2 (plus the norm and 512 embedding rows), sharded in two files."""
    out = tmp_path_factory.mktemp("fp8-source")
    with fp4fmt.safe_open(smollm2_dir / "model.safetensors") as f:
        layer0 = {k: np.array(f.get_tensor(k)) for k in f.keys() if k.startswith("model.layers.0.")}
        rest = {k: np.array(f.get_tensor(k)) for k in f.keys() if k.startswith("model.layers.1.")}
        rest["model.norm.weight"] = np.array(f.get_tensor("model.norm.weight"))
        rest["model.embed_tokens.weight"] = np.array(f.get_tensor("model.embed_tokens.weight")[:512])
    shards = {"model-00001-of-00002.safetensors": layer0, "model-00002-of-00002.safetensors": rest}
    weight_map = {}
    for fname, tensors in shards.items():
        st_save_file(tensors, str(out / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in tensors})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    config = json.loads((smollm2_dir / "config.json").read_text())
    config.update(num_hidden_layers=LAYERS, vocab_size=512)
    (out / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copyfile(smollm2_dir / name, out / name)
    return out


@pytest.fixture(scope="module")
def source_raw(source_dir: Path) -> dict:
    return read_dir(source_dir)


@pytest.fixture(scope="module")
def checkpoints(source_dir: Path, tmp_path_factory) -> dict[str, Path]:
    """Each variant's FP8 checkpoint, written on first use (modelopt-channel through the command line)."""
    made: dict[str, Path] = {}

    class Lazy(dict):
        def __missing__(self, key: str) -> Path:
            v = VARIANTS[key]
            dst = tmp_path_factory.mktemp(key)
            if key == "modelopt-channel":
                cmd = [sys.executable, str(ROOT / "tools" / "make_fp8_checkpoint.py"), str(source_dir), str(dst),
                       "--convention", "modelopt", "--strategy", "channel"]
                subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT)
            else:
                mk.make(source_dir, dst, v["convention"], v["strategy"], v["scale_dtype"], v["ue8m0"])
            self[key] = dst
            return dst

    return Lazy(made)


def detect_dir(path: Path) -> FP8Source | None:
    """detect_fp8 on a checkpoint folder, as the converter calls it."""
    config = json.loads((path / "config.json").read_text())
    hq_path = path / "hf_quant_config.json"
    hq = json.loads(hq_path.read_text()) if hq_path.exists() else None
    return detect_fp8(config, hq, {k: v[0] for k, v in read_dir(path).items()})


# ----------------------------------------------------------------------------------------------------------
# generated checkpoints
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_generated_checkpoint_layout(variant: str, checkpoints, source_dir: Path, source_raw: dict) -> None:
    """The FP8 tensors are exactly the projections; scales have the convention's name, dtype and shape;
    every other tensor is copied byte for byte; the index lists every tensor; the tokenizer is copied."""
    v = VARIANTS[variant]
    path = checkpoints[variant]
    raw = read_dir(path)
    fp8_names = {k for k, (dt, _, _) in raw.items() if dt == "F8_E4M3"}
    assert fp8_names == {k for k in source_raw if LINEAR.match(k)}
    assert len(fp8_names) == 7 * LAYERS
    for name in fp8_names:
        shape = source_raw[name][1]
        assert raw[name][1] == shape
        sdt, sshape, _ = raw[name + scale_suffix(v["convention"])]
        assert (sdt, sshape) == (v["scale_dtype"], expected_scale_shape(v["convention"], v["strategy"], shape))
    extra = set(raw) - set(source_raw) - {n + scale_suffix(v["convention"]) for n in fp8_names}
    modules = {n[: -len(".weight")] for n in fp8_names}
    if v["convention"] == "modelopt":
        want = {m + ".input_scale" for m in modules} | {m + ".k_scale" for m in modules if m.endswith("k_proj")} \
            | {m + ".v_scale" for m in modules if m.endswith("v_proj")}
    elif variant == "ct-tensor":
        want = {m + ".input_scale" for m in modules}
    else:
        want = set()
    assert extra == want
    for name, (dt, shape, buf) in source_raw.items():
        if name not in fp8_names:
            assert raw[name] == (dt, shape, buf), name
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(raw)
    assert index["weight_map"]["model.layers.0.mlp.up_proj.weight_scale" + ("_inv" if v["convention"] == "deepseek" else "")] \
        == "model-00001-of-00002.safetensors"
    assert index["metadata"]["total_size"] == sum(len(b) for _, _, b in raw.values())
    assert (path / "tokenizer.json").read_bytes() == (source_dir / "tokenizer.json").read_bytes()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_detect_and_dequantize_bit_exact(variant: str, checkpoints, source_raw: dict) -> None:
    """The convention is detected from the files, and every FP8 weight dequantizes to the independent
    float64 reference bit for bit, within the E4M3 rounding bound of the original BF16 weight."""
    v = VARIANTS[variant]
    path = checkpoints[variant]
    src = detect_dir(path)
    assert src is not None
    assert src.convention == v["convention"]
    assert src.block == ((128, 128) if v["strategy"] == "block" else None)
    raw = read_dir(path)
    readers = {f.name: fp4fmt.safe_open(f) for f in path.glob("*.safetensors")}
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    partial_edges = 0
    for name in sorted(k for k, (dt, _, _) in raw.items() if dt == "F8_E4M3"):
        sname = src.scale_name(name)
        assert sname == name + scale_suffix(v["convention"])
        w = readers[index[name]].get_tensor(name)
        s = readers[index[sname]].get_tensor(sname)
        got = src.dequantize(w, s, name=name)
        assert got.dtype == np.float32 and got.shape == w.shape
        wq = raw_value(*raw[name])
        sv = raw_value(*raw[sname])
        want = reference(wq, sv, v["strategy"])
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), name
        # within the FP8 rounding bound of the source: half an E4M3 ulp (2^-4 relative, 2^-10 absolute in
        # the subnormal range) of w / scale, times the scale, plus float32 rounding of the division
        orig = raw_value(*source_raw[name])
        per_el = scale_per_element(v["strategy"], sv, w.shape)
        bound = (np.abs(orig) * 2.0**-4 + per_el * 2.0**-10) * (1 + 2.0**-16)
        err = np.abs(got.astype(np.float64) - orig)
        assert np.all(err <= bound), (name, float(np.max(err - bound)))
        assert np.max(err) > 0  # it really went through 8 bits
        partial_edges += v["strategy"] == "block" and (w.shape[0] % 128 != 0 or w.shape[1] % 128 != 0)
    if v["strategy"] == "block":
        assert partial_edges > 0


def group_max(a: np.ndarray, strategy: str) -> np.ndarray:
    """max over the whole tensor [1, 1], each row [out, 1] or each (partial) 128x128 block [rb, cb]."""
    if strategy == "tensor":
        return a.max().reshape(1, 1)
    if strategy == "channel":
        return a.max(axis=1).reshape(-1, 1)
    return np.array([[a[r : r + 128, c : c + 128].max() for c in range(0, a.shape[1], 128)]
                     for r in range(0, a.shape[0], 128)])


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_scales_follow_amax_rule(variant: str, checkpoints, source_raw: dict) -> None:
    """Each stored scale is amax/448 over its tensor, row or (partial) 128x128 block, rounded to the scale
    dtype; ue8m0 scales are the smallest power of two not below amax/448. The largest |code| of each scale
    group is then 448 exactly ([224, 448] for ue8m0: amax/scale is in (224, 448])."""
    v = VARIANTS[variant]
    raw = read_dir(checkpoints[variant])
    for name in (k for k in source_raw if LINEAR.match(k)):
        amax = group_max(np.abs(raw_value(*source_raw[name])), v["strategy"])
        assert np.all(amax > 0)
        stored = raw_value(*raw[name + scale_suffix(v["convention"])]).reshape(amax.shape)
        exact = (amax / 448).astype(np.float32).astype(np.float64)
        if v["ue8m0"]:
            assert np.all(np.frexp(stored)[0] == 0.5) and np.all(stored >= exact) and np.all(stored / 2 < exact)
        elif v["scale_dtype"] == "BF16":
            assert np.array_equal(stored, f32_to_bf16(exact))
        else:
            assert np.array_equal(stored, exact)
        code_max = group_max(np.abs(raw_value(*raw[name])), v["strategy"])
        if v["ue8m0"]:
            assert np.all((code_max >= 224) & (code_max <= 448)), name
        else:
            assert np.all(code_max == 448), name


def test_configs_match_each_convention(checkpoints) -> None:
    """config.json carries each convention's quantization_config: DeepSeek-V3's literal block, the dict
    compressed-tensors itself writes for its FP8 / FP8_DYNAMIC / FP8_BLOCK presets, and the dict modelopt's
    own convert_hf_quant_config_format makes of hf_quant_config.json."""
    ds = json.loads((checkpoints["deepseek-f32"] / "config.json").read_text())["quantization_config"]
    assert ds == {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}
    ue = json.loads((checkpoints["deepseek-ue8m0"] / "config.json").read_text())["quantization_config"]
    assert ue == {**ds, "scale_fmt": "ue8m0"}

    import compressed_tensors
    from compressed_tensors.quantization import QuantizationConfig, preset_name_to_scheme

    for variant, preset in (("ct-tensor", "FP8"), ("ct-channel", "FP8_DYNAMIC"), ("ct-block", "FP8_BLOCK")):
        scheme = preset_name_to_scheme(preset, ["Linear"])
        qc = QuantizationConfig(config_groups={"group_0": scheme}, format="float-quantized",
                                quantization_status="compressed", ignore=["lm_head"])
        want = {"version": compressed_tensors.__version__, "quant_method": "compressed-tensors", "sparsity_config": {},
                "transform_config": {}, **qc.model_dump(exclude=["quant_method"])}
        got = json.loads((checkpoints[variant] / "config.json").read_text())["quantization_config"]
        assert got == json.loads(json.dumps(want)), variant

    spec = importlib.util.find_spec("modelopt")
    conv_path = Path(spec.origin).parent / "torch" / "export" / "convert_hf_config.py"
    conv_spec = importlib.util.spec_from_file_location("_modelopt_convert_hf_config", conv_path)
    conv = importlib.util.module_from_spec(conv_spec)
    conv_spec.loader.exec_module(conv)
    for variant, algo in (("modelopt-tensor", "FP8"), ("modelopt-channel", "FP8_PER_CHANNEL_PER_TOKEN")):
        hq = json.loads((checkpoints[variant] / "hf_quant_config.json").read_text())
        assert hq["quantization"]["quant_algo"] == algo
        got = json.loads((checkpoints[variant] / "config.json").read_text())["quantization_config"]
        assert got == conv.convert_hf_quant_config_format(hq), variant


def test_auxiliary_tensors(checkpoints, source_raw: dict) -> None:
    """auxiliary() drops exactly the activation and KV-cache scales (and orphan weight scales), keeps the rest."""
    for variant in ("modelopt-tensor", "ct-tensor", "deepseek-f32"):
        path = checkpoints[variant]
        src = detect_dir(path)
        raw = read_dir(path)
        consumed = {src.scale_name(k) for k, (dt, _, _) in raw.items() if dt == "F8_E4M3"}
        others = [k for k, (dt, _, _) in raw.items() if dt != "F8_E4M3" and k not in consumed]
        dropped = {k for k in others if src.auxiliary(k) is not None}
        assert dropped == {k for k in others if re.search(r"\.(input|k|v)_scale$", k)}, variant
        assert set(others) - dropped == set(source_raw) - {k for k in source_raw if LINEAR.match(k)}
    ds = detect_dir(checkpoints["deepseek-f32"])
    assert "no FP8 weight" in ds.auxiliary("lm_head.weight_scale_inv")
    assert "KV-cache" in ds.auxiliary("model.layers.0.self_attn.k_scale")
    assert ds.auxiliary("model.layers.0.mlp.gate.e_score_correction_bias") is None


def test_source_without_fp8_is_none(source_dir: Path) -> None:
    """A BF16 checkpoint, and an NVFP4-style one whose only F8 tensors are block scales, have no FP8 weights."""
    assert detect_dir(source_dir) is None
    nvfp4 = {"q.weight_packed": "U8", "q.weight_scale": "F8_E4M3", "q.weight_global_scale": "F32"}
    assert detect_fp8({"quantization_config": {"quant_method": "compressed-tensors"}}, None, nvfp4) is None


# ----------------------------------------------------------------------------------------------------------
# numerics on synthetic arrays
# ----------------------------------------------------------------------------------------------------------
def _codes(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Random E4M3FN codes without the NaN codes 0x7F / 0xFF."""
    c = rng.integers(0, 256, size=shape, dtype=np.uint8)
    c[(c & 0x7F) == 0x7F] = 0x7E
    return c


@settings(max_examples=40, deadline=None)
@given(out_dim=st.integers(1, 300), in_dim=st.integers(1, 300), kind=st.sampled_from(["tensor", "channel", "block"]),
       scale_dtype=st.sampled_from(["F32", "BF16"]), seed=st.integers(0, 2**32 - 1))
def test_dequantize_matches_reference_any_shape(out_dim: int, in_dim: int, kind: str, scale_dtype: str, seed: int) -> None:
    """Any shape (edge blocks partial), any code, scales across float32's range including subnormals and 0."""
    rng = np.random.default_rng(seed)
    codes = _codes(rng, (out_dim, in_dim))
    shape = {"tensor": (1,), "channel": (out_dim, 1), "block": (-(-out_dim // 128), -(-in_dim // 128))}[kind]
    s32 = np.exp2(rng.uniform(-140, 100, size=shape)).astype(np.float32)
    if s32.size > 1:
        s32.flat[0] = 0.0  # a zero scale (an all-zero block) is allowed
    stored = s32.astype(ml_dtypes.bfloat16) if scale_dtype == "BF16" else s32
    src = FP8Source("compressed-tensors", (128, 128) if kind == "block" else None, frozenset({kind}))
    got = src.dequantize(codes.view(ml_dtypes.float8_e4m3fn), stored, name="w")
    sv = raw_value(scale_dtype, shape, stored.tobytes())
    want = reference(e4m3_value(codes), sv, kind)
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))


def test_dequantize_in_chunks_equals_whole(monkeypatch) -> None:
    """Chunked evaluation (rows in multiples of the block height) gives the same bits as the reference."""
    rng = np.random.default_rng(1)
    codes = _codes(rng, (700, 300))
    s = rng.uniform(0.001, 2, size=(6, 3)).astype(np.float32)
    monkeypatch.setattr(fp8, "_CHUNK_ELEMENTS", 1000)
    for src in (FP8Source("deepseek", (128, 128)), FP8Source("deepseek", (64, 32))):
        grid = s if src.block == (128, 128) else rng.uniform(0.001, 2, size=(11, 10)).astype(np.float32)
        got = src.dequantize(codes.view(ml_dtypes.float8_e4m3fn), grid, name="w")
        b0, b1 = src.block
        per_el = grid.astype(np.float64)[np.arange(700)[:, None] // b0, np.arange(300)[None, :] // b1]
        want = (e4m3_value(codes) * per_el).astype(np.float32)
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), src.block


def test_stacked_expert_weights() -> None:
    """[E, out, in] weights: per-expert block scales [E, rb, cb] and per-expert tensor scales [E]."""
    rng = np.random.default_rng(2)
    codes = _codes(rng, (3, 200, 130))
    blocks = rng.uniform(0.01, 1, size=(3, 2, 2)).astype(np.float32)
    got = FP8Source("deepseek", (128, 128)).dequantize(codes.view(ml_dtypes.float8_e4m3fn), blocks, name="experts")
    for e in range(3):
        want = reference(e4m3_value(codes[e]), blocks[e].astype(np.float64), "block")
        assert np.array_equal(got[e].view(np.uint32), want.view(np.uint32))
    per_expert = np.array([0.5, 0.25, 3.0], np.float32)
    got = FP8Source("modelopt", None, frozenset({"tensor"})).dequantize(codes.view(ml_dtypes.float8_e4m3fn), per_expert)
    for e in range(3):
        assert np.array_equal(got[e], (e4m3_value(codes[e]) * float(per_expert[e])).astype(np.float32))


def test_e5m2_weights_when_declared() -> None:
    """fmt "e5m2" in a DeepSeek-style config is honoured (bit-formula reference); undeclared E5M2 is refused."""
    config = {"quantization_config": {"quant_method": "fp8", "fmt": "e5m2", "weight_block_size": [128, 128]}}
    src = detect_fp8(config, None, {"a.weight": "F8_E5M2", "a.weight_scale_inv": "F32"})
    codes = np.random.default_rng(3).integers(0, 256, size=(130, 140), dtype=np.uint8)
    codes[(codes & 0x7C) == 0x7C] = 0x3C  # no Inf/NaN
    s = np.array([[0.5, 2.0], [1.5, 0.125]], np.float32)
    got = src.dequantize(codes.view(ml_dtypes.float8_e5m2), s, name="a.weight")
    want = (e5m2_value(codes) * s.astype(np.float64)[np.arange(130)[:, None] // 128, np.arange(140)[None, :] // 128])
    assert np.array_equal(got.view(np.uint32), want.astype(np.float32).view(np.uint32))
    e4 = {"quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}}
    with pytest.raises(fp4fmt.FP4FmtError, match=r"tensor 'a\.weight'.*F8_E5M2.*declares F8_E4M3"):
        detect_fp8(e4, None, {"a.weight": "F8_E5M2", "a.weight_scale_inv": "F32"})


# ----------------------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------------------
DS_CONFIG = {"quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                     "weight_block_size": [128, 128]}}


def test_fp8_weights_without_scales_or_config(checkpoints) -> None:
    """F8 weights with no quantization config (and no scales) cannot be identified; a declared convention
    whose scale tensor is missing names the weight."""
    dtypes = {k: v[0] for k, v in read_dir(checkpoints["deepseek-f32"]).items() if not k.endswith("_scale_inv")}
    with pytest.raises(fp4fmt.FP4FmtError, match=r"^config\.json: .*FP8 tensors.*cannot be identified.*no scale tensors"):
        detect_fp8({"model_type": "llama"}, None, dtypes)
    with pytest.raises(fp4fmt.FP4FmtError, match=r"tensor 'model\.layers\.0\.mlp\.down_proj\.weight'.*no scale tensor "
                                                 r"'model\.layers\.0\.mlp\.down_proj\.weight_scale_inv'"):
        detect_fp8(DS_CONFIG, None, dtypes)
    ct = json.loads((checkpoints["ct-channel"] / "config.json").read_text())
    with pytest.raises(fp4fmt.FP4FmtError, match=r"'model\.layers\.0\.mlp\.down_proj\.weight_scale'"):
        detect_fp8(ct, None, dtypes)


def test_unknown_or_unsupported_configs() -> None:
    """Unknown quant_method, unsupported strategies and algorithms are refused, naming the config file."""
    d = {"m.weight": "F8_E4M3", "m.weight_scale": "F32"}
    with pytest.raises(fp4fmt.FP4FmtError, match=r"^config\.json: .*quant_method 'awq'"):
        detect_fp8({"quantization_config": {"quant_method": "awq"}}, None, d)
    group = {"weights": {"num_bits": 8, "type": "float", "strategy": "group", "group_size": 128}}
    ct = {"quantization_config": {"quant_method": "compressed-tensors", "format": "float-quantized",
                                  "config_groups": {"g": group}}}
    with pytest.raises(fp4fmt.FP4FmtError, match=r"^config\.json: .*config_groups\.g.*strategy 'group'"):
        detect_fp8(ct, None, d)
    ct["quantization_config"]["format"] = "mxfp8-quantized"
    with pytest.raises(fp4fmt.FP4FmtError, match=r"^config\.json: .*format 'mxfp8-quantized'"):
        detect_fp8(ct, None, d)
    hq = {"producer": {"name": "modelopt"}, "quantization": {"quant_algo": "NVFP4"}}
    with pytest.raises(fp4fmt.FP4FmtError, match=r"^hf_quant_config\.json: .*quant_algo 'NVFP4'"):
        detect_fp8({}, hq, d)
    with pytest.raises(fp4fmt.FP4FmtError, match=r"^config\.json: .*without weight_block_size"):
        detect_fp8({"quantization_config": {"quant_method": "fp8"}}, None, d)
    bad_scale = {"m.weight": "F8_E4M3", "m.weight_scale_inv": "I32"}
    with pytest.raises(fp4fmt.QuantizationError, match=r"tensor 'm\.weight_scale_inv'.*dtype I32"):
        detect_fp8(DS_CONFIG, None, bad_scale)


def test_bad_scales_are_refused(checkpoints) -> None:
    """Wrong scale shape, negative, NaN, Inf, non-power-of-two under ue8m0, unknown dtype, NaN codes and
    float32 overflow each raise QuantizationError naming the tensor."""
    path = checkpoints["deepseek-f32"]
    src = detect_dir(path)
    name = "model.layers.0.self_attn.k_proj.weight"  # [192, 576] -> scales [2, 5]
    with fp4fmt.safe_open(path / "model-00001-of-00002.safetensors") as f:
        w, s = f.get_tensor(name), np.array(f.get_tensor(name + "_scale_inv"))
    tag = re.escape(f"tensor '{name}'")
    for wrong in (s.T, s[:1], np.concatenate([s, s[:1]]), s.reshape(-1)):
        with pytest.raises(fp4fmt.QuantizationError, match=tag + r".*scale shape .* does not fit FP8 weight shape \[192, 576\]"):
            src.dequantize(w, np.ascontiguousarray(wrong), name=name)
    for value, rule in ((-0.5, "negative"), (np.nan, "NaN or Inf"), (np.inf, "NaN or Inf")):
        bad = s.copy()
        bad[1, 3] = value
        with pytest.raises(fp4fmt.QuantizationError, match=tag + ".*" + rule):
            src.dequantize(w, bad, name=name)
    with pytest.raises(fp4fmt.QuantizationError, match=tag + r".*dtype int32"):
        src.dequantize(w, s.astype(np.int32), name=name)
    with pytest.raises(fp4fmt.QuantizationError, match=tag + r".*dtype F32"):
        src.dequantize(np.asarray(w, np.float32), s, name=name)
    ue8m0 = FP8Source("deepseek", (128, 128), scale_fmt="ue8m0")
    with pytest.raises(fp4fmt.QuantizationError, match=tag + r".*ue8m0 promises powers of two"):
        ue8m0.dequantize(w, s * 3, name=name)
    nan_codes = np.array(w).view(np.uint8).copy()
    nan_codes[5, 7] = 0xFF
    with pytest.raises(fp4fmt.QuantizationError, match=tag + r".*NaN or Inf codes"):
        src.dequantize(nan_codes.view(ml_dtypes.float8_e4m3fn), s, name=name)
    with pytest.raises(fp4fmt.QuantizationError, match=tag + r".*overflows float32"):
        src.dequantize(w, np.full_like(s, 3e38), name=name)
    ct_tensor = FP8Source("compressed-tensors", None, frozenset({"tensor"}))
    with pytest.raises(fp4fmt.QuantizationError, match=tag + r".*expected tensor: \[\] or \[1\] or \[1, 1\]"):
        ct_tensor.dequantize(w, s, name=name)


def test_modelopt_config_sources(checkpoints) -> None:
    """modelopt is recognised from config.json alone or hf_quant_config.json alone; MIXED_PRECISION of FP8
    algorithms allows both granularities; the two files disagreeing is an error naming hf_quant_config.json."""
    path = checkpoints["modelopt-channel"]
    config = json.loads((path / "config.json").read_text())
    hq = json.loads((path / "hf_quant_config.json").read_text())
    d = {k: v[0] for k, v in read_dir(path).items()}
    want = FP8Source("modelopt", None, frozenset({"channel"}))
    assert detect_fp8(config, None, d) == want
    assert detect_fp8({k: v for k, v in config.items() if k != "quantization_config"}, hq, d) == want
    mixed = {"quant_algo": "MIXED_PRECISION", "quantized_layers": {"a": {"quant_algo": "FP8"},
                                                                   "b": {"quant_algo": "FP8_PER_CHANNEL_PER_TOKEN"}}}
    assert detect_fp8(None, {"quantization": mixed}, d).kinds == {"tensor", "channel"}
    hq["quantization"]["quant_algo"] = "FP8"
    with pytest.raises(fp4fmt.FP4FmtError, match=r"^hf_quant_config\.json: .*'FP8_PER_CHANNEL_PER_TOKEN'.*'FP8'"):
        detect_fp8(config, hq, d)
