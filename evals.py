"""Evaluations for the three papers: AIME, RoR-Bench, LongReason and ToolHop, each with its published
protocol (prompt, sampling, answer extraction, scoring).

    python evals.py                                        # CPU: the tiny model on AIME 2024 and the ToolHop subset
    python evals.py --bench aime24 --model runs/vapo/checkpoint-000060/policy --data aime24.jsonl
    python evals.py --bench aime24 --model Qwen/Qwen2.5-32B --backend vllm --tensor-parallel-size 4
                                                           # DAPO/VAPO protocol: avg@32, T=1.0, top_p=0.7
    python evals.py --bench aime24 --aime-protocol boxed --model Qwen/Qwen2.5-Math-7B-Instruct --backend vllm
                                                           # greedy \\boxed{} pass@1 (Qwen2.5-Math harness)
    python evals.py --bench toolhop --scenario mandatory --model Qwen/Qwen2.5-32B-Instruct --backend vllm
    python evals.py --bench ror_bench --data ror_bench.jsonl --model Qwen/Qwen2.5-7B-Instruct --judge-model JUDGE
    python evals.py --bench ror_bench --data ror_bench.jsonl --model Qwen/Qwen2.5-VL-7B-Instruct --judge-model JUDGE
                                                           # a vision-language model: the image pairs too
    python evals.py --bench longreason --model Qwen/Qwen2.5-7B-Instruct --splits original 8k 32k
    python evals.py --bench aime24 --data aime24.jsonl --responses saved.jsonl   # rescore saved generations

`--responses FILE` scores generations made elsewhere, without loading any model: a JSONL file with one
object per item, `{"id": <the item's id>, "responses": ["...", ...]}` (for ToolHop a response may also
be a whole conversation, a list of chat messages). Every run writes it too, as `responses.jsonl`.

Outputs in --out-dir: `results.json` (the settings, the summary, and every item with its prompt,
responses, extracted answers and verdicts), `results.md` (the summary as a table), `responses.jsonl`,
and a plot: AIME pass@k (when k > 1), RoR-Bench original vs modified, LongReason by context length (when
there are several), ToolHop's official answer correctness beside the strict one.

Read top to bottom: Args and each protocol's sampling settings, the metrics as pure functions, one
section per benchmark (prompts, items, scoring), then the driver (models, files, outputs).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import tyro

from common.data import DataError, load_rows, require
from common.rewards import (
    ANSWER_TAIL_CHARS,
    check_choice,
    check_math_answer,
    check_qwen_math_answer,
    extract_boxed,
    math_equal,
)
from common.tools import call_from_message, execute_tool, find_tool_source, invocation_errors, parse_assistant_turn

# Small real data shipped with the project (data/README.md): AIME 2024 and 70 ToolHop queries with their
# tools. The CPU default evaluates on them; any benchmark can read them with --data.
DATA_DIR = Path(__file__).resolve().parent / "data"

# --------------------------------------------------------------------------------------------------
# Args
# --------------------------------------------------------------------------------------------------


@dataclass
class Args:
    bench: str | None = None
    """aime24, ror_bench, longreason or toolhop. None: the CPU default, i.e. --model on AIME 2024 and
    20 queries of the ToolHop subset with small settings (the pipeline end to end in minutes, not a score)."""
    model: str = "tiny-random"
    """hub id or local directory (e.g. a vapo.py checkpoint, runs/vapo/checkpoint-NNNNNN/policy);
    "tiny-random": a randomly initialised tiny Qwen2 (built in seconds, cached in .cache/);
    "tiny-arithmetic": the warm-started tiny model vapo.py starts from (shipped in models/);
    "tiny-vlm": a randomly initialised tiny vision-language model (Idefics3), for RoR-Bench's image problems.
    A checkpoint whose config has a vision tower is loaded as a vision-language model (processor and chat
    template from the checkpoint)."""
    data: str | None = None
    """hub id or local .jsonl/.json/.parquet file; default: the benchmark's hub copy.
    LongReason: a local path may contain "{split}", filled in for each of --splits."""
    responses: str | None = None
    """rescore saved generations from this JSONL file ({"id", "responses": [...]} per item); no model is loaded."""
    out_dir: str | None = None
    """where results go; default runs/evals/<bench>."""
    limit: int | None = None
    """evaluate only the first N rows of the data (a quick check; scores then cover those rows only)."""
    seed: int = 0
    """sampling seed (greedy protocols do not use it)."""

    # ---- model backend ----
    backend: Literal["hf", "vllm"] = "hf"
    """transformers `generate` (anywhere) or vLLM (GPU; `pip install -r requirements-gpu.txt`)."""
    dtype: str = "auto"
    """weights' dtype: "auto" (the checkpoint's own), "bfloat16", "float32"."""
    batch_size: int = 8
    """hf backend: sequences per `generate` call (ToolHop prompts carry every tool's schema: keep it small)."""
    tensor_parallel_size: int = 1
    """vllm backend: GPUs per model (Qwen2.5-32B in bf16: 2 or more)."""
    gpu_memory_utilization: float = 0.9
    """vllm backend: share of GPU memory the engine may take."""
    max_model_len: int | None = None
    """vllm backend: context length to reserve (prompt + response); default: the model's."""

    # ---- sampling; None = the benchmark's protocol (PROTOCOLS below) ----
    samples: int | None = None
    """responses per prompt, k (AIME DAPO protocol: 32; RoR-Bench: 5; greedy protocols: 1)."""
    temperature: float | None = None
    """0 = greedy."""
    top_p: float | None = None
    """nucleus sampling: keep the smallest set of tokens holding this probability (1 = off)."""
    max_new_tokens: int | None = None
    """response length limit (ToolHop: per turn)."""

    # ---- per benchmark ----
    aime_protocol: Literal["dapo", "boxed"] = "dapo"
    """AIME: "dapo", the DAPO/VAPO prompt ending in an `Answer:` line, avg@32 at T=1.0, top_p=0.7
    (the papers' numbers); "boxed", the Qwen2.5-Math harness: its \\boxed{} prompt, greedy pass@1, answers
    read as it reads them (a box anywhere, "the answer is N", else the last number)."""
    judge_model: str | None = None
    """RoR-Bench: the LLM judge (hub id or directory), served by --backend; without one, only answers whose
    gold is a number are scored, from the response's final-answer line; the others stay unscored, which
    counts as not correct."""
    forced_correct: bool = False
    """RoR-Bench: prefix each problem with the paper's "Forced Correct" instruction."""
    splits: tuple[str, ...] = ("original", "expanded", "8k", "16k", "32k", "64k", "128k")
    """LongReason: the splits to evaluate (context lengths)."""
    scenario: Literal["direct", "mandatory", "free"] = "mandatory"
    """ToolHop: "direct" (no tools), "mandatory" (tools, own knowledge forbidden: the paper's headline),
    "free" (tools optional)."""
    max_turns: int = 9
    """ToolHop: model calls per query (the authors' 9)."""
    tool_timeout: float = 10.0
    """ToolHop: seconds per tool call (the authors' 10)."""


@dataclass(frozen=True)
class Sampling:
    samples: int
    temperature: float
    top_p: float
    max_new_tokens: int


# Each benchmark's protocol; --samples, --temperature, --top-p and --max-new-tokens override it.
PROTOCOLS = {
    "aime24/dapo": Sampling(32, 1.0, 0.7, 20480),  # DAPO §4.1, VAPO §5.1; length: DAPO's 16,384 + 4,096 buffer
    "aime24/boxed": Sampling(1, 0.0, 1.0, 4096),  # Qwen2.5-Math eval.sh: greedy, n=1; length: our choice
    "ror_bench": Sampling(5, 0.7, 1.0, 8192),  # RoR-Bench §4: 5 samples at T=0.7; length not stated
    "longreason": Sampling(1, 0.0, 1.0, 2048),  # decoding not stated in what we could read: greedy
    "toolhop": Sampling(1, 0.0, 1.0, 1024),  # ToolHop code: greedy, max_new_tokens=1024, per turn
}
# The CPU default: the same protocols scaled down so that a tiny model runs them in minutes. Settings
# left at their defaults take these values. ToolHop prompts carry every tool's schema (2.5k-7k tokens
# with the tiny tokenizer): on a CPU they go one at a time, as padded batches of them are slower.
CPU_DEFAULT = {
    "aime24": {"samples": 4, "max_new_tokens": 48},
    "toolhop": {"limit": 20, "max_new_tokens": 32, "batch_size": 1},
}

# name: (hub id, split, the copy shipped in data/ that the CPU default evaluates on)
BENCHMARKS = {
    "aime24": ("HuggingFaceH4/aime_2024", "train", "aime24.jsonl"),
    "ror_bench": ("kaiyan289/RoR-Bench", "train", None),
    "longreason": ("lz1bytedance/LongReason", None, None),  # one hub split per context length
    "toolhop": ("bytedance-research/ToolHop", "test", "toolhop_dev70.jsonl"),
}


class UsageError(ValueError):
    """A command-line setting that cannot work, with what to use instead."""


def check_args(args: Args) -> None:
    if args.bench not in BENCHMARKS:
        raise UsageError(f"unknown benchmark {args.bench!r}; valid names: {', '.join(BENCHMARKS)} "
                         f"(or no --bench at all for the CPU default)")
    if args.bench == "longreason" and not args.splits:
        raise UsageError("--splits is empty; LongReason's splits are original expanded 8k 16k 32k 64k 128k")


def sampling_for(args: Args) -> Sampling:
    key = f"aime24/{args.aime_protocol}" if args.bench == "aime24" else args.bench
    protocol = PROTOCOLS[key]
    chosen = {f.name: getattr(args, f.name) for f in dataclasses.fields(Sampling)}
    return dataclasses.replace(protocol, **{k: v for k, v in chosen.items() if v is not None})


# --------------------------------------------------------------------------------------------------
# Metrics: pure functions
# --------------------------------------------------------------------------------------------------


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021, §2.1): the chance that k of the n samples, c of them correct,
    drawn without replacement, include a correct one: 1 - C(n-c, k) / C(n, k), as a stable product."""
    if not 0 < k <= n or not 0 <= c <= n:
        raise ValueError(f"pass@k needs 0 < k <= n and 0 <= c <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def avg_at_k(correct: list[list[bool]]) -> float:
    """avg@k: accuracy over every sample, averaged per item first (DAPO §4.1's avg@32)."""
    return mean([mean(c) for c in correct])


def mean(values) -> float:
    return sum(values) / len(values)


def percent(numerator: float, denominator: float) -> float | None:
    """100 × numerator / denominator to 2 decimals; None when there is nothing to count (no calls, no
    scored response), which a table should show as such rather than as 0."""
    return round(100.0 * numerator / denominator, 2) if denominator else None


# --------------------------------------------------------------------------------------------------
# AIME: 30 integer-answer problems a year
# --------------------------------------------------------------------------------------------------

# DAPO-Math-17k's prompt, also DAPO's and VAPO's AIME 2024 validation prompt (user turn).
DAPO_PROMPT = (
    "Solve the following math problem step by step. The last line of your response should be of the form "
    "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n{problem}\n\n"
    'Remember to put your answer on its own line after "Answer:".'
)
# Qwen2.5-Math's `qwen25-math-cot` prompt: this system message, the problem as the user turn.
BOXED_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."


def aime_items(rows: list[dict], source: str, protocol: str) -> list[dict]:
    items = []
    for index, row in enumerate(rows):
        field = "question" if "problem" not in row and "question" in row else "problem"
        problem = require(row, index, source, field, str)
        gold = str(require(row, index, source, "answer", (str, int)))
        if protocol == "dapo":
            prompt = [{"role": "user", "content": DAPO_PROMPT.format(problem=problem)}]
        else:
            prompt = [{"role": "system", "content": BOXED_SYSTEM}, {"role": "user", "content": problem}]
        items.append({"id": str(row.get("id", index)), "problem": problem, "gold": gold, "prompt": prompt})
    return items


def score_aime(items: list[dict], responses: dict[str, list[str]], protocol: str) -> tuple[list[dict], dict]:
    """Each response graded as its protocol reads answers: "dapo", the `Answer:` line, else the last
    \\boxed{} (verl's math_dapo, in DAPO's last 300 characters); "boxed", as the Qwen2.5-Math harness does
    (Minerva's form, a \\boxed{} anywhere, "the answer is N", else the last number). The value is compared
    with math-verify, so the gold "025" equals a model's 25."""
    check = check_math_answer if protocol == "dapo" else check_qwen_math_answer
    records, correct = [], []
    for item in items:
        verdicts = [check(text, item["gold"]) for text in responses[item["id"]]]
        correct.append([v.correct for v in verdicts])
        records.append({**item, "responses": responses[item["id"]], "extracted": [v.extracted for v in verdicts],
                        "correct": correct[-1], "parse_failed": [v.parse_failed for v in verdicts]})
    n = min(len(c) for c in correct)  # pass@k is defined up to the smallest number of samples of any item
    summary = {"items": len(items), "samples_per_item": n, f"avg@{n}": round(100 * avg_at_k(correct), 2)}
    for k in sorted({2**j for j in range(n.bit_length()) if 2**j <= n} | {n}):
        summary[f"pass@{k}"] = round(100 * sum(pass_at_k(len(c), sum(c), k) for c in correct) / len(correct), 2)
    summary["parse_failures_%"] = percent(sum(sum(r["parse_failed"]) for r in records),
                                          sum(len(r["parse_failed"]) for r in records))
    return records, summary


def plot_pass_at_k(summary: dict, path: Path, title: str) -> Path | None:
    points = [(int(key[5:]), value) for key, value in summary.items() if key.startswith("pass@")]
    if len(points) < 2:
        return None
    fig, ax = _figure((4.5, 3.2))
    ax.plot([k for k, _ in points], [v for _, v in points], marker="o")
    ax.set_xscale("log", base=2)
    ax.set_xticks([k for k, _ in points], [str(k) for k, _ in points])
    ax.set(xlabel="k", ylabel="pass@k (%)", title=title, ylim=(-2, 102))
    ax.grid(alpha=0.3)
    return _save(fig, path)


# --------------------------------------------------------------------------------------------------
# RoR-Bench: pairs of an original problem and a subtly modified one with a different answer (Chinese)
# --------------------------------------------------------------------------------------------------

# "Please answer the following problem. The problems are guaranteed to be correct; please strictly follow
# the literal meaning of the problem." (RoR-Bench §4, "Forced Correct")
FORCED_CORRECT_PREFIX = "请回答下面的问题。题目保证没有问题，请严格按照题目字面所写的问题回答。"
# The paper's judge prompt, verbatim (appendix; its English translation is in the README).
JUDGE_PROMPT = (
    "你是一个专业的老师，现在有一道题目，你需要判断学生的回答是否和标准答案一致。题目和答案保证是绝对正确的，不会有错字，"
    "因此你要严格按照题目的字面意思评判。不要质疑标准答案有问题。 如果学生的回答和标准答案一致，请打1分；否则请打0分。"
    "标准答案经常只含有答案，而学生的回答一般会带有过程；你只需要根据学生的结论是否与标准答案相符做出评价。"
    "学生的结论和标准答案必须本质一样，但表述可以稍有不同；例如，学生的答案是50又1/2或50.5，标准答案是101/2，则也可以算作正确。 "
    "你的判断应遵循如下格式：你的输出在【评价】后开始。首先是对学生回答的分析（不超过300字），"
    "然后以“分数:[[0]]”或“分数：[[1]]”结束。 下面开始判断：\n\n"
    "【题目】 {problem} 【标准答案】 {answer} 【学生回答】 {response}"
)
ROR_FIELDS = ("original_problem", "original_answer", "modified_problem", "modified_answer")
ROR_IMAGE_FIELDS = ("original_image", "modified_image", "image")
ROR_SCHEMA = (
    'RoR-Bench rows hold one pair each: "original_problem", "original_answer", "modified_problem", '
    '"modified_answer" (text) and optionally "id"; an image pair also "original_image" and "modified_image", or '
    'one "image" for both (a PIL image, {"bytes", "path"} as datasets stores images, an image file path '
    'relative to the data file, or base64). Convert the release to this layout'
)
_VERDICT = re.compile(r"[\[［]{2}\s*([01])\s*[\]］]{2}")  # [[1]], [[ 0 ]], full-width ［［1］］
_NUMERIC_GOLD = re.compile(r"\s*(-?\d+(?:\.\d+)?(?:/\d+)?)\s*[^\d\s]{0,4}\s*")  # "50", "20 秒", "3/4 m"
_NUMBER = re.compile(r"\\d?frac\{-?\d+(?:\.\d+)?\}\{\d+(?:\.\d+)?\}|-?\d+(?:\.\d+)?(?:/\d+)?")  # 50, 2.5, 3/4, \frac{1}{2}
# "Answer:", "答案是", "答案为", "答案：", or a line opening with "答：" (the Chinese answer-sheet form)
_FINAL_ANSWER_MARK = re.compile(r"(?i:answer)\s*[:：]|答案\s*[是为:：]|^\s*答\s*[:：]", re.MULTILINE)


def ror_items(rows: list[dict], source: str, forced_correct: bool) -> list[dict]:
    """Two items per pair, ids "<pair id>/original" and "<pair id>/modified", each a text or an image
    problem (RoR-Bench §3.2: 158 text pairs, 57 image pairs with one image per problem). An image problem's
    prompt is the image, then the text, as one user turn.

    The Hub release's field names are not documented: this reads the layout in ROR_SCHEMA, and stops with
    that schema in the error when a row lacks a field or holds an image under a name it does not read
    (an image problem must not pass silently as a text one).
    """
    base_dir = Path(source).expanduser()
    base_dir = base_dir if base_dir.is_dir() else base_dir.parent
    items = []
    for index, row in enumerate(rows):
        try:
            values = {field: str(require(row, index, source, field, (str, int, float))) for field in ROR_FIELDS}
        except DataError as error:
            raise DataError(f"{error}. {ROR_SCHEMA}") from error
        images = ror_row_images(row, index, source, base_dir)
        pair = str(row.get("id", index))
        for variant in ("original", "modified"):
            problem = values[f"{variant}_problem"]
            text = (FORCED_CORRECT_PREFIX if forced_correct else "") + problem
            image = images.get(variant)
            content = text if image is None else [{"type": "image", "image": image}, {"type": "text", "text": text}]
            items.append({"id": f"{pair}/{variant}", "pair": pair, "variant": variant,
                          "modality": "text" if image is None else "image", "problem": problem,
                          "gold": values[f"{variant}_answer"], "prompt": [{"role": "user", "content": content}]})
    return items


def ror_row_images(row: dict, index: int, source: str, base_dir: Path) -> dict:
    """{"original": image, "modified": image} of an image pair, {} for a text pair (ROR_SCHEMA)."""
    from common.vision import ImageError, load_image

    read = {"id", *ROR_FIELDS, *ROR_IMAGE_FIELDS}
    strays = [field for field, value in row.items() if field not in read and looks_like_image(value)]
    if strays:
        raise DataError(f"{source}: row {index} holds an image in {strays}, a field RoR-Bench's reader does not "
                        f"know. {ROR_SCHEMA}")
    given = {field: row[field] for field in ROR_IMAGE_FIELDS if row.get(field) is not None}
    if not given:
        return {}
    shared = given.get("image")
    per_variant = {variant: given.get(f"{variant}_image", shared) for variant in ("original", "modified")}
    missing = [variant for variant, value in per_variant.items() if value is None]
    if missing:
        raise DataError(f"{source}: row {index} has an image for one problem of its pair but none for the "
                        f"{missing[0]} one. {ROR_SCHEMA}")
    try:
        return {variant: load_image(value, base_dir) for variant, value in per_variant.items()}
    except ImageError as error:
        raise DataError(f"{source}: row {index}: its image cannot be read ({error}). {ROR_SCHEMA}") from error


def looks_like_image(value) -> bool:
    """A PIL image, datasets' stored image ({"bytes", "path"}), image bytes, or a string naming an image file
    or holding a data URL."""
    from PIL import Image

    if isinstance(value, Image.Image) or isinstance(value, bytes):
        return True
    if isinstance(value, dict):
        return set(value) >= {"bytes", "path"}
    return isinstance(value, str) and (value.startswith("data:image") or
                                       value.lower().endswith((".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp")))


def answerable_items(items: list[dict], images: bool) -> list[dict]:
    """The RoR-Bench items a run can score: all, or the text problems only when nothing answers images."""
    return items if images else [item for item in items if item["modality"] == "text"]


def printable_prompt(prompt: list[dict]) -> list[dict]:
    """A prompt for results.json: each image written as its size."""
    return [message if isinstance(message["content"], str) else {**message, "content": [
        part if part.get("type") != "image" else {"type": "image", "image": "%dx%d pixels" % part["image"].size}
        for part in message["content"]]} for message in prompt]


def parse_judge_verdict(text: str) -> int | None:
    """The judge's score, the last [[0]] or [[1]] in its output (with or without 分数:/分数：/Score:);
    None when there is none, which counts as a judge parse failure."""
    found = _VERDICT.findall(text or "")
    return int(found[-1]) if found else None


def final_answer(response: str) -> str | None:
    """What the response states as its final answer: the rest of the line after its last `Answer:`,
    `答案是`/`答案为`/`答案：` or `答：` in its last 300 characters (a \\boxed{} there taken out of its box),
    else its last \\boxed{}; None when it states none."""
    tail = response[-ANSWER_TAIL_CHARS:]
    marks = list(_FINAL_ANSWER_MARK.finditer(tail))
    if not marks:
        return extract_boxed(response[-4 * ANSWER_TAIL_CHARS:])
    line = tail[marks[-1].end():].split("\n", 1)[0]
    boxed = extract_boxed(line)
    return (boxed if boxed is not None else line).strip()


def numeric_verdict(response: str, gold: str) -> bool | None:
    """The judge-free check for a gold that is a number (a unit after it allowed): the response's final
    answer (`final_answer`; after an "=", what follows the last one) must hold exactly one number, compared
    with math-verify. None, unscored, when the gold is not a number, the response states no final answer,
    or its final answer holds no number or several ("15, not 20")."""
    match = _NUMERIC_GOLD.fullmatch(gold)
    answer = final_answer(response) if match else None
    numbers = _NUMBER.findall(answer.split("=")[-1]) if answer is not None else []
    return math_equal(numbers[0], match.group(1)) if len(numbers) == 1 else None


def ror_verdict(response: str, gold: str, judge_output: str | None) -> tuple[int | None, str | None]:
    """1/0 and who decided it: the judge; where there is no judge or no verdict in its output (e.g. cut at
    its token limit), the final-answer rule if the gold is a number; otherwise nobody (None, None)."""
    judged = parse_judge_verdict(judge_output) if judge_output is not None else None
    if judged is not None:
        return judged, "judge"
    checked = numeric_verdict(response, gold)
    return (None, None) if checked is None else (int(checked), "final-answer rule")


def score_ror(items: list[dict], responses: dict[str, list[str]],
              judgements: dict[str, list[str]] | None) -> tuple[list[dict], dict]:
    """Scores for text and image problems apart (the paper's Tables 1 and 2), per variant as means over
    every response (RoR-Bench §4: the mean score over 5 trials and all problems), an unscored response
    counting as not correct, so that original and modified are averaged over the same problems; best-of-n
    per problem; the headline, the drop, original − modified, in points; and how many responses each
    variant left unscored."""
    records = []
    for item in items:
        outputs = judgements[item["id"]] if judgements else [None] * len(responses[item["id"]])
        verdicts = [ror_verdict(r, item["gold"], o) for r, o in zip(responses[item["id"]], outputs)]
        records.append({**item, "prompt": printable_prompt(item["prompt"]), "responses": responses[item["id"]],
                        "judge_outputs": outputs, "verdicts": [v for v, _ in verdicts],
                        "verdict_source": [s for _, s in verdicts]})
    summary = {}
    for modality in ("text", "image"):
        group = [r for r in records if r["modality"] == modality]
        if group:
            summary |= {f"{modality}/{key}": value for key, value in ror_scores(group).items()}
    sources = [s for r in records for s in r["verdict_source"]]
    summary["judged_responses"] = sources.count("judge")
    summary["rule_scored_responses"] = sources.count("final-answer rule")
    summary["unscored_responses"] = sources.count(None)
    summary["judge_parse_failures"] = sum(
        1 for r in records for o in r["judge_outputs"] if o is not None and parse_judge_verdict(o) is None)
    return records, summary


def ror_scores(records: list[dict]) -> dict:
    """One group's pairs, original and modified scores (every response counted), best-of-n, the drop and
    the unscored counts."""
    scores = {"pairs": len({r["pair"] for r in records})}
    for variant in ("original", "modified"):
        mine = [r for r in records if r["variant"] == variant]
        verdicts = [v for r in mine for v in r["verdicts"]]
        scores[variant] = percent(verdicts.count(1), len(verdicts))
        scores[f"{variant}_best_of_n"] = percent(sum(1 in r["verdicts"] for r in mine), len(mine))
        scores[f"{variant}_unscored"] = verdicts.count(None)
    scores["drop"] = round(scores["original"] - scores["modified"], 2)
    return scores


def judge_all(judge, items: list[dict], responses: dict[str, list[str]]) -> dict[str, list[str]]:
    """The judge's output for every response: greedy, the paper's prompt as one user message."""
    prompts, owners = [], []
    for item in items:
        for response in responses[item["id"]]:
            content = JUDGE_PROMPT.format(problem=item["problem"], answer=item["gold"], response=response)
            prompts.append([{"role": "user", "content": content}])
            owners.append(item["id"])
    samples = judge.generate(prompts, n=1, max_new_tokens=1024, temperature=0.0)
    outputs: dict[str, list[str]] = {item["id"]: [] for item in items}
    for sample in samples:
        outputs[owners[sample.prompt_index]].append(sample.text)
    return outputs


def plot_ror(summary: dict, path: Path, title: str) -> Path:
    """Original vs modified, mean of samples and best of n, for the text and the image problems."""
    groups = [(modality, stat) for modality in ("text", "image") if f"{modality}/pairs" in summary
              for stat in ("", "_best_of_n")]
    fig, ax = _figure((2.2 + 1.3 * len(groups), 3.4))
    for shift, variant in ((-0.2, "original"), (0.2, "modified")):
        values = [summary[f"{modality}/{variant}{stat}"] or 0 for modality, stat in groups]
        ax.bar([i + shift for i in range(len(groups))], values, width=0.4, label=variant)
    ax.set_xticks(range(len(groups)), [f"{modality}\n{'best of n' if stat else 'mean'}" for modality, stat in groups])
    drops = ", ".join(f"{m} {summary[f'{m}/drop']}" for m in ("text", "image") if f"{m}/drop" in summary)
    ax.set(ylabel="score (%)", ylim=(0, 120), title=f"{title}\ndrop (points): {drops}")
    ax.legend(loc="upper center", ncol=2)
    return _save(fig, path)


# --------------------------------------------------------------------------------------------------
# LongReason: multiple-choice questions whose context is expanded to 8k ... 128k tokens
# --------------------------------------------------------------------------------------------------

LONGREASON_ORDER = ["original", "expanded", "8k", "16k", "32k", "64k", "128k"]


def longreason_rows(source: str, splits: tuple[str, ...]) -> dict[str, list[dict]]:
    """Rows per split: from the hub (one split each), from a local path with "{split}" in it, or from
    one local file, which is the split its name says (8k.jsonl: "8k")."""
    if "{split}" in source:
        return {split: load_rows(source.format(split=split)) for split in splits}
    if Path(source).expanduser().exists():
        return {Path(source).stem: load_rows(source)}
    return {split: load_rows(source, split) for split in splits}


def longreason_items(rows_by_split: dict[str, list[dict]], source: str) -> list[dict]:
    """One item per split and question: the dataset's `prompt` as the user turn, gold letter `answer`.
    A row's `category` (reading comprehension, logical inference, math word problem) is used when the
    data has one: the Hub's field for it is not documented."""
    items = []
    for split, rows in rows_by_split.items():
        for index, row in enumerate(rows):
            prompt = require(row, index, f"{source} [{split}]", "prompt", str)
            gold = require(row, index, f"{source} [{split}]", "answer", str).strip().upper()
            items.append({"id": f"{split}/{row.get('example_idx', index)}", "split": split,
                          "category": row.get("category"), "gold": gold,
                          "prompt": [{"role": "user", "content": prompt}]})
    return items


def score_longreason(items: list[dict], responses: dict[str, list[str]]) -> tuple[list[dict], dict]:
    """The chosen letter: "the answer is X", else "Answer: X", else the last letter written as an option
    ("(B)", "B is correct", "option B", a letter ending a sentence; `common.rewards.extract_choice`)."""
    records = []
    for item in items:
        verdicts = [check_choice(text, item["gold"]) for text in responses[item["id"]]]
        records.append({**item, "responses": responses[item["id"]], "extracted": [v.extracted for v in verdicts],
                        "correct": [v.correct for v in verdicts], "parse_failed": [v.parse_failed for v in verdicts]})
    summary = {"items": len(items)}
    order = {split: i for i, split in enumerate(LONGREASON_ORDER)}
    splits = sorted({r["split"] for r in records}, key=lambda s: (order.get(s, len(order)), s))
    for split in splits:
        mine = [r for r in records if r["split"] == split]
        summary[f"accuracy/{split}"] = round(100 * avg_at_k([r["correct"] for r in mine]), 2)
        summary[f"parse_failures_%/{split}"] = percent(sum(sum(r["parse_failed"]) for r in mine),
                                                       sum(len(r["parse_failed"]) for r in mine))
        for category in sorted({r["category"] for r in mine if r["category"] is not None}):
            group = [r["correct"] for r in mine if r["category"] == category]
            summary[f"accuracy/{split}/{category}"] = round(100 * avg_at_k(group), 2)
    return records, summary


def plot_longreason(summary: dict, path: Path, title: str) -> Path | None:
    points = [(key.split("/")[1], value) for key, value in summary.items() if key.count("/") == 1
              and key.startswith("accuracy/")]
    if len(points) < 2:
        return None
    fig, ax = _figure((5, 3.2))
    ax.plot([p[0] for p in points], [p[1] for p in points], marker="o")
    ax.set(xlabel="split (context length)", ylabel="accuracy (%)", ylim=(-2, 102), title=title)
    ax.grid(alpha=0.3)
    return _save(fig, path)


# --------------------------------------------------------------------------------------------------
# ToolHop: multi-hop questions answered by calling 3-7 locally executable tools, up to 9 turns
# --------------------------------------------------------------------------------------------------

# The authors' prompts (code/evaluation_open.py), their typos ("nswer") kept.
_TOOLHOP_FORMAT = (
    "If the final answer is a date, format is as follows: YYYY-MM-DD (ISO standard)\n"
    "If the final nswer is a name, format it as follows: Firstname Lastname\n"
    "If the final answer contains any number, format it as a number, not a word, and only output that number. "
    "Do not include leading 0s.\n\n"
    "Please provide the final answer in the following format: <answer>final answer here</answer>\n"
    "Answer as short as possible.\nQuestion: {question}"
)
TOOLHOP_PROMPTS = {
    "direct": (
        "You will be asked a question, and should provide a short answer.\n"
        "If the answer is a date, format is as follows: YYYY-MM-DD (ISO standard)\n"
        "If the answer is a name, format it as follows: Firstname Lastname\n"
        "If the answer contains any number, format it as a number, not a word, and only output that number. "
        "Do not include leading 0s.\n\n"
        "Please provide the answer in the following format: <answer>your answer here</answer>\n"
        "Answer as short as possible.\nQuestion: {question}"
    ),
    "mandatory": (
        "You will be asked a question with some tools, and should provide a short final answer.\n"
        "Please note that you must call the tool at every step, you must not use your own knowledge. "
        "Your final answer must also be returned from the tool.\n" + _TOOLHOP_FORMAT
    ),
    "free": "You will be asked a question with some tools, and should provide a short final answer.\n" + _TOOLHOP_FORMAT,
}
INVOCATION_ERRORS = ("tool_hallucination", "parameter_hallucination", "parameter_missing")
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def toolhop_items(rows: list[dict], source: str, scenario: str) -> list[dict]:
    """One item per query; tools as OpenAI function documents in the row's (hop) order, none for Direct."""
    items = []
    for index, row in enumerate(rows):
        question = require(row, index, source, "question", str)
        gold = str(require(row, index, source, "answer", (str, int, float)))
        tools = require(row, index, source, "tools", dict)
        functions = require(row, index, source, "functions", list)
        offered = [{"type": "function", "function": tool} for tool in tools.values()]
        items.append({"id": str(row.get("id", index)), "question": question, "gold": gold,
                      "tools": None if scenario == "direct" else offered, "functions": functions,
                      "prompt": [{"role": "user", "content": TOOLHOP_PROMPTS[scenario].format(question=question)}]})
    return items


class QueryCall(NamedTuple):
    """A tool call of a model reply, and the query whose tool sources run it."""

    item: dict
    call: dict


def run_toolhop(sampler, tokenizer, items: list[dict], sampling: Sampling, max_turns: int,
                tool_timeout: float, seed: int) -> dict[str, list[list[dict]]]:
    """The authors' loop, batched over queries: each turn, every unfinished conversation gets one model
    reply; its tool calls run (all of the turn's calls in parallel, each in its own sandboxed process)
    and come back as tool messages. A conversation ends with a reply that calls no tool, or at
    `max_turns`. Returns one conversation per query (the prompt included)."""
    from tqdm.auto import tqdm

    from common.sampling import encode_prompt

    conversations = {item["id"]: [dict(m) for m in item["prompt"]] for item in items}
    active = list(items)
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for turn in tqdm(range(max_turns if any(i["tools"] for i in items) else 1), desc="toolhop turns"):
            prompts = [encode_prompt(tokenizer, conversations[i["id"]], i["tools"]) for i in active]
            samples = sampler.generate(prompts, n=1, max_new_tokens=sampling.max_new_tokens,
                                       temperature=sampling.temperature, top_p=sampling.top_p, seed=seed + turn)
            calls = []  # every call of this turn, in order
            for sample in samples:
                item = active[sample.prompt_index]
                reply = parse_assistant_turn(sample.text)
                message = {"role": "assistant", "content": reply.content, "raw": sample.text}
                if reply.calls:
                    message["tool_calls"] = [{"type": "function", "function": call} for call in reply.calls]
                conversations[item["id"]].append(message)
                if item["tools"]:
                    calls += [QueryCall(item, call) for call in reply.calls]
            results = pool.map(lambda job: call_tool(job.item["functions"], job.call, tool_timeout), calls)
            for (item, call), content in zip(calls, results):
                conversations[item["id"]].append({"role": "tool", "name": call["name"], "content": content})
            active = list({item["id"]: item for item, _ in calls}.values())  # those that called a tool
            if not active:
                break
    return {key: [conversation] for key, conversation in conversations.items()}


def call_tool(functions: list[str], call: dict, timeout: float) -> str:
    """One call, run from the row's sources that define its name (the last definition is the one called);
    a name no source defines gets the authors' NameError text ("name 'x' is not defined")."""
    return execute_tool(find_tool_source(functions, call["name"]), call["name"], call["arguments"], timeout)


def _norm(text: str) -> str:
    return text.rstrip(".0").replace(",", "").lower()


def toolhop_correct(messages: list[dict], gold: str) -> bool:
    """The authors' rule: the last message is an assistant reply with content, and the gold (trailing
    "." and "0" characters stripped, lower-cased) is a substring of that reply or, failing that, of the
    tool message just before it. Lenient: gold "10" becomes "1"; gold "0" matches any reply."""
    last = messages[-1] if messages else {}
    if last.get("role") != "assistant" or not last.get("content"):
        return False
    target = gold.rstrip(".0").lower()
    if target in _norm(last["content"]):
        return True
    before = messages[-2] if len(messages) > 1 else {}
    return before.get("role") == "tool" and target in _norm(str(before.get("content", "")))


def toolhop_strict_answer(messages: list[dict]) -> str | None:
    """The last <answer>...</answer> of the final assistant reply: what the prompt asks for."""
    last = messages[-1] if messages else {}
    if last.get("role") != "assistant":
        return None
    found = _ANSWER_TAG.findall(last.get("content") or "")
    return found[-1].strip() if found else None


def strict_equal(predicted: str, gold: str) -> bool:
    """Numbers compared as numbers ("289" = "289.0", "1,000" = "1000"), anything else as text after
    lower-casing and collapsing spaces."""
    try:
        return float(predicted.replace(",", "")) == float(gold.replace(",", ""))
    except ValueError:
        return " ".join(predicted.lower().split()) == " ".join(gold.lower().split())


def as_conversation(response) -> list[dict]:
    """A saved response: a conversation (list of messages), or a bare string taken as the final reply."""
    return [{"role": "assistant", "content": response}] if isinstance(response, str) else response


def score_toolhop(items: list[dict], responses: dict[str, list]) -> tuple[list[dict], dict]:
    """Answer correctness by the authors' rule over a fixed denominator, every query of the data (995
    for the full set; a query that produced nothing counts as wrong), and the strict variant; invocation
    errors per query (share of queries with at least one erroneous call) and per call (share of calls)."""
    records = []
    for item in items:
        conversations = [as_conversation(r) for r in responses[item["id"]]]
        stored = [call_from_message(call) for messages in conversations for m in messages
                  if m.get("role") == "assistant" for call in m.get("tool_calls") or []]
        calls = [call for call in stored if call is not None]
        raws = [m.get("raw", "") for messages in conversations for m in messages if m.get("role") == "assistant"]
        strict = [toolhop_strict_answer(messages) for messages in conversations]
        records.append({
            "id": item["id"], "question": item["question"], "gold": item["gold"], "responses": conversations,
            "correct": [toolhop_correct(messages, item["gold"]) for messages in conversations],
            "strict_answer": strict,
            "strict_correct": [a is not None and strict_equal(a, item["gold"]) for a in strict],
            "turns": sum(m.get("role") == "assistant" for messages in conversations for m in messages),
            "calls": [{"name": c["name"], "arguments": c["arguments"],
                       "errors": invocation_errors(c, item["tools"]) if item["tools"] else []} for c in calls],
            "malformed_calls": sum(len(parse_assistant_turn(raw).malformed) for raw in raws) + stored.count(None),
            "parallel_calls": any(len(m.get("tool_calls") or []) > 1 for messages in conversations for m in messages),
        })
    n = len(items)
    summary = {
        "queries": n,
        "answer_correctness": percent(sum(mean(r["correct"]) for r in records), n),
        "answer_correctness_strict": percent(sum(mean(r["strict_correct"]) for r in records), n),
        "no_answer_tag_%": percent(sum(a is None for r in records for a in r["strict_answer"]),
                                   sum(len(r["strict_answer"]) for r in records)),
    }
    if any(item["tools"] for item in items):
        all_calls = [c for r in records for c in r["calls"]]
        summary["invocation_error_query_%"] = percent(sum(any(c["errors"] for c in r["calls"]) for r in records), n)
        summary["invocation_error_instance_%"] = percent(sum(bool(c["errors"]) for c in all_calls), len(all_calls))
        for kind in INVOCATION_ERRORS:
            summary[f"{kind}_query_%"] = percent(sum(any(kind in c["errors"] for c in r["calls"]) for r in records), n)
            summary[f"{kind}_instance_%"] = percent(sum(kind in c["errors"] for c in all_calls), len(all_calls))
        summary["calls_per_query"] = round(len(all_calls) / n, 2)
        summary["turns_per_query"] = round(sum(r["turns"] for r in records) / n, 2)
        summary["parallel_calls_query_%"] = percent(sum(r["parallel_calls"] for r in records), n)
        summary["malformed_tool_calls"] = sum(r["malformed_calls"] for r in records)
    return records, summary


def plot_toolhop(summary: dict, path: Path, title: str) -> Path:
    """Answer correctness by the authors' lenient rule (the official number) beside the strict one, which
    reads only the final reply's <answer> tag: the gap is what the lenient rule credits."""
    fig, ax = _figure((4.5, 3.2))
    labels = ["official\n(authors' rule)", "strict\n(<answer> tag)"]
    values = [summary["answer_correctness"] or 0, summary["answer_correctness_strict"] or 0]
    bars = ax.bar(range(2), values, width=0.5, color=["tab:blue", "tab:orange"])
    ax.bar_label(bars, fmt="%.2f")
    ax.set_xticks(range(2), labels)
    ax.set(ylabel="answer correctness (%)", ylim=(0, 110), title=f"{title}\n{summary['queries']} queries")
    return _save(fig, path)


# --------------------------------------------------------------------------------------------------
# Driver: models, generation, saved responses, outputs
# --------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=2)
def load_sampler(model: str, backend: str, dtype: str, batch_size: int, tensor_parallel_size: int,
                 gpu_memory_utilization: float, max_model_len: int | None, seed: int):
    """(sampler, tokenizer) for a model, loaded once per run even when two benchmarks share it."""
    from common.models import load_policy, load_tokenizer
    from common.sampling import HFSampler, VLLMSampler
    from common.vision import is_vision_language_model, load_vision_sampler

    print(f"loading {model} ({backend})")
    model = resolve_model(model)
    if is_vision_language_model(model):
        engine = {"gpu_memory_utilization": gpu_memory_utilization, "tensor_parallel_size": tensor_parallel_size,
                  "seed": seed, **({"max_model_len": max_model_len} if max_model_len else {})}
        return load_vision_sampler(model, backend, dtype, batch_size, **(engine if backend == "vllm" else {}))
    if backend == "vllm":
        tokenizer = load_tokenizer(model)
        # each generation's seed is the call's (`generate(seed=...)`); the engine's own seed is fixed
        sampler = VLLMSampler(model, tokenizer, gpu_memory_utilization=gpu_memory_utilization,
                              tensor_parallel_size=tensor_parallel_size, max_model_len=max_model_len, dtype=dtype)
        return sampler, tokenizer
    import torch

    policy, tokenizer = load_policy(model, dtype, device="cuda" if torch.cuda.is_available() else None)
    return HFSampler(policy, tokenizer, batch_size=batch_size), tokenizer


def resolve_model(name: str) -> str:
    """The directory of the tiny CPU models: the shipped warm start, or random ones built on first use and
    cached; any other name is returned as is."""
    from common.cache import CACHE_DIR, build_once, shipped_model

    if name == "tiny-arithmetic":
        return shipped_model(name)
    if name not in ("tiny-random", "tiny-vlm"):
        return name
    from common.models import build_tiny_model
    from common.vision import build_tiny_vlm
    from tasks.arithmetic import tiny_corpus

    build = build_tiny_model if name == "tiny-random" else build_tiny_vlm
    return str(build_once(CACHE_DIR / name, lambda folder: build(folder, tiny_corpus())))


def sampler_for(args: Args, model: str):
    return load_sampler(model, args.backend, args.dtype, args.batch_size, args.tensor_parallel_size,
                        args.gpu_memory_utilization, args.max_model_len, args.seed)


def generate(sampler, items: list[dict], sampling: Sampling, seed: int) -> tuple[dict, dict]:
    """`sampling.samples` responses per item, and whether each was cut at max_new_tokens."""
    samples = sampler.generate([item["prompt"] for item in items], n=sampling.samples,
                               max_new_tokens=sampling.max_new_tokens, temperature=sampling.temperature,
                               top_p=sampling.top_p, seed=seed)
    responses = {item["id"]: [] for item in items}
    truncated = {item["id"]: [] for item in items}
    for sample in samples:
        key = items[sample.prompt_index]["id"]
        responses[key].append(sample.text)
        truncated[key].append(sample.finish_reason == "length")
    return responses, truncated


def is_conversation(value) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in value)


