"""The crack-hunt probe suite: answer extraction and scoring, probe generation, the GSM8K slice, first divergence."""

from __future__ import annotations

import json
import random
import re
from decimal import Decimal
from fractions import Fraction
from importlib import resources

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fp4fmt.errors import FP4FmtError
from fp4fmt.eval.probes import (
    LEVEL_NAMES,
    Probe,
    extract_answer,
    first_divergence,
    load_gsm8k,
    make_probes,
    prompt_messages,
    score,
)

DATA = resources.files("fp4fmt.eval") / "data"


def _probe(answer: str) -> Probe:
    return Probe("t-000", 1, LEVEL_NAMES[1], "?", answer)


# --- extraction on realistic generations --------------------------------------------------------------------------

GENERATIONS = [
    # chain of thought ending with the requested line
    ("Janet's ducks lay 16 eggs. She uses 3 + 4 = 7, so 16 - 7 = 9 eggs are left.\n"
     "She sells each for $2, so she makes 9 * 2 = $18.\nAnswer: 18", "18"),
    ("The answer is $1,234.", "1234"),
    ("We need 6 groups of 7, which is 6 * 7 = 42.\nSo the final answer is \\boxed{42}.", "42"),
    ("He sprints 3*3=9 times\nSo he runs 9*8=72 meters\n#### 72", "72"),
    # a correction: the last "Answer:" wins over the first one and over the numbers after it
    ("Answer: 12\nWait, that is wrong: 5 + 8 = 13, not 12.\nAnswer: 13\nCheck: 13 - 8 = 5.", "13"),
    # the stated answer wins over a later last number
    ("Answer: 25\n\nExplanation: 5 * 5 = 25, and adding the 3 spare ones would give 28.", "25"),
    ("I'm sorry, but I cannot solve this problem without more information.", None),
    ("", None),
    ("First, 48 - 722 = -674.\nAnswer: -674", "-674"),
    ("Each friend pays 7 / 2 = 3.50 dollars.\nAnswer: $3.50", "3.5"),
    ("She has 18 apples.", "18"),
    ("Multiply 4 by 0.5 to get 2.0 hours.\nAnswer: 2.0 hours.", "2"),
    ("**Step 1:** 12 + 30 = 42\n**Step 2:** 42 / 6 = 7\n\n**Answer:** 7 cookies per box", "7"),
    ("Answer: 16 - 3 - 4 = 9", "9"),
    ("The discount is 100 - 75 = 25 percent.\nAnswer: 25%", "25"),
    # the prompt's template echoed unfilled: fall back to the last number
    ("Let me compute 15 + 27. That gives 42.\nAnswer: <number>", "42"),
    # markdown headings are not "#### <number>" answers
    ("#### Step 1: add\n3 + 4 = 7\n#### Step 2: double\n7 * 2 = 14", "14"),
    ("The result is \u221212.\nAnswer: \u221212", "-12"),
    ("The final answer is 1,000,000 dollars", "1000000"),
    ("Answer:\n\n42", "42"),
    ("The answer is 5. Adding 10 more would make 5 + 10 = 15, but that is not asked.", "5"),
    ("The answer is: $\\boxed{-0.75}$", "-0.75"),
    ("Total cost: 2 * $7.50 = $15.00, plus a $2 fee is $17.00", "17"),
]


