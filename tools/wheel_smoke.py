"""Smoke test of an installed fp4fmt wheel: run from outside the source tree, in a fresh venv.

    python tools/wheel_smoke.py path/to/fp4fmt-*.whl

Checks that the wheel installs only the ``fp4fmt`` namespace (converters and kernels inside it), that the
installed package (not the source tree) is imported, that the C accelerator is present, and that a
quantize / save / load / verify round trip and the CLI work.
"""

from __future__ import annotations

import glob
import importlib.util
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np


def main() -> None:
    wheel = glob.glob(sys.argv[1])[0]
    tops = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    unexpected = {t for t in tops if not (t == "fp4fmt" or t.startswith("fp4fmt-"))}
    assert not unexpected, f"wheel installs top-level names outside fp4fmt: {unexpected}"
    assert importlib.util.find_spec("converters") is None and importlib.util.find_spec("kernels") is None

    import fp4fmt
    import fp4fmt.converters
    import fp4fmt.kernels  # noqa: F401
    from fp4fmt import qtensor

    assert "site-packages" in fp4fmt.__file__, f"imported from the source tree: {fp4fmt.__file__}"
    assert qtensor._native is not None, "the C accelerator was not built into the wheel"
    # the eval package data (bundled corpus, GSM8K slice, result schema) is in the wheel
    import json
    from importlib import resources

    from fp4fmt.eval import probes

    assert [p.level for p in probes.make_probes(per_level=2)] == [1, 1, 2, 2, 3, 3, 4, 4]
    assert json.loads(resources.files("fp4fmt.eval").joinpath("eval.schema.json").read_text())["title"]
    assert len(resources.files("fp4fmt.eval").joinpath("data", "tinyshakespeare_60k.txt").read_text()) == 60000
    import fp4fmt.converters.interop.common  # noqa: F401

    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 96)).astype(np.float32)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "smoke.safetensors"
        fp4fmt.save_file({"w": fp4fmt.quantize(x, "nvfp4"), "m": fp4fmt.quantize(x, "mxfp4"), "b": x[0]}, path)
        loaded = fp4fmt.load_file(path)
        for name in ("w", "m"):
            y = fp4fmt.dequantize(loaded[name])
            assert np.max(np.abs(y - x)) <= 0.5 * np.max(np.abs(x)), name
        assert np.array_equal(loaded["b"], x[0])
        cli = [sys.executable, "-m", "fp4fmt.cli"]
        subprocess.run(cli + ["verify", str(path)], check=True)
        out = subprocess.run(cli + ["inspect", "--json", str(path)], check=True, capture_output=True, text=True).stdout
        assert '"nvfp4"' in out and '"mxfp4"' in out
    print(f"wheel smoke test passed: {Path(wheel).name}, fp4fmt {fp4fmt.__version__} from {fp4fmt.__file__}")


if __name__ == "__main__":
    main()
