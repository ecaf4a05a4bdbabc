"""torch adapter (extra ``[torch]``): QTensor <-> torch tensors, the :class:`FP4Linear` module and
:func:`from_pretrained`, which loads a converted checkpoint into its transformers model with the quantized
linear layers kept packed.

    >>> import fp4fmt.torch as ft
    >>> model = ft.from_pretrained("smollm2-nvfp4")          # FP4Linear layers hold codes + scales only
    >>> layer = ft.FP4Linear.from_qtensor(qt, bias=None)     # one layer from a QTensor

Decoding follows spec §5.3 bit for bit: a weight is fl32(E2M1(code) * f), f = fl32(scale * tensor_scale)
(NVFP4) or 2^(e - 127) (MXFP4); it is then rounded once to the compute dtype. On CUDA the Triton kernels of
``fp4fmt.kernels`` consume the packed weights directly; on CPU the weight is decoded ``tile_rows`` output rows
at a time (or once, with ``cache=True``) and multiplied with torch's matmul.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import dtypes, layout, schemes
from .errors import FormatError, FP4FmtError
from .files import safe_open
from .qtensor import QTensor, _native

KERNEL_PATHS = ("weight_only", "dot_scaled")
# per-layer activation and KV-cache scales that imported checkpoints (e.g. modelopt W4A4) carry; the weights-only
# runtime here does not quantize activations, so from_pretrained skips them
ACTIVATION_SCALES = ("input_scale", "output_scale", "k_scale", "v_scale")  # fp4fmt.kernels paths a layer can be pinned to

__all__ = ["FP4Linear", "from_pretrained", "from_torch", "to_torch", "dequantize", "numpy_to_torch"]

# ------------------------------------------------------------------------------------------------------
# zero-copy conversion

_SCALE_DTYPES = {"nvfp4": torch.float8_e4m3fn, "mxfp4": torch.float8_e8m0fnu}
_E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])
# byte -> (value of its low nibble, value of its high nibble): element 2i is in the low nibble (spec §4.3)
_E2M1_PAIRS = torch.stack([_E2M1.repeat(16), _E2M1.repeat_interleave(16)], dim=1).contiguous()

_TORCH_OF_NUMPY = {
    "bfloat16": torch.bfloat16,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "float8_e5m2": torch.float8_e5m2,
    "float8_e8m0fnu": torch.float8_e8m0fnu,
}


def numpy_to_torch(a: np.ndarray, *, copy: bool = False) -> torch.Tensor:
    """A numpy array (ml_dtypes bfloat16 / float8 included) as a torch tensor sharing its memory; with
    ``copy`` (needed for read-only views, e.g. of a memory-mapped file) a private writable copy."""
    a = np.asarray(a)
    if copy or not a.flags.writeable:
        a = np.array(a, copy=True)
    special = _TORCH_OF_NUMPY.get(a.dtype.name)
    if special is None:
        return torch.from_numpy(np.ascontiguousarray(a))
    raw = np.ascontiguousarray(a).view(np.uint8 if a.dtype.itemsize == 1 else np.uint16)
    return torch.from_numpy(raw).view(special)


def to_torch(qt: QTensor, *, copy: bool = False) -> dict[str, torch.Tensor]:
    """The parts of ``qt`` as torch tensors: ``codes`` uint8, ``scales`` float8_e4m3fn (NVFP4) or
    float8_e8m0fnu (MXFP4), and for NVFP4 ``tensor_scale`` (float32, 0-dim). Zero-copy unless ``copy``."""
    out = {
        "codes": numpy_to_torch(qt.codes, copy=copy),
        "scales": numpy_to_torch(qt.scales.view(np.uint8), copy=copy).view(_SCALE_DTYPES[qt.scheme]),
    }
    if qt.tensor_scale is not None:
        out["tensor_scale"] = torch.tensor(float(qt.tensor_scale), dtype=torch.float32)
    return out


def from_torch(
    codes: torch.Tensor,
    scales: torch.Tensor,
    tensor_scale: torch.Tensor | float | None,
    *,
    scheme: str,
    shape: tuple[int, ...],
    axis: int = -1,
    dtype: str = "BF16",
    scale_layout: str = "linear",
    scale_rule: str | None = None,
) -> QTensor:
    """A QTensor whose parts share memory with the given CPU tensors (validated like any QTensor)."""
    sch = schemes.get_scheme(scheme)
    c = codes.detach().cpu()
    s = scales.detach().cpu()
    if c.dtype != torch.uint8 or s.element_size() != 1:
        raise FormatError(f"codes must be uint8 and scales one byte per element, got {c.dtype} and {s.dtype}")
    s_np = s.contiguous().view(torch.uint8).numpy().view(dtypes.numpy_dtype(sch.scale_dtype))
    ts = None if tensor_scale is None else float(tensor_scale)
    return QTensor(scheme=sch.name, shape=tuple(shape), codes=c.contiguous().numpy(), scales=s_np, tensor_scale=ts,
                   axis=axis, dtype=dtype, scale_layout=scale_layout, scale_rule=scale_rule)


# ------------------------------------------------------------------------------------------------------
# decoding in torch (any device)


def block_factors(scales: torch.Tensor, tensor_scale: torch.Tensor | None) -> torch.Tensor:
    """float32 block factors f of linear-layout scales: fl32(E4M3 * tensor_scale) or 2^(e-127) (§5.3)."""
    f = scales.to(torch.float32)
    if scales.dtype == torch.float8_e8m0fnu:  # torch maps code 0 to 2^-127 exactly; 0xFF is refused on load
        return f
    return f * tensor_scale.to(torch.float32)


def dequantize(
    codes: torch.Tensor,
    scales: torch.Tensor,
    tensor_scale: torch.Tensor | None,
    k: int,
    out_dtype: torch.dtype = torch.float32,
    *,
    implementation: str = "auto",
) -> torch.Tensor:
    """Decode 2-D packed weights ``codes [N, padded_k/2]`` with linear ``scales [N, n_blocks]`` into
    ``[N, k]`` of ``out_dtype`` (float32 values are exactly those of ``fp4fmt.dequantize``; other dtypes are
    those values rounded once). On CPU the C accelerator does it (float32 and bfloat16 written directly);
    elsewhere, or with ``implementation="torch"``, torch operations do."""
    n, half = codes.shape
    nb = scales.shape[-1]
    block = (2 * half) // nb
    if implementation not in ("auto", "torch"):
        raise ValueError(f"implementation must be 'auto' or 'torch', got {implementation!r}")
    if (implementation == "auto" and codes.device.type == "cpu" and _native is not None
            and out_dtype in (torch.float32, torch.bfloat16)):
        out = torch.empty((n, k), dtype=out_dtype)
        nv = scales.dtype != torch.float8_e8m0fnu
        _native.dequantize(codes.contiguous().numpy(), scales.contiguous().view(torch.uint8).numpy(), n, 2 * half, k,
                           block, 0 if nv else 1, float(tensor_scale) if nv else 0.0,
                           out.view(torch.uint16 if out_dtype == torch.bfloat16 else torch.float32).numpy(),
                           out_dtype == torch.bfloat16, torch.get_num_threads())
        return out
    pairs = _E2M1_PAIRS.to(codes.device)
    vals = pairs.index_select(0, codes.reshape(-1).to(torch.int32)).view(n, nb, block)
    vals.mul_(block_factors(scales, tensor_scale).view(n, nb, 1))
    w = vals.view(n, nb * block)[:, :k]
    return w if out_dtype == torch.float32 else w.to(out_dtype)


# ------------------------------------------------------------------------------------------------------
# FP4Linear


class FP4Linear(nn.Module):
    """``y = x @ W.T + b`` with W kept packed: buffers ``codes`` (uint8 ``[N, padded_k/2]``), ``scales``
    (float8 ``[N, n_blocks]``, or the swizzled layout of §6.4 as stored), ``tensor_scale`` (NVFP4), and the
    bias in the compute dtype. Its weight memory is the packed size.

    ``backend``: ``"auto"`` (Triton on CUDA via ``fp4fmt.kernels.fp4_linear``, torch decoding elsewhere),
    ``"torch"`` (decode with torch on any device), or a ``fp4fmt.kernels`` path name (``"weight_only"``,
    ``"dot_scaled"``; on a CPU tensor that needs ``TRITON_INTERPRET=1``). ``cache=True`` keeps the decoded weight after the first call (fast, BF16-sized).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        scheme: str = "nvfp4",
        bias: bool = False,
        scale_layout: str = "linear",
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
        backend: str = "auto",
        cache: bool = False,
        tile_rows: int = 2048,
    ):
        super().__init__()
        sch = schemes.get_scheme(scheme)
        geo = layout.geometry((out_features, in_features), -1, sch.block_size, scale_layout)
        self.in_features, self.out_features = in_features, out_features
        self.scheme, self.block_size, self.scale_layout = sch.name, sch.block_size, scale_layout
        self.compute_dtype, self.backend, self.cache, self.tile_rows = dtype, backend, cache, tile_rows
        self.register_buffer("codes", torch.zeros(geo.codes_shape, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.zeros(geo.scales_shape, dtype=torch.uint8, device=device)
                             .view(_SCALE_DTYPES[sch.name]))
        if sch.has_tensor_scale:
            self.register_buffer("tensor_scale", torch.ones((), dtype=torch.float32, device=device))
        else:
            self.tensor_scale = None
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None
        self._cached: torch.Tensor | None = None

    # -- construction ------------------------------------------------------------------------------------
    @classmethod
    def from_qtensor(cls, qt: QTensor, bias: torch.Tensor | np.ndarray | None = None, *, copy: bool = True,
                     **kwargs) -> FP4Linear:
        """A layer holding ``qt``'s parts (a copy, or with ``copy=False`` the very arrays, which must then be
        writable and not shared); ``qt`` must be 2-D ``[out, in]`` blocked along ``in``."""
        if len(qt.shape) != 2 or qt.axis != 1:
            raise FormatError(f"FP4Linear needs a 2-D weight blocked along its last axis, got shape {qt.shape} "
                              f"axis {qt.axis}")
        out_f, in_f = qt.shape
        layer = cls(in_f, out_f, scheme=qt.scheme, bias=bias is not None, scale_layout=qt.scale_layout,
                    device="meta", **kwargs)
        parts = to_torch(qt, copy=copy)
        layer.codes, layer.scales = parts["codes"], parts["scales"]
        if layer.tensor_scale is not None:
            layer.tensor_scale = parts["tensor_scale"]
        if bias is not None:
            b = bias if isinstance(bias, torch.Tensor) else numpy_to_torch(np.asarray(bias), copy=True)
            layer.bias = nn.Parameter(b.reshape(-1).to(layer.compute_dtype).clone() if copy else
                                      b.reshape(-1).to(layer.compute_dtype), requires_grad=False)
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme: str = "nvfp4", **kwargs) -> FP4Linear:
        """Quantize an ``nn.Linear`` (its weight through ``fp4fmt.quantize``, the bias kept)."""
        from .qtensor import quantize

        w = linear.weight.detach().cpu()
        arr = w.view(torch.uint16).numpy().view(dtypes.numpy_dtype("BF16")) if w.dtype == torch.bfloat16 else w.float().numpy()
        qt = quantize(arr, scheme)
        bias = None if linear.bias is None else linear.bias.detach().cpu()
        kwargs.setdefault("dtype", linear.weight.dtype if linear.weight.is_floating_point() else torch.bfloat16)
        return cls.from_qtensor(qt, bias, **kwargs).to(linear.weight.device)

    def to_qtensor(self) -> QTensor:
        """The layer's weight as a QTensor (zero-copy on CPU)."""
        return from_torch(self.codes, self.scales, self.tensor_scale, scheme=self.scheme,
                          shape=(self.out_features, self.in_features), scale_layout=self.scale_layout)

    # -- computing ---------------------------------------------------------------------------------------
    def linear_scales(self) -> torch.Tensor:
        """The scales in the linear ``[N, n_blocks]`` layout (a copy when stored swizzled)."""
        if self.scale_layout == "linear":
            return self.scales
        nb = layout.ceil_div(self.in_features, self.block_size)
        raw = self.scales.view(torch.uint8)
        rb, cb = raw.shape[0] // 32, raw.shape[1] // 16
        t = raw.reshape(rb, cb, 32, 4, 4).permute(0, 3, 2, 1, 4).reshape(rb * 128, cb * 4)
        return t[: self.out_features, :nb].contiguous().view(self.scales.dtype)

    def weight(self, dtype: torch.dtype | None = None, rows: slice = slice(None)) -> torch.Tensor:
        """Decoded weight rows ``[rows, in_features]`` (float32 values of spec §5.3, then ``dtype``)."""
        scales = self.linear_scales()
        return dequantize(self.codes[rows], scales[rows], self.tensor_scale, self.in_features,
                          dtype or self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected input with last dimension {self.in_features}, got {tuple(x.shape)}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if x2.dtype != self.compute_dtype:
            x2 = x2.to(self.compute_dtype)
        if self.backend in KERNEL_PATHS or (self.backend == "auto" and x2.is_cuda):
            from fp4fmt.kernels import fp4_linear

            y = fp4_linear(x2, self.codes, self.scales, self.tensor_scale, self.in_features, bias=self.bias,
                           scale_layout=self.scale_layout, path="auto" if self.backend == "auto" else self.backend)
            return y.reshape(*lead, self.out_features)
        if self.cache:
            if self._cached is None:
                self._cached = self.weight()
            y = torch.nn.functional.linear(x2, self._cached, self.bias)
        else:
            y = torch.empty((x2.shape[0], self.out_features), dtype=x2.dtype, device=x2.device)
            scales = self.linear_scales()  # once per call: a copy when the scales are stored swizzled
            for r0 in range(0, self.out_features, self.tile_rows):
                r1 = min(r0 + self.tile_rows, self.out_features)
                b = None if self.bias is None else self.bias[r0:r1]
                w = dequantize(self.codes[r0:r1], scales[r0:r1], self.tensor_scale, self.in_features, self.compute_dtype)
                y[:, r0:r1] = torch.nn.functional.linear(x2, w, b)
        return y.reshape(*lead, self.out_features)

    def packed_bytes(self) -> int:
        """Bytes of the weight as held: codes, scales and tensor scale."""
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scales, self.tensor_scale) if t is not None)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme}, "
                f"bias={self.bias is not None}, scale_layout={self.scale_layout}, backend={self.backend}")


