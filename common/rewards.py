"""Answer checkers: math answers through math-verify, multiple-choice letters, exact match.

A model's output is never trusted to be well formed: every checker takes arbitrary text, never raises
on it, and looks at a bounded amount of it, so its time is bounded too. A response from which no
answer can be read is a *parse failure*; `Verdict.parse_failed` says so, and the training and
evaluation scripts count these rather than folding them silently into "wrong".
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

# DAPO's extraction (verl `math_dapo.py`): only the last 300 characters, the last "Answer:" line.
ANSWER_TAIL_CHARS = 300
_ANSWER_LINE = re.compile(r"(?i)Answer\s*:\s*([^\n]+)")
_MAX_ANSWER_CHARS = 200  # an "answer" longer than this is not one; it also bounds sympy's work
_EXTRACTION = [LatexExtractionConfig(), ExprExtractionConfig()]


@dataclass(frozen=True)
class Verdict:
    correct: bool
    extracted: str | None  # the answer as read from the response; None when none was found
    parse_failed: bool  # no answer found, or the answer is not a readable value


def extract_answer_line(text: str) -> str | None:
    """The text after the last `Answer:` in the response's last 300 characters (DAPO's format)."""
    matches = _ANSWER_LINE.findall(text[-ANSWER_TAIL_CHARS:])
    return matches[-1].strip() if matches else None


def extract_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` (or `\\fbox{...}`), braces balanced."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    brace = text.find("{", start)
    if brace < 0 or text[start:brace].strip() not in ("\\boxed", "\\fbox"):
        return None
    depth = 0
    for i in range(brace, min(len(text), brace + 10_000)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[brace + 1 : i].strip()
    return None


def _math_value(answer: str):
    """math-verify's parse of an answer string, or [] when it is not a value.

    math-verify bounds its own time with `signal.alarm`, which only works in the main thread; in other
    threads we switch that off and rely on the answer-length bound instead.
    """
    answer = answer.strip().strip(".").strip()
    if not answer or len(answer) > _MAX_ANSWER_CHARS:
        return []
    in_main = threading.current_thread() is threading.main_thread()
    text = answer if "$" in answer or "\\boxed" in answer else f"${answer}$"
    for candidate in (text, answer):
        value = parse(candidate, extraction_config=_EXTRACTION, parsing_timeout=5 if in_main else None)
        # math-verify returns [sympy value, source text]; a lone string means nothing was read
        if value and not isinstance(value[0], str):
            return value
    return []


def math_equal(predicted: str, gold: str) -> bool:
    """Whether two answer strings denote the same value (`"025"` = `"25"`, `"\\frac12"` = `"0.5"`)."""
    gold_value, predicted_value = _math_value(gold), _math_value(predicted)
    if not gold_value or not predicted_value:
        return False
    in_main = threading.current_thread() is threading.main_thread()
    return bool(verify(gold_value, predicted_value, timeout_seconds=5 if in_main else None))


def check_math_answer(response: str, gold: str) -> Verdict:
    """Grade a math response: its `Answer:` line (DAPO format), else its last `\\boxed{}`."""
    extracted = extract_answer_line(response)
    if extracted is None:
        extracted = extract_boxed(response[-ANSWER_TAIL_CHARS * 4 :])
    if extracted is None:
        return Verdict(False, None, True)
    boxed = extract_boxed(extracted)  # "Answer: \boxed{25}"
    candidate = boxed if boxed is not None else extracted
    if not _math_value(candidate):
        return Verdict(False, extracted, True)
    return Verdict(math_equal(candidate, gold), extracted, False)


_CHOICE_PATTERNS = [
    re.compile(r"[Tt]he (?:correct |final )?answer is:?\s*\(?\**([A-J])\b"),
    re.compile(r"[Aa]nswer\s*:\s*\(?\**([A-J])\b"),
]


def extract_choice(text: str, letters: str = "ABCDE") -> str | None:
    """The chosen option letter: "the answer is X", else "Answer: X", else the last standalone letter."""
    tail = text[-2000:]
    for pattern in _CHOICE_PATTERNS:
        found = [m for m in pattern.findall(tail) if m in letters]
        if found:
            return found[-1]
    standalone = re.findall(rf"(?<![A-Za-z])([{letters}])(?![A-Za-z])", tail)
    return standalone[-1] if standalone else None


def check_choice(response: str, gold_letter: str, letters: str = "ABCDE") -> Verdict:
    extracted = extract_choice(response, letters)
    return Verdict(extracted == gold_letter.strip().upper(), extracted, extracted is None)


def normalize_text(text: str) -> str:
    return " ".join(text.lower().strip().strip(".").split())


def exact_match(predicted: str, gold: str) -> bool:
    """Equality after lower-casing, trimming and collapsing whitespace."""
    return normalize_text(predicted) == normalize_text(gold)
