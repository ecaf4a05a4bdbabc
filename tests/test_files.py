"""Tests of fp4fmt's file layer: save_file / load_file / save / load / safe_open (spec §2, §3).

Round trips and determinism are property-based (hypothesis); interoperability is checked against the
safetensors package itself; bad files are crafted by rewriting the header of a valid file with the
byte-level helpers of ``_filetools`` (which do not use fp4fmt's own parser).
"""

from __future__ import annotations

import dataclasses
import errno
import json
import mmap
import os
import struct
from collections.abc import Callable
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import safetensors
import safetensors.numpy
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fp4fmt
from fp4fmt import ChecksumError, FormatError, FP4FmtError, QTensor, UnsupportedVersionError, WriteError

try:
    import _filetools as ft
except ImportError:  # tests/ collected as a package
    from tests import _filetools as ft

# safetensors dtype name -> numpy dtype, as spec §2.3 lists them (every dtype fp4fmt materializes).
PLAIN_DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype(np.uint8),
    "I8": np.dtype(np.int8),
    "U16": np.dtype("<u2"),
    "I16": np.dtype("<i2"),
    "U32": np.dtype("<u4"),
    "I32": np.dtype("<i4"),
    "U64": np.dtype("<u8"),
    "I64": np.dtype("<i8"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F32": np.dtype("<f4"),
    "F64": np.dtype("<f8"),
    "C64": np.dtype("<c8"),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "F8_E4M3FNUZ": np.dtype(ml_dtypes.float8_e4m3fnuz),
    "F8_E5M2FNUZ": np.dtype(ml_dtypes.float8_e5m2fnuz),
    "F8_E8M0": np.dtype(ml_dtypes.float8_e8m0fnu),
}
# Dtypes the safetensors package's numpy framework cannot represent (numpy has no float8).
NOT_NUMPY_READABLE = {"F8_E4M3", "F8_E5M2", "F8_E4M3FNUZ", "F8_E5M2FNUZ", "F8_E8M0"}
SOURCE_DTYPES = [np.dtype(np.float32), np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16), np.dtype(np.float64)]
SCALE_DTYPE = {"nvfp4": "F8_E4M3", "mxfp4": "U8"}
TMP_PATTERN = ".fp4fmt-tmp"


# ------------------------------------------------------------------------------------------------------
# strategies
# ------------------------------------------------------------------------------------------------------
@st.composite
def qtensors(draw: st.DrawFn) -> QTensor:
    """A quantized tensor of either scheme: any rule, layout and axis, 1-D to 3-D, ragged or not."""
    scheme = draw(st.sampled_from(["nvfp4", "mxfp4"]))
    rule = draw(st.sampled_from(fp4fmt.SCHEMES[scheme].scale_rules))
    ndim = draw(st.integers(1, 3))
    max_dim = {1: 100, 2: 40, 3: 12}[ndim]
    shape = tuple(draw(st.lists(st.integers(0, max_dim), min_size=ndim, max_size=ndim)))
    axis = draw(st.integers(-ndim, ndim - 1))
    scale_layout = draw(st.sampled_from(["linear", "swizzled"])) if ndim >= 2 else "linear"
    src = draw(st.sampled_from(SOURCE_DTYPES))
    seed = draw(st.integers(0, 2**32 - 1))
    magnitude = draw(st.sampled_from([1e-3, 1.0, 300.0]))
    x = (np.random.default_rng(seed).standard_normal(shape) * magnitude).astype(src)
    return fp4fmt.quantize(x, scheme, axis=axis, scale_rule=rule, scale_layout=scale_layout)


@st.composite
def plain_arrays(draw: st.DrawFn) -> np.ndarray:
    """A numpy array of any supported dtype with arbitrary bit patterns, 0-D to 3-D, possibly empty."""
    dt = draw(st.sampled_from(list(PLAIN_DTYPES.values())))
    shape = tuple(draw(st.lists(st.integers(0, 5), min_size=0, max_size=3)))
    n = int(np.prod(shape, dtype=np.int64))
    raw = draw(st.binary(min_size=n * dt.itemsize, max_size=n * dt.itemsize))
    if dt == np.bool_:
        raw = bytes(b & 1 for b in raw)
    return np.frombuffer(raw, dtype=dt).reshape(shape).copy()


names = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1, max_size=6)


@st.composite
def tensor_dicts(draw: st.DrawFn) -> dict[str, object]:
    """A mix of QTensors (named 'q…') and plain arrays (named 'p…'), so no stored names collide."""
    quant = draw(st.dictionaries(names.map(lambda s: "q" + s), qtensors(), max_size=3))
    plain = draw(st.dictionaries(names.map(lambda s: "p" + s), plain_arrays(), max_size=4))
    tensors = {**quant, **plain}
    order = draw(st.permutations(list(tensors)))
    return {k: tensors[k] for k in order}


