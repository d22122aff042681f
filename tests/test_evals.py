"""evals.py: each benchmark's scoring on real data (AIME 2024, the ToolHop subset) and on hand-made rows
in the documented schema (RoR-Bench, LongReason), driven by scripted models instead of real ones.

A scripted model implements the samplers' `generate(...)`: it reads each prompt (chat messages, or
token ids it decodes, which is what a real model sees) and answers with a fixed rule.
"""

import ast
import dataclasses
import itertools
import json
import math
import re

import pytest

import evals
from common.data import DataError
from common.sampling import Sample

# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


class ScriptedModel:
    """`reply(prompt_text, sample_index) -> str` decides every response."""

    def __init__(self, reply, tokenizer=None):
        self.reply, self.tokenizer, self.prompts = reply, tokenizer, []

    def generate(self, prompts, n=1, max_new_tokens=256, temperature=1.0, top_p=1.0, seed=None, stop=(), tools=None):
        samples = []
        for index, prompt in enumerate(prompts):
            if prompt and isinstance(prompt[0], dict):
                text = "\n".join(message["content"] for message in prompt)
            else:
                text = self.tokenizer.decode(prompt)
            self.prompts.append(text)
            samples += [Sample(index, [], [], self.reply(text, j), "stop") for j in range(n)]
        return samples


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from common.models import load_tokenizer

    return load_tokenizer(str(tiny_model_dir))


@pytest.fixture(scope="module")
def toolhop(shared_data):
    rows = read_jsonl(shared_data / "toolhop" / "toolhop_dev70.jsonl")
    gold_calls = {g["id"]: g["gold_calls"] for g in read_jsonl(shared_data / "toolhop" / "toolhop_dev70_gold_calls.jsonl")}
    return rows, gold_calls


def question_of(prompt_text):
    return re.search(r"Question: (.*?)<\|im_end\|>", prompt_text, re.DOTALL).group(1)


def tool_call(name, arguments):
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": arguments}) + "\n</tool_call>"


def call_from_expression(expression, functions):
    """A gold trace's Python call, e.g. `f('a', b=2)`, as a name and keyword arguments."""
    call = ast.parse(expression, mode="eval").body
    source = next(s for s in functions if re.search(rf"def {call.func.id}\(", s))
    definition = next(n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.FunctionDef) and n.name == call.func.id)
    names = [a.arg for a in definition.args.args]
    arguments = {names[i]: ast.literal_eval(a) for i, a in enumerate(call.args)}
    return call.func.id, arguments | {k.arg: ast.literal_eval(k.value) for k in call.keywords}


# --------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n, c, k, expected", [
    (5, 2, 1, 0.4), (5, 2, 2, 0.7), (5, 0, 3, 0.0), (5, 4, 2, 1.0), (4, 1, 4, 1.0), (32, 1, 1, 1 / 32),
    (10, 3, 5, 1 - math.comb(7, 5) / math.comb(10, 5)),
])
def test_pass_at_k_on_hand_counts(n, c, k, expected):
    assert evals.pass_at_k(n, c, k) == pytest.approx(expected)


def test_pass_at_k_is_the_share_of_k_subsets_holding_a_correct_sample():
    samples = [True, False, False, True, False, False]
    for k in range(1, 7):
        subsets = list(itertools.combinations(samples, k))
        assert evals.pass_at_k(6, 2, k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets))


def test_avg_at_k_averages_each_item_first():
    assert evals.avg_at_k([[True, False, False, False], [True, True, True, True]]) == pytest.approx(0.625)
    assert evals.avg_at_k([[True], [False, False, True, True]]) == pytest.approx(0.75)


# --------------------------------------------------------------------------------------------------
# AIME on the real 2024 file
# --------------------------------------------------------------------------------------------------


def aime_rescore(tmp_path, aime_file, respond):
    rows = read_jsonl(aime_file)
    responses = write_jsonl(tmp_path / "saved.jsonl", [{"id": r["id"], "responses": respond(r["answer"])} for r in rows])
    evals.main(["--bench", "aime24", "--data", str(aime_file), "--responses", responses, "--out-dir", str(tmp_path / "out")])
    return json.loads((tmp_path / "out" / "results.json").read_text())


def test_aime_gold_answers_in_every_accepted_form_score_100(tmp_path, shared_data):
    aime_file = shared_data / "aime" / "aime24.jsonl"
    # the gold keeps leading zeros ("025"); the forms below write 25 and 025 both
    result = aime_rescore(tmp_path, aime_file, lambda gold: [
        f"Step by step...\nAnswer: {int(gold)}", f"so the result is \\boxed{{{gold}}}", f"Hence $\\boxed{{{int(gold)}}}$."])
    assert result["summary"] == {"items": 30, "samples_per_item": 3, "avg@3": 100.0, "pass@1": 100.0,
                                      "pass@2": 100.0, "pass@3": 100.0, "parse_failures_%": 0.0}
    assert any(item["gold"] == "025" for item in result["items"])
    for name in ("results.md", "responses.jsonl", "aime24.png"):
        assert (tmp_path / "out" / name).is_file()
    # the written responses.jsonl is itself a valid --responses file
    assert len(read_jsonl(tmp_path / "out" / "responses.jsonl")) == 30