# ------------------------------------------------------------------------------------------------------
# whole checkpoints


@contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device (no memory); buffers stay real, so
    computed non-persistent buffers (rotary frequencies) keep their values."""
    original = nn.Module.register_parameter

    def register(module, name, param):
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def _shards(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [path / f for f in sorted(set(weight_map.values()))]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FP4FmtError("no .safetensors files", file=path)
    return files


def _read_quantized(f: safe_open, name: str) -> QTensor:
    """A quantized tensor of an open file, its parts read into fresh memory (validated as a QTensor)."""
    td = f.tensor_descriptor(name)
    parts = {k: f.read_raw(v) for k, v in td.part_names().items()}
    try:
        return QTensor(scheme=td.scheme, shape=td.shape, codes=parts["codes"], scales=parts["scales"],
                       tensor_scale=parts["tensor_scale"][()] if "tensor_scale" in parts else None, axis=td.axis,
                       dtype=td.dtype, scale_layout=td.scale_layout, scale_rule=td.scale_rule)
    except FormatError as e:
        raise FormatError(e.rule, file=f.filename, tensor=name) from None


def _set_module(root: nn.Module, dotted: str, module: nn.Module) -> None:
    parent, _, leaf = dotted.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def from_pretrained(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    backend: str = "auto",
    cache: bool = False,
    verify: bool = False,
    model_class=None,
) -> nn.Module:
    """The transformers model of a converted checkpoint directory, with an :class:`FP4Linear` in place of each
    linear layer whose weight is stored quantized. Parameters are created on the meta device and filled
    tensor by tensor (read with ``pread`` into the buffers the model keeps), so the BF16 model is never
    materialized. Quantized tensors that are not a linear layer's weight (fused MoE experts) are decoded into
    their parameter in ``dtype``. ``verify`` checks every checksum and scale first (``fp4fmt verify``).
    """
    import transformers

    root = Path(path)
    cfg_file = root / "config.json"
    if not cfg_file.exists():
        raise FP4FmtError("no config.json: not a converted Hugging Face checkpoint directory", file=root)
    cfg = json.loads(cfg_file.read_text())
    qc = cfg.pop("quantization_config", None)
    if not qc or qc.get("quant_method") != "fp4fmt":
        raise FP4FmtError("config.json has no fp4fmt quantization_config: convert the checkpoint with "
                          "`fp4fmt convert` first", file=cfg_file)
    config = transformers.AutoConfig.for_model(**cfg)
    if model_class is None:
        arch = (cfg.get("architectures") or [None])[0]
        model_class = getattr(transformers, arch, None) if arch else None
        if model_class is None:
            raise FP4FmtError(f"unknown architecture {arch!r}; pass model_class=", file=cfg_file)
    with _parameters_on_meta():
        model = model_class(config)
    model.eval()
    names = dict(model.named_parameters(remove_duplicate=False))
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    loaded: set[str] = set()
    for shard in _shards(root):
        with safe_open(shard) as f:
            if verify:
                f.verify()
            quantized = set(f.descriptor.tensors) if f.descriptor else set()
            keys = set(f.keys())
            for name in sorted(keys):
                if name in loaded:
                    continue
                module_name = name.rsplit(".", 1)[0]
                if name in quantized:
                    qt = _read_quantized(f, name)
                    if name.endswith(".weight") and module_name in linears and len(qt.shape) == 2 and qt.axis == 1:
                        bias_name = module_name + ".bias"
                        bias = numpy_to_torch(f.read_raw(bias_name)) if bias_name in keys else None
                        layer = FP4Linear.from_qtensor(qt, bias, dtype=dtype, backend=backend, cache=cache, copy=False)
                        _set_module(model, module_name, layer.to(device))
                        loaded.update({name, bias_name})
                        continue
                    from .qtensor import dequantize as np_dequantize

                    t = numpy_to_torch(np_dequantize(qt, name=name)).to(dtype)
                else:
                    t = numpy_to_torch(f.read_raw(name))
                    t = t.to(dtype) if t.is_floating_point() else t
                if name not in names:
                    if name.rsplit(".", 1)[-1] in ACTIVATION_SCALES:
                        continue  # activation / KV-cache quantization of another runtime: unused here
                    raise FP4FmtError("tensor has no parameter in the model", file=shard, tensor=name)
                _set_param(model, name, t.to(device))
                loaded.add(name)
    if getattr(config, "tie_word_embeddings", False) or getattr(config.get_text_config(), "tie_word_embeddings", False):
        model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise FP4FmtError(f"{len(missing)} parameter(s) of the model are not in the checkpoint, e.g. {missing[:3]}",
                          file=root)
    return model.to(device)


def _set_param(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    old = module._parameters.get(leaf)
    if old is None:
        raise FP4FmtError(f"{name} is not a parameter of the model")
    if tuple(old.shape) != tuple(tensor.shape):
        raise FP4FmtError(f"shape {tuple(tensor.shape)} does not match the model's {tuple(old.shape)}", tensor=name)
    module._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
