"""The tiny model and tokenizer round-trip through disk; sampling returns masks and log-probs as data."""

import contextlib
import json

import pytest
import torch

from common.models import build_tiny_model, load_policy, load_tokenizer, load_value_model, ModelNotFoundError
from common.sampling import HFSampler, Sample, collate, cut_response, response_logprobs, top_p_filter
from common.tools import parse_tool_calls
from tasks.arithmetic import tiny_corpus


TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


def test_tiny_model_round_trips_by_path(tiny_model_dir, tmp_path):
    model, tokenizer = load_policy(str(tiny_model_dir))
    assert model.config.model_type == "qwen2"
    text = "Compute 12+34. ünïcode 中文 <tool_call>\n{}\n</tool_call><|im_end|>"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text
    model.save_pretrained(tmp_path / "copy")
    tokenizer.save_pretrained(tmp_path / "copy")
    again, tokenizer2 = load_policy(str(tmp_path / "copy"))
    assert tokenizer2.encode(text, add_special_tokens=False) == ids
    x = torch.tensor([ids])
    assert torch.equal(model(x).logits, again(x).logits)


def test_a_real_models_shape_and_vocabulary_with_the_projects_tokenizer(tmp_path):
    # what benchmarks/real_size_step.py does at Qwen2.5's sizes, here at small ones
    shape = dict(num_hidden_layers=3, intermediate_size=100, hidden_size=64, num_attention_heads=4, vocab_size=5000)
    model, tokenizer = load_policy(str(build_tiny_model(tmp_path / "m", tiny_corpus(), config_overrides=shape)))
    assert {k: getattr(model.config, k) for k in shape} == shape
    assert len(model.model.layers) == len(model.config.layer_types) == 3
    assert len(tokenizer) < 5000 and model.get_output_embeddings().weight.shape == (5000, 64)
    assert tokenizer.decode([4999]) == ""  # an id the tokenizer lacks decodes to nothing


def test_chat_template_renders_tools_and_tool_calls_that_parse_back(tiny_model_dir):
    tokenizer = load_tokenizer(str(tiny_model_dir))
    call = {"name": "get_weather", "arguments": {"city": "Paris"}}
    messages = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": call}]},
                {"role": "tool", "content": "sunny"}]
    text = tokenizer.apply_chat_template(messages, tools=TOOLS, tokenize=False, add_generation_prompt=True)
    assert "# Tools" in text and json.dumps(TOOLS[0]) in text
    assert "<tool_response>\nsunny\n</tool_response>" in text and text.endswith("<|im_start|>assistant\n")
    assistant_turn = text.split("<|im_start|>assistant\n")[1].split("<|im_end|>")[0]
    assert parse_tool_calls(assistant_turn) == [call]
    # the tool-call tags are single tokens, as in Qwen2.5
    assert len(tokenizer.encode("<tool_call>", add_special_tokens=False)) == 1


def test_missing_model_error_names_what_was_tried():
    with pytest.raises(ModelNotFoundError) as info:
        load_policy("/no/such/dir-or-hub-id")
    message = str(info.value)
    assert "local directory" in message and "Hub" in message and "pass its path" in message


def test_value_model_has_a_scalar_head_and_round_trips(tiny_model_dir, tmp_path):
    critic = load_value_model(str(tiny_model_dir))
    x = torch.tensor([[1, 2, 3, 4]])
    values = critic(input_ids=x).logits
    assert values.shape == (1, 4, 1)
    critic.save_pretrained(tmp_path / "critic")
    again = load_value_model(str(tmp_path / "critic"))
    assert torch.allclose(again(input_ids=x).logits, values)


def test_sampler_logprobs_match_a_plain_forward_pass(tiny_model_dir):
    model, tokenizer = load_policy(str(tiny_model_dir))
    sampler = HFSampler(model, tokenizer, batch_size=5)  # several chunks, ragged prompts
    prompts = [[{"role": "user", "content": "Compute 1+2."}], [{"role": "user", "content": "A much longer prompt here."}],
               "raw text prompt", [3, 4, 5]]
    for temperature in (1.0, 0.7):
        samples = sampler.generate(prompts, n=3, max_new_tokens=12, temperature=temperature, seed=0)
        assert [s.prompt_index for s in samples] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
        batch = collate(samples, tokenizer.pad_token_id)
        ours = response_logprobs(model, batch, temperature)
        for i, s in enumerate(samples):
            assert torch.allclose(ours[i, : len(s.logprobs)], torch.tensor(s.logprobs), atol=1e-4)
        # and a plain, unbatched forward pass over prompt + response agrees
        s = samples[4]
        logits = model(torch.tensor([s.prompt_ids + s.response_ids])).logits[0, len(s.prompt_ids) - 1 : -1] / temperature
        plain = logits.log_softmax(-1).gather(-1, torch.tensor(s.response_ids)[:, None]).squeeze(-1)
        assert torch.allclose(ours[4, : len(s.response_ids)], plain, atol=1e-4)