metadata_dicts = st.dictionaries(
    st.text(max_size=8).filter(lambda k: k != "fp4fmt"), st.text(max_size=20), max_size=4
)


# ------------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------------
def assert_same_tensor(got: object, want: object) -> None:
    """``got`` (read back) holds exactly what ``want`` (written) held: same kind, fields and bytes."""
    if isinstance(want, QTensor):
        assert isinstance(got, QTensor)
        for field in ("scheme", "shape", "axis", "dtype", "scale_layout", "scale_rule"):
            assert getattr(got, field) == getattr(want, field), field
        assert got.codes.dtype == np.uint8 and got.codes.shape == want.codes.shape
        assert got.codes.tobytes() == want.codes.tobytes()
        assert got.scales.dtype == want.scales.dtype and got.scales.shape == want.scales.shape
        assert got.scales.tobytes() == want.scales.tobytes()
        if want.tensor_scale is None:
            assert got.tensor_scale is None
        else:
            assert np.float32(got.tensor_scale).tobytes() == np.float32(want.tensor_scale).tobytes()
        np.testing.assert_array_equal(fp4fmt.dequantize(got), fp4fmt.dequantize(want))
    else:
        want = np.asarray(want)
        assert isinstance(got, np.ndarray)
        assert got.dtype == want.dtype.newbyteorder("<") and got.shape == want.shape
        assert got.tobytes() == want.astype(want.dtype.newbyteorder("<")).tobytes()


def expected_stored(tensors: dict[str, object]) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    """What a safetensors reader must see for ``tensors``: {stored name: (dtype, shape, bytes)} (§3.2)."""
    by_dtype = {dt: name for name, dt in PLAIN_DTYPES.items()}
    out = {}
    for name, t in tensors.items():
        if isinstance(t, QTensor):
            out[name + ".codes"] = ("U8", t.codes.shape, t.codes.tobytes())
            out[name + ".scales"] = (SCALE_DTYPE[t.scheme], t.scales.shape, t.scales.tobytes())
            if t.tensor_scale is not None:
                out[name + ".tensor_scale"] = ("F32", (), np.float32(t.tensor_scale).tobytes())
        else:
            a = np.asarray(t)
            out[name] = (by_dtype[a.dtype.newbyteorder("<")], a.shape, a.tobytes())
    return out


def leftover_temps(directory: Path) -> list[str]:
    """Temporary files the atomic writer left behind in ``directory``."""
    return [p.name for p in directory.iterdir() if p.name.endswith(TMP_PATTERN)]


def reaches_mmap(arr: np.ndarray) -> bool:
    """True if following ``.base`` (and a memoryview's ``.obj``) from ``arr`` ends at an mmap."""
    obj: object = arr
    for _ in range(16):
        if isinstance(obj, mmap.mmap):
            return True
        if isinstance(obj, np.ndarray):
            obj = obj.base
        elif isinstance(obj, memoryview):
            obj = obj.obj
        else:
            return False
    return False


def sample_tensors() -> dict[str, object]:
    """A fixed, small file's worth of tensors: both schemes, a swizzled layout, plain and empty arrays."""
    rng = np.random.default_rng(7)
    return {
        "w": fp4fmt.quantize(rng.standard_normal((3, 40)).astype(np.float32), "nvfp4", scale_layout="swizzled"),
        "m": fp4fmt.quantize(rng.standard_normal((2, 3, 45)).astype(ml_dtypes.bfloat16), "mxfp4", axis=2, scale_rule="even"),
        "bias": rng.standard_normal(5).astype(np.float32),
        "empty": np.zeros((0, 3), np.float16),
    }


@pytest.fixture
def sample_file(tmp_path: Path) -> Path:
    """``sample_tensors`` written with user metadata {'a': '1'}."""
    path = tmp_path / "sample.safetensors"
    fp4fmt.save_file(sample_tensors(), path, metadata={"a": "1"})
    return path


def rewrite(path: Path, edit: Callable[[bytes], bytes]) -> Path:
    """Replace the file at ``path`` by ``edit`` of its bytes; return the path."""
    path.write_bytes(edit(path.read_bytes()))
    return path


def assert_names(err: FP4FmtError, *, file: Path | str, tensor: str | None, rule_words: tuple[str, ...]) -> None:
    """The error names the file, the tensor (when given) and the rule (by some of its words)."""
    msg = str(err)
    assert err.file == os.fspath(file) and os.fspath(file) in msg
    if tensor is not None:
        assert err.tensor == tensor and repr(tensor) in msg
    for word in rule_words:
        assert word in msg, (word, msg)