def test_aime_wrong_answers_score_0(tmp_path, shared_data):
    result = aime_rescore(tmp_path, shared_data / "aime" / "aime24.jsonl", lambda gold: [
        f"Answer: {int(gold) + 1}", f"\\boxed{{{int(gold) + 1}}}", "I could not solve it."])
    assert result["summary"]["avg@3"] == 0.0 and result["summary"]["pass@3"] == 0.0
    assert result["summary"]["parse_failures_%"] == pytest.approx(33.33)


def test_aime_generation_uses_the_dapo_prompt_and_k_samples(tmp_path, shared_data):
    golds = {r["problem"]: r["answer"] for r in read_jsonl(shared_data / "aime" / "aime24.jsonl")}
    # right on the first of 4 samples only: avg@4 = 25, pass@2 = 1 - C(3,2)/C(4,2) = 50, pass@4 = 100
    model = ScriptedModel(lambda text, j: f"Answer: {golds[text.split(chr(10) * 2)[1]] if j == 0 else -1}")
    args = evals.Args(bench="aime24", data=str(shared_data / "aime" / "aime24.jsonl"), samples=4, limit=5,
                      out_dir=str(tmp_path))
    summary = evals.evaluate(args, sampler=model)["summary"]
    assert summary == {"items": 5, "samples_per_item": 4, "avg@4": 25.0, "pass@1": 25.0, "pass@2": 50.0,
                            "pass@4": 100.0, "parse_failures_%": 0.0, "truncated_%": 0.0}
    assert model.prompts[0].startswith("Solve the following math problem step by step.")
    assert model.prompts[0].endswith('Remember to put your answer on its own line after "Answer:".')


def test_aime_boxed_protocol_is_greedy_with_the_qwen_math_system_prompt(shared_data):
    args = evals.Args(bench="aime24", aime_protocol="boxed")
    assert evals.sampling_for(args) == evals.Sampling(1, 0.0, 1.0, 4096)
    assert evals.sampling_for(evals.Args(bench="aime24")) == evals.Sampling(32, 1.0, 0.7, 20480)
    items = evals.aime_items(read_jsonl(shared_data / "aime" / "aime24.jsonl"), "aime24", "boxed")
    assert items[0]["prompt"][0] == {"role": "system", "content": evals.BOXED_SYSTEM}


def test_aime_boxed_protocol_reads_answers_as_the_qwen_math_harness(tmp_path, shared_data):
    aime_file = shared_data / "aime" / "aime24.jsonl"
    rows = read_jsonl(aime_file)
    forms = [lambda g: f"The answer is {int(g)}.", lambda g: f"\\boxed{{{g}}} is what we get." + " Checking." * 300,
             lambda g: f"Adding the parts gives {int(g)}"]  # none has an Answer: line or a box at the end
    saved = write_jsonl(tmp_path / "saved.jsonl", [{"id": r["id"], "responses": [forms[i % 3](r["answer"])]}
                                                    for i, r in enumerate(rows)])
    summaries = {}
    for protocol in ("boxed", "dapo"):
        evals.main(["--bench", "aime24", "--aime-protocol", protocol, "--data", str(aime_file), "--responses", saved,
                    "--out-dir", str(tmp_path / protocol)])
        summaries[protocol] = json.loads((tmp_path / protocol / "results.json").read_text())["summary"]
    assert summaries["boxed"]["pass@1"] == 100.0 and summaries["boxed"]["parse_failures_%"] == 0.0
    assert summaries["dapo"]["pass@1"] == 0.0 and summaries["dapo"]["parse_failures_%"] == 100.0


# --------------------------------------------------------------------------------------------------
# ToolHop on the real subset
# --------------------------------------------------------------------------------------------------


def run_toolhop(tmp_path, rows, reply, tokenizer, **settings):
    data = write_jsonl(tmp_path / "toolhop.jsonl", rows)
    args = evals.Args(bench="toolhop", data=data, out_dir=str(tmp_path / "out"), **settings)
    model = ScriptedModel(reply, tokenizer)
    return evals.evaluate(args, sampler=model, tokenizer=tokenizer), model


@pytest.mark.parametrize("scenario", ["direct", "mandatory"])
def test_toolhop_gold_answers_score_100_under_the_authors_rule(tmp_path, toolhop, tokenizer, scenario):
    rows, _ = toolhop
    gold = {row["question"]: row["answer"] for row in rows}
    result, model = run_toolhop(tmp_path, rows, lambda text, j: f"<answer>{gold[question_of(text)]}</answer>",
                                tokenizer, scenario=scenario)
    summary = result["summary"]
    assert summary["queries"] == 70
    assert summary["answer_correctness"] == 100.0 and summary["answer_correctness_strict"] == 100.0
    assert ("<tools>" in model.prompts[0]) == (scenario == "mandatory")
    assert ("you must call the tool at every step" in model.prompts[0]) == (scenario == "mandatory")