def test_rollout_batch_layout_hand_example():
    samples = [Sample(0, [5, 6, 7], [8, 9], "", "stop"), Sample(1, [1], [2, 3, 4, 10], "", "length")]
    batch = collate(samples, pad_id=0)
    # whole sequences from column 0, padded on the right only: no padding at all here
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, 9], [1, 2, 3, 4, 10]]
    assert batch.attention_mask.tolist() == [[1] * 5, [1] * 5]
    assert batch.response_mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert batch.response_tokens().tolist()[1] == [2, 3, 4, 10]
    assert batch.response_tokens().tolist()[0][:2] == [8, 9]
    # the entry before response token t: positions 2, 3 for the first row, 0..3 for the second
    positions = torch.arange(5).repeat(2, 1)
    assert batch.response_states(positions).tolist() == [[2, 3, 4, 4], [0, 1, 2, 3]]
    first = batch.select([0])
    assert first.input_ids.tolist() == [[5, 6, 7, 8, 9]] and first.response_mask.tolist() == [[1, 1]]
    short = collate([samples[0], Sample(0, [5, 6, 7], [8], "", "stop")], pad_id=0).select([1])
    assert short.input_ids.tolist() == [[5, 6, 7, 8]] and short.response_tokens().tolist() == [[8]]


def test_same_seed_same_samples(tiny_model_dir):
    model, tokenizer = load_policy(str(tiny_model_dir))
    sampler = HFSampler(model, tokenizer)
    a = sampler.generate(["hello"], n=4, max_new_tokens=8, seed=3)
    b = sampler.generate(["hello"], n=4, max_new_tokens=8, seed=3)
    assert [s.response_ids for s in a] == [s.response_ids for s in b]


def test_response_mask_is_data_when_pad_equals_eos(tiny_model_dir):
    model, tokenizer = load_policy(str(tiny_model_dir))
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    tokenizer.pad_token = "<|im_end|>"  # Qwen base models pad with their EOS
    # make EOS likely (about 1 in 10 tokens) so that some samples stop and some hit the length limit
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.zero_()
        head.bias[eos] = 4.0
    model.lm_head = head
    samples = HFSampler(model, tokenizer).generate(["x"] * 24, n=1, max_new_tokens=6, seed=0)
    reasons = {s.finish_reason for s in samples}
    assert reasons == {"stop", "length"}
    for s in samples:
        if s.finish_reason == "stop":
            assert s.response_ids[-1] == eos and eos not in s.response_ids[:-1]
        else:
            assert len(s.response_ids) == 6 and eos not in s.response_ids
    batch = collate(samples, tokenizer.pad_token_id)
    width = batch.response_mask.shape[1]
    for i, s in enumerate(samples):  # the EOS itself is a trained token; the padding (also EOS) is not
        assert batch.response_mask[i].tolist() == [1.0] * len(s.response_ids) + [0.0] * (width - len(s.response_ids))


def test_cut_response_rules(tiny_model_dir):
    tokenizer = load_tokenizer(str(tiny_model_dir))
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids = tokenizer.encode("abc", add_special_tokens=False)
    # stops at the first end token; what follows is padding, even when it is the same id
    assert cut_response(ids + [eos, eos, eos], [eos], [], tokenizer) == (ids + [eos], "stop")
    assert cut_response(ids, [eos], [], tokenizer) == (ids, "length")
    text_ids = tokenizer.encode("x = 1\nObservation: y", add_special_tokens=False)
    cut, reason = cut_response(text_ids, [eos], ["Observation:"], tokenizer)
    assert reason == "stop" and tokenizer.decode(cut).endswith("Observation:")


def test_top_p_keeps_the_smallest_nucleus():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    probs = logits.softmax(-1)[0]  # 0.64, 0.24, 0.09, 0.03
    kept = torch.isfinite(top_p_filter(logits, 0.7))[0].tolist()
    assert kept == [True, True, False, False] and probs[0] < 0.7 < probs[:2].sum()
    assert torch.isfinite(top_p_filter(logits, 0.5))[0].tolist() == [True, False, False, False]


def test_vllm_backend_without_vllm_is_a_clear_error(tiny_model_dir):
    pytest.importorskip("torch")
    import importlib.util

    if importlib.util.find_spec("vllm") is not None and torch.cuda.is_available():
        pytest.skip("vLLM and a GPU are present")
    from common.sampling import VLLMSampler

    with pytest.raises(RuntimeError, match="requirements-gpu.txt|CUDA GPU"):
        VLLMSampler(str(tiny_model_dir), load_tokenizer(str(tiny_model_dir)))


