"""What the checkpoint converter does with each source tensor: quantize it (and how), keep it, or drop it.

Pure functions over names, shapes, dtypes and the model config; nothing here reads tensor data.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from .. import dtypes
from ..errors import FP4FmtError

# Kept by default: embeddings, the LM head, norms, MoE routers (as llm-compressor, modelopt and vLLM expect).
DEFAULT_IGNORE = (
    r"(^|\.)embed_tokens\.",
    r"(^|\.)(word|position|token_type)_embeddings\.",
    r"(^|\.)wte\.|(^|\.)wpe\.",
    r"(^|\.)lm_head\.",
    r"norm",
    r"(^|\.)(mlp\.)?(gate|router)\.weight$",
)

# Layers that inference engines fuse into one GEMM: their NVFP4 shards share one tensor scale (vLLM takes
# the max over the shards' scales, so unequal scales would silently change the others' values).
FUSED_GROUPS = (
    ("qkv", ("q_proj", "k_proj", "v_proj")),
    ("gate_up", ("gate_proj", "up_proj")),
    ("w13", ("w1", "w3")),
)

# Fused MoE expert tensors stored 3-D without a ".weight" suffix, and which dimension feeds them.
_FUSED_EXPERTS = re.compile(r"(^|\.)experts\.(gate_up_proj|up_proj|gate_proj|down_proj)$")


@dataclass(frozen=True)
class Action:
    """The decision for one source tensor."""

    name: str  # the tensor's name in the output (same as in the source)
    kind: str  # "quantize", "keep" or "drop"
    reason: str  # why it is kept or dropped; what it is, for quantized ones
    dtype: str  # source dtype
    shape: tuple[int, ...]
    scheme: str | None = None
    axis: int | None = None
    group: str | None = None  # fused group sharing one NVFP4 tensor scale
    fp8_scale: str | None = None  # source name of the FP8 scale this weight is dequantized with
    out_dtype: str | None = None  # stored dtype of a kept tensor


@dataclass(frozen=True)
class Override:
    pattern: str
    action: str  # "keep", "nvfp4" or "mxfp4"


def load_overrides(path: str | Path) -> list[Override]:
    """Per-layer overrides: ``{"rules": [{"pattern": REGEX, "action": "keep"|"nvfp4"|"mxfp4"}, ...]}``.

    The first rule whose pattern matches a tensor name (``re.search``) decides; e.g. keep the first and last
    decoder layers in high precision while the rest is FP4.
    """
    p = Path(path)
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise FP4FmtError(f"cannot read the override file: {e}", file=p) from None
    rules = doc.get("rules") if isinstance(doc, dict) else None
    if not isinstance(rules, list):
        raise FP4FmtError('must be {"rules": [{"pattern": ..., "action": ...}, ...]}', file=p)
    out = []
    for i, r in enumerate(rules):
        if not isinstance(r, dict) or r.get("action") not in ("keep", "nvfp4", "mxfp4") or not isinstance(r.get("pattern"), str):
            raise FP4FmtError(f"rule {i}: needs a string 'pattern' and an 'action' of keep, nvfp4 or mxfp4", file=p)
        try:
            re.compile(r["pattern"])
        except re.error as e:
            raise FP4FmtError(f"rule {i}: bad regular expression: {e}", file=p) from None
        out.append(Override(r["pattern"], r["action"]))
    return out


def _dims(config: dict | None) -> tuple[int | None, int | None]:
    """(hidden size, MoE expert intermediate size) from a transformers config, if it says."""
    if not config:
        return None, None
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    hidden = text.get("hidden_size")
    inter = text.get("moe_intermediate_size") or text.get("expert_intermediate_size") or text.get("intermediate_size")
    return hidden, inter


def linear_axis(name: str, shape: tuple[int, ...], config: dict | None) -> tuple[int | None, str]:
    """The reduction (input-feature) axis of a linear weight, or None with the reason it is not one."""
    if len(shape) < 2:
        return None, "not a matrix (bias, norm or scalar)"
    if name.endswith(".weight"):
        return len(shape) - 1, "linear weight [out, in]" if len(shape) == 2 else f"{len(shape)}-D weight [..., out, in]"
    m = _FUSED_EXPERTS.search(name)
    if m and len(shape) == 3:
        hidden, inter = _dims(config)
        feeds = hidden if m.group(2) != "down_proj" else inter
        hits = [a for a in (1, 2) if feeds is not None and shape[a] == feeds]
        if len(hits) == 1:
            return hits[0], f"fused MoE experts [E, ...], input features on axis {hits[0]}"
        return None, (
            f"UNRECOGNISED fused-experts layout {list(shape)} (cannot tell the input-feature axis from config "
            f"hidden_size={hidden}, intermediate={inter}); kept in high precision"
        )
    return None, "not a .weight tensor"


def fused_group(name: str) -> str | None:
    """Key of the fused group a projection belongs to (same module prefix), else None."""
    for key, members in FUSED_GROUPS:
        for member in members:
            suffix = f".{member}.weight"
            if name.endswith(suffix):
                return name[: -len(suffix)] + f".<{key}>"
    return None


def decide(
    name: str,
    dtype: str,
    shape: tuple[int, ...],
    *,
    scheme: str,
    config: dict | None,
    ignore: Sequence[str],
    overrides: Sequence[Override],
    fp8_scale: str | None = None,
) -> Action:
    """The action for one tensor (FP8 weights come with the name of their scale)."""
    is_float = dtype in dtypes.FLOAT_SOURCE_DTYPES
    keep_dtype = "BF16" if fp8_scale else dtype
    if not is_float:
        return Action(name, "keep", f"dtype {dtype} is not a float weight", dtype, shape, out_dtype=dtype)
    for ov in overrides:
        if re.search(ov.pattern, name):
            if ov.action == "keep":
                return Action(name, "keep", f"override {ov.pattern!r}: keep", dtype, shape, fp8_scale=fp8_scale,
                              out_dtype=keep_dtype)
            scheme = ov.action
            break
    else:
        for pattern in ignore:
            if re.search(pattern, name):
                return Action(name, "keep", f"matches ignore pattern {pattern!r}", dtype, shape,
                              fp8_scale=fp8_scale, out_dtype=keep_dtype)
    axis, what = linear_axis(name, shape, config)
    if axis is None:
        return Action(name, "keep", what, dtype, shape, fp8_scale=fp8_scale, out_dtype=keep_dtype)
    group = fused_group(name) if scheme == "nvfp4" else None
    return Action(name, "quantize", what, dtype, shape, scheme=scheme, axis=axis, group=group, fp8_scale=fp8_scale)


def finalize_groups(actions: list[Action]) -> list[Action]:
    """Drop group keys that only one quantized tensor carries (nothing to share)."""
    counts: dict[str, int] = {}
    for a in actions:
        if a.kind == "quantize" and a.group:
            counts[a.group] = counts.get(a.group, 0) + 1
    out = []
    for a in actions:
        if a.group and counts.get(a.group, 0) < 2:
            a = Action(**{**asdict(a), "group": None})
        out.append(a)
    return out


def is_linear_like(a: Action) -> bool:
    """Counts toward "linear-layer parameters" for the high-precision warning: a matrix that is not an
    embedding, LM head, norm or router (nor an integer buffer such as BERT's position_ids)."""
    if len(a.shape) < 2 or a.dtype not in dtypes.FLOAT_SOURCE_DTYPES:
        return False
    return not any(re.search(p, a.name) for p in DEFAULT_IGNORE)
