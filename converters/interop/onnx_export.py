"""Export an fp4fmt checkpoint's quantized linear layers to ONNX (spec §8.5): FLOAT4E2M1 weights read
through blocked ``DequantizeLinear``, one ``Gemm`` per layer. Export only.

What the export writes (``dst/model.onnx`` plus ``dst/model.onnx.data``):

* **Which tensors.** Every quantized tensor of rank 2 blocked along axis 1 (a linear weight ``W [N, K]``,
  ``N`` = out, ``K`` = in features) becomes one *layer*. Its layer name ``L`` is the weight's name without a
  trailing ``.weight``. Other quantized tensors (rank ≠ 2, axis 0, or empty) are skipped and listed in the
  report. Plain tensors (embeddings, norms, ...) are omitted, except a plain ``L.bias`` of shape ``[N]``,
  which becomes the layer's ``Gemm`` bias (converted to float32; exact from F32/F16/BF16/F8, rounded RNE
  from F64). The graph is a set of independent layers, not the whole model.
* **Per layer**, with ``W`` the fp4fmt tensor name:

  - graph input ``x.L``: float32 ``["batch", K]``; graph output ``y.L``: float32 ``["batch", N]``;
  - ``W.codes``: FLOAT4E2M1 initializer ``[N, K]``. ONNX packs FLOAT4E2M1 two per byte with the first
    element in the 4 low bits, like fp4fmt (§4.1), but over the *whole tensor as one flat sequence* (an
    odd total padded with 4 zero bits), where fp4fmt packs each row to ``padded_k``. So with
    ``padding = 0`` the bytes are ``NAME.codes`` unchanged (byte-exact); otherwise the padded codes are
    dropped and the row codes repacked flat (the same 4-bit codes, no requantization);
  - ``W.scales`` ``[N, ceil(K/B)]`` (linear layout; a swizzled tensor is unswizzled, §6.4): NVFP4 the E4M3
    bytes unchanged as FLOAT8E4M3FN; MXFP4 the E8M0 bytes unchanged as FLOAT8E8M0 (opset 24);
  - NVFP4 only: ``W.tensor_scale``, a float32 scalar (decode direction, as stored), and the node
    ``DequantizeLinear(W.scales, W.tensor_scale) -> W.factors``: float32 ``fl32(E4M3 × s2)``, exactly
    the factor ``f`` of §5.3;
  - ``DequantizeLinear(W.codes, W.factors | W.scales, axis=1, block_size=B) -> W`` (``output_dtype`` =
    FLOAT with E8M0 scales): float32 ``fl32(E2M1 × f)`` = §5.3 bit for bit. ONNX blocked
    quantization allows a last, shorter block, so a ragged ``K`` needs no padding and no ``Slice``;
  - ``Gemm(x.L, W[, L.bias], transB=1) -> y.L``.

  The order of the NVFP4 roundings matters: ``fl32(fl32(E2M1 × E4M3) × s2)`` (dequantize with the E4M3
  scales, then multiply by ``s2``) differs from §5.3 in the last bit for some inputs; this graph computes
  the factor first, as §5.3 requires.
* **``scale_format="float32"``** stores instead the float32 factors ``f`` (NVFP4: ``fl32(E4M3 × s2)``;
  MXFP4: ``2^(code−127)``, exact, ``2^−127`` being a float32 subnormal) as ``W.scales`` and uses one
  ``DequantizeLinear`` per weight: value-exact, four times the scale bytes, and opset 23 for every scheme.
* **Opset and IR.** Opset 23 (IR 11, onnx ≥ 1.18: FLOAT4E2M1 in DequantizeLinear); opset 24 (IR 12,
  onnx ≥ 1.19) when an MXFP4 layer keeps its E8M0 scales (FLOAT8E8M0 as ``x_scale``).
* **External data.** Every initializer of ≥ 1024 bytes lives in ``model.onnx.data`` (location relative
  to ``model.onnx``), written tensor by tensor so memory holds one tensor at a time; offsets of tensors
  over 1 MiB are aligned to 64 KiB (the mmap granularity onnxruntime and onnx-ir use), the rest to 64
  bytes. ``model.onnx`` itself is only the graph, so no size approaches protobuf's 2 GB limit.
* **Metadata.** ``producer_name`` "fp4fmt"; ``metadata_props``: ``fp4fmt.format_version``,
  ``fp4fmt.onnx_export`` (JSON: layout version, scale format, and per layer its name, weight, scheme,
  shape, original dtype, scale_rule, scale_layout and whether it has a bias) and
  ``fp4fmt.quantization_config`` (the source's).
* **Checks.** The export refuses block-scale codes §5.4 forbids and tensors whose decoded values would
  overflow float32 (§5.3), and runs ``onnx.checker.check_model(path, full_check=True)`` on its result.

Runtimes:

* The onnx reference evaluator (``onnx.reference.ReferenceEvaluator``) of onnx 1.23.2 runs every graph
  this module writes and gives §5.3's values bit for bit. onnx 1.18–1.22 run the NVFP4 and
  ``scale_format="float32"`` graphs too, but their evaluator registers no ``DequantizeLinear`` newer than
  version 21, which rejects the ``output_dtype`` attribute: they cannot run MXFP4 with E8M0 scales
  (onnx 1.18 also lacks FLOAT8E8M0 itself; the export then asks for ``scale_format="float32"``).
* onnxruntime's CPU execution provider has no FLOAT4E2M1 kernel: with onnxruntime 1.32.0 creating a
  session fails with ``NOT_IMPLEMENTED : Could not find an implementation for DequantizeLinear(23)`` (24
  for the E8M0 graph), for either scale format.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import numpy as np

from ... import __version__, codec, dtypes, schemes
from ...errors import FP4FmtError
from ...files import safe_open
from ...qtensor import QTensor, check_scales, dequantize
from .common import OutputDir, open_fp4_checkpoint

if TYPE_CHECKING:
    import onnx

FORMAT = "onnx"
MODEL_NAME = "model.onnx"
DATA_NAME = "model.onnx.data"
SCALE_FORMATS = ("native", "float32")
EXPORT_LAYOUT_VERSION = 1  # of the fp4fmt.onnx_export metadata and the naming scheme above
EXTERNAL_THRESHOLD = 1024  # initializers of at least this many bytes go to the data file
ALIGN_THRESHOLD = 1 << 20  # tensors larger than this start at a multiple of ALIGN_LARGE
ALIGN_LARGE = 1 << 16
ALIGN_SMALL = 64
OPSET_IR = {23: 11, 24: 12}  # opset -> the IR version onnx released with it (onnx.helper.VERSION_TABLE)
_FLT_MAX = float(np.finfo(np.float32).max)


@dataclass(frozen=True)
class ExportReport:
    """What :func:`export_checkpoint` wrote: the output directory, its model and data files, the opset, the
    exported layers, the quantized tensors skipped (with the reason) and the plain tensors omitted."""

    path: Path
    model: Path
    data: Path | None
    opset: int
    ir_version: int
    scale_format: str
    layers: tuple[str, ...]
    skipped: tuple[tuple[str, str], ...]
    omitted_plain: tuple[str, ...]
    bytes: int

    def as_dict(self) -> dict:
        return {
            "format": FORMAT,
            "path": str(self.path),
            "model": str(self.model),
            "data": str(self.data) if self.data is not None else None,
            "opset": self.opset,
            "ir_version": self.ir_version,
            "scale_format": self.scale_format,
            "layers": list(self.layers),
            "skipped": {n: r for n, r in self.skipped},
            "omitted_plain": list(self.omitted_plain),
            "bytes": self.bytes,
        }


@dataclass(frozen=True)
class _Init:
    """An initializer to write: name, ONNX element type, dims and its raw bytes (a numpy array)."""

    name: str
    data_type: int
    dims: tuple[int, ...]
    data: np.ndarray


@dataclass(frozen=True)
class _Layer:
    """The initializers and nodes of one exported linear layer."""

    layer: str
    weight: str
    n: int
    k: int
    opset: int
    inits: tuple[_Init, ...]
    nodes: tuple
    bias: bool


def _onnx():
    try:
        import onnx
    except ImportError:
        raise FP4FmtError("the ONNX export needs the onnx package (pip install 'fp4fmt[onnx]', onnx>=1.18)") from None
    if not hasattr(onnx.TensorProto, "FLOAT4E2M1"):
        raise FP4FmtError(f"onnx {onnx.__version__} has no FLOAT4E2M1 type; the ONNX export needs onnx>=1.18")
    return onnx


def layer_name(weight: str) -> str:
    """The layer name of a linear weight: its name without a trailing ``.weight``."""
    return weight[: -len(".weight")] if weight.endswith(".weight") and len(weight) > len(".weight") else weight


def skip_reason(qt: QTensor) -> str | None:
    """Why a quantized tensor is not exported as a linear layer, or None if it is (rank 2, axis 1, non-empty)."""
    if len(qt.shape) != 2:
        return f"rank {len(qt.shape)}: only 2-D [out, in] linear weights are exported"
    if qt.axis != 1:
        return "blocked along axis 0: only [out, in] weights blocked along in (axis 1) are exported"
    if 0 in qt.shape:
        return f"empty shape {list(qt.shape)}"
    return None


def flat_codes(qt: QTensor) -> np.ndarray:
    """The codes of a 2-D axis-1 tensor as ONNX FLOAT4E2M1 raw bytes of shape ``[N, K]``: the whole tensor
    packed as one flat sequence, element 2i in the low nibble, an odd total padded with a zero nibble."""
    n, k = qt.shape
    if k % 2 == 0:  # every row ends on a byte boundary: the first K/2 bytes of each row, the padding dropped
        return np.ascontiguousarray(qt.codes[:, : k // 2]).reshape(-1)
    flat = codec.unpack_nibbles(qt.codes)[:, :k].reshape(-1)
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.uint8)])
    return codec.pack_nibbles(flat)


def _check_decodable(qt: QTensor, name: str, file) -> None:
    """FormatError for scale codes §5.4 forbids or decoded values that overflow float32 (§5.3)."""
    check_scales(qt, name=name, file=file)
    with np.errstate(over="ignore"):
        factors = schemes.block_factors(qt.scale_codes(), schemes.SCHEMES[qt.scheme], qt.tensor_scale)
        if factors.size and not float(factors.max()) * codec.E2M1_MAX < _FLT_MAX:
            dequantize(qt, name=name, file=file)  # raises unless no element's decoded value overflows


def _layer(qt: QTensor, weight: str, bias: np.ndarray | None, scale_format: str, file=None) -> _Layer:
    """The initializers and nodes of one linear layer (the contract of the module docstring)."""
    onnx = _onnx()
    helper, TP = onnx.helper, onnx.TensorProto
    reason = skip_reason(qt)
    if reason is not None:
        raise FP4FmtError(f"cannot export as a linear layer: {reason}", file=file, tensor=weight)
    if scale_format not in SCALE_FORMATS:
        raise FP4FmtError(f"scale_format must be one of {SCALE_FORMATS}, got {scale_format!r}", tensor=weight)
    _check_decodable(qt, weight, file)
    n, k = qt.shape
    layer = layer_name(weight)
    b = qt.block_size
    nb = -(-k // b)
    sc = qt.scale_codes()  # linear [N, nb] uint8
    inits = [_Init(f"{weight}.codes", TP.FLOAT4E2M1, (n, k), flat_codes(qt))]
    nodes = []
    opset = 23
    dq_attrs: dict = {"axis": 1, "block_size": b}
    if scale_format == "float32":
        f = schemes.block_factors(sc, schemes.SCHEMES[qt.scheme], qt.tensor_scale).astype(np.float32)
        inits.append(_Init(f"{weight}.scales", TP.FLOAT, (n, nb), np.ascontiguousarray(f)))
        scale_input = f"{weight}.scales"
    elif qt.scheme == "nvfp4":
        inits.append(_Init(f"{weight}.scales", TP.FLOAT8E4M3FN, (n, nb), np.ascontiguousarray(sc)))
        inits.append(_Init(f"{weight}.tensor_scale", TP.FLOAT, (), np.asarray(qt.tensor_scale, np.float32).reshape(())))
        nodes.append(helper.make_node("DequantizeLinear", [f"{weight}.scales", f"{weight}.tensor_scale"],
                                      [f"{weight}.factors"], name=f"{weight}.dequantize_scales"))
        scale_input = f"{weight}.factors"
    else:
        e8m0 = getattr(TP, "FLOAT8E8M0", None)
        if e8m0 is None:
            raise FP4FmtError(f"onnx {onnx.__version__} has no FLOAT8E8M0 (onnx>=1.19 has it); export MXFP4 with "
                              "scale_format='float32' instead", tensor=weight)
        inits.append(_Init(f"{weight}.scales", e8m0, (n, nb), np.ascontiguousarray(sc)))
        scale_input = f"{weight}.scales"
        dq_attrs["output_dtype"] = TP.FLOAT
        opset = 24
    nodes.append(helper.make_node("DequantizeLinear", [f"{weight}.codes", scale_input], [weight],
                                  name=f"{weight}.dequantize", **dq_attrs))
    gemm_in = [f"x.{layer}", weight]
    if bias is not None:
        inits.append(_Init(f"{layer}.bias", TP.FLOAT, (n,), np.ascontiguousarray(bias, dtype=np.float32)))
        gemm_in.append(f"{layer}.bias")
    nodes.append(helper.make_node("Gemm", gemm_in, [f"y.{layer}"], name=f"{layer}.gemm", transB=1))
    return _Layer(layer, weight, n, k, opset, tuple(inits), tuple(nodes), bias is not None)


def _tensor_proto(init: _Init, data_file: _DataWriter | None) -> onnx.TensorProto:
    onnx = _onnx()
    t = onnx.TensorProto()
    t.name = init.name
    t.data_type = init.data_type
    t.dims.extend(init.dims)
    raw = init.data.view(np.uint8).reshape(-1) if init.data.ndim else init.data.reshape(1).view(np.uint8)
    if data_file is None or raw.nbytes < EXTERNAL_THRESHOLD:
        t.raw_data = raw.tobytes()
        return t
    offset = data_file.write(raw)
    t.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", DATA_NAME), ("offset", str(offset)), ("length", str(raw.nbytes))):
        e = t.external_data.add()
        e.key, e.value = key, value
    return t


class _DataWriter:
    """Appends tensors to the external data file at aligned offsets; ``write`` returns the offset."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self.size = 0

    def write(self, raw: np.ndarray) -> int:
        align = ALIGN_LARGE if raw.nbytes > ALIGN_THRESHOLD else ALIGN_SMALL
        pad = -self.size % align
        if pad:
            self._f.write(b"\0" * pad)
        offset = self.size + pad
        self._f.write(memoryview(np.ascontiguousarray(raw)))
        self.size = offset + raw.nbytes
        return offset


