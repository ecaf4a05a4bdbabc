"""fp4fmt eval on the demo model: SmolLM2-135M (BF16) against its NVFP4 and MXFP4 conversions, plus the
baseline compared with itself.

What these tests establish:

* the result validates against ``fp4fmt/eval/eval.schema.json`` and has every figure (memory, speed,
  perplexity, KL mean/p99, top-1 agreement, per-layer SQNR, crack hunt by level, kernel-vs-reference) for
  every variant;
* the baseline's perplexity is the one transformers' own loss gives on the same windows (the same code path
  serves every variant), and the baseline evaluated as a variant has KL exactly 0, full agreement, the
  same perplexity and no flipped answer;
* the FP4 variants are smaller on disk and in memory, differ from the baseline (KL > 0), and their fast path
  reproduces the reference decoder on CPU; the per-layer SQNR comes from the conversion report;
* the report files exist: Markdown with the tables and plot links, three PNGs; the CLI refuses bad input.
* metrics: KL against a float64 formula, perplexity of a uniform model equals the vocabulary size.
"""

from __future__ import annotations

import json
import math
from importlib import resources
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import torch
import transformers
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from fp4fmt.cli import main
from fp4fmt.converters.checkpoint import Options, convert_checkpoint
from fp4fmt.eval import metrics, probes
from fp4fmt.eval.report import write_report
from fp4fmt.eval.runner import EvalOptions, _corpus_windows, evaluate

OPTS = EvalOptions(limit=1, seed=3, ppl_windows=2, window_tokens=64, speed_prompt_tokens=32, speed_new_tokens=4,
                   speed_repeats=1, max_new_tokens=24, batch_size=4)


@pytest.fixture(scope="module")
def run(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    base = tmp_path_factory.mktemp("eval")
    for scheme in ("nvfp4", "mxfp4"):
        convert_checkpoint(smollm2_dir, base / scheme, Options(scheme=scheme))
    stages = []
    result = evaluate(smollm2_dir, [base / "nvfp4", base / "mxfp4", smollm2_dir], OPTS,
                      progress=lambda s, d, t: stages.append(s))
    paths = write_report(result, base / "report")
    return {"result": result, "paths": paths, "stages": stages, "base": base}


def schema() -> dict:
    return json.loads(resources.files("fp4fmt.eval").joinpath("eval.schema.json").read_text())


def test_result_validates_and_has_every_figure(run: dict) -> None:
    r = json.loads(run["paths"]["json"].read_text())  # what was written, not the in-memory dict
    jsonschema.Draft202012Validator.check_schema(schema())
    jsonschema.validate(r, schema())
    names = [v["name"] for v in r["variants"]]
    assert names == ["smollm2-135m-instruct-bf16", "nvfp4", "mxfp4", "smollm2-135m-instruct-bf16#3"]
    for v in r["variants"]:
        for key in ("disk_bytes", "resident_weight_bytes", "rss_growth_bytes"):
            assert isinstance(v["memory"][key], int) and v["memory"][key] >= 0
        assert v["memory"]["disk_bytes"] > 0 and v["memory"]["resident_weight_bytes"] > 0
        assert v["speed"]["prefill_tokens_per_s"] > 0 and v["speed"]["decode_tokens_per_s"] > 0
        assert v["speed"]["prompt_tokens"] == 32 and v["speed"]["new_tokens"] == 4
        assert math.isfinite(v["fidelity"]["perplexity"]) and v["fidelity"]["scored_tokens"] == 2 * 63
        levels = {lv["name"] for lv in r["crack_hunt"]["levels"]}
        assert set(v["crack_hunt"]["accuracy_by_level"]) == levels and len(levels) == 4
        assert len(v["crack_hunt"]["answers"]) == 4
        if v["kind"] != "baseline":
            for key in ("kl_mean", "kl_p99", "top1_agreement"):
                assert v["fidelity"][key] is not None
    assert r["peak_rss_bytes"] > 0 and r["wall_seconds"] > 0
    assert {"loading", "speed", "perplexity and KL"} <= set(run["stages"])


def test_baseline_perplexity_is_transformers_loss(run: dict, smollm2_dir: Path) -> None:
    tok = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.bfloat16).eval()
    windows = _corpus_windows(tok, OPTS)
    with torch.no_grad():
        losses = [float(model(w[None], labels=w[None]).loss.double()) for w in windows]
    want = math.exp(sum(losses) / len(losses))  # equal-length windows: the mean of means is the mean
    got = run["result"]["variants"][0]["fidelity"]["perplexity"]
    assert got == pytest.approx(want, rel=2e-3)


