"""The ``fp4fmt`` command line. Each command is one library call plus printing (``--json`` for machines)."""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager

import click

from . import __version__
from .errors import FP4FmtError
from .inspection import inspect_path, verify_path


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def _progress(label: str):
    """A progress-bar wrapper for an iterable, drawn on stderr (click hides it when not a terminal)."""

    def wrap(items):
        items = list(items)
        with click.progressbar(items, label=label, file=sys.stderr, item_show_func=lambda x: str(x) if x else "") as bar:
            yield from bar

    return wrap


@contextmanager
def _stage_bar(label: str):
    """A progress bar on stderr fed by the library's ``progress(stage, done, total)`` callback (yielded); a new
    stage restarts it. click hides it when stderr is not a terminal."""
    with click.progressbar(length=1, label=label, file=sys.stderr, show_eta=True, show_pos=True) as bar:
        def progress(stage: str, done: int, total: int) -> None:
            if bar.label != stage:
                bar.label, bar.pos = stage, 0
            bar.length = max(total, 1)
            bar.update(done - bar.pos)

        yield progress


def _fail(e: Exception) -> None:
    click.echo(f"error: {e}", err=True)
    sys.exit(2)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="fp4fmt")
def main() -> None:
    """fp4fmt: microscaled FP4 (NVFP4, MXFP4) checkpoints: inspect, verify, convert, export, eval, push."""


@main.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def inspect(paths: tuple[str, ...], as_json: bool) -> None:
    """List the tensors of each FILE_OR_DIR: scheme, shape, bits per weight, sizes, compression ratio."""
    try:
        report = inspect_path(*paths)
    except FP4FmtError as e:
        _fail(e)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    for fi in report["files"]:
        version = fi["format_version"] or "none (plain safetensors)"
        click.echo(f"{fi['path']}  fp4fmt format {version}")
        width = max((len(t["name"]) for t in fi["tensors"]), default=4)
        click.echo(f"  {'tensor':<{width}}  {'kind':<6} {'dtype':<8} {'shape':<20} {'bits/w':>7} {'size':>11}")
        for t in fi["tensors"]:
            shape = "x".join(str(d) for d in t["shape"]) or "scalar"
            click.echo(
                f"  {t['name']:<{width}}  {t['kind']:<6} {t['dtype']:<8} {shape:<20} "
                f"{t['bits_per_weight']:>7.3f} {_human(t['stored_bytes']):>11}"
            )
    for c in report["checkpoints"]:
        qc = c["quantization_config"]
        idx = c["index"]
        click.echo(f"checkpoint {c['path']}: "
                   + (f"{len(idx['shards'])} shard(s) in the index" if idx else "no index (single file)")
                   + (f"; quantization_config {qc.get('quant_method')} {qc.get('scheme', '')}" if qc else ""))
    s = report["summary"]
    click.echo("")
    for kind, k in sorted(s["by_kind"].items()):
        click.echo(
            f"{kind:<6} {k['tensors']:>6} tensors {k['params']:>14,} params  "
            f"{k['bits_per_weight']:.3f} bits/weight  {_human(k['stored_bytes'])}"
        )
    ratio = s["compression_ratio"]
    click.echo(
        f"total  {_human(s['stored_bytes'])} on disk vs {_human(s['original_bytes'])} in the original dtypes "
        f"(compression {ratio:.2f}x)"
    )


@main.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def verify(paths: tuple[str, ...], as_json: bool) -> None:
    """Check each FILE_OR_DIR against the spec: structure, descriptor, checksums, scales, padding.

    Exit status 0 when every file passes, 1 when any fails.
    """
    try:
        results = verify_path(*paths, progress=None if as_json else _progress("verifying"))
    except FP4FmtError as e:
        _fail(e)
    if as_json:
        click.echo(json.dumps({"ok": all(r.ok for r in results), "files": [r.__dict__ for r in results]}, indent=2))
    else:
        for r in results:
            click.echo(f"{'PASS' if r.ok else 'FAIL'}  {r.path}" + (f"\n      {r.error}" if r.error else ""))
    sys.exit(0 if all(r.ok for r in results) else 1)


def _parse_size(text: str) -> int:
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    t = text.strip().upper()
    num = t.rstrip("KMGTIB")
    unit = t[len(num):]
    try:
        value = float(num) * units[unit]
    except (ValueError, KeyError):
        raise click.BadParameter(f"not a size: {text!r} (e.g. 5GB, 500MB, 2GiB)") from None
    if value < 1:
        raise click.BadParameter("the shard size must be positive")
    return int(value)


