"""Fuzzing fp4fmt's readers with mutated and truncated files (spec §2.4: a reader must refuse bad files).

From a corpus of valid files, hypothesis builds mutants: truncations, byte flips in the header and the
data, lying header lengths, structured edits of the header JSON and of the descriptor inside it, and raw
text that ``json.dumps`` cannot produce (nesting bombs, 5000-digit integers, duplicate keys, lone
surrogates, non-UTF-8 bytes). Every reader entry point is then driven over each mutant. The only
exceptions allowed are fp4fmt's own (``FP4FmtError``); anything else, a hang or an allocation out of
proportion to the file is a bug in the library.
"""

from __future__ import annotations

import contextlib
import json
import signal
import struct
import tracemalloc
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fp4fmt
from fp4fmt import FP4FmtError, QTensor

try:
    import _filetools as ft
except ImportError:  # tests/ collected as a package
    from tests import _filetools as ft

MAX_SECONDS_PER_MUTANT = 10.0  # far above the milliseconds a KB-sized mutant takes: only a hang trips it
ALLOC_PER_FILE_BYTE = 16  # opening allocates a few copies of the header (seen: at most ~6x) ...
ALLOC_FIXED = 512 << 10  # ... plus a fixed overhead, and never anything sized by what the file *claims*
PH = "\x01fuzz-placeholder\x01"  # a string json.dumps escapes; replaced by raw JSON text afterwards
PH_KEY = "\x01fuzz-key\x01"


# ------------------------------------------------------------------------------------------------------
# the corpus
# ------------------------------------------------------------------------------------------------------
def build_corpus() -> list[bytes]:
    """Small valid files: both schemes, swizzled and linear scales, ragged and empty tensors, plain
    arrays of several dtypes, metadata, a file with no QTensor, and a file from the safetensors package."""
    rng = np.random.default_rng(1234)
    q = fp4fmt.quantize
    return [
        fp4fmt.save(
            {"w": q(rng.standard_normal((4, 40)).astype(np.float32), "nvfp4"), "bias": rng.standard_normal(4).astype(np.float32)},
            {"author": "fuzz", "note": "nvfp4 linear, ragged"},
        ),
        fp4fmt.save(
            {
                "m": q(rng.standard_normal((3, 2, 33)).astype(ml_dtypes.bfloat16), "mxfp4", axis=0, scale_rule="rceil", scale_layout="swizzled"),
                "emb": rng.standard_normal((3, 5)).astype(ml_dtypes.bfloat16),
                "empty": np.zeros((0, 4), np.float16),
            }
        ),
        fp4fmt.save(
            {
                "s": q(rng.standard_normal((20, 130)).astype(np.float16), "nvfp4", axis=0, scale_layout="swizzled"),
                "z": q(np.zeros((0, 16), np.float32), "mxfp4", scale_rule="even"),
                "v": q(rng.standard_normal(70).astype(np.float64), "mxfp4"),
                "flag": np.array([True, False, True]),
                "step": np.array(12345, np.int64),
                "e4": rng.standard_normal((2, 2)).astype(ml_dtypes.float8_e4m3fn),
            },
            {"k": "v"},
        ),
        fp4fmt.save({"a": np.arange(3, dtype=np.uint16), "b": np.eye(2)}, {"only": "plain"}),
        safetensors.numpy.save({"x": np.ones((2, 3), np.float32), "y": np.zeros(0, np.int8)}, metadata={"m": "n"}),
    ]


CORPUS = build_corpus()
corpus_files = st.sampled_from(CORPUS)


# ------------------------------------------------------------------------------------------------------
# driving the readers
# ------------------------------------------------------------------------------------------------------
def attempt(step: Callable, *args: object) -> object | None:
    """Run ``step``; an fp4fmt error is an allowed outcome (None), any other exception propagates."""
    try:
        return step(*args)
    except FP4FmtError as e:
        assert str(e), "fp4fmt errors carry a message"
        return None


