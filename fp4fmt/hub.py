"""``fp4fmt push``: upload a converted checkpoint directory to the Hugging Face Hub, with a model card.

    >>> from fp4fmt.hub import push
    >>> r = push("out/SmolLM2-nvfp4", "me/SmolLM2-135M-NVFP4", base_model="HuggingFaceTB/SmolLM2-135M-Instruct")
    >>> print(r.url)

What is pushed: every file under the directory (hidden files and folders, whose names start with ``.``,
excepted) in one commit, plus ``README.md``, plus, with ``eval_json``, that JSON and the plots it names under
``eval/``. A directory that is not a finished, verifying fp4fmt checkpoint is refused before any network call.
Files are uploaded one at a time (so that progress can be reported), then committed together.

The model card (``card``):

* ``"auto"`` (default): a ``README.md`` in the directory is kept, unchanged, when it mentions fp4fmt in its
  YAML front matter (a card written for this checkpoint, e.g. an edited generated one). Any other
  ``README.md`` is taken for the source model's card, which ``fp4fmt convert`` copies along with the
  tokenizer: a card is generated instead (taking the source card's ``license``) and the old one is not
  uploaded.
* ``"generate"``: always generate (the directory is never modified; the card is uploaded from memory).
* ``"keep"``: upload the directory's ``README.md`` unchanged (an error if there is none).

Only a generated card holds the eval results table; the eval files are uploaded whichever card is used.

The card's metadata says ``library_name: fp4fmt``, not ``transformers``: the Hub derives the "Use this model"
snippet from it, and ``transformers`` alone cannot load an fp4fmt checkpoint (its ``quant_method`` is
unknown there); the card shows the loading code instead.

The token comes from ``token``, else ``HF_TOKEN``, else the token stored by ``hf auth login``. It is
only handed to ``huggingface_hub``: it is never printed, never part of an exception message (errors from
the Hub are re-raised as :class:`FP4FmtError` with any occurrence of it blanked) and not in
:class:`PushResult`. ``huggingface_hub`` (``pip install 'fp4fmt[hub]'``) is imported only for a real push.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from . import __version__
from .converters.checkpoint import REPORT_NAME, WORK_DIR
from .converters.source import PICKLE_PATTERNS
from .errors import FP4FmtError
from .inspection import safetensors_files, verify_path

TMP_SUFFIX = ".fp4fmt-tmp"  # a file being written by fp4fmt convert (".NAME.fp4fmt-tmp")
CARD_MODES = ("auto", "generate", "keep")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".svg", ".webp")
EVAL_DIR = "eval"

Progress = Callable[[str, int, int], None]
"""``progress(stage, done, total)``: stage "verifying" counts safetensors files, "uploading" counts bytes
(advanced as each file's upload ends), "committing" goes 0/1 then 1/1."""


@dataclass(frozen=True)
class PushResult:
    """What was (or, for a dry run, would be) pushed. ``files`` holds (path in the repo, size in bytes),
    sorted by path, ``README.md`` and ``eval/`` files included; ``url`` and ``commit`` are None for a dry run."""

    repo_id: str
    revision: str
    files: tuple[tuple[str, int], ...]
    url: str | None
    card: str
    commit: str | None = None


# ----------------------------------------------------------------------------------------------------------
# what may be pushed


_REPO_ID = re.compile(r"(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}")


def check_repo_id(repo_id: str) -> None:
    """Raise FP4FmtError unless ``repo_id`` is ``name`` or ``namespace/name`` as the Hub spells them."""
    if (not isinstance(repo_id, str) or not _REPO_ID.fullmatch(repo_id) or ".." in repo_id or "--" in repo_id
            or repo_id.endswith((".", "-", ".git"))):
        raise FP4FmtError(f"{repo_id!r} is not a valid Hub repo id (NAMESPACE/NAME: letters, digits, '.', '_', '-')")


def _read_json(path: Path, what: str) -> dict:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise FP4FmtError(f"cannot read {what}: {e}", file=path) from None
    if not isinstance(obj, dict):
        raise FP4FmtError(f"{what} must hold a JSON object", file=path)
    return obj


def check_checkpoint(path: str | os.PathLike, progress: Progress | None = None) -> dict:
    """The ``config.json`` of a directory fit to push, else FP4FmtError naming the directory and why: not a
    directory, an unfinished conversion (``.fp4fmt-convert/`` or ``.*.fp4fmt-tmp`` left over), no
    fp4fmt ``quantization_config``, pickle weight files, or a failed ``fp4fmt verify``."""
    d = Path(path)
    if not d.is_dir():
        raise FP4FmtError("not a directory: push takes a checkpoint directory written by fp4fmt convert", file=d)
    leftovers = sorted(p.relative_to(d).as_posix() for p in d.rglob(f".*{TMP_SUFFIX}"))
    if (d / WORK_DIR).exists() or leftovers:
        found = ([WORK_DIR + "/"] if (d / WORK_DIR).exists() else []) + leftovers
        raise FP4FmtError(f"holds an unfinished conversion ({', '.join(found[:5])}): run the same fp4fmt convert "
                          "again to finish it before pushing", file=d)
    if not (d / "config.json").is_file():
        raise FP4FmtError("no config.json: not a converted Hugging Face checkpoint directory", file=d)
    config = _read_json(d / "config.json", "config.json")
    qc = config.get("quantization_config")
    if not isinstance(qc, dict) or qc.get("quant_method") != "fp4fmt":
        method = qc.get("quant_method") if isinstance(qc, dict) else None
        raise FP4FmtError("config.json has no quantization_config with quant_method 'fp4fmt' "
                          f"(found {method!r}): not an fp4fmt checkpoint", file=d)
    pickles = sorted({p.relative_to(d).as_posix() for pat in PICKLE_PATTERNS for p in d.rglob(pat)})
    if pickles:
        raise FP4FmtError(f"holds pickle-based weight files {pickles[:3]} that are no part of an fp4fmt "
                          "checkpoint; move them out before pushing", file=d)
    n = len(safetensors_files(d))

    def counted(files: Iterator[Path]) -> Iterator[Path]:
        if progress:
            progress("verifying", 0, n)
        for i, f in enumerate(files):
            yield f
            if progress:
                progress("verifying", i + 1, n)

    bad = [r for r in verify_path(d, progress=counted) if not r.ok]
    if bad:
        why = "; ".join(str(r.error) for r in bad[:3]) + (f"; and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise FP4FmtError(f"fails verification (fp4fmt verify): {why}", file=d)
    return config


def _checkpoint_files(d: Path) -> list[tuple[str, Path]]:
    """(path in the repo, local file) of every file under ``d``, hidden names excepted, sorted."""
    out = []
    for root, dirs, files in os.walk(d):
        dirs[:] = sorted(x for x in dirs if not x.startswith("."))
        for f in sorted(files):
            if not f.startswith("."):
                p = Path(root) / f
                out.append((p.relative_to(d).as_posix(), p))
    return sorted(out)


# ----------------------------------------------------------------------------------------------------------
# evaluation results


def load_eval(eval_json: str | os.PathLike) -> tuple[dict, list[tuple[str, Path]]]:
    """The eval JSON and its files to upload: (``eval/<its name>``, path), then each plot (``eval/<path
    relative to the JSON>``, path). A plot must be an image inside the JSON's folder that exists."""
    p = Path(eval_json)
    obj = _read_json(p, "eval JSON")
    files = [(f"{EVAL_DIR}/{p.name}", p)]
    plots = obj.get("plots")
    for name, rel in (plots.items() if isinstance(plots, dict) else []):
        if not isinstance(rel, str) or not rel:
            continue
        rp = Path(rel)
        if rp.is_absolute() or ".." in rp.parts:
            raise FP4FmtError(f"plot {name!r}: {rel!r} must be a path inside the eval JSON's folder", file=p)
        if rp.suffix.lower() not in IMAGE_SUFFIXES:
            raise FP4FmtError(f"plot {name!r}: {rel!r} is not an image ({', '.join(IMAGE_SUFFIXES)})", file=p)
        if not (p.parent / rp).is_file():
            raise FP4FmtError(f"plot {name!r}: {p.parent / rp} does not exist", file=p)
        files.append((f"{EVAL_DIR}/{rp.as_posix()}", p.parent / rp))
    return obj, files


_EVAL_COLUMNS = (  # key, header, format; the key is read from the eval.json section that holds it (schema v1)
    ("perplexity", "Perplexity", "{:.3f}"),
    ("kl_mean", "KL mean", "{:.4g}"),
    ("kl_p99", "KL p99", "{:.4g}"),
    ("top1_agreement", "Top-1 agreement", "{:.4f}"),
    ("decode_tokens_per_s", "Decode tok/s", "{:.1f}"),
    ("prefill_tokens_per_s", "Prefill tok/s", "{:.1f}"),
)
_EVAL_SECTIONS = ("fidelity", "speed")  # where fp4fmt eval (eval.schema.json) nests the columns above


def _metric(variant: dict, key: str):
    """A variant's figure: at the top level, or inside its ``fidelity`` / ``speed`` section."""
    if key in variant:
        return variant[key]
    for section in _EVAL_SECTIONS:
        sub = variant.get(section)
        if isinstance(sub, dict) and key in sub:
            return sub[key]
    return None


def _cell(v, fmt: str = "{:.4g}") -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        return fmt.format(v) if math.isfinite(v) else str(v)
    if isinstance(v, int):
        return str(v)
    return str(v).replace("|", "\\|").replace("\n", " ")


def _levels(variant: dict) -> dict:
    ch = variant.get("crack_hunt")
    acc = ch.get("accuracy_by_level") if isinstance(ch, dict) else None
    return acc if isinstance(acc, dict) else {}


def eval_section(obj: dict) -> list[str]:
    """Markdown lines: a table with one row per variant and a column for each metric some variant has
    (crack-hunt accuracy: one column per level), then an image link for each plot."""
    variants = [v for v in obj.get("variants") or [] if isinstance(v, dict)]
    plots = obj.get("plots") if isinstance(obj.get("plots"), dict) else {}
    plot_links = [(str(n), f"{EVAL_DIR}/{Path(r).as_posix()}") for n, r in plots.items() if isinstance(r, str) and r]
    if not variants and not plot_links:
        return []
    lines = ["## Evaluation", ""]
    if variants:
        cols = [c for c in _EVAL_COLUMNS if any(_metric(v, c[0]) is not None for v in variants)]
        levels: list[str] = []
        for v in variants:
            levels += [str(k) for k in _levels(v) if str(k) not in levels]
        header = ["Variant"] + [h for _, h, _ in cols] + [f"Crack hunt: {lv}" for lv in levels]
        lines += ["| " + " | ".join(_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
        for i, v in enumerate(variants):
            acc = {str(k): a for k, a in _levels(v).items()}
            row = [_cell(v.get("name", f"variant {i + 1}"))] + [_cell(_metric(v, k), f) for k, _, f in cols]
            row += [_cell(acc.get(lv), "{:.4f}") for lv in levels]
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    for name, link in plot_links:
        lines += [f"![{_cell(name)}]({link})", ""]
    return lines


# ----------------------------------------------------------------------------------------------------------
# the model card


def _front_matter(text: str) -> str | None:
    m = re.match(r"---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(\r?\n|$)", text, re.S)
    return m.group(1) if m else None


def _scalar(front: str, key: str) -> str | None:
    """A top-level scalar ``key: value`` of a YAML front matter (quotes removed), or None."""
    m = re.search(rf"^{re.escape(key)}:[ \t]*(.+?)[ \t]*$", front, re.M)
    if not m:
        return None
    v = m.group(1)
    if len(v) >= 2 and v[0] == v[-1] and v[0] in "'\"":
        v = v[1:-1]
    return v or None


def _is_own_card(text: str) -> bool:
    """A README written for an fp4fmt checkpoint: its YAML front matter mentions fp4fmt."""
    front = _front_matter(text)
    return front is not None and re.search(r"\bfp4fmt\b", front) is not None


def _yaml_str(s: str) -> str:
    """A YAML double-quoted scalar in ASCII: printable ASCII as is, everything else as a \\u or \\U escape."""
    out = []
    for c in s:
        o = ord(c)
        out.append("\\" + c if c in '"\\' else c if 0x20 <= o < 0x7F else f"\\u{o:04x}" if o <= 0xFFFF
                   else f"\\U{o:08x}")
    return '"' + "".join(out) + '"'


def _yaml(meta: dict) -> str:
    """YAML for a flat dict of strings and lists of strings."""
    lines = []
    for k, v in meta.items():
        if isinstance(v, list):
            lines.append(f"{k}:")
            lines += [f"- {_yaml_str(str(x))}" for x in v]
        else:
            lines.append(f"{k}: {_yaml_str(str(v))}")
    return "\n".join(lines)


def _is_causal_lm(config: dict) -> bool:
    archs = config.get("architectures") or []
    return any(isinstance(a, str) and a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)


def _listing(names: list[str], limit: int = 12) -> str:
    shown = ", ".join(f"`{n}`" for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "") if names else "none"


def model_card(
    path: str | os.PathLike,
    eval_json: str | os.PathLike | None = None,
    *,
    base_model: str | None = None,
    repo_id: str | None = None,
    revision: str | None = None,
) -> str:
    """The README.md text for a converted checkpoint directory: YAML metadata (base model, library, license,
    pipeline tag, tags), the quantization settings and figures of ``config.json`` and ``fp4fmt_report.json``,
    how to load it, and, with ``eval_json``, the results table and plot links. Reads only; no network."""
    d = Path(path)
    config = _read_json(d / "config.json", "config.json") if (d / "config.json").is_file() else {}
    qc = config.get("quantization_config") if isinstance(config.get("quantization_config"), dict) else {}
    report = _read_json(d / REPORT_NAME, REPORT_NAME) if (d / REPORT_NAME).is_file() else {}
    source = report.get("source") if isinstance(report.get("source"), dict) else {}
    base_model = base_model or (source.get("base_model") if isinstance(source.get("base_model"), str) else None)
    old = (d / "README.md").read_text(encoding="utf-8", errors="replace") if (d / "README.md").is_file() else ""
    old_front = _front_matter(old) or ""
    scheme = str(qc.get("scheme", "")).lower()

    meta: dict = {}
    if base_model:
        meta["base_model"] = base_model
        meta["base_model_relation"] = "quantized"
    meta["library_name"] = "fp4fmt"
    for key in ("license", "license_name", "license_link"):
        v = _scalar(old_front, key)
        if v:
            meta[key] = v
    if _is_causal_lm(config):
        meta["pipeline_tag"] = "text-generation"
    meta["tags"] = ["fp4fmt", "fp4", *([scheme] if scheme else []), "quantized", "4-bit"]

    title = (repo_id.split("/")[-1] if repo_id else d.resolve().name) or "fp4fmt checkpoint"
    what = f"[{base_model}](https://huggingface.co/{base_model})" if base_model else "a model"
    lines = ["---", _yaml(meta), "---", "", f"# {title}", "",
             f"This is {what} with its linear-layer weights quantized to **{scheme.upper() or 'FP4'}** (4-bit "
             "microscaled floating point) by fp4fmt, stored in fp4fmt "
             "safetensors files (every tensor checksummed; `fp4fmt verify` checks them).", "",
             "## Quantization", "", "| | |", "|---|---|"]
    summary = report.get("summary") if isinstance(report.get("summary"), dict) else {}
    rows: list[tuple[str, str]] = []
    if scheme:
        rows.append(("Scheme", f"{scheme.upper()}"))
    for key, label in (("block_size", "Block size"), ("scale_rule", "Scale rule"),
                       ("format_version", "fp4fmt format version")):
        if qc.get(key) is not None:
            rows.append((label, f"`{qc[key]}`" if key == "scale_rule" else str(qc[key])))
    if "fused_tensor_scales" in qc:
        rows.append(("Shared tensor scale for fused projections (q/k/v, gate/up)",
                     "yes" if qc["fused_tensor_scales"] else "no"))
    quantized = {n: e for n, e in (report.get("tensors") or {}).items()
                 if isinstance(e, dict) and e.get("action") == "quantized"}
    if "quantized_tensors" in summary:
        rows.append(("Quantized tensors", f"{summary['quantized_tensors']:,}"))
    if "quantized_params" in summary:
        rows.append(("Quantized parameters", f"{summary['quantized_params']:,}"))
    stored = sum(e.get("stored_bytes") or 0 for e in quantized.values())
    params = sum(math.prod(e.get("shape") or [0]) for e in quantized.values())
    if stored and params:
        rows.append(("Bits per quantized weight (codes and scales)", f"{8 * stored / params:.3f}"))
    if summary.get("compression_ratio"):
        rows.append(("Compression vs. the source checkpoint", f"{summary['compression_ratio']:.2f}x"))
    if isinstance(summary.get("min_sqnr_db"), (int, float)):
        rows.append(("Lowest SQNR of a quantized tensor", f"{summary['min_sqnr_db']:.2f} dB"))
    if isinstance(qc.get("ignore"), list):
        rows.append(("Kept in high precision", _listing([str(x) for x in qc["ignore"]])))
    producer = qc.get("producer")
    if isinstance(producer, dict) and producer.get("version"):
        rows.append(("Converted with", f"fp4fmt {producer['version']}"))
    lines += [f"| {k} | {v} |" for k, v in rows]
    lines.append("")
    if report:
        lines += [f"Per-tensor errors (SQNR, relative RMSE, max abs error) are in `{REPORT_NAME}`.", ""]

    where = repo_id or "NAMESPACE/NAME"
    rev = f", revision={json.dumps(revision)}" if revision and revision != "main" else ""
    lines += ["## Usage", "", "```bash", "pip install 'fp4fmt[torch,hub]'", "```", "", "```python",
              "import torch", "from huggingface_hub import snapshot_download", "import fp4fmt.torch", "",
              f"path = snapshot_download({json.dumps(where)}{rev})",
              "model = fp4fmt.torch.from_pretrained(path, dtype=torch.bfloat16)  # FP4 linear layers"]
    if any((d / n).exists() for n in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        lines += ["", "from transformers import AutoTokenizer", "tokenizer = AutoTokenizer.from_pretrained(path)"]
    lines += ["```", "", "Check the files after download with `fp4fmt verify PATH`.", ""]

    if eval_json is not None:
        lines += eval_section(load_eval(eval_json)[0])
    return "\n".join(lines).rstrip("\n") + "\n"


# ----------------------------------------------------------------------------------------------------------
# pushing


def redact(text: str, secret: str | None) -> str:
    """``text`` without ``secret``: every ``Bearer`` credential and every run of characters covered by an
    occurrence of ``secret`` (overlapping ones included) become ``***``, repeated until none is left."""
    text = re.sub(r"(?i)(bearer\s+)\S+", r"\1***", text)
    if not secret:
        return text
    marker = "" if secret in "***" else "***"  # a marker that cannot spell the secret by itself
    while secret in text:  # each round covers a character not from a marker, or shortens the text: it ends
        covered = [False] * len(text)
        i = text.find(secret)
        while i >= 0:
            covered[i:i + len(secret)] = [True] * len(secret)
            i = text.find(secret, i + 1)
        out, prev = [], False
        for c, cov in zip(text, covered):
            if not cov:
                out.append(c)
            elif not prev:
                out.append(marker)
            prev = cov
        text = "".join(out)
    return text


def _hub():
    try:
        import huggingface_hub
    except ImportError:
        raise FP4FmtError("pushing needs huggingface_hub: pip install 'fp4fmt[hub]'") from None
    return huggingface_hub


def push(
    path: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    dry_run: bool = False,
    token: str | None = None,
    eval_json: str | os.PathLike | None = None,
    commit_message: str | None = None,
    base_model: str | None = None,
    card: str = "auto",
    progress: Progress | None = None,
) -> PushResult:
    """Upload checkpoint directory ``path`` to model repo ``repo_id`` in one commit (module docstring: what is
    uploaded, the card, the token). The repo is created if missing (``private`` applies then only), and
    the branch ``revision`` too (from main). ``dry_run``: check and list only; no token, no network."""
    d = Path(path)
    check_repo_id(repo_id)
    if card not in CARD_MODES:
        raise FP4FmtError(f"card must be one of {CARD_MODES}, not {card!r}")
    config = check_checkpoint(d, progress)
    own = d / "README.md"
    if card == "keep" and not own.is_file():
        raise FP4FmtError("card='keep' but the directory has no README.md", file=d)
    keep = card == "keep" or (card == "auto" and own.is_file()
                              and _is_own_card(own.read_text(encoding="utf-8", errors="replace")))
    text = own.read_text(encoding="utf-8") if keep else model_card(d, eval_json, base_model=base_model,
                                                                    repo_id=repo_id, revision=revision)
    uploads: dict[str, Path | bytes] = {rel: p for rel, p in _checkpoint_files(d) if rel != "README.md"}
    uploads["README.md"] = own if keep else text.encode("utf-8")
    if eval_json is not None:
        for rel, p in load_eval(eval_json)[1]:
            if rel in uploads:
                raise FP4FmtError(f"the eval file {p} would overwrite the checkpoint's {rel}", file=d)
            uploads[rel] = p
    uploads = dict(sorted(uploads.items()))
    files = tuple((rel, len(v) if isinstance(v, bytes) else v.stat().st_size) for rel, v in uploads.items())
    rev = revision or "main"
    if dry_run:
        return PushResult(repo_id, rev, files, None, text)

    hub = _hub()
    secret = token or hub.get_token()
    if not secret:
        raise FP4FmtError("no Hugging Face token: pass one, set HF_TOKEN or log in with `hf auth login`")
    scheme = str(config["quantization_config"].get("scheme", "fp4"))
    message = commit_message or f"Upload {scheme.upper()} checkpoint (fp4fmt {__version__})"
    try:
        api = hub.HfApi(token=secret, library_name="fp4fmt", library_version=__version__)
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        full_id = getattr(url, "repo_id", None) or repo_id
        if revision and rev != "main" and not rev.startswith("refs/"):
            api.create_branch(full_id, branch=rev, exist_ok=True)
        ops = [hub.CommitOperationAdd(path_in_repo=rel, path_or_fileobj=v if isinstance(v, bytes) else str(v))
               for rel, v in uploads.items()]
        total, done = sum(size for _, size in files), 0
        if progress:
            progress("uploading", 0, total)
        for op, (_, size) in zip(ops, files):  # one by one: progress as each file lands
            api.preupload_lfs_files(full_id, additions=[op], revision=revision, free_memory=False)
            done += size
            if progress:
                progress("uploading", done, total)
        if progress:
            progress("committing", 0, 1)
        info = api.create_commit(full_id, ops, commit_message=message, revision=revision)
        if progress:
            progress("committing", 1, 1)
    except FP4FmtError:
        raise
    except Exception as e:  # a Hub, network or validation error: re-raised without the token, without chaining
        raise FP4FmtError(redact(f"push to {repo_id} failed: {type(e).__name__}: {e}", secret), file=d) from None
    page = str(url).rstrip("/") + (f"/tree/{rev}" if rev != "main" else "")
    return PushResult(full_id, rev, files, page, text, getattr(info, "oid", None))
