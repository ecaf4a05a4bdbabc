"""``fp4fmt eval``: the baseline and its FP4 variants on the same inputs, in one process.

For every model: memory (bytes on disk, resident weight bytes, RSS growth of loading), speed (prefill and
decode tokens/s on the same prompt), fidelity (perplexity on the bundled corpus by one code path for all; KL
of each variant's next-token distribution from the baseline's, mean and p99; top-1 agreement), per-layer SQNR
from the conversion report, the graded crack hunt (``probes``), and for fp4fmt variants "kernel or format":
the fast path (``FP4Linear``: Triton kernels on CUDA, torch decoding on CPU) against the same file decoded by
the reference ``fp4fmt.dequantize`` into the baseline architecture. The result is a JSON-ready dict
(``eval.schema.json``, version ``EVAL_VERSION``).
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from ..errors import FP4FmtError
from . import metrics, probes

EVAL_VERSION = 1
CORPUS = "tinyshakespeare_60k.txt"

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class EvalOptions:
    """What to run. ``limit``: probes per difficulty level; ``seed``: probe generation and sampling of the
    corpus windows; perplexity/KL over ``ppl_windows`` windows of ``window_tokens`` tokens."""

    limit: int = 10
    seed: int = 0
    ppl_windows: int = 16
    window_tokens: int = 256
    speed_prompt_tokens: int = 128
    speed_new_tokens: int = 32
    speed_repeats: int = 3
    max_new_tokens: int = 128
    batch_size: int = 10
    threads: int | None = None
    device: str = "cpu"


@dataclass
class Loaded:
    name: str
    path: Path
    kind: str  # "baseline", "fp4fmt" or "hf" (another high-precision checkpoint)
    model: torch.nn.Module
    scheme: str | None
    memory: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------------
# helpers


def _rss() -> int:
    """Current resident set size in bytes (Linux /proc; else the peak so far)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return _peak_rss()


def _peak_rss() -> int:
    ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return ru if platform.system() == "Darwin" else ru * 1024


def _config(path: Path) -> dict:
    f = path / "config.json"
    if not f.exists():
        raise FP4FmtError("no config.json: not a Hugging Face checkpoint directory", file=path)
    return json.loads(f.read_text())


def _is_fp4fmt(path: Path) -> bool:
    return (_config(path).get("quantization_config") or {}).get("quant_method") == "fp4fmt"


def _weight_bytes(model: torch.nn.Module) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:  # tied weights count once
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def _load(path: Path, name: str, kind: str, opts: EvalOptions) -> Loaded:
    import transformers

    from .. import torch as ft

    before = _rss()
    t0 = time.perf_counter()
    if kind == "fp4fmt":
        model = ft.from_pretrained(path, device=opts.device)
        scheme = _config(path)["quantization_config"].get("scheme")
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to(opts.device).eval()
        scheme = None
    load_s = time.perf_counter() - t0
    disk = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    memory = {"disk_bytes": disk, "resident_weight_bytes": _weight_bytes(model),
              "rss_growth_bytes": max(0, _rss() - before), "load_seconds": load_s}
    return Loaded(name, path, kind, model, scheme, memory)


def _corpus_windows(tok, opts: EvalOptions) -> torch.Tensor:
    """``ppl_windows`` disjoint windows of ``window_tokens`` tokens of the bundled corpus, chosen by the seed."""
    text = resources.files("fp4fmt.eval").joinpath("data", CORPUS).read_text(encoding="utf-8")
    ids = tok(text, return_tensors="pt", add_special_tokens=False, verbose=False)["input_ids"][0]
    n_all = ids.numel() // opts.window_tokens
    if n_all == 0:
        raise FP4FmtError(f"the corpus has fewer than {opts.window_tokens} tokens")
    rng = np.random.default_rng(opts.seed)
    pick = np.sort(rng.choice(n_all, size=min(opts.ppl_windows, n_all), replace=False))
    return torch.stack([ids[i * opts.window_tokens:(i + 1) * opts.window_tokens] for i in pick])


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids.to(next(model.parameters()).device)).logits.float().cpu()


def _set_cache(model, on: bool) -> None:
    from .. import torch as ft

    for m in model.modules():
        if isinstance(m, ft.FP4Linear):
            m.cache = on
            if not on:
                m._cached = None