def read_everything(source: bytes | Path) -> None:
    """safe_open, then every listing call, every tensor, every dequantization and verify()."""
    f = attempt(fp4fmt.safe_open, source)
    if f is None:
        return
    with f:
        # once the header is accepted, listing and raw access must not fail at all
        f.metadata()
        stored = f.stored_keys()
        for name in stored:
            f.get_raw(name).tobytes()
        for name in f.keys():
            attempt(f.tensor_descriptor, name)
            t = attempt(f.get_tensor, name)
            if isinstance(t, QTensor):
                attempt(fp4fmt.dequantize, t)
            elif t is not None:
                np.asarray(t).tobytes()
        attempt(f.verify)


class Hang(Exception):
    """Raised by the alarm when a mutant takes longer than MAX_SECONDS_PER_MUTANT."""


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Turn a hang into a test failure: SIGALRM raises Hang after ``seconds``."""

    def on_alarm(signum: int, frame: object) -> None:
        raise Hang(f"no answer after {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def exercise(blob: bytes, path: Path) -> None:
    """Drive safe_open (path and bytes), load and load_file over ``blob``; fail on a hang or a warning."""
    path.write_bytes(blob)
    with time_limit(MAX_SECONDS_PER_MUTANT), warnings.catch_warnings():
        warnings.simplefilter("error")  # a numpy warning escaping the library is a failure too
        read_everything(path)
        read_everything(blob)
        attempt(fp4fmt.load, blob)
        attempt(fp4fmt.load_file, path)


@pytest.fixture(scope="module")
def mutant_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where each mutant is written before it is read back."""
    return tmp_path_factory.mktemp("fuzz") / "mutant.safetensors"


def test_corpus_is_valid(mutant_path: Path) -> None:
    """The unmutated corpus loads and verifies (so that mutants start from valid files)."""
    for blob in CORPUS:
        mutant_path.write_bytes(blob)
        with fp4fmt.safe_open(mutant_path) as f:
            assert f.keys()
            if f.is_fp4fmt:
                f.verify()
        assert fp4fmt.load(blob).keys() == fp4fmt.load_file(mutant_path).keys()


# ------------------------------------------------------------------------------------------------------
# byte-level mutations
# ------------------------------------------------------------------------------------------------------
@st.composite
def truncations(draw: st.DrawFn) -> bytes:
    """A valid file cut at any length."""
    blob = draw(corpus_files)
    return blob[: draw(st.integers(0, len(blob) - 1))]


@st.composite
def byte_flips(draw: st.DrawFn) -> bytes:
    """A valid file with 1-8 bytes XORed, all in the header, all in the data, or anywhere."""
    blob = draw(corpus_files)
    n = struct.unpack("<Q", blob[:8])[0]
    region = draw(st.sampled_from(["header", "data", "anywhere"]))
    lo, hi = {"header": (8, 8 + n), "data": (8 + n, len(blob)), "anywhere": (0, len(blob))}[region]
    if hi <= lo:
        lo, hi = 0, len(blob)
    out = bytearray(blob)
    for pos, mask in draw(st.lists(st.tuples(st.integers(lo, hi - 1), st.integers(1, 255)), min_size=1, max_size=8)):
        out[pos] ^= mask
    return bytes(out)


@st.composite
def length_fields(draw: st.DrawFn) -> bytes:
    """A valid file whose 8-byte header length is replaced by a random, huge or off-by-a-little value."""
    blob = draw(corpus_files)
    n = struct.unpack("<Q", blob[:8])[0]
    special = [0, 1, 2, 7, n - 1, n + 1, n + 8, len(blob) - 8, len(blob) - 7, len(blob), 100_000_000,
               100_000_001, 2**32, 2**63 - 1, 2**63, 2**64 - 1]
    value = draw(st.one_of(st.sampled_from(special), st.integers(0, 2**64 - 1), st.integers(0, len(blob) + 16)))
    return struct.pack("<Q", value) + blob[8:]


@st.composite
def non_utf8(draw: st.DrawFn) -> bytes:
    """A valid file with invalid UTF-8 sequences inserted into its header (length recomputed)."""
    blob = draw(corpus_files)
    n, _, data = ft.split(blob)
    text = bytearray(blob[8 : 8 + n])
    bad = draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\x80", b"\xe2\x82"]))
    pos = draw(st.integers(0, len(text)))
    text[pos:pos] = bad
    return ft.header_bytes(bytes(text)) + data


