"""TL-Training: MAE on the paper's figure trajectory, PKT's weights and key tokens with real tokenizers,
every reward category and its precedence, the PPO math, bad input, and a short end-to-end run."""

import json
import math

import pytest
import torch

import tl_training as tl
from common.data import DataError
from common.sft import IGNORE_INDEX
from tasks import tool_use

# Fig. 2's tool set, as JSON schemas (the figure's camelCase names, as in its MAE panel).
FIGURE_TOOLS = [
    {"type": "function", "function": {"name": "getPaperDetails", "description": "Details of a paper.", "parameters": {
        "type": "object", "properties": {"paperId": {"type": "string"}, "fields": {"type": "string"}},
        "required": ["paperId"]}}},
    {"type": "function", "function": {"name": "getPapersByKeywords", "description": "Search papers.", "parameters": {
        "type": "object", "properties": {"query": {"type": "string"}, "fields": {"type": "string"},
                                         "publicationTypes": {"type": "string"}, "openAccessPdf": {"type": "string"}},
        "required": ["query"]}}},
    {"type": "function", "function": {"name": "finish", "description": "Give the answer.", "parameters": {
        "type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}}},
]


def call(name, **arguments):
    return {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
        "name": name, "arguments": arguments}}]}


# Fig. 2 (left): a call missing its required parameter and a call to a tool that does not exist, each answered
# by an error and then corrected.
FIGURE_TRAJECTORY = [
    {"role": "user", "content": "I am interested in case paper related to tool learning published in 'ICLR.'"},
    call("getPapersByKeywords", keyword="tool learning", venue="ICLR", limit=1),
    {"role": "tool", "content": "getPapersByKeywords missing 1 positional argument: query"},
    call("getPapersByKeywords", query="tool learning", venue="ICLR", limit=1),
    {"role": "tool", "content": '{"data": {"paperId": "ICLR2024TOOLLEARNING"}}'},
    call("getPaperByDetail", paperId="ICLR2024TOOLLEARNING"),
    {"role": "tool", "content": "name getPaperByDetail is not defined"},
    call("getPaperDetails", paperId="ICLR2024TOOLLEARNING"),
    {"role": "tool", "content": '{"detail": {"title": "ToolLLM"}}'},
    call("finish", answer="I have found a paper published in ICLR: ToolLLM."),
]


# ---- (1) MAE ----

def test_mae_finds_the_figures_two_adverse_calls_and_trains_the_rest():
    assert tl.adverse_turns(FIGURE_TRAJECTORY) == [1, 5]
    trained = tl.trained_turns(FIGURE_TRAJECTORY, mae=True)
    assert [i for i, t in enumerate(trained) if t] == [3, 7, 9]
    assert [i for i, t in enumerate(tl.trained_turns(FIGURE_TRAJECTORY, mae=False)) if t] == [1, 3, 5, 7, 9]


@pytest.mark.parametrize("output,is_error", [
    ("an error occured when call f: name 'f' is not defined", True),
    ("f() got an unexpected keyword argument 'x'", True),
    ('{"Error": "rate limited"}', True),  # the normalised keyword 'error' matches any "error"
    ("TERRORISM statistics: 12", True),  # ... even inside a word: the official rule, kept as is
    ('{"title": "ToolLLM"}', False),
    ("", False),
])
def test_error_feedback_follows_the_official_keyword_rule(output, is_error):
    assert tl.is_error_feedback(output) is is_error


def test_adverse_turns_stay_in_context_but_get_no_loss(tiny_model_dir):
    from common.models import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model_dir))
    conversation = {"messages": FIGURE_TRAJECTORY, "tools": FIGURE_TOOLS}
    example = tl.sft_example(tokenizer, conversation, tl.trained_turns(FIGURE_TRAJECTORY, mae=True), w_max=9)
    text = tokenizer.decode(example["input_ids"])
    trained_text = tokenizer.decode([t for t, label in zip(example["input_ids"], example["labels"]) if label != IGNORE_INDEX])
    assert '"keyword": "tool learning"' in text and "getPaperByDetail" in text  # still in the context
    assert "keyword" not in trained_text and "getPaperByDetail" not in trained_text  # but never a target
    assert trained_text.count("<tool_call>") == 3 and "getPaperDetails" in trained_text
    trained = [j for j, label in enumerate(example["labels"]) if label != IGNORE_INDEX]
    assert sorted({example["responses"][j] for j in trained}) == [3, 7, 9]  # the three trained calls
    assert all(r == -1 for j, r in enumerate(example["responses"]) if j not in trained)


def test_raw_trajectory_format_loads_and_keeps_a_hallucinated_call_answered_by_an_error(tmp_path):
    raw = {"id": "Turn 1: figure", "conversations": [{"role": "system", "content": json.dumps(FIGURE_TOOLS)}] + [
        {"role": "function", "content": m["content"]} if m["role"] == "tool" else
        {"role": m["role"], "content": m["content"]} if m["role"] == "user" else
        {"role": "assistant", "content": m["tool_calls"][0]["function"]["name"] + "\n" +
         json.dumps(m["tool_calls"][0]["function"]["arguments"])}
        for m in FIGURE_TRAJECTORY]}
    path = tmp_path / "raw_data.json"
    path.write_text(json.dumps([raw]))
    [conversation] = tl.load_conversations(str(path), "train", tl.parse_args(["--scale", "paper"]))
    assert conversation["messages"] == FIGURE_TRAJECTORY
    assert [t["function"]["name"] for t in conversation["tools"]] == ["getPaperDetails", "getPapersByKeywords", "finish"]
    assert [t["gold"]["name"] for t in tl.call_targets(conversation)] == ["getPapersByKeywords", "getPaperDetails", "finish"]