# ------------------------------------------------------------------------------------------------------
# the stages


def _speed(v: Loaded, prompt: torch.Tensor, opts: EvalOptions) -> dict:
    """Prefill tokens/s (one forward over the prompt) and decode tokens/s (greedy, KV cache), medians."""
    model, dev = v.model, next(v.model.parameters()).device
    ids = prompt[None].to(dev)
    mask = torch.ones_like(ids)
    prefill, total = [], []
    with torch.no_grad():
        model(ids)  # warm-up
        for _ in range(opts.speed_repeats):
            t0 = time.perf_counter()
            model(ids)
            prefill.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            model.generate(ids, attention_mask=mask, max_new_tokens=opts.speed_new_tokens,
                           min_new_tokens=opts.speed_new_tokens, do_sample=False, pad_token_id=0)
            total.append(time.perf_counter() - t0)
    p, g = statistics.median(prefill), statistics.median(total)
    return {"prompt_tokens": int(ids.shape[1]), "new_tokens": opts.speed_new_tokens,
            "prefill_seconds": p, "prefill_tokens_per_s": ids.shape[1] / p,
            "decode_seconds": max(g - p, 1e-9), "decode_tokens_per_s": opts.speed_new_tokens / max(g - p, 1e-9)}


def _fidelity(models: list[Loaded], windows: torch.Tensor, progress: Progress | None) -> dict[str, dict]:
    """Perplexity of every model, and KL / top-1 agreement of each against the first (the baseline)."""
    nll = {v.name: [] for v in models}
    kl = {v.name: [] for v in models[1:]}
    agree = {v.name: [] for v in models[1:]}
    for i, w in enumerate(windows):
        ids = w[None]
        base = None
        for v in models:
            logits = _logits(v.model, ids)
            nll[v.name].append(metrics.next_token_nll(logits, ids).reshape(-1).numpy())
            if base is None:
                base = logits
                continue
            kl[v.name].append(metrics.kl_per_token(base[0], logits[0]).numpy())
            agree[v.name].append(metrics.top1_agree(base[0], logits[0]).numpy())
        if progress:
            progress("perplexity and KL", i + 1, len(windows))
    out = {}
    for v in models:
        all_nll = np.concatenate(nll[v.name])
        entry = {"perplexity": metrics.perplexity(all_nll), "scored_tokens": int(all_nll.size)}
        if v.name in kl:
            k = np.concatenate(kl[v.name])
            s = metrics.Summary.of(k)
            entry.update({"kl_mean": s.mean, "kl_median": s.median, "kl_p99": s.p99, "kl_max": s.max,
                          "top1_agreement": float(np.concatenate(agree[v.name]).mean()),
                          "kl_histogram": _histogram(k)})
        out[v.name] = entry
    return out


def _histogram(values: np.ndarray) -> dict:
    """Counts of per-token KL in log10-spaced bins from 1e-6 to 10 nats (plus below/above)."""
    edges = np.logspace(-6, 1, 29)
    counts, _ = np.histogram(np.clip(values, edges[0], edges[-1]), bins=edges)
    return {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts]}


def _layer_sqnr(path: Path) -> list[dict]:
    """Per-tensor SQNR (dB) of a converted checkpoint, from its fp4fmt_report.json."""
    rep = path / "fp4fmt_report.json"
    if not rep.exists():
        return []
    tensors = json.loads(rep.read_text()).get("tensors", {})
    rows = []
    for name, e in sorted(tensors.items()):
        if e.get("action") != "quantized":
            continue
        m = re.search(r"layers\.(\d+)\.", name)
        rows.append({"tensor": name, "layer": int(m.group(1)) if m else None,
                     "kind": name.rsplit(".", 2)[-2] if name.count(".") >= 2 else name,
                     "sqnr_db": e.get("sqnr_db"), "rel_rmse": e.get("rel_rmse")})
    return rows


