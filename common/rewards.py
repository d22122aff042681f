"""Answer checkers: math answers through math-verify, multiple-choice letters, exact match.

A model's output is never trusted to be well formed: every checker takes arbitrary text, never raises
on it, and looks at a bounded amount of it, so its time is bounded too. A response from which no
answer can be read is a *parse failure*; `Verdict.parse_failed` says so, and the training and
evaluation scripts count these rather than folding them silently into "wrong".

math-verify (sympy underneath) can compute for minutes on a short answer such as `10^{10^{10^{10}}}`,
and its own time-outs use `signal.alarm`, which works only in the main thread. So its parse and
comparison of one reply run in a child process (this file, run as a script) that is killed when the
reply takes more than `MATH_VERIFY_SECONDS`, in whatever thread the check is called; a killed check is a
parse failure, and the next one starts a fresh process.
"""

from __future__ import annotations

import atexit
import json
import re
import select
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

# DAPO's extraction (verl `math_dapo.py`): only the last 300 characters, the last "Answer:" line.
ANSWER_TAIL_CHARS = 300
MATH_VERIFY_SECONDS = 5.0  # math-verify's time for one reply: both parses and the comparison
_ANSWER_LINE = re.compile(r"(?i)Answer\s*:\s*([^\n]+)")
_MAX_ANSWER_CHARS = 200  # an "answer" longer than this is not one; it also bounds sympy's work


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


def math_equal(predicted: str, gold: str) -> bool:
    """Whether two answer strings denote the same value (`"025"` = `"25"`, `"\\frac12"` = `"0.5"`)."""
    compared = _compare_in_time(predicted, gold)
    return compared is not None and compared.equal


class Comparison(NamedTuple):
    """math-verify's answer about a predicted answer string: whether it reads as a value, and whether that value
    equals the gold."""

    readable: bool
    equal: bool


def _compare_in_time(predicted: str, gold: str) -> Comparison | None:
    """The checker process's comparison; None when it took more than MATH_VERIFY_SECONDS."""
    return _CHECKER.compare(predicted, gold, MATH_VERIFY_SECONDS)


def check_math_answer(response: str, gold: str) -> Verdict:
    """Grade a math response: its `Answer:` line (DAPO format), else its last `\\boxed{}`."""
    extracted = extract_answer_line(response)
    if extracted is None:
        extracted = extract_boxed(response[-ANSWER_TAIL_CHARS * 4 :])
    if extracted is None:
        return Verdict(False, None, True)
    boxed = extract_boxed(extracted)  # "Answer: \boxed{25}"
    compared = _compare_in_time(boxed if boxed is not None else extracted, gold)
    if compared is None or not compared.readable:
        return Verdict(False, extracted, True)
    return Verdict(compared.equal, extracted, False)


def extract_qwen_math_answer(text: str) -> str | None:
    """The answer as the Qwen2.5-Math evaluation harness reads it (`QwenLM/Qwen2.5-Math`
    `evaluation/parser.py`, `extract_answer`), in its order: Minerva's "final answer is $X$. I hope", else
    the last `boxed` anywhere in the text, else what follows the last "he answer is", else the last "final
    answer is", else the first "答案是" (up to a blank line), else the last number. Line breaks inside it
    are removed, then a leading ":" and a trailing "." or "/"; None when the text has no number at all."""
    if "final answer is $" in text and "$. I hope" in text:
        answer = text.split("final answer is $", 1)[1].split("$. I hope", 1)[0]
    elif "boxed" in text:
        answer = _after_last_boxed(text)
    elif "he answer is" in text:
        answer = text.split("he answer is")[-1]
    elif "final answer is" in text:
        answer = text.split("final answer is")[-1]
    elif "答案是" in text:
        answer = text.split("答案是")[1].strip().split("\n\n")[0]
    else:
        numbers = re.findall(r"-?\d*\.?\d+", text.replace(",", ""))
        if not numbers:
            return None
        answer = numbers[-1]
    answer = re.sub(r"\n\s*", "", answer.strip())
    answer = answer[1:] if answer.startswith(":") else answer
    return answer[:-1] if answer.endswith((".", "/")) else answer


def _after_last_boxed(text: str) -> str:
    """What follows the last "boxed": its braces' content, balanced, or else the text up to a "$"."""
    after = text.split("boxed")[-1]
    if not after.startswith("{"):
        return after.split("$")[0]
    depth = 0
    for i, character in enumerate(after[:10_000]):
        depth += {"{": 1, "}": -1}.get(character, 0)
        if depth == 0:
            return after[1:i]
    return after[1:10_000]


def check_qwen_math_answer(response: str, gold: str) -> Verdict:
    """Grade a response as the Qwen2.5-Math harness does (`extract_qwen_math_answer`), the value compared
    with math-verify instead of its own grader."""
    extracted = extract_qwen_math_answer(response)
    compared = _compare_in_time(extracted, gold) if extracted else None
    if compared is None or not compared.readable:
        return Verdict(False, extracted, True)
    return Verdict(compared.equal, extracted, False)


_CHOICE_PATTERNS = [
    re.compile(r"[Tt]he (?:correct |final )?answer is:?\s*\(?\**([A-J])\b"),
    re.compile(r"[Aa]nswer\s*:\s*\(?\**([A-J])\b"),
]
# A letter written as an option, not as a word: "(B)", "**B**", "option B", "B is correct", or a letter
# that ends a sentence or the text ("B.", "I pick B"). "A careful check" holds none of these.
_OPTION_MARKERS = [
    r"\(({letter})\)",
    r"\*\*({letter})\*\*",
    r"(?i:option|choice)\s+({letter})(?![A-Za-z])",
    r"(?<![A-Za-z])({letter})\s+is\s+(?:the\s+)?(?:correct|right|answer|best|true)\b",
    r"(?<![A-Za-z])({letter})(?=[.!?)]|\s*$)",
]


def extract_choice(text: str, letters: str = "ABCDE") -> str | None:
    """The chosen option letter: "the answer is X", else "Answer: X" (OpenCompass-style loaders of
    LongReason), else the last letter written as an option (`_OPTION_MARKERS`). A bare capital letter is
    not taken: "B is right. A careful check..." reads as B, not as the article A."""
    tail = text[-2000:]
    for pattern in _CHOICE_PATTERNS:
        found = [m for m in pattern.findall(tail) if m in letters]
        if found:
            return found[-1]
    letter = f"[{letters}]"
    marked = [(match.start(1), match.group(1)) for marker in _OPTION_MARKERS
              for match in re.finditer(marker.format(letter=letter), tail)]
    if not marked:
        return None
    _, last_letter = max(marked)
    return last_letter


def check_choice(response: str, gold_letter: str, letters: str = "ABCDE") -> Verdict:
    extracted = extract_choice(response, letters)
    return Verdict(extracted == gold_letter.strip().upper(), extracted, extracted is None)


def normalize_text(text: str) -> str:
    return " ".join(text.lower().strip().strip(".").split())


def exact_match(predicted: str, gold: str) -> bool:
    """Equality after lower-casing, trimming and collapsing whitespace."""
    return normalize_text(predicted) == normalize_text(gold)


# --------------------------------------------------------------------------------------------------
# The checker process: math-verify in a child, one reply at a time, killed when a reply overruns.
# --------------------------------------------------------------------------------------------------


class _Checker:
    """The parent's side: starts the child on first use, sends it [predicted, gold], waits for the answer
    at most `seconds`, and kills it (to be restarted on the next call) when the answer does not come."""

    def __init__(self):
        self.lock = threading.Lock()  # one reply at a time on the one pipe
        self.process: subprocess.Popen | None = None

    def compare(self, predicted: str, gold: str, seconds: float) -> Comparison | None:
        with self.lock:
            if self.process is None:
                self.process = self._start()
            try:
                self.process.stdin.write((json.dumps([predicted, gold]) + "\n").encode())
                self.process.stdin.flush()
                answered = select.select([self.process.stdout], [], [], seconds)[0]
                line = self.process.stdout.readline() if answered else b""
            except OSError:  # the child died
                line = b""
            if not line:
                self.stop()
                return None
            return Comparison(*json.loads(line))

    @staticmethod
    def _start() -> subprocess.Popen:
        process = subprocess.Popen([sys.executable, "-I", "-B", str(Path(__file__).resolve()), "--compare-answers"],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        if process.stdout.readline() != b"ready\n":  # importing math-verify and sympy: about a second
            process.kill()
            raise RuntimeError(f"the math-verify checker process ({sys.executable} {__file__} --compare-answers) "
                               f"did not start; run that command to see why (is math-verify installed?)")
        return process

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None


_CHECKER = _Checker()
atexit.register(_CHECKER.stop)


def _serve_comparisons() -> None:
    """The child's side: a line [predicted, gold] in, a line [readable, equal] out, until stdin closes."""
    from math_verify import verify

    print("ready", flush=True)
    for line in sys.stdin:
        predicted, gold = json.loads(line)
        try:
            predicted_value = _math_value(predicted)
            gold_value = _math_value(gold) if predicted_value else []
            # math-verify's own time-outs are off: the parent's deadline bounds this whole reply
            equal = bool(gold_value) and bool(verify(gold_value, predicted_value, timeout_seconds=None))
        except Exception:  # whatever a reply holds, it must not end the checker; it is then no value
            predicted_value, equal = [], False
        print(json.dumps([bool(predicted_value), equal]), flush=True)


def _math_value(answer: str):
    """math-verify's parse of an answer string, or [] when it is not a value."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    answer = answer.strip().strip(".").strip()
    if not answer or len(answer) > _MAX_ANSWER_CHARS:
        return []
    text = answer if "$" in answer or "\\boxed" in answer else f"${answer}$"
    for candidate in (text, answer):
        value = parse(candidate, extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()],
                      parsing_timeout=None)
        # math-verify returns [sympy value, source text]; a lone string means nothing was read
        if value and not isinstance(value[0], str):
            return value
    return []


if __name__ == "__main__" and sys.argv[1:] == ["--compare-answers"]:
    _serve_comparisons()