# ------------------------------------------------------------------------------------------------------
# structured JSON mutations
# ------------------------------------------------------------------------------------------------------
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 300),
    st.sampled_from([-1, 2**31, 2**32 + 1, 2**63 - 1, 2**63, 2**64, 2**70, -(2**63), 10**30]),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
    st.sampled_from(["U8", "F32", "F8_E4M3", "F8_E8M0", "F4", "C64", "nvfp4", "mxfp4", "swizzled", "linear",
                     "amax", "floor", "rceil", "even", "rtn", "1.0", "1.9", "2.0", "0.1", "sha256:" + "0" * 64]),
)
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=3)), max_leaves=8)

# Raw JSON text json.dumps cannot write, to put in place of a value.
RAW_TOKENS = [
    "[" * 100_000 + "]" * 100_000,  # nesting bomb
    '{"a":' * 50_000 + "1" + "}" * 50_000,
    "1" + "0" * 5000,  # 10**5000
    "-" + "9" * 5000,
    "1" + "0" * 4299,  # just under Python's int-string limit
    "1e99999",  # float overflow -> inf
    "NaN",
    "-Infinity",
    '"\\ud800"',  # lone surrogate
    '"\\u0000"',
    "[" + ",".join(["0"] * 65) + "]",  # more dimensions than numpy allows
    "[" + ",".join(["1"] * 65) + "]",
    "[9223372036854775807,0]",
    "[4611686018427387904,4611686018427387904,0]",
    "[0," + "1" + "0" * 30 + "]",
    '"' + "x" * 100_000 + '"',
]


def all_paths(node: object, prefix: tuple = ()) -> list[tuple]:
    """Every path (tuple of dict keys / list indices) to a node of a JSON tree, the root included."""
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out += all_paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += all_paths(v, prefix + (i,))
    return out


def get_at(root: object, path: tuple) -> object:
    for p in path:
        root = root[p]
    return root


def set_at(root: object, path: tuple, value: object) -> object:
    """``root`` with the node at ``path`` replaced (the root itself when ``path`` is empty)."""
    if not path:
        return value
    get_at(root, path[:-1])[path[-1]] = value
    return root


@st.composite
def json_edits(draw: st.DrawFn, root: object) -> tuple[object, str | None]:
    """One structured edit of ``root`` (mutated in place): (new root, raw text to put at PH or None)."""
    paths = all_paths(root)
    rarely_root = len(paths) > 1 and draw(st.integers(0, 19)) > 0  # the root itself 1 time in 20
    path = draw(st.sampled_from(paths[1:])) if rarely_root else ()
    node = get_at(root, path)
    ops = ["replace", "raw"]
    if path:
        ops.append("delete")
    if isinstance(node, int) and not isinstance(node, bool):
        ops += ["nudge", "nudge"]
    if isinstance(node, dict):
        ops += ["insert", "rename", "duplicate"] if node else ["insert"]
    if isinstance(node, list):
        ops.append("append")
    op = draw(st.sampled_from(ops))
    raw = None
    if op == "replace":
        root = set_at(root, path, draw(json_values))
    elif op == "raw":
        root, raw = set_at(root, path, PH), draw(st.sampled_from(RAW_TOKENS))
    elif op == "delete":
        parent = get_at(root, path[:-1])
        del parent[path[-1]]
    elif op == "nudge":
        delta = draw(st.sampled_from([-1, 1, -2, 2, 8, -8, 16, 2**32, 2**62, -(10**6)]))
        root = set_at(root, path, node + delta)
    elif op == "insert":
        node[draw(st.text(max_size=8))] = draw(json_values)
    elif op == "rename":
        old = draw(st.sampled_from(sorted(node)))
        value = node.pop(old)
        node[draw(st.one_of(st.text(max_size=8), st.sampled_from(sorted(node) or [""])))] = value
    elif op == "duplicate":  # the same key twice: PH_KEY is rewritten to an existing key's JSON string
        raw_key = draw(st.sampled_from(sorted(node)))
        node[PH_KEY] = draw(st.one_of(json_values, st.just(node[raw_key])))
        raw = json.dumps(raw_key)
    elif op == "append":
        node.append(draw(json_values))
    return root, raw