def _model(layers: Iterable[_Layer], tensors: list, metadata: dict[str, str], doc: str) -> onnx.ModelProto:
    onnx = _onnx()
    helper, TP = onnx.helper, onnx.TensorProto
    layers = list(layers)
    opset = max([lay.opset for lay in layers], default=23)
    graph = helper.make_graph(
        [node for lay in layers for node in lay.nodes],
        "fp4fmt_linear_layers",
        [helper.make_tensor_value_info(f"x.{lay.layer}", TP.FLOAT, ["batch", lay.k]) for lay in layers],
        [helper.make_tensor_value_info(f"y.{lay.layer}", TP.FLOAT, ["batch", lay.n]) for lay in layers],
        initializer=tensors,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=OPSET_IR[opset],
                              producer_name="fp4fmt", producer_version=__version__, doc_string=doc)
    helper.set_model_props(model, metadata)
    return model


def _layer_meta(lay: _Layer, qt: QTensor) -> dict:
    return {"layer": lay.layer, "weight": lay.weight, "scheme": qt.scheme, "shape": list(qt.shape), "dtype": qt.dtype,
            "scale_rule": qt.scale_rule, "scale_layout": qt.scale_layout, "bias": lay.bias}


def _export_meta(scale_format: str, layer_meta: list[dict]) -> str:
    return json.dumps({"layout_version": EXPORT_LAYOUT_VERSION, "scale_format": scale_format, "layers": layer_meta},
                      sort_keys=True, separators=(",", ":"))