def test_sft_micro_batches_give_the_whole_batch_loss_and_gradient(tiny_model_dir):
    """A batch run as length-sorted micro-batches, each weighted by its share of labelled tokens, has the same
    token-mean loss and the same gradient as the batch in one forward pass."""
    from common.sft import IGNORE_INDEX, sft_train

    lengths, prompt = [3, 9, 5, 14, 7, 4], 2
    examples = [{"input_ids": [(7 * k + j) % 50 + 10 for j in range(n)],
                 "labels": [IGNORE_INDEX] * prompt + [(7 * k + j) % 50 + 10 for j in range(prompt, n)]}
                for k, n in enumerate(lengths)]
    results = []
    for micro_batch_size in (None, 2):
        model, _ = load_policy(str(tiny_model_dir), "float32", False)
        losses = sft_train(model, examples, steps=1, batch_size=6, lr=1e-3, seed=3, progress=False,
                           grad_clip=1e9, micro_batch_size=micro_batch_size)
        results.append((losses, [p.grad.clone() for p in model.parameters()]))  # the step's gradient stays in .grad
    (whole_loss, whole_grads), (micro_loss, micro_grads) = results
    assert whole_loss == pytest.approx(micro_loss, rel=1e-6)
    assert any(g.abs().sum() > 0 for g in whole_grads)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-7) for a, b in zip(whole_grads, micro_grads))


def test_the_warm_start_keeps_the_last_model_inside_the_window_and_stops_at_the_target(tiny_model_dir):
    """Scripted evaluations 5%, 30%, 45%, 60% (the window 10-50%, the target 55%): training stops at the fourth,
    and the model kept is the third's (its weights, not the last step's); never inside the window is an error."""
    from common.sft import IGNORE_INDEX, sft_into_accuracy_window

    examples = [{"input_ids": [11, 12, 13, 14, 15], "labels": [IGNORE_INDEX, 12, 13, 14, 15]}]
    model, _ = load_policy(str(tiny_model_dir), "float32", False)
    scripted, snapshots = iter([0.05, 0.30, 0.45, 0.60, 0.70]), []

    def evaluate():
        snapshots.append({k: v.clone() for k, v in model.state_dict().items()})
        return {"accuracy": next(scripted)}

    threads = torch.get_num_threads()
    step, evaluation, history = sft_into_accuracy_window(
        model, examples, evaluate, (0.10, 0.50), 0.55, eval_every=2, max_steps=20, batch_size=1, lr=1e-2, seed=0)
    assert (step, evaluation) == (6, {"accuracy": 0.45})
    assert [h["step"] for h in history] == [2, 4, 6, 8] and torch.get_num_threads() == threads
    assert all(torch.equal(v, snapshots[2][k]) for k, v in model.state_dict().items())
    assert not all(torch.equal(v, snapshots[3][k]) for k, v in model.state_dict().items())

    scripted = iter([0.05, 0.60])
    with pytest.raises(RuntimeError, match=r"never reached held-out accuracy in \[10%, 50%\] within 20 steps"):
        sft_into_accuracy_window(model, examples, lambda: {"accuracy": next(scripted)}, (0.10, 0.50), 0.55,
                                 eval_every=2, max_steps=20, batch_size=1, lr=1e-2, seed=0)


def test_decoding_with_grouped_query_sdpa_on_cpu_is_transformers_sdpa(tiny_model_dir, monkeypatch):
    """The sampler's CPU attention (grouped key/value heads passed to torch's SDPA as they are) gives the logits
    of transformers' SDPA, which repeats the heads, on a left-padded batch; so the same samples and log-probs; and
    the model is given back its SDPA for training."""
    import common.sampling as sampling

    model, tokenizer = load_policy(str(tiny_model_dir))
    assert model.config.num_key_value_heads < model.config.num_attention_heads
    prompts = ["hello", "Compute 12+7-3. Show every step and the answer."]
    input_ids = torch.tensor([[0] * 9 + [11, 12, 13], list(range(20, 32))])
    attention_mask = (torch.arange(12) >= torch.tensor([[9], [0]])).long()
    for mask in (attention_mask, torch.ones_like(attention_mask)):  # with padding, and without (a causal mask only)
        logits = {}
        for implementation in ("sdpa", sampling.CPU_GQA_SDPA):
            model.set_attn_implementation(implementation)
            logits[implementation] = model(input_ids=input_ids, attention_mask=mask).logits
        model.set_attn_implementation("sdpa")
        assert torch.allclose(logits["sdpa"], logits[sampling.CPU_GQA_SDPA], atol=1e-6)

    sampler = HFSampler(model, tokenizer)
    fast = sampler.generate(prompts, n=3, max_new_tokens=12, seed=5)
    assert model.config._attn_implementation == "sdpa"
    monkeypatch.setattr(sampling, "grouped_query_decoding", lambda model: contextlib.nullcontext())
    plain = sampler.generate(prompts, n=3, max_new_tokens=12, seed=5)
    assert [s.response_ids for s in fast] == [s.response_ids for s in plain]
    assert all(a.logprobs == pytest.approx(b.logprobs, abs=1e-5) for a, b in zip(fast, plain))
