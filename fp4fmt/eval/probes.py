"""The crack-hunt probe suite: graded math prompts with exact numeric answers, and their scorer.

Four levels of growing difficulty: 1 single-digit arithmetic, 2 multi-digit arithmetic, 3 templated
multi-step word problems (all three generated from a seed), 4 GSM8K test problems (from the slice bundled in
``data/``). A model's generation is scored by extracting one number from it (:func:`extract_answer`) and
comparing it exactly with the probe's answer (:func:`score`). Standard library only.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from importlib import resources

from ..errors import FP4FmtError

LEVEL_NAMES: dict[int, str] = {
    1: "single-digit arithmetic",
    2: "multi-digit arithmetic",
    3: "multi-step word problems",
    4: "GSM8K",
}

GSM8K_FILE = "gsm8k_test_200.jsonl"  # in this package's data/ folder

_CANONICAL = re.compile(r"-?\d+(?:\.\d+)?")


@dataclass(frozen=True)
class Probe:
    """One question with its canonical numeric answer ("42", "-7", "3.5": no commas, units or trailing zeros).

    ``steps``: a reference solution, one line a step (level 3: ``"a op b = c"`` lines; level 4: GSM8K's
    worked solution without its ``<<...>>`` calculator notes; empty for levels 1 and 2).
    """

    id: str
    level: int
    level_name: str
    question: str
    answer: str
    steps: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.level not in LEVEL_NAMES:
            raise FP4FmtError(f"probe {self.id!r}: level {self.level!r} is not one of {sorted(LEVEL_NAMES)}")
        if not isinstance(self.answer, str) or not _CANONICAL.fullmatch(self.answer):
            raise FP4FmtError(f"probe {self.id!r}: answer {self.answer!r} is not a plain number such as 42, -7 or 3.5")


# --- answer extraction ------------------------------------------------------------------------------------------

# A number as models write it: optional sign (ASCII or U+2212) before or after "$", thousands commas, decimals.
# Not inside a word ("x2") nor right after a decimal point; "16-3" reads as 16 and 3, "= -3" as -3.
_NUMBER = re.compile(
    r"(?<![\w.])(?P<neg>[-\u2212])?\$?(?P<neg2>(?<=\$)[-\u2212])?"
    r"(?P<int>\d{1,3}(?:,\d{3}(?!\d))+|\d+)(?P<frac>\.\d+)?"
)
# Where a model states its final answer. "####" counts only before a number (not a markdown heading).
_MARKER = re.compile(
    r"(?P<boxed>\\?boxed\s*\{)"
    r"|####(?=[ \t]*[-\u2212]?\$?[-\u2212]?\d)"
    r"|\banswer\b[\s*_]*(?:\bis\b|\bwas\b|\bwould\s+be\b|\bwill\s+be\b|\bequals\b|:|=)",
    re.IGNORECASE,
)
_SENTENCE_END = re.compile(r"[.!?;](?=\s|$)")


def _canonical(match: re.Match[str]) -> str:
    value = Decimal(match["int"].replace(",", "") + (match["frac"] or ""))
    if match["neg"] or match["neg2"]:
        value = -value
    if value == value.to_integral_value():
        return str(int(value))  # also turns -0 into 0
    return format(value.normalize(), "f")


def _boxed_content(text: str, start: int) -> str:
    """The text from ``start`` up to the brace that closes the ``{`` just before it (or the end of the line)."""
    depth = 1
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start:i]
    return text[start:].split("\n", 1)[0]


def _number_in_statement(statement: str) -> str | None:
    """The number a final-answer statement gives: the first one after its last "=", else its first one."""
    tail = statement.rsplit("=", 1)[-1] if "=" in statement else statement
    match = _NUMBER.search(tail) or _NUMBER.search(statement)
    return _canonical(match) if match else None


def extract_answer(text: str) -> str | None:
    """The final numeric answer of a model generation in canonical form ("1,234" -> "1234", "$3.50." -> "3.5").

    The last stated answer wins: ``Answer: X``, ``the answer is X``, ``#### X`` or ``\\boxed{X}`` (for the
    statement "Answer: 16 - 4 = 12" the number after the last "="); a statement without a number is passed
    over. Without any, the last number of the text. Currency signs, thousands commas, units and percent signs
    are dropped; fractions ("3/4") and numbers in words are not understood. None when the text has no number.
    """
    for marker in reversed(list(_MARKER.finditer(text))):
        if marker["boxed"]:
            statement = _boxed_content(text, marker.end())
        else:
            statement = text[marker.end():].lstrip().split("\n", 1)[0]
            end = _SENTENCE_END.search(statement)
            statement = statement[: end.start()] if end else statement
        answer = _number_in_statement(statement)
        if answer is not None:
            return answer
    numbers = list(_NUMBER.finditer(text))
    return _canonical(numbers[-1]) if numbers else None


def score(probe: Probe, generation: str) -> bool:
    """True when the answer extracted from ``generation`` equals ``probe.answer`` as an exact decimal number."""
    extracted = extract_answer(generation)
    return extracted is not None and Decimal(extracted) == Decimal(probe.answer)


def first_divergence(baseline_ids: Sequence[int], variant_ids: Sequence[int]) -> int | None:
    """Index of the first token where two greedy generations differ; None when they are identical.

    When one is a proper prefix of the other, the length of the shorter. Elements are compared as ints, so
    numpy arrays and 1-D tensors work too.
    """
    for i, (a, b) in enumerate(zip(baseline_ids, variant_ids)):
        if int(a) != int(b):
            return i
    if len(baseline_ids) == len(variant_ids):
        return None
    return min(len(baseline_ids), len(variant_ids))


# --- prompts ------------------------------------------------------------------------------------------------------


def prompt_messages(probe: Probe) -> list[dict[str, str]]:
    """Chat messages (one user turn) for ``tokenizer.apply_chat_template``: the question plus the answer format."""
    content = f'{probe.question}\nSolve it step by step. End with a final line "Answer: <number>".'
    return [{"role": "user", "content": content}]


# --- levels 1 and 2: arithmetic -----------------------------------------------------------------------------------


def _step(a: int, op: str, b: int) -> tuple[str, int]:
    """One integer operation as the line "a op b = c", and c (division is only ever asked when exact)."""
    result = {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op]
    return f"{a} {op} {b} = {result}", result


def _arithmetic(level: int, index: int, a: int, op: str, b: int) -> Probe:
    question = f"What is {a} {op} {b}?"
    return Probe(f"L{level}-{index:03d}", level, LEVEL_NAMES[level], question, str(_step(a, op, b)[1]))


def _level1(rng: random.Random, count: int) -> list[Probe]:
    """a + b, a - b (never negative), a * b with single-digit a, b in 1..9; the operation cycles + - *."""
    probes = []
    for i in range(count):
        op = "+-*"[i % 3]
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        if op == "-" and a < b:
            a, b = b, a
        probes.append(_arithmetic(1, i, a, op, b))
    return probes


def _operand(rng: random.Random) -> int:
    """A 2-, 3- or 4-digit positive integer, the digit count drawn first (so short and long are equally likely)."""
    digits = rng.randint(2, 4)
    return rng.randint(10 ** (digits - 1), 10**digits - 1)


def _level2(rng: random.Random, count: int) -> list[Probe]:
    """2-4 digit operands; the operation cycles + - * /; a - b may be negative; a / b is exact (b has 2 digits)."""
    probes = []
    for i in range(count):
        op = "+-*/"[i % 4]
        if op == "/":
            b = rng.randint(10, 99)
            a = b * rng.randint(2, 9999 // b)  # a has 2-4 digits
        else:
            a, b = _operand(rng), _operand(rng)
        probes.append(_arithmetic(2, i, a, op, b))
    return probes


# --- level 3: templated word problems ------------------------------------------------------------------------------
# Each template draws its numbers and returns (question, steps, answer). Every step is "a op b = c" where a and b
# are numbers written in the question or results of earlier steps (no hidden constants), and the last result is the
# answer, a positive integer.

_NAMES = ("Maya", "Leo", "Priya", "Tom", "Aisha", "Ben", "Sofia", "Omar", "Lena", "Kenji", "Rosa", "Sam")
_Template = Callable[[random.Random], tuple[str, tuple[str, ...], int]]


def _change(rng: random.Random) -> tuple[str, tuple[str, ...], int]:
    name, n, price = rng.choice(_NAMES), rng.randint(2, 9), rng.randint(2, 12)
    s1, cost = _step(n, "*", price)
    bill = next(b for b in (10, 20, 50, 100, 200) if b > cost)
    s2, change = _step(bill, "-", cost)
    q = (f"{name} buys {n} notebooks that cost ${price} each and pays with a ${bill} bill. "
         f"How much change, in dollars, does {name} get back?")
    return q, (s1, s2), change


def _split_bill(rng: random.Random) -> tuple[str, tuple[str, ...], int]:
    friends, pizzas, price = rng.randint(2, 6), rng.randint(2, 6), rng.randint(8, 20)
    tip = (-pizzas * price) % friends + friends * rng.randint(1, 3)  # makes the total divisible by friends
    s1, food = _step(pizzas, "*", price)
    s2, total = _step(food, "+", tip)
    s3, each = _step(total, "/", friends)
    q = (f"{friends} friends order {pizzas} pizzas at ${price} each and add a tip of ${tip}. "
         f"They split the total cost equally. How many dollars does each friend pay?")
    return q, (s1, s2, s3), each


def _machine_rate(rng: random.Random) -> tuple[str, tuple[str, ...], int]:
    rate, morning, afternoon = rng.randint(3, 25), rng.randint(10, 60), rng.randint(10, 60)
    s1, minutes = _step(morning, "+", afternoon)
    s2, bottles = _step(rate, "*", minutes)
    q = (f"A machine fills {rate} bottles per minute. It runs for {morning} minutes in the morning and "
         f"{afternoon} minutes in the afternoon. How many bottles does it fill in total?")
    return q, (s1, s2), bottles


def _trip(rng: random.Random) -> tuple[str, tuple[str, ...], int]:
    v1, h1, v2, h2 = rng.randint(30, 90), rng.randint(2, 6), rng.randint(30, 90), rng.randint(2, 6)
    s1, d1 = _step(v1, "*", h1)
    s2, d2 = _step(v2, "*", h2)
    s3, total = _step(d1, "+", d2)
    q = (f"A train travels at {v1} km per hour for {h1} hours, then at {v2} km per hour for {h2} hours. "
         f"How many kilometers does it travel in total?")
    return q, (s1, s2, s3), total


def _savings(rng: random.Random) -> tuple[str, tuple[str, ...], int]:
    name, saved, earn, weeks = rng.choice(_NAMES), rng.randint(10, 100), rng.randint(15, 40), rng.randint(3, 10)
    spend = rng.randint(5, earn - 1)
    s1, net = _step(earn, "-", spend)
    s2, gained = _step(net, "*", weeks)
    s3, total = _step(saved, "+", gained)
    q = (f"{name} has ${saved} saved. Each week {name} earns ${earn} and spends ${spend}. "
         f"How many dollars will {name} have after {weeks} weeks?")
    return q, (s1, s2, s3), total


def _boxes(rng: random.Random) -> tuple[str, tuple[str, ...], int]:
    name, per_box = rng.choice(_NAMES), rng.randint(4, 12)
    cookies = per_box * rng.randint(5, 20)
    morning = rng.randint(2, cookies - 2)
    afternoon = cookies - morning
    s1, total = _step(morning, "+", afternoon)
    s2, boxes = _step(total, "/", per_box)
    q = (f"{name} bakes {morning} cookies in the morning and {afternoon} cookies in the afternoon, then packs "
         f"all of them into boxes of {per_box}. How many boxes does {name} fill?")
    return q, (s1, s2), boxes


def _ages(rng: random.Random) -> tuple[str, tuple[str, ...], int]:
    name, age, gap, times = rng.choice(_NAMES), rng.randint(3, 12), rng.randint(2, 6), rng.randint(2, 3)
    s1, brother = _step(age, "+", gap)
    s2, mother = _step(brother, "*", times)
    q = (f"{name} is {age} years old. {name}'s brother is {gap} years older, and their mother is {times} times "
         f"as old as the brother. How old is their mother?")
    return q, (s1, s2), mother


def _library(rng: random.Random) -> tuple[str, tuple[str, ...], int]:
    books, monday, tuesday, back = rng.randint(200, 900), rng.randint(10, 80), rng.randint(10, 80), rng.randint(5, 60)
    s1, after_monday = _step(books, "-", monday)
    s2, after_tuesday = _step(after_monday, "-", tuesday)
    s3, total = _step(after_tuesday, "+", back)
    q = (f"A library has {books} books. It lends out {monday} books on Monday and {tuesday} books on Tuesday, "
         f"and {back} books are returned on Wednesday. How many books are in the library now?")
    return q, (s1, s2, s3), total


_TEMPLATES: tuple[_Template, ...] = (_change, _split_bill, _machine_rate, _trip, _savings, _boxes, _ages, _library)


def _level3(rng: random.Random, count: int) -> list[Probe]:
    """Word problems of 2-3 operations; the templates come in a seeded order, each once before any repeats."""
    order = rng.sample(_TEMPLATES, len(_TEMPLATES))
    probes = []
    for i in range(count):
        question, steps, answer = order[i % len(order)](rng)
        probes.append(Probe(f"L3-{i:03d}", 3, LEVEL_NAMES[3], question, str(answer), steps))
    return probes


# --- level 4: GSM8K -------------------------------------------------------------------------------------------------

_CALCULATOR_NOTE = re.compile(r"<<[^>]*>>")


def load_gsm8k() -> list[Probe]:
    """Every problem of the bundled GSM8K slice, in file order, as level-4 probes with ids "gsm8k-NNNN" (line index).

    The answer is the number after "####" without its commas; ``steps`` are the solution's lines above it.
    """
    source = resources.files("fp4fmt.eval") / "data" / GSM8K_FILE
    probes = []
    for index, line in enumerate(source.read_text(encoding="utf-8").splitlines()):
        where = f"{GSM8K_FILE} line {index + 1}"
        try:
            record = json.loads(line)
            question, solution = record["question"], record["answer"]
        except (ValueError, KeyError, TypeError) as e:
            raise FP4FmtError(f"{where}: not a JSON object with 'question' and 'answer' ({e})", file=str(source)) from e
        reasoning, sep, final = solution.rpartition("####")
        number = _NUMBER.fullmatch(final.strip())
        if not sep or number is None:
            raise FP4FmtError(f"{where}: the answer does not end with '#### <number>'", file=str(source))
        steps = tuple(s.strip() for s in _CALCULATOR_NOTE.sub("", reasoning).splitlines() if s.strip())
        probes.append(Probe(f"gsm8k-{index:04d}", 4, LEVEL_NAMES[4], question, _canonical(number), steps))
    return probes


# --- the suite ------------------------------------------------------------------------------------------------------


def _rng(seed: int, level: int) -> random.Random:
    # One stream a level (changing per_level never reshuffles another level); a str seed is hashed with SHA-512,
    # so it is the same on every run and platform, and seeds -1 and 1 differ (int seeds use abs()).
    return random.Random(f"fp4fmt.eval.probes/{seed}/L{level}")


def make_probes(seed: int = 0, per_level: int = 10) -> list[Probe]:
    """``per_level`` probes of each level 1..4, level by level; the same seed gives the same list.

    Levels 1-3 are generated from the seed; level 4 is the first ``per_level`` problems of a seeded shuffle of
    the bundled GSM8K slice. Within a level, a smaller ``per_level`` gives a prefix of a larger one.
    """
    if not isinstance(per_level, int) or per_level < 0:
        raise FP4FmtError(f"per_level must be a non-negative integer, not {per_level!r}")
    gsm8k = load_gsm8k()
    if per_level > len(gsm8k):
        raise FP4FmtError(f"per_level {per_level} exceeds the {len(gsm8k)} bundled GSM8K problems", file=GSM8K_FILE)
    shuffled = list(gsm8k)
    _rng(seed, 4).shuffle(shuffled)
    return [
        *_level1(_rng(seed, 1), per_level),
        *_level2(_rng(seed, 2), per_level),
        *_level3(_rng(seed, 3), per_level),
        *shuffled[:per_level],
    ]