def test_bad_rows_stop_with_an_error_naming_the_row():
    with pytest.raises(DataError, match=r"data.jsonl: row 3 \(id 'q7'\).*unknown role 'observation'"):
        tl.conversation_from_row({"id": "q7", "messages": [{"role": "observation", "content": "x"}]}, 3, "data.jsonl")
    row = {"id": "q8", "messages": [{"role": "user", "content": "hi"}, call("getPaperByDetail", paperId="1"),
                                    {"role": "tool", "content": '{"title": "ToolLLM"}'}], "tools": FIGURE_TOOLS}
    with pytest.raises(DataError, match=r"row 4 \(id 'q8'\).*'getPaperByDetail', which is not among the declared"):
        tl.conversation_from_row(row, 4, "data.jsonl")
    with pytest.raises(DataError, match=r"raw.json: row 0: .*unknown role 'observation'"):
        tl.conversation_from_row({"conversations": [{"role": "observation", "content": "x"}]}, 0, "raw.json")


# ---- (2) PKT ----

@pytest.mark.parametrize("non_key,key,weight", [(22, 2, 9.0), (18, 2, 9.0), (49, 1, 9.0), (8, 2, 4.0), (1, 2, 1.0)])
def test_key_token_weights_on_the_figures_counts(non_key, key, weight):
    keys = list(range(0, 2 * key, 2))
    weights = tl.key_token_weights(non_key + key, keys, w_max=9)
    assert [weights[k] for k in keys] == [weight] * key
    assert sum(weights) == pytest.approx(weight * key + non_key)
    assert tl.key_token_weights(non_key + key, keys, w_max=1) == [1.0] * (non_key + key)


def test_key_token_positions_on_the_figures_tokens():
    """Fig. 2: ▁get P apers By Key words vs ▁get P aper Details vs ▁finish: key tokens ▁get and apers."""
    call_tail = ["(", "▁query", "▁=", "▁'", "tool", "')"]
    papers_by_keywords = ["▁get", "P", "apers", "By", "Key", "words"] + call_tail
    paper_details = ["▁get", "P", "aper", "Details"] + call_tail
    finish = ["▁finish"] + call_tail
    assert tl.key_token_positions(papers_by_keywords, [paper_details, finish]) == [0, 2]
    assert tl.key_token_positions(paper_details, [papers_by_keywords, finish]) == [0, 2]
    assert tl.key_token_positions(finish, [paper_details, papers_by_keywords]) == [0]
    # a name that is a prefix of another: the choice is made on the token after the name
    assert tl.key_token_positions(["▁get", "P", "("], [["▁get", "P", "aper", "("]]) == [0, 2]


def char_level_tokenizer():
    """A tokenizer with one token per character: nothing like the tiny BPE, to show PKT needs only offsets."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from common.models import QWEN25_CHAT_TEMPLATE

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>"]
    vocab = {t: i for i, t in enumerate(specials + [chr(c) for c in range(32, 127)] + ["\n"])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.add_special_tokens({"additional_special_tokens": specials[1:]})
    fast.chat_template = QWEN25_CHAT_TEMPLATE
    return fast


@pytest.mark.parametrize("which", ["tiny_bpe", "char_level"])
def test_pkt_weights_through_the_chat_template_with_real_tokenizers(which, tiny_model_dir):
    from common.models import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model_dir)) if which == "tiny_bpe" else char_level_tokenizer()
    tools = [{"type": "function", "function": {"name": n, "parameters": {"type": "object", "properties": {
        "query": {"type": "string"}}}}} for n in ("get_papers_by_keywords", "get_paper_details", "finish")]
    messages = [{"role": "user", "content": "Papers on tool learning?"},
                call("get_papers_by_keywords", query="tool learning")]
    example = tl.sft_example(tokenizer, {"messages": messages, "tools": tools}, [False, True], w_max=9)
    encoding = tokenizer(tokenizer.decode(example["input_ids"]), add_special_tokens=False, return_offsets_mapping=True)
    text = tokenizer.decode(example["input_ids"])
    name_at = text.rindex("get_papers_by_keywords")
    trained = [j for j, label in enumerate(example["labels"]) if label != IGNORE_INDEX]
    keys = [j for j in trained if example["weights"][j] > 1]
    starts = [encoding["offset_mapping"][j][0] for j in keys]
    # the first key token starts the name; the second starts inside the shared prefix "get_paper" ... "s"
    assert len(keys) == 2 and starts[0] <= name_at < encoding["offset_mapping"][keys[0]][1]
    assert name_at < starts[1] <= name_at + len("get_paper")
    if which == "char_level":
        assert [text[s] for s in starts] == ["g", "s"]  # get_paper|s vs get_paper|_details
    non_key = len(trained) - 2
    assert example["weights"][keys[0]] == min(non_key / 2, 9)
    assert all(example["weights"][j] == 1 for j in trained if j not in keys)
    assert all(example["weights"][j] == 1 for j in range(len(example["input_ids"])) if j not in trained)


def test_weighted_cross_entropy_equals_the_hand_computed_value():
    # one sequence of 3 tokens over a vocabulary of 2; tokens 1 and 2 are trained, weights 9 and 1
    logits = torch.tensor([[[0.0, math.log(3.0)], [math.log(4.0), 0.0], [0.0, 0.0]]])
    labels = torch.tensor([[IGNORE_INDEX, 1, 1]])
    weights = torch.tensor([[0.0, 9.0, 1.0]])
    # p(token 1 = 1) = 3/4 from the logits at 0, p(token 2 = 1) = 1/5 from the logits at 1
    expected = (9 * -math.log(3 / 4) + 1 * -math.log(1 / 5)) / 10
    assert tl.weighted_cross_entropy(logits, labels, weights, 10.0).item() == pytest.approx(expected, rel=1e-6)


def test_weighted_cross_entropy_is_the_same_for_any_split_of_the_batch():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 7, 11, generator=g)
    labels = torch.randint(0, 11, (4, 7), generator=g)
    labels[:, :3] = IGNORE_INDEX
    weights = torch.rand(4, 7, generator=g) * 9 + 1
    total = (weights[:, 1:] * (labels[:, 1:] != IGNORE_INDEX)).sum()
    whole = tl.weighted_cross_entropy(logits, labels, weights, total)
    parts = sum(tl.weighted_cross_entropy(logits[i : i + 1], labels[i : i + 1], weights[i : i + 1], total) for i in range(4))
    assert torch.allclose(whole, parts, atol=1e-6)
    ones = torch.ones_like(weights)
    from common.sft import token_mean_cross_entropy
    plain = tl.weighted_cross_entropy(logits, labels, ones, (labels[:, 1:] != IGNORE_INDEX).sum())
    assert torch.allclose(plain, token_mean_cross_entropy(logits, labels), atol=1e-6)



def two_responses_of_different_length():
    """A batch of two conversations over a vocabulary of 2, every trained label 1: A's response has 3 trained
    tokens with PKT weights 2, 1, 1 and probabilities 1/2, 1/4, 1/5; B's has one token, weight 1, probability 3/4."""
    logit = lambda p: [0.0, math.log(p / (1 - p))]  # p(token 1) = p
    logits = torch.tensor([[logit(1 / 2), logit(1 / 4), logit(1 / 5), [0.0, 0.0]],
                           [[0.0, 0.0], [0.0, 0.0], logit(3 / 4), [0.0, 0.0]]])
    labels = torch.tensor([[IGNORE_INDEX, 1, 1, 1], [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 1]])
    weights = [[0.0, 2.0, 1.0, 1.0], [0.0, 0.0, 0.0, 1.0]]
    responses = [[-1, 5, 5, 5], [-1, -1, -1, 3]]  # the index of the message each trained token belongs to
    return logits, labels, weights, responses