def _kernel_or_format(v: Loaded, baseline_path: Path, windows: torch.Tensor) -> dict:
    """The variant's fast path against the reference decoder on the same file: the baseline architecture with
    each quantized weight replaced by ``fp4fmt.dequantize`` (numpy) of the variant's file."""
    import transformers

    from ..files import safe_open
    from ..qtensor import dequantize

    ref = transformers.AutoModelForCausalLM.from_pretrained(baseline_path, dtype=torch.bfloat16).eval()
    params = dict(ref.named_parameters())
    replaced = 0
    with torch.no_grad():
        for shard in sorted(v.path.glob("*.safetensors")):
            with safe_open(shard) as f:
                for name in (f.descriptor.tensors if f.descriptor else {}):
                    if name in params:
                        params[name].copy_(torch.from_numpy(dequantize(f.get_tensor(name))).to(params[name].dtype))
                        replaced += 1
    ids = windows[:2]
    fast, slow = _logits(v.model, ids), _logits(ref, ids)
    del ref
    kl = metrics.kl_per_token(slow, fast).numpy()
    from .. import torch as ft

    fast_path = "triton kernels" if any(isinstance(m, ft.FP4Linear) for m in v.model.modules()) and \
        next(v.model.parameters()).is_cuda else "torch decoding (CPU)"
    return {"fast_path": fast_path, "reference": "fp4fmt.dequantize (numpy)", "tensors_compared": replaced,
            "tokens": int(ids.numel()), "max_abs_logit_diff": float((fast - slow).abs().max()),
            "kl_mean": float(kl.mean()), "kl_max": float(kl.max()),
            "top1_agreement": float(metrics.top1_agree(slow, fast).float().mean()),
            "identical": bool(torch.equal(fast, slow))}


def _generate(v: Loaded, tok, items: list[probes.Probe], opts: EvalOptions,
              progress: Progress | None, done0: int, total: int) -> list[dict]:
    """Greedy answers to the probes, batched with left padding (the same batches for every model)."""
    out: list[dict] = []
    dev = next(v.model.parameters()).device
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    eos = tok.eos_token_id
    for b0 in range(0, len(items), opts.batch_size):
        batch = items[b0:b0 + opts.batch_size]
        prompts = [tok.apply_chat_template(probes.prompt_messages(p), add_generation_prompt=True, tokenize=True)
                   for p in batch]
        prompts = [p["input_ids"] if isinstance(p, dict) or hasattr(p, "keys") else p for p in prompts]
        width = max(len(p) for p in prompts)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        with torch.no_grad():
            gen = v.model.generate(ids.to(dev), attention_mask=mask.to(dev), max_new_tokens=opts.max_new_tokens,
                                   do_sample=False, pad_token_id=pad)
        for i, p in enumerate(batch):
            new = gen[i, width:].tolist()
            if eos is not None and eos in new:
                new = new[:new.index(eos)]
            text = tok.decode(new, skip_special_tokens=True)
            out.append({"probe": p.id, "level": p.level, "ids": new, "text": text,
                        "extracted": probes.extract_answer(text), "correct": probes.score(p, text)})
        if progress:
            progress(f"crack hunt: {v.name}", done0 + b0 + len(batch), total)
    return out


def _crack_summary(items: list[probes.Probe], answers: dict[str, list[dict]], baseline: str) -> dict:
    levels = sorted({(p.level, p.level_name) for p in items})
    by_probe = {p.id: p for p in items}
    base = {a["probe"]: a for a in answers[baseline]}
    out = {"levels": [{"level": lv, "name": nm, "probes": sum(p.level == lv for p in items)} for lv, nm in levels],
           "variants": {}}
    for name, ans in answers.items():
        acc = {nm: float(np.mean([a["correct"] for a in ans if a["level"] == lv])) for lv, nm in levels}
        entry = {"accuracy": float(np.mean([a["correct"] for a in ans])), "accuracy_by_level": acc,
                 "answers": [{k: a[k] for k in ("probe", "level", "text", "extracted", "correct")} for a in ans]}
        if name != baseline:
            flips, div = [], []
            for a in ans:
                b = base[a["probe"]]
                d = probes.first_divergence(b["ids"], a["ids"])
                div.append({"probe": a["probe"], "level": a["level"], "first_divergence": d,
                            "baseline_tokens": len(b["ids"]),
                            "fraction": None if d is None else d / max(1, len(b["ids"]))})
                if a["correct"] != b["correct"]:
                    p = by_probe[a["probe"]]
                    flips.append({"probe": p.id, "level": p.level, "question": p.question, "answer": p.answer,
                                  "baseline_extracted": b["extracted"], "variant_extracted": a["extracted"],
                                  "direction": "lost" if b["correct"] else "gained", "first_divergence": d})
            same = [x for x in div if x["first_divergence"] is None]
            fr = [x["fraction"] for x in div if x["fraction"] is not None]
            entry.update({"flipped": flips, "divergence": div, "identical_to_baseline": len(same),
                          "median_divergence_fraction": float(np.median(fr)) if fr else None})
        out["variants"][name] = entry
    return out


