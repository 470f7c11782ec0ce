"""Answer extraction and checking for math benchmarks (tropd_megatron.evaluation.answers)."""
from fractions import Fraction

import pytest

from tropd_megatron.evaluation.answers import (
    answers_match,
    extract_answer,
    normalize_answer,
    parse_number,
    score,
)

EXTRACT_CASES = [
    # \boxed, highest priority
    (r"So the result is \boxed{42}.", "42"),
    (r"$\boxed{\frac{1}{2}}$", r"\frac{1}{2}"),
    (r"\boxed{\sqrt{\frac{a}{b^{2}}}} done", r"\sqrt{\frac{a}{b^{2}}}"),
    (r"First \boxed{1}, then corrected: \boxed{2}", "2"),
    (r"The answer is 4. Actually \boxed{3}", "3"),
    (r"\boxed{3}. So the answer is 4.", "3"),
    (r"Hence $\boxed 5$.", "5"),
    (r"\boxed{x = 7}", "x = 7"),
    (r"\boxed{3 and then the answer is 9", "9"),  # unbalanced \boxed falls through
    (r"We get 5. \boxed{}", "5"),  # empty \boxed falls through
    # final-answer phrases, case-insensitive, last occurrence
    ("The answer is 17.", "17"),
    (r"ANSWER: $\frac{3}{4}$", r"\frac{3}{4}"),
    ("work...\n#### 1,234", "1,234"),
    ("The answer is 3. Wait, no: the answer is 5.", "5"),
    ("The final answer is: 8", "8"),
    ("Answer: x = 2\nExplanation: 2 + 3 = 5", "x = 2"),
    ("The answer is 3.5. It has 2 digits", "3.5"),
    # last number
    ("I get 3 apples and 7 pears", "7"),
    ("the result is -4", "-4"),
    ("in total 1,234 dollars", "1,234"),
    ("a ratio of 3/4 overall", "3/4"),
    ("it costs 2.50.", "2.50"),
    ("roughly .5 of it", ".5"),
    ("compute 5-3", "3"),  # subtraction, not a negative number
    # nothing found
    ("I don't know", None),
    ("", None),
    (r"\boxed{}", None),
]


@pytest.mark.parametrize("text,expected", EXTRACT_CASES)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


NORMALIZE_CASES = [
    ("$5$", "5"),
    (r"\$5", "5"),
    (r"\left( 1, 2 \right)", "(1,2)"),
    (r"a \rightarrow b", r"a\rightarrowb"),  # \right removal does not eat \rightarrow
    (r"10\!000", "10000"),
    (r"5\text{ cm}", "5cm"),
    (r"\text{(A)}", "(A)"),
    ("4.", "4"),
    (r"\dfrac{1}{2}", r"\frac{1}{2}"),
    (r"\tfrac12", r"\frac12"),
    (r"90^\circ", "90"),
    (r"90^{\circ}", "90"),
    ("90°", "90"),
    ("x = 5", "5"),
    (r"y=\frac{1}{2}", r"\frac{1}{2}"),
    ("1,234", "1234"),
    ("-1,234,567.5", "-1234567.5"),
    ("1,2", "1,2"),  # not a thousands grouping: a list
    ("(1,234)", "(1,234)"),  # inside brackets commas separate elements
    (r"50\%", "50%"),
]


@pytest.mark.parametrize("ans,expected", NORMALIZE_CASES)
def test_normalize_answer(ans, expected):
    assert normalize_answer(ans) == expected


PARSE_CASES = [
    ("42", Fraction(42)),
    ("-7", Fraction(-7)),
    ("2.50", Fraction(5, 2)),
    ("-2.50", Fraction(-5, 2)),
    (".5", Fraction(1, 2)),
    ("3/4", Fraction(3, 4)),
    ("-3/4", Fraction(-3, 4)),
    (r"\frac{1}{2}", Fraction(1, 2)),
    (r"\dfrac{3}{6}", Fraction(1, 2)),
    (r"\frac12", Fraction(1, 2)),
    (r"\frac 34", Fraction(3, 4)),
    (r"-\frac{1}{2}", Fraction(-1, 2)),
    (r"\frac{-1}{2}", Fraction(-1, 2)),
    ("1,234", Fraction(1234)),
    ("x = 5", Fraction(5)),
    ("0.333", Fraction(333, 1000)),
    (r"50\%", None),  # percentages are deliberately not converted
    (r"\frac{1}{0}", None),
    ("1/0", None),
    (r"\frac123", None),  # \frac ab form is single digits only
    (r"\sqrt{2}", None),
    ("1e5", None),
    ("1,2", None),
    ("abc", None),
    ("", None),
]


@pytest.mark.parametrize("ans,expected", PARSE_CASES)
def test_parse_number(ans, expected):
    assert parse_number(ans) == expected


MATCH_CASES = [
    ("1/2", "2/4", True),
    ("0.5", r"\frac{1}{2}", True),
    (r"\dfrac{1}{2}", r"\frac12", True),
    ("5.0", "5", True),
    ("x = 5", "5", True),
    ("$5$", "5", True),
    ("1,234", "1234", True),
    (r"90^\circ", "90", True),
    (r"\sqrt{2}", r"\sqrt{2}", True),
    ("(1, 2)", "(1,2)", True),
    (r"\left(1,2\right)", "(1,2)", True),
    (r"(0.5, 3)", r"(\frac{1}{2}, 3)", True),
    ("1, 2", "1,2", True),
    (r"[1, \frac{3}{2})", "[1, 1.5)", True),
    ("(1,2),(3,4)", "(1, 2), (3, 4)", True),
    (None, "5", False),
    ("", "5", False),
    ("4", "5", False),
    ("0.333", "1/3", False),  # exact comparison, no tolerance
    ("12", "1,2", False),  # "1,2" is a two-element list, not twelve
    ("(1,2)", "(2,1)", False),  # order matters
    ("(1,2)", "[1,2]", False),  # open vs closed interval
    ("(1,2)", "1,2", False),  # delimiters must agree
    ("(1,2)", "(1,2,3)", False),
    ("(1,2),(3,4)", "(1,2),(3,5)", False),
    (r"50\%", "0.5", False),
    (r"5\text{ cm}", "5", False),  # units are kept, only the \text wrapper goes
    (r"\sqrt{2}", r"\sqrt{3}", False),
    ("x=5", "y=6", False),
]


@pytest.mark.parametrize("predicted,reference,expected", MATCH_CASES)
def test_answers_match(predicted, reference, expected):
    assert answers_match(predicted, reference) is expected


SCORE_CASES = [
    ([r"\boxed{\dfrac{1}{2}}", "The answer is 0.5.", r"\boxed{1/3}", "no idea"], "1/2", 0.5),
    (["#### 7", r"so $\boxed{7}$", "Answer: 7", "I end with 7"], "7", 1.0),
    (["#### 8", r"\boxed{6}", "answer is 9", "nothing"], "7", 0.0),
    ([r"\boxed{(1, 2)}", r"\boxed{(2, 1)}", "We get 3 and the answer is 4."], "(1,2)", 1 / 3),
]


@pytest.mark.parametrize("predictions,reference,expected", SCORE_CASES)
def test_score(predictions, reference, expected):
    assert score(predictions, reference) == pytest.approx(expected)


def test_score_rejects_no_predictions():
    with pytest.raises(ValueError):
        score([], "1")
