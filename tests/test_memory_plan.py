"""The memory planner's arithmetic on hand-worked examples. The comparison with measured memory is run by
hand (`python benchmarks/memory_plan.py --check-on-cpu`); nothing here measures or times anything."""

import dataclasses
import json
import math
import sys
from pathlib import Path

import pytest
import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import memory_plan as mp  # noqa: E402

import common.sampling as sampling  # noqa: E402

GiB = 2**30

# A made-up shape small enough to count by hand: hidden 8 (2 heads of 4), 1 key-value head, MLP 16,
# 2 layers, vocabulary 32, lm_head untied.
TINY = mp.Shape(hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, vocab_size=32, tie_word_embeddings=False)
# one layer: q 8*8 + 8 = 72; k and v 2 * (8*4 + 4) = 72; o 8*8 = 64; gate, up, down 3 * 8*16 = 384; norms 2*8 = 16
LAYER = 72 + 72 + 64 + 384 + 16  # 608
POLICY = 2 * LAYER + 32 * 8 + 8 + 32 * 8  # layers, embeddings, final norm, lm_head: 1736
CRITIC = 2 * LAYER + 32 * 8 + 8 + 8 + 1  # the lm_head replaced by a value head (8 weights and a bias): 1489


def test_parameter_counts_of_the_qwen25_shapes_match_their_published_totals():
    # the Hub's model sizes (494M, 1.54B, 7.62B) and 32B's count built on the meta device (32.76B)
    published = {"qwen2.5-0.5b": 0.494e9, "qwen2.5-1.5b": 1.54e9, "qwen2.5-7b": 7.62e9, "qwen2.5-32b": 32.76e9}
    for name, total in published.items():
        assert mp.model_params(mp.SHAPES[name], value_head=False) == pytest.approx(total, rel=0.005), name
    # the 32B critic: the policy less its untied lm_head (152,064 x 5,120), plus a value head (5,120 + 1)
    assert mp.model_params(mp.SHAPES["qwen2.5-32b"], value_head=True) == pytest.approx(31.99e9, rel=0.005)
    # tied (1.5B): the critic keeps the embeddings and adds only the value head
    s = mp.SHAPES["qwen2.5-1.5b"]
    assert mp.model_params(s, True) - mp.model_params(s, False) == 1536 + 1


def test_parameter_count_of_a_tiny_shape_by_hand():
    assert mp.layer_params(TINY) == LAYER == 608
    assert mp.root_params(TINY, value_head=False) == 32 * 8 + 8 + 32 * 8 == 520
    assert mp.root_params(TINY, value_head=True) == 32 * 8 + 8 + 9 == 273
    assert mp.model_params(TINY, False) == POLICY == 1736
    assert mp.model_params(TINY, True) == CRITIC == 1489


def test_training_terms_of_a_tiny_shape_by_hand():
    assert mp.training_states(POLICY, 2) == 16 * 1736 / 2 == 13888  # fp32 weight, grad, two AdamW moments
    assert mp.resident_states(POLICY, 2) == 12 * 1736 / 2 == 10416  # the gradients freed
    # the policy's root (520) gathered with its gradient, two layers gathered and one layer's gradient, bf16
    assert mp.fsdp_gathered(TINY, 2) == (2 * 520 + 3 * 608) * 2 == 5728
    assert mp.rmsnorm_saved(2) == 2 + 1 + 1  # an fp32 copy (two bf16 units), normalised, weighted output
    assert mp.rmsnorm_saved(4) == 1 + 1 + 1
    # 10 tokens: 2 layer inputs + the final norm's 4 units, each 10 x 8 x 2 B
    assert mp.checkpointed_inputs(TINY, 10, 2) == (2 + 4) * 10 * 8 * 2 == 960
    # hidden-sized: 2 norms x 4 + attention 5 + gradients 2 = 15; intermediate-sized 6
    assert mp.layer_recompute(TINY, 10, 2) == 10 * (15 * 8 + 6 * 16) * 2 == 4320
    assert mp.layer_recompute(TINY, 10, 4) == 10 * (13 * 8 + 6 * 16) * 4 == 8000  # fp32 norms: 3 units each
    # the logits and the one gradient buffer, both over all 10 positions (prompt included), bf16
    assert mp.logits_and_gradient(TINY, 10, 2) == 2 * 10 * 32 * 2 == 1280
    # chunks of 4 of the 10 positions: softmax's input and output, 2 fp32 copies of 4 x 32 (each chunk's are
    # released before the next's), in bf16 as in float32
    assert mp.logprob_chunk(TINY, 10, 2, chunk=4) == 2 * 4 * 32 * 4 == 1024
    assert mp.logprob_chunk(TINY, 10, 4, chunk=4) == 2 * 4 * 32 * 4 == 1024
    # one chunk (1,024 positions hold all 10): 2 copies of 10 x 32 in fp32
    assert mp.logprob_chunk(TINY, 10, 2) == 2 * 10 * 32 * 4 == 2560
    assert mp.rollout_tensors(rows=3, length=100) == 36 * 300 == 10800
    # at 10 tokens the log-prob backward (1280 + 1024 in chunks of 4, 1280 + 2560 in one of 1,024) is smaller
    # than a layer's recompute (4320): that one is the peak, and the logits, their gradient and the chunks
    # are not at it
    act = mp.activation_peak(TINY, 10, 2, chunk=4)
    assert (act["peak"], act["binding"]) == (960 + 4320, "layer_recompute")
    assert mp.activation_peak(TINY, 10, 2)["binding"] == "layer_recompute"
    phase = mp.training_phase(TINY, gpus=2, tokens=10, b=2, rows=3, length=100)
    assert phase["not_at_peak"] == ["logits_and_gradient", "logprob_chunk"]
    # states, gathered units, checkpoints, a layer's recompute, 2 rows of 100 positions, vLLM asleep
    assert phase["peak"] == 13888 + 16 * 1489 / 2 + 5728 + 960 + 4320 + 36 * 2 * 100 + 2.5 * GiB


