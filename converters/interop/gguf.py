"""Export an fp4fmt checkpoint of a Llama-architecture model to one GGUF file that llama.cpp loads
(spec §8.4). Export only: an fp4fmt directory in, a single ``.gguf`` file out; the source is never modified.

What the file holds
-------------------

* **Key-values.** ``general.architecture = "llama"``, ``general.type``, ``general.name``,
  ``general.quantized_by``, ``general.license`` (from the front matter of README.md, if it has one),
  ``general.file_type`` (``MOSTLY_MXFP4_MOE`` = 38 for MXFP4, the only MXFP4 file
  type llama.cpp defines; ``MOSTLY_NVFP4`` = 39 for NVFP4; informative only), ``general.quantization_version
  = 2``; the ``llama.*`` hyper-parameters from ``config.json`` (context_length, embedding_length,
  block_count, feed_forward_length, attention.head_count, attention.head_count_kv, rope.freq_base,
  attention.layer_norm_rms_epsilon, vocab_size, rope.dimension_count; attention.key_length / value_length
  when ``head_dim`` differs from ``hidden_size / num_attention_heads``; rope.scaling.type / factor for
  ``linear`` RoPE scaling); the tokenizer (``tokenizer.ggml.*``, below); and ``fp4fmt.format_version``,
  ``fp4fmt.scheme``, ``fp4fmt.scale_rule``, ``fp4fmt.version`` (provenance; llama.cpp ignores them).
* **Tokenizer** (from ``tokenizer.json`` / ``tokenizer_config.json`` / ``special_tokens_map.json`` /
  ``config.json``): only byte-level BPE is exported, as ``tokenizer.ggml.model = "gpt2"``. ``tokens`` are
  the vocabulary in id order (ids the tokenizer does not define, up to ``vocab_size``, become ``[PAD<i>]``
  of type UNUSED); ``token_type`` is CONTROL (3) for added special tokens, USER_DEFINED (4) for other
  added tokens, NORMAL (1) otherwise; ``merges`` as ``"left right"`` strings; ``bos/eos/unknown/padding
  _token_id`` from the token strings of tokenizer_config.json (else special_tokens_map.json, else the ids
  in config.json); ``add_bos_token`` / ``add_eos_token`` / ``add_space_prefix`` where the tokenizer config
  states them; ``chat_template``. ``tokenizer.ggml.pre`` names llama.cpp's pre-tokenizer: ``"smollm"``
  for ``Sequence[Digits(individual_digits), ByteLevel(use_regex)]``, ``"gpt-2"`` for a lone regex
  ``ByteLevel``; any other pre-tokenizer must be named by the caller (``tokenizer_pre=``), because a wrong
  guess tokenizes silently differently.
* **Tensor names** follow llama.cpp: ``token_embd``, ``blk.N.{attn_norm, attn_q, attn_k, attn_v,
  attn_output, ffn_norm, ffn_gate, ffn_up, ffn_down}``, ``output_norm``, ``output`` (not written for tied
  embeddings). GGUF lists dims innermost first, so an HF ``[out, in]`` weight has ``ne = [in, out]``.
* **Q/K rows.** llama.cpp's RoPE pairs adjacent rotary dimensions, Hugging Face rotates halves; as
  llama.cpp's converter does, the rows of ``attn_q`` (``n_head`` heads) and ``attn_k`` (``n_head_kv``
  heads) are permuted: ``w.reshape(n, 2, d/2, ...).swapaxes(1, 2)``. The weight is blocked along its
  columns, so a row permutation moves whole rows of codes and scales: exact.
* **Plain tensors.** 1-D tensors (norms) as F32 (exact). Others in their own dtype by default
  (``plain_type="auto"``: BF16 -> BF16, F16 -> F16, F32 -> F32, FP8 -> F32), or as ``"f32"``, ``"f16"`` or
  ``"bf16"`` on request; a narrowing that would change a value is refused. F64 is refused (not exact).

Quantized tensors: the conversions
----------------------------------

Every fp4fmt quantized tensor must be a 2-D weight blocked along its last axis (``axis = 1``) with no
padding (its row length ``K`` a multiple of 32 for MXFP4, of 64 for NVFP4, because ggml's ``ne[0]`` must
be a whole number of blocks). Swizzled scales are read in the linear layout. The codes are never
re-quantized: the E2M1 code of every element and every scale byte are copied, only rearranged.

* **MXFP4 -> GGML_TYPE_MXFP4 (39).** One 17-byte record per 32-element block: the E8M0 scale byte first
  (copied unchanged), then 16 bytes ``qs`` in ggml's *split-halves* order: the low nibble of ``qs[j]`` is
  element ``j`` and the high nibble element ``j + 16`` (fp4fmt pairs elements ``2j, 2j+1`` in a byte).
  ggml decodes ``kvalues[c] * 2^(e-128)`` with the doubled LUT ``{0, 1, 2, 3, 4, 6, 8, 12, ...}``, which is
  ``E2M1(c) * 2^(e-127)`` exactly: the scale byte needs no change and the values are the same float32s
  (bar the sign of zero, below).
* **NVFP4 -> GGML_TYPE_NVFP4 (40).** One 36-byte record per 64 elements: the four E4M3 scale bytes of its
  16-element sub-blocks first (copied unchanged; fp4fmt scale bytes never have the sign bit, and never are
  0x7F, which ggml would read as 0), then 32 bytes ``qs`` where, in sub-block ``s``, the low nibble of
  ``qs[8s + j]`` is element ``j`` and the high nibble element ``j + 8``. ggml decodes ``kvalues[c] *
  E4M3 * 0.5 = E2M1(c) * E4M3`` (exact). The fp4fmt tensor scale ``s2`` is not in the record: it is
  written as the F32 tensor ``<name>.scale`` of shape ``[1]``, which llama.cpp multiplies into the
  matmul output (``ggml_mul``), as its converter does for modelopt's ``weight_scale_2``. Mathematically
  ``y = (W x) * s2`` equals fp4fmt's ``W' x`` with ``W' = fl32(E2M1 * fl32(E4M3 * s2))``; in float32 the
  two roundings can differ in the last bit. llama.cpp reads ``.scale`` for the attention and MLP
  projections and for ``output``, not for ``token_embd``: an NVFP4 embedding is exported only when its
  tensor scale is exactly 1.

**The sign of zero** is the one difference in decoded values, for both types: ggml decodes through an
integer LUT, which has no -0, so code 0x8 decodes to +0.0 where fp4fmt gives -0.0 (§4.1). The code itself is
kept (it is still 0x8 in the record). Every other element, zero-scale blocks included, decodes to the same
float32 bits (with the NVFP4 tensor scale set aside).

The block packing (:func:`pack_blocks`) has an exact inverse (:func:`unpack_blocks`), so the codes, scale
bytes and tensor scales of an exported file can be recovered byte for byte.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from ... import __version__
from ...descriptor import FORMAT_VERSION
from ...errors import FP4FmtError
from ..source import read_json
from ...files import safe_open
from ...qtensor import QTensor
from .common import FP4Checkpoint, open_fp4_checkpoint

FORMAT = "gguf"
SUFFIX = ".gguf"

GGML_TYPE_F32 = 0
GGML_TYPE_F16 = 1
GGML_TYPE_BF16 = 30
GGML_TYPE_MXFP4 = 39
GGML_TYPE_NVFP4 = 40

#: scheme -> (ggml type, elements per record, bytes per record, elements per sub-block sharing one scale)
RECORDS: dict[str, tuple[int, int, int, int]] = {
    "mxfp4": (GGML_TYPE_MXFP4, 32, 17, 32),
    "nvfp4": (GGML_TYPE_NVFP4, 64, 36, 16),
}
#: scheme -> llama.cpp's ``general.file_type`` (LLAMA_FTYPE_MOSTLY_MXFP4_MOE, LLAMA_FTYPE_MOSTLY_NVFP4)
FILE_TYPES = {"mxfp4": 38, "nvfp4": 39}
GGML_QUANT_VERSION = 2

TOKEN_TYPE_NORMAL = 1
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4
TOKEN_TYPE_UNUSED = 5

PLAIN_TYPES = ("auto", "f32", "f16", "bf16")

# Hugging Face Llama name (after "model.layers.N.") -> GGUF name (after "blk.N."), in GGUF write order.
BLOCK_TENSORS = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
GLOBAL_TENSORS = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
# GGUF weights whose ``.scale`` tensor llama.cpp loads and applies (NVFP4 tensor scale).
SCALED_SUFFIXES = ("attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight",
                   "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight")
# Stored tensors llama.cpp's converter drops, and so does this one.
SKIPPED_SUFFIXES = (".rotary_emb.inv_freq",)

ProgressFn = Callable[[str, int, int], None]


# ---------------------------------------------------------------------------------------------- results


@dataclass(frozen=True)
class ExportReport:
    """What :func:`export_checkpoint` wrote: the file, its scheme and tensor counts, and notes (tensors
    skipped, conventions applied)."""

    path: Path
    scheme: str
    tensors: int
    quantized: int
    plain: int
    scale_tensors: int
    bytes: int
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class LlamaHParams:
    """The Llama hyper-parameters GGUF needs, read from ``config.json``."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    rope_scaling_factor: float | None = None  # linear RoPE scaling only