def gold_call_replies(rows, gold_calls, call_format=tool_call):
    """A scripted model that makes each row's gold calls in turn, in `call_format`, then answers with the
    last tool output."""
    by_question = {row["question"]: row for row in rows}

    def reply(text, _):
        row = by_question[question_of(text)]
        done = text.count("<tool_response>")
        if done < len(gold_calls[row["id"]]):
            return call_format(*call_from_expression(gold_calls[row["id"]][done], row["functions"]))
        return "<answer>" + text.rsplit("<tool_response>\n", 1)[1].split("\n</tool_response>")[0] + "</answer>"

    return reply


def test_toolhop_gold_tool_calls_reach_the_answer_through_the_real_tools(tmp_path, toolhop, tokenizer):
    rows, gold_calls = toolhop
    traced = [row for row in rows if row["id"] in gold_calls]
    result, _ = run_toolhop(tmp_path, traced, gold_call_replies(traced, gold_calls), tokenizer)
    summary = result["summary"]
    assert summary["queries"] == 15 and summary["answer_correctness"] == 100.0
    assert summary["invocation_error_query_%"] == 0.0 and summary["calls_per_query"] > 3
    for item in result["items"]:
        tool_messages = [m["content"] for m in item["responses"][0] if m["role"] == "tool"]
        assert len(tool_messages) == len(gold_calls[int(item["id"])])
        assert not any(m.startswith("an error occured") for m in tool_messages)

    # the saved conversations rescore to the same summary without any model
    saved = str(tmp_path / "out" / "responses.jsonl")
    again = evals.evaluate(evals.Args(bench="toolhop", data=str(tmp_path / "toolhop.jsonl"), responses=saved,
                                      out_dir=str(tmp_path / "again")))
    assert again["summary"] == summary


def test_toolhop_reads_llama31_tool_calls(tmp_path, toolhop, tokenizer):
    """Llama-3.1 calls as bare JSON with "parameters" (its `<|python_tag|>` is a special token, gone from the
    decoded text), the format of the paper's Llama rows."""
    rows, gold_calls = toolhop
    traced = [row for row in rows if row["id"] in gold_calls][:4]
    llama31 = lambda name, arguments: json.dumps({"name": name, "parameters": arguments})  # noqa: E731
    result, _ = run_toolhop(tmp_path, traced, gold_call_replies(traced, gold_calls, llama31), tokenizer)
    summary = result["summary"]
    assert summary["answer_correctness"] == 100.0
    assert summary["calls_per_query"] == sum(len(gold_calls[row["id"]]) for row in traced) / 4
    assert summary["invocation_error_query_%"] == 0.0 and summary["malformed_tool_calls"] == 0


def test_toolhop_hallucinated_and_missing_parameters_get_the_authors_errors(tmp_path, toolhop, tokenizer):
    row = toolhop[0][0]  # id 1: character_actor_lookup(character_name, series_name, ...)
    tool = next(iter(row["tools"].values()))
    name, required = tool["name"], tool["parameters"]["required"]
    assert required == ["character_name", "series_name"]
    script = [
        tool_call("imdb_search", {"query": "Firefly"}),  # a tool that was not offered
        tool_call(name, {"character_name": "Kaylee Frye", "series_name": "Firefly", "season": 1}),  # extra argument
        tool_call(name, {"series_name": "Firefly"}),  # a required argument left out
        tool_call(name, {"character_name": "Kaylee Frye", "series_name": "Firefly"}),  # right
        "<answer>2011</answer>",
    ]
    result, _ = run_toolhop(tmp_path, [row], lambda text, _: script[text.count("<tool_response>")], tokenizer)
    tool_messages = [m["content"] for m in result["items"][0]["responses"][0] if m["role"] == "tool"]
    assert tool_messages == [
        "an error occured when call imdb_search: name 'imdb_search' is not defined",
        f"an error occured when call {name}: {name}() got an unexpected keyword argument 'season'",
        f"an error occured when call {name}: {name}() missing 1 required positional argument: 'character_name'",
        '"Jewel Staite"',
    ]
    summary = result["summary"]
    assert summary["invocation_error_query_%"] == 100.0 and summary["invocation_error_instance_%"] == 75.0
    for kind in evals.INVOCATION_ERRORS:
        assert summary[f"{kind}_query_%"] == 100.0 and summary[f"{kind}_instance_%"] == 25.0
    assert summary["answer_correctness"] == 100.0 and summary["turns_per_query"] == 5