def test_past_one_chunk_of_the_projects_size_the_chunks_hold_one_chunks_copies():
    assert sampling.LOGPROB_CHUNK == 1024  # the planner's default chunk is the project's
    tokens = 1100  # two chunks of response positions at most: 1,024 and 76
    logits_and_grad = 2 * tokens * 32 * 2  # 140,800 B in bf16
    chunks = 2 * 1024 * 32 * 4  # 2 fp32 copies of a full chunk: 262,144 B
    recompute = tokens * (15 * 8 + 6 * 16) * 2  # 475,200 B
    assert mp.logits_and_gradient(TINY, tokens, 2) == logits_and_grad
    assert mp.logprob_chunk(TINY, tokens, 2) == chunks
    assert mp.layer_recompute(TINY, tokens, 2) == recompute
    act = mp.activation_peak(TINY, tokens, 2)
    checkpoints = (2 + 4) * tokens * 8 * 2
    # 140,800 + 262,144 = 402,944 < 475,200: at this tiny vocabulary a layer's recompute is the peak
    assert (act["peak"], act["binding"]) == (checkpoints + recompute, "layer_recompute")
    phase = mp.training_phase(TINY, gpus=2, tokens=tokens, b=2, rows=3, length=100)
    assert phase["not_at_peak"] == ["logits_and_gradient", "logprob_chunk"]
    assert phase["peak"] == 13888 + 16 * 1489 / 2 + 5728 + checkpoints + recompute + 36 * 2 * 100 + 2.5 * GiB


def test_generation_terms_of_a_tiny_shape_by_hand():
    assert mp.engine_weights(POLICY, tp=2, b=2) == 1736
    assert mp.kv_bytes_per_token(TINY, tp=1, b=2) == 2 * 2 * 1 * 4 * 2 == 32  # K and V, 2 layers, 1 head of 4
    assert mp.kv_bytes_per_token(TINY, tp=2, b=2) == 32  # a single key-value head is replicated, not split
    # 16,384 profiled tokens x (3 x 16 + 4 x 8) x 2 B, and the sampler's 1,024 x 32 logits and probabilities
    assert mp.engine_workspace(TINY, tp=1, b=2) == 16384 * 80 * 2 + 1024 * 32 * 4 * 2 == 2_883_584
    gen = mp.generation_phase(TINY, gpus=2, tp=1, utilization=0.5, gpu_bytes=8 * GiB, b=2)
    kv = 4 * GiB - 2 * 1736 - 2_883_584 - 2.5 * GiB  # the engine's half of 8 GiB less weights, workspace, residue
    assert gen["terms"]["vllm_kv_cache"] == kv
    assert gen["kv_tokens"] == math.floor(kv / 32)
    assert gen["peak"] == 12 * 1736 / 2 + 12 * 1489 / 2 + 4 * GiB