@main.command()
@click.argument("src", type=click.Path(exists=True))
@click.argument("dst", type=click.Path())
@click.option("--scheme", type=click.Choice(["nvfp4", "mxfp4"]), default="nvfp4", show_default=True)
@click.option("--scale-rule", type=click.Choice(["floor", "rceil", "even"]), default=None,
              help="MXFP4 shared-exponent rule (default floor, per OCP MX v1.0).")
@click.option("--ignore", multiple=True, metavar="REGEX",
              help="Keep tensors whose name matches REGEX in high precision (repeatable; adds to the defaults).")
@click.option("--overrides", "overrides_file", type=click.Path(exists=True, dir_okay=False),
              help='Per-layer JSON rules {"rules": [{"pattern": REGEX, "action": "keep"|"nvfp4"|"mxfp4"}]}.')
@click.option("--workers", type=click.IntRange(1, 256), default=1, show_default=True,
              help="Parallel worker processes (one shard each).")
@click.option("--max-shard-size", default="5GB", show_default=True, help="Largest output shard (e.g. 5GB, 500MB).")
@click.option("--no-fused-scales", is_flag=True, help="Do not share one NVFP4 tensor scale across q/k/v and gate/up.")
@click.option("--tensor-scale", type=click.Choice(["amax", "compressed-tensors"]), default="amax", show_default=True,
              help="NVFP4 tensor scale: amax/2688 (spec §5.1), or moved up a few ulps to a value compressed-tensors "
                   "represents exactly, so that `export --to compressed-tensors` decompresses bit-identically.")
@click.option("--overwrite", is_flag=True, help="Replace DST if it exists and is not empty.")
@click.option("--from", "from_format", type=click.Choice(["auto", "none", "compressed-tensors", "modelopt", "gpt-oss"]),
              default="auto", show_default=True,
              help="SRC is an FP4 checkpoint of this format: import it without requantizing (auto: detect from "
                   "config.json; none: always quantize).")
@click.option("--json", "as_json", is_flag=True, help="Print the conversion report as JSON.")
@click.pass_context
def convert(ctx: click.Context, src: str, dst: str, scheme: str, scale_rule: str | None, ignore: tuple[str, ...],
            overrides_file: str | None, workers: int, max_shard_size: str, no_fused_scales: bool, tensor_scale: str,
            overwrite: bool, from_format: str, as_json: bool) -> None:
    """Quantize the linear layers of checkpoint SRC (a Hugging Face directory or a .safetensors file).

    DST is a directory (an fp4fmt checkpoint: shards, index, config.json, tokenizer, fp4fmt_report.json).
    When SRC is a file and DST ends in .safetensors, DST is a single fp4fmt file instead. Running the
    same command again after an interruption resumes it.
    """
    from .converters import DEFAULT_IGNORE, Options, convert_checkpoint, convert_file, load_overrides

    if os.path.isdir(src) and from_format != "none":
        from .converters import interop

        try:
            fmt = interop.detect_format(src) if from_format == "auto" else from_format
            if fmt is not None:
                if ctx.get_parameter_source("scheme") == click.core.ParameterSource.COMMANDLINE:
                    click.echo(f"note: SRC is a {fmt} checkpoint: it is imported as it is, --scheme is not used",
                               err=True)
                with _stage_bar("importing") as progress:
                    report = interop.import_checkpoint(src, dst, fmt, overwrite=overwrite, progress=progress)
        except FP4FmtError as e:
            _fail(e)
        if fmt is not None:
            _echo_report(report, as_json, f"imported {src} ({fmt}) into {dst} without requantizing")
            return

    if os.path.isfile(src) and dst.endswith(".safetensors"):
        if os.path.exists(dst) and not overwrite:
            _fail(FP4FmtError("already exists; pass --overwrite to replace it", file=dst))
        try:
            report = convert_file(src, dst, scheme, ignore=DEFAULT_IGNORE + ignore, scale_rule=scale_rule)
        except (FP4FmtError, ValueError) as e:
            _fail(e)
        if as_json:
            click.echo(json.dumps({"scheme": report.scheme, "quantized": report.quantized, "kept": report.kept}, indent=2))
            return
        for name, r in report.quantized.items():
            click.echo(f"  quantized  {name:<48} SQNR {r['sqnr_db'] if r['sqnr_db'] is not None else float('inf'):6.2f} dB")
        for name, why in report.kept.items():
            click.echo(f"  kept       {name:<48} {why}")
        click.echo(f"wrote {dst}: {len(report.quantized)} tensors quantized to {scheme}, {len(report.kept)} kept")
        return

    try:
        opts = Options(
            scheme=scheme,
            scale_rule=scale_rule,
            ignore=DEFAULT_IGNORE + ignore,
            overrides=tuple(load_overrides(overrides_file)) if overrides_file else (),
            max_shard_bytes=_parse_size(max_shard_size),
            share_fused_scales=not no_fused_scales,
            tensor_scale=tensor_scale,
        )
        with _stage_bar("converting") as progress:
            result = convert_checkpoint(src, dst, opts, workers=workers, overwrite=overwrite, progress=progress)
    except FP4FmtError as e:
        _fail(e)
    rep = result.report
    if as_json:
        click.echo(json.dumps(rep, indent=2))
    else:
        s = rep["summary"]
        for name, e in rep["tensors"].items():
            if e["action"] == "kept" and len(e["shape"]) >= 2:
                click.echo(f"  kept     {name:<56} {e['reason']}")
        for name, why in rep["dropped"].items():
            click.echo(f"  dropped  {name:<56} {why}")
        ratio = s["compression_ratio"]
        click.echo(
            f"wrote {dst}: {s['quantized_tensors']} tensors ({s['quantized_params']:,} params) quantized to {scheme}, "
            f"{s['kept_tensors']} kept, {s['dropped_tensors']} dropped; {len(rep['output']['shards'])} shard(s), "
            f"{ratio:.2f}x smaller; lowest SQNR {s['min_sqnr_db'] or float('nan'):.2f} dB"
            + (f"; {result.shards_reused} shard(s) reused from an interrupted run" if result.shards_reused else "")
        )
    for w in result.warnings:
        click.secho(f"WARNING: {w}", fg="red", bold=True, err=True)