# ------------------------------------------------------------------------------------------------------
# round trips and determinism
# ------------------------------------------------------------------------------------------------------
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(tensors=tensor_dicts(), metadata=metadata_dicts)
def test_round_trip_file_and_bytes(tmp_path_factory: pytest.TempPathFactory, tensors: dict, metadata: dict) -> None:
    """save_file/load_file and save/load give back every tensor bit for bit, and the user metadata."""
    path = tmp_path_factory.mktemp("rt") / "t.safetensors"
    fp4fmt.save_file(tensors, path, metadata=metadata)
    for loaded in (fp4fmt.load_file(path), fp4fmt.load(fp4fmt.save(tensors, metadata))):
        assert sorted(loaded) == sorted(tensors)
        for name, want in tensors.items():
            assert_same_tensor(loaded[name], want)
    with fp4fmt.safe_open(path) as f:
        assert f.metadata() == metadata
        assert f.is_fp4fmt
        assert f.keys() == sorted(tensors)
        f.verify()


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(tensors=tensor_dicts(), metadata=metadata_dicts)
def test_deterministic_bytes(tmp_path_factory: pytest.TempPathFactory, tensors: dict, metadata: dict) -> None:
    """Same tensors -> same bytes, whatever the dict order; save() returns what save_file() writes."""
    first = fp4fmt.save(tensors, metadata)
    assert fp4fmt.save(tensors, metadata) == first
    reordered = dict(reversed(list(tensors.items())))
    assert fp4fmt.save(reordered, dict(reversed(list(metadata.items())))) == first
    path = tmp_path_factory.mktemp("det") / "t.safetensors"
    fp4fmt.save_file(reordered, path, metadata=metadata)
    assert path.read_bytes() == first


def test_zero_dim_and_empty_arrays_keep_their_shape(tmp_path: Path) -> None:
    """A 0-dim array is stored with shape [] (not [1]) and empty arrays keep every dimension."""
    tensors = {"s": np.float64(2.5), "i": np.array(7, np.int32), "e": np.zeros((2, 0, 3), np.int16)}
    path = tmp_path / "z.safetensors"
    fp4fmt.save_file(tensors, path)
    _, header, _ = ft.split(path.read_bytes())
    assert header["s"]["shape"] == [] and header["i"]["shape"] == [] and header["e"]["shape"] == [2, 0, 3]
    loaded = fp4fmt.load_file(path)
    assert loaded["s"].shape == () and loaded["s"][()] == 2.5
    assert loaded["i"].shape == () and loaded["i"][()] == 7
    assert loaded["e"].shape == (2, 0, 3)


def test_big_endian_input_is_stored_little_endian() -> None:
    """A big-endian array is written in the little-endian byte order safetensors requires (§2.3)."""
    a = np.arange(6, dtype=">i4").reshape(2, 3)
    stored = ft.unpack(fp4fmt.save({"a": a}))[1]["a"]
    assert stored.dtype == "I32" and stored.data == a.astype("<i4").tobytes()
    np.testing.assert_array_equal(fp4fmt.load(fp4fmt.save({"a": a}))["a"], a)


# ------------------------------------------------------------------------------------------------------
# interoperability with the safetensors package and alignment
# ------------------------------------------------------------------------------------------------------
def torch_bytes(t: torch.Tensor) -> bytes:
    """Raw little-endian bytes of a CPU tensor."""
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(tensors=tensor_dicts(), metadata=metadata_dicts)
def test_safetensors_package_reads_every_stored_tensor(
    tmp_path_factory: pytest.TempPathFactory, tensors: dict, metadata: dict
) -> None:
    """safetensors.safe_open (pt and numpy) lists every stored tensor and reads the bytes fp4fmt wrote."""
    path = tmp_path_factory.mktemp("interop") / "t.safetensors"
    fp4fmt.save_file(tensors, path, metadata=metadata)
    want = expected_stored(tensors)
    with safetensors.safe_open(str(path), framework="pt") as f:
        assert sorted(f.keys()) == sorted(want)
        meta = f.metadata() or {}
        assert {k: v for k, v in meta.items() if k != "fp4fmt"} == metadata
        for name, (_, shape, data) in want.items():
            t = f.get_tensor(name)
            assert tuple(t.shape) == shape and torch_bytes(t) == data, name
    with safetensors.safe_open(str(path), framework="numpy") as f:
        assert sorted(f.keys()) == sorted(want)
        for name, (dtype, shape, data) in want.items():
            if dtype in NOT_NUMPY_READABLE:
                continue
            a = f.get_tensor(name)
            assert a.shape == shape and a.tobytes() == data, name


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(tensors=tensor_dicts(), metadata=metadata_dicts)
def test_header_and_tensor_alignment(tensors: dict, metadata: dict) -> None:
    """The header length is a multiple of 8 and each tensor starts at a multiple of its itemsize (§2.2)."""
    blob = fp4fmt.save(tensors, metadata)
    n, header, data = ft.split(blob)
    assert n % 8 == 0
    want = expected_stored(tensors)
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype, shape, payload = want[name]
        assert info["dtype"] == dtype and tuple(info["shape"]) == shape
        begin, end = info["data_offsets"]
        assert (8 + n + begin) % PLAIN_DTYPES[dtype].itemsize == 0, name
        assert data[begin:end] == payload


