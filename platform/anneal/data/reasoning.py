"""The built-in `builtin://reasoning` task: seeded multi-step arithmetic word problems."""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass, field

REASONING_ON_PROMPT = "detailed thinking on"
REASONING_OFF_PROMPT = "detailed thinking off"
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"

MIN_DIFFICULTY = 1
MAX_DIFFICULTY = 5

#: Splits the built-in task can be drawn from, and which of ten hash buckets each owns.
#: With ``holdout="problem"`` (the default) a problem's bucket comes from its question text, so
#: no eval question is ever trained on, while arithmetic facts recur across splits (a tiny model
#: can learn the task on a CPU in minutes). With ``holdout="arithmetic"`` the bucket comes from
#: the numbers and operations alone, so an eval problem is never a reworded train problem: the
#: harder test of generalising arithmetic to unseen facts.
SPLIT_BUCKETS: dict[str, frozenset[int]] = {
    "train": frozenset(range(8)),
    "eval": frozenset({8}),
    "test": frozenset({9}),
}
SPLIT_ALIASES = {"validation": "eval", "valid": "eval", "dev": "eval"}

_NAMES = [
    ("Ana", "She", "she"), ("Ben", "He", "he"), ("Chen", "He", "he"), ("Dara", "She", "she"),
    ("Eli", "He", "he"), ("Fatima", "She", "she"), ("Gus", "He", "he"), ("Hana", "She", "she"),
    ("Ivan", "He", "he"), ("Jade", "She", "she"), ("Kofi", "He", "he"), ("Lena", "She", "she"),
]
_ITEMS = ["apples", "marbles", "books", "coins", "stickers", "pencils", "cookies", "shells",
          "cards", "stamps", "eggs", "beads"]
_ADD = ["buys {n} more", "finds {n} more", "gets {n} more", "receives {n} more"]
_SUB = ["gives away {n}", "loses {n}", "uses {n}", "sells {n}"]
_MUL = {2: ["doubles them", "ends up with 2 times as many"],
        3: ["triples them", "ends up with 3 times as many"]}

#: The built-in task's `Answer: N`, and GSM8K's `#### N` (thousands separators allowed there).
_ANSWER_RE = re.compile(r"(?:Answer:|####)\s*(-?[\d,]*\d)")


@dataclass(frozen=True)
class Problem:
    """One word problem with its worked steps and checkable answer."""

    id: str
    question: str
    steps: list[str] = field(hash=False)
    answer: int
    difficulty: int


def normalize_split(split: str) -> str:
    """Map a split name (or alias such as `validation`) onto `train`, `eval` or `test`.

    Args:
        split: the requested split name.

    Returns:
        The canonical split name.
    """
    name = SPLIT_ALIASES.get(split, split)
    if name not in SPLIT_BUCKETS:
        raise ValueError(
            f"unknown split {split!r} for the built-in reasoning task; "
            f"use one of {sorted(SPLIT_BUCKETS)} (or 'validation' for 'eval')"
        )
    return name


HOLDOUTS = ("problem", "arithmetic")


def _bucket(signature: str) -> int:
    return int.from_bytes(hashlib.sha256(signature.encode()).digest()[:8], "big") % 10


def _arithmetic(start: int, ops: list[tuple[str, int]]) -> str:
    return f"{start}|" + "|".join(f"{op}{n}" for op, n in ops)


def _draw(rng: random.Random, difficulty: int) -> tuple[int, list[tuple[str, int]]]:
    start = rng.randint(2, 20)
    value = start
    ops: list[tuple[str, int]] = []
    for _ in range(difficulty):
        choices = ["+"]
        if value >= 2:
            choices.append("-")
        if value <= 30:
            choices.append("×")
        op = rng.choice(choices)
        if op == "+":
            n = rng.randint(1, 20)
            value += n
        elif op == "-":
            n = rng.randint(1, min(20, value - 1))
            value -= n
        else:
            n = rng.choice([2, 3])
            value *= n
        ops.append((op, n))
    return start, ops


def _render(pid: str, rng: random.Random, start: int, ops: list[tuple[str, int]],
            difficulty: int) -> Problem:
    name, pronoun_cap, pronoun = rng.choice(_NAMES)
    item = rng.choice(_ITEMS)
    clauses, steps = [], []
    value = start
    for op, n in ops:
        if op == "+":
            clauses.append(rng.choice(_ADD).format(n=n))
            new = value + n
        elif op == "-":
            clauses.append(rng.choice(_SUB).format(n=n))
            new = value - n
        else:
            clauses.append(rng.choice(_MUL[n]))
            new = value * n
        steps.append(f"{value} {op} {n} = {new}")
        value = new
    question = (
        f"{name} has {start} {item}. {pronoun_cap} {', then '.join(clauses)}. "
        f"How many {item} does {pronoun} have?"
    )
    return Problem(id=pid, question=question, steps=steps, answer=value, difficulty=difficulty)