def read_responses(path: str, known_ids: set[str], conversations: bool) -> dict[str, list]:
    """Saved generations, one JSON object per line: {"id": ..., "responses": [...]}, by id."""
    if not Path(path).is_file():
        raise DataError(f"--responses {path}: no such file")
    found = {}
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}: line {number} is not JSON ({error})") from error
        if not isinstance(row, dict) or "id" not in row or not isinstance(row.get("responses"), list):
            raise DataError(f'{path}: line {number} needs the fields "id" and "responses" (a list), '
                            f'as in {{"id": "60", "responses": ["... Answer: 204"]}}')
        if not all(isinstance(r, str) or (conversations and is_conversation(r)) for r in row["responses"]):
            kind = "strings or conversations (lists of messages)" if conversations else "strings"
            raise DataError(f"{path}: line {number}: every response must be one of: {kind}")
        if str(row["id"]) not in known_ids:
            raise DataError(f"{path}: line {number}: id {row['id']!r} is not an item of the data "
                            f"(ids look like {sorted(known_ids)[:3]})")
        found[str(row["id"])] = row["responses"]
    return found


def responses_for(items: list[dict], found: dict[str, list], path: str) -> dict[str, list]:
    """The saved responses of every item to score; a DataError naming the first items that have none."""
    missing = [item["id"] for item in items if not found.get(item["id"])]
    if missing:
        raise DataError(f"{path} has no responses for {len(missing)} of the {len(items)} items "
                        f"(first: {missing[:5]}); give every item at least one, or use --limit")
    return {item["id"]: found[item["id"]] for item in items}