def _echo_report(report, as_json: bool, line: str) -> None:
    """Print an interop report object (a dataclass or dict) as JSON, or one summary line."""
    import dataclasses

    if as_json:
        obj = report.as_dict() if hasattr(report, "as_dict") else (
            dataclasses.asdict(report) if dataclasses.is_dataclass(report) else report)
        click.echo(json.dumps(obj, indent=2, default=str))
    else:
        click.echo(line)
        for note in getattr(report, "notes", ()) or ():
            click.echo(f"  note: {note}")
    for w in getattr(report, "warnings", ()) or ():
        click.secho(f"WARNING: {w}", fg="red", bold=True, err=True)


@main.command()
@click.argument("src", type=click.Path(exists=True, file_okay=False))
@click.argument("dst", type=click.Path())
@click.option("--to", "to", required=True,
              type=click.Choice(["compressed-tensors", "modelopt", "gpt-oss", "gguf", "onnx"]),
              help="Target format (spec §8).")
@click.option("--overwrite", is_flag=True, help="Replace DST if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the export report as JSON.")
def export(src: str, dst: str, to: str, overwrite: bool, as_json: bool) -> None:
    """Write the fp4fmt checkpoint SRC in another FP4 format that runtimes load: compressed-tensors (vLLM,
    SGLang, transformers), modelopt (TensorRT-LLM, vLLM), gpt-oss MXFP4, GGUF (llama.cpp) or ONNX. Codes and
    scales move without requantizing; where a convention differs the conversion is exact in value."""
    from .converters import interop

    try:
        with _stage_bar("exporting") as progress:
            report = interop.export_checkpoint(src, dst, to, overwrite=overwrite, progress=progress)
    except FP4FmtError as e:
        _fail(e)
    _echo_report(report, as_json, f"wrote {dst} ({to})")


@main.command(name="eval")
@click.argument("baseline", type=click.Path(exists=True, file_okay=False))
@click.argument("variants", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--out", "out_dir", default="fp4fmt-eval", show_default=True, type=click.Path(file_okay=False),
              help="Folder for eval.json, report.md and the plots.")
@click.option("--limit", type=click.IntRange(1, 1000), default=10, show_default=True,
              help="Crack-hunt probes per difficulty level.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the generated probes and corpus windows.")
@click.option("--windows", type=click.IntRange(1, 10000), default=16, show_default=True,
              help="Corpus windows for perplexity and KL.")
@click.option("--window-tokens", type=click.IntRange(16, 1 << 20), default=256, show_default=True)
@click.option("--max-new-tokens", type=click.IntRange(1, 4096), default=128, show_default=True,
              help="Longest crack-hunt answer.")
