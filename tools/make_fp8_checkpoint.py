"""Write a synthetic FP8 checkpoint (DeepSeek, compressed-tensors or modelopt convention) from a BF16/FP32 one.

    python tools/make_fp8_checkpoint.py SRC_DIR DST_DIR --convention deepseek|compressed-tensors|modelopt
        [--strategy tensor|channel|block] [--scale-dtype F32|BF16] [--ue8m0]

SRC_DIR is a Hugging Face checkpoint directory (config.json and model.safetensors, or shards listed in
model.safetensors.index.json). The linear-layer weights (2-D ``.weight`` tensors of the attention and MLP
projections; not embeddings, lm_head, norms or routers) are quantized to float8_e4m3fn with the convention's
own scale rule, ``scale = amax / 448`` per tensor, per output channel or per 128x128 block (edge blocks
partial), stored in the convention's names, shapes and dtypes (docs: formats-reference §9). ``--ue8m0``
(deepseek) rounds each block scale up to a power of two, as ``"scale_fmt": "ue8m0"`` checkpoints do. A block
whose amax is 0 gets scale 1. Elements are ``e4m3(clip(w / scale, -448, 448))`` in float32 (round to nearest
even), ``scale`` being the stored (rounded) scale. Every other tensor is copied unchanged, the sharding is
kept, config.json gets the convention's quantization_config (modelopt also gets hf_quant_config.json) and
the tokenizer and other small files are copied. Activation and KV-cache scales, which need calibration
data, are written as placeholders equal to 1.0 (compressed-tensors static activations: ``input_scale``;
modelopt: ``input_scale``, ``k_proj.k_scale``, ``v_proj.v_scale``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import ml_dtypes
import numpy as np

from safetensors.numpy import save_file as st_save_file

from fp4fmt import dtypes
from fp4fmt.converters.safetensors_file import should_quantize
from fp4fmt.files import safe_open

FP8_MAX = 448.0
BLOCK = (128, 128)
PLACEHOLDER_SCALE = 1.0  # activation / KV scales: a calibration-free stand-in
CT_VERSION = "0.20.1"  # the compressed-tensors release whose config layout is mirrored
MODELOPT_VERSION = "0.47.0"
STRATEGIES = {"deepseek": ("block",), "compressed-tensors": ("tensor", "channel", "block"), "modelopt": ("tensor", "channel")}
DEFAULT_STRATEGY = {"deepseek": "block", "compressed-tensors": "channel", "modelopt": "tensor"}
_WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".onnx", ".ckpt")
_SKIP_FILES = ("config.json", "hf_quant_config.json", "model.safetensors.index.json")


# ---------------------------------------------------------------------------------------------------------
# the numbers
# ---------------------------------------------------------------------------------------------------------
def is_linear_weight(name: str, shape: tuple[int, ...], dtype: str) -> bool:
    """True for a 2-D float ``.weight`` of an attention/MLP projection (the tensors that become FP8)."""
    return len(shape) == 2 and dtype in ("BF16", "F16", "F32") and should_quantize(name, shape, dtype) is None


def amax_grid(w: np.ndarray, strategy: str) -> np.ndarray:
    """float32 max|w| per tensor ``[1, 1]``, per output channel ``[out, 1]`` or per 128x128 block ``[rb, cb]``."""
    a = np.abs(w.astype(np.float32))
    if strategy == "tensor":
        return a.max(keepdims=True).reshape(1, 1)
    if strategy == "channel":
        return a.max(axis=1, keepdims=True)
    out_dim, in_dim = a.shape
    rb, cb = -(-out_dim // BLOCK[0]), -(-in_dim // BLOCK[1])
    padded = np.zeros((rb * BLOCK[0], cb * BLOCK[1]), np.float32)  # zero padding leaves each block's amax as is
    padded[:out_dim, :in_dim] = a
    return padded.reshape(rb, BLOCK[0], cb, BLOCK[1]).max(axis=(1, 3))


def scale_grid(amax: np.ndarray, scale_dtype: str, ue8m0: bool) -> np.ndarray:
    """Stored scales from amax: float32 ``amax / 448`` (or its power-of-two ceiling), then cast to ``scale_dtype``."""
    s = (amax / np.float32(FP8_MAX)).astype(np.float32)
    if ue8m0:
        mant, exp = np.frexp(s)
        s = np.where(mant == 0.5, s, np.ldexp(np.float32(1.0), exp)).astype(np.float32)
    s = np.where(amax > 0, s, np.float32(1.0)).astype(np.float32)
    return s.astype(dtypes.numpy_dtype(scale_dtype))


def broadcast_scales(s: np.ndarray, strategy: str, shape: tuple[int, int]) -> np.ndarray:
    """float32 scale of every element of a weight of ``shape`` from the ``[*, *]`` grid of :func:`scale_grid`."""
    s32 = s.astype(np.float32)
    if strategy != "block":
        return np.broadcast_to(s32, shape)
    full = np.repeat(np.repeat(s32, BLOCK[0], axis=0), BLOCK[1], axis=1)
    return full[: shape[0], : shape[1]]


def quantize_fp8(w: np.ndarray, strategy: str, scale_dtype: str, ue8m0: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(float8_e4m3fn weight, stored scale grid) of a 2-D weight (see the module docstring)."""
    s = scale_grid(amax_grid(w, strategy), scale_dtype, ue8m0)
    x = w.astype(np.float32) / broadcast_scales(s, strategy, w.shape)
    return np.clip(x, -FP8_MAX, FP8_MAX).astype(ml_dtypes.float8_e4m3fn), s