def render(root: object, raw: str | None) -> str:
    """JSON text of ``root`` with the placeholder (value or key) replaced by ``raw``."""
    text = json.dumps(root, separators=(",", ":"), ensure_ascii=True)
    if raw is not None:
        text = text.replace(json.dumps(PH), raw).replace(json.dumps(PH_KEY), raw)
    return text


@st.composite
def json_mutants(draw: st.DrawFn) -> bytes:
    """A valid file with 1-3 structured edits of its header JSON or of the descriptor inside it."""
    blob = draw(corpus_files)
    _, header, data = ft.split(blob)
    for _ in range(draw(st.integers(1, 3))):
        meta = header.get("__metadata__") if isinstance(header, dict) else None
        desc_text = meta.get("fp4fmt") if isinstance(meta, dict) else None
        into_descriptor = isinstance(desc_text, str) and draw(st.booleans())
        try:
            target = json.loads(desc_text) if into_descriptor else header
        except (ValueError, RecursionError):  # an earlier edit broke the descriptor: edit the header
            target, into_descriptor = header, False
        target, raw = draw(json_edits(target))
        if into_descriptor:
            header["__metadata__"]["fp4fmt"] = render(target, raw)
            raw = None
        else:
            header = target
        if raw is not None:  # raw text cannot live in the tree: finish with it
            return ft.header_bytes(render(header, raw).encode("utf-8")) + data
    align = draw(st.sampled_from([8, 1]))
    return ft.header_bytes(render(header, None).encode("utf-8"), align=align) + data


# ------------------------------------------------------------------------------------------------------
# plausible mutations: the file stays (mostly) well-formed, so the readers get past the header checks
# ------------------------------------------------------------------------------------------------------
SAME_ITEMSIZE = [
    ["U8", "I8", "BOOL", "F8_E4M3", "F8_E5M2", "F8_E4M3FNUZ", "F8_E5M2FNUZ", "F8_E8M0"],
    ["U16", "I16", "F16", "BF16"],
    ["U32", "I32", "F32"],
    ["U64", "I64", "F64", "C64"],
]
DESCRIPTOR_FIELD_VALUES: dict[str, list] = {
    "scheme": ["nvfp4", "mxfp4", "NVFP4", "int4", ""],
    "dtype": ["F32", "F16", "BF16", "F64", "F8_E4M3", "U8", "I32", "F4"],
    "axis": [-2, -1, 0, 1, 2, 3, 64, 2**63],
    "block_size": [16, 32, 0, 8, -16, 2**40],
    "padding": [0, 1, 8, 15, 16, 31, -1, 2**40],
    "scale_layout": ["linear", "swizzled", "tiled"],
    "scale_rule": ["amax", "floor", "rceil", "even", "max"],
    "quantizer": ["rtn", "gptq", ""],
}
VERSIONS = ["1.0", "1.1", "1.99", "1.123456789", "2.0", "0.9", "10.0", "1.0.1", "01.0", "1.00"]


@dataclass
class Parts:
    """A file taken apart for plausible edits: header entries, the parsed descriptor, the data buffer."""

    header: dict
    descriptor: dict | None
    data: bytearray

    @property
    def names(self) -> list[str]:
        return [k for k in self.header if k != "__metadata__"]

    def to_bytes(self) -> bytes:
        if self.descriptor is not None:
            self.header["__metadata__"]["fp4fmt"] = json.dumps(self.descriptor, separators=(",", ":"))
        return ft.join(self.header, bytes(self.data))


def _entry_bytes(p: Parts, name: str) -> tuple[int, int]:
    begin, end = p.header[name]["data_offsets"]
    return begin, end


def _rehash(p: Parts, name: str) -> None:
    """Record the checksum of ``name``'s current bytes, so that verify() gets past the checksums."""
    if p.descriptor is not None and isinstance(p.descriptor.get("checksums"), dict):
        begin, end = _entry_bytes(p, name)
        p.descriptor["checksums"][name] = ft.sha256(bytes(p.data[begin:end]))