def generate(n: int, seed: int = 0, difficulty: int = 2, split: str | None = None,
             holdout: str = "problem") -> list[Problem]:
    """Generate word problems deterministically.

    Problem `i` depends only on (`seed`, `difficulty`, `split`, `i`), never on `n`, so a
    larger `n` extends a smaller one.

    Args:
        n: number of problems (>= 0).
        seed: base seed.
        difficulty: number of arithmetic steps, 1..5.
        split: `train`, `eval` or `test` to draw only problems that belong to that split
            (the three are disjoint); None draws from all of them.
        holdout: what the splits keep apart: `problem` (question texts) or `arithmetic`
            (the numbers and operations; see SPLIT_BUCKETS).

    Returns:
        `n` problems.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not MIN_DIFFICULTY <= difficulty <= MAX_DIFFICULTY:
        raise ValueError(
            f"difficulty must be {MIN_DIFFICULTY}..{MAX_DIFFICULTY} (the number of steps), "
            f"got {difficulty}"
        )
    if holdout not in HOLDOUTS:
        raise ValueError(f"holdout must be one of {list(HOLDOUTS)}, got {holdout!r}")
    buckets = SPLIT_BUCKETS[normalize_split(split)] if split is not None else None
    tag = split if split is None else normalize_split(split)
    problems = []
    for i in range(n):
        # A string seed is hashed with SHA-512 by `random`, so it is stable across runs.
        rng = random.Random(f"reasoning:{seed}:{difficulty}:{tag}:{i}")
        pid = f"reasoning-d{difficulty}-s{seed}-{tag or 'all'}-{i}"
        while True:
            start, ops = _draw(rng, difficulty)
            if buckets is not None and holdout == "arithmetic" and _bucket(_arithmetic(start, ops)) not in buckets:
                continue
            problem = _render(pid, rng, start, ops, difficulty)
            if buckets is None or holdout == "arithmetic" or _bucket(problem.question) in buckets:
                break
        problems.append(problem)
    return problems


def system_prompt(reasoning: bool) -> str:
    """The system prompt that switches reasoning on or off.

    Args:
        reasoning: whether the answer should show its thinking.

    Returns:
        `REASONING_ON_PROMPT` or `REASONING_OFF_PROMPT`.
    """
    return REASONING_ON_PROMPT if reasoning else REASONING_OFF_PROMPT


def render_messages(problem: Problem, reasoning: bool) -> list[dict[str, str]]:
    """The chat messages asking a problem: the reasoning system prompt, then the question.

    Args:
        problem: the problem to ask.
        reasoning: whether to ask for detailed thinking.

    Returns:
        `[{"role": "system", ...}, {"role": "user", ...}]`.
    """
    return [
        {"role": "system", "content": system_prompt(reasoning)},
        {"role": "user", "content": problem.question},
    ]


def render_completion(problem: Problem, reasoning: bool) -> str:
    """The reference answer: worked steps inside `<think>` markers when reasoning is on.

    Args:
        problem: the problem answered.
        reasoning: whether to show the steps.

    Returns:
        `"<think>\\n5 + 3 = 8\\n</think>\\nAnswer: 8"` (on) or `"Answer: 8"` (off).
    """
    if reasoning:
        body = "\n".join(problem.steps)
        return f"{THINK_OPEN}\n{body}\n{THINK_CLOSE}\nAnswer: {problem.answer}"
    return f"Answer: {problem.answer}"


def extract_answer(text: str) -> int | None:
    """The integer of the last `Answer: N` (or GSM8K-style `#### N`) in a model's output.

    Args:
        text: generated text.

    Returns:
        The answer, or None when the text has neither.
    """
    matches = _ANSWER_RE.findall(text)
    return int(matches[-1].replace(",", "")) if matches else None


def check_answer(text: str, answer: int) -> bool:
    """Whether a model's output states exactly the expected answer.

    Args:
        text: generated text.
        answer: the expected integer.

    Returns:
        True when the last `Answer: N` equals `answer`.
    """
    return extract_answer(text) == answer