@pytest.mark.parametrize(("text", "expected"), GENERATIONS)
def test_extract_answer_realistic(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize(("text", "expected"), [g for g in GENERATIONS if g[1] is not None])
def test_score_right_and_wrong(text, expected):
    assert score(_probe(expected), text)
    off_by_one = str(Decimal(expected) + 1)
    assert not score(_probe(off_by_one), text)


@pytest.mark.parametrize("text", [g[0] for g in GENERATIONS if g[1] is None])
def test_score_without_a_number_is_wrong(text):
    assert not score(_probe("0"), text)


@pytest.mark.parametrize(
    ("answer", "text", "right"),
    [
        ("3.5", "Answer: 3.50", True),
        ("4", "Answer: 4.0", True),
        ("4", "Answer: 4.00001", False),
        ("18", "Answer: 180", False),
        ("18", "Answer: 1.8", False),
        ("-7", "Answer: 7", False),
        ("0", "Answer: -0", True),
        ("1234", "The answer is 1,234", True),
    ],
)
def test_score_compares_numbers_exactly(answer, text, right):
    assert score(_probe(answer), text) is right


# --- extraction property: a final "Answer: n" line in any format gives canonical n ------------------------------


def _expected(n: Decimal) -> str:
    """Canonical form, written independently: integral values without a point, others without trailing zeros."""
    if n == n.to_integral_value():
        return str(int(n))
    digits = f"{n:f}".rstrip("0")
    return digits


def _formats(n: Decimal) -> list[str]:
    plain, commas = f"{n:f}", f"{n:,f}"
    unsigned = commas.lstrip("-")
    dollar = [f"-${unsigned}", f"$-{unsigned}"] if n < 0 else [f"${commas}"]
    return [plain, commas, *dollar]


_NUMBERS = st.one_of(
    st.integers(-(10**12), 10**12).map(Decimal),
    st.decimals(min_value=-(10**7), max_value=10**7, places=3, allow_nan=False, allow_infinity=False),
    st.decimals(min_value=-1, max_value=1, places=2, allow_nan=False, allow_infinity=False),
)
_PREFIX = st.text(alphabet="abcxyz ABC0123456789.,=+-*/$#:\n", max_size=60)
_SUFFIX = st.sampled_from(["", ".", " dollars.", "%", " apples", "\n", " km.\n", "\nCheck: 3 + 4 = 7, and 12 - 5 = 7."])


@settings(max_examples=300, deadline=None)
@given(n=_NUMBERS, prefix=_PREFIX, suffix=_SUFFIX, which=st.integers(0, 3), answer_word=st.sampled_from(
    ["Answer: ", "The answer is ", "**Answer:** ", "#### "]))
def test_extract_final_answer_any_format(n, prefix, suffix, which, answer_word):
    formats = _formats(n)
    text = f"{prefix}\n{answer_word}{formats[which % len(formats)]}{suffix}"
    got = extract_answer(text)
    assert got == _expected(n)
    assert Decimal(got) == n


@settings(max_examples=100, deadline=None)
@given(words=st.text(alphabet="abcdefghij ,.!?$%\n:", max_size=80))
def test_no_digit_no_answer(words):
    assert extract_answer(words) is None


# --- generated probes ----------------------------------------------------------------------------------------------

_EXPRESSION = re.compile(r"What is (\d+) ([-+*/]) (\d+)\?")
_STEP = re.compile(r"(\d+) ([-+*/]) (\d+) = (-?\d+)")


def _evaluate(a: int, op: str, b: int) -> Fraction:
    return {"+": Fraction(a + b), "-": Fraction(a - b), "*": Fraction(a * b), "/": Fraction(a, b)}[op]


def _levels(probes: list[Probe]) -> dict[int, list[Probe]]:
    out: dict[int, list[Probe]] = {level: [] for level in LEVEL_NAMES}
    for p in probes:
        out[p.level].append(p)
    return out


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(-(2**40), 2**40), per_level=st.integers(1, 16))
def test_arithmetic_probes_are_right(seed, per_level):
    levels = _levels(make_probes(seed, per_level))
    assert all(len(levels[level]) == per_level for level in LEVEL_NAMES)
    for level, digits in ((1, (1, 1)), (2, (2, 4))):
        ops = set()
        for p in levels[level]:
            assert p.level_name == LEVEL_NAMES[level] and p.steps == ()
            m = _EXPRESSION.fullmatch(p.question)
            assert m, p.question
            a, op, b = int(m[1]), m[2], int(m[3])
            ops.add(op)
            assert digits[0] <= len(str(a)) <= digits[1] and digits[0] <= len(str(b)) <= digits[1]
            value = _evaluate(a, op, b)
            assert value.denominator == 1, "divisions must be exact"
            assert p.answer == str(value.numerator)
        if level == 1:
            assert ops <= {"+", "-", "*"}
            assert all(int(p.answer) >= 0 for p in levels[1])
        else:
            assert ops <= {"+", "-", "*", "/"}
            if per_level >= 4:
                assert "/" in ops
        if per_level >= 3:
            assert {"+", "-", "*"} <= ops


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(-(2**40), 2**40), per_level=st.integers(1, 16))
def test_word_problems_are_right(seed, per_level):
    level3 = _levels(make_probes(seed, per_level))[3]
    assert len(level3) == per_level
    for p in level3:
        assert p.level_name == LEVEL_NAMES[3]
        assert re.fullmatch(r"[1-9]\d*", p.answer), p.answer  # a positive integer
        in_question = {int(x) for x in re.findall(r"\d+", p.question)}
        assert 2 <= len(p.steps) <= 3
        known, used, result = set(in_question), set(), None
        for step in p.steps:
            m = _STEP.fullmatch(step)
            assert m, step
            a, op, b, c = int(m[1]), m[2], int(m[3]), int(m[4])
            assert a in known and b in known, f"{step!r} uses a number that is not in {p.question!r}"
            assert _evaluate(a, op, b) == c
            used |= {a, b}
            known.add(c)
            result = c
        assert result == int(p.answer)
        assert in_question <= used, f"{p.question!r}: a number plays no part in the solution"