def quantized_linear_model(qt: QTensor, weight: str = "weight", *, bias: np.ndarray | None = None,
                           scale_format: str = "native") -> onnx.ModelProto:
    """An in-memory ONNX model of one linear layer ``y = x @ dequantize(qt).T (+ bias)`` with the graph of
    :func:`export_checkpoint` (all data inline); the dequantized weight is also a graph output ``weight``."""
    onnx = _onnx()
    if bias is not None:
        n = qt.shape[0] if len(qt.shape) == 2 else -1
        b = _float_bias(np.asarray(bias), n)
        if b is None:
            raise FP4FmtError(f"bias must be a float tensor of shape [{n}], got {np.asarray(bias).dtype} "
                              f"{list(np.shape(bias))}", tensor=weight)
        bias = b
    lay = _layer(qt, weight, bias, scale_format)
    model = _model([lay], [_tensor_proto(i, None) for i in lay.inits],
                   {"fp4fmt.onnx_export": _export_meta(scale_format, [_layer_meta(lay, qt)])}, "")
    model.graph.output.append(onnx.helper.make_tensor_value_info(weight, onnx.TensorProto.FLOAT, [lay.n, lay.k]))
    return model


def _float_bias(arr: np.ndarray, n: int) -> np.ndarray | None:
    """A plain tensor as a float32 bias of length n, or None if it is not one (wrong shape or dtype)."""
    try:
        dtypes.source_dtype_name(arr.dtype)
    except ValueError:
        return None
    return arr.astype(np.float32) if arr.shape == (n,) else None