def op_dtype_swap(draw: st.DrawFn, p: Parts) -> None:
    """A stored tensor gets another dtype of the same itemsize (the container stays valid)."""
    name = draw(st.sampled_from(p.names))
    group = next(g for g in SAME_ITEMSIZE if p.header[name]["dtype"] in g)
    p.header[name]["dtype"] = draw(st.sampled_from(group))


def op_reshape(draw: st.DrawFn, p: Parts) -> None:
    """A stored tensor gets another shape with the same element count (or a zero-sized one)."""
    name = draw(st.sampled_from(p.names))
    shape = p.header[name]["shape"]
    numel = int(np.prod(shape, dtype=object)) if shape else 1
    p.header[name]["shape"] = draw(st.sampled_from([
        shape[::-1], [numel], [1, *shape], [*shape, 1], [], [numel, 1], [0], [0, numel], [*shape, 0],
    ]))


def op_swap_names(draw: st.DrawFn, p: Parts) -> None:
    """Two stored tensors trade names (the descriptor's parts and checksums now point elsewhere)."""
    if len(p.names) < 2:
        return
    a, b = draw(st.lists(st.sampled_from(p.names), min_size=2, max_size=2, unique=True))
    p.header = {(b if k == a else a if k == b else k): v for k, v in p.header.items()}


def op_descriptor_field(draw: st.DrawFn, p: Parts) -> None:
    """A quantized tensor's descriptor field takes another (valid or invalid) value."""
    if p.descriptor is None or not p.descriptor["tensors"]:
        return
    entry = p.descriptor["tensors"][draw(st.sampled_from(sorted(p.descriptor["tensors"])))]
    field = draw(st.sampled_from(sorted(DESCRIPTOR_FIELD_VALUES) + ["shape"]))
    if field == "shape":
        shape = entry["shape"]
        entry["shape"] = draw(st.sampled_from([shape[::-1], shape + [1], [1] + shape, shape[:-1] or [0],
                                               [d + 1 for d in shape], [max(d - 1, 0) for d in shape]]))
    else:
        entry[field] = draw(st.sampled_from(DESCRIPTOR_FIELD_VALUES[field]))


def op_checksum(draw: st.DrawFn, p: Parts) -> None:
    """A checksum is altered by one hex digit, swapped with another, dropped or pointed at a ghost."""
    if p.descriptor is None or not p.descriptor["checksums"]:
        return
    sums = p.descriptor["checksums"]
    name = draw(st.sampled_from(sorted(sums)))
    how = draw(st.sampled_from(["digit", "swap", "drop", "ghost", "upper"]))
    if how == "digit":
        i = draw(st.integers(7, len(sums[name]) - 1))
        sums[name] = sums[name][:i] + ("0" if sums[name][i] != "0" else "1") + sums[name][i + 1 :]
    elif how == "swap":
        other = draw(st.sampled_from(sorted(sums)))
        sums[name], sums[other] = sums[other], sums[name]
    elif how == "drop":
        del sums[name]
    elif how == "ghost":
        sums["ghost"] = sums[name]
    else:
        sums[name] = sums[name].upper()


def op_version(draw: st.DrawFn, p: Parts) -> None:
    """The descriptor declares another format version."""
    if p.descriptor is not None:
        p.descriptor["format_version"] = draw(st.sampled_from(VERSIONS))


def op_data_rehashed(draw: st.DrawFn, p: Parts) -> None:
    """Bytes of a stored tensor change and its checksum is updated: verify() must judge the values
    (NaN or negative scales, non-zero padding, a bad tensor scale) rather than the checksum."""
    candidates = [n for n in p.names if _entry_bytes(p, n)[1] > _entry_bytes(p, n)[0]]
    if not candidates:
        return
    name = draw(st.sampled_from(candidates))
    begin, end = _entry_bytes(p, name)
    for _ in range(draw(st.integers(1, 4))):
        pos = draw(st.integers(begin, end - 1))
        p.data[pos] = draw(st.sampled_from([0x00, 0xFF, 0x7F, 0x80, 0xF0, 0x0F, draw(st.integers(0, 255))]))
    _rehash(p, name)


PLAUSIBLE_OPS = [op_dtype_swap, op_reshape, op_swap_names, op_descriptor_field, op_checksum, op_version,
                 op_data_rehashed, op_data_rehashed]