def test_plain_safetensors_file_opens_as_plain(tmp_path: Path) -> None:
    """A file written by the safetensors package reads as plain tensors; verify() says it has no descriptor."""
    path = tmp_path / "plain.safetensors"
    arrays = {"b": np.arange(4, dtype=np.int64), "a": np.ones((2, 2), np.float16)}
    safetensors.numpy.save_file(arrays, str(path), metadata={"x": "y"})
    with fp4fmt.safe_open(path) as f:
        assert not f.is_fp4fmt
        assert f.keys() == ["a", "b"]
        assert f.metadata() == {"x": "y"}
        assert f.tensor_descriptor("a") is None
        np.testing.assert_array_equal(f.get_tensor("b"), arrays["b"])
        with pytest.raises(FormatError) as ei:
            f.verify()
    assert_names(ei.value, file=path, tensor=None, rule_words=("no fp4fmt descriptor",))
    loaded = fp4fmt.load_file(path)
    assert sorted(loaded) == ["a", "b"]
    assert_same_tensor(loaded["a"], arrays["a"])


# ------------------------------------------------------------------------------------------------------
# safe_open
# ------------------------------------------------------------------------------------------------------
def test_safe_open_listing(sample_file: Path) -> None:
    """keys() are logical names, stored_keys() the parts, metadata() hides the descriptor."""
    with fp4fmt.safe_open(sample_file) as f:
        assert f.is_fp4fmt
        assert f.keys() == ["bias", "empty", "m", "w"]
        assert sorted(f.stored_keys()) == sorted(
            ["bias", "empty", "m.codes", "m.scales", "w.codes", "w.scales", "w.tensor_scale"]
        )
        assert f.metadata() == {"a": "1"}
        td = f.tensor_descriptor("w")
        assert (td.scheme, td.shape, td.axis, td.dtype, td.scale_layout, td.scale_rule) == (
            "nvfp4", (3, 40), 1, "F32", "swizzled", "amax")
        td = f.tensor_descriptor("m")
        assert (td.scheme, td.shape, td.axis, td.dtype, td.scale_layout, td.scale_rule) == (
            "mxfp4", (2, 3, 45), 2, "BF16", "linear", "even")
        assert f.tensor_descriptor("bias") is None
        for missing in ("nope", "w.codes"):  # a part is not a logical tensor
            with pytest.raises(KeyError):
                f.get_tensor(missing)
            with pytest.raises(KeyError):
                f.tensor_descriptor(missing)


def test_get_tensor_is_zero_copy_and_read_only(sample_file: Path) -> None:
    """get_tensor hands out read-only views of one mapping; they stay valid after the reader closes."""
    want = sample_tensors()
    with fp4fmt.safe_open(sample_file) as f:
        a, b = f.get_tensor("bias"), f.get_tensor("bias")
        qt = f.get_tensor("w")
        raw_codes = f.get_raw("w.codes")
    assert np.shares_memory(a, b)
    assert np.shares_memory(qt.codes, raw_codes)
    for arr in (a, qt.codes, qt.scales):
        assert not arr.flags.writeable
        assert reaches_mmap(arr)
        with pytest.raises(ValueError):
            arr[(0,) * arr.ndim] = 0
    # the with-block has closed the reader: the views are still readable and correct
    assert_same_tensor(a, want["bias"])
    assert_same_tensor(qt, want["w"])
    with pytest.raises(FormatError) as ei:
        f.get_tensor("bias")
    assert_names(ei.value, file=sample_file, tensor="bias", rule_words=("closed",))


def test_safe_open_reads_bytes_and_path_alike(sample_file: Path) -> None:
    """safe_open on the file's bytes sees the same tensors as on its path."""
    with fp4fmt.safe_open(sample_file.read_bytes()) as fb, fp4fmt.safe_open(str(sample_file)) as fp:
        assert fb.keys() == fp.keys()
        for name in fp.keys():
            assert_same_tensor(fb.get_tensor(name), fp.get_tensor(name))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(tensors=tensor_dicts())
