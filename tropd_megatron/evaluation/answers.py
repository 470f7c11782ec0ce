"""Final-answer extraction and checking for math reasoning outputs (MATH/AIME style).

Standard library only. Numbers compare exactly (``fractions.Fraction``), so "0.5", "1/2" and
"\\frac{1}{2}" match, while "0.333" and "1/3" do not.
"""
from __future__ import annotations

import re
from fractions import Fraction

_BOXED = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_PHRASE = re.compile(r"\banswer\s*(?:is\b\s*:?|:)|####", re.IGNORECASE)
_NUMBER = re.compile(
    r"(?:(?<![\w)\]}])-)?"  # a minus directly after an operand is subtraction, not a sign
    r"(?:\d+/\d+|(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|\.\d+)"
)
_WRAPPER = re.compile(r"\\(?:text|textbf|textrm|mathrm|mbox)\s*\{([^{}]*)\}")
_THOUSANDS = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_DECIMAL = r"[+-]?(?:\d+(?:\.\d+)?|\.\d+)"
_FRAC_ARG = r"(\{[^{}]*\}|\d)"  # \frac{12}{5} or \frac12 (single digits only)
_OPEN, _CLOSE = "([{", ")]}"


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


def normalize_answer(ans: str) -> str:
    """Canonical string form of an answer, for exact string comparison."""
    s = _WRAPPER.sub(r"\1", ans)
    s = re.sub(r"\\(?:left|right)(?![A-Za-z])", "", s)
    s = re.sub(r"\\[!,;: ]", "", s)
    s = re.sub(r"\\[dt]frac(?![A-Za-z])", r"\\frac", s)
    s = re.sub(r"\^\s*(?:\{\s*\\circ\s*\}|\\circ)|°", "", s)
    s = s.replace("\\$", "").replace("$", "").replace("\\%", "%")
    s = re.sub(r"\s+", "", s).rstrip(".")
    s = re.sub(r"^[A-Za-z]=", "", s)
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    return s


def _plain_number(s: str) -> Fraction | None:
    return Fraction(s) if re.fullmatch(_DECIMAL, s) else None


def _ratio(num: Fraction | None, den: Fraction | None) -> Fraction | None:
    if num is None or den is None or den == 0:
        return None
    return num / den


def parse_number(ans: str) -> Fraction | None:
    """Exact value of an integer, decimal, a/b or \\frac; None otherwise (percentages too)."""
    s = normalize_answer(ans)
    m = re.fullmatch(rf"(-?)\\frac{_FRAC_ARG}{_FRAC_ARG}", s)
    if m:
        value = _ratio(_plain_number(m[2].strip("{}")), _plain_number(m[3].strip("{}")))
        return -value if value is not None and m[1] else value
    m = re.fullmatch(rf"({_DECIMAL})/({_DECIMAL})", s)
    if m:
        return _ratio(_plain_number(m[1]), _plain_number(m[2]))
    return _plain_number(s)


def _encloses(s: str) -> bool:
    depth = 0
    for c in s[:-1]:
        depth += (c in _OPEN) - (c in _CLOSE)
        if depth == 0:
            return False
    return True


def _split_tuple(s: str) -> tuple[str, list[str]] | None:
    """(delimiters, elements) for "(a,b)", "[a,b)", "a,b"; None for a single element."""
    delims = ""
    if len(s) >= 2 and s[0] in "([" and s[-1] in ")]" and _encloses(s):
        delims, s = s[0] + s[-1], s[1:-1]
    items, depth, start = [], 0, 0
    for i, c in enumerate(s):
        depth += (c in _OPEN) - (c in _CLOSE)
        if c == "," and depth == 0:
            items.append(s[start:i])
            start = i + 1
    items.append(s[start:])
    return (delims, items) if len(items) > 1 else None


def answers_match(predicted: str | None, reference: str) -> bool:
    """Equal normalized strings, equal exact numbers, or element-wise equal tuples/intervals."""
    if predicted is None:
        return False
    p, r = normalize_answer(predicted), normalize_answer(reference)
    if not p or not r:
        return False
    if p == r:
        return True
    p_num, r_num = parse_number(p), parse_number(r)
    if p_num is not None and r_num is not None:
        return p_num == r_num
    p_tup, r_tup = _split_tuple(p), _split_tuple(r)
    # Delimiters must agree: (1,2) vs [1,2] are different intervals, (1,2) vs 1,2 point vs list.
    if p_tup and r_tup and p_tup[0] == r_tup[0] and len(p_tup[1]) == len(r_tup[1]):
        return all(answers_match(a, b) for a, b in zip(p_tup[1], r_tup[1]))
    return False


def score(predictions: list[str], reference: str) -> float:
    """avg@n for one problem: share of outputs whose extracted answer matches the reference."""
    if not predictions:
        raise ValueError("score needs at least one prediction")
    hits = sum(answers_match(extract_answer(text), reference) for text in predictions)
    return hits / len(predictions)