@st.composite
def plausible_mutants(draw: st.DrawFn) -> bytes:
    """A valid file after 1-3 edits that keep its JSON well-formed and its data buffer tiled."""
    _, header, data = ft.split(draw(corpus_files))
    meta = header.get("__metadata__", {})
    p = Parts(header, json.loads(meta["fp4fmt"]) if "fp4fmt" in meta else None, bytearray(data))
    for op in draw(st.lists(st.sampled_from(PLAUSIBLE_OPS), min_size=1, max_size=3)):
        op(draw, p)
    return p.to_bytes()


# ------------------------------------------------------------------------------------------------------
# the fuzz tests
# ------------------------------------------------------------------------------------------------------
def fuzz(max_examples: int) -> settings:
    """Hypothesis settings of a fuzz test: no deadline (the machine is shared), a fixed example count."""
    return settings(max_examples=max_examples, deadline=None, suppress_health_check=[
        HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture])


@fuzz(150)
@given(blob=truncations())
def test_truncated_files(mutant_path: Path, blob: bytes) -> None:
    """A file cut short anywhere is refused with an fp4fmt error (or, at a tensor boundary, read)."""
    exercise(blob, mutant_path)


@fuzz(200)
@given(blob=byte_flips())
def test_flipped_bytes(mutant_path: Path, blob: bytes) -> None:
    """Random byte flips in the header or the data raise only fp4fmt errors."""
    exercise(blob, mutant_path)


@fuzz(80)
@given(blob=length_fields())
def test_lying_header_length(mutant_path: Path, blob: bytes) -> None:
    """A random, huge or slightly wrong header length raises only fp4fmt errors."""
    exercise(blob, mutant_path)


@fuzz(40)
@given(blob=non_utf8())
def test_non_utf8_header(mutant_path: Path, blob: bytes) -> None:
    """Invalid UTF-8 anywhere in the header is refused with an fp4fmt error."""
    with pytest.raises(FP4FmtError):
        fp4fmt.load(blob)
    exercise(blob, mutant_path)


@fuzz(400)
@given(blob=json_mutants())
def test_structured_json_mutations(mutant_path: Path, blob: bytes) -> None:
    """Edited offsets, shapes, dtypes, names, descriptor fields, versions and checksums, raw bombs,
    huge integers and duplicate keys raise only fp4fmt errors."""
    exercise(blob, mutant_path)


@fuzz(400)
@given(blob=plausible_mutants())
def test_plausible_mutations(mutant_path: Path, blob: bytes) -> None:
    """Swapped dtypes and names, reshaped tensors, altered descriptor fields, checksums and versions,
    and re-checksummed data edits (NaN scales, padding codes) raise only fp4fmt errors."""
    exercise(blob, mutant_path)


@fuzz(100)
@given(blob=st.one_of(json_mutants(), plausible_mutants(), length_fields(), truncations()))
def test_open_allocates_in_proportion_to_the_file(mutant_path: Path, blob: bytes) -> None:
    """Opening a mutant never allocates memory sized by what the file claims, only by its real size."""
    mutant_path.write_bytes(blob)
    for source in (mutant_path, blob):
        tracemalloc.start()
        try:
            f = attempt(fp4fmt.safe_open, source)
            if f is not None:
                f.keys()
                f.metadata()
                f.close()
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak <= ALLOC_PER_FILE_BYTE * len(blob) + ALLOC_FIXED, (peak, len(blob))


# ------------------------------------------------------------------------------------------------------
# hand-made mutants: each hits one validation rule directly
# ------------------------------------------------------------------------------------------------------
def _entry_edit(name: str, field: str, value: object) -> Callable[[bytes], bytes]:
    return lambda b: ft.edit_header(b, lambda h: h[name].__setitem__(field, value))


def _descriptor_edit(edit: Callable[[dict], None]) -> Callable[[bytes], bytes]:
    return lambda b: ft.edit_descriptor(b, edit)


def _raw_shape(name: str, raw_shape: str) -> Callable[[bytes], bytes]:
    """Set the shape of stored tensor ``name`` to raw JSON text."""

    def edit(blob: bytes) -> bytes:
        _, header, data = ft.split(blob)
        header[name]["shape"] = PH
        return ft.header_bytes(render(header, raw_shape).encode()) + data

    return edit


