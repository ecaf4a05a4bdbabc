"""The interop commands end to end on the converted SmolLM2: ``fp4fmt export --to F`` for every format and
scheme it takes, and for the importable formats ``fp4fmt convert`` back (format detected from config.json):
every stored byte of the round trip equals the original checkpoint's, and the round trip verifies.
The per-format tests (tests/test_interop_*.py) prove each export with the other project's own code."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import fp4fmt
from fp4fmt.cli import main
from fp4fmt.converters import interop
from fp4fmt.converters.checkpoint import Options, convert_checkpoint

CASES = [("compressed-tensors", "nvfp4"), ("compressed-tensors", "mxfp4"), ("modelopt", "nvfp4"),
         ("gguf", "nvfp4"), ("gguf", "mxfp4"), ("onnx", "nvfp4"), ("onnx", "mxfp4")]


@pytest.fixture(scope="module")
def converted(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("interop-cli")
    out = {}
    for scheme in ("nvfp4", "mxfp4"):
        out[scheme] = base / scheme
        convert_checkpoint(smollm2_dir, out[scheme], Options(scheme=scheme))
    return out


def stored(path: Path) -> dict[str, tuple]:
    """Every logical tensor of a checkpoint directory as comparable bytes (QTensor parts and descriptor)."""
    out = {}
    for shard in sorted(path.glob("*.safetensors")):
        with fp4fmt.safe_open(shard) as f:
            for name in f.keys():
                t = f.get_tensor(name)
                if isinstance(t, fp4fmt.QTensor):
                    out[name] = (t.scheme, t.shape, t.axis, t.dtype, t.codes.tobytes(), t.scales.tobytes(),
                                 None if t.tensor_scale is None else np.float32(t.tensor_scale).tobytes())
                else:
                    out[name] = (str(t.dtype), t.shape, t.tobytes())
    return out


@pytest.mark.parametrize("fmt,scheme", CASES)
def test_export_and_import_back(converted: dict, tmp_path: Path, fmt: str, scheme: str) -> None:
    src = converted[scheme]
    exported = tmp_path / "exported"
    res = CliRunner().invoke(main, ["export", str(src), str(exported), "--to", fmt])
    assert res.exit_code == 0, res.output
    assert exported.exists() and any(exported.iterdir())
    if fmt not in interop.IMPORTERS:
        return
    assert interop.detect_format(exported) == fmt
    back = tmp_path / "back"
    res = CliRunner().invoke(main, ["convert", str(exported), str(back)])
    assert res.exit_code == 0, res.output
    assert "without requantizing" in res.output
    want, got = stored(src), stored(back)
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name] == want[name], name
    res = CliRunner().invoke(main, ["verify", str(back)])
    assert res.exit_code == 0, res.output


def test_export_refusals(converted: dict, smollm2_dir: Path, tmp_path: Path) -> None:
    res = CliRunner().invoke(main, ["export", str(smollm2_dir), str(tmp_path / "x"), "--to", "compressed-tensors"])
    assert res.exit_code == 2 and "quantization_config" in res.output
    res = CliRunner().invoke(main, ["export", str(converted["mxfp4"]), str(tmp_path / "y"), "--to", "modelopt"])
    assert res.exit_code == 2 and "error:" in res.output
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    res = CliRunner().invoke(main, ["export", str(converted["nvfp4"]), str(tmp_path / "full"), "--to", "onnx"])
    assert res.exit_code == 2 and "overwrite" in res.output
    assert (tmp_path / "full" / "keep.txt").read_text() == "x"