def evaluate(args: Args, sampler=None, tokenizer=None, judge=None) -> dict:
    """Run one benchmark and write its outputs; returns {"summary", "items", ...}.

    `sampler` (and, for ToolHop, the `tokenizer` that renders its prompts) and the RoR-Bench `judge`
    replace --model and --judge-model: any object with the samplers' `generate(...)` will do.
    """
    check_args(args)
    sampling = sampling_for(args)
    hub_id, hub_split, _ = BENCHMARKS[args.bench]
    source = args.data or hub_id
    if args.bench == "longreason":
        rows_by_split = longreason_rows(source, args.splits)
        everything = longreason_items(rows_by_split, source)
        items = longreason_items({split: rows[: args.limit] for split, rows in rows_by_split.items()}, source)
    else:
        rows = load_rows(source, hub_split)
        build = {"aime24": lambda r: aime_items(r, source, args.aime_protocol),
                 "ror_bench": lambda r: ror_items(r, source, args.forced_correct),
                 "toolhop": lambda r: toolhop_items(r, source, args.scenario)}[args.bench]
        everything, items = build(rows), build(rows[: args.limit])
    if not items:
        raise DataError(f"{source}: no rows to evaluate")

    truncated, image_pairs = None, len({i["pair"] for i in items if i.get("modality") == "image"})
    if args.responses:
        found = read_responses(args.responses, {item["id"] for item in everything}, args.bench == "toolhop")
        if args.bench == "ror_bench":  # image problems are scored when the file answers them
            items = answerable_items(items, images=any(i["id"] in found for i in items if i["modality"] == "image"))
        responses = responses_for(items, found, args.responses)
    else:
        if sampler is None:
            sampler, tokenizer = sampler_for(args, args.model)
        elif args.bench == "toolhop" and tokenizer is None:
            raise UsageError("ToolHop renders each query's tools into its prompt: pass the sampler's tokenizer too")
        if args.bench == "ror_bench":  # a text-only model cannot see an image problem
            items = answerable_items(items, images=getattr(sampler, "accepts_images", False))
        print(f"[{args.bench}] generating for {len(items)} items: {sampling}")
        if args.bench == "toolhop":
            responses = run_toolhop(sampler, tokenizer, items, sampling, args.max_turns, args.tool_timeout, args.seed)
        else:
            responses, truncated = generate(sampler, items, sampling, args.seed)

    if args.bench == "aime24":
        records, summary = score_aime(items, responses, args.aime_protocol)
    elif args.bench == "ror_bench":
        if judge is None and args.judge_model:
            judge, _ = sampler_for(args, args.judge_model)
        judgements = judge_all(judge, items, responses) if judge is not None else None
        records, summary = score_ror(items, responses, judgements)
        if image_pairs and "image/pairs" not in summary:
            summary["image/pairs_not_evaluated"] = image_pairs
            print(f"[ror_bench] {image_pairs} image pairs not evaluated: " + (
                "the responses file answers none of them" if args.responses else "the model is text-only; give a "
                "vision-language model (Qwen/Qwen2.5-VL-7B-Instruct, or tiny-vlm on a CPU) to score them"))
    elif args.bench == "longreason":
        records, summary = score_longreason(items, responses)
    else:
        records, summary = score_toolhop(items, responses)
    if truncated is not None:
        for record in records:
            record["truncated"] = truncated[record["id"]]
        summary["truncated_%"] = percent(sum(sum(t) for t in truncated.values()),
                                         sum(len(t) for t in truncated.values()))
    return write_outputs(args, sampling, source, records, summary, responses)


