"""The conformance vectors in spec/vectors/: reproducible, decoded identically by fp4fmt and by an
independent reader (tests/spec_reader.py), re-quantized to the same bytes, hashed and verifiable."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import struct
import sys
from pathlib import Path
from types import ModuleType

import ml_dtypes
import numpy as np
import pytest

import fp4fmt

ROOT = Path(__file__).resolve().parents[1]
VECTORS_DIR = ROOT / "spec" / "vectors"


def load_module(name: str, path: Path) -> ModuleType:
    """Import a module from a file that is not on sys.path (tools/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


make_vectors = load_module("make_vectors", ROOT / "tools" / "make_vectors.py")
spec_reader = load_module("spec_reader", ROOT / "tests" / "spec_reader.py")

MANIFEST = json.loads((VECTORS_DIR / "manifest.json").read_text(encoding="utf-8"))
VECTORS = {v["name"]: v for v in MANIFEST["vectors"]}
NAMES = sorted(VECTORS)


def vector_path(vector: str, kind: str) -> Path:
    return VECTORS_DIR / VECTORS[vector]["files"][kind]["path"]


def assert_same_bits(got: np.ndarray, want: np.ndarray, what: str) -> None:
    """float32 arrays equal bit for bit (so -0.0 differs from +0.0); the message shows the first mismatch."""
    assert got.dtype == np.float32 and want.dtype == np.float32, what
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    g, w = np.ascontiguousarray(got).view(np.uint32), np.ascontiguousarray(want).view(np.uint32)
    if not np.array_equal(g, w):
        idx = tuple(int(i) for i in np.argwhere(g != w)[0])
        pytest.fail(f"{what}: at {list(idx)} got {got[idx]!r} (0x{g[idx]:08x}), expected {want[idx]!r} (0x{w[idx]:08x})")


def manifest_tensor_names(vector: str) -> list[str]:
    return sorted(t["name"] for t in VECTORS[vector]["tensors"])


# -- (a) reproducibility ------------------------------------------------------------------------------------


def test_generator_reproduces_committed_files_byte_for_byte(tmp_path: Path) -> None:
    """Running tools/make_vectors.py again writes exactly the committed files and manifest."""
    manifest = make_vectors.generate(str(tmp_path))
    assert manifest == MANIFEST
    produced = sorted(os.listdir(tmp_path))
    committed = sorted(p for p in os.listdir(VECTORS_DIR) if p != "README.md")
    assert produced == committed
    for name in produced:
        assert (tmp_path / name).read_bytes() == (VECTORS_DIR / name).read_bytes(), f"{name} differs"


def test_generator_refuses_a_vector_that_misses_its_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    """The generator checks its vectors: ties nudged off the thresholds are caught and named."""
    original = make_vectors.tie_block
    monkeypatch.setattr(make_vectors, "tie_block", lambda scale, width: original(scale, width) * (1 + 2.0**-10))
    with pytest.raises(make_vectors.VectorCheckError, match=r"vector 'nvfp4_ties': no element with x/f == ±0\.25"):
        make_vectors.nvfp4_ties()


# -- (b), (c) decoding --------------------------------------------------------------------------------------


@pytest.mark.parametrize("vector", NAMES)
def test_fp4fmt_decodes_to_expected_bits(vector: str) -> None:
    """fp4fmt.dequantize of every tensor of the .fp4 file equals the .expected float32 bits."""
    quantized = fp4fmt.load_file(vector_path(vector, "fp4"))
    expected = fp4fmt.load_file(vector_path(vector, "expected"))
    assert sorted(quantized) == sorted(expected) == manifest_tensor_names(vector)
    for name, qt in quantized.items():
        assert isinstance(qt, fp4fmt.QTensor), name
        assert_same_bits(fp4fmt.dequantize(qt), expected[name], f"{vector}/{name}")


@pytest.mark.parametrize("vector", NAMES)
def test_spec_reader_decodes_to_expected_bits(vector: str) -> None:
    """The independent reader decodes every .fp4 file to the .expected float32 bits (read by itself too)."""
    decoded = spec_reader.read_file(str(vector_path(vector, "fp4")))
    expected = spec_reader.read_file(str(vector_path(vector, "expected")))
    assert sorted(decoded) == sorted(expected) == manifest_tensor_names(vector)
    for name in decoded:
        assert_same_bits(decoded[name], expected[name], f"{vector}/{name}")


@pytest.mark.parametrize("vector", NAMES)
def test_spec_reader_reads_inputs_like_fp4fmt(vector: str) -> None:
    """Plain BF16/F16/F32 tensors read by the independent reader have fp4fmt's values."""
    ours = spec_reader.read_file(str(vector_path(vector, "input")))
    theirs = fp4fmt.load_file(vector_path(vector, "input"))
    assert sorted(ours) == sorted(theirs) == manifest_tensor_names(vector)
    for name, arr in theirs.items():
        assert_same_bits(np.asarray(ours[name], np.float32), arr.astype(np.float32), f"{vector}/{name}")


# -- (d) re-quantization ------------------------------------------------------------------------------------


@pytest.mark.parametrize("implementation", ["reference", "auto"])
@pytest.mark.parametrize("vector", NAMES)
def test_requantizing_inputs_gives_the_stored_parts(vector: str, implementation: str) -> None:
    """quantize(input, manifest parameters) gives exactly the stored codes, scales and tensor scale."""
    inputs = fp4fmt.load_file(vector_path(vector, "input"))
    stored = fp4fmt.load_file(vector_path(vector, "fp4"))
    for t in VECTORS[vector]["tensors"]:
        name = t["name"]
        src = inputs[name]
        assert fp4fmt.dtypes.dtype_name(src.dtype) == t["dtype"] and list(src.shape) == t["shape"], name
        qt = fp4fmt.quantize(src, t["scheme"], axis=t["axis"], tensor_scale=t.get("tensor_scale"), scale_rule=t["scale_rule"],
                             scale_layout=t["scale_layout"], implementation=implementation)
        ref = stored[name]
        fields = ("scheme", "shape", "axis", "dtype", "scale_layout", "scale_rule")
        assert {f: getattr(ref, f) for f in fields} == {f: getattr(qt, f) for f in fields} == {
            "scheme": t["scheme"], "shape": tuple(t["shape"]), "axis": t["axis"], "dtype": t["dtype"],
            "scale_layout": t["scale_layout"], "scale_rule": t["scale_rule"]}, name
        assert qt.codes.tobytes() == ref.codes.tobytes(), f"{vector}/{name}: codes differ"
        assert qt.scales.view(np.uint8).tobytes() == ref.scales.view(np.uint8).tobytes(), f"{vector}/{name}: scales differ"
        if t["scheme"] == "nvfp4":
            assert np.float32(qt.tensor_scale).tobytes() == np.float32(ref.tensor_scale).tobytes(), name
            if "tensor_scale" in t:
                assert np.float32(ref.tensor_scale) == np.float32(t["tensor_scale"]), name
        else:
            assert qt.tensor_scale is None and ref.tensor_scale is None and "tensor_scale" not in t, name


# -- (e) hashes, (f) verification ---------------------------------------------------------------------------


def test_manifest_hashes_match_files_and_list_every_file() -> None:
    """Each file's sha256 is the manifest's, and the folder holds nothing the manifest does not list."""
    listed = {"manifest.json", "README.md"}
    for v in MANIFEST["vectors"]:
        assert sorted(v["files"]) == ["expected", "fp4", "input"], v["name"]
        for kind, entry in v["files"].items():
            assert entry["path"] == f"{v['name']}.{kind}.safetensors"
            data = (VECTORS_DIR / entry["path"]).read_bytes()
            assert hashlib.sha256(data).hexdigest() == entry["sha256"], entry["path"]
            listed.add(entry["path"])
    assert set(os.listdir(VECTORS_DIR)) == listed


@pytest.mark.parametrize("vector", NAMES)
def test_every_file_verifies(vector: str) -> None:
    """fp4fmt's safe_open(...).verify() accepts all three files of the vector (checksums, scales, padding)."""
    for kind in make_vectors.FILE_KINDS:
        with fp4fmt.safe_open(vector_path(vector, kind)) as f:
            f.verify()
            assert f.is_fp4fmt


def test_corrupted_copy_is_rejected_by_both_readers(tmp_path: Path) -> None:
    """One flipped bit in a codes part: the spec reader and fp4fmt's verify() both name the file and part."""
    path = tmp_path / "nvfp4_ties.fp4.safetensors"
    shutil.copyfile(vector_path("nvfp4_ties", "fp4"), path)
    blob = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", blob[:8])
    begin = json.loads(blob[8 : 8 + n])["w.codes"]["data_offsets"][0]
    blob[8 + n + begin] ^= 0x01
    path.write_bytes(bytes(blob))
    with pytest.raises(spec_reader.SpecReaderError, match=r"tensor 'w\.codes'.*§3\.3") as e:
        spec_reader.read_file(str(path))
    assert str(path) in str(e.value)
    with fp4fmt.safe_open(path) as f, pytest.raises(fp4fmt.ChecksumError) as ce:
        f.verify()
    assert ce.value.file == str(path) and ce.value.tensor == "w.codes" and "§3.3" in ce.value.rule


# -- the independent reader's number formats ---------------------------------------------------------------


def test_spec_reader_number_formats_match_ml_dtypes() -> None:
    """E2M1, E4M3 and E8M0 decoded from the bit rules equal ml_dtypes' tables for every code (NaN included)."""
    cases = (
        (spec_reader.E2M1_TABLE, np.arange(16, dtype=np.uint8), ml_dtypes.float4_e2m1fn),
        (spec_reader.E4M3_TABLE, np.arange(256, dtype=np.uint8), ml_dtypes.float8_e4m3fn),
        (spec_reader.E8M0_TABLE, np.arange(256, dtype=np.uint8), ml_dtypes.float8_e8m0fnu),
    )
    for ours, codes, dtype in cases:
        theirs = codes.view(dtype).astype(np.float64)
        nan = np.isnan(theirs)
        assert np.array_equal(nan, np.isnan(ours)), dtype
        assert np.array_equal(theirs[~nan], ours[~nan]), dtype
        assert np.array_equal(np.signbit(theirs[~nan]), np.signbit(ours[~nan])), dtype


def test_readme_describes_every_vector() -> None:
    """spec/vectors/README.md names every vector of the manifest."""
    readme = (VECTORS_DIR / "README.md").read_text(encoding="utf-8")
    missing = [name for name in NAMES if f"`{name}`" not in readme]
    assert not missing, f"README.md does not describe {missing}"
