"""ONNX export (converters/interop/onnx_export.py): the model passes onnx.checker, the onnx reference evaluator
decodes every exported weight bit for bit like fp4fmt.dequantize (spec §5.3), and packed codes and scales
are copied byte-exactly where ONNX represents them."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fp4fmt
from fp4fmt import codec
from fp4fmt.converters.interop import onnx_export as ox
from fp4fmt.errors import FP4FmtError

onnx = pytest.importorskip("onnx")
from onnx import TensorProto as TP  # noqa: E402
from onnx import numpy_helper  # noqa: E402
from onnx.reference import ReferenceEvaluator  # noqa: E402

SCHEMES = ("nvfp4", "mxfp4")
FORMATS = ("native", "float32")
EXPECTED_SCALE_TYPE = {("nvfp4", "native"): TP.FLOAT8E4M3FN, ("mxfp4", "native"): TP.FLOAT8E8M0,
                       ("nvfp4", "float32"): TP.FLOAT, ("mxfp4", "float32"): TP.FLOAT}


def bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


def run_layer(model, layer: str, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(y, dequantized weight) of one layer by the onnx reference evaluator."""
    y, w = ReferenceEvaluator(ox.layer_model(model, layer)).run(None, {f"x.{layer}": x})
    return y, w


def assert_layer_matches(y, w, qt, x, bias=None):
    ref = fp4fmt.dequantize(qt)
    assert w.dtype == np.float32 and w.shape == ref.shape
    np.testing.assert_array_equal(bits(w), bits(ref))  # bit-identical, signed zeros included
    want = x @ ref.T + (0 if bias is None else bias.astype(np.float32))
    assert np.isfinite(want).all()  # a comparison of infinities would prove nothing
    np.testing.assert_allclose(y, want, rtol=1e-6, atol=1e-6 * float(np.abs(want).max(initial=1.0)))


def raw(t) -> bytes:
    """Raw bytes of an initializer loaded with its external data."""
    assert t.HasField("raw_data")
    return t.raw_data


def onnx_packed(qt) -> bytes:
    """Independent oracle: onnx's own FLOAT4E2M1 packing of the tensor's [N, K] codes."""
    n, k = qt.shape
    nib = codec.unpack_nibbles(qt.codes)[:, :k]
    return numpy_helper.from_array(nib.view(ml_dtypes.float4_e2m1fn)).raw_data


# ----------------------------------------------------------------------------------------------------------
# SmolLM2-135M, converted by fp4fmt in both schemes and exported


@pytest.fixture(scope="module")
def smollm2_fp4(smollm2_dir, tmp_path_factory) -> dict[str, Path]:
    from fp4fmt.converters.checkpoint import Options, convert_checkpoint

    root = tmp_path_factory.mktemp("onnx_src")
    out = {}
    for s in SCHEMES:
        convert_checkpoint(smollm2_dir, root / s, Options(scheme=s))
        out[s] = root / s
    return out


@pytest.fixture(scope="module")
def exports(smollm2_fp4, tmp_path_factory) -> dict[tuple[str, str], ox.ExportReport]:
    root = tmp_path_factory.mktemp("onnx_out")
    return {(s, f): ox.export_checkpoint(smollm2_fp4[s], root / f"{s}-{f}", scale_format=f) for s in SCHEMES for f in FORMATS}