def test_toolhop_rescores_conversations_saved_in_the_openai_format(tmp_path, toolhop):
    """The authors save calls as OpenAI messages: `arguments` a JSON string, an id, content None before a call."""
    row = toolhop[0][0]
    name = next(iter(row["tools"].values()))["name"]

    def calling(called, arguments):
        return {"role": "assistant", "content": None, "tool_calls": [
            {"id": f"call_{called}", "type": "function", "function": {"name": called, "arguments": json.dumps(arguments)}}]}

    conversation = [
        {"role": "user", "content": "question"},
        calling("imdb_search", {"query": "Firefly"}),  # not offered
        {"role": "tool", "content": "an error occured when call imdb_search: ...", "tool_call_id": "call_imdb_search"},
        calling(name, {"character_name": "Kaylee Frye", "series_name": "Firefly", "season": 1}),  # extra argument
        calling(name, {"series_name": "Firefly"}),  # a required argument left out
        calling(name, {"character_name": "Kaylee Frye", "series_name": "Firefly"}),  # right
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_x", "type": "function", "function": {"name": name, "arguments": "[1, 2]"}}]},  # no object
        {"role": "tool", "content": '"Jewel Staite"', "tool_call_id": "call_x"},
        {"role": "assistant", "content": "<answer>2011</answer>"},
    ]
    data = write_jsonl(tmp_path / "toolhop.jsonl", [row])
    saved = write_jsonl(tmp_path / "saved.jsonl", [{"id": row["id"], "responses": [conversation]}])
    result = evals.evaluate(evals.Args(bench="toolhop", data=data, responses=saved, out_dir=str(tmp_path / "out")))
    assert [c["errors"] for c in result["items"][0]["calls"]] == [
        ["tool_hallucination"], ["parameter_hallucination"], ["parameter_missing"], []]
    summary = result["summary"]
    assert summary["invocation_error_instance_%"] == 75.0 and summary["malformed_tool_calls"] == 1
    for kind in evals.INVOCATION_ERRORS:
        assert summary[f"{kind}_instance_%"] == 25.0


def test_toolhop_hostile_tools_are_contained_and_the_run_completes(tmp_path, toolhop, tokenizer):
    outside = tmp_path / "escaped.txt"
    hostile = {
        "spin": "def spin():\n    while True:\n        pass\n",
        "hog": "def hog():\n    kept = []\n    while True:\n        kept.append(bytes(10**8))\n",
        "bomb": "import os\ndef bomb():\n    while True:\n        os.fork()\n",
        "scribble": f"def scribble():\n    open({str(outside)!r}, 'w').write('x')\n",
        "phone_home": "import socket\ndef phone_home():\n    socket.create_connection(('example.com', 80))\n",
        "parricide": "import os, signal\ndef parricide():\n    os.kill(os.getppid(), signal.SIGKILL)\n",
    }
    row = {**toolhop[0][0], "functions": list(hostile.values()),
           "tools": {name: {"name": name, "description": "", "parameters": {"type": "object", "properties": {},
                                                                            "required": []}} for name in hostile}}
    all_at_once = "\n".join(tool_call(name, {}) for name in hostile)  # one turn of parallel calls
    result, _ = run_toolhop(tmp_path, [row], lambda text, _: "<answer>2011</answer>" if "<tool_response>" in text
                            else all_at_once, tokenizer, tool_timeout=1.0)
    tool_messages = [m["content"] for m in result["items"][0]["responses"][0] if m["role"] == "tool"]
    assert len(tool_messages) == len(hostile)
    for name, message in zip(hostile, tool_messages):
        assert message.startswith(f"an error occured when call {name}: "), message
    assert not outside.exists()
    assert result["summary"]["answer_correctness"] == 100.0 and result["summary"]["parallel_calls_query_%"] == 100.0


def test_toolhop_model_garbage_is_a_failure_not_a_crash(tmp_path, toolhop, tokenizer):
    rows = toolhop[0][:3]
    replies = ["<tool_call>\n{{{ not json\n</tool_call>", "", "\x00\ufffd<answer>"]
    result, _ = run_toolhop(tmp_path, rows, lambda text, _: replies[[r["question"] for r in rows].index(question_of(text))],
                            tokenizer)
    summary = result["summary"]
    assert summary["answer_correctness"] == 0.0 and summary["answer_correctness_strict"] == 0.0
    assert summary["malformed_tool_calls"] == 1 and summary["no_answer_tag_%"] == 100.0


def test_toolhop_a_tool_name_defined_twice_runs_and_is_checked_as_its_later_definition(tmp_path, toolhop, tokenizer):
    row = next(r for r in toolhop[0] if r["id"] == 130)  # two extract_first_name tools with different parameters
    later_only = {"full_name": "Chloë Alexandra Adele Emily Agnew", "ignore_prefixes": ["Ms."]}
    earlier_only = {"full_name": "Spencer Willis", "international_format": True}
    script = [tool_call("extract_first_name", later_only), tool_call("extract_first_name", earlier_only), "<answer>2</answer>"]
    result, _ = run_toolhop(tmp_path, [row], lambda text, _: script[text.count("<tool_response>")], tokenizer)
    tool_messages = [m["content"] for m in result["items"][0]["responses"][0] if m["role"] == "tool"]
    assert tool_messages == ['"Chloë"', "an error occured when call extract_first_name: extract_first_name() got an "
                                        "unexpected keyword argument 'international_format'"]
    assert [c["errors"] for c in result["items"][0]["calls"]] == [[], ["parameter_hallucination"]]


