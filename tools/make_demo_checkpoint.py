"""Write a small, deterministic Llama-shaped BF16 safetensors file (the interim demo input).

    python tools/make_demo_checkpoint.py OUT.safetensors [--layers 2 --hidden 256 --intermediate 704]

The weights are random (seeded) with a heavy-ish tail, shaped like a Llama decoder so that the converter
has embeddings, norms, attention and MLP projections and an lm_head to tell apart.
"""

from __future__ import annotations

import argparse

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file


def make(layers: int, hidden: int, intermediate: int, vocab: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)

    def w(*shape: int) -> np.ndarray:
        x = rng.standard_t(df=5, size=shape).astype(np.float32) * (1.0 / np.sqrt(shape[-1]))
        return x.astype(ml_dtypes.bfloat16)

    t: dict[str, np.ndarray] = {"model.embed_tokens.weight": w(vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}"
        for proj, shape in [("q_proj", (hidden, hidden)), ("k_proj", (hidden // 4, hidden)),
                            ("v_proj", (hidden // 4, hidden)), ("o_proj", (hidden, hidden))]:
            t[f"{p}.self_attn.{proj}.weight"] = w(*shape)
        for proj, shape in [("gate_proj", (intermediate, hidden)), ("up_proj", (intermediate, hidden)),
                            ("down_proj", (hidden, intermediate))]:
            t[f"{p}.mlp.{proj}.weight"] = w(*shape)
        t[f"{p}.input_layernorm.weight"] = np.ones(hidden, dtype=ml_dtypes.bfloat16)
        t[f"{p}.post_attention_layernorm.weight"] = np.ones(hidden, dtype=ml_dtypes.bfloat16)
    t["model.norm.weight"] = np.ones(hidden, dtype=ml_dtypes.bfloat16)
    t["lm_head.weight"] = w(vocab, hidden)
    return t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--intermediate", type=int, default=704)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    save_file(make(a.layers, a.hidden, a.intermediate, a.vocab, a.seed), a.out, metadata={"format": "pt"})


if __name__ == "__main__":
    main()
