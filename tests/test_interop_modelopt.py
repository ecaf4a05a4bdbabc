"""fp4fmt <-> NVIDIA modelopt unified Hugging Face checkpoints (NVFP4): ``converters/interop/modelopt.py``.

What these tests establish:

1. **Dense-weight identity.** On the converted SmolLM2-135M (all 210 NVFP4 projections), the export read
   back by a reader written here from modelopt's documented formulas (low nibble = even element, the E2M1
   table, ``fl32(E2M1 * fl32(float(weight_scale) * weight_scale_2))`` per 16-element block; no fp4fmt code)
   gives the float32 bit patterns of ``fp4fmt.dequantize``; modelopt 0.47's own ``NVFP4QTensor.dequantize``
   on CPU (four layers, to keep the test fast) gives the same values and bit patterns, except that its table
   decodes code 0x8 as +0.0 where E2M1 (and fp4fmt) say -0.0.
2. **The export is modelopt's layout.** Tensor names, dtypes and shapes are those of modelopt's
   ``_export_quantized_weight``; ``config.json["quantization_config"]`` equals what modelopt's own
   ``convert_hf_quant_config_format`` makes of the exported ``hf_quant_config.json``; weight-only
   fp4fmt gives ``W4A16_NVFP4`` and no ``input_scale``.
3. **fp4fmt -> modelopt -> fp4fmt** gives back every file of the converted SmolLM2 byte for byte (shards,
   config, side files), and ``verify()`` passes.
4. **modelopt -> fp4fmt -> modelopt** on a genuine modelopt checkpoint, built here from SmolLM2's BF16
   weights with modelopt 0.47's own ``NVFP4QTensor.quantize`` on CPU (q/k/v and gate/up
   sharing ``weight_scale_2`` as modelopt's ``preprocess_linear_fusion`` makes them), its
   ``hf_quant_config.json`` from modelopt's ``process_layer_quant_config`` and its ``quantization_config``
   from ``convert_hf_quant_config_format``, written as ``export_hf_checkpoint`` writes them; in a W4A4
   (``NVFP4`` with ``input_scale``) and a weight-only (``W4A16_NVFP4``) variant: every file comes back
   byte for byte. The imported checkpoint decodes to the values of fp4fmt's own conversion of the same
   BF16 weights (modelopt's quantizer and fp4fmt's agree up to the sign of zero), and the weight-only one
   loads in ``fp4fmt.torch.from_pretrained`` and gives the same logits as that conversion.
5. **Descriptor fields modelopt cannot hold** (a dtype other than the model's, swizzled scales, another
   quantizer) and 3-D BMM-style experts (written ``[E, in/2, out]`` as modelopt writes Llama 4 / gpt-oss
   experts) survive a round trip byte for byte; a hypothesis property does this for random tensors.
6. The plain safetensors writer gives the bytes of the ``safetensors`` library (hypothesis property).
7. Bad input is refused with an fp4fmt error naming the file and tensor: MXFP4 (modelopt documents no
   MXFP4 HF layout), padded tensors, a ``.weight`` not blocked along its last axis, FP8/other algos,
   per-expert ``weight_scale_2``, NaN scale codes, AWQ ``pre_quant_scale``, a destination inside the
   source; ``detect`` tells modelopt directories from others.
"""

from __future__ import annotations

import filecmp
import json
import shutil
import warnings
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open as st_open
from safetensors.torch import save as st_save
from safetensors.torch import save_file as st_save_file

import fp4fmt
from fp4fmt.converters.checkpoint import Options, convert_checkpoint
from fp4fmt.converters.interop import modelopt as mo
from fp4fmt.descriptor import TensorDescriptor
from fp4fmt.errors import FP4FmtError
from fp4fmt.files import StreamingWriter


with warnings.catch_warnings():  # the repo root is off sys.path: tests/conftest.py
    warnings.simplefilter("ignore")
    import modelopt
    from modelopt.torch.export.convert_hf_config import convert_hf_quant_config_format
    from modelopt.torch.export.quant_utils import process_layer_quant_config
    from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor

E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], dtype=np.float32)
LAYERS = 30  # SmolLM2-135M decoder layers
FUSED = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
         ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))
SIDE = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


