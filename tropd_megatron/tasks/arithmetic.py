"""A synthetic, verifiable reasoning task: multi-step arithmetic with worked steps.

Problem:  "((12+7)*3)-5"   (parenthesised left to right)
Solution: "12+7=19, 19*3=57, 57-5=52 #### 52"
Each step applies one operation to the running value, so a model must carry intermediate
results; the final answer follows "####" and is checked exactly.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from .. import ConfigError

OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
ANSWER = re.compile(r"####\s*(-?\d+)")


@dataclass(frozen=True)
class Problem:
    question: str  # the expression, fully parenthesised left to right
    solution: str  # worked steps, then "#### answer"
    answer: int


@dataclass
class ArithmeticConfig:
    min_steps: int = 2
    max_steps: int = 3
    max_operand: int = 20
    max_multiplier: int = 9  # keeps intermediate values small
    ops: str = "+-*"  # the operations drawn from, each equally likely

    def __post_init__(self):
        if not self.ops or set(self.ops) - set(OPS):
            raise ConfigError(f"ArithmeticConfig ops={self.ops!r}: a non-empty string of {''.join(OPS)}")
        if not 1 <= self.min_steps <= self.max_steps:
            raise ConfigError(f"ArithmeticConfig steps: need 1 <= min_steps ({self.min_steps}) <= max_steps ({self.max_steps})")


def make_problem(rng: random.Random, config: ArithmeticConfig) -> Problem:
    value = rng.randint(1, config.max_operand)
    question, steps = str(value), []
    for i in range(rng.randint(config.min_steps, config.max_steps)):
        op = rng.choice(config.ops)
        operand = rng.randint(2, config.max_multiplier) if op == "*" else rng.randint(1, config.max_operand)
        result = OPS[op](value, operand)
        question = f"({question}){op}{operand}" if i else f"{question}{op}{operand}"
        steps.append(f"{value}{op}{operand}={result}")
        value = result
    return Problem(question, f"{', '.join(steps)} #### {value}", value)


def make_split(n: int, seed: int, config: ArithmeticConfig = ArithmeticConfig(), exclude=frozenset()) -> list[Problem]:
    """n distinct problems from ``seed``, none of whose questions is in ``exclude``."""
    rng, seen, out = random.Random(seed), set(exclude), []
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 100 * n + 1000:
            raise ConfigError(f"cannot draw {n} distinct problems with {config}")
        problem = make_problem(rng, config)
        if problem.question not in seen:
            seen.add(problem.question)
            out.append(problem)
    return out


def extract_final(text: str):
    """The integer after the last "####", or None."""
    found = ANSWER.findall(text)
    return int(found[-1]) if found else None


def is_correct(text: str, problem: Problem) -> bool:
    return extract_final(text) == problem.answer