def write_outputs(args: Args, sampling: Sampling, source: str, records: list[dict], summary: dict,
                  responses: dict) -> dict:
    out_dir = Path(args.out_dir or f"runs/evals/{args.bench}")
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = {"benchmark": args.bench, "model": None if args.responses else args.model, "data": source,
                "responses_file": args.responses, **({} if args.responses else dataclasses.asdict(sampling))}
    if args.bench == "aime24":
        settings["protocol"] = args.aime_protocol
    if args.bench == "ror_bench":
        settings |= {"judge_model": args.judge_model, "forced_correct": args.forced_correct}
    if args.bench == "toolhop":
        settings |= {"scenario": args.scenario, "max_turns": args.max_turns, "tool_timeout": args.tool_timeout}
    result = {"settings": settings, "summary": summary, "items": records}
    (out_dir / "results.json").write_text(json.dumps(result, ensure_ascii=False, indent=1, default=str), encoding="utf-8")
    with (out_dir / "responses.jsonl").open("w", encoding="utf-8") as f:
        for key, texts in responses.items():
            f.write(json.dumps({"id": key, "responses": texts}, ensure_ascii=False) + "\n")
    title = f"{args.bench}: {Path(settings['model'] or args.responses).name}"
    table = "\n".join(f"| {key} | {'n/a' if value is None else value} |" for key, value in summary.items())
    described = ", ".join(f"{k}={v}" for k, v in settings.items() if v is not None and k != "benchmark")
    (out_dir / "results.md").write_text(f"# {title}\n\n{described}\n\n| metric | value |\n| --- | --- |\n{table}\n",
                                        encoding="utf-8")
    plot = {"aime24": plot_pass_at_k, "ror_bench": plot_ror, "longreason": plot_longreason,
            "toolhop": plot_toolhop}[args.bench]
    plot(summary, out_dir / f"{args.bench}.png", title)
    print(f"[{args.bench}] {json.dumps(summary, ensure_ascii=False)}\n[{args.bench}] results in {out_dir}/")
    return result