# ------------------------------------------------------------------------------------------------------
# an independent reader: modelopt's documented layout and formulas, numpy and ml_dtypes only


def read_modelopt(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a modelopt safetensors file as numpy (F8_E4M3 as ml_dtypes, through torch)."""
    out = {}
    with st_open(str(path), framework="pt") as f:
        for name in f.keys():
            t = f.get_tensor(name)
            if t.dtype == torch.float8_e4m3fn:
                out[name] = t.view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn)
            elif t.dtype == torch.bfloat16:
                out[name] = t.view(torch.uint16).numpy().view(ml_dtypes.bfloat16)
            else:
                out[name] = t.numpy()
    return out


def modelopt_decode(weight: np.ndarray, weight_scale: np.ndarray, weight_scale_2: np.ndarray, axis: int) -> np.ndarray:
    """modelopt's NVFP4 dequantization: ``weight`` uint8 packed along ``axis`` (element 2i low nibble),
    ``weight_scale`` E4M3 per 16 elements along ``axis``, ``weight_scale_2`` float32; value =
    E2M1 * fl32(float(weight_scale) * weight_scale_2)."""
    w = np.moveaxis(weight, axis, -1)
    s = np.moveaxis(weight_scale, axis, -1).astype(np.float32)
    codes = np.stack([w & 0x0F, w >> 4], axis=-1).reshape(*w.shape[:-1], w.shape[-1] * 2)
    factor = s * np.float32(weight_scale_2)
    vals = E2M1[codes].reshape(*s.shape, 16) * factor[..., None]
    return np.moveaxis(vals.reshape(codes.shape), -1, axis)


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.array_equal(np.ascontiguousarray(a, np.float32).view(np.uint32),
                                                 np.ascontiguousarray(b, np.float32).view(np.uint32))


def dir_identical(a: Path, b: Path) -> list[str]:
    """Files that differ or exist on one side only (empty: the folders are byte-identical)."""
    names_a = {p.relative_to(a) for p in a.rglob("*") if p.is_file()}
    names_b = {p.relative_to(b) for p in b.rglob("*") if p.is_file()}
    bad = sorted(str(n) for n in names_a ^ names_b)
    bad += sorted(str(n) for n in names_a & names_b if not filecmp.cmp(a / n, b / n, shallow=False))
    return bad


def fp4_dir(path: Path, tensors: dict, ignore: list[str], fused: bool = True) -> Path:
    """A one-shard fp4fmt checkpoint folder, config.json as ``fp4fmt convert`` writes it (``ignore``: the
    modules with a kept float tensor of rank >= 2; ``fused``: fused projections share a tensor scale)."""
    path.mkdir(parents=True, exist_ok=True)
    fp4fmt.save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    cfg = {"model_type": "llama", "dtype": "bfloat16"}
    cfg["quantization_config"] = {"block_size": 16, "format_version": "1.0", "fused_tensor_scales": fused,
                                  "ignore": ignore, "producer": {"name": "fp4fmt", "version": fp4fmt.__version__},
                                  "quant_method": "fp4fmt", "scale_rule": "amax", "scheme": "nvfp4"}
    (path / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return path


# ------------------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """torch on one thread here: its OpenMP workers spin-wait when another process holds the second core,
    which made the modelopt quantization and the forward passes several times slower on a shared 2-core box."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("modelopt")


@pytest.fixture(scope="module")
def converted(smollm2_dir: Path, work: Path) -> Path:
    convert_checkpoint(smollm2_dir, work / "nvfp4", Options(scheme="nvfp4"))
    return work / "nvfp4"


@pytest.fixture(scope="module")
def exported(converted: Path, work: Path) -> Path:
    report = mo.export_checkpoint(converted, work / "modelopt")
    assert report.quantized == 210 and report.shards == ("model.safetensors",)
    return work / "modelopt"


def _genuine(bf16: Path, out: Path, w4a4: bool) -> Path:
    """A modelopt unified HF checkpoint of SmolLM2: weights packed by modelopt's NVFP4QTensor on CPU,
    configs by modelopt's own functions, files written as modelopt's export_hf_checkpoint writes them."""
    from safetensors.torch import load_file

    sd = load_file(str(bf16 / "model.safetensors"))
    state: dict[str, torch.Tensor] = {}
    layer_cfg: dict[str, object] = {}
    for i in range(LAYERS):
        for group in FUSED:
            mods = [f"model.layers.{i}.{m}" for m in group]
            ws = [sd.pop(m + ".weight") for m in mods]
            # preprocess_linear_fusion: one weight_scale_2 (amax over the fused group / 2688)
            s2 = torch.stack([NVFP4QTensor.get_weights_scaling_factor_2(w) for w in ws]).max()
            act = torch.tensor(3.5 + i + len(group), dtype=torch.float32) / (6.0 * 448.0)  # a calibrated input amax
            for m, w in zip(mods, ws):
                q, scale, scale_2 = NVFP4QTensor.quantize(w, 16, weights_scaling_factor_2=s2)
                state[m + ".weight"] = q._quantized_data
                state[m + ".weight_scale"] = scale
                state[m + ".weight_scale_2"] = scale_2.squeeze().clone()  # each module holds its own buffer
                if w4a4:
                    state[m + ".input_scale"] = act.squeeze().clone()
                layer_cfg[m + ".quantization"] = "nvfp4" if w4a4 else "w4a16_nvfp4"
                layer_cfg[m + ".awq_block_size"] = 16
    layer_cfg["lm_head.quantization"] = None  # lm_head has a disabled quantizer in modelopt's default configs
    layer_cfg["lm_head.awq_block_size"] = 0
    state.update(sd)  # embeddings and norms, unquantized
    hf = {"producer": {"name": "modelopt", "version": modelopt.__version__},
          "quantization": {"quant_algo": None, "kv_cache_quant_algo": None}}
    hf["quantization"].update(process_layer_quant_config(layer_cfg))
    out.mkdir()
    st_save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    with open(out / "hf_quant_config.json", "w") as f:
        json.dump(hf, f, indent=4)
    cfg = json.loads((bf16 / "config.json").read_text())
    cfg["quantization_config"] = convert_hf_quant_config_format(hf)
    with open(out / "config.json", "w") as f:
        json.dump(cfg, f, indent=4)
    for s in SIDE:
        shutil.copyfile(bf16 / s, out / s)
    return out


@pytest.fixture(scope="module")
def genuine(smollm2_dir: Path, work: Path) -> dict[str, Path]:
    return {"NVFP4": _genuine(smollm2_dir, work / "genuine-w4a4", True),
            "W4A16_NVFP4": _genuine(smollm2_dir, work / "genuine-w4a16", False)}


# ------------------------------------------------------------------------------------------------------
# 1-3: the export of the converted SmolLM2


def test_export_decodes_bit_identically_by_modelopt_formulas(converted: Path, exported: Path) -> None:
    ours = fp4fmt.load_file(converted / "model.safetensors")
    theirs = read_modelopt(exported / "model.safetensors")
    quantized = [n for n, v in ours.items() if isinstance(v, fp4fmt.QTensor)]
    assert len(quantized) == 210
    for name in quantized:
        base = name[: -len("weight")]
        got = modelopt_decode(theirs[name], theirs[base + "weight_scale"], theirs[base + "weight_scale_2"], 1)
        assert same_bits(got, fp4fmt.dequantize(ours[name])), name
    for name, v in ours.items():  # plain tensors unchanged
        if not isinstance(v, fp4fmt.QTensor):
            assert theirs[name].dtype == v.dtype and np.array_equal(theirs[name].view(np.uint8), v.view(np.uint8)), name


def test_export_decodes_bit_identically_by_modelopt_itself(converted: Path, exported: Path) -> None:
    ours = fp4fmt.load_file(converted / "model.safetensors")
    with st_open(str(exported / "model.safetensors"), framework="pt") as f:
        layers = [n for n in ours if isinstance(ours[n], fp4fmt.QTensor) and n.split(".")[2] in ("0", "1", "28", "29")]
        for name in layers:
            base = name[: -len("weight")]
            packed = f.get_tensor(name)
            shape = (packed.shape[0], packed.shape[1] * 2)
            got = NVFP4QTensor(shape, torch.float32, packed).dequantize(
                dtype=torch.float32, scale=f.get_tensor(base + "weight_scale"),
                double_scale=f.get_tensor(base + "weight_scale_2"), block_sizes={-1: 16})
            want = fp4fmt.dequantize(ours[name])
            # modelopt's table decodes code 0x8 as +0.0 (``e2m1_values[8] = 0``); fp4fmt, as E2M1 says, as -0.0
            differ = got.numpy().view(np.uint32) != want.view(np.uint32)
            assert np.array_equal(got.numpy(), want), name
            assert np.all(np.signbit(want[differ])) and not np.any(np.signbit(got.numpy()[differ])), name
            assert np.all(want[differ] == 0) and same_bits(got.numpy()[~differ], want[~differ]), name


def test_export_has_modelopt_names_shapes_and_configs(converted: Path, exported: Path) -> None:
    ours = fp4fmt.load_file(converted / "model.safetensors")
    with st_open(str(exported / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
        with fp4fmt.safe_open(converted / "model.safetensors") as g:
            assert f.metadata() == {"format": "pt", "fp4fmt_plan": g.metadata()["fp4fmt_plan"]}
        for name, v in ours.items():
            if isinstance(v, fp4fmt.QTensor):
                out_f, in_f = v.shape
                base = name[: -len("weight")]
                assert f.get_slice(name).get_dtype() == "U8" and f.get_slice(name).get_shape() == [out_f, in_f // 2]
                assert f.get_slice(base + "weight_scale").get_dtype() == "F8_E4M3"
                assert f.get_slice(base + "weight_scale").get_shape() == [out_f, in_f // 16]
                assert f.get_slice(base + "weight_scale_2").get_dtype() == "F32"
                assert f.get_slice(base + "weight_scale_2").get_shape() == []
                assert f.get_tensor(base + "weight_scale_2").item() == float(v.tensor_scale)
                names -= {name, base + "weight_scale", base + "weight_scale_2"}
            else:
                names.discard(name)
        assert names == set()  # nothing else (no input_scale: fp4fmt is weight-only)
    hf = json.loads((exported / "hf_quant_config.json").read_text())
    cfg = json.loads((exported / "config.json").read_text())
    assert hf["quantization"]["quant_algo"] == "W4A16_NVFP4" and hf["quantization"]["group_size"] == 16
    assert hf["quantization"]["exclude_modules"] == ["lm_head", "model.embed_tokens"]
    assert cfg["quantization_config"] == convert_hf_quant_config_format(hf)
    assert mo.detect(exported) and not mo.detect(converted)
    src_cfg = json.loads((converted / "config.json").read_text())
    assert {k: v for k, v in cfg.items() if k != "quantization_config"} == \
        {k: v for k, v in src_cfg.items() if k != "quantization_config"}
    for s in SIDE:
        assert filecmp.cmp(converted / s, exported / s, shallow=False)


def test_fp4fmt_modelopt_fp4fmt_is_byte_identical(converted: Path, exported: Path, work: Path) -> None:
    back = work / "back"
    report = mo.import_checkpoint(exported, back)
    assert report.quantized == 210 and report.notes == ()
    assert dir_identical(converted, back) == []
    with fp4fmt.safe_open(back / "model.safetensors") as f:
        f.verify()


# ------------------------------------------------------------------------------------------------------
# 4: a genuine modelopt checkpoint


@pytest.mark.parametrize("algo", ["NVFP4", "W4A16_NVFP4"])
def test_modelopt_fp4fmt_modelopt_is_byte_identical(genuine: dict[str, Path], work: Path, algo: str) -> None:
    src = genuine[algo]
    assert mo.detect(src)
    mid, again = work / f"imported-{algo}", work / f"again-{algo}"
    rep = mo.import_checkpoint(src, mid)
    assert rep.quantized == 7 * LAYERS
    with fp4fmt.safe_open(mid / "model.safetensors") as f:
        f.verify()
        assert set(f.descriptor.tensors) == {f"model.layers.{i}.{m}.weight" for i in range(LAYERS)
                                             for g in FUSED for m in g}
        plain = set(f.keys()) - set(f.descriptor.tensors)
    assert any(n.endswith("input_scale") for n in plain) == (algo == "NVFP4")
    qc = json.loads((mid / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "fp4fmt" and qc["scheme"] == "nvfp4" and qc["fused_tensor_scales"] is True
    assert qc["imported_from"]["hf_quant_config"] == json.loads((src / "hf_quant_config.json").read_text())
    mo.export_checkpoint(mid, again)
    assert dir_identical(src, again) == []


def test_genuine_import_decodes_like_fp4fmt_conversion(genuine: dict[str, Path], converted: Path, work: Path) -> None:
    """modelopt's NVFP4 and fp4fmt's quantizer agree on SmolLM2's weights (values equal; zero blocks store
    scale 1.0 in modelopt, -0.0 inputs code 0x0): the import carries modelopt's bytes into the same model."""
    ours = converted
    mid = work / "imported-again-W4A16_NVFP4"
    mo.import_checkpoint(genuine["W4A16_NVFP4"], mid)
    a, b = fp4fmt.load_file(ours / "model.safetensors"), fp4fmt.load_file(mid / "model.safetensors")
    assert set(a) == set(b)
    for name, v in a.items():
        if isinstance(v, fp4fmt.QTensor):
            assert np.array_equal(fp4fmt.dequantize(v), fp4fmt.dequantize(b[name])), name  # -0.0 == +0.0
            assert v.tensor_scale == b[name].tensor_scale, name
        else:
            assert np.array_equal(v.view(np.uint8), b[name].view(np.uint8)), name

    from fp4fmt.torch import from_pretrained

    ids = torch.tensor([[1, 504, 3458, 282, 4649, 30, 2]])
    with torch.no_grad():
        logits = [from_pretrained(p, dtype=torch.float32)(ids).logits for p in (ours, mid)]
    assert torch.equal(logits[0], logits[1])


# ------------------------------------------------------------------------------------------------------
# 5: fields modelopt cannot hold, BMM-style experts


def _odd_checkpoint(path: Path) -> Path:
    """An fp4fmt checkpoint with an F32-sourced tensor in a BF16 model, swizzled scales, a non-"rtn"
    quantizer, 3-D experts in the Hugging Face [E, in, out] layout (axis 1) and in [E, out, in] (axis 2)."""
    rng = np.random.default_rng(7)

    def bf16(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape, np.float32).astype(ml_dtypes.bfloat16)

    t = {
        "model.layers.0.mlp.experts.gate_up_proj": fp4fmt.quantize(bf16(3, 64, 40), "nvfp4", axis=1),
        "model.layers.0.mlp.experts.down_proj": fp4fmt.quantize(bf16(3, 64, 32), "nvfp4", axis=2),
        "model.layers.0.mlp.experts.down_proj_bias": rng.standard_normal((3, 64)).astype(np.float32),
        "model.layers.0.self_attn.q_proj.weight": fp4fmt.quantize(rng.standard_normal((48, 32), np.float32), "nvfp4"),
        "model.layers.0.self_attn.k_proj.weight": fp4fmt.quantize(bf16(130, 64), "nvfp4", scale_layout="swizzled"),
        "model.norm.weight": np.ones(32, ml_dtypes.bfloat16),
    }
    fp4_dir(path, t, ["model.layers.0.mlp.experts"], fused=False)  # q/k/v are quantized apart here
    # rewrite one tensor with quantizer "gptq" (StreamingWriter parts keep descriptor fields QTensor lacks)
    name = "model.layers.0.self_attn.v_proj.weight"
    qt = fp4fmt.quantize(bf16(16, 48), "nvfp4")
    td = TensorDescriptor(name, "nvfp4", qt.shape, "BF16", 1, "linear", "amax", "gptq")
    with StreamingWriter(path / "model-extra.safetensors", {name: td}, {"format": "pt"}) as w:
        for part, value in zip(td.part_names().values(), (qt.codes, qt.scales, np.array(qt.tensor_scale, "<f4"))):
            w.add_part(part, value)
    (path / "model.safetensors").rename(path / "model-main.safetensors")
    weight_map = {}
    for shard in ("model-extra.safetensors", "model-main.safetensors"):
        with fp4fmt.safe_open(path / shard) as f:
            weight_map.update({n: shard for n in f.stored_keys()})
    total = sum((path / s).stat().st_size for s in set(weight_map.values()))
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"fp4fmt_format_version": "1.0", "total_size": total}, "weight_map": weight_map},
        indent=2, sort_keys=True) + "\n")
    return path


def test_descriptor_fields_and_experts_round_trip(tmp_path: Path) -> None:
    src = _odd_checkpoint(tmp_path / "odd")
    out, back = tmp_path / "mo", tmp_path / "back"
    mo.export_checkpoint(src, out)
    theirs = {}
    for shard in ("model-main.safetensors", "model-extra.safetensors"):
        theirs.update(read_modelopt(out / shard))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(theirs)
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in theirs.values())
    gu = "model.layers.0.mlp.experts.gate_up_proj"
    assert theirs[gu].shape == (3, 32, 40) and theirs[gu + "_weight_scale"].shape == (3, 4, 40)  # [E, in/2, out]
    assert theirs["model.layers.0.mlp.experts.down_proj"].shape == (3, 64, 16)  # [E, out, in/2]
    ours = {}
    for shard in ("model-main.safetensors", "model-extra.safetensors"):
        ours.update(fp4fmt.load_file(src / shard))
    for name, v in ours.items():
        if isinstance(v, fp4fmt.QTensor):
            s, s2, _ = mo.scale_names(name)
            got = modelopt_decode(theirs[name], theirs[s], theirs[s2], v.axis)
            assert same_bits(got, fp4fmt.dequantize(v)), name
    with st_open(str(out / "model-main.safetensors"), framework="pt") as f:
        hints = json.loads(f.metadata()[mo.HINTS_KEY])
    assert hints == {"model.layers.0.self_attn.k_proj.weight": {"scale_layout": "swizzled"},
                     "model.layers.0.self_attn.q_proj.weight": {"dtype": "F32"}}
    with st_open(str(out / "model-extra.safetensors"), framework="pt") as f:
        hints = json.loads(f.metadata()[mo.HINTS_KEY])
    assert hints == {"model.layers.0.self_attn.v_proj.weight": {"quantizer": "gptq"}}
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert "model.layers.0.mlp.experts" not in cfg["ignore"]  # its bias is 2-D, but the module is quantized
    mo.import_checkpoint(out, back)
    assert dir_identical(src, back) == []


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_round_trip_property(tmp_path_factory, data) -> None:
    """fp4fmt -> modelopt -> fp4fmt is byte-identical for random NVFP4 tensors (ranks 2-3, any blocked
    axis allowed by the layout, source dtypes, scale layouts) beside plain tensors."""
    tmp = tmp_path_factory.mktemp("prop")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    tensors = {}
    for i in range(data.draw(st.integers(1, 3))):
        rank = data.draw(st.sampled_from([2, 3]))
        dims = [data.draw(st.integers(1, 5)) * (16 if rank == 2 else 8) for _ in range(rank)]
        axis = rank - 1 if rank == 2 else data.draw(st.sampled_from([1, 2]))
        dims[axis] = data.draw(st.integers(1, 4)) * 16
        dt = data.draw(st.sampled_from([np.float32, ml_dtypes.bfloat16, np.float16]))
        x = (rng.standard_normal(dims) * 10.0 ** rng.integers(-3, 3)).astype(dt)
        x[..., :1] = 0.0 if rng.random() < 0.5 else x[..., :1]
        name = f"layers.{i}.weight" if rank == 2 else f"layers.{i}.experts.gate_up_proj"
        lay = data.draw(st.sampled_from(["linear", "swizzled"]))
        tensors[name] = fp4fmt.quantize(x, "nvfp4", axis=axis, scale_layout=lay)
    tensors["embed.weight"] = rng.standard_normal((4, 8)).astype(ml_dtypes.bfloat16)
    src = fp4_dir(tmp / "src", tensors, ["embed"])
    mo.export_checkpoint(src, tmp / "mo")
    mo.import_checkpoint(tmp / "mo", tmp / "back")
    assert dir_identical(src, tmp / "back") == []


# ------------------------------------------------------------------------------------------------------
# 6: the plain writer


DTYPES = {"U8": torch.uint8, "I8": torch.int8, "F8_E4M3": torch.float8_e4m3fn, "BF16": torch.bfloat16,
          "F16": torch.float16, "I16": torch.int16, "F32": torch.float32, "I32": torch.int32,
          "F64": torch.float64, "I64": torch.int64, "BOOL": torch.bool}


@settings(max_examples=60, deadline=None)
@given(spec=st.dictionaries(st.text("abcdefgh._0123456789", min_size=1, max_size=12),
                            st.tuples(st.sampled_from(sorted(DTYPES)), st.lists(st.integers(0, 4), max_size=3)),
                            min_size=1, max_size=8),
       meta=st.one_of(st.none(), st.just({"format": "pt"})))
def test_plain_writer_matches_the_safetensors_library(tmp_path_factory, spec, meta) -> None:
    tensors, arrays = {}, {}
    for name, (dt, shape) in spec.items():
        n = int(np.prod(shape)) * torch.empty(0, dtype=DTYPES[dt]).element_size()
        raw = (torch.arange(n, dtype=torch.int64) * 37 % 251).to(torch.uint8)
        tensors[name] = (raw % 2).bool().reshape(shape) if dt == "BOOL" else raw.view(DTYPES[dt]).reshape(shape)
        arrays[name] = np.frombuffer(tensors[name].numpy().tobytes() if dt == "BOOL" else raw.numpy().tobytes(),
                                     dtype=fp4fmt.dtypes.numpy_dtype(dt)).reshape(shape)
    path = tmp_path_factory.mktemp("w") / "x.safetensors"
    mo.write_safetensors(path, arrays, meta)
    assert path.read_bytes() == st_save(tensors, metadata=meta)


# ------------------------------------------------------------------------------------------------------
# 7: refusals


def test_mxfp4_is_refused(tmp_path: Path) -> None:
    x = np.random.default_rng(0).standard_normal((8, 64), np.float32)
    src = fp4_dir(tmp_path / "mx", {"a.weight": fp4fmt.quantize(x, "mxfp4")}, [])
    with pytest.raises(FP4FmtError, match="MXFP4") as e:
        mo.export_checkpoint(src, tmp_path / "out")
    assert e.value.tensor == "a.weight" and e.value.file.endswith("model.safetensors")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["padded", "axis0", "collision", "inside", "nothing"])
def test_export_refusals(tmp_path: Path, case: str) -> None:
    x = np.random.default_rng(0).standard_normal((32, 48), np.float32)
    t = {"padded": {"a.weight": fp4fmt.quantize(x[:, :40], "nvfp4")},
         "axis0": {"a.weight": fp4fmt.quantize(x, "nvfp4", axis=0)},
         "collision": {"a.weight": fp4fmt.quantize(x, "nvfp4"), "a.weight_scale": np.zeros(3, np.float32)},
         "inside": {"a.weight": fp4fmt.quantize(x, "nvfp4")},
         "nothing": {"a.weight": x}}[case]
    src = fp4_dir(tmp_path / "src", t, [])
    dst = src / "sub" if case == "inside" else tmp_path / "out"
    with pytest.raises(FP4FmtError, match={"padded": "multiple of 16", "axis0": "last", "collision": "twice",
                                           "inside": "inside the source", "nothing": "no quantized"}[case]):
        mo.export_checkpoint(src, dst)
    assert not dst.exists()


def test_existing_destination_needs_overwrite(converted: Path, tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(FP4FmtError, match="overwrite"):
        mo.export_checkpoint(converted, tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "x"
    mo.export_checkpoint(converted, tmp_path / "out", overwrite=True)
    assert not (tmp_path / "out" / "keep.txt").exists() and mo.detect(tmp_path / "out")


def _tiny_modelopt(path: Path, algo: str = "W4A16_NVFP4", *, s2_shape=(), scale_byte=None, extra=None) -> Path:
    """A small modelopt-layout folder (written with safetensors directly)."""
    x = torch.randn(32, 64)
    q, scale, s2 = NVFP4QTensor.quantize(x, 16)
    if scale_byte is not None:
        scale = scale.view(torch.uint8).clone()
        scale[0, 0] = scale_byte
        scale = scale.view(torch.float8_e4m3fn)
    state = {"a.weight": q._quantized_data, "a.weight_scale": scale, "a.weight_scale_2": s2.reshape(s2_shape)}
    state.update(extra or {})
    path.mkdir()
    st_save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    hf = {"producer": {"name": "modelopt", "version": "0.47.0"},
          "quantization": {"quant_algo": algo, "kv_cache_quant_algo": None, "group_size": 16, "exclude_modules": []}}
    (path / "hf_quant_config.json").write_text(json.dumps(hf, indent=4))
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": {
        "quant_algo": algo, "quant_method": "modelopt"}}, indent=4))
    return path