@pytest.mark.parametrize("normalization", ["token", "sample"])
def test_pkt_normalization_by_hand_and_over_two_processes(normalization):
    logits, labels, weights, responses = two_responses_of_different_length()
    ce_a, ce_b = [-math.log(p) for p in (1 / 2, 1 / 4, 1 / 5)], -math.log(3 / 4)
    if normalization == "token":  # Fig. 2: every token of the data counts, so A's three tokens outweigh B's one
        expected = (2 * ce_a[0] + ce_a[1] + ce_a[2] + ce_b) / 5
    else:  # the official GCELoss per response, then the mean over the two responses
        expected = ((2 * ce_a[0] + ce_a[1] + ce_a[2]) / 4 + ce_b / 1) / 2
    normalized = [tl.normalized_weights(w, r, normalization) for w, r in zip(weights, responses)]
    if normalization == "sample":
        assert normalized == [[0.0, 0.5, 0.25, 0.25], [0.0, 0.0, 0.0, 1.0]]
    denominator = sum(w for row in normalized for w in row[1:])  # the batch's, as run_sft computes it from all rows
    assert denominator == (5 if normalization == "token" else 2)  # tokens' weights, or the number of responses
    whole = tl.weighted_cross_entropy(logits, labels, torch.tensor(normalized), denominator)
    assert whole.item() == pytest.approx(expected, rel=1e-6)
    # each process takes one conversation and divides by the whole batch's denominator; the averaged gradients of
    # `loss * num_processes` then add up to the whole batch's loss
    shares = [tl.weighted_cross_entropy(logits[i : i + 1], labels[i : i + 1], torch.tensor(normalized[i : i + 1]),
                                        denominator) for i in range(2)]
    assert sum(shares).item() == pytest.approx(expected, rel=1e-6)


def test_sample_normalization_gives_every_response_of_a_conversation_weight_one():
    weights, responses = [0.0, 9.0, 1.0, 1.0, 0.0, 1.0, 1.0, 0.0], [-1, 2, 2, 2, -1, 4, 4, -1]
    normalized = tl.normalized_weights(weights, responses, "sample")
    assert normalized == pytest.approx([0.0, 9 / 11, 1 / 11, 1 / 11, 0.0, 0.5, 0.5, 0.0])
    assert tl.normalized_weights(weights, responses, "token") == weights


# ---- (3) IRM: every category, its reward and the precedence between them ----

GOLD = {"name": "getPapersByKeywords", "arguments": {"query": "tool learning", "fields": {"venue": "ICLR", "limit": 1}}}


def qwen(name, arguments):
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": arguments}) + "\n</tool_call>"


