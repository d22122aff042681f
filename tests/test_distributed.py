"""The multi-process plumbing's pure parts, on one process: equal micro-batch counts, the weight push's
groups, fingerprints, the pooled explained variance, and the chunked log-probs every trainer uses."""

import math

import pytest
import torch

import common.sampling
from common.distributed import (equal_micro_batches, explained_variance, full_weights, shard, split_to_count,
                                weights_fingerprint)
from common.models import load_policy
from common.sampling import Sample, collate, micro_batches, response_logprobs


def test_split_to_count_halves_the_largest_groups_until_there_are_enough():
    assert split_to_count([[0, 1, 2, 3], [4]], 3) == [[0, 1], [2, 3], [4]]
    assert split_to_count([[0, 1, 2], [3, 4]], 4) == [[0], [1], [2], [3, 4]]  # ties: the first largest
    assert split_to_count([[0], [1]], 2) == [[0], [1]]
    with pytest.raises(ValueError, match="3 non-empty micro-batches of 2 rows"):
        split_to_count([[0, 1]], 3)


def test_equal_micro_batches_on_one_process_are_the_token_budget_ones():
    lengths = [10, 50, 12, 48, 11, 100]
    assert equal_micro_batches(lengths, range(6), 120) == micro_batches(lengths, list(range(6)), 120)


def test_shard_takes_every_nth_item():
    assert shard(list(range(7)), 0, 2) == [0, 2, 4, 6] and shard(list(range(7)), 1, 2) == [1, 3, 5]
    assert shard(list(range(3)), 0, 1) == [0, 1, 2]


def test_full_weights_come_a_decoder_layer_at_a_time_and_cover_the_state(tiny_model_dir):
    model, _ = load_policy(str(tiny_model_dir))
    groups = list(full_weights(model, torch.bfloat16))
    layers = model.config.num_hidden_layers
    assert len(groups) == layers + 2  # the embeddings, each layer, the final norm (and the tied head)
    assert all(name.startswith(f"model.layers.{i}.") for i, group in enumerate(groups[1:-1]) for name, _ in group)
    names = [name for group in groups for name, _ in group]
    assert names == list(model.state_dict())
    assert all(tensor.dtype == torch.bfloat16 for group in groups for _, tensor in group)


def test_a_fingerprint_changes_with_any_weight_and_not_with_order(tiny_model_dir):
    model, _ = load_policy(str(tiny_model_dir))
    items = list(model.state_dict().items())
    fingerprint = weights_fingerprint(items)
    assert weights_fingerprint(reversed(items)) == fingerprint
    changed = [(name, tensor.clone()) for name, tensor in items]
    changed[3][1].view(-1)[0] += 1e-3
    assert weights_fingerprint(changed) != fingerprint


def test_explained_variance_from_sums_is_the_textbook_one():
    generator = torch.Generator().manual_seed(0)
    returns, values = torch.randn(4, 6, generator=generator), torch.randn(4, 6, generator=generator)
    mask = (torch.arange(6)[None] < torch.tensor([2, 6, 3, 5])[:, None]).float()
    r, v = returns[mask.bool()], values[mask.bool()]
    textbook = 1 - (r - v).var(unbiased=False) / r.var(unbiased=False)
    assert explained_variance(values, returns, mask) == pytest.approx(float(textbook), abs=1e-6)
    assert explained_variance(values, returns, mask, across_ranks=True) == pytest.approx(float(textbook), abs=1e-6)
    assert math.isnan(explained_variance(values, torch.ones(4, 6), mask))  # every return equal: nothing to explain


def reference_logprobs(model, batch, temperature):
    """The slow, obviously correct version: a full float32 log-softmax of every position."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()
    z = batch.response_states(logits) / temperature
    logprobs = z.log_softmax(-1).gather(-1, batch.response_tokens().unsqueeze(-1)).squeeze(-1)
    entropy = -(z.softmax(-1) * z.log_softmax(-1)).sum(-1)
    return logprobs * batch.response_mask, entropy * batch.response_mask


@pytest.mark.parametrize("chunk", [1024, 3])
def test_chunked_logprobs_and_their_gradient_match_a_full_log_softmax(tiny_model_dir, monkeypatch, chunk):
    monkeypatch.setattr(common.sampling, "LOGPROB_CHUNK", chunk)  # 3: the 7 response tokens span 3 chunks
    model, _ = load_policy(str(tiny_model_dir))
    batch = collate([Sample(0, [5, 6, 7], [8, 9, 10, 11], "", "stop"), Sample(0, [5], [12, 13], "", "stop"),
                     Sample(0, [1, 2, 3, 4, 5], [7], "", "stop")], pad_id=0)
    weights = torch.arange(1.0, 5.0)  # a different weight per position, so a misplaced gradient shows
    logprobs, entropy = response_logprobs(model, batch, 0.7, with_entropy=True)
    (logprobs * weights).sum().backward()
    ours = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    expected, expected_entropy = reference_logprobs(model, batch, 0.7)
    (expected * weights).sum().backward()
    assert torch.allclose(logprobs, expected, atol=1e-5)
    assert torch.allclose(entropy * batch.response_mask, expected_entropy, atol=1e-5)
    assert not entropy.requires_grad  # logged only
    assert all(torch.allclose(a, p.grad, atol=1e-5) for a, p in zip(ours, model.parameters()))
    assert logprobs[2, 1:].tolist() == [0.0, 0.0, 0.0]  # padding


def test_chunked_logprobs_of_a_bfloat16_model_match_within_its_precision(tiny_model_dir):
    model, _ = load_policy(str(tiny_model_dir), dtype="bfloat16")
    batch = collate([Sample(0, [5, 6, 7], [8, 9, 10, 11], "", "stop")], pad_id=0)
    logprobs = response_logprobs(model, batch)
    assert logprobs.dtype == torch.float32
    assert torch.allclose(logprobs, reference_logprobs(model, batch, 1.0)[0], atol=1e-4)