# ---------------------------------------------------------------------------------------------------------
# the conventions: scale names and shapes, extra tensors, configs
# ---------------------------------------------------------------------------------------------------------
def stored_scale(convention: str, strategy: str, s: np.ndarray) -> tuple[str, np.ndarray]:
    """(suffix appended to the weight's name, scale array in the convention's shape)."""
    if convention == "deepseek":
        return "_scale_inv", s
    if convention == "compressed-tensors":
        return "_scale", s.reshape(1) if strategy == "tensor" else s  # [1], [out, 1] or [rb, cb]
    return "_scale", s.reshape(()) if strategy == "tensor" else s.reshape(-1)  # modelopt: 0-dim or [out]


def extra_tensors(convention: str, strategy: str, weight_name: str, scale_dtype: str) -> dict[str, np.ndarray]:
    """Placeholder activation / KV-cache scales a real checkpoint of this convention has for this weight."""
    module = weight_name[: -len(".weight")]
    out: dict[str, np.ndarray] = {}
    if convention == "compressed-tensors" and strategy == "tensor":  # FP8 preset: static per-tensor activations
        out[module + ".input_scale"] = np.full((1,), PLACEHOLDER_SCALE, dtypes.numpy_dtype(scale_dtype))
    if convention == "modelopt":
        out[module + ".input_scale"] = np.array(PLACEHOLDER_SCALE, np.float32)
        if module.endswith("k_proj"):
            out[module + ".k_scale"] = np.array(PLACEHOLDER_SCALE, np.float32)
        if module.endswith("v_proj"):
            out[module + ".v_scale"] = np.array(PLACEHOLDER_SCALE, np.float32)
    return out


def ct_args(strategy: str, *, activations: bool) -> dict | None:
    """compressed-tensors QuantizationArgs as CT 0.20.1 serializes the FP8, FP8_DYNAMIC and FP8_BLOCK presets."""
    args: dict = {"num_bits": 8, "type": "float", "symmetric": True, "group_size": None}
    if not activations:
        args["strategy"] = strategy
        if strategy == "block":
            args["block_structure"] = list(BLOCK)
        args["dynamic"] = False
        return args
    if strategy == "tensor":
        return {**args, "strategy": "tensor", "dynamic": False, "observer": "static_minmax"}
    if strategy == "channel":
        return {**args, "strategy": "token", "dynamic": True}
    return {**args, "group_size": BLOCK[1], "strategy": "group", "dynamic": True}


def quantization_config(convention: str, strategy: str, ue8m0: bool, ignore: list[str]) -> dict:
    """The config.json ``quantization_config`` of the convention."""
    if convention == "deepseek":
        qc = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": list(BLOCK)}
        if ue8m0:
            qc["scale_fmt"] = "ue8m0"
        return qc
    if convention == "compressed-tensors":
        group = {"targets": ["Linear"], "weights": ct_args(strategy, activations=False),
                 "input_activations": ct_args(strategy, activations=True), "output_activations": None, "format": None}
        return {"version": CT_VERSION, "quant_method": "compressed-tensors", "sparsity_config": {}, "transform_config": {},
                "config_groups": {"group_0": group}, "kv_cache_scheme": None, "format": "float-quantized",
                "quantization_status": "compressed", "global_compression_ratio": None, "ignore": ignore,
                "moe_sparsity_config": None}
    hq = hf_quant_config(strategy, ignore)
    qc: dict = {}
    if strategy == "tensor":  # modelopt's convert_hf_quant_config_format writes config_groups only for FP8
        qc["config_groups"] = {"group_0": {"input_activations": {"dynamic": False, "num_bits": 8, "type": "float"},
                                           "weights": {"dynamic": False, "num_bits": 8, "type": "float"},
                                           "targets": ["Linear"]}}
    qc.update({"ignore": ignore, "quant_algo": hq["quantization"]["quant_algo"],
               "kv_cache_scheme": {"dynamic": False, "num_bits": 8, "type": "float"},
               "producer": hq["producer"], "quant_method": "modelopt"})
    return qc


def hf_quant_config(strategy: str, ignore: list[str]) -> dict:
    """modelopt's hf_quant_config.json for FP8 (per tensor) or FP8_PER_CHANNEL_PER_TOKEN weights."""
    algo = "FP8" if strategy == "tensor" else "FP8_PER_CHANNEL_PER_TOKEN"
    return {"producer": {"name": "modelopt", "version": MODELOPT_VERSION},
            "quantization": {"quant_algo": algo, "kv_cache_quant_algo": "FP8", "exclude_modules": ignore}}