def test_toolhop_strict_correctness_stands_beside_the_official_lenient_one(tmp_path, toolhop, tokenizer):
    """A right last call, then a wrong final answer: the authors' rule finds the gold in the tool message and
    scores it correct (the official number); the strict one reads the <answer> tag and does not."""
    row = toolhop[0][0]  # id 1: character_actor_lookup gives "Jewel Staite"; the gold is 2011
    tool = next(iter(row["tools"].values()))
    right_call = tool_call(tool["name"], {"character_name": "Kaylee Frye", "series_name": "Firefly"})
    lenient_row = {**row, "answer": "Jewel Staite"}
    result, _ = run_toolhop(tmp_path, [lenient_row], lambda text, _: "<answer>Summer Glau</answer>"
                            if "<tool_response>" in text else right_call, tokenizer)
    summary = result["summary"]
    assert summary["answer_correctness"] == 100.0 and summary["answer_correctness_strict"] == 0.0
    assert list(summary)[1:3] == ["answer_correctness", "answer_correctness_strict"]
    table = (tmp_path / "out" / "results.md").read_text()
    assert "| answer_correctness | 100.0 |\n| answer_correctness_strict | 0.0 |" in table
    assert (tmp_path / "out" / "toolhop.png").is_file()


def test_toolhop_lenient_rule_is_the_authors(tmp_path):
    reply = [{"role": "user", "content": "q"}]
    assert evals.toolhop_correct(reply + [{"role": "assistant", "content": "<answer>1,990</answer>"}], "1990")
    assert evals.toolhop_correct(reply + [{"role": "assistant", "content": "It is 1"}], "10")  # "10" -> "1"
    assert evals.toolhop_correct(reply + [{"role": "tool", "content": '"Paris"'},
                                          {"role": "assistant", "content": "done"}], "paris")
    assert not evals.toolhop_correct(reply + [{"role": "assistant", "content": ""}], "0")
    assert not evals.toolhop_correct(reply + [{"role": "tool", "content": "2011"}], "2011")  # never answered
    assert evals.strict_equal("289", "289.0") and not evals.strict_equal("1", "10")


# --------------------------------------------------------------------------------------------------
# RoR-Bench on hand-made pairs (the paper's Figure 2 pair, and a pair whose gold is not a number)
# --------------------------------------------------------------------------------------------------

ROR_ROWS = [
    {"id": "police", "original_problem": "某警官发现前方100米处有一匪徒。警官赶紧以每秒5米的速度追。已知小偷的跑步速度为3米/秒，多少秒后警官可以追上这个匪徒？",
     "original_answer": "50秒",
     "modified_problem": "某警官发现前方100米处有一匪徒，匪徒没有发现警官。警官赶紧以每秒5米的速度追，已知小偷的跑步速度为3米/秒，多少秒后警官可以追上这个匪徒？",
     "modified_answer": "20秒"},
    {"id": "riddle", "original_problem": "一个盒子里有几个苹果？", "original_answer": "三个",
     "modified_problem": "一个空盒子里有几个苹果？", "modified_answer": "没有苹果"},
]


@pytest.mark.parametrize("output, verdict", [
    ("【评价】学生的结论正确。分数:[[1]]", 1), ("【评价】结论不同。分数：[[0]]", 0), ("Analysis... Score: [[1]]", 1),
    ("分数: [[ 0 ]]", 0), ("**分数：［［1］］**", 1), ("先写[[0]]，复核后改为 分数:[[1]]", 1),
    ("I cannot decide.", None), ("分数:[[2]]", None), ("", None), ("分数:[[1]", None),
])
def test_judge_verdicts_are_read_in_every_accepted_form(output, verdict):
    assert evals.parse_judge_verdict(output) == verdict