def checkpoint_tensors(d: Path) -> dict:
    with fp4fmt.safe_open(d / "model.safetensors") as f:
        return {n: f.get_tensor(n) for n in f.keys()}


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("scale_format", FORMATS)
def test_smollm2_export_checks_and_lists_every_linear_layer(exports, smollm2_fp4, scheme, scale_format):
    r = exports[scheme, scale_format]
    onnx.checker.check_model(str(r.model), full_check=True)  # by path: external data checked too
    opset = 24 if (scheme, scale_format) == ("mxfp4", "native") else 23
    assert (r.opset, r.ir_version) == (opset, {23: 11, 24: 12}[opset])
    m = onnx.load(str(r.model), load_external_data=False)
    assert [(o.domain, o.version) for o in m.opset_import] == [("", opset)] and m.ir_version == r.ir_version
    tensors = checkpoint_tensors(smollm2_fp4[scheme])
    quantized = {n: t for n, t in tensors.items() if isinstance(t, fp4fmt.QTensor)}
    assert len(quantized) == 30 * 7 and all(len(t.shape) == 2 and t.axis == 1 for t in quantized.values())
    assert sorted(r.layers) == sorted(n.removesuffix(".weight") for n in quantized)
    assert r.skipped == ()
    assert set(r.omitted_plain) == set(tensors) - set(quantized)
    assert "model.embed_tokens.weight" in r.omitted_plain and "model.norm.weight" in r.omitted_plain
    # graph interface: x.<layer> [batch, K] -> y.<layer> [batch, N]
    dims = lambda vi: [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]  # noqa: E731
    ins = {i.name: dims(i) for i in m.graph.input}
    outs = {o.name: dims(o) for o in m.graph.output}
    for n, qt in quantized.items():
        lay = n.removesuffix(".weight")
        assert ins[f"x.{lay}"] == ["batch", qt.shape[1]] and outs[f"y.{lay}"] == ["batch", qt.shape[0]]
    assert len(ins) == len(outs) == len(quantized)
    # the weights live in the external data file; model.onnx is only the graph
    assert r.data is not None and r.data.stat().st_size > 50_000_000 and r.model.stat().st_size < 1_000_000
    meta = {p.key: p.value for p in m.metadata_props}
    export = json.loads(meta["fp4fmt.onnx_export"])
    assert export["scale_format"] == scale_format and len(export["layers"]) == len(quantized)
    assert json.loads(meta["fp4fmt.quantization_config"])["scheme"] == scheme
    first = export["layers"][0]
    assert first["scheme"] == scheme and first["dtype"] == "BF16" and first["bias"] is False


@pytest.mark.parametrize("scheme", SCHEMES)
def test_smollm2_codes_and_scales_are_copied_byte_exactly(exports, smollm2_fp4, scheme):
    r = exports[scheme, "native"]
    m = onnx.load(str(r.model))  # loads the external data
    inits = {t.name: t for t in m.graph.initializer}
    for n, qt in checkpoint_tensors(smollm2_fp4[scheme]).items():
        if not isinstance(qt, fp4fmt.QTensor):
            assert n not in inits
            continue
        codes, scales = inits[f"{n}.codes"], inits[f"{n}.scales"]
        assert codes.data_type == TP.FLOAT4E2M1 and list(codes.dims) == list(qt.shape)
        assert raw(codes) == qt.codes.tobytes()  # K is a multiple of the block: no repacking
        assert scales.data_type == EXPECTED_SCALE_TYPE[scheme, "native"]
        assert list(scales.dims) == list(qt.scales.shape) and raw(scales) == qt.scales.tobytes()
        if scheme == "nvfp4":
            ts = numpy_helper.to_array(inits[f"{n}.tensor_scale"])
            assert ts.shape == () and ts.dtype == np.float32 and ts.tobytes() == np.float32(qt.tensor_scale).tobytes()
        else:
            assert f"{n}.tensor_scale" not in inits


def test_external_data_offsets_are_aligned_and_in_bounds(exports):
    r = exports["nvfp4", "native"]
    m = onnx.load(str(r.model), load_external_data=False)
    size = r.data.stat().st_size
    spans = []
    for t in m.graph.initializer:
        info = {e.key: e.value for e in t.external_data}
        if t.data_location != TP.EXTERNAL:
            assert len(t.raw_data) < ox.EXTERNAL_THRESHOLD
            continue
        assert info["location"] == ox.DATA_NAME
        off, n = int(info["offset"]), int(info["length"])
        assert n >= ox.EXTERNAL_THRESHOLD and off % (ox.ALIGN_LARGE if n > ox.ALIGN_THRESHOLD else ox.ALIGN_SMALL) == 0
        spans.append((off, off + n))
    spans.sort()
    assert spans[-1][1] <= size and all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))


LAYERS = ("model.layers.0.self_attn.q_proj", "model.layers.17.self_attn.k_proj", "model.layers.29.mlp.down_proj")


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("scale_format", FORMATS)
def test_smollm2_reference_evaluator_equals_fp4fmt(exports, smollm2_fp4, scheme, scale_format):
    r = exports[scheme, scale_format]
    rng = np.random.default_rng(7)
    with fp4fmt.safe_open(smollm2_fp4[scheme] / "model.safetensors") as f:
        for lay in LAYERS:
            qt = f.get_tensor(f"{lay}.weight")
            x = rng.standard_normal((3, qt.shape[1])).astype(np.float32)
            y, w = run_layer(r.model, lay, x)
            assert_layer_matches(y, w, qt, x)


