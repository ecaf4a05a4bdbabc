"""Peak memory and speed of loading a converted checkpoint with ``fp4fmt.torch.from_pretrained`` (CPU).

    python tools/bench_load.py [DIR ...]    (default: SmolLM2-135M converted to NVFP4 and MXFP4 in a temp dir)

Each checkpoint is loaded in a fresh process. The process first imports torch, transformers and fp4fmt.torch
and records its peak RSS (``ru_maxrss``): the fixed overhead. It then loads the model and records the peak
again. Reported: the growth (peak after - peak before) against the checkpoint's own bytes (packed codes,
scales and tensor scales, plus the tensors kept in high precision) and against the size of the same model
in BF16. The target is a growth of about the packed size plus the unquantized tensors, not the BF16 size.
Also reported: load time, and the time of one forward pass over 128 tokens (tile-by-tile decoding, and
with ``cache=True``), with torch's BF16 model of the source checkpoint in the same process as the baseline.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
sys.path.insert(0, str(TOOLS))

CHILD = r"""
import json, resource, sys, time
import torch, transformers
import fp4fmt, fp4fmt.torch as ft
torch.set_num_threads(2)
def peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
path, src = sys.argv[1], sys.argv[2]
getattr(transformers, json.load(open(path + '/config.json'))['architectures'][0])  # lazy model-class import: fixed overhead
before = peak()
t = time.perf_counter()
model = ft.from_pretrained(path)
load_s = time.perf_counter() - t
after = peak()
stored = quant = plain = 0
from pathlib import Path
for f in sorted(Path(path).glob("*.safetensors")):
    with fp4fmt.safe_open(f) as r:
        owner = r.descriptor.owner_of() if r.descriptor else {}
        for name, e in r.header.entries.items():
            if name in owner:
                quant += e.nbytes
            else:
                plain += e.nbytes
bf16 = sum(p.numel() for p in model.parameters()) * 2 + sum(
    m.in_features * m.out_features * 2 for m in model.modules() if isinstance(m, ft.FP4Linear))
ids = torch.randint(0, model.config.vocab_size, (1, 128))
def fwd(m):
    with torch.no_grad():
        m(ids)
        t = time.perf_counter(); m(ids); return time.perf_counter() - t
fwd_tiles = fwd(model)
for m in model.modules():
    if isinstance(m, ft.FP4Linear):
        m.cache = True
fwd_cached = fwd(model)
ref = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).eval()
fwd_bf16 = fwd(ref)
print(json.dumps(dict(before=before, after=after, growth=after - before, packed=quant, plain=plain,
                      bf16=bf16, load_s=load_s, fwd_tiles_s=fwd_tiles, fwd_cached_s=fwd_cached,
                      fwd_bf16_s=fwd_bf16)))
"""


def measure(path: Path, src: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="2")
    out = subprocess.run([sys.executable, "-c", CHILD, str(path), str(src)], capture_output=True, text=True,
                         env=env, check=True, cwd=tempfile.gettempdir())  # not the repo root: its kernels/ would shadow HF kernels
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str]) -> int:
    import smollm2_checkpoint

    from fp4fmt.converters.checkpoint import Options, convert_checkpoint

    src = smollm2_checkpoint.build()
    with tempfile.TemporaryDirectory() as tmp:
        dirs = [Path(a) for a in argv]
        if not dirs:
            for scheme in ("nvfp4", "mxfp4"):
                convert_checkpoint(src, Path(tmp) / scheme, Options(scheme=scheme))
                dirs.append(Path(tmp) / scheme)
        mb = 1e6
        print("| checkpoint | fixed overhead (torch, transformers) | RSS growth of loading | packed FP4 parts | "
              "kept tensors | packed + kept | BF16 model | load s | forward 128 tok: tiles / cached / BF16 s |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for d in dirs:
            r = measure(d, src)
            print(f"| {d.name} | {r['before'] / mb:.0f} MB | {r['growth'] / mb:.0f} MB | {r['packed'] / mb:.1f} MB | "
                  f"{r['plain'] / mb:.1f} MB | {(r['packed'] + r['plain']) / mb:.1f} MB | {r['bf16'] / mb:.0f} MB | "
                  f"{r['load_s']:.2f} | {r['fwd_tiles_s']:.3f} / {r['fwd_cached_s']:.3f} / {r['fwd_bf16_s']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