def test_word_problems_vary():
    questions = [p.question for p in make_probes(0, 16) if p.level == 3]
    stems = {re.sub(r"\d+", "N", re.sub(r"\b[A-Z][a-z]+\b", "W", q)) for q in questions}
    assert len(stems) >= 8  # every template shows up in 16 problems


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(-(2**40), 2**40))
def test_same_seed_same_probes(seed):
    state = random.getstate()
    first = make_probes(seed, 6)
    assert random.getstate() == state, "make_probes must not touch the global RNG"
    random.seed(seed + 1)
    assert make_probes(seed, 6) == first
    # a smaller suite is a prefix of a larger one, level by level
    small, large = _levels(make_probes(seed, 3)), _levels(first)
    assert all(small[level] == large[level][:3] for level in LEVEL_NAMES)


@pytest.mark.parametrize(("a", "b"), [(0, 1), (1, -1), (7, 8), (0, 2**40)])
def test_different_seeds_different_probes(a, b):
    pa, pb = _levels(make_probes(a)), _levels(make_probes(b))
    for level in (1, 2, 3):
        assert [p.question for p in pa[level]] != [p.question for p in pb[level]]
    assert [p.id for p in pa[4]] != [p.id for p in pb[4]]


def test_suite_shape_and_ids():
    probes = make_probes()
    assert [p.level for p in probes] == [1] * 10 + [2] * 10 + [3] * 10 + [4] * 10
    assert len({p.id for p in probes}) == 40
    assert [p.id for p in probes[:3]] == ["L1-000", "L1-001", "L1-002"]
    assert all(re.fullmatch(r"gsm8k-\d{4}", p.id) for p in probes[30:])
    assert make_probes(per_level=0) == []


@pytest.mark.parametrize("per_level", [-1, 201, 2.5])
def test_bad_per_level(per_level):
    with pytest.raises(FP4FmtError, match="per_level"):
        make_probes(0, per_level)


@pytest.mark.parametrize(("level", "answer"), [(0, "1"), (5, "1"), (1, "1,234"), (1, "$5"), (1, "five"), (1, "4.")])
def test_probe_rejects_bad_fields(level, answer):
    with pytest.raises(FP4FmtError):
        Probe("x", level, "?", "q", answer)