def export_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, *, overwrite: bool = False,
                      progress: Callable[[str, int, int], None] | None = None,
                      scale_format: str = "native") -> ExportReport:
    """Write ``dst/model.onnx`` (+ ``model.onnx.data``): the quantized linear layers of the fp4fmt checkpoint
    ``src`` as FLOAT4E2M1 initializers, blocked DequantizeLinear and Gemm (see the module docstring).
    ``dst`` is written atomically; the source is only read."""
    onnx = _onnx()
    if scale_format not in SCALE_FORMATS:
        raise FP4FmtError(f"scale_format must be one of {SCALE_FORMATS}, got {scale_format!r}")
    ck = open_fp4_checkpoint(src)
    s, d = ck.path.resolve(), Path(dst).resolve()
    if s == d or s.is_relative_to(d) or d.is_relative_to(s):
        raise FP4FmtError(f"the output must not be the source checkpoint, inside it, or contain it ({ck.path})", file=dst)
    # pass 1: which tensors are layers and which are plain (a bias may sit in another shard than its weight)
    weights: list[str] = []
    skipped: list[tuple[str, str]] = []
    plain: dict[str, Path] = {}
    for name, t, shard in ck.tensors():
        if not isinstance(t, QTensor):
            plain[name] = shard
        elif (reason := skip_reason(t)) is None:
            weights.append(name)
        else:
            skipped.append((name, reason))
    if not weights:
        raise FP4FmtError("no quantized 2-D [out, in] linear weight to export"
                          + (f" (skipped: {'; '.join(f'{n}: {r}' for n, r in skipped)})" if skipped else ""), file=ck.path)
    total = len(weights) + len(skipped) + len(plain)
    wanted = set(weights)
    layers: list[_Layer] = []
    metas: list[dict] = []
    protos: list = []
    names: set[str] = set()

    with OutputDir(Path(dst), overwrite) as out:
        data_path = out.file(DATA_NAME)
        with open(data_path, "wb") as fdata:
            writer = _DataWriter(fdata)
            for done, (name, t, shard) in enumerate(ck.tensors(), 1):
                if name in wanted:
                    bias = None
                    bname = f"{layer_name(name)}.bias"
                    if bname in plain:
                        with safe_open(plain[bname]) as fb:
                            bias = _float_bias(fb.get_tensor(bname), t.shape[0])
                    lay = _layer(t, name, bias, scale_format, file=shard)
                    for v in [f"x.{lay.layer}"] + [i.name for i in lay.inits] + [o for nd in lay.nodes for o in nd.output]:
                        if v in names:
                            raise FP4FmtError(f"the ONNX name {v!r} would be used twice", file=shard, tensor=name)
                        names.add(v)
                    protos.extend(_tensor_proto(i, writer) for i in lay.inits)
                    layers.append(lay)
                    metas.append(_layer_meta(lay, t))
                if progress is not None:
                    progress("export", done, total)
        used_bias = {f"{lay.layer}.bias" for lay in layers if lay.bias}
        omitted = tuple(sorted(n for n in plain if n not in used_bias))
        metadata = {
            "fp4fmt.format_version": str(ck.quantization_config.get("format_version", "")),
            "fp4fmt.onnx_export": _export_meta(scale_format, metas),
            "fp4fmt.quantization_config": json.dumps(ck.quantization_config, sort_keys=True, separators=(",", ":")),
        }
        doc = (f"fp4fmt {__version__} export of {len(layers)} quantized linear layers: inputs x.<layer>, outputs "
               "y.<layer> = x @ dequantize(W).T (+ bias); weights FLOAT4E2M1 with blocked DequantizeLinear.")
        model = _model(layers, protos, metadata, doc)
        model_path = out.file(MODEL_NAME)
        model_path.write_bytes(model.SerializeToString())
        if writer.size == 0:
            data_path.unlink()
        try:
            onnx.checker.check_model(str(model_path), full_check=True)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
            raise FP4FmtError(f"the ONNX model written fails onnx.checker: {e}", file=Path(dst) / MODEL_NAME) from None
        nbytes = model_path.stat().st_size + writer.size
    dst = Path(dst)
    return ExportReport(
        path=dst,
        model=dst / MODEL_NAME,
        data=dst / DATA_NAME if writer.size else None,
        opset=model.opset_import[0].version,
        ir_version=model.ir_version,
        scale_format=scale_format,
        layers=tuple(lay.layer for lay in layers),
        skipped=tuple(skipped),
        omitted_plain=omitted,
        bytes=nbytes,
    )


