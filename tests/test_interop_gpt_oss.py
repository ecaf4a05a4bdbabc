"""fp4fmt <-> the Hugging Face gpt-oss MXFP4 layout: ``converters/interop/gpt_oss.py``.

What these tests establish:

1. **transformers reads the export exactly.** A small gpt-oss model (transformers' own ``GptOssForCausalLM``,
   2 layers, 4 experts, random BF16 weights) converted by ``fp4fmt convert --scheme mxfp4`` (attention kept)
   and exported: transformers 5's ``convert_moe_packed_tensors`` (its CPU MXFP4 dequantization) turns every
   ``*_blocks`` / ``*_scales`` pair into the float32 bit patterns of ``fp4fmt.dequantize``; and
   ``GptOssForCausalLM.from_pretrained(export, Mxfp4Config(dequantize=True))`` loads the folder unmodified,
   with no missing, unexpected or mismatched key, expert parameters bit-identical to fp4fmt's decoding, and
   the same logits as fp4fmt's own runtime (``fp4fmt.torch.from_pretrained``) on the fp4fmt checkpoint.
2. **fp4fmt -> gpt-oss -> fp4fmt** gives back every file byte for byte.
3. **gpt-oss -> fp4fmt -> gpt-oss** on a checkpoint in the released layout (random block bytes and scale
   exponents, not produced by fp4fmt; the released ``modules_to_not_convert`` wildcards) gives back every
   file byte for byte, and the import decodes to what transformers decodes from the source.
4. **Synthetic MoE tensors** ``[E, N, K]`` quantized by ``fp4fmt.quantize`` (blocked along K, i.e. axis 2,
   with the ``rceil`` rule; and ``[E, K, N]`` along axis 1 with ``even``; swizzled scales): blocks and
   scales are fp4fmt's bytes, the descriptor fields gpt-oss cannot hold travel in the shard metadata, and
   the round trip is byte-identical; a hypothesis property does the same for random tensors.
5. 2-D tensors: refused by default (transformers reads only experts), written in the blocks layout with
   ``dense="blocks"`` and round-tripped.
6. Bad input is refused with an fp4fmt error naming the file and tensor: NVFP4, a padded length, experts
   blocked along axis 0, experts half quantized, E8M0 0xFF, blocks without scales or with the wrong shape,
   another quant_method, a destination inside the source; ``detect`` recognises the layout.
"""

from __future__ import annotations

import filecmp
import json
import warnings
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open as st_open
from safetensors.torch import save_file as st_save_file

import fp4fmt
from fp4fmt.converters.checkpoint import Options, convert_checkpoint
from fp4fmt.converters.interop import gpt_oss
from fp4fmt.converters.plan import DEFAULT_IGNORE
from fp4fmt.errors import FP4FmtError


with warnings.catch_warnings():  # the repo root is off sys.path: tests/conftest.py
    warnings.simplefilter("ignore")
    from transformers import GptOssConfig, GptOssForCausalLM, Mxfp4Config
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

EXPERTS = ("gate_up_proj", "down_proj")
RELEASED_SKIP = ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]


def same_bits(a, b) -> bool:
    a, b = np.ascontiguousarray(a, np.float32), np.ascontiguousarray(b, np.float32)
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


def dir_identical(a: Path, b: Path) -> list[str]:
    """Files that differ or exist on one side only (empty: the folders are byte-identical)."""
    names_a = {p.relative_to(a) for p in a.rglob("*") if p.is_file()}
    names_b = {p.relative_to(b) for p in b.rglob("*") if p.is_file()}
    bad = sorted(str(n) for n in names_a ^ names_b)
    bad += sorted(str(n) for n in names_a & names_b if not filecmp.cmp(a / n, b / n, shallow=False))
    return bad