def test_baseline_against_itself_is_exactly_zero(run: dict) -> None:
    base, same = run["result"]["variants"][0], run["result"]["variants"][3]
    assert same["kind"] == "hf" and same["scheme"] is None
    assert same["fidelity"]["kl_mean"] == 0.0 and same["fidelity"]["kl_max"] == 0.0
    assert same["fidelity"]["top1_agreement"] == 1.0
    assert same["fidelity"]["perplexity"] == base["fidelity"]["perplexity"]
    assert same["crack_hunt"]["flipped"] == [] and same["crack_hunt"]["identical_to_baseline"] == 4
    assert [a["text"] for a in same["crack_hunt"]["answers"]] == [a["text"] for a in base["crack_hunt"]["answers"]]


@pytest.mark.parametrize("index,scheme", [(1, "nvfp4"), (2, "mxfp4")])
def test_fp4_variants(run: dict, index: int, scheme: str) -> None:
    base, v = run["result"]["variants"][0], run["result"]["variants"][index]
    assert v["kind"] == "fp4fmt" and v["scheme"] == scheme
    assert v["memory"]["disk_bytes"] < 0.5 * base["memory"]["disk_bytes"]
    assert v["memory"]["resident_weight_bytes"] < 0.5 * base["memory"]["resident_weight_bytes"]
    f = v["fidelity"]
    assert 0 < f["kl_mean"] <= f["kl_max"] and f["kl_p99"] <= f["kl_max"]
    assert 0.3 < f["top1_agreement"] < 1.0
    assert sum(f["kl_histogram"]["counts"]) == f["scored_tokens"] + 2  # KL at every position, the last included
    k = v["kernel_vs_reference"]
    assert k["identical"] and k["max_abs_logit_diff"] == 0.0 and k["tensors_compared"] == 210
    report = json.loads((run["base"] / scheme / "fp4fmt_report.json").read_text())["tensors"]
    assert len(v["layer_sqnr"]) == 210 and {r["layer"] for r in v["layer_sqnr"]} == set(range(30))
    for row in v["layer_sqnr"]:
        assert row["sqnr_db"] == report[row["tensor"]]["sqnr_db"] and 10 < row["sqnr_db"] < 40
    # flips are exactly the probes whose correctness differs from the baseline's
    b = {a["probe"]: a["correct"] for a in base["crack_hunt"]["answers"]}
    want = {a["probe"] for a in v["crack_hunt"]["answers"] if a["correct"] != b[a["probe"]]}
    assert {x["probe"] for x in v["crack_hunt"]["flipped"]} == want


def test_report_files(run: dict) -> None:
    paths = run["paths"]
    md = paths["markdown"].read_text()
    for text in ("## Verdict", "## Summary", "| nvfp4 | nvfp4 |", "## Crack hunt", "## Kernel or format",
                 "![Per-layer SQNR](layer_sqnr.png)", "![Per-token KL](kl_distribution.png)"):
        assert text in md, text
    for key in ("layer_sqnr", "kl_distribution", "accuracy_by_level"):
        data = paths[key].read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert json.loads(paths["json"].read_text())["plots"]["layer_sqnr"] == "layer_sqnr.png"


def test_cli_refuses_bad_input(run: dict, smollm2_dir: Path, tmp_path: Path) -> None:
    res = CliRunner().invoke(main, ["eval", str(run["base"] / "nvfp4"), str(smollm2_dir), "--out", str(tmp_path)])
    assert res.exit_code == 2 and "baseline must be the high-precision checkpoint" in res.output
    res = CliRunner().invoke(main, ["eval", str(smollm2_dir), str(tmp_path / "missing")])
    assert res.exit_code == 2 and "does not exist" in res.output
    res = CliRunner().invoke(main, ["eval", str(smollm2_dir), str(tmp_path)])
    assert res.exit_code == 2 and "no config.json" in res.output


