"""The CLI (inspect, verify, convert) on real files: exit codes, JSON output, error messages."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import save_file as st_save_file

import fp4fmt
from fp4fmt.cli import main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def demo_src(tmp_path: Path) -> Path:
    """A small Llama-shaped BF16 file written by the project's own generator (plain safetensors)."""
    out = tmp_path / "demo-bf16.safetensors"
    subprocess.run(
        [sys.executable, str(REPO / "tools" / "make_demo_checkpoint.py"), str(out), "--layers", "1",
         "--hidden", "64", "--intermediate", "96", "--vocab", "128"],
        check=True,
    )
    return out


def test_convert_inspect_verify_round_trip(demo_src: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    for scheme in ("nvfp4", "mxfp4"):
        dst = tmp_path / f"demo-{scheme}.safetensors"
        r = runner.invoke(main, ["convert", str(demo_src), str(dst), "--scheme", scheme, "--json"])
        assert r.exit_code == 0, r.output
        report = json.loads(r.stdout[r.stdout.index("{"):])
        # the seven projections are quantized; embeddings, norms and lm_head are kept with a reason
        assert len(report["quantized"]) == 7
        assert "lm_head.weight" in report["kept"] and "model.embed_tokens.weight" in report["kept"]
        assert all(v["sqnr_db"] > 15 for v in report["quantized"].values())

        r = runner.invoke(main, ["inspect", "--json", str(dst)])
        assert r.exit_code == 0, r.output
        info = json.loads(r.stdout)
        kinds = {t["name"]: t["kind"] for t in info["files"][0]["tensors"]}
        assert kinds["model.layers.0.mlp.down_proj.weight"] == scheme
        assert kinds["lm_head.weight"] == "plain"
        s = info["summary"]
        expected_bpw = 4.5 if scheme == "nvfp4" else 4.25
        assert abs(s["by_kind"][scheme]["bits_per_weight"] - expected_bpw) < 0.01
        assert s["compression_ratio"] == pytest.approx(s["original_bytes"] / s["stored_bytes"])
        assert s["original_bytes"] == os.path.getsize(demo_src) - _header_bytes(demo_src)

        r = runner.invoke(main, ["verify", str(dst)])
        assert r.exit_code == 0 and "PASS" in r.output

        # the converted file decodes close to the source, and the source was not touched
        src = fp4fmt.load_file(demo_src)
        out = fp4fmt.load_file(dst)
        w = "model.layers.0.mlp.up_proj.weight"
        err = np.abs(fp4fmt.dequantize(out[w]) - src[w].astype(np.float32)).max()
        assert err <= 0.5 * np.abs(src[w].astype(np.float32)).max()
        assert np.array_equal(out["lm_head.weight"].view(np.uint16), src["lm_head.weight"].view(np.uint16))


def _header_bytes(path: Path) -> int:
    with open(path, "rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


def test_verify_fails_on_corruption_and_plain_files(demo_src: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    dst = tmp_path / "x.safetensors"
    assert runner.invoke(main, ["convert", str(demo_src), str(dst)]).exit_code == 0
    data = bytearray(dst.read_bytes())
    data[-3] ^= 0x40  # flip a bit in the last tensor's data
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bytes(data))
    r = runner.invoke(main, ["verify", "--json", str(dst), str(bad), str(demo_src)])
    assert r.exit_code == 1
    res = {Path(f["path"]).name: f for f in json.loads(r.stdout)["files"]}
    assert res["x.safetensors"]["ok"]
    assert not res["bad.safetensors"]["ok"] and "checksum mismatch" in res["bad.safetensors"]["error"]
    assert not res["demo-bf16.safetensors"]["ok"] and "no fp4fmt descriptor" in res["demo-bf16.safetensors"]["error"]
    # a directory: every .safetensors inside is checked, then the directory as a checkpoint (here three
    # files and no index, which is not a checkpoint)
    r = runner.invoke(main, ["verify", str(tmp_path)])
    assert r.exit_code == 1 and r.output.count("PASS") == 1 and r.output.count("FAIL") == 3
    assert "no model.safetensors.index.json" in r.output


def test_errors_are_clear(tmp_path: Path, demo_src: Path) -> None:
    runner = CliRunner()
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(demo_src.read_bytes()[:100])
    r = runner.invoke(main, ["inspect", str(trunc)])
    assert r.exit_code == 2 and "trunc.safetensors" in r.output and "header length" in r.output
    dst = tmp_path / "exists.safetensors"
    dst.write_bytes(b"keep me")
    r = runner.invoke(main, ["convert", str(demo_src), str(dst)])
    assert r.exit_code == 2 and "--overwrite" in r.output and dst.read_bytes() == b"keep me"
    # NaN in a weight: the error names the file-level tensor and index; nothing is written
    nan_src = tmp_path / "nan.safetensors"
    w = np.ones((4, 32), dtype=np.float32)
    w[2, 7] = np.nan
    st_save_file({"layer.weight": w}, str(nan_src))
    out = tmp_path / "nan-out.safetensors"
    r = runner.invoke(main, ["convert", str(nan_src), str(out)])
    assert r.exit_code == 2 and "nan.safetensors" in r.output and "layer.weight" in r.output and "[2, 7]" in r.output
    assert not out.exists()


def test_inspect_plain_bf16_counts_original_bytes(tmp_path: Path) -> None:
    p = tmp_path / "p.safetensors"
    st_save_file({"a": np.zeros((3, 5), dtype=ml_dtypes.bfloat16)}, str(p))
    r = CliRunner().invoke(main, ["inspect", "--json", str(p)])
    info = json.loads(r.stdout)
    assert info["files"][0]["format_version"] is None
    assert info["summary"]["stored_bytes"] == 30 and info["summary"]["compression_ratio"] == 1.0