@pytest.mark.parametrize("predicted,category", [
    # all right, whatever the quoting, spacing and nesting
    (qwen("getPapersByKeywords", GOLD["arguments"]), "correct"),
    ('<tool_call>{ "name" :"getPapersByKeywords" ,\n  "arguments":{"fields" : {"limit":1, "venue":"ICLR"},'
     '"query":   "tool learning"} }</tool_call>', "correct"),
    ("<tool_call>{'name': 'getPapersByKeywords', 'arguments': {'query': 'tool learning', "
     "'fields': {'venue': 'ICLR', 'limit': 1}}}</tool_call>", "correct"),
    ('<tool_call>{"name": "getPapersByKeywords", "arguments": "{\\"query\\": \\"tool learning\\", '
     '\\"fields\\": {\\"venue\\": \\"ICLR\\", \\"limit\\": 1}}"}</tool_call>', "correct"),
    ("I will search. " + qwen("getPapersByKeywords", GOLD["arguments"]), "correct"),
    # the official Python-call syntax, single or double quotes, extra spaces
    ("getPapersByKeywords(query='tool learning', fields={'venue': 'ICLR', 'limit': 1})", "correct"),
    ('getPapersByKeywords( query = "tool learning" , fields = {"venue": "ICLR", "limit": 1} )', "correct"),
    # format errors: unparseable, unterminated, two calls, no call, garbage
    ('<tool_call>{"name": "getPapersByKeywords", "arguments": {"query": </tool_call>', "format_error"),
    ('<tool_call>\n{"name": "getPapersByKeywords", "arguments": {}}', "format_error"),
    (qwen("getPapersByKeywords", GOLD["arguments"]) * 2, "format_error"),
    ("The answer is 42.", "format_error"),
    ('<tool_call>{"arguments": {}}</tool_call>', "format_error"),
    ('<tool_call>["getPapersByKeywords"]</tool_call>', "format_error"),
    ('<tool_call>{"name": "getPapersByKeywords", "arguments": [1]}</tool_call>', "format_error"),
    ("getPapersByKeywords(**{'query': 'x'})", "format_error"),
    ("(" * 5000 + ")" * 5000, "format_error"),
    ("\x00\udcff<tool_call>", "format_error"),
    # Fig. 2's samples: S1 a tool that is not given, S2 a parameter the tool does not have, S3 a wrong value
    (qwen("get_papers_by_keys", GOLD["arguments"]), "tool_hallucination"),
    (qwen("getPapersByKeywords", {"keyword": "tool learning", "fields": {"venue": "ICLR", "limit": 1}}),
     "param_hallucinated_and_redundant_or_missing"),  # Fig. 2 calls S2 "parameter hallucination, -0.8"; it also misses query
    (qwen("getPapersByKeywords", {"query": "learning", "fields": {"venue": "ICLR", "limit": 1}}), "content_filling_issue"),
    (qwen("getPapersByKeywords", {"query": "tool learning", "fields": {"venue": "ICLR", "limit": 2}}), "content_filling_issue"),
    (qwen("getPaperDetails", {"paperId": "P1"}), "wrong_tool"),
    # the five parameter-identification cases
    (qwen("getPapersByKeywords", {"keyword": "x", "openAccessPdf": "y"}), "param_hallucinated_redundant_missing"),
    (qwen("getPapersByKeywords", {"keyword": "x", "query": "tool learning", "openAccessPdf": "y",
                                  "fields": {"venue": "ICLR", "limit": 1}}), "param_hallucinated_and_redundant_or_missing"),
    (qwen("getPapersByKeywords", {"query": "tool learning", "openAccessPdf": "y"}), "param_redundant_and_missing"),
    (qwen("getPapersByKeywords", {**GOLD["arguments"], "venue": "ICLR"}), "param_hallucinated"),
    (qwen("getPapersByKeywords", {"query": "tool learning"}), "param_redundant_or_missing"),
    (qwen("getPapersByKeywords", {**GOLD["arguments"], "openAccessPdf": "y"}), "param_redundant_or_missing"),
])
def test_every_reward_category_on_hand_written_calls(predicted, category):
    assert tl.classify_tool_call(predicted, GOLD, FIGURE_TOOLS) == category
    assert tl.tool_call_reward(predicted, GOLD, FIGURE_TOOLS) == tl.REWARDS[category]


def test_reward_table_is_the_papers():
    assert tl.REWARDS == {
        "format_error": -2, "tool_hallucination": -2, "wrong_tool": -1.5,
        "param_hallucinated_redundant_missing": -1.8, "param_hallucinated_and_redundant_or_missing": -1.3,
        "param_redundant_and_missing": -1.0, "param_hallucinated": -0.8, "param_redundant_or_missing": -0.5,
        "content_filling_issue": -0.25, "correct": 1}


def test_precedence_tool_errors_before_parameter_errors_before_values():
    wrong_everything = {"keyword": "x", "openAccessPdf": "y"}  # hallucinated, redundant and missing at once
    assert tl.classify_tool_call(qwen("nope", wrong_everything), GOLD, FIGURE_TOOLS) == "tool_hallucination"
    assert tl.classify_tool_call(qwen("finish", wrong_everything), GOLD, FIGURE_TOOLS) == "wrong_tool"
    assert tl.classify_tool_call(qwen("getPapersByKeywords", {"keyword": "tool learning", "query": "wrong",
                                                             "fields": {"venue": "ICLR", "limit": 1}}),
                                 GOLD, FIGURE_TOOLS) == "param_hallucinated"  # a parameter error outranks the value


# ---- (3) PPO math ----

def reference_gae(rewards, values, lengths, gamma, lam):
    out = torch.zeros_like(rewards, dtype=torch.float64)
    for i, n in enumerate(lengths):
        for t in range(n):
            out[i, t] = sum((gamma * lam) ** k * (rewards[i, t + k] + gamma * (values[i, t + k + 1] if t + k + 1 < n else 0.0)
                                                  - values[i, t + k]) for k in range(n - t))
    return out


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.5), (1.0, 1.0)])
def test_gae_matches_a_slow_loop_and_ignores_padding(seed, gamma, lam):
    g = torch.Generator().manual_seed(seed)
    lengths = [5, 1, 3]
    mask = (torch.arange(6)[None] < torch.tensor(lengths)[:, None]).float()
    rewards, values = torch.randn(3, 6, generator=g), torch.randn(3, 6, generator=g)
    advantages = tl.gae(rewards, values, mask, gamma, lam)
    expected = reference_gae(rewards * mask, values, lengths, gamma, lam)
    assert torch.allclose(advantages.double(), expected, atol=1e-5)
    noisy = values + (1 - mask) * 100  # values and rewards past the end change nothing
    assert torch.allclose(tl.gae(rewards + (1 - mask) * 7, noisy, mask, gamma, lam), advantages, atol=1e-5)


def test_gae_with_gamma_and_lambda_one_is_monte_carlo_return_minus_value():
    rewards, values, mask = torch.tensor([[0.1, -0.2, 1.0]]), torch.tensor([[0.5, 0.3, 0.2]]), torch.ones(1, 3)
    advantages = tl.gae(rewards, values, mask, 1.0, 1.0)
    returns = torch.tensor([[0.9, 0.8, 1.0]])  # the Monte-Carlo returns to go
    assert torch.allclose(advantages, returns - values)