@dataclass(frozen=True)
class GGUFTokenizer:
    """The ``tokenizer.ggml.*`` / ``tokenizer.chat_template`` values of a byte-level BPE tokenizer."""

    pre: str
    tokens: tuple[str, ...]
    token_types: tuple[int, ...]
    merges: tuple[str, ...]
    special_ids: tuple[tuple[str, int], ...]  # (GGUF key suffix, id), e.g. ("bos_token_id", 1)
    flags: tuple[tuple[str, bool], ...]  # (GGUF key suffix, value), e.g. ("add_bos_token", False)
    chat_template: str | None


@dataclass(frozen=True)
class KV:
    """One GGUF key-value: ``vtype`` / ``sub_type`` are ``gguf.GGUFValueType`` names."""

    key: str
    value: Any
    vtype: str
    sub_type: str | None = None


# ----------------------------------------------------------------------------------------- block packing


def _nibbles(codes: np.ndarray) -> np.ndarray:
    """Packed fp4fmt code bytes ``[..., n]`` -> one code per element ``[..., 2n]`` (element 2j low)."""
    out = np.empty(codes.shape[:-1] + (2 * codes.shape[-1],), dtype=np.uint8)
    out[..., 0::2] = codes & 0x0F
    out[..., 1::2] = codes >> 4
    return out