def test_layer_model_of_a_loaded_model_and_whole_model_run(exports, smollm2_fp4):
    r = exports["nvfp4", "native"]
    loaded = onnx.load(str(r.model))
    lay = LAYERS[1]
    with fp4fmt.safe_open(smollm2_fp4["nvfp4"] / "model.safetensors") as f:
        qt = f.get_tensor(f"{lay}.weight")
    x = np.linspace(-1, 1, 2 * 576, dtype=np.float32).reshape(2, 576)
    y, w = run_layer(loaded, lay, x)
    assert_layer_matches(y, w, qt, x)
    with pytest.raises(FP4FmtError, match="no exported layer"):
        ox.layer_model(loaded, "model.layers.0.nonexistent")
    with pytest.raises(FP4FmtError, match="external data is not loaded"):
        ox.layer_model(onnx.load(str(r.model), load_external_data=False), lay)


# ----------------------------------------------------------------------------------------------------------
# a synthetic checkpoint: ragged K, odd K, K < B, a bias, swizzled scales, tensors that are not linear layers


def make_checkpoint(d: Path, scheme: str) -> dict:
    rng = np.random.default_rng(3)
    t = {
        "a.weight": fp4fmt.quantize(rng.standard_normal((6, 40)).astype(ml_dtypes.bfloat16), scheme),
        "a.bias": rng.standard_normal(6).astype(ml_dtypes.bfloat16),
        "b.weight": fp4fmt.quantize(rng.standard_normal((5, 33)).astype(np.float32), scheme),
        "c.weight": fp4fmt.quantize(rng.standard_normal((3, 7)).astype(np.float32) * 1e-3, scheme),
        "d.weight": fp4fmt.quantize(rng.standard_normal((130, 80)).astype(np.float32), scheme, scale_layout="swizzled"),
        "e.experts": fp4fmt.quantize(rng.standard_normal((2, 4, 32)).astype(np.float32), scheme),
        "f.weight": fp4fmt.quantize(rng.standard_normal((32, 5)).astype(np.float32), scheme, axis=0),
        "norm.weight": np.ones(8, np.float32),
    }
    d.mkdir(parents=True)
    fp4fmt.save_file(t, d / "model.safetensors")
    sch = fp4fmt.SCHEMES[scheme]
    qc = {"quant_method": "fp4fmt", "format_version": fp4fmt.FORMAT_VERSION, "scheme": scheme,
          "block_size": sch.block_size, "scale_rule": sch.default_rule, "fused_tensor_scales": False, "ignore": [],
          "producer": {"name": "fp4fmt", "version": fp4fmt.__version__}}
    (d / "config.json").write_text(json.dumps({"model_type": "toy", "quantization_config": qc}))
    return t