def test_ror_judge_scores_and_the_drop(tmp_path):
    solver = ScriptedModel(lambda text, j: "追及时间为100/(5-3)=50秒。" if "没有发现" not in text else "还是50秒。\n答案：50秒")
    judge_outputs = iter(itertools.cycle(["分数:[[1]]", "Score: [[1]]", "garbage", "分数：[[0]]", "[[ 0 ]]"]))
    judge = ScriptedModel(lambda text, j: next(judge_outputs))
    args = evals.Args(bench="ror_bench", data=write_jsonl(tmp_path / "ror.jsonl", ROR_ROWS), samples=2,
                      forced_correct=True, out_dir=str(tmp_path / "out"))
    result = evals.evaluate(args, sampler=solver, judge=judge)
    assert all(p.startswith(evals.FORCED_CORRECT_PREFIX) for p in solver.prompts)
    assert any(evals.JUDGE_PROMPT.split("【题目】")[0] in p for p in judge.prompts)
    # 8 judge outputs in the cycle's order: police/original [1, 1], police/modified [garbage -> the final-answer
    # rule: "答案：50秒" vs 20 -> 0, 0], riddle/original [0, 1], riddle/modified [1, garbage -> no number: unscored]
    verdicts = {item["id"]: item["verdicts"] for item in result["items"]}
    assert verdicts == {"police/original": [1, 1], "police/modified": [0, 0], "riddle/original": [0, 1],
                        "riddle/modified": [1, None]}
    summary = result["summary"]
    # the unscored response counts as not correct: modified is 1 of 4, not 1 of the 3 scored
    assert summary["text/original"] == 75.0 and summary["text/modified"] == 25.0 and summary["text/drop"] == 50.0
    assert summary["text/original_best_of_n"] == 100.0 and summary["text/modified_best_of_n"] == 50.0
    assert summary["text/modified_unscored"] == 1 and summary["text/original_unscored"] == 0
    assert summary["judge_parse_failures"] == 2 and summary["unscored_responses"] == 1
    assert (tmp_path / "out" / "ror_bench.png").is_file()


def test_ror_unscored_responses_stay_in_the_denominator():
    """Five pairs; the judge calls every original right, one modified right, three wrong, and its output for
    the fifth is cut before a verdict (its gold is no number, so nothing else can score it)."""
    rows = [{"id": i, "original_problem": "题", "original_answer": "是的", "modified_problem": "题", "modified_answer": "不对"}
            for i in range(5)]
    items = evals.ror_items(rows, "hand-made", forced_correct=False)
    responses = {item["id"]: ["回答"] for item in items}
    modified = ["分数:[[1]]", "分数:[[0]]", "分数:[[0]]", "分数:[[0]]", "【评价】学生的回答" + "分析" * 500]
    judgements = {f"{i}/original": ["分数:[[1]]"] for i in range(5)} | {f"{i}/modified": [modified[i]] for i in range(5)}
    _, summary = evals.score_ror(items, responses, judgements)
    assert summary["text/original"] == 100.0 and summary["text/modified"] == 20.0 and summary["text/drop"] == 80.0
    assert summary["text/modified_unscored"] == 1 and summary["judge_parse_failures"] == 1


def test_ror_without_a_judge_reads_a_final_answer_line_or_nothing(tmp_path):
    saved = write_jsonl(tmp_path / "saved.jsonl", [
        {"id": "police/original", "responses": ["追及时间 100/(5-3)=50 秒。\n答案：50秒", "答案是 \\boxed{50}", "我不知道"]},
        # the last number of each is 20, the gold; only "答：20秒" states it as the answer
        {"id": "police/modified", "responses": ["the answer is 15, not 20", "Answer: 15, not 20", "答：20秒", "需要20秒。"]},
        {"id": "riddle/original", "responses": ["三个"]},
        {"id": "riddle/modified", "responses": ["没有"]},
    ])
    args = evals.Args(bench="ror_bench", data=write_jsonl(tmp_path / "ror.jsonl", ROR_ROWS), responses=saved,
                      out_dir=str(tmp_path / "out"))
    result = evals.evaluate(args)
    verdicts = {item["id"]: item["verdicts"] for item in result["items"]}
    assert verdicts["police/original"] == [1, 1, None] and verdicts["police/modified"] == [None, None, 1, None]
    summary = result["summary"]
    assert summary["text/original"] == 50.0 and summary["text/modified"] == 20.0  # 2 of 4 and 1 of 5 responses
    assert summary["rule_scored_responses"] == 3 and summary["unscored_responses"] == 6
    assert (summary["text/original_unscored"], summary["text/modified_unscored"]) == (2, 4)


def image_pair_rows(tmp_path):
    """ROR_ROWS and two image pairs: the paper's Figure 2 pair (one image per problem, a file path and base64),
    and a pair whose problems share one image."""
    import base64
    import io

    from PIL import Image

    def png(color, size):
        buffer = io.BytesIO()
        Image.new("RGB", size, color).save(buffer, format="PNG")
        return buffer.getvalue()

    (tmp_path / "figures").mkdir(exist_ok=True)
    (tmp_path / "figures" / "mach.png").write_bytes(png("gray", (64, 48)))
    return ROR_ROWS + [
        {"id": "mach", "original_problem": "这张图由多个同样的渐变菱形构成，它们整体看起来从上而下越来越暗，对吗？",
         "original_answer": "是的（马赫带效应）", "original_image": "figures/mach.png",
         "modified_problem": "这张图由多个同样的渐变菱形构成，它们每个看起来从上而下越来越暗，对吗？",
         "modified_answer": "不对，是自下而上", "modified_image": base64.b64encode(png("white", (32, 32))).decode()},
        {"id": "checker", "original_problem": "A、B两格颜色一样吗？", "original_answer": "一样",
         "modified_problem": "A、B两格看起来颜色一样吗？", "modified_answer": "不一样",
         "image": {"bytes": None, "path": "figures/mach.png"}},
    ]