def test_read_raw_is_a_private_copy_of_every_stored_tensor(tmp_path_factory: pytest.TempPathFactory,
                                                           tensors: dict) -> None:
    """read_raw gives the stored bytes, dtype and shape of get_raw, in fresh writable memory (from a path via
    pread, from bytes by copying); a truncated file is reported, naming the file and tensor."""
    path = tmp_path_factory.mktemp("raw") / "t.safetensors"
    fp4fmt.save_file(tensors, path)
    with fp4fmt.safe_open(path) as fp, fp4fmt.safe_open(path.read_bytes()) as fb:
        for stored in fp.stored_keys():
            view = fp.get_raw(stored)
            for f in (fp, fb):
                got = f.read_raw(stored)
                assert got.dtype == view.dtype and got.shape == view.shape
                assert got.tobytes() == view.tobytes()
                assert got.flags.writeable and not np.shares_memory(got, view) and not reaches_mmap(got)
        with pytest.raises(KeyError):
            fp.read_raw("no such tensor")
    entries = fp4fmt.safe_open(path).header.entries
    stored = max(entries.items(), key=lambda kv: kv[1].begin + kv[1].nbytes) if entries else ("", None)
    if stored[1] is not None and stored[1].nbytes:
        with fp4fmt.safe_open(path) as f:
            os.truncate(path, path.stat().st_size - 1)  # the header was read; the data now ends early
            with pytest.raises(FormatError) as ei:
                f.read_raw(stored[0])
        assert_names(ei.value, file=path, tensor=stored[0], rule_words=("truncated",))


# ------------------------------------------------------------------------------------------------------
# atomic writes
# ------------------------------------------------------------------------------------------------------
def _fail_data_write(monkeypatch: pytest.MonkeyPatch, error: BaseException) -> None:
    """Make the writer's second os.pwrite (the second tensor's data) raise ``error``."""
    real_pwrite = os.pwrite
    calls = {"n": 0}

    def pwrite(fd, data, offset):
        calls["n"] += 1
        if calls["n"] == 2:
            raise error
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(fp4fmt.files.os, "pwrite", pwrite)