def test_kl_penalized_rewards_put_the_call_reward_on_the_last_token():
    logprobs = torch.tensor([[-1.0, -2.0, -1.0], [-0.5, -0.5, 0.0]])
    ref = torch.tensor([[-1.5, -2.0, -0.5], [-0.5, -1.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    rewards = tl.kl_penalized_rewards(logprobs, ref, mask, torch.tensor([1.0, -2.0]), kl_coef=0.4)
    assert torch.allclose(rewards, torch.tensor([[-0.2, 0.0, 1.2], [0.0, -0.2 - 2.0, 0.0]]))


def test_ppo_losses_on_hand_computed_values():
    old = torch.zeros(1, 3)
    new = torch.log(torch.tensor([[1.5, 0.5, 1.0]]))  # ratios 1.5, 0.5, 1.0
    advantages, mask = torch.tensor([[1.0, 1.0, -2.0]]), torch.ones(1, 3)
    loss, clipped = tl.ppo_policy_loss(new, old, advantages, mask, clip=0.2, total_tokens=3)
    # token 0: min(1.5, 1.2)·1 -> 1.2; token 1: min(0.5, 0.8) -> 0.5 (unclipped side); token 2: ratio 1 -> -2
    assert loss.item() == pytest.approx(-(1.2 + 0.5 - 2.0) / 3)
    assert clipped.tolist() == [[True, False, False]]
    values, old_values, returns = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.5, 0.0]]), torch.tensor([[0.0, 1.0]])
    value_loss = tl.ppo_value_loss(values, old_values, returns, torch.ones(1, 2), clip=0.2, total_tokens=2)
    assert value_loss.item() == pytest.approx(0.5 * (max(1.0, 0.7 ** 2) + 1.0) / 2)


# ---- the synthetic task ----

def test_synthetic_task_tools_share_prefixes_and_the_executor_answers_mistakes_with_errors():
    task = tool_use.ToolUseTask(seed=3, adverse_rate=1.0)
    conversations = task.conversations(12, "train")
    mistakes = set()
    for conversation in conversations:
        messages, requests = conversation["messages"], conversation["requests"]
        assert messages[1]["content"] == " ".join(requests) and len(requests) in (1, 2)
        # every call is preceded by a mistake that the tool answers with an error, then made right and run
        adverse = tl.adverse_turns(messages)
        assert adverse == [2 + 4 * k for k in range(len(requests))]
        for i in adverse:
            assert messages[i + 1]["content"].startswith("an error occured when call")
            assert messages[i + 3]["role"] == "tool" and not tl.is_error_feedback(messages[i + 3]["content"])
            mistakes.add((tl.function_of(messages[i + 2]["tool_calls"][0])["name"],
                          json.dumps(tl.function_of(messages[i]["tool_calls"][0]), sort_keys=True)))
        # the last turn answers in text, from the tools' outputs
        assert "tool_calls" not in messages[-1] and messages[-1]["content"].startswith("Result: ")
        assert messages[-1]["content"].endswith(messages[-2]["content"])
        targets = tl.call_targets(conversation)
        assert [len(t["messages"]) for t in targets] == [4 * k + 4 for k in range(len(requests))]
    assert any(len(c["requests"]) == 2 for c in conversations)
    kinds = {}
    for tool, wrong in mistakes:
        kinds.setdefault(tool, set()).add(wrong)
    assert any(len(wrongs) > 1 for wrongs in kinds.values())  # a tool's mistakes vary
    names = [t["function"]["name"] for t in tool_use.PAPER_SEARCH.schemas()]
    assert sum(n.startswith("get_paper_") for n in names) == 2 and sum(n.startswith("get_papers_by_") for n in names) == 2
    seen = {text for c in conversations for text in c["requests"]}
    test = task.conversations(20, "test", exclude=seen)
    assert all(not tl.adverse_turns(c["messages"]) for c in test)
    assert not seen & {text for c in test for text in c["requests"]}  # every test request is new


def test_every_mistake_of_the_synthetic_tools_fails_in_the_tool():
    task = tool_use.ToolUseTask(seed=0, adverse_rate=1.0)
    rng = __import__("random").Random(0)
    calls = []
    for name, tool in tool_use.PAPER_SEARCH.tools.items():
        gold = {"name": name, "arguments": {p: tool_use.PAPER_SEARCH.values[p][0] for p in tool.required + tool.optional}}
        for mistake in tool.mistakes:
            one = tool_use.ToolUseTask(tool_use.dataclasses.replace(
                tool_use.PAPER_SEARCH, tools={name: tool._replace(mistakes=[mistake])}), adverse_rate=1.0)
            calls.append(one.mistake(gold, rng))
    outputs = tool_use.execute_calls(task.domain.source, calls)
    assert len(calls) == 12 and all(tl.is_error_feedback(output) for output in outputs.values())


def test_signatures_template_shows_tools_as_signatures_and_renders_the_rest_like_qwen25(tiny_model_dir):
    from common.models import QWEN25_CHAT_TEMPLATE, load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model_dir))
    [conversation] = tool_use.ToolUseTask(seed=5, adverse_rate=1.0).conversations(1, "train")
    messages, tools = conversation["messages"], conversation["tools"]
    qwen = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, chat_template=QWEN25_CHAT_TEMPLATE)
    signatures = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                               chat_template=tool_use.SIGNATURES_CHAT_TEMPLATE)
    assert "\nget_paper_citations(title: string, limit: integer = None)\n" in signatures
    assert signatures.split("<|im_start|>user", 1)[1] == qwen.split("<|im_start|>user", 1)[1]
    tokenizer.chat_template = tool_use.SIGNATURES_CHAT_TEMPLATE
    example = tl.sft_example(tokenizer, conversation, tl.trained_turns(messages, mae=True), w_max=9)
    assert sum(w > 1 for w in example["weights"]) >= 2  # PKT finds the name through any template


# ---- end to end ----

