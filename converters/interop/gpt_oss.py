"""The Hugging Face gpt-oss MXFP4 layout (spec §8.3; transformers ``integrations/mxfp4.py``): export an fp4fmt
MXFP4 checkpoint directory to it, and import such a checkpoint into fp4fmt. Nothing is re-quantized: the
packed codes and the E8M0 scale bytes are the same bytes in both formats, only reshaped.

What the export writes
----------------------

* **Quantized tensors.** An fp4fmt MXFP4 tensor ``NAME`` becomes ``NAME_blocks`` (U8, shape
  ``storage_shape[:-1] + [K/32, 16]``: fp4fmt's codes with the last axis cut into 16-byte blocks) and
  ``NAME_scales`` (U8, ``storage_shape[:-1] + [K/32]``: fp4fmt's E8M0 scale codes, linear layout;
  swizzled fp4fmt scales are unswizzled). For a fused-experts tensor this is gpt-oss's
  ``gate_up_proj_blocks`` ``[E, 2I, H/32, 16]`` / ``gate_up_proj_scales`` ``[E, 2I, H/32]`` and
  ``down_proj_blocks`` ``[E, H, I/32, 16]`` / ``down_proj_scales``: rows are output features, blocks run
  along the input features. An fp4fmt experts tensor has that storage order whether it is the Hugging Face
  ``[E, in, out]`` (``axis = 1``, what ``fp4fmt convert`` writes for gpt-oss) or ``[E, out, in]``
  (``axis = 2``).
* **Values.** gpt-oss decodes ``LUT[nibble] * 2^(scale - 127)`` with the even element in the low nibble
  and the standard E2M1 code order: the decoding of spec §5.3, so every value is the same float32.
  (transformers' ``convert_moe_packed_tensors`` returns ``[E, K, N]``, the ``axis = 1`` logical shape.)
* **Which tensors.** transformers' loader reads MXFP4 only for the MoE experts (``...experts.gate_up_proj``
  and ``...experts.down_proj``, 3-D). Any other quantized tensor is refused by default, with the advice to
  convert with those layers kept; ``dense="blocks"`` writes them in the same ``_blocks`` / ``_scales``
  layout anyway (the layout holds any rank >= 1; no known loader reads it). In one experts module,
  ``gate_up_proj`` and ``down_proj`` must be both quantized or both kept.
* **Refused.** NVFP4 tensors (gpt-oss is MXFP4 only); a blocked length that is not a multiple of 32 (the
  layout stores whole blocks and has no field for the logical length); an experts tensor blocked along
  axis 0.
* **Plain tensors** (attention, router, biases, embeddings, norms) are copied unchanged.
* **Files.** Each fp4fmt shard becomes one safetensors shard of the same name, laid out as the
  ``safetensors`` library lays it out, with the shard's user metadata (``"format": "pt"`` added if
  absent); an index for several shards; side files copied. ``config.json`` gets ``quantization_config =
  {"quant_method": "mxfp4", "modules_to_not_convert": [...]}`` (written as Hugging Face writes configs:
  sorted keys, indent 2): the modules kept in high precision (2-D+ float tensors) plus ``lm_head``, less
  any module that holds a quantized tensor.

What the import reads
---------------------

``config.json`` with ``quant_method: "mxfp4"``; every U8 ``X_blocks`` (last dimension 16) with its U8
``X_scales`` (``X_blocks.shape[:-1]``) becomes the fp4fmt MXFP4 tensor ``X``: codes ``blocks.reshape(...,
K/2)``, scales unchanged, ``K = 32 * blocks.shape[-2]``. A 3-D tensor gets the Hugging Face logical shape
``[E, K, N]`` with ``axis = 1`` (what ``fp4fmt convert`` gives for gpt-oss's BF16 experts); any other rank
is blocked along its last axis. ``dtype`` is the model's (``config.json``); ``scale_rule`` is ``"floor"``
(the rule behind the released gpt-oss scales is not documented; spec §8.3), ``quantizer`` ``"rtn"``.
An E8M0 scale 0xFF (NaN in fp4fmt) is refused. Everything else is kept as plain tensors.

Lossless both ways
------------------

Codes, scale bytes and plain tensors come back byte for byte. Descriptor fields the layout cannot hold
(``axis = 2`` for a 3-D tensor, a ``dtype`` other than the model's, another ``scale_rule`` or
``quantizer``, swizzled scales) travel in the shard metadata under ``fp4fmt_descriptors``, only for the
tensors that need them, and the import applies and removes them. A gpt-oss ``quantization_config`` other
than what the export would write (e.g. wildcard ``modules_to_not_convert``) is kept in the fp4fmt
``quantization_config`` under ``imported_from`` and written back by the export.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np

from ...descriptor import TensorDescriptor
from ...errors import FormatError, FP4FmtError
from ...files import safe_open
from ..source import INDEX_NAME, SourceCheckpoint
from .common import OutputDir, index_json, open_fp4_checkpoint
from .modelopt import (
    HINTS_KEY,
    IMPORTED_FROM,
    InteropReport,
    Progress,
    apply_hints,
    check_paths,
    counter,
    excluded_modules,
    file_metadata,
    fp4_shard_entries,
    fp4fmt_quantization_config,
    hint_fields,
    kept_modules,
    model_dtype,
    qtensor_for,
    read_hints,
    with_quantization_config,
    write_export_shard,
    write_fp4fmt_index,
    write_fp4fmt_shard,
)

FORMAT = "gpt-oss"
QUANT_METHOD = "mxfp4"
BLOCK_BYTES = 16  # 32 E2M1 codes per block
DENSE_POLICIES = ("error", "blocks")
_EXPERTS = re.compile(r"(^|\.)experts\.(gate_up_proj|down_proj)$")


def _default_descriptor(name: str, storage: tuple[int, ...], dtype: str) -> TensorDescriptor:
    """What the import assumes without a hint: [E, K, N] (axis 1) for 3-D, else blocked along the last axis."""
    axis = 1 if len(storage) == 3 else len(storage) - 1
    shape = list(storage[:-1])
    shape.insert(axis, storage[-1])
    return TensorDescriptor(name, "mxfp4", tuple(shape), dtype, axis, "linear", "floor", "rtn")


def detect(path: str | os.PathLike) -> bool:
    """True if ``path`` is a directory whose config.json says ``quant_method: "mxfp4"`` (the gpt-oss HF
    format). Never raises."""
    try:
        cfg = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
        return isinstance(cfg, dict) and (cfg.get("quantization_config") or {}).get("quant_method") == QUANT_METHOD
    except (OSError, ValueError, AttributeError, TypeError):
        return False


# ------------------------------------------------------------------------------------------------------
# export


def export_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, *, overwrite: bool = False,
                      progress: Progress = None, dense: str = "error") -> InteropReport:
    """Write fp4fmt MXFP4 checkpoint directory ``src`` in the gpt-oss HF layout in ``dst`` (module docstring).
    ``dense``: ``"error"`` refuses quantized tensors other than MoE experts (transformers reads only those),
    ``"blocks"`` writes them in the blocks layout too. The source is only read; ``dst`` appears complete or
    not at all."""
    if dense not in DENSE_POLICIES:
        raise FP4FmtError(f"dense must be one of {DENSE_POLICIES}, got {dense!r}")
    ck = open_fp4_checkpoint(src)
    out_path = Path(dst)
    check_paths(ck.path, out_path)
    entries = {s: fp4_shard_entries(s) for s in ck.shards}
    every_plain = {n: v for s in ck.shards for n, v in entries[s][1].items()}
    every_quant = {n for s in ck.shards for n in entries[s][0]}
    dtype = model_dtype(ck.config)
    stored: set[str] = set()
    for shard in ck.shards:
        for name, td in entries[shard][0].items():
            if td.scheme != "mxfp4":
                raise FP4FmtError("is NVFP4: the gpt-oss layout is MXFP4 only (convert with --scheme mxfp4, or export "
                                  "with --to modelopt)", file=shard, tensor=name)
            geo = td.geometry
            if geo.padding:
                raise FP4FmtError(f"blocked length {geo.k} is not a multiple of 32: the gpt-oss layout stores whole "
                                  "blocks and has no field for the logical length", file=shard, tensor=name)
            expert = _EXPERTS.search(name) and len(td.shape) == 3
            if expert and td.axis == 0:
                raise FP4FmtError(f"experts tensor {list(td.shape)} blocked along axis 0 (the experts); expected the "
                                  "input-feature axis 1 or 2", file=shard, tensor=name)
            if not expert and dense == "error":
                raise FP4FmtError("transformers' gpt-oss MXFP4 loader reads only the MoE experts (3-D "
                                  "experts.gate_up_proj / experts.down_proj); convert with this layer kept in high "
                                  "precision (e.g. --ignore self_attn), or export with dense='blocks' to write it "
                                  "in the blocks layout anyway", file=shard, tensor=name)
            if expert:
                module = name.rsplit(".", 1)[0]
                for proj in ("gate_up_proj", "down_proj"):
                    other = f"{module}.{proj}"
                    if other not in every_quant and other in every_plain:
                        raise FP4FmtError(f"{other} is kept in high precision while {name} is quantized: gpt-oss "
                                          "loads one experts module all MXFP4 or all unquantized", file=shard,
                                          tensor=name)
            for n in (name + "_blocks", name + "_scales"):
                if n in every_plain or n in stored:
                    raise FP4FmtError(f"output name {n!r} is used twice", file=shard, tensor=name)
                stored.add(n)
    if not every_quant:
        raise FP4FmtError("no quantized tensor: nothing to export as MXFP4", file=ck.path)

    qc = {"modules_to_not_convert": excluded_modules(every_plain, every_quant), "quant_method": QUANT_METHOD}
    notes = []
    kept = (ck.quantization_config or {}).get(IMPORTED_FROM)
    if isinstance(kept, dict) and kept.get("format") == FORMAT:
        k_qc = kept.get("quantization_config")
        if isinstance(k_qc, dict) and k_qc.get("quant_method") == QUANT_METHOD:
            qc = k_qc
            notes.append("quantization_config restored from the gpt-oss checkpoint this one was imported from")

    total = sum(len(q) + len(p) for q, p in entries.values())
    tick = counter("exporting", total, progress)
    weight_map: dict[str, str] = {}
    total_bytes = 0
    with OutputDir(out_path, overwrite) as out:
        for shard in ck.shards:
            quant = entries[shard][0]
            tensors: dict[str, np.ndarray] = {}
            hints: dict[str, dict] = {}
            with safe_open(shard) as f:
                for name in f.keys():
                    td = quant.get(name)
                    if td is None:
                        tensors[name] = f.get_tensor(name)
                    else:
                        qt = f.get_tensor(name)
                        geo = td.geometry
                        tensors[name + "_blocks"] = qt.codes.reshape(*geo.storage_shape[:-1], geo.n_blocks, BLOCK_BYTES)
                        tensors[name + "_scales"] = qt.scale_codes()
                        h = hint_fields(td, _default_descriptor(name, geo.storage_shape, dtype))
                        if h:
                            hints[name] = h
                    tick()
                meta = {"format": "pt", **f.metadata()}
            total_bytes += write_export_shard(out.file(shard.name), tensors, meta, hints)
            weight_map.update({n: shard.name for n in tensors})
        if len(ck.shards) > 1:
            out.write_json(INDEX_NAME, index_json(weight_map, total_bytes))
        out.write_json("config.json", with_quantization_config(ck.config, qc))
        out.copy_side_files(ck.side_files)
    return InteropReport(out_path, FORMAT, len(every_quant), len(every_plain), tuple(s.name for s in ck.shards),
                         tuple(notes))


# ------------------------------------------------------------------------------------------------------
# import


def _plan_import(sc: SourceCheckpoint) -> dict[str, tuple[str, str, tuple[int, ...]]]:
    """fp4fmt name -> (blocks name, scales name, storage shape) for every blocks/scales pair."""
    found = {}
    for name in sorted(sc.tensors):
        t = sc.tensors[name]
        if not name.endswith("_blocks"):
            continue
        base = name[: -len("_blocks")]
        s = sc.tensors.get(base + "_scales")
        if t.dtype != "U8" or len(t.shape) < 2 or t.shape[-1] != BLOCK_BYTES:
            if s is not None:
                raise FP4FmtError(f"{t.dtype} {list(t.shape)}: MXFP4 blocks are U8 [..., K/32, 16]", file=t.file,
                                  tensor=name)
            continue
        if s is None:
            raise FP4FmtError(f"MXFP4 blocks without {base + '_scales'!r}", file=t.file, tensor=name)
        if s.dtype != "U8" or tuple(s.shape) != tuple(t.shape[:-1]):
            raise FP4FmtError(f"scales are {s.dtype} {list(s.shape)}; expected U8 {list(t.shape[:-1])} (one E8M0 "
                              "byte per 32-element block)", file=s.file, tensor=base + "_scales")
        if base in sc.tensors:
            raise FP4FmtError(f"{base!r} is stored both quantized and unquantized", file=t.file, tensor=name)
        found[base] = (name, base + "_scales", tuple(t.shape[:-2]) + (t.shape[-2] * 32,))
    return found


def import_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, *, overwrite: bool = False,
                      progress: Progress = None) -> InteropReport:
    """Write gpt-oss HF MXFP4 checkpoint directory ``src`` as an fp4fmt checkpoint in ``dst`` (module
    docstring). Lossless: codes, scale bytes and every other tensor are copied unchanged."""
    sc = SourceCheckpoint(src)
    if not sc.path.is_dir() or sc.config is None:
        raise FP4FmtError("expected a gpt-oss checkpoint directory with config.json", file=sc.path)
    out_path = Path(dst)
    check_paths(sc.path, out_path)
    src_qc = sc.config.get("quantization_config")
    if not isinstance(src_qc, dict) or src_qc.get("quant_method") != QUANT_METHOD:
        raise FP4FmtError(f"config.json quantization_config.quant_method is not {QUANT_METHOD!r}",
                          file=sc.path / "config.json")
    dtype = model_dtype(sc.config)
    found = _plan_import(sc)
    if not found:
        raise FP4FmtError("no MXFP4 tensor (X_blocks with X_scales)", file=sc.path)
    used = {n for b, s, _ in found.values() for n in (b, s)}
    owner = {b: base for base, (b, _, _) in found.items()}

    hints = {f: read_hints(file_metadata(f), f) for f in sc.files}
    plans: dict[Path, list] = {f: [] for f in sc.files}
    tds: dict[str, TensorDescriptor] = {}
    plain: dict[str, tuple[str, tuple[int, ...]]] = {}
    for name in sorted(sc.tensors):
        t = sc.tensors[name]
        if name in owner:
            base = owner[name]
            td = apply_hints(_default_descriptor(base, found[base][2], dtype), hints[t.file].pop(base, None),
                             file=t.file)
            tds[base] = td
            plans[t.file].append((base, td))
        elif name not in used:
            plain[name] = (t.dtype, t.shape)
            plans[t.file].append((name, (t.dtype, t.shape)))
    for f, left in hints.items():
        if left:
            raise FormatError(f"{HINTS_KEY} names tensors that are not quantized here: {sorted(left)[:3]}", file=f)

    def read(name: str):
        if name not in found:
            return sc.read(name)
        b, s, storage = found[name]
        codes = sc.read(b).reshape(*storage[:-1], storage[-1] // 2)
        return qtensor_for(tds[name], codes, sc.read(s), None, file=sc.tensors[b].file)

    rules = {td.scale_rule for td in tds.values()}
    fresh = {"modules_to_not_convert": excluded_modules(plain, found), "quant_method": QUANT_METHOD}
    keep = None if src_qc == fresh else {"format": FORMAT, "quantization_config": src_qc}
    qc = fp4fmt_quantization_config("mxfp4", rules.pop() if len(rules) == 1 else "floor", False,
                                    kept_modules(plain), keep)
    tick = counter("importing", len(found) + len(plain), progress)
    with OutputDir(out_path, overwrite) as out:
        weight_map: dict[str, str] = {}
        for f in sc.files:
            meta = {k: v for k, v in file_metadata(f).items() if k != HINTS_KEY}
            write_fp4fmt_shard(out.file(f.name), plans[f], meta, read, tick)
            with safe_open(out.file(f.name)) as g:
                weight_map.update({n: f.name for n in g.stored_keys()})
        if len(sc.files) > 1:
            write_fp4fmt_index(out, [f.name for f in sc.files], weight_map)
        out.write_json("config.json", with_quantization_config(sc.config, qc))
        out.copy_side_files(sc.side_files())
    return InteropReport(out_path, "fp4fmt", len(found), len(plain), tuple(f.name for f in sc.files),
                         ("gpt-oss quantization_config kept under quantization_config.imported_from",) if keep else ())


__all__ = ["DENSE_POLICIES", "FORMAT", "detect", "export_checkpoint", "import_checkpoint"]