def read_st(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a plain safetensors file, through torch (BF16 as ml_dtypes)."""
    out = {}
    with st_open(str(path), framework="pt") as f:
        for n in f.keys():
            t = f.get_tensor(n)
            out[n] = t.view(torch.uint16).numpy().view(ml_dtypes.bfloat16) if t.dtype == torch.bfloat16 else t.numpy()
    return out


def transformers_decode(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """transformers' own CPU MXFP4 dequantization of a gpt-oss blocks/scales pair ([E, K, N] out)."""
    return convert_moe_packed_tensors(torch.from_numpy(np.array(blocks)), torch.from_numpy(np.array(scales)),
                                      dtype=torch.float32).numpy()


def fp4_dir(path: Path, tensors: dict, ignore: list[str], scale_rule: str = "floor") -> Path:
    """A one-shard fp4fmt MXFP4 checkpoint folder, config.json as ``fp4fmt convert`` writes it."""
    path.mkdir(parents=True, exist_ok=True)
    fp4fmt.save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    cfg = {"model_type": "gpt_oss", "dtype": "bfloat16", "quantization_config": {
        "block_size": 32, "format_version": "1.0", "fused_tensor_scales": False, "ignore": ignore,
        "producer": {"name": "fp4fmt", "version": fp4fmt.__version__}, "quant_method": "fp4fmt",
        "scale_rule": scale_rule, "scheme": "mxfp4"}}
    (path / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return path


# ------------------------------------------------------------------------------------------------------
# fixtures: a small gpt-oss model, converted and exported


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """torch on one thread: its OpenMP workers spin-wait when another process holds the second core."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gpt_oss")


@pytest.fixture(scope="module")
def tiny_bf16(work: Path) -> Path:
    cfg = GptOssConfig(hidden_size=64, intermediate_size=96, num_local_experts=4, num_experts_per_tok=2,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=128,
                       max_position_embeddings=256, layer_types=["sliding_attention", "full_attention"],
                       sliding_window=16)
    torch.manual_seed(0)
    model = GptOssForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.copy_(torch.randn_like(p) * (0.5 if "experts" in name else 0.05))
        model.model.layers[0].mlp.experts.down_proj[0, :32, :] = 0.0  # some all-zero blocks
    model.to(torch.bfloat16).save_pretrained(work / "bf16")
    return work / "bf16"


@pytest.fixture(scope="module")
def converted(tiny_bf16: Path, work: Path) -> Path:
    convert_checkpoint(tiny_bf16, work / "fp4", Options(scheme="mxfp4", ignore=DEFAULT_IGNORE + (r"\.self_attn\.",)))
    return work / "fp4"


@pytest.fixture(scope="module")
def exported(converted: Path, work: Path) -> Path:
    report = gpt_oss.export_checkpoint(converted, work / "oss")
    assert report.quantized == 4
    return work / "oss"


# ------------------------------------------------------------------------------------------------------
# 1-2


def test_transformers_dequantization_is_bit_identical(converted: Path, exported: Path) -> None:
    ours = fp4fmt.load_file(converted / "model.safetensors")
    theirs = read_st(exported / "model.safetensors")
    quantized = sorted(n for n, v in ours.items() if isinstance(v, fp4fmt.QTensor))
    assert quantized == [f"model.layers.{i}.mlp.experts.{p}" for i in range(2) for p in ("down_proj", "gate_up_proj")]
    for name in quantized:
        qt = ours[name]
        assert qt.axis == 1 and qt.scale_rule == "floor"
        blocks, scales = theirs.pop(name + "_blocks"), theirs.pop(name + "_scales")
        e, k, n = qt.shape
        assert blocks.dtype == np.uint8 and blocks.shape == (e, n, k // 32, 16)
        assert scales.dtype == np.uint8 and scales.shape == (e, n, k // 32)
        assert same_bits(transformers_decode(blocks, scales), fp4fmt.dequantize(qt)), name
    for name, v in theirs.items():  # everything else unchanged
        assert v.dtype == ours[name].dtype and np.array_equal(v.view(np.uint8), ours[name].view(np.uint8)), name
    qc = json.loads((exported / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "mxfp4" and "lm_head" in qc["modules_to_not_convert"]
    assert not any("experts" in m for m in qc["modules_to_not_convert"])
    assert gpt_oss.detect(exported) and not gpt_oss.detect(converted)


def test_transformers_loads_the_export_unmodified(converted: Path, exported: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, info = GptOssForCausalLM.from_pretrained(exported, quantization_config=Mxfp4Config(dequantize=True),
                                                        dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ours = fp4fmt.load_file(converted / "model.safetensors")
    params = dict(model.named_parameters())
    for name, v in ours.items():
        want = fp4fmt.dequantize(v) if isinstance(v, fp4fmt.QTensor) else np.asarray(v, np.float32)
        assert same_bits(params[name].detach().numpy(), want), name

    from fp4fmt.torch import from_pretrained

    ids = torch.tensor([[3, 17, 99, 5, 64, 8]])
    with torch.no_grad():
        a = model(ids).logits
        b = from_pretrained(converted, dtype=torch.float32)(ids).logits
    assert torch.equal(a, b)


def test_fp4fmt_gpt_oss_fp4fmt_is_byte_identical(converted: Path, exported: Path, work: Path) -> None:
    gpt_oss.import_checkpoint(exported, work / "back")
    assert dir_identical(converted, work / "back") == []
    with fp4fmt.safe_open(work / "back" / "model.safetensors") as f:
        f.verify()


# ------------------------------------------------------------------------------------------------------
# 3: a checkpoint in the released layout


@pytest.fixture(scope="module")
def released(tiny_bf16: Path, work: Path) -> Path:
    """gpt-oss's released layout: experts as random block bytes and E8M0 exponents, float32 biases, the
    released modules_to_not_convert, config written as transformers writes it."""
    rng = np.random.default_rng(1)
    state = {}
    with st_open(str(tiny_bf16 / "model.safetensors"), framework="pt") as f:
        for name in f.keys():
            t = f.get_tensor(name)
            leaf = name.rsplit(".", 1)[1]
            if leaf in EXPERTS:
                e, k, n = t.shape
                state[name + "_blocks"] = torch.from_numpy(rng.integers(0, 256, (e, n, k // 32, 16), dtype=np.uint8))
                state[name + "_scales"] = torch.from_numpy(rng.integers(110, 135, (e, n, k // 32), dtype=np.uint8))
            elif leaf.endswith("_bias") and "experts" in name:
                state[name] = t.float()
            else:
                state[name] = t
    out = work / "released"
    out.mkdir()
    st_save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((tiny_bf16 / "config.json").read_text())
    cfg["quantization_config"] = {"modules_to_not_convert": RELEASED_SKIP, "quant_method": "mxfp4"}
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    (out / "generation_config.json").write_bytes((tiny_bf16 / "generation_config.json").read_bytes())
    return out


def test_gpt_oss_fp4fmt_gpt_oss_is_byte_identical(released: Path, work: Path) -> None:
    assert gpt_oss.detect(released)
    mid, again = work / "released-fp4", work / "released-again"
    report = gpt_oss.import_checkpoint(released, mid)
    assert report.quantized == 4 and report.notes
    qc = json.loads((mid / "config.json").read_text())["quantization_config"]
    assert qc["imported_from"] == {"format": "gpt-oss", "quantization_config": {
        "modules_to_not_convert": RELEASED_SKIP, "quant_method": "mxfp4"}}
    assert (qc["scheme"], qc["block_size"], qc["scale_rule"]) == ("mxfp4", 32, "floor")
    src = read_st(released / "model.safetensors")
    with fp4fmt.safe_open(mid / "model.safetensors") as f:
        f.verify()
        for name in f.descriptor.tensors:
            qt = f.get_tensor(name)
            assert qt.shape == tuple(f.tensor_descriptor(name).shape) and qt.axis == 1 and qt.dtype == "BF16"
            want = transformers_decode(src[name + "_blocks"], src[name + "_scales"])
            assert same_bits(fp4fmt.dequantize(qt), want), name
    gpt_oss.export_checkpoint(mid, again)
    assert dir_identical(released, again) == []


# ------------------------------------------------------------------------------------------------------
# 4: synthetic MoE tensors


def test_synthetic_moe_tensors(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    x_enk = rng.standard_normal((3, 40, 96)).astype(np.float32) * 3.0
    x_ekn = rng.standard_normal((2, 64, 24)).astype(ml_dtypes.bfloat16)
    t = {
        "model.layers.0.mlp.experts.gate_up_proj": fp4fmt.quantize(x_enk, "mxfp4", axis=2, scale_rule="rceil"),
        "model.layers.0.mlp.experts.down_proj": fp4fmt.quantize(x_ekn, "mxfp4", axis=1, scale_rule="even",
                                                                scale_layout="swizzled"),
        "model.layers.0.mlp.experts.down_proj_bias": np.zeros((2, 24), np.float32),
    }
    src = fp4_dir(tmp_path / "src", t, ["model.layers.0.mlp.experts"])
    out = tmp_path / "oss"
    gpt_oss.export_checkpoint(src, out)
    theirs = read_st(out / "model.safetensors")
    gu, dp = t["model.layers.0.mlp.experts.gate_up_proj"], t["model.layers.0.mlp.experts.down_proj"]
    assert np.array_equal(theirs["model.layers.0.mlp.experts.gate_up_proj_blocks"], gu.codes.reshape(3, 40, 3, 16))
    assert np.array_equal(theirs["model.layers.0.mlp.experts.gate_up_proj_scales"], gu.scales)
    assert np.array_equal(theirs["model.layers.0.mlp.experts.down_proj_scales"], dp.scale_codes())
    # transformers returns [E, K, N]: the axis-2 tensor comes back transposed, the axis-1 one as it is
    assert same_bits(transformers_decode(theirs["model.layers.0.mlp.experts.gate_up_proj_blocks"],
                                         theirs["model.layers.0.mlp.experts.gate_up_proj_scales"]),
                     fp4fmt.dequantize(gu).transpose(0, 2, 1))
    assert same_bits(transformers_decode(theirs["model.layers.0.mlp.experts.down_proj_blocks"],
                                         theirs["model.layers.0.mlp.experts.down_proj_scales"]), fp4fmt.dequantize(dp))
    with st_open(str(out / "model.safetensors"), framework="pt") as f:
        hints = json.loads(f.metadata()[gpt_oss.HINTS_KEY])
    assert hints == {"model.layers.0.mlp.experts.down_proj": {"scale_layout": "swizzled", "scale_rule": "even"},
                     "model.layers.0.mlp.experts.gate_up_proj": {"axis": 2, "dtype": "F32", "scale_rule": "rceil"}}
    assert json.loads((out / "config.json").read_text())["quantization_config"]["modules_to_not_convert"] == ["lm_head"]
    gpt_oss.import_checkpoint(out, tmp_path / "back")
    assert dir_identical(src, tmp_path / "back") == []


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_round_trip_property(tmp_path_factory, data) -> None:
    """fp4fmt -> gpt-oss -> fp4fmt is byte-identical, and the blocks are fp4fmt's codes, for random MoE
    tensors (any E, N, K = 32 * blocks, axis 1 or 2, every scale rule, source dtype and scale layout)."""
    tmp = tmp_path_factory.mktemp("prop")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    e, n, nb = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 40)), data.draw(st.integers(1, 3))
    axis = data.draw(st.sampled_from([1, 2]))
    shape = (e, nb * 32, n) if axis == 1 else (e, n, nb * 32)
    x = (rng.standard_normal(shape) * 10.0 ** rng.integers(-3, 4)).astype(
        data.draw(st.sampled_from([np.float32, ml_dtypes.bfloat16, np.float16])))
    rule = data.draw(st.sampled_from(["floor", "rceil", "even"]))
    qt = fp4fmt.quantize(x, "mxfp4", axis=axis, scale_rule=rule,
                         scale_layout=data.draw(st.sampled_from(["linear", "swizzled"])))
    src = fp4_dir(tmp / "src", {"m.experts.down_proj": qt}, [], scale_rule=rule)
    gpt_oss.export_checkpoint(src, tmp / "oss")
    theirs = read_st(tmp / "oss" / "model.safetensors")
    assert np.array_equal(theirs["m.experts.down_proj_blocks"].reshape(qt.codes.shape), qt.codes)
    assert np.array_equal(theirs["m.experts.down_proj_scales"], qt.scale_codes())
    gpt_oss.import_checkpoint(tmp / "oss", tmp / "back")
    assert dir_identical(src, tmp / "back") == []


# ------------------------------------------------------------------------------------------------------
# 5: 2-D tensors


def test_dense_tensors(tmp_path: Path) -> None:
    x = np.random.default_rng(4).standard_normal((24, 64)).astype(np.float32)
    src = fp4_dir(tmp_path / "src", {"a.weight": fp4fmt.quantize(x, "mxfp4")}, [])
    with pytest.raises(FP4FmtError, match="dense='blocks'") as e:
        gpt_oss.export_checkpoint(src, tmp_path / "out")
    assert e.value.tensor == "a.weight" and not (tmp_path / "out").exists()
    gpt_oss.export_checkpoint(src, tmp_path / "out", dense="blocks")
    theirs = read_st(tmp_path / "out" / "model.safetensors")
    assert sorted(theirs) == ["a.weight_blocks", "a.weight_scales"] and theirs["a.weight_blocks"].shape == (24, 2, 16)
    gpt_oss.import_checkpoint(tmp_path / "out", tmp_path / "back")
    assert dir_identical(src, tmp_path / "back") == []


# ------------------------------------------------------------------------------------------------------
# 6: refusals


@pytest.mark.parametrize("case,match", [
    ("nvfp4", "MXFP4 only"),
    ("padded", "multiple of 32"),
    ("axis0", "axis 0"),
    ("half", "all MXFP4 or all unquantized"),
    ("inside", "inside the source"),
    ("policy", "dense must be"),
])
def test_export_refusals(tmp_path: Path, case: str, match: str) -> None:
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 64, 40)).astype(np.float32)
    t = {"nvfp4": {"m.experts.gate_up_proj": fp4fmt.quantize(x, "nvfp4", axis=1)},
         "padded": {"m.experts.gate_up_proj": fp4fmt.quantize(x, "mxfp4", axis=2)},
         "axis0": {"m.experts.gate_up_proj": fp4fmt.quantize(x[:, :32, :4].transpose(1, 0, 2), "mxfp4", axis=0)},
         "half": {"m.experts.gate_up_proj": fp4fmt.quantize(x, "mxfp4", axis=1), "m.experts.down_proj": x},
         "inside": {"m.experts.gate_up_proj": fp4fmt.quantize(x, "mxfp4", axis=1)},
         "policy": {"m.experts.gate_up_proj": fp4fmt.quantize(x, "mxfp4", axis=1)}}[case]
    src = fp4_dir(tmp_path / "src", t, [])
    dst = src / "sub" if case == "inside" else tmp_path / "out"
    with pytest.raises(FP4FmtError, match=match) as e:
        gpt_oss.export_checkpoint(src, dst, dense="nope" if case == "policy" else "error")
    if case not in ("inside", "policy"):
        assert e.value.tensor == "m.experts.gate_up_proj" and e.value.file.endswith("model.safetensors")
    assert not dst.exists()


def _released_like(path: Path, state: dict, quant_method: str = "mxfp4") -> Path:
    path.mkdir()
    st_save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps({"model_type": "gpt_oss", "quantization_config": {
        "modules_to_not_convert": ["lm_head"], "quant_method": quant_method}}, indent=2, sort_keys=True) + "\n")
    return path


@pytest.mark.parametrize("case,match", [
    ("nan_scale", "0xFF"),
    ("no_scales", "without"),
    ("bad_scales", "expected U8"),
    ("method", "quant_method"),
])
def test_import_refusals(tmp_path: Path, case: str, match: str) -> None:
    blocks = torch.zeros(2, 8, 2, 16, dtype=torch.uint8)
    scales = torch.full((2, 8, 2), 127, dtype=torch.uint8)
    state = {"nan_scale": {"x_blocks": blocks, "x_scales": scales.clone().index_fill_(2, torch.tensor([1]), 255)},
             "no_scales": {"x_blocks": blocks},
             "bad_scales": {"x_blocks": blocks, "x_scales": torch.zeros(2, 8, dtype=torch.uint8)},
             "method": {"x_blocks": blocks, "x_scales": scales}}[case]
    src = _released_like(tmp_path / "src", state, "fp8" if case == "method" else "mxfp4")
    with pytest.raises(FP4FmtError, match=match) as e:
        gpt_oss.import_checkpoint(src, tmp_path / "out")
    assert e.value.file is not None and not (tmp_path / "out").exists()
    assert not gpt_oss.detect(src) if case == "method" else gpt_oss.detect(src)


def test_detect_garbage(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("[1, 2")
    assert not gpt_oss.detect(tmp_path) and not gpt_oss.detect(tmp_path / "missing")
