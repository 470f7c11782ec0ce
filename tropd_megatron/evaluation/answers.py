"""Final-answer extraction and grading for math reasoning outputs (MATH/AIME/GSM8K style).

Equivalence is Hugging Face's math-verify (``math_verify.parse`` and ``verify``): the reference
and the extracted answer are each read as LaTeX into sympy and compared, so "0.5", "1/2",
"\\dfrac{1}{2}" and "\\boxed{\\frac12}" match, as do "x^2+2x+1" and "(x+1)^2", "\\{1,2\\}" and
"\\{2,1\\}", "x = 5" and "5", "50\\%" and "0.5", "5\\text{ cm}" and "5"; intervals keep their
brackets, tuples their order, and floats compare to 6 decimal places ("0.333333" matches 1/3,
"0.333" does not).

The hand-written parts, each for something math-verify does not do:

- ``extract_answer`` picks the final answer out of a reasoning trace: the last ``\\boxed{}``,
  else the last "answer is" / "answer:" / "####" phrase, else the last number. math-verify's own
  extraction does not know GSM8K's (and the built-in task's) "####" marker (it grades
  "#### 7\\nThe numbers 3 and 4" as 4) and merges every ``\\boxed{}`` of a trace that corrects
  itself into one set; the extracted string also goes into the results file as written.
- ``_parse`` wraps each answer in ``\\boxed{}`` (math-verify reads LaTeX only inside a math
  environment: it finds nothing in a bare "\\sqrt{2}" or "(1, 2)") after three rewrites:
  ``_clean`` (outer "$", a final "."; math-verify cannot read "4."), "°" as "^\\circ" (it
  reads only the LaTeX degree), and ``_DIGIT_GAP``: digits split only by spaces ("10 000",
  "10\\,000") are one number, as in thousands grouping, where math-verify reads juxtaposed
  numbers as a mixed number and adds them ("1 234" is 235, "10\\,000" is 10*0 = 0).
- ``_timeout``: math-verify's timeouts use SIGALRM, which only the main thread may set (it
  raises elsewhere); off it they are off. Worker processes (fork, spawn, forkserver) run in
  their own main thread and keep them. math-verify's ``alarm(0)`` also cancels a timer its
  caller armed (pytest-timeout's, for one), so what is left of that timer is re-armed.
"""
from __future__ import annotations

import re
import signal
import threading
import time
from contextlib import contextmanager
from functools import lru_cache

from math_verify import LatexExtractionConfig, parse, verify

_BOXED = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_PHRASE = re.compile(r"\banswer\s*(?:is\b\s*:?|:)|####", re.IGNORECASE)
_NUMBER = re.compile(
    r"(?:(?<![\w)\]}])-)?"  # a minus directly after an operand is subtraction, not a sign
    r"(?:\d+/\d+|(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|\.\d+)"
)
_DIGIT_GAP = re.compile(r"(?<=\d)(?:\s|\\[,!;: ])+(?=\d)")
_LATEX = [LatexExtractionConfig()]
TIMEOUT_S = 5  # math-verify's default, per parse and per comparison


def _clean(s: str) -> str:
    prev = None
    while s != prev:
        prev, s = s, s.strip().strip("$").rstrip(".")
    return s


def _last_boxed(text: str) -> str | None:
    for m in reversed(list(_BOXED.finditer(text))):
        i = m.end()
        while i < len(text) and text[i].isspace():
            i += 1
        if i < len(text) and text[i] == "{":
            depth, content = 0, None
            for j in range(i, len(text)):
                depth += {"{": 1, "}": -1}.get(text[j], 0)
                if depth == 0:
                    content = text[i + 1 : j]
                    break
            if content is None:  # unbalanced: try an earlier \boxed
                continue
        else:  # "\boxed 5"
            token = re.match(r"[^\s$]*", text[i:])
            content = token.group()
        content = _clean(content)
        if content:
            return content
    return None


def _phrase_answer(text: str) -> str | None:
    for m in reversed(list(_PHRASE.finditer(text))):
        rest = text[m.end() :].split("\n", 1)[0].strip()
        math = re.match(r"\$+(.+?)\$", rest)
        if math:
            rest = math.group(1)
        else:
            rest = re.split(r"\.(?:\s|$)", rest)[0]  # end of sentence; keeps "3.5"
        rest = _clean(rest)
        if rest:
            return rest
    return None


def extract_answer(text: str) -> str | None:
    """Final answer: last \\boxed{...}, else last answer phrase, else last number; None if none."""
    answer = _last_boxed(text) or _phrase_answer(text)
    if answer:
        return answer
    numbers = _NUMBER.findall(text)
    return _clean(numbers[-1]) if numbers else None


@contextmanager
def _timeout():
    """math-verify's timeout for this thread: TIMEOUT_S on the main thread, else None (no
    SIGALRM there). Re-arms afterwards what was left of a real-time timer the caller had set."""
    if threading.current_thread() is not threading.main_thread():
        yield None
        return
    left, interval = signal.getitimer(signal.ITIMER_REAL)
    start = time.monotonic()
    try:
        yield TIMEOUT_S
    finally:
        if left:  # a timer that ran out meanwhile fires now
            signal.setitimer(signal.ITIMER_REAL, max(left - (time.monotonic() - start), 1e-6), interval)


@lru_cache(maxsize=4096)  # references recur n times, and short answers recur across problems
def _parse(answer: str, timeout: int | None) -> tuple:
    answer = _DIGIT_GAP.sub("", _clean(answer).replace("°", "^{\\circ}"))
    return tuple(parse("\\boxed{" + answer + "}", _LATEX, parsing_timeout=timeout))


def answers_match(predicted: str | None, reference: str) -> bool:
    """Whether the extracted answer ``predicted`` equals ``reference`` by math-verify (False for
    None or empty; answers that do not parse as LaTeX compare as their normalized strings)."""
    if predicted is None:
        return False
    with _timeout() as timeout:
        return verify(list(_parse(reference, timeout)), list(_parse(predicted, timeout)), timeout_seconds=timeout)


def score(predictions: list[str], reference: str) -> float:
    """avg@n for one problem: share of outputs whose extracted answer matches the reference."""
    if not predictions:
        raise ValueError("score needs at least one prediction")
    hits = sum(answers_match(extract_answer(text), reference) for text in predictions)
    return hits / len(predictions)