def test_copying_drill_gives_travel_hundreds_of_one_token_values_and_keeps_its_integers():
    """The base model's pretraining data: every string value is one token, quoted in a query and in a call, and
    no word of the prompts; too many values to memorise, so the tiny model must learn to copy them."""
    from common.models import build_tokenizer
    from tasks.tiny_tool_use import TinyBase

    tokenizer = build_tokenizer(tool_use.tiny_corpus([tool_use.PAPER_SEARCH, tool_use.TRAVEL]), TinyBase().vocab_size)
    drill = tool_use.copying_drill(tool_use.TRAVEL, tokenizer)
    words = drill.values["city"]
    assert drill.values["airline"] == words and len(words) >= 300 and len(set(words)) == len(words)
    assert drill.values["days"] == tool_use.TRAVEL.values["days"] and drill.values["stars"] == tool_use.TRAVEL.values["stars"]
    assert drill.tools == tool_use.TRAVEL.tools and not {"get", "city", "arguments", "name", "You"} & set(words)
    for conversation in tool_use.without_tools(tool_use.ToolUseTask(drill, adverse_rate=0.0, max_calls=1,
                                                                          answers=False).conversations(20, "train")):
        assert conversation["tools"] == []
        city = conversation["messages"][-1]["tool_calls"][0]["function"]["arguments"]["city"]
        assert city in words and tokenizer.convert_tokens_to_ids(city) in tokenizer(conversation["messages"][1]["content"])["input_ids"]


def tiny_args(model_dir, run_dir, *extra):
    return tl.parse_args([
        "--model", str(model_dir), "--run-dir", str(run_dir), "--train-conversations", "24", "--eval-queries", "6", "--adverse-rate", "0.5",
        "--sft-epochs", "1", "--sft-batch-size", "8", "--sft-micro-batch-size", "4", "--irm-epochs", "0.25",
        "--rollout-batch-size", "6", "--ppo-micro-batch-size", "3", "--max-new-tokens", "8", "--eval-every", "1",
        "--checkpoint-every", "1", "--no-compare-plain-sft", *extra,
    ])