def test_smallest_gpu_count_where_the_gpu_size_is_made_to_fit_from_exactly_20():
    s = mp.SHAPES["qwen2.5-7b"]
    args = mp.Args(model="qwen2.5-7b", micro_batch_tokens=16384, prompts=480)  # 480 splits over 20 and 24 GPUs
    length, rows = args.prompt_tokens + args.response_tokens, args.prompts * args.samples
    # a GPU whose usable share is the training peak on 20 GPUs (the largest pass is the 22,528-token row)
    peak_at_20 = mp.training_phase(s, 20, length, 2, rows, length)["peak"]
    args.gpu_gb = (peak_at_20 + 1) / mp.USABLE_FRACTION / GiB
    assert not mp.plan(s, 19, args)["fits"]
    assert mp.plan(s, 20, args)["generation"]["peak"] <= peak_at_20 + 1  # generating fits there too
    assert mp.smallest_gpus(s, args, step=1)["gpus"] == 20
    assert mp.smallest_gpus(s, args, step=8)["gpus"] == 24  # whole nodes
    # every process samples an equal share of the prompts: with 512 of them, 20 and 24 GPUs are no run
    assert mp.smallest_gpus(s, dataclasses.replace(args, prompts=512), step=1)["gpus"] == 32
    # a GPU smaller than what sleeping vLLM keeps fits nowhere
    assert mp.smallest_gpus(s, mp.Args(gpu_gb=2.0), step=8) is None


def test_cli_plans_a_local_config_json(tmp_path, capsys):
    s = mp.SHAPES["qwen2.5-1.5b"]
    model_dir = tmp_path / "my-qwen"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"model_type": "qwen2", **vars(s)}))
    out = tmp_path / "plan.json"
    report = mp.main(tyro.cli(mp.Args, args=[str(model_dir / "config.json"), "--gpus", "8", "--json", str(out)]))
    printed = capsys.readouterr().out
    assert "my-qwen on 8 x 80 GiB" in printed and "vLLM KV cache" in printed and "smallest whole nodes: 8 GPUs" in printed
    written = json.loads(out.read_text())
    assert written == json.loads(json.dumps(report))
    assert written["policy_params"] == mp.model_params(s, False)
    assert written["plan"]["gpus"] == 8 and written["plan"]["fits"]
    assert written["plan"]["tensor_parallel_size"] == 1  # 1.5B's weights and a group's KV fit one GPU
    with pytest.raises(SystemExit):
        mp.load_shape(str(tmp_path / "missing"))


def test_tensor_parallel_sizes_split_the_attention_heads():
    # 40 heads (8 key-value) at 32B, 28 (4) at 7B, 12 (2) at 1.5B: 8 divides only 40
    assert mp.tp_choices(mp.SHAPES["qwen2.5-32b"], 8) == [1, 2, 4, 8]
    assert mp.tp_choices(mp.SHAPES["qwen2.5-7b"], 8) == [1, 2, 4]
    assert mp.tp_choices(mp.SHAPES["qwen2.5-1.5b"], 8) == [1, 2, 4]
    assert mp.tp_choices(mp.SHAPES["qwen2.5-32b"], 12) == [1, 2, 4]  # and the GPU count
    # 3 key-value heads can be neither split in 2 nor replicated over 4
    odd = mp.Shape(96, 256, 2, 12, 3, 64, True)
    assert [tp for tp in (1, 2, 3, 4, 6, 12) if mp.tp_shards_heads(odd, tp)] == [1, 3, 6, 12]
    with pytest.raises(SystemExit, match="cannot split 28 attention heads"):
        mp.main(tyro.cli(mp.Args, args=["qwen2.5-7b", "--gpus", "8", "--tensor-parallel-size", "8"]))


def test_the_cpu_check_batch_has_every_position_of_its_rows():
    torch.manual_seed(0)
    batch = mp.check_batch(vocab_size=50, rows=3, length=200)
    assert isinstance(batch, sampling.RolloutBatch)
    assert batch.input_ids.shape == (3, 200)  # rows x length positions for the logits and their gradient
    assert batch.attention_mask.sum(1).tolist() == [200, 200, 200 - mp.CPU_CHECK_SHORTER]  # the last row padded
    assert batch.prompt_lengths.tolist() == [mp.CPU_CHECK_PROMPT] * 3
    assert batch.response_mask.sum(1).tolist() == [136, 136, 72]  # 200 - 64, and 64 fewer in the last row
