"""The ``fp4fmt`` command line. Each command is one library call plus printing (``--json`` for machines)."""

from __future__ import annotations

import json
import os
import sys

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


def _fail(e: Exception) -> None:
    click.echo(f"error: {e}", err=True)
    sys.exit(2)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="fp4fmt")
def main() -> None:
    """fp4fmt: microscaled FP4 (NVFP4, MXFP4) checkpoints: inspect, verify, convert."""


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


@main.command()
@click.argument("src", type=click.Path(exists=True, dir_okay=False))
@click.argument("dst", type=click.Path(dir_okay=False))
@click.option("--scheme", type=click.Choice(["nvfp4", "mxfp4"]), default="nvfp4", show_default=True)
@click.option("--scale-rule", type=click.Choice(["floor", "rceil", "even"]), default=None,
              help="MXFP4 shared-exponent rule (default floor, per OCP MX v1.0).")
@click.option("--ignore", multiple=True, help="Extra regex of tensor names to keep unquantized (repeatable).")
@click.option("--overwrite", is_flag=True, help="Replace DST if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the per-tensor report as JSON.")
def convert(src: str, dst: str, scheme: str, scale_rule: str | None, ignore: tuple[str, ...], overwrite: bool,
            as_json: bool) -> None:
    """Quantize the linear weights of safetensors file SRC into fp4fmt file DST."""
    from .converters import DEFAULT_IGNORE, convert_file

    if os.path.exists(dst) and not overwrite:
        _fail(FP4FmtError("already exists; pass --overwrite to replace it", file=dst))
    try:
        report = convert_file(src, dst, scheme, ignore=DEFAULT_IGNORE + ignore, scale_rule=scale_rule,
                              progress=_progress("converting"))
    except (FP4FmtError, ValueError) as e:
        _fail(e)
    if as_json:
        click.echo(json.dumps({"scheme": report.scheme, "quantized": report.quantized, "kept": report.kept}, indent=2))
        return
    for name, r in report.quantized.items():
        click.echo(f"  quantized  {name:<48} SQNR {r['sqnr_db']:6.2f} dB")
    for name, why in report.kept.items():
        click.echo(f"  kept       {name:<48} {why}")
    click.echo(f"wrote {dst}: {len(report.quantized)} tensors quantized to {scheme}, {len(report.kept)} kept")


if __name__ == "__main__":  # pragma: no cover
    main()