def _figure(figsize):
    """A bare Figure and its axes, not pyplot: writing a file must not change a notebook's backend."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    return fig, fig.subplots()


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def cpu_default(args: Args) -> list[dict]:
    """`python evals.py`: --model on AIME 2024 (DAPO protocol, k=4) and 20 queries of the ToolHop subset
    (Mandatory), with short responses. It shows the whole pipeline working on a laptop in a few minutes;
    the tiny model's scores are 0."""
    if args.data or args.responses:
        raise UsageError("--data and --responses need --bench: the CPU default reads two benchmarks")
    defaults, results = Args(), []
    for bench, small in CPU_DEFAULT.items():
        hub_id, _, local_copy = BENCHMARKS[bench]
        local = DATA_DIR / local_copy
        if not local.is_file():
            print(f"[{bench}] no local copy at {local}; reading {hub_id} from the hub "
                  f"(offline: download it elsewhere, then run --bench {bench} --data FILE)")
        chosen = {key: value for key, value in small.items() if getattr(args, key) == getattr(defaults, key)}
        results.append(evaluate(dataclasses.replace(
            args, bench=bench, data=os.path.relpath(local) if local.is_file() else None,
            out_dir=str(Path(args.out_dir) / bench) if args.out_dir else None, **chosen)))
    print("CPU default done: these numbers show that the pipeline runs end to end, not what the papers "
          "measure; the README gives the real-scale commands and the numbers to compare with.")
    return results


def main(argv: list[str] | None = None):
    """The command line: bad input (an unknown benchmark, a data or responses file with a missing field,
    a model that cannot be found) ends with one clear message instead of a traceback."""
    from common.models import ModelNotFoundError

    args = tyro.cli(Args, args=argv, description=__doc__.split("\n\n")[0])
    try:
        return cpu_default(args) if args.bench is None else evaluate(args)
    except (UsageError, DataError, ModelNotFoundError) as error:
        raise SystemExit(f"error: {error}") from error


if __name__ == "__main__":
    main()