@pytest.mark.parametrize("case,match", [
    ("fp8", "quant_algo 'FP8'"),
    ("per_expert", "per-expert"),
    ("nan_scale", "E4M3"),
    ("negative_scale", "E4M3"),
    ("awq", "pre_quant_scale"),
    ("no_scale_2", "weight_scale_2"),
])
def test_import_refusals(tmp_path: Path, case: str, match: str) -> None:
    src = {
        "fp8": lambda p: _tiny_modelopt(p, "FP8"),
        "per_expert": lambda p: _tiny_modelopt(p, s2_shape=(1,)),
        "nan_scale": lambda p: _tiny_modelopt(p, scale_byte=0x7F),
        "negative_scale": lambda p: _tiny_modelopt(p, scale_byte=0xB8),
        "awq": lambda p: _tiny_modelopt(p, extra={"a.pre_quant_scale": torch.ones(64)}),
        "no_scale_2": lambda p: _tiny_modelopt(p, extra={"b.weight": torch.zeros(4, 8, dtype=torch.uint8),
                                                         "b.weight_scale": torch.ones(4, 1).to(torch.float8_e4m3fn)}),
    }[case](tmp_path / "src")
    with pytest.raises(FP4FmtError, match=match) as e:
        mo.import_checkpoint(src, tmp_path / "out")
    assert e.value.file is not None
    assert not (tmp_path / "out").exists()


