"""The eval result as files: ``eval.json`` (the result dict), ``report.md`` (tables, plots, a verdict) and
three PNG plots drawn with matplotlib: per-layer SQNR, the per-token KL distribution, accuracy by difficulty."""

from __future__ import annotations

import json
import os
from pathlib import Path

PLOTS = {"layer_sqnr": "layer_sqnr.png", "kl_distribution": "kl_distribution.png",
         "accuracy_by_level": "accuracy_by_level.png"}


def write_report(result: dict, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write eval.json, report.md and the plots into ``out_dir`` (created); returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots = _plots(result, out)
    result = dict(result, plots={k: p.name for k, p in plots.items()})
    paths = {"json": out / "eval.json", "markdown": out / "report.md", **plots}
    _atomic_write(paths["json"], json.dumps(result, indent=2, sort_keys=False, allow_nan=False) + "\n")
    _atomic_write(paths["markdown"], markdown(result))
    return paths


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _fmt(v, spec: str = ".3f", none: str = "n/a") -> str:
    return none if v is None else format(v, spec)


def _pct(v, spec: str = ".1f") -> str:
    return "-" if v is None else f"{100 * v:{spec}}%"


def _mb(n) -> str:
    return "n/a" if n is None else f"{n / 1e6:.1f} MB"


def verdict(result: dict) -> str:
    """One paragraph, from the figures: how far each variant is from the baseline and where it breaks."""
    base = result["variants"][0]
    ppl0 = base["fidelity"]["perplexity"]
    acc0 = base["crack_hunt"]["accuracy"]
    parts = []
    for v in result["variants"][1:]:
        f, c = v["fidelity"], v["crack_hunt"]
        dppl = None if (ppl0 is None or f["perplexity"] is None) else 100 * (f["perplexity"] / ppl0 - 1)
        size = v["memory"]["disk_bytes"] / base["memory"]["disk_bytes"] if base["memory"]["disk_bytes"] else None
        lost = [x for x in c.get("flipped", []) if x["direction"] == "lost"]
        gained = [x for x in c.get("flipped", []) if x["direction"] == "gained"]
        first_lost = min((x["level"] for x in lost), default=None)
        levels = {lv["level"]: lv["name"] for lv in result["crack_hunt"]["levels"]}
        s = (f"**{v['name']}** is {_fmt(size and 100 * size, '.0f')}% of the baseline's size on disk, with perplexity "
             f"{_fmt(dppl, '+.1f')}% against the baseline, mean KL {_fmt(f.get('kl_mean'), '.4f')} nats "
             f"(p99 {_fmt(f.get('kl_p99'), '.3f')}) and top-1 agreement {_fmt(100 * f['top1_agreement'], '.1f')}%; "
             f"crack hunt {100 * c['accuracy']:.0f}% against the baseline's {100 * acc0:.0f}%")
        if lost:
            s += (f", {len(lost)} answer(s) lost (first at level {first_lost}, {levels.get(first_lost, '')})"
                  f" and {len(gained)} gained")
        elif gained:
            s += f", none lost and {len(gained)} gained"
        else:
            s += ", no answer flipped"
        k = v.get("kernel_vs_reference")
        if k:
            s += ("; its fast path gives the reference decoder's logits exactly" if k["identical"] else
                  f"; its fast path differs from the reference decoder by at most {k['max_abs_logit_diff']:.3g} in "
                  f"a logit (KL {k['kl_mean']:.2e}): that part is the kernel, not the format")
        parts.append(s + ".")
    small = result["options"]["limit"] < 25
    caveat = (" With only " + str(result["options"]["limit"]) + " probes per level, one flipped answer moves a "
              "level's accuracy by " + f"{100 / max(1, result['options']['limit']):.0f} points: read the crack hunt as "
              "a map of where answers change, not as a benchmark score.") if small else ""
    return " ".join(parts) + caveat


def markdown(result: dict) -> str:
    """The report as Markdown (plots referenced by file name)."""
    vs = result["variants"]
    lines = [f"# fp4fmt eval: {result['baseline']} and {len(vs) - 1} variant(s)", "",
             f"{result['created']} · fp4fmt {result['producer']['version']} · torch {result['environment']['torch']} · "
             f"{result['environment']['cpu_threads']} CPU thread(s) on {result['environment']['device']} · "
             f"wall {result['wall_seconds']:.0f} s · peak RSS {_mb(result['peak_rss_bytes'])}", "",
             "## Verdict", "", verdict(result), "", "## Summary", "",
             "| model | scheme | on disk | resident weights | prefill tok/s | decode tok/s | perplexity | KL mean | KL p99 | "
             "top-1 agree | crack hunt |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for v in vs:
        f, m, s = v["fidelity"], v["memory"], v["speed"]
        lines.append(f"| {v['name']} | {v['scheme'] or 'bf16'} | {_mb(m['disk_bytes'])} | {_mb(m['resident_weight_bytes'])} | "
                     f"{s['prefill_tokens_per_s']:.0f} | {s['decode_tokens_per_s']:.1f} | {_fmt(f['perplexity'], '.2f')} | "
                     f"{_fmt(f.get('kl_mean'), '.4f', '0 (baseline)')} | {_fmt(f.get('kl_p99'), '.3f', '-')} | "
                     f"{_pct(f.get('top1_agreement'))} | "
                     f"{100 * v['crack_hunt']['accuracy']:.0f}% |")
    levels = result["crack_hunt"]["levels"]
    lines += ["", "## Crack hunt: accuracy by difficulty", "",
              "| level | probes | " + " | ".join(v["name"] for v in vs) + " |",
              "|---|---:|" + "---:|" * len(vs)]
    for lv in levels:
        row = [f"{100 * v['crack_hunt']['accuracy_by_level'][lv['name']]:.0f}%" for v in vs]
        lines.append(f"| {lv['level']}. {lv['name']} | {lv['probes']} | " + " | ".join(row) + " |")
    for v in vs[1:]:
        c = v["crack_hunt"]
        lines += ["", f"### {v['name']}: answers that flipped against the baseline", ""]
        if not c["flipped"]:
            lines.append("None.")
        else:
            lines += ["| probe | level | expected | baseline | variant | | first divergent token |",
                      "|---|---:|---:|---:|---:|---|---:|"]
            for x in c["flipped"]:
                lines.append(f"| {x['probe']} | {x['level']} | {x['answer']} | {x['baseline_extracted']} | "
                             f"{x['variant_extracted']} | {x['direction']} | {x['first_divergence']} |")
        lines.append("")
        text = f"{c['identical_to_baseline']} of {len(c['divergence'])} greedy answers are token-for-token the baseline's"
        if c["median_divergence_fraction"] is not None:
            text += (f"; where they differ, the median first divergence is at "
                     f"{_pct(c['median_divergence_fraction'], '.0f')} of the baseline's answer")
        lines.append(text + ".")
    lines += ["", "## Kernel or format", "",
              "The same packed weights through the fast path and through the reference decoder (`fp4fmt.dequantize`) "
              "in the baseline architecture, on the same tokens:", "",
              "| variant | fast path | max abs logit diff | KL mean | top-1 agree | identical |", "|---|---|---:|---:|---:|---|"]
    for v in vs:
        k = v.get("kernel_vs_reference")
        if k:
            lines.append(f"| {v['name']} | {k['fast_path']} | {k['max_abs_logit_diff']:.3g} | {k['kl_mean']:.3g} | "
                         f"{100 * k['top1_agreement']:.1f}% | {'yes' if k['identical'] else 'no'} |")
    lines += ["", "## Plots", ""]
    for key, title in (("layer_sqnr", "Per-layer SQNR"), ("kl_distribution", "Per-token KL"),
                       ("accuracy_by_level", "Accuracy by difficulty")):
        if key in result.get("plots", {}):
            lines.append(f"![{title}]({result['plots'][key]})")
    lines += ["", "## Per-layer quantization error (SQNR, dB, mean over the layer's tensors)", ""]
    q = [v for v in vs if v["layer_sqnr"]]
    if q:
        layers = sorted({r["layer"] for v in q for r in v["layer_sqnr"] if r["layer"] is not None})
        lines += ["| layer | " + " | ".join(v["name"] for v in q) + " |", "|---:|" + "---:|" * len(q)]
        for lay in layers:
            cells = []
            for v in q:
                vals = [r["sqnr_db"] for r in v["layer_sqnr"] if r["layer"] == lay and r["sqnr_db"] is not None]
                cells.append(f"{sum(vals) / len(vals):.2f}" if vals else "n/a")
            lines.append(f"| {lay} | " + " | ".join(cells) + " |")
    lines += ["", "Options: " + ", ".join(f"{k}={v}" for k, v in result["options"].items()), ""]
    return "\n".join(lines)


def _plots(result: dict, out: Path) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = {}
    vs = result["variants"]
    q = [v for v in vs if v["layer_sqnr"]]
    if q:
        fig, ax = plt.subplots(figsize=(8, 3.6), dpi=110)
        for v in q:
            layers = sorted({r["layer"] for r in v["layer_sqnr"] if r["layer"] is not None})
            means = [float(sum(r["sqnr_db"] for r in v["layer_sqnr"] if r["layer"] == lay) /
                           sum(1 for r in v["layer_sqnr"] if r["layer"] == lay)) for lay in layers]
            low = [min(r["sqnr_db"] for r in v["layer_sqnr"] if r["layer"] == lay) for lay in layers]
            line, = ax.plot(layers, means, marker="o", ms=3, label=f"{v['name']} (mean)")
            ax.plot(layers, low, ls="--", color=line.get_color(), alpha=0.6, label=f"{v['name']} (worst tensor)")
        ax.set_xlabel("decoder layer")
        ax.set_ylabel("SQNR (dB)")
        ax.set_title("Quantization error per layer")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        paths["layer_sqnr"] = out / PLOTS["layer_sqnr"]
        fig.savefig(paths["layer_sqnr"])
        plt.close(fig)
    hist = [v for v in vs[1:] if v["fidelity"].get("kl_histogram")]
    if hist:
        fig, ax = plt.subplots(figsize=(8, 3.6), dpi=110)
        for v in hist:
            h = v["fidelity"]["kl_histogram"]
            edges, counts = h["edges"], h["counts"]
            total = max(1, sum(counts))
            ax.stairs([c / total for c in counts], edges, label=v["name"])
        ax.set_xscale("log")
        ax.set_xlabel("KL(baseline || variant) per token (nats)")
        ax.set_ylabel("share of tokens")
        ax.set_title("Per-token KL divergence from the baseline")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        paths["kl_distribution"] = out / PLOTS["kl_distribution"]
        fig.savefig(paths["kl_distribution"])
        plt.close(fig)
    levels = result["crack_hunt"]["levels"]
    if levels:
        fig, ax = plt.subplots(figsize=(8, 3.6), dpi=110)
        width = 0.8 / len(vs)
        for i, v in enumerate(vs):
            xs = [j + i * width for j in range(len(levels))]
            ax.bar(xs, [100 * v["crack_hunt"]["accuracy_by_level"][lv["name"]] for lv in levels], width, label=v["name"])
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(levels))])
        ax.set_xticklabels([f"{lv['level']}. {lv['name']}" for lv in levels], fontsize=8)
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(0, 100)
        ax.set_title("Crack hunt: accuracy by difficulty")
        ax.legend(fontsize=8)
        fig.tight_layout()
        paths["accuracy_by_level"] = out / PLOTS["accuracy_by_level"]
        fig.savefig(paths["accuracy_by_level"])
        plt.close(fig)
    return paths