class ImageAwareModel(ScriptedModel):
    """A scripted vision-language model: it sees the prompt's messages, images included."""

    accepts_images = True

    def generate(self, prompts, n=1, **settings):
        samples = []
        for index, prompt in enumerate(prompts):
            self.prompts.append(prompt)
            samples += [Sample(index, [], [], self.reply(prompt, j), "stop") for j in range(n)]
        return samples


def first_character_judge():
    """1 when the student's answer starts as the gold does."""
    def verdict(text, _):
        gold, answer = text.split("【标准答案】 ")[1].split(" 【学生回答】 ")
        return f"分数:[[{int(gold[:1] == answer.strip()[:1])}]]"

    return ScriptedModel(verdict)


def test_ror_image_pairs_are_answered_with_their_image_and_scored_apart(tmp_path):
    solver = ImageAwareModel(lambda prompt, j: "一样" if isinstance(prompt[0]["content"], list) else "50秒")
    judge = first_character_judge()
    args = evals.Args(bench="ror_bench", data=write_jsonl(tmp_path / "ror.jsonl", image_pair_rows(tmp_path)),
                      samples=1, out_dir=str(tmp_path / "out"))
    result = evals.evaluate(args, sampler=solver, judge=judge)
    images = [m["content"][0]["image"].size for p in solver.prompts for m in p if isinstance(m["content"], list)]
    assert images == [(64, 48), (32, 32), (64, 48), (64, 48)]  # each problem's own image, the shared one twice
    assert all(isinstance(p[0]["content"], str) for p in solver.prompts[:4])  # the text pairs come first, as text
    assert not any("image" in p for p in judge.prompts[4:]) and "每个看起来" in judge.prompts[5]  # the judge reads text
    summary = result["summary"]
    # text: only police/original ("50秒") is right; image: "一样" is right for checker/original only
    assert (summary["text/pairs"], summary["text/original"], summary["text/modified"], summary["text/drop"]) == (
        2, 50.0, 0.0, 50.0)
    assert (summary["image/pairs"], summary["image/original"], summary["image/modified"], summary["image/drop"]) == (
        2, 50.0, 0.0, 50.0)
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["items"][4]["prompt"][0]["content"][0] == {"type": "image", "image": "64x48 pixels"}


def test_ror_a_text_only_model_is_given_the_text_pairs_and_the_image_pairs_are_reported_unevaluated(tmp_path):
    solver = ScriptedModel(lambda text, j: "50秒")  # a text model: no accepts_images
    args = evals.Args(bench="ror_bench", data=write_jsonl(tmp_path / "ror.jsonl", image_pair_rows(tmp_path)),
                      samples=1, out_dir=str(tmp_path / "out"))
    summary = evals.evaluate(args, sampler=solver, judge=first_character_judge())["summary"]
    assert len(solver.prompts) == 4 and summary["text/pairs"] == 2
    assert summary["image/pairs_not_evaluated"] == 2 and "image/original" not in summary
    # saved responses for the image problems get them scored, without any model
    saved = write_jsonl(tmp_path / "saved.jsonl", [{"id": f"{pair}/{variant}", "responses": ["一样"]}
                                                   for pair in ("police", "riddle", "mach", "checker")
                                                   for variant in ("original", "modified")])
    rescored = evals.evaluate(dataclasses.replace(args, responses=saved), judge=first_character_judge())["summary"]
    assert rescored["image/pairs"] == 2 and rescored["image/original"] == 50.0


@pytest.mark.parametrize("change, message", [
    ({"picture": "figures/mach.png"}, r"holds an image in \['picture'\]"),  # an unknown name must not pass as text
    ({"original_image": "figures/mach.png"}, "none for the modified one"),
    ({"original_image": "figures/absent.png", "modified_image": "figures/mach.png"}, "its image cannot be read"),
])
def test_ror_image_fields_that_cannot_be_read_name_the_expected_schema(tmp_path, change, message):
    image_pair_rows(tmp_path)
    data = write_jsonl(tmp_path / "ror.jsonl", [{**ROR_ROWS[0], **change}])
    with pytest.raises(DataError, match=message) as error:
        evals.evaluate(evals.Args(bench="ror_bench", data=data, responses=data, out_dir=str(tmp_path)))
    assert '"original_image" and "modified_image", or one "image" for both' in str(error.value)


@pytest.mark.parametrize("response, stated", [
    ("所以需要50秒。", None), ("Answer: 50 s", "50 s"), ("答案为50秒。\n验算：对", "50秒。"),
    ("步骤……\n答：50秒", "50秒"), ("\\boxed{50}", "50"), ("Answer: \\boxed{\\frac{1}{2}} m", "\\frac{1}{2}"),
])
def test_ror_final_answer_statements(response, stated):
    assert evals.final_answer(response) == stated


# --------------------------------------------------------------------------------------------------
# LongReason on hand-made rows, two splits
# --------------------------------------------------------------------------------------------------