# ------------------------------------------------------------------------------------------------------
# the whole evaluation


def evaluate(baseline: str | os.PathLike, variants: list[str | os.PathLike], opts: EvalOptions = EvalOptions(),
             progress: Progress | None = None) -> dict:
    """Run everything on ``baseline`` (a high-precision HF checkpoint) and each of ``variants`` (fp4fmt
    checkpoints, or other HF checkpoints); returns the result dict (schema ``eval.schema.json``)."""
    import transformers

    if opts.threads:
        torch.set_num_threads(opts.threads)
    transformers.utils.logging.disable_progress_bar()
    t_start = time.perf_counter()
    base_path = Path(baseline)
    if _is_fp4fmt(base_path):
        raise FP4FmtError("the baseline must be the high-precision checkpoint, not an fp4fmt one", file=base_path)
    paths = [Path(p) for p in variants]
    if not paths:
        raise FP4FmtError("give at least one variant to compare with the baseline", file=base_path)
    names: list[str] = []
    for p in [base_path, *paths]:
        n = p.name or str(p)
        names.append(n if n not in names else f"{n}#{len(names)}")
    tok = transformers.AutoTokenizer.from_pretrained(base_path)
    loaded = [_load(base_path, names[0], "baseline", opts)]
    for p, n in zip(paths, names[1:]):
        if progress:
            progress("loading", len(loaded), len(names))
        loaded.append(_load(p, n, "fp4fmt" if _is_fp4fmt(p) else "hf", opts))
    windows = _corpus_windows(tok, opts)
    speed = {}
    for i, v in enumerate(loaded):
        speed[v.name] = _speed(v, windows[0][: opts.speed_prompt_tokens], opts)
        if progress:
            progress("speed", i + 1, len(loaded))
    fidelity = _fidelity(loaded, windows, progress)
    kernel = {v.name: _kernel_or_format(v, base_path, windows) for v in loaded if v.kind == "fp4fmt"}
    items = probes.make_probes(seed=opts.seed, per_level=opts.limit)
    answers = {}
    total = len(items) * len(loaded)
    for i, v in enumerate(loaded):
        _set_cache(v.model, True)  # the same decoded values, kept: generation is the long part of the run
        answers[v.name] = _generate(v, tok, items, opts, progress, i * len(items), total)
        _set_cache(v.model, False)
    crack = _crack_summary(items, answers, loaded[0].name)
    result = {
        "fp4fmt_eval_version": EVAL_VERSION,
        "producer": {"name": "fp4fmt", "version": __version__},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "options": asdict(opts),
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "transformers": transformers.__version__, "machine": platform.machine(),
                        "cpu_threads": torch.get_num_threads(), "device": opts.device},
        "baseline": loaded[0].name,
        "variants": [],
        "crack_hunt": {"levels": crack["levels"]},
        "peak_rss_bytes": _peak_rss(),
        "wall_seconds": None,
    }
    for v in loaded:
        entry = {"name": v.name, "path": str(v.path), "kind": v.kind, "scheme": v.scheme, "memory": v.memory,
                 "speed": speed[v.name], "fidelity": fidelity[v.name], "crack_hunt": crack["variants"][v.name],
                 "layer_sqnr": _layer_sqnr(v.path) if v.kind == "fp4fmt" else []}
        if v.name in kernel:
            entry["kernel_vs_reference"] = kernel[v.name]
        result["variants"].append(entry)
    result["wall_seconds"] = time.perf_counter() - t_start
    return _finite(result)


def _finite(obj):
    """JSON has no NaN/Inf: they become null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj
