"""Answer checkers on a truth table; the synthetic task; chat tokenization with loss masks; the warm start."""

import json
import random
import time
from pathlib import Path

import pytest
import torch

from common.rewards import (
    Verdict,
    check_choice,
    check_math_answer,
    check_qwen_math_answer,
    exact_match,
    extract_boxed,
    math_equal,
)
from common.sft import IGNORE_INDEX, tokenize_chat
from tasks.arithmetic import QUICK_WARM_START, ArithmeticTask, greedy_accuracy, warm_start

TRUTH_TABLE = [
    # (response, gold, correct, parse_failed)
    ("Answer: 25", "025", True, False),
    ("so the result is \\boxed{025}", "25", True, False),
    ("$\\boxed{25}$", "025", True, False),
    ("Answer: $54$.", "54", True, False),
    ("Answer: \\boxed{7}", "7", True, False),
    ("Answer: \\frac{1}{2}", "0.5", True, False),
    ("Answer: 1/2", "\\frac{1}{2}", True, False),
    ("\\boxed{\\dfrac{3}{4}}", "0.75", True, False),
    ("Answer: \\sqrt{8}", "2\\sqrt{2}", True, False),
    ("The answer is \\boxed{x^2+2x+1}", "(x+1)^2", True, False),
    ("Answer: 3\nlater: Answer: 4", "4", True, False),  # the last Answer: line counts
    ("Answer: 26", "25", False, False),
    ("\\boxed{24}", "025", False, False),
    ("", "5", False, True),
    ("I cannot solve this.", "5", False, True),
    ("\\boxed{", "3", False, True),
    ("Answer: ???", "3", False, True),
]


@pytest.mark.parametrize("response,gold,correct,parse_failed", TRUTH_TABLE)
def test_math_checker_truth_table(response, gold, correct, parse_failed):
    verdict = check_math_answer(response, gold)
    assert (verdict.correct, verdict.parse_failed) == (correct, parse_failed)


QWEN_MATH_TRUTH_TABLE = [
    # (response, gold, correct, parse_failed): the Qwen2.5-Math harness's reading, in its order
    ("The answer is 25.", "025", True, False),  # DAPO's reading needs "Answer:" and fails this one
    ("so \\boxed{25}." + " And a long check follows." * 100 + " Done after 3 steps.", "25", True, False),  # a box anywhere
    ("\\boxed{24} at first, then \\boxed{25}", "25", True, False),  # the last box
    ("The final answer is $25$. I hope it is correct.", "25", True, False),  # Minerva's form
    ("Adding 12 and 13 gives 25", "25", True, False),  # the last number
    ("所以答案是25\n\n验算完毕，共3步", "25", True, False),  # the first 答案是, up to a blank line
    ("Answer: 26", "25", False, False),  # no box, no phrase: the last number, 26
    ("Adding 12 and 13 gives 25, so the answer is 24.", "25", False, False),  # the phrase before the last number
    ("I cannot solve this.", "25", False, True),
]


@pytest.mark.parametrize("response,gold,correct,parse_failed", QWEN_MATH_TRUTH_TABLE)
def test_qwen_math_harness_reading_truth_table(response, gold, correct, parse_failed):
    verdict = check_qwen_math_answer(response, gold)
    assert (verdict.correct, verdict.parse_failed) == (correct, parse_failed)


def test_garbage_never_raises_and_is_bounded_in_time():
    rng = random.Random(0)
    for _ in range(5):
        garbage = "".join(chr(rng.randrange(1, 0x2FFF)) for _ in range(10_000))
        for text in (garbage, garbage + "\\boxed{" + garbage[:300], "Answer: " + garbage[:5000], "{" * 10_000):
            start = time.perf_counter()
            verdict = check_math_answer(text, "42")
            assert not verdict.correct and time.perf_counter() - start < 5


def test_a_reply_that_math_verify_computes_forever_is_cut_off_in_a_worker_thread_too(monkeypatch):
    """sympy works for minutes on this tower of powers, holding the GIL, and math-verify's own time-out
    (signal.alarm) is off outside the main thread: the check must still end, as a parse failure."""
    from concurrent.futures import ThreadPoolExecutor

    from common import rewards

    monkeypatch.setattr(rewards, "MATH_VERIFY_SECONDS", 1.0)
    with ThreadPoolExecutor(max_workers=1) as pool:
        verdict = pool.submit(check_math_answer, "Answer: 10^{10^{10^{10}}}", "10").result(timeout=60)
    assert verdict == Verdict(correct=False, extracted="10^{10^{10^{10}}}", parse_failed=True)
    assert check_math_answer("Answer: 10", "10").correct  # the next reply gets a fresh checker


def test_boxed_extraction_balances_braces():
    assert extract_boxed("x \\boxed{\\frac{1}{2}} y \\boxed{3}") == "3"
    assert extract_boxed("\\boxed{\\frac{a}{b^{2}}}") == "\\frac{a}{b^{2}}"
    assert extract_boxed("no box") is None
    assert math_equal("50\\%", "0.5")


def test_choice_and_exact_match():
    assert check_choice("Let me think... The answer is (C).", "C").correct
    assert check_choice("Answer: B", "C").extracted == "B"
    assert check_choice("no letter here at all", "A").parse_failed
    assert exact_match("  George   Abbott. ", "george abbott")


@pytest.mark.parametrize("response, letter", [
    ("B is right. A careful check confirms it.", "B"),  # the article A is no choice
    ("A careful reading settles it.", None),
    ("Options (A) and (C) fail; (D) holds", "D"),  # the last letter written as an option
    ("**C**", "C"),
    ("Option E, clearly.", "E"),
    ("After weighing them all, I pick A", "A"),
    ("D", "D"),
])
def test_choice_without_an_answer_phrase_is_a_letter_written_as_an_option(response, letter):
    assert check_choice(response, "B").extracted == letter


def test_same_seed_same_problems_and_a_different_seed_differs():
    assert ArithmeticTask(seed=3).rows(20) == ArithmeticTask(seed=3).rows(20)
    assert ArithmeticTask(seed=3).rows(20) != ArithmeticTask(seed=4).rows(20)
    assert ArithmeticTask().rows(50, "train") != ArithmeticTask().rows(50, "test")


def test_arithmetic_rows_are_correct_heterogeneous_and_in_the_dapo_schema():
    rows = ArithmeticTask().rows(500)
    lengths = [len(r["solution"]) for r in rows]
    assert max(lengths) >= 4 * min(lengths)  # chains of thought of very different lengths
    for row in rows:
        assert set(row) >= {"data_source", "prompt", "ability", "reward_model", "extra_info"}
        expression = row["prompt"][-1]["content"].removeprefix("Compute ").removesuffix(".")
        assert eval(expression) == int(row["reward_model"]["ground_truth"])  # noqa: S307 - digits and +/- only
        assert check_math_answer(row["solution"], row["reward_model"]["ground_truth"]).correct
        for line in row["solution"].splitlines()[:-1]:
            left, right = line.split("=")
            assert eval(left) == int(right) and 0 <= int(right) <= 99  # noqa: S307


def test_tokenize_chat_trains_only_the_assistant_content_and_end_token(tiny_model_dir):
    from common.models import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model_dir))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Compute 1+2."},
                {"role": "assistant", "content": "1+2=3\nAnswer: 3"}, {"role": "user", "content": "And 2+2?"},
                {"role": "assistant", "content": "Answer: 4"}]
    chat = tokenize_chat(tokenizer, messages, trained=[False, False, False, False, True])
    trained_text = tokenizer.decode([t for t, l in zip(chat.input_ids, chat.labels) if l != IGNORE_INDEX])
    assert trained_text == "Answer: 4<|im_end|>"
    both = tokenize_chat(tokenizer, messages, trained=[False, False, True, False, True])
    trained_text = tokenizer.decode([t for t, l in zip(both.input_ids, both.labels) if l != IGNORE_INDEX])
    assert trained_text == "1+2=3\nAnswer: 3<|im_end|>Answer: 4<|im_end|>"
    assert chat.input_ids == both.input_ids and tokenizer.decode(chat.input_ids) == chat.text


@pytest.mark.slow
def test_the_shipped_quick_warm_start_lands_in_its_accuracy_window_and_measures_what_it_records():
    """The quick configuration (the one the notebook uses); the default one is measured in the README."""
    from common.cache import shipped_model
    from common.models import load_policy

    directory = shipped_model("tiny-arithmetic-quick")
    report = json.loads((Path(directory) / "warm_start.json").read_text())
    low, high = QUICK_WARM_START.accuracy_window
    assert low <= report["accuracy"] <= high
    model, tokenizer = load_policy(directory)
    measured = greedy_accuracy(model, tokenizer, QUICK_WARM_START.task.rows(QUICK_WARM_START.eval_rows, "test"))
    assert measured == pytest.approx(report["accuracy"])


def test_warm_start_is_the_same_model_whatever_the_thread_count_and_is_built_once(tmp_path):
    """The model kept is picked at an evaluation where accuracy can jump by tens of points, so the build must
    not depend on the number of threads the caller runs with (and must give that number back)."""
    from dataclasses import replace

    from safetensors.torch import load_file

    config = replace(QUICK_WARM_START, train_rows=256, eval_rows=8, max_steps=10, eval_every=10,
                     target_accuracy=0.0, accuracy_window=(0.0, 1.0))
    threads = torch.get_num_threads()
    builds = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            builds.append(warm_start(config, tmp_path / f"threads-{n}", progress=False))
            assert torch.get_num_threads() == n
    finally:
        torch.set_num_threads(threads)
    reports = [json.loads((b / "warm_start.json").read_text()) for b in builds]
    assert reports[0] == reports[1] and reports[0]["step"] == 10 and reports[0]["key"] == config.key()
    one, two = (load_file(b / "model.safetensors") for b in builds)
    assert all(torch.equal(one[k], two[k]) for k in one)
    start = time.perf_counter()
    assert warm_start(config, builds[0], progress=False) == builds[0]  # built: no training the second time
    assert time.perf_counter() - start < 5