def longreason_rows(context):
    rows = []
    for index, (answer, category) in enumerate([("B", "math"), ("C", "reading"), ("D", "reading"), ("A", "math")]):
        prompt = (f"{context}\nQuestion {index}: which option?\nA. one\nB. two\nC. three\nD. four\n"
                  "Answer with the letter of the correct option.")
        rows.append({"example_idx": index, "prompt": prompt, "answer": answer, "category": category,
                     "background": context, "final_inquiry": "which option?", "question": "which option?"})
    return rows


def test_longreason_accuracy_per_split_and_category(tmp_path):
    write_jsonl(tmp_path / "8k.jsonl", longreason_rows("short context"))
    write_jsonl(tmp_path / "32k.jsonl", longreason_rows("long context " * 50))
    replies = {  # per split, per question: letter extraction in each accepted form, and garbage
        "short": ["The answer is B.", "Answer: C", "so the right option is (D)", "I am not sure."],
        "long ": ["B is right. A careful check agrees.", "Answer: C", "D", "\x00"],  # B, not the article A
    }
    model = ScriptedModel(lambda text, j: replies[text[:5]][int(re.search(r"Question (\d)", text).group(1))])
    args = evals.Args(bench="longreason", data=str(tmp_path / "{split}.jsonl"), splits=("8k", "32k"),
                      out_dir=str(tmp_path / "out"))
    summary = evals.evaluate(args, sampler=model)["summary"]
    assert summary["accuracy/8k"] == 75.0 and summary["accuracy/32k"] == 75.0
    assert summary["accuracy/8k/reading"] == 100.0 and summary["accuracy/8k/math"] == 50.0
    assert summary["accuracy/32k/math"] == 50.0 and summary["parse_failures_%/8k"] == 25.0
    assert (tmp_path / "out" / "longreason.png").is_file()
    # one local file is the split its name says
    assert evals.longreason_rows(str(tmp_path / "8k.jsonl"), ("original",)).keys() == {"8k"}


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------


def test_unknown_benchmark_lists_the_valid_names(capsys):
    with pytest.raises(SystemExit, match="valid names: aime24, ror_bench, longreason, toolhop"):
        evals.main(["--bench", "aime2024"])
    with pytest.raises(evals.UsageError, match="aime24, ror_bench, longreason, toolhop"):
        evals.evaluate(evals.Args(bench="gsm8k"))


@pytest.mark.parametrize("bench, field", [("aime24", "answer"), ("toolhop", "functions"), ("ror_bench", "modified_answer")])
def test_a_missing_field_names_the_row_and_the_field(tmp_path, shared_data, bench, field):
    if bench == "aime24":
        rows = read_jsonl(shared_data / "aime" / "aime24.jsonl")[:5]
    elif bench == "toolhop":
        rows = read_jsonl(shared_data / "toolhop" / "toolhop_dev70.jsonl")[:5]
    else:
        rows = ROR_ROWS * 3
    rows = [dict(row) for row in rows]
    del rows[3][field]
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    with pytest.raises(SystemExit, match=rf"row 3 has no field '{field}'"):
        evals.main(["--bench", bench, "--data", data, "--responses", data, "--out-dir", str(tmp_path)])


def test_bad_responses_files_say_what_is_wrong(tmp_path, shared_data):
    data = str(shared_data / "aime" / "aime24.jsonl")
    args = evals.Args(bench="aime24", data=data, limit=2, out_dir=str(tmp_path))
    cases = {
        "not json": ("{oops", "line 1 is not JSON"),
        "no responses": ('{"id": "60"}', 'needs the fields "id" and "responses"'),
        "unknown id": ('{"id": "6000", "responses": ["Answer: 1"]}', "id '6000' is not an item of the data"),
        "missing item": ('{"id": "60", "responses": ["Answer: 1"]}', "no responses for 1 of the 2 items"),
        "not text": ('{"id": "60", "responses": [3]}', "every response must be one of: strings"),
    }
    with pytest.raises(DataError, match="no such file"):
        evals.evaluate(dataclasses.replace(args, responses=str(tmp_path / "absent.jsonl")))
    for case, (content, message) in cases.items():
        (tmp_path / "saved.jsonl").write_text(content + "\n")
        with pytest.raises(DataError, match=re.escape(message)):
            evals.evaluate(dataclasses.replace(args, responses=str(tmp_path / "saved.jsonl")))


def test_cpu_default_runs_the_pipeline_on_a_tiny_model(tmp_path, shared_data, tiny_model_dir):
    results = evals.main(["--model", str(tiny_model_dir), "--limit", "1", "--max-new-tokens", "4",
                          "--out-dir", str(tmp_path)])
    assert [r["settings"]["benchmark"] for r in results] == ["aime24", "toolhop"]
    assert results[0]["summary"]["items"] == 1 and results[0]["summary"]["samples_per_item"] == 4
    assert results[1]["summary"]["queries"] == 1
    for bench in ("aime24", "toolhop"):
        assert (tmp_path / bench / "results.json").is_file() and (tmp_path / bench / "results.md").is_file()