def tree_digest(d: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(d.rglob("*")):
        h.update(f.name.encode() + (f.read_bytes() if f.is_file() else b"/"))
    return h.hexdigest()


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("scale_format", FORMATS)
def test_synthetic_ragged_layers(tmp_path, scheme, scale_format):
    src = tmp_path / "src"
    t = make_checkpoint(src, scheme)
    before = tree_digest(src)
    seen = []
    r = ox.export_checkpoint(src, tmp_path / "out", scale_format=scale_format, progress=lambda *a: seen.append(a))
    assert tree_digest(src) == before  # the source is only read
    assert seen[-1] == ("export", len(t), len(t)) and [s[1] for s in seen] == list(range(1, len(t) + 1))
    onnx.checker.check_model(str(r.model), full_check=True)
    assert sorted(r.layers) == ["a", "b", "c", "d"]
    assert dict(r.skipped).keys() == {"e.experts", "f.weight"}
    assert "rank 3" in dict(r.skipped)["e.experts"] and "axis 0" in dict(r.skipped)["f.weight"]
    assert r.omitted_plain == ("norm.weight",)  # a.bias is used by layer a
    m = onnx.load(str(r.model))
    inits = {i.name: i for i in m.graph.initializer}
    rng = np.random.default_rng(11)
    for lay in r.layers:
        qt = t[f"{lay}.weight"]
        n, k = qt.shape
        codes = inits[f"{lay}.weight.codes"]
        assert codes.data_type == TP.FLOAT4E2M1 and list(codes.dims) == [n, k]
        assert raw(codes) == onnx_packed(qt) and len(raw(codes)) == (n * k + 1) // 2
        sc = inits[f"{lay}.weight.scales"]
        assert sc.data_type == EXPECTED_SCALE_TYPE[scheme, scale_format] and list(sc.dims) == [n, -(-k // qt.block_size)]
        if scale_format == "native":  # swizzled scales are exported in the linear layout
            assert raw(sc) == qt.scale_codes().tobytes()
        bias = t.get(f"{lay}.bias")
        x = rng.standard_normal((4, k)).astype(np.float32)
        y, w = run_layer(r.model, lay, x)
        assert_layer_matches(y, w, qt, x, bias)
    layers = {e["layer"]: e for e in json.loads({p.key: p.value for p in m.metadata_props}["fp4fmt.onnx_export"])["layers"]}
    assert layers["a"]["bias"] is True and layers["a"]["dtype"] == "BF16" and layers["d"]["scale_layout"] == "swizzled"
    assert layers["b"]["shape"] == [5, 33] and layers["b"]["scheme"] == scheme


def test_export_errors(tmp_path):
    src = tmp_path / "src"
    make_checkpoint(src, "nvfp4")
    with pytest.raises(FP4FmtError, match="fp4fmt quantization_config"):
        (tmp_path / "plain").mkdir()
        (tmp_path / "plain" / "config.json").write_text("{}")
        ox.export_checkpoint(tmp_path / "plain", tmp_path / "o1")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("x")
    with pytest.raises(FP4FmtError, match="not empty"):
        ox.export_checkpoint(src, tmp_path / "busy")
    assert (tmp_path / "busy" / "keep.txt").read_text() == "x"
    with pytest.raises(FP4FmtError, match="scale_format"):
        ox.export_checkpoint(src, tmp_path / "o2", scale_format="bf16")
    assert not (tmp_path / "o2").exists()
    for bad_dst in (src, src / "onnx", tmp_path):
        with pytest.raises(FP4FmtError, match="must not be the source"):
            ox.export_checkpoint(src, bad_dst, overwrite=True)
    assert (src / "model.safetensors").is_file() and not (src / "onnx").exists()
    r = ox.export_checkpoint(src, tmp_path / "busy", overwrite=True)
    assert not (tmp_path / "busy" / "keep.txt").exists() and r.model.is_file()
    nothing = tmp_path / "nothing"
    nothing.mkdir()
    fp4fmt.save_file({"e": fp4fmt.quantize(np.ones((2, 2, 32), np.float32), "mxfp4")}, nothing / "model.safetensors")
    (nothing / "config.json").write_text((src / "config.json").read_text())
    with pytest.raises(FP4FmtError, match="no quantized 2-D") as e:
        ox.export_checkpoint(nothing, tmp_path / "o3")
    assert "rank 3" in str(e.value) and not (tmp_path / "o3").exists()


# ----------------------------------------------------------------------------------------------------------
# one layer in memory: arbitrary codes and scales decode exactly


@st.composite
def qtensors(draw):
    scheme = draw(st.sampled_from(SCHEMES))
    n = draw(st.integers(1, 5))
    k = draw(st.integers(1, 70))
    b = fp4fmt.SCHEMES[scheme].block_size
    nb = -(-k // b)
    codes = np.frombuffer(draw(st.binary(min_size=n * nb * b // 2, max_size=n * nb * b // 2)), np.uint8)
    codes = codes.reshape(n, nb * b // 2)  # padding nibbles arbitrary too: the export must drop them
    if scheme == "nvfp4":
        sc = np.array(draw(st.lists(st.integers(0, 0x7E), min_size=n * nb, max_size=n * nb)), np.uint8)
        ts = draw(st.floats(min_value=2.0 ** -149, max_value=2.0**116, width=32, allow_subnormal=True))
        return fp4fmt.QTensor("nvfp4", (n, k), codes, sc.reshape(n, nb).view(ml_dtypes.float8_e4m3fn), np.float32(ts))
    # E8M0 up to 2^125: 6 * 2^125 is the largest that cannot overflow float32
    sc = np.array(draw(st.lists(st.integers(0, 252), min_size=n * nb, max_size=n * nb)), np.uint8)
    return fp4fmt.QTensor("mxfp4", (n, k), codes, sc.reshape(n, nb))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(qt=qtensors(), scale_format=st.sampled_from(FORMATS), seed=st.integers(0, 2**32 - 1))
def test_any_tensor_decodes_bit_exactly(qt, scale_format, seed):
    m = ox.quantized_linear_model(qt, "w", scale_format=scale_format)
    onnx.checker.check_model(m, full_check=True)
    amax = float(np.abs(fp4fmt.dequantize(qt)).max())
    x = np.random.default_rng(seed).standard_normal((2, qt.shape[1])).astype(np.float32)
    if amax > 1:  # keep x @ W.T finite
        x = (x / np.float32(amax) / np.float32(qt.shape[1])).astype(np.float32)
    y, w = ReferenceEvaluator(m).run(None, {"x.w": x})
    assert_layer_matches(y, w, qt, x)


def test_nvfp4_factor_is_rounded_before_the_element_product():
    """The graph computes fl32(E2M1 × fl32(E4M3 × s2)) (§5.3), not fl32(fl32(E2M1 × E4M3) × s2): find blocks
    where the two differ and check the export gives the first."""
    ts = np.float32(0.0037202381)  # the tensor scale of the spec's worked example (§5.1)
    e4m3 = np.arange(1, 0x7F, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    spec = np.float32(3) * (e4m3 * ts)
    naive = (np.float32(3) * e4m3) * ts
    diff = np.flatnonzero(bits(spec) != bits(naive)) + 1  # scale codes where the orders disagree
    assert diff.size >= 4
    nb = diff.size
    codes = np.full((1, nb * 8), 0x55, np.uint8)  # every element E2M1 0x5 = 3
    qt = fp4fmt.QTensor("nvfp4", (1, nb * 16), codes, diff.astype(np.uint8).reshape(1, nb).view(ml_dtypes.float8_e4m3fn), ts)
    _, w = ReferenceEvaluator(ox.quantized_linear_model(qt, "w")).run(None, {"x.w": np.zeros((1, nb * 16), np.float32)})
    np.testing.assert_array_equal(bits(w[0, ::16]), bits(spec[diff - 1]))
    assert (bits(w[0, ::16]) != bits(naive[diff - 1])).all()


def test_bias_and_single_layer_model_checks():
    rng = np.random.default_rng(5)
    qt = fp4fmt.quantize(rng.standard_normal((4, 24)).astype(np.float32), "mxfp4")
    bias = rng.standard_normal(4).astype(np.float16)
    m = ox.quantized_linear_model(qt, "lin.weight", bias=bias)
    assert [nd.op_type for nd in m.graph.node] == ["DequantizeLinear", "Gemm"]
    x = rng.standard_normal((3, 24)).astype(np.float32)
    y, w = ReferenceEvaluator(m).run(None, {"x.lin": x})
    assert_layer_matches(y, w, qt, x, bias)
    with pytest.raises(FP4FmtError, match="bias must be"):
        ox.quantized_linear_model(qt, bias=np.zeros(5, np.float32))
    with pytest.raises(FP4FmtError, match="rank 3"):
        ox.quantized_linear_model(fp4fmt.quantize(np.ones((2, 2, 32), np.float32), "nvfp4"))
    with pytest.raises(FP4FmtError, match="axis 0"):
        ox.quantized_linear_model(fp4fmt.quantize(np.ones((32, 2), np.float32), "nvfp4", axis=0))


@pytest.mark.parametrize(("scheme", "bad", "match"), [
    ("nvfp4", 0x7F, "not NaN"), ("nvfp4", 0x80, "non-negative"), ("mxfp4", 0xFF, "0xFF"),
])
def test_forbidden_scale_codes_are_refused(scheme, bad, match):
    qt = fp4fmt.quantize(np.ones((2, 32), np.float32), scheme)
    sc = qt.scales.view(np.uint8).copy()
    sc[1, 0] = bad
    qt = fp4fmt.QTensor(scheme, qt.shape, qt.codes, sc.view(qt.scales.dtype), qt.tensor_scale)
    with pytest.raises(FP4FmtError, match=match) as e:
        ox.quantized_linear_model(qt, "bad.weight")
    assert e.value.tensor == "bad.weight"


def test_overflow_is_refused_only_where_a_value_overflows():
    sc = np.array([[0xFE]], np.uint8)  # 2^127
    small = fp4fmt.QTensor("mxfp4", (1, 32), np.full((1, 16), 0x11, np.uint8), sc)  # 0.5 · 2^127: finite
    m = ox.quantized_linear_model(small, "w")
    _, w = ReferenceEvaluator(m).run(None, {"x.w": np.zeros((1, 32), np.float32)})
    assert (w == np.float32(2.0**126)).all()
    big = fp4fmt.QTensor("mxfp4", (1, 32), np.full((1, 16), 0x17, np.uint8), sc)  # 6 · 2^127 = inf
    with pytest.raises(FP4FmtError, match="overflow"):
        ox.quantized_linear_model(big, "w")
    huge_ts = fp4fmt.QTensor("nvfp4", (1, 16), np.full((1, 8), 0x77, np.uint8),
                             np.array([[0x7E]], np.uint8).view(ml_dtypes.float8_e4m3fn), np.float32(3e38))
    with pytest.raises(FP4FmtError, match="overflow"):
        ox.quantized_linear_model(huge_ts, "w")