# ---------------------------------------------------------------------------------------------------------
# the files
# ---------------------------------------------------------------------------------------------------------
def source_shards(src: Path) -> list[str]:
    """File names of the source's safetensors shards (the index's, or model.safetensors)."""
    index = src / "model.safetensors.index.json"
    if index.exists():
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    if (src / "model.safetensors").exists():
        return ["model.safetensors"]
    raise SystemExit(f"{src}: no model.safetensors or model.safetensors.index.json")


def convert_shard(path: Path, convention: str, strategy: str, scale_dtype: str | None, ue8m0: bool,
                  quantized: list[str]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(output tensors, metadata) of one shard: linear weights quantized with their scales added, the rest
    copied; the names of the quantized weights are appended to ``quantized``."""
    out: dict[str, np.ndarray] = {}
    with safe_open(path) as f:
        for name in f.keys():
            value = f.get_tensor(name)
            dt = dtypes.dtype_name(value.dtype)
            if not is_linear_weight(name, value.shape, dt):
                out[name] = np.array(value)
                continue
            sdt = scale_dtype or ("F32" if convention != "compressed-tensors" else dt)
            q, s = quantize_fp8(value, strategy, sdt, ue8m0)
            suffix, stored = stored_scale(convention, strategy, s)
            out[name] = q
            out[name + suffix] = stored
            out.update(extra_tensors(convention, strategy, name, sdt))
            quantized.append(name)
        metadata = f.metadata()
    return out, metadata


def write_safetensors(tensors: dict[str, np.ndarray], path: Path, metadata: dict[str, str]) -> int:
    """Write a plain safetensors file with the safetensors library; returns the bytes of tensor data."""
    st_save_file({n: np.ascontiguousarray(a).reshape(a.shape) for n, a in tensors.items()}, str(path), metadata=metadata)
    return sum(a.nbytes for a in tensors.values())


def make(src: Path, dst: Path, convention: str, strategy: str | None = None, scale_dtype: str | None = None,
         ue8m0: bool = False) -> list[str]:
    """Write the FP8 checkpoint of ``src`` into ``dst``; returns the names of the weights made FP8."""
    strategy = strategy or DEFAULT_STRATEGY[convention]
    if strategy not in STRATEGIES[convention]:
        raise SystemExit(f"--strategy {strategy} is not available for {convention} (choose {', '.join(STRATEGIES[convention])})")
    if ue8m0 and convention != "deepseek":
        raise SystemExit("--ue8m0 applies to the deepseek convention only")
    if convention == "modelopt" and scale_dtype not in (None, "F32"):
        raise SystemExit("modelopt stores float32 scales; --scale-dtype must be F32")
    config = json.loads((src / "config.json").read_text())
    if "quantization_config" in config:
        raise SystemExit(f"{src / 'config.json'}: the source is already quantized")
    dst.mkdir(parents=True, exist_ok=True)
    shards = source_shards(src)
    quantized: list[str] = []
    weight_map: dict[str, str] = {}
    total = 0
    for shard in shards:
        tensors, metadata = convert_shard(src / shard, convention, strategy, scale_dtype, ue8m0, quantized)
        total += write_safetensors(tensors, dst / shard, metadata or {"format": "pt"})
        weight_map.update({n: shard for n in tensors})
    if (src / "model.safetensors.index.json").exists():
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    ignore = ["lm_head"]  # what llm-compressor and modelopt recipes exclude; embeddings and norms are not Linear
    config["quantization_config"] = quantization_config(convention, strategy, ue8m0, ignore)
    (dst / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if convention == "modelopt":
        (dst / "hf_quant_config.json").write_text(json.dumps(hf_quant_config(strategy, ignore), indent=4) + "\n")
    copy_small_files(src, dst)
    return quantized


def copy_small_files(src: Path, dst: Path) -> None:
    """Copy the tokenizer, generation config and other non-weight top-level files."""
    for p in sorted(src.iterdir()):
        if p.is_file() and p.name not in _SKIP_FILES and not p.name.endswith(_WEIGHT_FILES):
            shutil.copyfile(p, dst / p.name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", type=Path)
    ap.add_argument("dst", type=Path)
    ap.add_argument("--convention", required=True, choices=sorted(STRATEGIES))
    ap.add_argument("--strategy", choices=("tensor", "channel", "block"))
    ap.add_argument("--scale-dtype", choices=("F32", "BF16"))
    ap.add_argument("--ue8m0", action="store_true", help="power-of-two block scales (deepseek scale_fmt ue8m0)")
    a = ap.parse_args()
    if os.path.abspath(a.src) == os.path.abspath(a.dst):
        raise SystemExit("DST_DIR must differ from SRC_DIR")
    names = make(a.src, a.dst, a.convention, a.strategy, a.scale_dtype, a.ue8m0)
    print(f"{a.dst}: {len(names)} weights in FP8 ({a.convention}, {a.strategy or DEFAULT_STRATEGY[a.convention]})")


if __name__ == "__main__":
    main()