@click.option("--threads", type=click.IntRange(1, 1024), default=None, help="torch CPU threads.")
@click.option("--device", default="cpu", show_default=True, help="torch device (cpu, cuda).")
@click.option("--json", "as_json", is_flag=True, help="Print eval.json to stdout as well.")
def eval_command(baseline: str, variants: tuple[str, ...], out_dir: str, limit: int, seed: int, windows: int,
                 window_tokens: int, max_new_tokens: int, threads: int | None, device: str, as_json: bool) -> None:
    """Compare BASELINE (a BF16/FP16/FP32 checkpoint) with each VARIANT (fp4fmt checkpoints) on the same inputs:
    memory, speed, perplexity, KL, the crack hunt, and the fast path against the reference decoder."""
    from .eval.report import write_report
    from .eval.runner import EvalOptions, evaluate

    opts = EvalOptions(limit=limit, seed=seed, ppl_windows=windows, window_tokens=window_tokens,
                       max_new_tokens=max_new_tokens, threads=threads, device=device)
    try:
        with _stage_bar("loading") as progress:
            result = evaluate(baseline, list(variants), opts, progress)
        paths = write_report(result, out_dir)
    except FP4FmtError as e:
        _fail(e)
    if as_json:
        click.echo(paths["json"].read_text())
        return
    from .eval.report import verdict

    for v in result["variants"]:
        f, sp = v["fidelity"], v["speed"]
        kl = f"KL {f['kl_mean']:.4f}" if f.get("kl_mean") is not None else "baseline"
        click.echo(f"  {v['name']:<32} ppl {f['perplexity'] or float('nan'):8.2f}  {kl:<12} "
                   f"decode {sp['decode_tokens_per_s']:6.1f} tok/s  crack hunt {100 * v['crack_hunt']['accuracy']:3.0f}%")
    click.echo("")
    click.echo(verdict(result))
    click.echo(f"\nwrote {paths['markdown']} and {paths['json']}")


@main.command()
@click.argument("path", type=click.Path(exists=True, file_okay=False))
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the repository private (when it does not exist yet).")
@click.option("--revision", default=None, help="Branch to push to (created from main if missing).")
@click.option("--dry-run", is_flag=True, help="Check the checkpoint and list what would be uploaded; no network.")
@click.option("--eval", "eval_json", type=click.Path(exists=True, dir_okay=False), default=None,
              help="An eval.json from `fp4fmt eval`: its table goes into the card, it and its plots under eval/.")
@click.option("--base-model", default=None, help="Hub id of the model this checkpoint was converted from.")
@click.option("--card", type=click.Choice(["auto", "generate", "keep"]), default="auto", show_default=True,
              help="Model card: generate one unless DIR has an fp4fmt card (auto), always, or keep DIR's README.md.")
@click.option("--message", "commit_message", default=None, help="Commit message.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def push(path: str, repo_id: str, private: bool, revision: str | None, dry_run: bool, eval_json: str | None,
         base_model: str | None, card: str, commit_message: str | None, as_json: bool) -> None:
    """Upload the fp4fmt checkpoint PATH to the Hugging Face Hub repository REPO_ID, with a model card.

    The checkpoint must pass `fp4fmt verify`. The token comes from huggingface-hub's usual sources (HF_TOKEN,
    `hf auth login`) and is never printed.
    """
    from .hub import push as run

    try:
        with _stage_bar("verifying") as progress:
            result = run(path, repo_id, private=private, revision=revision, dry_run=dry_run, eval_json=eval_json,
                         commit_message=commit_message, base_model=base_model, card=card, progress=progress)
    except FP4FmtError as e:
        _fail(e)
    if as_json:
        click.echo(json.dumps({"repo_id": result.repo_id, "revision": result.revision, "url": result.url,
                               "commit": result.commit, "files": [list(f) for f in result.files]}, indent=2))
        return
    for rel, size in result.files:
        click.echo(f"  {_human(size):>11}  {rel}")
    total = sum(size for _, size in result.files)
    if dry_run:
        click.echo(f"dry run: would upload {len(result.files)} files ({_human(total)}) to {result.repo_id}"
                   + (f" (branch {result.revision})" if result.revision else ""))
    else:
        click.echo(f"pushed {len(result.files)} files ({_human(total)}) to {result.url}")


if __name__ == "__main__":  # pragma: no cover
    main()
