"""The scripts on 2 CPU processes (torchrun, gloo), under DDP and under FSDP2 with `configs/fsdp.yaml`'s
settings: no deadlock when ranks hold different lengths or make different numbers of generations, every
rank samples from the policy's current weights (with transformers and with a stand-in colocated engine),
1 and 2 processes make the same update of the same global batch, and a killed or interrupted 2-process run
resumes to exactly the run that was not. `tests/multiprocess/launch.py` says what each job runs and observes;
the jobs share a few launches, since starting processes costs more than most jobs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.multiprocess.harness import launch

pytestmark = pytest.mark.slow
CHECKED = {"check_weights": True}
UNEVEN = {"check_weights": True, "short_rank": 1}  # rank 1's responses are cut to 2 tokens


def vapo_args(model_dir, run_dir, *extra) -> list[str]:
    return ["--model", model_dir, "--run-dir", run_dir, "--dtype", "float32", "--no-gradient-checkpointing",
            "--total-steps", "4", "--value-pretrain-steps", "1", "--prompts-per-step", "4",
            "--samples-per-prompt", "2", "--mini-batch-size", "4", "--max-new-tokens", "10", "--eval-every", "2",
            "--eval-prompts", "3", "--eval-samples", "2", "--checkpoint-every", "2", "--micro-batch-tokens", "96",
            "--lr-warmup-steps", "1", "--actor-lr", "1e-3", "--critic-lr", "1e-3", *extra]


def tl_args(model_dir, run_dir, *extra) -> list[str]:
    return ["--stages", "irm", "--model", model_dir, "--run-dir", run_dir, "--dtype", "float32",
            "--no-gradient-checkpointing", "--train-conversations", "24", "--eval-queries", "6", "--irm-epochs", "0.5",
            "--rollout-batch-size", "4", "--ppo-micro-batch-size", "1", "--max-new-tokens", "8", "--eval-every", "2",
            "--checkpoint-every", "1", "--actor-lr", "1e-3", "--critic-lr", "1e-3", "--ppo-warmup-steps", "1", *extra]


def agent_r_args(model_dir, run_dir, *extra) -> list[str]:
    # alpha and beta below 0 make every path good and every pair distinguishable: a random model's failures
    # still exercise every stage
    general = Path(run_dir).parent / "general.jsonl"
    general.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"},
                                                {"role": "assistant", "content": "Hello."}]}) + "\n")
    return ["--general-data", general, "--eta", "0.5", "--model", model_dir, "--run-dir", run_dir, "--dtype",
            "float32", "--no-gradient-checkpointing", "--iterations", "2", "--train-tasks", "4", "--train-pool", "60",
            "--eval-tasks", "0", "44", "7", "--mcts-iterations", "2", "--num-generate", "2", "--max-depth", "2",
            "--max-new-tokens", "8", "--verifier-max-new-tokens", "6", "--alpha", "-1", "--beta", "-0.5",
            "--pairs-per-task", "2", "--epochs", "1", "--batch-size", "4", "--micro-batch-size", "1", "--lr", "1e-3",
            "--eval-max-steps", "2", *extra]


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_rows(whole: list[dict], resumed: list[dict]) -> None:
    assert [r["step"] for r in resumed] == [r["step"] for r in whole]
    for a, b in zip(whole, resumed):
        for key, value in a.items():
            if isinstance(value, str):
                assert b[key] == value
            elif not key.startswith(("time/", "perf/tokens_per_s")):
                assert b[key] == pytest.approx(value, rel=1e-6, abs=1e-7, nan_ok=True), (a["step"], key)


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory) -> dict:
    """Every job: one launch of 2 FSDP2 processes for the whole runs, the fixed-batch updates, the lockstep
    check and TL-Training's and Agent-R's interrupted and resumed runs; one that kills a VAPO run and one
    that resumes it; one of 2 DDP processes (updates, VAPO with the stand-in engine); one of 1 process."""
    root, model = tmp_path_factory.mktemp("multiprocess"), str(tiny_model_dir)
    fsdp2 = launch(root / "fsdp2", [
        ("vapo", "vapo", vapo_args(model, root / "vapo"), UNEVEN),
        ("tl", "tl", tl_args(model, root / "tl"), CHECKED),
        ("agent-r", "agent-r", agent_r_args(model, root / "agent-r"), CHECKED),
        ("updates", "updates", [model]),
        ("lockstep", "lockstep", [model]),
        ("tl-interrupted", "tl", tl_args(model, root / "tl-resumed"), {"stop_after_checkpoint": True}),
        ("tl-resumed", "tl", tl_args(model, root / "tl-resumed", "--resume")),
        ("agent-r-interrupted", "agent-r", agent_r_args(model, root / "agent-r-resumed"), {"stop_after_checkpoint": True}),
        ("agent-r-resumed", "agent-r", agent_r_args(model, root / "agent-r-resumed", "--resume")),
    ], fsdp2=True, stand_in_vllm=True)
    # killed at its first generation after the first checkpoint: the rollout of step 3
    die_at = fsdp2["vapo"][1]["generations_at_checkpoint"][0] + 1
    launch(root / "killed", [("vapo", "vapo", vapo_args(model, root / "vapo-resumed"),
                              UNEVEN | {"die_at": die_at, "die_rank": 1})], fsdp2=True, expect_failure=True)
    resumed = launch(root / "resumed", [("vapo", "vapo", vapo_args(model, root / "vapo-resumed", "--resume"), UNEVEN)],
                     fsdp2=True)
    colocated = vapo_args(model, root / "vapo-colocated", "--total-steps", "3", "--backend", "vllm",
                          "--tensor-parallel-size", "2", "--vllm-sleep-mode")
    ddp = launch(root / "ddp", [("updates", "updates", [model]), ("vapo-colocated", "vapo", colocated, UNEVEN)],
                 stand_in_vllm=True)
    one = launch(root / "one", [("updates", "updates", [model])], processes=1)
    weights = {name: {script: torch.load(root / name / "updates" / f"weights-{script}.pt")
                      for script in ("vapo", "tl", "agent_r")} for name in ("fsdp2", "ddp", "one")}
    return {"root": root, "fsdp2": fsdp2, "resumed": resumed, "ddp": ddp, "one": one, "weights": weights}


def test_vapo_on_two_fsdp2_processes_with_uneven_lengths_samples_from_current_weights(runs):
    ranks = runs["fsdp2"]["vapo"]
    # rank 1's responses are 2 tokens, rank 0's up to 10: their own micro-batch counts differ, yet it finished
    assert any(a != b for a, b in zip(ranks[0]["micro_batch_counts"], ranks[1]["micro_batch_counts"]))
    # evaluations after steps 0, 2 and 4 and the rollouts of steps 1-4: 7 generations on each rank
    for rank in ranks:
        assert len(rank["generations"]) == 7
        assert all(g["policy"] == g["engine"] for g in rank["generations"])
    policies = [g["policy"] for g in ranks[0]["generations"]]
    assert [g["policy"] for g in ranks[1]["generations"]] == policies  # every rank holds the same policy
    # step 1 only pretrains the critic; from step 2 on the policy learns, and every later generation sees it
    assert policies[0] == policies[1] == policies[2] != policies[3] == policies[4] != policies[5] != policies[6]
    rows = metrics(runs["root"] / "vapo")
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    assert rows[2]["response/length_max"] > 2 and 2 < rows[2]["response/length_mean"] < 10  # both ranks' lengths


def test_vapo_with_a_colocated_tensor_parallel_engine_pushes_current_weights_to_every_rank(runs):
    """The stand-in engine (tests/multiprocess/stand_in/vllm) keeps its own weights, which change only through
    the push, loses them when it sleeps, and checks that both ranks of its tensor-parallel group ask alike."""
    ranks = runs["ddp"]["vapo-colocated"]
    for rank in ranks:
        assert len(rank["generations"]) == 6  # evaluations after steps 0, 2, 3 and 3 rollouts
        assert all(g["policy"] == g["engine"] for g in rank["generations"])
        # sleeping from the start; each serving: wake the weights, push them (a decoder layer at a time: the
        # embeddings, 4 layers, the final norm), wake the KV cache, generate, sleep
        serving = ["wake:weights"] + ["push", "reset_prefix_cache"] * 6 + ["wake:kv_cache", "generate"]
        assert rank["engine_events"] == ["sleep2"] + (serving + ["sleep2"]) * 5 + serving
    policies = [g["policy"] for g in ranks[0]["generations"]]
    assert policies[2] != policies[3] != policies[5]


@pytest.mark.parametrize("run", ["ddp", "fsdp2"])
def test_vapo_update_is_the_same_on_one_and_two_processes(runs, run):
    one = runs["one"]["updates"][0]["vapo"]
    assert one["totals"]["updates"] == 2  # a rollout of 16 samples in mini-batches of 8
    for rank in runs[run]["updates"]:
        assert rank["vapo"]["totals"]["updates"] == 2
        for key in ("pg_loss", "nll_loss", "value_loss", "actor_grad_norm", "critic_grad_norm", "clip_high", "tokens"):
            assert rank["vapo"]["totals"][key] == pytest.approx(one["totals"][key], rel=1e-4, abs=1e-6), key
        assert rank["vapo"]["advantage_sum"] == pytest.approx(one["advantage_sum"], abs=1e-4)
    assert same_weights(runs["weights"]["one"]["vapo"], runs["weights"][run]["vapo"])


@pytest.mark.parametrize("run", ["ddp", "fsdp2"])
def test_tl_training_ppo_update_is_the_same_on_one_and_two_processes(runs, run):
    one = runs["one"]["updates"][0]["tl"]
    assert one["kl_sum"] != 0  # the policy was moved off the reference, so the KL reward is in the update
    for rank in runs[run]["updates"]:
        for key, value in one["totals"].items():
            assert rank["tl"]["totals"][key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    assert same_weights(runs["weights"]["one"]["tl"], runs["weights"][run]["tl"])


@pytest.mark.parametrize("run", ["ddp", "fsdp2"])
def test_agent_r_sft_is_the_same_on_one_and_two_processes(runs, run):
    one = runs["one"]["updates"][0]["agent_r"]["losses"]
    assert len(one) == 2
    for rank in runs[run]["updates"]:
        assert rank["agent_r"]["losses"] == pytest.approx(one, rel=1e-5)
    assert same_weights(runs["weights"]["one"]["agent_r"], runs["weights"][run]["agent_r"])


def test_optimizer_steps_per_update_do_not_depend_on_the_process_count(runs):
    # VAPO: 2 mini-batches x (actor + critic); TL-Training: actor + critic once; Agent-R: 2 SFT steps
    counts = [r["optimizer_steps"] for name in ("one", "ddp", "fsdp2") for r in runs[name]["updates"]]
    assert counts == [4 + 2 + 2] * 5


def same_weights(a: dict, b: dict) -> bool:
    return all(torch.allclose(a[model][name], b[model][name], atol=1e-5) for model in a for name in a[model])


def test_ranks_that_generate_different_numbers_of_times_finish_together_with_the_right_tokens(runs):
    for r, rank in enumerate(runs["fsdp2"]["lockstep"]):
        assert rank["hf"] == {"calls": r + 2, "matches": True}  # transformers on FSDP2 shards
        assert rank["engine"] == {"calls": r + 2, "matches": True}  # one tensor-parallel engine of both ranks


def test_a_killed_two_process_vapo_run_resumes_to_the_run_that_was_not_killed(runs):
    root = runs["root"]
    assert sorted(p.name for p in (root / "vapo-resumed").glob("checkpoint-*")) == ["checkpoint-000002",
                                                                                   "checkpoint-000004"]
    assert_same_rows(metrics(root / "vapo"), metrics(root / "vapo-resumed"))
    from safetensors.torch import load_file

    for model in ("policy", "critic"):
        whole = load_file(str(root / "vapo" / "checkpoint-000004" / model / "model.safetensors"))
        resumed = load_file(str(root / "vapo-resumed" / "checkpoint-000004" / model / "model.safetensors"))
        assert all(torch.equal(whole[k], resumed[k]) for k in whole)


@pytest.mark.parametrize("script", ["tl", "agent-r"])
def test_tl_training_and_agent_r_on_two_fsdp2_processes_sample_from_current_weights(runs, script):
    ranks = runs["fsdp2"][script]
    for rank in ranks:
        assert rank["generations"] and all(g["policy"] == g["engine"] for g in rank["generations"])
    assert len({g["policy"] for g in ranks[0]["generations"]}) >= 3  # later generations saw the policy change


@pytest.mark.parametrize("script, stage", [("tl", "irm"), ("agent-r", ".")])
def test_an_interrupted_two_process_run_resumes_to_the_run_that_was_not_interrupted(runs, script, stage):
    assert runs["fsdp2"][f"{script}-interrupted"][0]["interrupted"]
    assert_same_rows(metrics(runs["root"] / script / stage), metrics(runs["root"] / f"{script}-resumed" / stage))
