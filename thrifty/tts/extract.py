"""Final answers out of free-form model text, and a canonical form to vote on.

Tried in order, last occurrence first: `\\boxed{...}` (braces matched, so `\\boxed{\\frac{1}{2}}`
works), `#### N` (GSM8K style), "the answer is N" / "answer: N", then the last number.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from fractions import Fraction

_NUMBER = r"[-+−]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?|[-+−]?\.\d+"
_NUMBER_RE = re.compile(_NUMBER)
_ANSWER_IS_RE = re.compile(
    r"(?:final answer|the answer|answer)\s*(?:is|:|=)\s*:?\s*(.+)", re.IGNORECASE
)
_HASHES_RE = re.compile(r"####\s*(.+)")


def boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` (or `\\fbox{...}`), braces matched; None if none."""
    starts = [m.end() for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text)]
    for start in reversed(starts):
        depth = 1
        for i in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                return text[start:i].strip()
    return None


def _clean(answer: str) -> str:
    """Trim what surrounds an answer in prose: markdown, dollars, a trailing full stop, units."""
    a = answer.strip()
    a = re.sub(r"^\\[(\[]|\\[)\]]$", "", a).strip()  # \( 42 \) and \[ 42 \]
    a = re.sub(r"^\**|\**$", "", a).strip()  # **42**
    a = a.strip("$` ").replace("\\$", "").replace("\\!", "")
    a = re.sub(r"\\text\{\s*[a-zA-Z ]*\}$", "", a).strip()  # trailing \text{ units}
    a = re.sub(r"\\(?:left|right|displaystyle)", "", a)
    a = a.rstrip(".;,! ").strip()
    return re.sub(r"(?<!\\)\\$", "", a).strip()  # "-131\\" of a "\\)" cut off


def _leading_answer(rest: str) -> str | None:
    """What follows "the answer is": a boxed expression, a number, else the first clause."""
    rest = rest.strip()
    if (b := boxed(rest)) is not None:
        return b
    if re.search(r"\\(?:boxed|fbox)\b", rest):
        return None  # "The answer is \\boxed{-4" cut off: the box never closed
    # the first line with something in it: "The answer is:\n\\[ 5 \\]" puts it on the next
    lines = [x for x in rest.splitlines() if any(ch.isalnum() for ch in x)]
    first_line = lines[0] if lines else ""
    line = first_line.lstrip("*$ \\([")
    m = _NUMBER_RE.match(line)
    # "3.5 apples" is the number with a unit; "3x + 1" or "2^3" is an expression.
    if m and not re.match(r"[a-zA-Z(^*/\\]|\s*[-+*/^=]", line[m.end() :]):
        return m.group(0)
    clause = re.split(r"[.;](?!\d)|,(?!\d{3})|\s(?:because|since|which|so)\s", first_line)[0]
    clause = clause.rsplit("=", 1)[-1]  # "2 + 3 = 5": the result
    return _clean(clause) or None


def extract_answer(text: str, *, last_number: bool = True) -> str | None:
    """The final answer in `text` as a cleaned string, or None if there is none.

    `last_number=False` drops the last-number fallback: for a text cut off at max_tokens, whose
    last number is a step of unfinished working, not an answer.
    """
    answer = _extract(text, last_number)
    # "The answer is \\(" cut off: punctuation alone is no answer
    return answer if answer and any(ch.isalnum() for ch in answer) else None


def _extract(text: str, last_number: bool) -> str | None:
    if (b := boxed(text)) is not None:
        return _clean(b)
    if hashes := _HASHES_RE.findall(text):
        return _leading_answer(hashes[-1])
    said = _ANSWER_IS_RE.findall(text)
    if said and (a := _leading_answer(said[-1])) is not None:
        return a
    numbers = _NUMBER_RE.findall(text) if last_number else []
    return _clean(numbers[-1]) if numbers else None


def to_number(answer: str) -> Fraction | None:
    """An exact number for `answer` ("1,234", "-0.50", "3/4", "\\frac{3}{4}", "50%"); else None."""
    a = _clean(answer).replace("−", "-").replace(" ", "")
    a = re.sub(r"^([-+]?)\\[dt]?frac\{([-\d.]+)\}\{([-\d.]+)\}$", r"\1\2/\3", a)
    a = re.sub(r"^([-+]?)\\[dt]?frac(\d)(\d)$", r"\1\2/\3", a)  # \frac12
    if re.fullmatch(r"[-+]?\d{1,3}(,\d{3})+(\.\d+)?", a):
        a = a.replace(",", "")
    if a.endswith("%"):
        value = to_number(a[:-1])
        return None if value is None else value / 100
    try:
        if "/" in a:
            num, den = a.split("/", 1)
            return _exact(num) / _exact(den)
        return _exact(a)
    except (InvalidOperation, ValueError, ZeroDivisionError, OverflowError):
        return None


def _exact(text: str) -> Fraction:
    """A decimal literal as an exact fraction; "inf", "NaN" and absurd exponents ("1e999999",
    which would build a million-digit integer) are not numbers an answer can be."""
    d = Decimal(text)
    if not d.is_finite() or abs(d.adjusted()) > 1000:
        raise ValueError(f"not a usable number: {text!r}")
    return Fraction(d)


def canonical(answer: str | None) -> str | None:
    """A key for voting: equal numbers give equal keys ("1,000" = "1000.0"); others are trimmed."""
    if answer is None:
        return None
    value = to_number(answer)
    if value is not None:
        return str(value)  # Fraction: "1000", "-7/2"
    return re.sub(r"\s+", "", _clean(answer)) or None
