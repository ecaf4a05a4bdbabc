"""fp4fmt.torch: zero-copy QTensor <-> torch, torch decoding, FP4Linear and from_pretrained.

What these tests establish:

* ``to_torch`` shares memory with the QTensor (same addresses) and ``from_torch`` gives back the same bytes;
  scales come out as float8_e4m3fn / float8_e8m0fnu whose float values are those of the spec's tables;
* torch decoding equals ``fp4fmt.dequantize`` bit for bit (float32), for both schemes, ragged K, every code;
* ``FP4Linear`` computes ``x @ W.T + b`` against a float64 reference, tile by tile or cached, from linear or
  swizzled scales, and holds only the packed bytes;
* ``from_pretrained`` on the converted SmolLM2 builds the transformers model with 210 FP4Linear layers whose
  logits equal those of the BF16 model with its weights replaced by ``fp4fmt.dequantize`` of the same file,
  and it still answers the capital-of-France prompt; bad directories get fp4fmt errors.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st

import fp4fmt
import fp4fmt.torch as ft
from fp4fmt import FP4FmtError, FormatError
from fp4fmt.converters.checkpoint import Options, convert_checkpoint

SCHEMES = ("nvfp4", "mxfp4")


def random_weight(rng: np.random.Generator, n: int, k: int, dtype=np.float32) -> np.ndarray:
    """Student-t weights (heavy tails) with a few zero rows and a row scaled far down."""
    w = rng.standard_t(4, (n, k)).astype(np.float32)
    if n > 2:
        w[0] = 0.0
        w[1] *= 2.0**-20
    return w.astype(dtype)


@st.composite
def qtensors(draw) -> fp4fmt.QTensor:
    scheme = draw(st.sampled_from(SCHEMES))
    n, k = draw(st.integers(1, 40)), draw(st.integers(1, 150))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    dtype = draw(st.sampled_from([np.float32, ml_dtypes.bfloat16]))
    layout = draw(st.sampled_from(["linear", "swizzled"]))
    return fp4fmt.quantize(random_weight(rng, n, k, dtype), scheme, scale_layout=layout)


# ------------------------------------------------------------------------------------------------------
# conversion and decoding


@settings(max_examples=60, deadline=None)
@given(qt=qtensors())
def test_to_torch_is_zero_copy_and_round_trips(qt: fp4fmt.QTensor) -> None:
    parts = ft.to_torch(qt)
    assert parts["codes"].dtype == torch.uint8 and parts["codes"].data_ptr() == qt.codes.ctypes.data
    assert parts["scales"].data_ptr() == qt.scales.ctypes.data
    want = torch.float8_e4m3fn if qt.scheme == "nvfp4" else torch.float8_e8m0fnu
    assert parts["scales"].dtype == want
    # the float8 values torch reads are the spec's: E4M3 via ml_dtypes, E8M0 as 2^(e-127)
    got = parts["scales"].to(torch.float32).numpy()
    if qt.scheme == "nvfp4":
        ref = qt.scales.astype(np.float32)
        assert ("tensor_scale" in parts) and parts["tensor_scale"].item() == float(qt.tensor_scale)
    else:
        ref = np.ldexp(1.0, qt.scales.astype(np.int64) - 127).astype(np.float32)
        assert "tensor_scale" not in parts
    np.testing.assert_array_equal(got, ref)
    back = ft.from_torch(parts["codes"], parts["scales"], parts.get("tensor_scale"), scheme=qt.scheme, shape=qt.shape,
                         dtype=qt.dtype, scale_layout=qt.scale_layout)
    assert back.codes.ctypes.data == qt.codes.ctypes.data  # zero-copy both ways
    assert back.codes.tobytes() == qt.codes.tobytes() and back.scales.tobytes() == qt.scales.tobytes()
    assert back.tensor_scale == qt.tensor_scale


@settings(max_examples=80, deadline=None)
@given(qt=qtensors())
def test_torch_decoding_equals_library_dequantize(qt: fp4fmt.QTensor) -> None:
    """Both torch-side decoders (the C accelerator on CPU, torch operations elsewhere) give the numpy reference's
    float32 bits, and bfloat16 output is those values rounded once."""
    layer = ft.FP4Linear.from_qtensor(qt, dtype=torch.float32)
    want = fp4fmt.dequantize(qt, implementation="reference")
    got = layer.weight(torch.float32).numpy()
    assert got.dtype == np.float32 and got.shape == want.shape
    assert got.view(np.uint32).tobytes() == want.view(np.uint32).tobytes()  # bit for bit, signed zeros too
    scales, ts = layer.linear_scales(), layer.tensor_scale
    by_torch = ft.dequantize(layer.codes, scales, ts, layer.in_features, implementation="torch").numpy()
    assert by_torch.view(np.uint32).tobytes() == want.view(np.uint32).tobytes()
    for impl in ("auto", "torch"):
        b16 = ft.dequantize(layer.codes, scales, ts, layer.in_features, torch.bfloat16, implementation=impl)
        assert torch.equal(b16.view(torch.int16), torch.from_numpy(want).to(torch.bfloat16).view(torch.int16))


def test_every_code_decodes_to_the_e2m1_table() -> None:
    """All 256 bytes: low nibble is element 2i, high nibble 2i+1 (spec §4.3), with unit scales."""
    codes = torch.arange(256, dtype=torch.uint8).reshape(32, 8)
    scales = torch.full((32, 1), 1.0).to(torch.float8_e4m3fn)
    w = ft.dequantize(codes, scales, torch.tensor(1.0), 16)
    table = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]
    flat = w.reshape(-1, 2)
    for b in range(256):
        assert flat[b, 0].item() == table[b & 15] and flat[b, 1].item() == table[b >> 4]
        assert np.signbit(flat[b, 0].item()) == bool(b & 8)


def test_from_torch_rejects_wrong_dtypes() -> None:
    with pytest.raises(FormatError, match="codes must be uint8"):
        ft.from_torch(torch.zeros((2, 8), dtype=torch.int32), torch.zeros((2, 1), dtype=torch.uint8), 1.0,
                      scheme="nvfp4", shape=(2, 16))
    with pytest.raises(FormatError, match="codes must be uint8 of shape"):
        ft.from_torch(torch.zeros((2, 4), dtype=torch.uint8), torch.zeros((2, 1), dtype=torch.uint8).view(
            torch.float8_e4m3fn), 1.0, scheme="nvfp4", shape=(2, 16))


# ------------------------------------------------------------------------------------------------------
# FP4Linear


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("layout", ["linear", "swizzled"])
@pytest.mark.parametrize("cache", [False, True])
def test_fp4linear_matches_float64_reference(scheme: str, layout: str, cache: bool) -> None:
    rng = np.random.default_rng(11)
    n, k = 300, 200  # N spans several tiles of 128 and a ragged one; K is not a multiple of 32
    qt = fp4fmt.quantize(random_weight(rng, n, k), scheme, scale_layout=layout)
    bias = rng.standard_normal(n).astype(np.float32)
    layer = ft.FP4Linear.from_qtensor(qt, bias, dtype=torch.float32, cache=cache, tile_rows=128)
    x = torch.from_numpy(rng.standard_normal((3, 5, k)).astype(np.float32))
    y = layer(x)
    w = fp4fmt.dequantize(qt).astype(np.float64)
    ref = x.numpy().astype(np.float64) @ w.T + bias
    assert y.shape == (3, 5, n) and y.dtype == torch.float32
    scale = np.abs(x.numpy()).astype(np.float64) @ np.abs(w).T + np.abs(bias)
    assert np.all(np.abs(y.numpy() - ref) <= 1e-5 * scale + 1e-30)
    # bf16 compute: the weight rounded once to bf16, the same as a BF16 model holding the decoded weight
    layer16 = ft.FP4Linear.from_qtensor(qt, bias, cache=cache, tile_rows=128)
    xb = x.to(torch.bfloat16)
    ref16 = torch.nn.functional.linear(xb, torch.from_numpy(fp4fmt.dequantize(qt)).to(torch.bfloat16),
                                       torch.from_numpy(bias).to(torch.bfloat16))
    torch.testing.assert_close(layer16(xb), ref16, rtol=1e-2, atol=1e-2)


def test_fp4linear_holds_only_packed_bytes_and_round_trips() -> None:
    rng = np.random.default_rng(3)
    lin = torch.nn.Linear(256, 96, bias=True, dtype=torch.bfloat16)
    layer = ft.FP4Linear.from_linear(lin, "nvfp4")
    assert layer.packed_bytes() == 96 * 128 + 96 * 16 + 4  # codes, E4M3 scales, tensor scale
    held = sum(b.numel() * b.element_size() for b in layer.buffers())
    assert held == layer.packed_bytes()
    assert {n for n, _ in layer.named_parameters()} == {"bias"}
    qt = layer.to_qtensor()
    w = lin.weight.detach().view(torch.uint16).numpy().view(ml_dtypes.bfloat16)
    ref = fp4fmt.quantize(w, "nvfp4")
    assert qt.codes.tobytes() == ref.codes.tobytes() and qt.scales.tobytes() == ref.scales.tobytes()
    x = torch.from_numpy(rng.standard_normal((4, 256)).astype(np.float32)).to(torch.bfloat16)
    assert layer(x).shape == (4, 96)
    with pytest.raises(ValueError, match="last dimension 256"):
        layer(torch.zeros(4, 255))
    sd = layer.state_dict()
    assert sd["scales"].dtype == torch.float8_e4m3fn and sd["codes"].dtype == torch.uint8


def test_fp4linear_refuses_non_linear_layouts() -> None:
    qt = fp4fmt.quantize(np.ones((4, 32, 16), np.float32), "mxfp4")
    with pytest.raises(FormatError, match="2-D weight blocked along its last axis"):
        ft.FP4Linear.from_qtensor(qt)
    qt = fp4fmt.quantize(np.ones((32, 16), np.float32), "mxfp4", axis=0)
    with pytest.raises(FormatError, match="2-D weight blocked along its last axis"):
        ft.FP4Linear.from_qtensor(qt)


# ------------------------------------------------------------------------------------------------------
# from_pretrained on the real model


@pytest.fixture(scope="module")
def converted(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("torch-smollm2")
    out = {}
    for scheme in SCHEMES:
        out[scheme] = base / scheme
        convert_checkpoint(smollm2_dir, out[scheme], Options(scheme=scheme))
    return out


def reference_model(src: Path, converted_dir: Path, dtype: torch.dtype) -> torch.nn.Module:
    """The source model with every quantized weight replaced by fp4fmt.dequantize of the converted file."""
    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=dtype).eval()
    params = dict(model.named_parameters())
    n = 0
    with fp4fmt.safe_open(converted_dir / "model.safetensors") as f, torch.no_grad():
        for name in f.descriptor.tensors:
            params[name].copy_(torch.from_numpy(fp4fmt.dequantize(f.get_tensor(name))).to(dtype))
            n += 1
    assert n == 210
    return model


@pytest.mark.parametrize("scheme", SCHEMES)
def test_from_pretrained_logits_equal_dequantized_bf16_model(smollm2_dir: Path, converted: dict, scheme: str) -> None:
    torch.manual_seed(0)
    model = ft.from_pretrained(converted[scheme])
    layers = [m for m in model.modules() if isinstance(m, ft.FP4Linear)]
    assert len(layers) == 210 and all(m.scheme == scheme for m in layers)
    assert not any(type(m) is torch.nn.Linear and m.weight.shape[0] != 49152 for m in model.modules())
    # no BF16 copy of a quantized weight anywhere: the parameters are the embedding (tied lm_head) and norms
    params = dict(model.named_parameters())
    assert all("norm" in n or n == "model.embed_tokens.weight" for n in params)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    ref = reference_model(smollm2_dir, converted[scheme], torch.bfloat16)
    ids = torch.randint(0, 49152, (2, 24))
    with torch.no_grad():
        got, want = model(ids).logits, ref(ids).logits
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=2.0**-7 * float(want.float().abs().max()))
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.95
    # float32 compute: the same comparison without BF16 rounding of activations
    model32 = ft.from_pretrained(converted[scheme], dtype=torch.float32)
    ref32 = reference_model(smollm2_dir, converted[scheme], torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(model32(ids).logits, ref32(ids).logits, rtol=1e-5, atol=1e-5)


def test_from_pretrained_model_answers_paris(converted: dict) -> None:
    path = converted["nvfp4"]
    model = ft.from_pretrained(path, cache=True)
    tok = transformers.AutoTokenizer.from_pretrained(path)
    inputs = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert "Paris" in tok.decode(out[0, inputs["input_ids"].shape[1]:])


def test_from_pretrained_errors(smollm2_dir: Path, converted: dict, tmp_path: Path) -> None:
    with pytest.raises(FP4FmtError, match="no fp4fmt quantization_config"):
        ft.from_pretrained(smollm2_dir)
    with pytest.raises(FP4FmtError, match="no config.json"):
        ft.from_pretrained(tmp_path)
    broken = tmp_path / "broken"
    shutil.copytree(converted["mxfp4"], broken)
    cfg = json.loads((broken / "config.json").read_text())
    cfg["num_hidden_layers"] = 29  # the checkpoint has a layer the model does not
    (broken / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FP4FmtError, match="model.layers.29.*no parameter in the model|no parameter.*layers.29"):
        ft.from_pretrained(broken)


def test_from_pretrained_skips_activation_scales_only(converted: dict, tmp_path: Path) -> None:
    """Activation / KV-cache scales (as modelopt W4A4 imports carry) are skipped; any other stray tensor is an error."""
    d = tmp_path / "with-scales"
    shutil.copytree(converted["nvfp4"], d)
    fp4fmt.save_file({"model.layers.0.self_attn.q_proj.input_scale": np.ones((), np.float32),
                      "model.layers.0.self_attn.k_scale": np.ones((), np.float32)}, d / "extra.safetensors")
    model = ft.from_pretrained(d)
    assert sum(isinstance(m, ft.FP4Linear) for m in model.modules()) == 210
    fp4fmt.save_file({"model.layers.0.self_attn.q_proj.smooth": np.ones(576, np.float32)}, d / "extra.safetensors")
    with pytest.raises(FP4FmtError, match="q_proj.smooth.*no parameter in the model|no parameter in the model"):
        ft.from_pretrained(d)