def _huge_empty_qtensor(blob: bytes) -> bytes:
    """Corpus file 2 with QTensor 'z' (MXFP4, axis 1) claiming shape [0, 2**62]: every part is empty and
    consistent with that shape, but its float32 dequantization could not exist."""

    def header_edit(h: dict) -> None:
        h["z.codes"]["shape"] = [0, 2**61]
        h["z.scales"]["shape"] = [0, 2**57]
        doc = json.loads(h["__metadata__"]["fp4fmt"])
        doc["tensors"]["z"].update(shape=[0, 2**62], padding=0)
        h["__metadata__"]["fp4fmt"] = json.dumps(doc)

    return ft.edit_header(blob, header_edit)


HAND_MADE: dict[str, tuple[int, Callable[[bytes], bytes]]] = {
    "QTensor of shape [0, 2**62]": (2, _huge_empty_qtensor),
    "65 zero dims on an empty tensor": (1, _raw_shape("empty", "[" + ",".join(["0"] * 65) + "]")),
    "huge dims times zero": (1, _raw_shape("empty", "[0, 9223372036854775808]")),
    "2**62 x 2**62 x 0": (1, _raw_shape("empty", "[4611686018427387904,4611686018427387904,0]")),
    "2**62 x 0 (too big for numpy)": (1, _raw_shape("empty", "[4611686018427387904,0]")),
    "scheme is a list": (0, _descriptor_edit(lambda d: d["tensors"]["w"].__setitem__("scheme", ["nvfp4"]))),
    "scheme is a dict": (0, _descriptor_edit(lambda d: d["tensors"]["w"].__setitem__("scheme", {}))),
    "dtype is a list": (0, _descriptor_edit(lambda d: d["tensors"]["w"].__setitem__("dtype", []))),
    "scale_layout is a dict": (0, _descriptor_edit(lambda d: d["tensors"]["w"].__setitem__("scale_layout", {}))),
    "scale_rule is a list": (0, _descriptor_edit(lambda d: d["tensors"]["w"].__setitem__("scale_rule", ["amax"]))),
    "block_size is a float": (0, _descriptor_edit(lambda d: d["tensors"]["w"].__setitem__("block_size", 16.0))),
    "padding is True": (2, _descriptor_edit(lambda d: d["tensors"]["v"].__setitem__("padding", True))),
    "tensor shape with a huge dim": (2, _descriptor_edit(lambda d: d["tensors"]["z"].__setitem__("shape", [2**64, 16]))),
    "tensors is a list": (0, _descriptor_edit(lambda d: d.__setitem__("tensors", []))),
    "checksums missing": (0, _descriptor_edit(lambda d: d.pop("checksums"))),
    "descriptor is a list": (0, lambda b: ft.edit_header(b, lambda h: h["__metadata__"].__setitem__("fp4fmt", "[]"))),
    "descriptor bomb": (0, lambda b: ft.edit_header(b, lambda h: h["__metadata__"].__setitem__("fp4fmt", "[" * 100_000))),
    "offsets as floats": (0, _entry_edit("bias", "data_offsets", [0.0, 16.0])),
    "offsets reversed": (0, _entry_edit("bias", "data_offsets", [16, 0])),
    "shape is a string": (0, _entry_edit("bias", "shape", "4")),
    "dtype sub-byte": (0, _entry_edit("w.codes", "dtype", "F4")),
    "tensor_scale NaN": (0, lambda b: b[: ft.data_offset(b, "w.tensor_scale")] + struct.pack("<f", float("nan"))
                         + b[ft.data_offset(b, "w.tensor_scale") + 4 :]),
}


@pytest.mark.parametrize("case", sorted(HAND_MADE))
def test_hand_made_mutants(mutant_path: Path, case: str) -> None:
    """Targeted mutants (types where numbers belong, shapes numpy cannot make, ...) are refused cleanly."""
    index, edit = HAND_MADE[case]
    blob = edit(CORPUS[index])
    assert blob != CORPUS[index]
    exercise(blob, mutant_path)
    with pytest.raises(FP4FmtError):
        fp4fmt.load(blob)