def pack_blocks(codes: np.ndarray, scale_codes: np.ndarray, scheme: str) -> np.ndarray:
    """fp4fmt rows (``codes`` uint8 ``[rows, K/2]`` pairwise, ``scale_codes`` uint8 ``[rows, K/B]``
    linear) -> ggml records ``[rows, K/R * bytes]`` (MXFP4: 17 bytes per 32 elements, NVFP4: 36 per 64)."""
    _, per_record, _, sub = RECORDS[scheme]
    rows, half = codes.shape
    k = 2 * half
    if k % per_record:
        raise ValueError(f"row length {k} is not a multiple of {per_record}")
    nib = _nibbles(codes).reshape(rows, k // sub, sub)
    h = sub // 2
    qs = nib[..., :h] | (nib[..., h:] << 4)  # split halves: element j low, element j + sub/2 high
    n_rec = k // per_record
    scales = np.asarray(scale_codes, dtype=np.uint8).reshape(rows, n_rec, per_record // sub)
    records = np.concatenate([scales, qs.reshape(rows, n_rec, per_record // 2)], axis=-1)
    return records.reshape(rows, -1)


def unpack_blocks(records: np.ndarray, scheme: str) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`pack_blocks`: ggml records ``[rows, n]`` -> (fp4fmt codes ``[rows, K/2]``,
    linear scale codes ``[rows, K/B]``), both uint8."""
    _, per_record, rec_bytes, sub = RECORDS[scheme]
    rows, n = records.shape
    if n % rec_bytes:
        raise ValueError(f"row of {n} bytes is not a whole number of {rec_bytes}-byte records")
    rec = np.asarray(records, dtype=np.uint8).reshape(rows, n // rec_bytes, rec_bytes)
    n_scales = per_record // sub
    scales = rec[..., :n_scales].reshape(rows, -1)
    qs = rec[..., n_scales:].reshape(rows, -1, sub // 2)
    nib = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(rows, -1)
    codes = nib[:, 0::2] | (nib[:, 1::2] << 4)
    return np.ascontiguousarray(codes), np.ascontiguousarray(scales)


def rope_row_order(rows: int, n_head: int) -> np.ndarray:
    """Row indices of llama.cpp's Q/K permutation: permuted ``w`` is ``w[order]``, i.e.
    ``w.reshape(n_head, 2, rows/n_head/2, ...).swapaxes(1, 2).reshape(w.shape)``."""
    if n_head <= 0 or rows % (2 * n_head):
        raise ValueError(f"{rows} rows cannot be split into {n_head} heads of an even size")
    return np.arange(rows).reshape(n_head, 2, rows // n_head // 2).swapaxes(1, 2).reshape(-1)


# ------------------------------------------------------------------------------------------------ config


def llama_hparams(config: dict, *, file: Path | None = None) -> LlamaHParams:
    """Llama hyper-parameters from ``config.json``; refuses what the GGUF ``llama`` architecture cannot
    express (another model type, biases, a non-SiLU activation, RoPE scaling other than linear)."""

    def need(key: str) -> Any:
        if key not in config:
            raise FP4FmtError(f"config.json has no {key!r}", file=file)
        return config[key]

    model_type = config.get("model_type")
    if model_type != "llama":
        raise FP4FmtError(f"GGUF export supports Llama models (model_type 'llama'), not {model_type!r}", file=file)
    if config.get("hidden_act", "silu") != "silu":
        raise FP4FmtError(f"hidden_act {config['hidden_act']!r}: llama.cpp's llama architecture uses SiLU", file=file)
    for flag in ("attention_bias", "mlp_bias"):
        if config.get(flag):
            raise FP4FmtError(f"{flag} is true: biases are not exported to GGUF", file=file)
    hidden = int(need("hidden_size"))
    heads = int(need("num_attention_heads"))
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or hidden // heads)
    if heads % kv_heads or head_dim % 2:
        raise FP4FmtError(f"{heads} heads / {kv_heads} KV heads / head_dim {head_dim} is not a valid Llama "
                          "attention shape", file=file)
    rope = config.get("rope_scaling") if isinstance(config.get("rope_scaling"), dict) else {}
    params = config.get("rope_parameters") if isinstance(config.get("rope_parameters"), dict) else {}
    rope_type = rope.get("rope_type", rope.get("type")) or params.get("rope_type") or "default"
    factor = None
    if rope_type == "linear":
        factor = rope.get("factor", params.get("factor"))
        if not isinstance(factor, (int, float)) or factor <= 0:
            raise FP4FmtError(f"linear RoPE scaling without a positive factor ({factor!r})", file=file)
        factor = float(factor)
    elif rope_type != "default":
        raise FP4FmtError(f"RoPE scaling {rope_type!r} is not exported to GGUF (only default and linear)", file=file)
    theta = config.get("rope_theta", params.get("rope_theta", 10000.0))
    return LlamaHParams(
        vocab_size=int(need("vocab_size")),
        hidden_size=hidden,
        intermediate_size=int(need("intermediate_size")),
        num_hidden_layers=int(need("num_hidden_layers")),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        rope_theta=float(theta),
        max_position_embeddings=int(need("max_position_embeddings")),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        rope_scaling_factor=factor,
    )


def expected_shapes(hp: LlamaHParams) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape for every tensor a Llama model with these hyper-parameters exports."""
    h, q, kv = hp.hidden_size, hp.num_attention_heads * hp.head_dim, hp.num_key_value_heads * hp.head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (hp.vocab_size, h), "model.norm.weight": (h,)}
    if not hp.tie_word_embeddings:
        shapes["lm_head.weight"] = (hp.vocab_size, h)
    per_layer = {
        "input_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (q, h),
        "self_attn.k_proj.weight": (kv, h),
        "self_attn.v_proj.weight": (kv, h),
        "self_attn.o_proj.weight": (h, q),
        "post_attention_layernorm.weight": (h,),
        "mlp.gate_proj.weight": (hp.intermediate_size, h),
        "mlp.up_proj.weight": (hp.intermediate_size, h),
        "mlp.down_proj.weight": (h, hp.intermediate_size),
    }
    for i in range(hp.num_hidden_layers):
        shapes.update({f"model.layers.{i}.{k}": v for k, v in per_layer.items()})
    return shapes


def gguf_tensor_name(hf_name: str) -> str | None:
    """llama.cpp's name for a Hugging Face Llama tensor, or None if it has none."""
    if hf_name in GLOBAL_TENSORS:
        return GLOBAL_TENSORS[hf_name]
    parts = hf_name.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[2].isdecimal() and parts[3] in BLOCK_TENSORS:
        return f"blk.{int(parts[2])}.{BLOCK_TENSORS[parts[3]]}"
    return None


# --------------------------------------------------------------------------------------------- tokenizer


def llama_cpp_pre_tokenizer(pre_tokenizer: dict | None) -> str | None:
    """llama.cpp's ``tokenizer.ggml.pre`` for a ``tokenizers`` pre-tokenizer it is known to equal, else None."""
    if not isinstance(pre_tokenizer, dict):
        return None

    def regex_byte_level(p: dict) -> bool:
        return p.get("type") == "ByteLevel" and p.get("use_regex", True) and not p.get("add_prefix_space", False)

    if regex_byte_level(pre_tokenizer):
        return "gpt-2"
    seq = pre_tokenizer.get("pretokenizers") if pre_tokenizer.get("type") == "Sequence" else None
    if (isinstance(seq, list) and len(seq) == 2 and seq[0] == {"type": "Digits", "individual_digits": True}
            and regex_byte_level(seq[1])):
        return "smollm"
    return None


def _token_string(value: Any) -> str | None:
    """A special token as written in tokenizer_config.json: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _chat_template(directory: Path, tok_config: dict) -> str | None:
    """The chat template: tokenizer_config.json's, else chat_template.jinja, else chat_template.json."""
    template = tok_config.get("chat_template")
    if isinstance(template, list):  # named templates: llama.cpp reads the default one
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if isinstance(template, str):
        return template
    if (directory / "chat_template.jinja").is_file():
        return (directory / "chat_template.jinja").read_text(encoding="utf-8")
    if (directory / "chat_template.json").is_file():
        value = read_json(directory / "chat_template.json").get("chat_template")
        return value if isinstance(value, str) else None
    return None


def gguf_tokenizer(directory: Path, config: dict, vocab_size: int, *, pre: str | None = None) -> GGUFTokenizer:
    """The GGUF tokenizer of a checkpoint directory (tokenizer.json, tokenizer_config.json,
    special_tokens_map.json, config.json); byte-level BPE only."""
    tj_path = directory / "tokenizer.json"
    if not tj_path.is_file():
        raise FP4FmtError("no tokenizer.json: GGUF needs the tokenizer in the file", file=directory)
    tj = read_json(tj_path)
    model = tj.get("model") or {}
    if model.get("type") != "BPE" or (tj.get("decoder") or {}).get("type") != "ByteLevel":
        raise FP4FmtError("only byte-level BPE tokenizers are exported (tokenizer.ggml.model 'gpt2'); this one is "
                          f"{model.get('type')!r} with decoder {(tj.get('decoder') or {}).get('type')!r}", file=tj_path)
    pre = pre or llama_cpp_pre_tokenizer(tj.get("pre_tokenizer"))
    if pre is None:
        raise FP4FmtError("the pre-tokenizer is not one llama.cpp is known to match (smollm, gpt-2); name "
                          "llama.cpp's pre-tokenizer with tokenizer_pre=", file=tj_path)
    vocab: dict[str, int] = dict(model.get("vocab") or {})
    id_to_token: dict[int, str] = {}
    for token, i in vocab.items():
        if int(i) in id_to_token:
            raise FP4FmtError(f"id {int(i)} is given to two tokens", file=tj_path)
        id_to_token[int(i)] = token
    types: dict[int, int] = {}
    for added in tj.get("added_tokens") or ():
        i, content = int(added["id"]), str(added["content"])
        if id_to_token.get(i, content) != content:
            raise FP4FmtError(f"added token {content!r} reuses id {i} of {id_to_token[i]!r}", file=tj_path)
        id_to_token[i] = content
        types[i] = TOKEN_TYPE_CONTROL if added.get("special") else TOKEN_TYPE_USER_DEFINED
    if id_to_token and max(id_to_token) >= vocab_size:
        raise FP4FmtError(f"token id {max(id_to_token)} is outside the model's vocab_size {vocab_size}", file=tj_path)
    tokens, token_types = [], []
    for i in range(vocab_size):
        if i in id_to_token:
            tokens.append(id_to_token[i])
            token_types.append(types.get(i, TOKEN_TYPE_NORMAL))
        else:
            tokens.append(f"[PAD{i}]")
            token_types.append(TOKEN_TYPE_UNUSED)
    if len(set(tokens)) != len(tokens):
        raise FP4FmtError("two ids have the same token string", file=tj_path)
    merges = []
    for m in model.get("merges") or ():
        pair = m.split(" ") if isinstance(m, str) else list(m)
        if len(pair) != 2 or not all(isinstance(p, str) and p and " " not in p for p in pair):
            raise FP4FmtError(f"merge {m!r} is not a pair of tokens without spaces", file=tj_path)
        merges.append(f"{pair[0]} {pair[1]}")

    tc_path, stm_path = directory / "tokenizer_config.json", directory / "special_tokens_map.json"
    tok_config = read_json(tc_path) if tc_path.is_file() else {}
    special_map = read_json(stm_path) if stm_path.is_file() else {}
    lookup = {t: i for i, t in enumerate(tokens)}
    special_ids = []
    for hf_key, gguf_key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("unk", "unknown_token_id"),
                             ("pad", "padding_token_id")):
        text = _token_string(tok_config.get(f"{hf_key}_token")) or _token_string(special_map.get(f"{hf_key}_token"))
        if text is not None:
            if text not in lookup:
                raise FP4FmtError(f"{hf_key}_token {text!r} is not in the vocabulary", file=tc_path)
            special_ids.append((gguf_key, lookup[text]))
            continue
        value = config.get(f"{hf_key}_token_id")
        value = value[0] if isinstance(value, list) and value else value
        if isinstance(value, int) and 0 <= value < vocab_size:
            special_ids.append((gguf_key, value))
    flags = [(gguf_key, bool(tok_config[hf_key])) for hf_key, gguf_key in
             (("add_bos_token", "add_bos_token"), ("add_eos_token", "add_eos_token"),
              ("add_prefix_space", "add_space_prefix")) if isinstance(tok_config.get(hf_key), bool)]
    return GGUFTokenizer(pre=pre, tokens=tuple(tokens), token_types=tuple(token_types), merges=tuple(merges),
                         special_ids=tuple(special_ids), flags=tuple(flags),
                         chat_template=_chat_template(directory, tok_config))


# ---------------------------------------------------------------------------------------------- metadata


def model_card_license(directory: Path) -> str | None:
    """The ``license:`` of a model card's front matter (README.md between ``---`` lines), or None."""
    try:
        lines = (directory / "README.md").read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    if not lines or lines[0].strip() != "---":
        return None
    for line in lines[1:]:
        if line.strip() == "---":
            break
        key, sep, value = line.partition(":")
        if sep and key.strip() == "license" and value.strip().strip("'\""):
            return value.strip().strip("'\"")
    return None


def metadata(hp: LlamaHParams, tok: GGUFTokenizer, scheme: str, scale_rule: str, name: str,
             license: str | None = None) -> list[KV]:
    """Every GGUF key-value of the exported file, in write order (``general.architecture`` is written by
    the writer itself, first)."""
    kvs = [
        KV("general.type", "model", "STRING"),
        KV("general.name", name, "STRING"),
        KV("general.quantized_by", f"fp4fmt {__version__}", "STRING"),
    ]
    if license is not None:
        kvs.append(KV("general.license", license, "STRING"))
    kvs += [
        KV("llama.block_count", hp.num_hidden_layers, "UINT32"),
        KV("llama.context_length", hp.max_position_embeddings, "UINT32"),
        KV("llama.embedding_length", hp.hidden_size, "UINT32"),
        KV("llama.feed_forward_length", hp.intermediate_size, "UINT32"),
        KV("llama.attention.head_count", hp.num_attention_heads, "UINT32"),
        KV("llama.attention.head_count_kv", hp.num_key_value_heads, "UINT32"),
        KV("llama.rope.freq_base", hp.rope_theta, "FLOAT32"),
        KV("llama.attention.layer_norm_rms_epsilon", hp.rms_norm_eps, "FLOAT32"),
        KV("general.file_type", FILE_TYPES[scheme], "UINT32"),
        KV("llama.vocab_size", hp.vocab_size, "UINT32"),
        KV("llama.rope.dimension_count", hp.head_dim, "UINT32"),
    ]
    if hp.head_dim != hp.hidden_size // hp.num_attention_heads:
        kvs += [KV("llama.attention.key_length", hp.head_dim, "UINT32"),
                KV("llama.attention.value_length", hp.head_dim, "UINT32")]
    if hp.rope_scaling_factor is not None:
        kvs += [KV("llama.rope.scaling.type", "linear", "STRING"),
                KV("llama.rope.scaling.factor", hp.rope_scaling_factor, "FLOAT32")]
    kvs += [KV(f"tokenizer.ggml.{key}", value, "BOOL") for key, value in tok.flags]
    kvs += [
        KV("tokenizer.ggml.model", "gpt2", "STRING"),
        KV("tokenizer.ggml.pre", tok.pre, "STRING"),
        KV("tokenizer.ggml.tokens", list(tok.tokens), "ARRAY", "STRING"),
        KV("tokenizer.ggml.token_type", list(tok.token_types), "ARRAY", "INT32"),
        KV("tokenizer.ggml.merges", list(tok.merges), "ARRAY", "STRING"),
    ]
    kvs += [KV(f"tokenizer.ggml.{key}", value, "UINT32") for key, value in tok.special_ids]
    if tok.chat_template is not None:
        kvs.append(KV("tokenizer.chat_template", tok.chat_template, "STRING"))
    kvs += [
        KV("general.quantization_version", GGML_QUANT_VERSION, "UINT32"),
        KV("fp4fmt.format_version", FORMAT_VERSION, "STRING"),
        KV("fp4fmt.scheme", scheme, "STRING"),
        KV("fp4fmt.scale_rule", scale_rule, "STRING"),
        KV("fp4fmt.version", __version__, "STRING"),
    ]
    return kvs


# ----------------------------------------------------------------------------------------------- tensors


@dataclass(frozen=True)
class _Item:
    """One GGUF tensor to write: its name, where it comes from, and its on-disk form."""

    gguf_name: str
    hf_name: str
    shard: Path
    role: str  # "quantized", "scale" (the NVFP4 tensor scale of hf_name) or "plain"
    ggml_type: int
    byte_shape: tuple[int, ...]  # numpy shape of the bytes written (records for quantized tensors)
    np_dtype: np.dtype
    nbytes: int


_EXACT_PLAIN = {"F32": GGML_TYPE_F32, "F16": GGML_TYPE_F16, "BF16": GGML_TYPE_BF16}
_GGML_NP = {GGML_TYPE_F32: np.dtype(np.float32), GGML_TYPE_F16: np.dtype(np.float16),
            GGML_TYPE_BF16: np.dtype(ml_dtypes.bfloat16)}


def _plain_type(value: np.ndarray, plain_type: str, *, file: Path, tensor: str) -> int:
    """The ggml type a plain tensor is written as (see the module docstring)."""
    dt = np.dtype(value.dtype)
    if not (np.issubdtype(dt, np.floating) or dt.name.startswith(("bfloat16", "float8"))):
        raise FP4FmtError(f"dtype {dt} has no GGUF float type", file=file, tensor=tensor)
    if dt == np.float64:
        raise FP4FmtError("F64 cannot be written to GGUF exactly", file=file, tensor=tensor)
    if value.ndim <= 1 or plain_type == "f32":
        return GGML_TYPE_F32
    if plain_type == "auto":
        return {np.dtype(np.float16): GGML_TYPE_F16, np.dtype(ml_dtypes.bfloat16): GGML_TYPE_BF16}.get(dt, GGML_TYPE_F32)
    return GGML_TYPE_F16 if plain_type == "f16" else GGML_TYPE_BF16


def _plain_bytes(value: np.ndarray, ggml_type: int, *, file: Path, tensor: str) -> np.ndarray:
    """A plain tensor in the numpy dtype of ``ggml_type``; refuses a conversion that changes a value."""
    want = _GGML_NP[ggml_type]
    if value.dtype == want:
        out = np.ascontiguousarray(value)
    else:
        wide = value.astype(np.float32)
        out = wide.astype(want)
        back = out.astype(np.float32)
        if not np.array_equal(back.view(np.uint32), wide.view(np.uint32)):
            bad = int(np.flatnonzero(back.view(np.uint32) != wide.view(np.uint32))[0])
            raise FP4FmtError(f"{value.dtype} -> {want} is not exact (element {bad}: {wide.flat[bad]!r} -> "
                              f"{back.flat[bad]!r}); choose plain_type 'f32' or 'auto'", file=file, tensor=tensor)
    return out.view(np.uint16) if ggml_type == GGML_TYPE_BF16 else out


def _check_quantized(qt: QTensor, scheme: str, *, file: Path, tensor: str, gguf_name: str) -> None:
    """Refuse a quantized tensor GGUF cannot hold exactly (see the module docstring)."""
    if qt.scheme != scheme:
        raise FP4FmtError(f"is {qt.scheme} but the checkpoint is {scheme}: one GGUF file holds one FP4 type",
                          file=file, tensor=tensor)
    if len(qt.shape) != 2 or qt.axis != 1:
        raise FP4FmtError(f"GGUF blocks a 2-D weight along its last axis; this one has shape {qt.shape}, "
                          f"axis {qt.axis}", file=file, tensor=tensor)
    _, per_record, _, _ = RECORDS[scheme]
    if qt.shape[1] % per_record:
        raise FP4FmtError(f"row length {qt.shape[1]} is not a multiple of {per_record}, the {scheme.upper()} "
                          f"block of ggml (GGML_TYPE_{scheme.upper()})", file=file, tensor=tensor)
    if scheme == "nvfp4" and gguf_name == "token_embd.weight" and np.float32(qt.tensor_scale) != np.float32(1):
        raise FP4FmtError(f"an NVFP4 token embedding with tensor scale {float(qt.tensor_scale)!r}: llama.cpp applies "
                          "no .scale to token_embd (keep the embedding unquantized)", file=file, tensor=tensor)


def _records(qt: QTensor, hp: LlamaHParams, gguf_name: str) -> np.ndarray:
    """The ggml records of a quantized tensor, Q/K rows permuted for llama.cpp's RoPE."""
    codes = np.asarray(qt.codes).reshape(qt.shape[0], -1)
    scale_codes = np.asarray(qt.scale_codes()).reshape(qt.shape[0], -1)
    records = pack_blocks(codes, scale_codes, qt.scheme)
    return _permute_if_rope(records, hp, gguf_name)


def _permute_if_rope(rows: np.ndarray, hp: LlamaHParams, gguf_name: str) -> np.ndarray:
    if gguf_name.endswith(".attn_q.weight"):
        return np.ascontiguousarray(rows[rope_row_order(rows.shape[0], hp.num_attention_heads)])
    if gguf_name.endswith(".attn_k.weight"):
        return np.ascontiguousarray(rows[rope_row_order(rows.shape[0], hp.num_key_value_heads)])
    return rows


def _sort_key(gguf_name: str) -> tuple:
    """Write order: token_embd, blocks in layer order (BLOCK_TENSORS order, .scale after its weight), then
    output_norm and output."""
    if gguf_name.startswith("blk."):
        _, n, rest = gguf_name.split(".", 2)
        base = rest.removesuffix(".scale") + (".weight" if rest.endswith(".scale") else "")
        order = list(BLOCK_TENSORS.values())
        return (1, int(n), order.index(base) if base in order else len(order), rest)
    return ({"token_embd": 0, "output_norm": 2, "output": 3}.get(gguf_name.split(".")[0], 4), 0, 0, gguf_name)


def _plan(ck: FP4Checkpoint, hp: LlamaHParams, scheme: str, plain_type: str) -> tuple[list[_Item], list[str]]:
    """Every GGUF tensor to write, checked against the config, in write order; plus notes."""
    want = expected_shapes(hp)
    items: list[_Item] = []
    seen: set[str] = set()
    notes: list[str] = []
    for shard in ck.shards:
        with safe_open(shard) as f:
            for name in f.keys():
                if name.endswith(SKIPPED_SUFFIXES):
                    notes.append(f"skipped {name} (llama.cpp computes it)")
                    continue
                if name == "lm_head.weight" and hp.tie_word_embeddings:
                    notes.append("skipped lm_head.weight: the embeddings are tied (llama.cpp reuses token_embd)")
                    continue
                gname = gguf_tensor_name(name)
                if gname is None:
                    raise FP4FmtError("has no llama.cpp tensor name (only Llama decoder tensors are exported)",
                                      file=shard, tensor=name)
                if name in seen:
                    raise FP4FmtError("is stored in two shards", file=shard, tensor=name)
                seen.add(name)
                value = f.get_tensor(name)
                if tuple(value.shape) != want.get(name):
                    raise FP4FmtError(f"has shape {tuple(value.shape)}; config.json implies {want.get(name)}",
                                      file=shard, tensor=name)
                if isinstance(value, QTensor):
                    _check_quantized(value, scheme, file=shard, tensor=name, gguf_name=gname)
                    ggml_type, per_record, rec_bytes, _ = RECORDS[scheme]
                    byte_shape = (value.shape[0], value.shape[1] // per_record * rec_bytes)
                    items.append(_Item(gname, name, shard, "quantized", ggml_type, byte_shape, np.dtype(np.uint8),
                                       int(np.prod(byte_shape))))
                    if scheme == "nvfp4" and (gname.endswith(SCALED_SUFFIXES) or gname == "output.weight"):
                        items.append(_Item(gname.removesuffix(".weight") + ".scale", name, shard, "scale",
                                           GGML_TYPE_F32, (1,), np.dtype(np.float32), 4))
                else:
                    ggml_type = _plain_type(value, plain_type, file=shard, tensor=name)
                    np_dtype = np.dtype(np.uint16) if ggml_type == GGML_TYPE_BF16 else _GGML_NP[ggml_type]
                    items.append(_Item(gname, name, shard, "plain", ggml_type, tuple(value.shape), np_dtype,
                                       int(np.prod(value.shape)) * np_dtype.itemsize))
    missing = sorted(set(want) - seen)
    if missing:
        raise FP4FmtError(f"{len(missing)} tensor(s) of the model are missing, first {missing[0]}", file=ck.path)
    if not any(i.role == "quantized" for i in items):
        notes.append("no tensor is quantized")
    return sorted(items, key=lambda i: _sort_key(i.gguf_name)), notes


def _tensor_data(item: _Item, value: QTensor | np.ndarray, hp: LlamaHParams) -> np.ndarray:
    """The bytes of one planned GGUF tensor, as the numpy array the writer writes."""
    if item.role == "quantized":
        return _records(value, hp, item.gguf_name)
    if item.role == "scale":
        return np.array([value.tensor_scale], dtype=np.float32)
    data = _plain_bytes(np.asarray(value), item.ggml_type, file=item.shard, tensor=item.hf_name)
    return _permute_if_rope(data, hp, item.gguf_name)


# ------------------------------------------------------------------------------------------------ export


def _gguf_module(scheme: str) -> Any:
    """gguf-py, checked to know the ggml type of ``scheme``."""
    try:
        import gguf
    except ImportError:
        raise FP4FmtError("GGUF export needs the 'gguf' package (gguf-py >= 0.19): pip install gguf") from None
    want = RECORDS[scheme][0]
    names = {t.value: t.name for t in gguf.GGMLQuantizationType}
    if names.get(want) != scheme.upper():
        raise FP4FmtError(f"the installed gguf-py does not know GGML_TYPE_{scheme.upper()} = {want}; "
                          "upgrade it (gguf >= 0.19)")
    return gguf


def output_path(src: Path, dst: Path) -> Path:
    """The file to write: ``dst`` itself if it ends in ``.gguf``, else ``dst/<source folder name>.gguf``."""
    return dst if dst.suffix == SUFFIX else dst / f"{src.resolve().name}{SUFFIX}"


def export_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, *, overwrite: bool = False,
                      progress: ProgressFn | None = None, plain_type: str = "auto",
                      tokenizer_pre: str | None = None, name: str | None = None) -> ExportReport:
    """Write the fp4fmt checkpoint ``src`` (a Llama model, MXFP4 or NVFP4) as one GGUF file for llama.cpp.

    ``dst`` is the ``.gguf`` file, or a folder that receives ``<src folder name>.gguf``. The file is written
    to a temporary sibling and renamed into place when complete; an existing file is replaced only with
    ``overwrite``. ``plain_type`` picks the type of unquantized matrices (``auto``: their own dtype),
    ``tokenizer_pre`` names llama.cpp's pre-tokenizer when it cannot be recognised, ``name`` sets
    ``general.name`` (default: the source folder's name).
    """
    if plain_type not in PLAIN_TYPES:
        raise FP4FmtError(f"plain_type {plain_type!r} is not one of {PLAIN_TYPES}")
    ck = open_fp4_checkpoint(src)
    out = output_path(ck.path, Path(dst))
    if out.exists() and not overwrite:
        raise FP4FmtError("exists; pass overwrite=True (--overwrite) to replace it", file=out)
    qc = ck.quantization_config
    scheme = qc.get("scheme")
    if scheme not in RECORDS:
        raise FP4FmtError(f"quantization_config.scheme {scheme!r} is not nvfp4 or mxfp4", file=ck.path / "config.json")
    gguf = _gguf_module(scheme)
    hp = llama_hparams(ck.config, file=ck.path / "config.json")
    tok = gguf_tokenizer(ck.path, ck.config, hp.vocab_size, pre=tokenizer_pre)
    items, notes = _plan(ck, hp, scheme, plain_type)
    kvs = metadata(hp, tok, scheme, str(qc.get("scale_rule")), name or ck.path.resolve().name,
                   model_card_license(ck.path))

    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".fp4fmt-tmp", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it 0600; the output gets the usual permissions
    try:
        _write(gguf, tmp, kvs, items, hp, progress)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    roles = [i.role for i in items]
    return ExportReport(path=out, scheme=scheme, tensors=len(items), quantized=roles.count("quantized"),
                        plain=roles.count("plain"), scale_tensors=roles.count("scale"), bytes=out.stat().st_size,
                        notes=tuple(notes))


def _write(gguf: Any, path: Path, kvs: Sequence[KV], items: Sequence[_Item], hp: LlamaHParams,
           progress: ProgressFn | None) -> None:
    """Stream the GGUF file: header, key-values and tensor infos, then each tensor's data in plan order."""
    vt = gguf.GGUFValueType
    writer = gguf.GGUFWriter(None, "llama")
    try:
        for kv in kvs:
            writer.add_key_value(kv.key, kv.value, vt[kv.vtype], sub_type=vt[kv.sub_type] if kv.sub_type else None)
        for it in items:
            writer.add_tensor_info(it.gguf_name, it.byte_shape, it.np_dtype, it.nbytes,
                                   raw_dtype=gguf.GGMLQuantizationType(it.ggml_type))
        writer.open_output_file(path)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        with ExitStack() as stack:
            readers = {}
            for n, it in enumerate(items):
                if it.shard not in readers:
                    readers[it.shard] = stack.enter_context(safe_open(it.shard))
                data = _tensor_data(it, readers[it.shard].get_tensor(it.hf_name), hp)
                if data.nbytes != it.nbytes:  # the plan and the data disagree: a bug, never a user error
                    raise AssertionError(f"{it.gguf_name}: planned {it.nbytes} bytes, produced {data.nbytes}")
                writer.write_tensor_data(data)
                if progress is not None:
                    progress("tensors", n + 1, len(items))
    finally:
        writer.close()


__all__ = [
    "FORMAT",
    "ExportReport",
    "GGUFTokenizer",
    "KV",
    "LlamaHParams",
    "export_checkpoint",
    "expected_shapes",
    "gguf_tensor_name",
    "gguf_tokenizer",
    "llama_cpp_pre_tokenizer",
    "llama_hparams",
    "metadata",
    "model_card_license",
    "output_path",
    "pack_blocks",
    "rope_row_order",
    "unpack_blocks",
]