# ------------------------------------------------------------------------------------------------------
# metrics


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), scale=st.floats(0.01, 30.0))
def test_kl_and_nll_match_float64_formulas(seed: int, scale: float) -> None:
    rng = np.random.default_rng(seed)
    a = torch.from_numpy(rng.standard_normal((3, 5, 11)) * scale).float()
    b = torch.from_numpy(rng.standard_normal((3, 5, 11)) * scale).float()
    pa = np.exp(a.double().numpy()) / np.exp(a.double().numpy()).sum(-1, keepdims=True)
    pb = np.exp(b.double().numpy()) / np.exp(b.double().numpy()).sum(-1, keepdims=True)
    want = (pa * (np.log(pa) - np.log(pb))).sum(-1)
    np.testing.assert_allclose(metrics.kl_per_token(a, b).numpy(), want, rtol=1e-9, atol=1e-12)
    assert torch.equal(metrics.kl_per_token(a, a), torch.zeros(3, 5, dtype=torch.float64))
    ids = torch.from_numpy(rng.integers(0, 11, (3, 5)))
    nll = metrics.next_token_nll(a, ids).numpy()
    for i in range(3):
        for t in range(4):
            assert nll[i, t] == pytest.approx(-math.log(pa[i, t, int(ids[i, t + 1])]), rel=1e-9)


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size() -> None:
    logits = torch.zeros(2, 9, 50)
    ids = torch.randint(0, 50, (2, 9))
    assert metrics.perplexity(metrics.next_token_nll(logits, ids).numpy()) == pytest.approx(50.0, rel=1e-12)
    s = metrics.Summary.of(np.arange(101.0))
    assert (s.mean, s.median, s.p99, s.max, s.count) == (50.0, 50.0, 99.0, 100.0, 101)


def test_probes_are_the_ones_evaluated(run: dict) -> None:
    ids = [p.id for p in probes.make_probes(seed=OPTS.seed, per_level=OPTS.limit)]
    assert [a["probe"] for a in run["result"]["variants"][0]["crack_hunt"]["answers"]] == ids


def test_model_card_carries_the_eval_table(run: dict) -> None:
    """fp4fmt push's card reads the real eval.json (schema v1): one row per variant with its figures."""
    from fp4fmt.hub import model_card

    card = model_card(run["base"] / "nvfp4", run["paths"]["json"], base_model="HuggingFaceTB/SmolLM2-135M-Instruct")
    r = run["result"]
    for v in r["variants"]:
        row = next(line for line in card.splitlines() if line.startswith(f"| {v['name']} |"))
        assert f"{v['fidelity']['perplexity']:.3f}" in row
        assert f"{v['speed']['decode_tokens_per_s']:.1f}" in row
    assert "![layer_sqnr](eval/layer_sqnr.png)" in card


def test_push_command_dry_run_and_refusal(run: dict, smollm2_dir: Path) -> None:
    """`fp4fmt push --dry-run` lists the checkpoint, card and eval files without a token or network;
    a directory that is not an fp4fmt checkpoint is refused with exit status 2."""
    res = CliRunner().invoke(main, ["push", str(run["base"] / "mxfp4"), "me/smol-mxfp4", "--dry-run", "--eval",
                                    str(run["paths"]["json"]), "--json"], env={"HF_TOKEN": ""})
    assert res.exit_code == 0, res.output
    out = json.loads(res.output[res.output.index("{"):])
    files = {f for f, _ in out["files"]}
    assert {"README.md", "config.json", "model.safetensors", "eval/eval.json", "eval/layer_sqnr.png"} <= files
    assert out["url"] is None and out["repo_id"] == "me/smol-mxfp4"
    res = CliRunner().invoke(main, ["push", str(smollm2_dir), "me/x", "--dry-run"])
    assert res.exit_code == 2 and "quant" in res.output