def test_tiny_import_is_exact_and_valid(tmp_path: Path) -> None:
    src = _tiny_modelopt(tmp_path / "src")
    mo.import_checkpoint(src, tmp_path / "out")
    theirs = read_modelopt(src / "model.safetensors")
    qt = fp4fmt.load_file(tmp_path / "out" / "model.safetensors")["a.weight"]
    assert (qt.shape, qt.axis, qt.dtype, qt.scale_rule) == ((32, 64), 1, "BF16", "amax")
    w, s, s2 = theirs["a.weight"], theirs["a.weight_scale"], theirs["a.weight_scale_2"]
    assert np.array_equal(qt.codes, w) and np.array_equal(qt.scales.view(np.uint8), s.view(np.uint8))
    assert same_bits(fp4fmt.dequantize(qt), modelopt_decode(w, s, s2, 1))


@pytest.mark.parametrize("variant", ["both", "no_hf_quant_config", "no_quantization_config"])
def test_small_modelopt_round_trips(tmp_path: Path, variant: str) -> None:
    """Configs an export would not write (other producer, older layouts without one of the two files) are
    kept by the import and come back unchanged."""
    src = _tiny_modelopt(tmp_path / "src", "NVFP4", extra={"a.input_scale": torch.tensor(0.25),
                                                          "a.k_scale": torch.tensor(1.0), "b.norm": torch.ones(8)})
    if variant == "no_hf_quant_config":
        (src / "hf_quant_config.json").unlink()
    if variant == "no_quantization_config":
        (src / "config.json").write_text(json.dumps({"model_type": "llama", "dtype": "float16"}, indent=4))
    mo.import_checkpoint(src, tmp_path / "mid")
    qc = json.loads((tmp_path / "mid" / "config.json").read_text())["quantization_config"]
    assert qc["imported_from"]["format"] == "modelopt"
    assert fp4fmt.load_file(tmp_path / "mid" / "model.safetensors")["a.weight"].dtype == (
        "F16" if variant == "no_quantization_config" else "BF16")
    report = mo.export_checkpoint(tmp_path / "mid", tmp_path / "again")
    assert report.notes and dir_identical(src, tmp_path / "again") == []


def test_detect(tmp_path: Path, converted: Path) -> None:
    assert mo.detect(_tiny_modelopt(tmp_path / "a"))
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "modelopt"}}))
    assert mo.detect(tmp_path / "b")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "config.json").write_text("{not json")
    assert not mo.detect(tmp_path / "c") and not mo.detect(tmp_path / "missing") and not mo.detect(converted)