@pytest.mark.parametrize(
    "error, expected",
    [(OSError(errno.ENOSPC, "No space left on device"), WriteError), (KeyboardInterrupt(), KeyboardInterrupt)],
)
def test_failed_write_leaves_previous_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: BaseException, expected: type
) -> None:
    """A write that fails midway leaves the old file byte for byte and no temporary file behind."""
    path = tmp_path / "model.safetensors"
    fp4fmt.save_file({"old": np.arange(10, dtype=np.float32)}, path)
    before = path.read_bytes()
    _fail_data_write(monkeypatch, error)
    with pytest.raises(expected) as ei:
        fp4fmt.save_file(sample_tensors(), path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert leftover_temps(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    if expected is WriteError:
        assert_names(ei.value, file=path, tensor=None, rule_words=("No space left",))


def test_write_into_missing_directory(tmp_path: Path) -> None:
    """A directory that does not exist gives a WriteError naming the file, and creates nothing."""
    path = tmp_path / "no" / "such" / "dir" / "x.safetensors"
    with pytest.raises(WriteError) as ei:
        fp4fmt.save_file({"a": np.zeros(3, np.float32)}, path)
    assert_names(ei.value, file=path, tensor=None, rule_words=("writing failed",))
    assert list(tmp_path.iterdir()) == []


def test_write_over_a_directory(tmp_path: Path) -> None:
    """Renaming over a directory fails with WriteError; the directory and its folder are left clean."""
    target = tmp_path / "taken"
    target.mkdir()
    with pytest.raises(WriteError) as ei:
        fp4fmt.save_file({"a": np.zeros(3, np.float32)}, target)
    assert_names(ei.value, file=target, tensor=None, rule_words=("writing failed",))
    assert target.is_dir() and list(target.iterdir()) == []
    assert leftover_temps(tmp_path) == []


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_file_mode_follows_umask(tmp_path: Path, umask: int) -> None:
    """Files are created 0644 less the process umask (mkstemp's private 0600 is not kept)."""
    old = os.umask(umask)
    try:
        fp4fmt.save_file({"a": np.zeros(2, np.uint8)}, tmp_path / "m.safetensors")
    finally:
        os.umask(old)
    assert (tmp_path / "m.safetensors").stat().st_mode & 0o777 == 0o644 & ~umask


# ------------------------------------------------------------------------------------------------------
# write errors
# ------------------------------------------------------------------------------------------------------
def test_reserved_metadata_key(tmp_path: Path) -> None:
    """User metadata may not use the descriptor's key 'fp4fmt'."""
    path = tmp_path / "r.safetensors"
    with pytest.raises(WriteError) as ei:
        fp4fmt.save_file({"a": np.zeros(2)}, path, metadata={"fp4fmt": "{}"})
    assert_names(ei.value, file=path, tensor=None, rule_words=("'fp4fmt'", "reserved"))
    assert not path.exists()


@pytest.mark.parametrize("metadata", [{"k": 1}, {1: "v"}, {"k": None}, {"k": b"v"}])
def test_non_string_metadata(tmp_path: Path, metadata: dict) -> None:
    """Metadata must map strings to strings."""
    path = tmp_path / "m.safetensors"
    with pytest.raises(WriteError) as ei:
        fp4fmt.save_file({"a": np.zeros(2)}, path, metadata=metadata)
    assert_names(ei.value, file=path, tensor=None, rule_words=("strings to strings",))
    with pytest.raises(WriteError):
        fp4fmt.save({"a": np.zeros(2)}, metadata)
    assert not path.exists()


@pytest.mark.parametrize("part", ["w.codes", "w.scales", "w.tensor_scale"])
def test_name_collision_with_a_part(tmp_path: Path, part: str) -> None:
    """A plain tensor may not take the stored name of a QTensor's part."""
    path = tmp_path / "c.safetensors"
    tensors = {"w": sample_tensors()["w"], part: np.zeros(3, np.float32)}
    with pytest.raises(WriteError) as ei:
        fp4fmt.save_file(tensors, path)
    assert_names(ei.value, file=path, tensor=part, rule_words=("used twice",))
    assert not path.exists()


def test_part_like_names_without_owner_are_plain(tmp_path: Path) -> None:
    """'x.codes' with no quantized 'x', and 'm.tensor_scale' next to an MXFP4 'm' (which has no tensor
    scale), are ordinary plain tensors (§3.2: plain tensors are the stored tensors no entry claims)."""
    m = sample_tensors()["m"]
    tensors = {"x.codes": np.arange(4, dtype=np.uint8), "m": m, "m.tensor_scale": np.float32(3.0)}
    path = tmp_path / "p.safetensors"
    fp4fmt.save_file(tensors, path)
    with fp4fmt.safe_open(path) as f:
        assert f.keys() == ["m", "m.tensor_scale", "x.codes"]
        assert f.tensor_descriptor("x.codes") is None and f.tensor_descriptor("m.tensor_scale") is None
        f.verify()
    loaded = fp4fmt.load_file(path)
    for name, want in tensors.items():
        assert_same_tensor(loaded[name], want)


def test_reserved_tensor_name(tmp_path: Path) -> None:
    """'__metadata__' is not a tensor name."""
    path = tmp_path / "n.safetensors"
    with pytest.raises(WriteError) as ei:
        fp4fmt.save_file({"__metadata__": np.zeros(2)}, path)
    assert_names(ei.value, file=path, tensor="__metadata__", rule_words=("reserved",))


@pytest.mark.parametrize("value, dtname", [(np.zeros(2, np.complex128), "complex128"), (np.array([1, "x"], dtype=object), "object")])
def test_unsupported_dtype(tmp_path: Path, value: np.ndarray, dtname: str) -> None:
    """A dtype with no safetensors name is refused, naming the tensor and the dtype."""
    path = tmp_path / "d.safetensors"
    with pytest.raises(WriteError) as ei:
        fp4fmt.save_file({"ok": np.zeros(2), "bad": value}, path)
    assert_names(ei.value, file=path, tensor="bad", rule_words=(dtname, "no safetensors equivalent"))
    assert not path.exists()


# ------------------------------------------------------------------------------------------------------
# versions and crafted bad files
# ------------------------------------------------------------------------------------------------------
def test_unknown_major_version(sample_file: Path) -> None:
    """format_version 2.0 is refused by every reader entry point with UnsupportedVersionError."""
    rewrite(sample_file, lambda b: ft.edit_descriptor(b, lambda d: d.update(format_version="2.0")))
    for read in (fp4fmt.safe_open, fp4fmt.load_file):
        with pytest.raises(UnsupportedVersionError) as ei:
            read(sample_file)
        assert_names(ei.value, file=sample_file, tensor=None, rule_words=("2.0", "not supported"))
    with pytest.raises(UnsupportedVersionError):
        fp4fmt.load(sample_file.read_bytes())


@pytest.mark.parametrize("version", ["1", "1.0.0", "v1.0", "01.0", 1.0, None])
def test_malformed_version(sample_file: Path, version: object) -> None:
    """format_version must be the string 'MAJOR.MINOR'."""
    rewrite(sample_file, lambda b: ft.edit_descriptor(b, lambda d: d.update(format_version=version)))
    with pytest.raises(FormatError) as ei:
        fp4fmt.safe_open(sample_file)
    assert not isinstance(ei.value, UnsupportedVersionError)
    assert_names(ei.value, file=sample_file, tensor=None, rule_words=("format_version",))


def test_newer_minor_version_with_unknown_fields_is_read(sample_file: Path) -> None:
    """A 1.7 descriptor with unknown fields at the top and in tensor entries reads like 1.0."""

    def future(doc: dict) -> None:
        doc["format_version"] = "1.7"
        doc["calibration"] = {"method": "something new", "samples": [1, 2, 3]}
        for entry in doc["tensors"].values():
            entry["outlier_channels"] = [0, 5]

    rewrite(sample_file, lambda b: ft.edit_descriptor(b, future))
    want = sample_tensors()
    loaded = fp4fmt.load_file(sample_file)
    assert sorted(loaded) == sorted(want)
    for name, t in want.items():
        assert_same_tensor(loaded[name], t)
    with fp4fmt.safe_open(sample_file) as f:
        f.verify()


def test_missing_part(sample_file: Path) -> None:
    """A quantized tensor whose scales are not stored is refused, naming the tensor and the part."""

    def drop(blob: bytes) -> bytes:
        meta, stored = ft.unpack(blob)
        del stored["w.scales"]
        doc = ft.descriptor_of(blob)
        del doc["checksums"]["w.scales"]
        meta["fp4fmt"] = json.dumps(doc)
        return ft.pack(meta, stored)

    rewrite(sample_file, drop)
    with pytest.raises(FormatError) as ei:
        fp4fmt.safe_open(sample_file)
    assert_names(ei.value, file=sample_file, tensor="w", rule_words=("'w.scales'", "missing"))


def test_checksum_for_a_tensor_not_in_the_file(sample_file: Path) -> None:
    """The descriptor may not list a checksum for a stored tensor that does not exist."""
    extra = ft.sha256(b"")
    rewrite(sample_file, lambda b: ft.edit_descriptor(b, lambda d: d["checksums"].update({"ghost": extra})))
    with pytest.raises(FormatError) as ei:
        fp4fmt.safe_open(sample_file)
    assert_names(ei.value, file=sample_file, tensor=None, rule_words=("'ghost'", "not in the file"))


def test_stored_tensor_without_checksum(sample_file: Path) -> None:
    """Every stored tensor of an fp4fmt file needs a checksum."""
    rewrite(sample_file, lambda b: ft.edit_descriptor(b, lambda d: d["checksums"].pop("bias")))
    with pytest.raises(FormatError) as ei:
        fp4fmt.safe_open(sample_file)
    assert_names(ei.value, file=sample_file, tensor=None, rule_words=("no checksum", "'bias'"))


def test_quantized_name_also_stored(sample_file: Path) -> None:
    """A quantized tensor's name may not also be a stored tensor's name."""

    def add(blob: bytes) -> bytes:
        meta, stored = ft.unpack(blob)
        stored["w"] = ft.Stored("U8", [1], b"\x00")
        doc = ft.descriptor_of(blob)
        doc["checksums"]["w"] = ft.sha256(b"\x00")
        meta["fp4fmt"] = json.dumps(doc)
        return ft.pack(meta, stored)

    rewrite(sample_file, add)
    with pytest.raises(FormatError) as ei:
        fp4fmt.safe_open(sample_file)
    assert_names(ei.value, file=sample_file, tensor="w", rule_words=("also be a stored tensor",))


@pytest.mark.parametrize(
    "part, field, value, words",
    [
        ("w.scales", "dtype", "U8", ("'w.scales'", "F8_E4M3")),  # same itemsize: a valid container
        ("m.scales", "dtype", "I8", ("'m.scales'", "U8")),
        ("w.codes", "shape", [24, 3], ("'w.codes'", "[3, 24]")),  # same byte count, transposed
        ("m.codes", "shape", [6, 32], ("'m.codes'", "[2, 3, 32]")),
    ],
)
def test_wrong_part_dtype_or_shape(sample_file: Path, part: str, field: str, value: object, words: tuple) -> None:
    """A part with a dtype or shape other than the descriptor implies is refused (§3.2)."""
    rewrite(sample_file, lambda b: ft.edit_header(b, lambda h: h[part].__setitem__(field, value)))
    with pytest.raises(FormatError) as ei:
        fp4fmt.safe_open(sample_file)
    assert_names(ei.value, file=sample_file, tensor=part.split(".")[0], rule_words=words)


@pytest.mark.parametrize("stored", ["w.codes", "w.scales", "w.tensor_scale", "m.codes", "bias"])
def test_flipped_data_byte_fails_checksum(sample_file: Path, stored: str) -> None:
    """A flipped data bit opens fine but verify() raises ChecksumError naming the stored tensor."""
    rewrite(sample_file, lambda b: ft.flip_byte(b, ft.data_offset(b, stored), 0x01))
    with fp4fmt.safe_open(sample_file) as f:
        f.keys()
        with pytest.raises(ChecksumError) as ei:
            f.verify()
    assert_names(ei.value, file=sample_file, tensor=stored, rule_words=("checksum mismatch",))


def _save_with(path: Path, name: str, qt: QTensor) -> Path:
    """Write ``qt`` (possibly hand-edited, checksums made to match) under ``name``."""
    fp4fmt.save_file({name: qt}, path)
    return path


@pytest.mark.parametrize("k, byte, mask, is_padding", [
    (17, 8, 0x10, True),    # element 17 (high nibble of byte 8) is the first padded element
    (17, 8, 0x01, False),   # element 16 (low nibble of byte 8) is data
    (17, 15, 0x80, True),   # the last padded element
    (20, 10, 0x01, True),   # even k: the whole byte 10 is padding
    (20, 9, 0xF0, False),
])
def test_nonzero_padding_codes(tmp_path: Path, k: int, byte: int, mask: int, is_padding: bool) -> None:
    """verify() rejects a non-zero code past the logical end of the blocked axis, and only there (§6.2)."""
    qt = fp4fmt.quantize(np.ones((2, k), np.float32), "nvfp4")
    codes = qt.codes.copy()
    codes[1, byte] ^= mask
    path = _save_with(tmp_path / "p.safetensors", "w", dataclasses.replace(qt, codes=codes))
    with fp4fmt.safe_open(path) as f:
        if is_padding:
            with pytest.raises(FormatError) as ei:
                f.verify()
            assert_names(ei.value, file=path, tensor="w", rule_words=("padding codes must be zero",))
        else:
            f.verify()


def test_nonzero_swizzle_padding(tmp_path: Path) -> None:
    """verify() rejects a non-zero byte in the padding of swizzled scales (§6.4)."""
    qt = fp4fmt.quantize(np.ones((3, 32), np.float32), "mxfp4", scale_layout="swizzled")
    scales = qt.scales.copy()
    assert scales.shape == (32, 16)  # 3 rows x 1 block padded to a 128x4 tile
    scales[-1, -1] = 1
    path = _save_with(tmp_path / "s.safetensors", "m", dataclasses.replace(qt, scales=scales))
    with fp4fmt.safe_open(path) as f, pytest.raises(FormatError) as ei:
        f.verify()
    assert_names(ei.value, file=path, tensor="m", rule_words=("swizzled scales",))


def test_nan_e8m0_scale(tmp_path: Path) -> None:
    """An E8M0 scale of 0xFF (NaN) loads but cannot be dequantized, and fails verify()."""
    qt = fp4fmt.quantize(np.ones((2, 64), np.float32), "mxfp4")
    scales = qt.scales.copy()
    scales[1, 1] = 0xFF
    path = _save_with(tmp_path / "n.safetensors", "m", dataclasses.replace(qt, scales=scales))
    loaded = fp4fmt.load_file(path)["m"]
    with pytest.raises(FormatError) as ei:
        fp4fmt.dequantize(loaded, name="m", file=path)
    assert_names(ei.value, file=path, tensor="m", rule_words=("0xFF", "NaN", "[1, 1]"))
    with fp4fmt.safe_open(path) as f, pytest.raises(FormatError) as ei:
        f.verify()
    assert not isinstance(ei.value, ChecksumError)
    assert_names(ei.value, file=path, tensor="m", rule_words=("0xFF",))


def test_negative_e4m3_scale(tmp_path: Path) -> None:
    """An NVFP4 block scale with the sign bit set fails verify() and dequantize()."""
    qt = fp4fmt.quantize(np.ones((2, 32), np.float32), "nvfp4")
    scales = qt.scales.view(np.uint8).copy()
    scales[0, 1] |= 0x80
    path = _save_with(tmp_path / "e.safetensors", "w", dataclasses.replace(qt, scales=scales.view(qt.scales.dtype)))
    with fp4fmt.safe_open(path) as f, pytest.raises(FormatError) as ei:
        f.verify()
    assert_names(ei.value, file=path, tensor="w", rule_words=("non-negative",))
    with pytest.raises(FormatError):
        fp4fmt.dequantize(fp4fmt.load_file(path)["w"])


def test_bad_tensor_scale_names_the_tensor(sample_file: Path) -> None:
    """A stored NVFP4 tensor scale of 0 opens (the container is fine) but get_tensor refuses it."""

    def zero_scale(blob: bytes) -> bytes:
        off = ft.data_offset(blob, "w.tensor_scale")
        return blob[:off] + struct.pack("<f", 0.0) + blob[off + 4 :]

    rewrite(sample_file, zero_scale)
    with fp4fmt.safe_open(sample_file) as f:
        np.testing.assert_array_equal(f.get_tensor("bias"), sample_tensors()["bias"])
        with pytest.raises(FormatError) as ei:
            f.get_tensor("w")
    assert_names(ei.value, file=sample_file, tensor="w", rule_words=("tensor_scale",))
    with pytest.raises(FormatError):
        fp4fmt.load_file(sample_file)