@pytest.mark.slow
def test_all_three_stages_run_write_metrics_plots_and_resume(tiny_model_dir, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    run_dir = tl.train(tiny_args(tiny_model_dir, tmp_path / "run"))
    mae = json.loads((run_dir / "mae" / "summary.json").read_text())
    assert mae["adverse_turns"] > 0 and mae["trained_turns"] == mae["assistant_turns"] - mae["adverse_turns"]
    evaluations = json.loads((run_dir / "evaluations.json").read_text())
    assert list(evaluations) == ["start", "SFT + MAE + PKT", "+ IRM (PPO)"]
    for evaluation in evaluations.values():
        assert sum(evaluation[f"eval/{c}"] for c in tl.CATEGORIES) == pytest.approx(1.0)
    assert (run_dir / "error_categories.png").stat().st_size > 10_000
    sft_rows = [json.loads(line) for line in (run_dir / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in sft_rows] == [1, 2, 3, 3]
    irm_rows = [json.loads(line) for line in (run_dir / "irm" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in irm_rows] == [1, 2]
    for key in ("reward/mean", "policy/kl_to_sft", "policy/clipfrac", "value/loss", "eval/accuracy", "rollout/correct"):
        assert key in irm_rows[-1]
    assert (run_dir / "sft" / "curves.png").is_file() and (run_dir / "irm" / "curves.png").is_file()
    sft, irm = load_file(str(run_dir / "sft/model/model.safetensors")), load_file(str(run_dir / "irm/model/model.safetensors"))
    assert all(not torch.equal(sft[name], irm[name]) for name in sft), "PPO left a policy tensor unchanged"

    # a run killed during PPO continues from its last checkpoint, without redoing SFT
    import shutil
    shutil.rmtree(run_dir / "irm" / "model")
    shutil.rmtree(run_dir / "irm" / "checkpoint-000002")
    monkeypatch.setattr(tl, "run_sft", lambda *a, **k: pytest.fail("a finished stage ran again"))
    tl.train(tiny_args(tiny_model_dir, tmp_path / "run", "--resume"))
    irm_rows = [json.loads(line) for line in (run_dir / "irm" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in irm_rows] == [1, 2]
    assert (run_dir / "irm" / "model" / "evaluation.json").is_file()


def test_stage_mae_alone_writes_the_masked_data_and_loads_no_model(tmp_path, monkeypatch):
    monkeypatch.setattr(tl, "resolve_model", lambda *a: pytest.fail("--stages mae loaded a model"))
    run_dir = tl.train(tiny_args("unused", tmp_path / "run", "--stages", "mae", "--train-conversations", "10"))
    rows = [json.loads(line) for line in (run_dir / "mae" / "data.jsonl").read_text().splitlines()]
    assert len(rows) == 10
    for row in rows:
        assert row["trained"] == tl.trained_turns(row["messages"], mae=True)


# ---- slow, obviously correct reference loops ----

def test_weighted_cross_entropy_matches_a_slow_loop():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 6, 5, generator=g)
    labels = torch.randint(0, 5, (3, 6), generator=g)
    labels[0, :2] = IGNORE_INDEX
    labels[2, 4:] = IGNORE_INDEX
    weights = torch.rand(3, 6, generator=g) * 8 + 1
    numerator = denominator = 0.0
    for b in range(3):
        for t in range(1, 6):  # token t is predicted from the logits at t - 1
            if labels[b, t] != IGNORE_INDEX:
                numerator += weights[b, t].item() * -torch.log_softmax(logits[b, t - 1], -1)[labels[b, t]].item()
                denominator += weights[b, t].item()
    assert tl.weighted_cross_entropy(logits, labels, weights, denominator).item() == pytest.approx(
        numerator / denominator, rel=1e-5)


def test_key_token_weights_match_the_formula_token_by_token():
    for n in range(1, 30):
        for keys in ([0], [0, 3], [0, 1, 2]):
            keys = [k for k in keys if k < n]
            weights = tl.key_token_weights(n, keys, w_max=9)
            for t in range(n):
                expected = min(max((n - len(keys)) / len(keys), 1), 9) if t in keys else 1
                assert weights[t] == expected


def test_ppo_pieces_match_slow_loops():
    g = torch.Generator().manual_seed(2)
    lengths = [4, 2, 3]
    mask = (torch.arange(4)[None] < torch.tensor(lengths)[:, None]).float()
    logprobs, old, ref = (-torch.rand(3, 4, generator=g) for _ in range(3))
    advantages, values, old_values, returns = (torch.randn(3, 4, generator=g) for _ in range(4))
    final = torch.tensor([1.0, -2.0, -0.25])
    rewards = tl.kl_penalized_rewards(logprobs, ref, mask, final, kl_coef=0.3)
    pg, _ = tl.ppo_policy_loss(logprobs, old, advantages, mask, clip=0.2, total_tokens=sum(lengths))
    vf = tl.ppo_value_loss(values, old_values, returns, mask, clip=0.2, total_tokens=sum(lengths))
    pg_sum = vf_sum = 0.0
    for b, n in enumerate(lengths):
        for t in range(n):
            expected_reward = -0.3 * (logprobs[b, t] - ref[b, t]).item() + (final[b].item() if t == n - 1 else 0.0)
            assert rewards[b, t].item() == pytest.approx(expected_reward, abs=1e-6)
            ratio = math.exp(logprobs[b, t].item() - old[b, t].item())
            a = advantages[b, t].item()
            pg_sum += max(-a * ratio, -a * min(max(ratio, 0.8), 1.2))
            clipped_value = old_values[b, t].item() + min(max(values[b, t].item() - old_values[b, t].item(), -0.2), 0.2)
            vf_sum += 0.5 * max((values[b, t].item() - returns[b, t].item()) ** 2, (clipped_value - returns[b, t].item()) ** 2)
        assert (rewards[b, n:] == 0).all()
    assert pg.item() == pytest.approx(pg_sum / sum(lengths), rel=1e-5)
    assert vf.item() == pytest.approx(vf_sum / sum(lengths), rel=1e-5)


# ---- real data: ToolHop's tools and gold calls, run through the shared tool executor ----

def toolhop_gold_calls(shared_data):
    """(tools, functions, name, keyword arguments) of each gold call of ToolHop's 15 traced queries."""
    import ast
    import re

    rows = {str(r["id"]): r for r in map(json.loads, (shared_data / "toolhop" / "toolhop_dev70.jsonl").read_text().splitlines())}
    for line in (shared_data / "toolhop" / "toolhop_dev70_gold_calls.jsonl").read_text().splitlines():
        traced = json.loads(line)
        row = rows[str(traced["id"])]
        tools, functions = json.loads(row["tools"]) if isinstance(row["tools"], str) else row["tools"], row["functions"]
        functions = ast.literal_eval(functions) if isinstance(functions, str) else functions
        tools = [{"type": "function", "function": t} for t in (ast.literal_eval(tools) if isinstance(tools, str) else tools).values()]
        for expression in traced["gold_calls"]:
            call = ast.parse(expression, mode="eval").body
            source = next(s for s in functions if re.search(rf"def {call.func.id}\(", s))
            definition = next(n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.FunctionDef) and n.name == call.func.id)
            names = [a.arg for a in definition.args.args]
            arguments = {names[i]: ast.literal_eval(a) for i, a in enumerate(call.args)}
            arguments |= {k.arg: ast.literal_eval(k.value) for k in call.keywords}
            yield tools, source, call.func.id, arguments


def test_toolhop_gold_calls_are_correct_and_a_hallucinated_parameter_becomes_an_adverse_turn(shared_data, tiny_model_dir):
    from common.models import load_tokenizer
    from common.tools import execute_tool

    calls = list(toolhop_gold_calls(shared_data))
    assert len(calls) >= 40
    for tools, _, name, arguments in calls:
        assert tl.classify_tool_call(qwen(name, arguments), {"name": name, "arguments": arguments}, tools) == "correct"
        bogus = {**arguments, "bogus_flag": True}
        assert tl.classify_tool_call(qwen(name, bogus), {"name": name, "arguments": arguments}, tools) == "param_hallucinated"
    # one query end to end: a call with a parameter the tool lacks, the executor's error, the corrected call
    tools, source, name, arguments = calls[0]
    error = execute_tool(source, name, {**arguments, "bogus_flag": True})
    output = execute_tool(source, name, arguments)
    assert tl.is_error_feedback(error) and not tl.is_error_feedback(output)
    messages = [{"role": "user", "content": "?"}, call(name, **arguments, bogus_flag=True), {"role": "tool", "content": error},
                call(name, **arguments), {"role": "tool", "content": output}]
    assert tl.adverse_turns(messages) == [1]
    conversation = tl.conversation_from_row({"id": "toolhop", "messages": messages, "tools": tools}, 0, "toolhop")
    example = tl.sft_example(load_tokenizer(str(tiny_model_dir)), conversation, tl.trained_turns(messages, mae=True), w_max=9)
    trained = [j for j, label in enumerate(example["labels"]) if label != IGNORE_INDEX]
    keys = [j for j in trained if example["weights"][j] > 1]
    assert 1 <= len(keys) <= len(tools)  # the name's first token, plus one per tool sharing a prefix with it
    assert all(example["weights"][j] == min((len(trained) - len(keys)) / len(keys), 9) for j in keys)


def test_bad_flags_and_files_stop_with_the_problem_and_the_fix(tmp_path):
    with pytest.raises(ValueError, match=r"--w-max 0.5.*use 1 for plain SFT"):
        tl.parse_args(["--w-max", "0.5"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "x", "messages": [{"role": "user", "content": "hi"}], "tools": "not json"}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl: row 0 \(id 'x'\): 'tools' is a string but not JSON"):
        tl.load_conversations(str(bad), "train", tl.parse_args([]))
    from transformers import PreTrainedTokenizerFast

    with pytest.raises(ValueError, match=r"has no chat template.*tokenizer_config.json"):
        tl.require_chat_template(PreTrainedTokenizerFast(tokenizer_object=char_level_tokenizer()._tokenizer), "my-model")


# ---- one PPO step's targets and losses, by hand and through the loop's update on a fixed rollout ----

def test_irm_targets_by_hand():
    # one 2-token call: log π_old = (-1, -2), log π_sft = (-1.5, -1), β = 0.4, R = 1, V = (0.2, 0.5), γ = 1, λ = 0.95
    # rewards: -0.4·(0.5, -1) = (-0.2, 0.4), plus R on the last token: (-0.2, 1.4)
    # δ = (-0.2 + 0.5 - 0.2, 1.4 - 0.5) = (0.1, 0.9); A = (0.1 + 0.95·0.9, 0.9) = (0.955, 0.9); returns A + V
    rewards, advantages, returns = tl.irm_targets(torch.tensor([1.0]), torch.tensor([[-1.0, -2.0]]),
                                                  torch.tensor([[-1.5, -1.0]]), torch.tensor([[0.2, 0.5]]),
                                                  torch.ones(1, 2), kl_coef=0.4, gamma=1.0, lam=0.95)
    assert rewards.tolist() == [pytest.approx([-0.2, 1.4])]
    assert advantages.tolist() == [pytest.approx([0.955, 0.9])]
    assert returns.tolist() == [pytest.approx([1.155, 1.4])]


def test_ppo_losses_by_hand():
    # ratio e^0.1 = 1.105 on token 0 (A = 1: inside the clip), e^-0.5 = 0.607 on token 1 (A = -1: clipped to 0.8)
    logprobs, old = torch.tensor([[-0.9, -2.5]]), torch.tensor([[-1.0, -2.0]])
    advantages, mask = torch.tensor([[1.0, -1.0]]), torch.ones(1, 2)
    values, old_values, returns = torch.tensor([[0.5, 0.0]]), torch.tensor([[0.2, 0.1]]), torch.tensor([[1.0, 1.0]])
    policy_loss, value_loss, clipped = tl.ppo_losses(logprobs, values, old, old_values, advantages, returns, mask,
                                                      clip=0.2, value_clip=0.2, total_tokens=2)
    assert policy_loss.item() == pytest.approx((-math.exp(0.1) + 0.8) / 2)
    assert clipped.tolist() == [[False, True]]
    # V clipped to old ± 0.2: token 0 max((0.5-1)², (0.4-1)²) = 0.36, token 1 max(1, (0-1)²) = 1
    assert value_loss.item() == pytest.approx(0.5 * (0.36 + 1.0) / 2)


def test_the_ppo_step_on_a_fixed_rollout_learns_from_the_rollout_policy_and_the_returns(tiny_model_dir, tmp_path):
    """At the update the policy is still the rollout policy, so every ratio is 1: the policy loss is the
    token mean of -A and the value loss that of ½(V - R)², with V the critic's values of the rollout and R
    = A + V. A step that took the ratio against the SFT reference, or regressed the critic on the rewards,
    would differ."""
    from accelerate import Accelerator

    from common.sampling import Sample, collate

    args = tl.parse_args(["--model", str(tiny_model_dir), "--dtype", "float32", "--no-gradient-checkpointing",
                          "--rollout-batch-size", "3", "--ppo-micro-batch-size", "2", "--kl-coef", "0.4"])
    accelerator = Accelerator()
    policy, critic, reference, tokenizer, actor_opt, critic_opt = tl.irm_models(args, str(tiny_model_dir), accelerator)
    with torch.no_grad():  # the policy moves off the SFT reference, as it has after some PPO steps
        for parameter in policy.parameters():
            parameter.mul_(1.05)
    batch = collate([Sample(0, [5, 6, 7], [8, 9, 10], "", "stop"), Sample(0, [5, 9], [12, 13, 14, 15, 16], "", "stop"),
                     Sample(0, [4], [7], "", "stop")], tokenizer.pad_token_id)
    sums, scored = tl.irm_step(policy, critic, reference, actor_opt, critic_opt, accelerator, batch,
                               torch.tensor([1.0, -1.5, 0.5]), args, step=0, total_steps=1, stage_dir=tmp_path)
    mask, n = batch.response_mask, batch.response_mask.sum()
    old, ref, values, advantages, returns = (scored[k] for k in ("old_logprobs", "ref_logprobs", "old_values",
                                                                 "advantages", "returns"))
    assert ((old - ref).abs() * mask).sum() > 0.1  # the KL reward is in play
    assert torch.allclose(returns, (advantages + values) * mask)
    assert sums["pg_loss"] == pytest.approx(float(-(advantages * mask).sum() / n), abs=1e-5)
    assert sums["value_loss"] == pytest.approx(float(0.5 * ((values - returns) ** 2 * mask).sum() / n), abs=1e-5)
    assert sums["clipped"] == 0 and sums["approx_kl"] == pytest.approx(0.0, abs=1e-6)


def test_pkt_counts_key_and_non_key_tokens_within_each_response(tiny_model_dir):
    """Fig. 2's |NK| and |K| are counted over one response (one trained assistant turn that calls a tool), not
    over the conversation: two calls of different lengths get different key weights, each its own
    |NK| / |K| (w_max large enough not to clip)."""
    from common.models import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model_dir))
    tools = [{"type": "function", "function": {"name": n, "parameters": {"type": "object", "properties": {
        "query": {"type": "string"}}}}} for n in ("get_papers_by_keywords", "get_paper_details", "finish")]
    messages = [{"role": "user", "content": "Papers on tool learning?"},
                call("get_papers_by_keywords", query="tool learning for large language models"),
                {"role": "tool", "content": "[1] Toolformer"},
                call("finish", query="Toolformer")]
    example = tl.sft_example(tokenizer, {"messages": messages, "tools": tools}, [False, True, False, True], w_max=1000)
    trained = [j for j, label in enumerate(example["labels"]) if label != IGNORE_INDEX]
    responses, run = [], [trained[0]]
    for j in trained[1:]:
        if j == run[-1] + 1:
            run.append(j)
        else:
            responses.append(run)
            run = [j]
    responses.append(run)
    assert len(responses) == 2
    key_weights = []
    for response in responses:
        keys = [j for j in response if example["weights"][j] > 1]
        assert keys, "every call has at least one key token"
        weight = example["weights"][keys[0]]
        assert all(example["weights"][j] == weight for j in keys)
        assert weight == pytest.approx((len(response) - len(keys)) / len(keys))
        key_weights.append(weight)
    assert key_weights[0] != key_weights[1]