def layer_model(model: onnx.ModelProto | str | os.PathLike, layer: str, *, weight_output: bool = True) -> onnx.ModelProto:
    """The sub-model of one exported layer: input ``x.<layer>``, output ``y.<layer>`` and (with
    ``weight_output``) the dequantized weight, with only that layer's initializers, data inline.

    ``model`` is a path to an exported ``model.onnx`` (only this layer's external data is read) or a loaded
    ``ModelProto`` (its external data already loaded)."""
    onnx = _onnx()
    from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

    base = None
    if isinstance(model, (str, os.PathLike)):
        base = os.path.dirname(os.fspath(model))
        model = onnx.load(os.fspath(model), load_external_data=False)
    g = model.graph
    producer = {o: nd for nd in g.node for o in nd.output}
    out = f"y.{layer}"
    if out not in producer:
        raise FP4FmtError(f"no exported layer {layer!r} (no node produces {out!r})")
    inits = {t.name: t for t in g.initializer}
    nodes, seen, stack = [], set(), [out]
    while stack:
        v = stack.pop()
        nd = producer.get(v)
        if nd is None or id(nd) in seen:
            continue
        seen.add(id(nd))
        nodes.append(nd)
        stack.extend(nd.input)
    order = {id(nd): i for i, nd in enumerate(g.node)}
    nodes = sorted(nodes, key=lambda nd: order[id(nd)])
    used = [i for nd in nodes for i in nd.input if i in inits]
    tensors = []
    for name in dict.fromkeys(used):
        t = onnx.TensorProto()
        t.CopyFrom(inits[name])
        if uses_external_data(t):
            if base is None:
                raise FP4FmtError("the model's external data is not loaded; pass the model.onnx path instead", tensor=name)
            load_external_data_for_tensor(t, base)
            del t.external_data[:]
            t.data_location = onnx.TensorProto.DEFAULT
        tensors.append(t)
    x = next(i for i in g.input if i.name == f"x.{layer}")
    y = next(o for o in g.output if o.name == out)
    outputs = [y]
    gemm = producer[out]
    if weight_output:
        n = y.type.tensor_type.shape.dim[1].dim_value
        k = x.type.tensor_type.shape.dim[1].dim_value
        outputs.append(onnx.helper.make_tensor_value_info(gemm.input[1], onnx.TensorProto.FLOAT, [n, k]))
    sub = onnx.helper.make_graph(nodes, f"{g.name}.{layer}", [x], outputs, initializer=tensors)
    return onnx.helper.make_model(sub, opset_imports=list(model.opset_import), ir_version=model.ir_version,
                                  producer_name=model.producer_name, producer_version=model.producer_version)


__all__ = [
    "DATA_NAME",
    "FORMAT",
    "MODEL_NAME",
    "SCALE_FORMATS",
    "ExportReport",
    "export_checkpoint",
    "flat_codes",
    "layer_model",
    "layer_name",
    "quantized_linear_model",
    "skip_reason",
]