def test_prompt_messages():
    probe = make_probes(3, 1)[2]
    messages = prompt_messages(probe)
    assert len(messages) == 1 and messages[0]["role"] == "user"
    assert messages[0]["content"].startswith(probe.question)
    assert "Answer: <number>" in messages[0]["content"]


# --- the bundled data ---------------------------------------------------------------------------------------------


def test_gsm8k_answers_match_the_hash_field():
    lines = (DATA / "gsm8k_test_200.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 200
    probes = load_gsm8k()
    assert len(probes) == 200
    for index, (line, p) in enumerate(zip(lines, probes)):
        record = json.loads(line)
        final = record["answer"].split("####")[-1].strip()
        assert p.id == f"gsm8k-{index:04d}" and p.level == 4 and p.level_name == "GSM8K"
        assert p.question == record["question"]
        assert Fraction(p.answer) == Fraction(final.replace(",", ""))
        assert "," not in p.answer and "####" not in "".join(p.steps)
        assert p.steps and not any("<<" in s or ">>" in s for s in p.steps)
    assert probes[146].answer == "2125"  # the one answer written with a thousands comma in the slice
    assert probes[0].answer == "18" and probes[0].steps[-1].endswith("every day at the farmer\u2019s market.")


def test_gsm8k_reference_solutions_score_right():
    # the worked solutions, with "#### n" as their last line, must score as right answers
    lines = (DATA / "gsm8k_test_200.jsonl").read_text(encoding="utf-8").splitlines()
    for line, p in zip(lines, load_gsm8k()):
        assert score(p, json.loads(line)["answer"]), p.id


def test_level4_is_a_seeded_sample_of_the_slice():
    every = {p.id: p for p in load_gsm8k()}
    for seed in range(5):
        level4 = _levels(make_probes(seed, 30))[4]
        assert len({p.id for p in level4}) == 30
        assert all(every[p.id] == p for p in level4)
    assert len(_levels(make_probes(0, 200))[4]) == 200


def test_bundled_files_are_package_data():
    licence = (DATA / "gsm8k_LICENSE.txt").read_text(encoding="utf-8")
    assert licence.startswith("MIT License") and "OpenAI" in licence
    text = (DATA / "tinyshakespeare_60k.txt").read_text(encoding="utf-8")
    assert len(text) == 60_000 and text.startswith("First Citizen:")
    assert (DATA / "README.md").is_file()


# --- first divergence ---------------------------------------------------------------------------------------------

_IDS = st.lists(st.integers(0, 50_000), max_size=40)


@given(ids=_IDS)
def test_first_divergence_equal(ids):
    assert first_divergence(ids, list(ids)) is None
    assert first_divergence(np.array(ids, dtype=np.int64), tuple(ids)) is None


@given(ids=_IDS, more=st.lists(st.integers(0, 50_000), min_size=1, max_size=10))
def test_first_divergence_prefix(ids, more):
    assert first_divergence(ids, ids + more) == len(ids)
    assert first_divergence(ids + more, ids) == len(ids)


@given(data=st.data(), ids=st.lists(st.integers(0, 50_000), min_size=1, max_size=40))
def test_first_divergence_first_difference(data, ids):
    i = data.draw(st.integers(0, len(ids) - 1))
    other = list(ids)
    other[i] = ids[i] + data.draw(st.integers(1, 10))
    # later positions may differ too; the first difference is what counts
    for j in range(i + 1, len(ids)):
        other[j] = data.draw(st.integers(0, 50_000))
    assert first_divergence(ids, other) == i
    assert first_divergence(np.asarray(other), np.asarray(ids)) == i


@given(a=_IDS, b=_IDS)
def test_first_divergence_definition(a, b):
    d = first_divergence(a, b)
    if d is None:
        assert a == b
    else:
        assert a[:d] == b[:d]
        assert d == min(len(a), len(b)) or a[d] != b[d]
        assert a != b
