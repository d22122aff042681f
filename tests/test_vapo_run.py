"""End-to-end runs of vapo.py on the tiny model: it trains, logs, plots, checkpoints and resumes."""

import json

import pytest
import torch
from safetensors.torch import load_file

import vapo
from common.sampling import HFSampler
from tests.test_tracking import tensorboard_scalars


def tiny_args(model_dir, run_dir, *extra):
    return vapo.parse_args([
        "--model", str(model_dir), "--run-dir", str(run_dir), "--total-steps", "3",
        "--value-pretrain-steps", "1", "--prompts-per-step", "4", "--samples-per-prompt", "2",
        "--mini-batch-size", "4", "--max-new-tokens", "12", "--eval-every", "2", "--eval-prompts", "4",
        "--checkpoint-every", "2", "--micro-batch-tokens", "256", *extra,
    ])


def weights(directory):
    return load_file(str(directory / "model.safetensors"))


@pytest.mark.slow
def test_short_run_trains_both_models_and_writes_metrics_plot_checkpoints(tiny_model_dir, tmp_path):
    run_dir = vapo.train(tiny_args(tiny_model_dir, tmp_path / "run", "--report-to", "tensorboard"))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    scalars = tensorboard_scalars(run_dir / "vapo")
    assert scalars["reward/mean"] == [(r["step"], pytest.approx(r["reward/mean"])) for r in rows if "reward/mean" in r]
    assert rows[1]["phase"] == "value_pretrain" and rows[2]["phase"] == "rl"
    for key in ("reward/mean", "value/loss", "value/explained_variance", "value/group_baseline_explained_variance",
                "response/length_mean", "time/generate_s", "perf/padding_efficiency"):
        assert key in rows[2]
    for key in ("policy/clipfrac_high", "policy/clipfrac_low", "policy/approx_kl", "policy/entropy"):
        assert key in rows[2] and key not in rows[1]
    binned = [key for key in rows[2] if key.startswith(("value/explained_variance_", "value/group_baseline_explained_variance_"))]
    assert {key.rsplit("_", 2)[-2] for key in binned} == {"pos", "len"} and "value/explained_variance_pos_0-31" in binned
    assert (run_dir / "curves.png").stat().st_size > 10_000
    assert (run_dir / "samples.jsonl").read_text()
    final = run_dir / "checkpoint-000003"
    before_policy, after_policy = weights(tiny_model_dir), weights(final / "policy")
    changed = [name for name in before_policy if not torch.equal(before_policy[name], after_policy[name])]
    assert len(changed) == len(before_policy), f"unchanged policy tensors: {set(before_policy) - set(changed)}"
    critic = weights(final / "critic")
    assert "score.weight" in critic


@pytest.mark.slow
def test_value_pretraining_leaves_the_policy_unchanged(tiny_model_dir, tmp_path):
    args = tiny_args(tiny_model_dir, tmp_path / "run", "--total-steps", "2", "--value-pretrain-steps", "2",
                     "--checkpoint-every", "2")
    run_dir = vapo.train(args)
    before, after = weights(tiny_model_dir), weights(run_dir / "checkpoint-000002" / "policy")
    assert all(torch.equal(before[name], after[name]) for name in before)
    critic_before = weights(tmp_path / "run" / "checkpoint-000002" / "critic")
    assert any(name.startswith("score") for name in critic_before)


@pytest.mark.slow
def test_a_killed_run_resumes_at_its_last_checkpoint(tiny_model_dir, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    original = HFSampler.generate
    calls = {"n": 0}

    def dies_on_the_fourth_rollout(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:  # eval at 0, rollouts 1 and 2, eval at 2, then the rollout of step 3
            raise KeyboardInterrupt("killed")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(HFSampler, "generate", dies_on_the_fourth_rollout)
    with pytest.raises(KeyboardInterrupt):
        vapo.train(tiny_args(tiny_model_dir, run_dir, "--total-steps", "4"))
    assert [p.name for p in run_dir.glob("checkpoint-*")] == ["checkpoint-000002"]
    saved = weights(run_dir / "checkpoint-000002" / "policy")

    monkeypatch.setattr(HFSampler, "generate", original)
    vapo.train(tiny_args(tiny_model_dir, run_dir, "--total-steps", "4", "--resume"))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    state = json.loads((run_dir / "checkpoint-000004" / "trainer_state.json").read_text())
    assert state["step"] == 4 and state["position"] == 4 * 4
    assert not all(torch.equal(saved[n], weights(run_dir / "checkpoint-000004" / "policy")[n]) for n in saved)


def test_resume_without_a_checkpoint_is_a_clear_error(tiny_model_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        vapo.train(tiny_args(tiny_model_dir, tmp_path / "empty", "--resume"))


def test_presets_turn_the_seven_techniques_off_and_flags_still_win():
    vapo_args = vapo.parse_args([])
    assert (vapo_args.value_pretrain_steps, vapo_args.decoupled_gae, vapo_args.length_adaptive_gae,
            vapo_args.token_level_loss, vapo_args.clip_high, vapo_args.nll_coef) == (10, True, True, True, 0.28, 0.1)
    vanilla = vapo.parse_args(["--preset", "vanilla-ppo"])
    assert (vanilla.value_pretrain_steps, vanilla.decoupled_gae, vanilla.length_adaptive_gae,
            vanilla.token_level_loss, vanilla.clip_high, vanilla.nll_coef) == (0, False, False, False, 0.2, 0.0)
    assert vanilla.samples_per_prompt == 1 and vanilla.rollout_size == vapo_args.rollout_size
    assert vapo.parse_args(["--preset", "vanilla-ppo", "--clip-high", "0.3"]).clip_high == 0.3
    paper = vapo.parse_args(["--scale", "paper"])
    assert (paper.model, paper.prompts_per_step, paper.samples_per_prompt, paper.mini_batch_size,
            paper.actor_lr, paper.critic_lr, paper.alpha) == ("Qwen/Qwen2.5-32B", 512, 16, 512, 1e-6, 2e-6, 0.05)
    paper_vanilla = vapo.parse_args(["--scale", "paper", "--preset", "vanilla-ppo"])
    assert (paper_vanilla.prompts_per_step, paper_vanilla.samples_per_prompt) == (8192, 1)


def test_runs_of_different_seeds_never_share_an_evaluation_sample():
    steps = range(0, 5001)
    streams = {seed: {vapo.evaluation_seed(seed, step) for step in steps} for seed in range(1, 21)}
    assert all(len(stream) == len(steps) for stream in streams.values())
    for seed in streams:
        for other in streams:
            if other != seed:
                assert not streams[seed] & streams[other], (seed, other)


def test_dataset_without_an_answer_names_the_row(tmp_path):
    rows = [{"prompt": [{"role": "user", "content": "1+1?"}], "reward_model": {"ground_truth": "2"}},
            {"prompt": [{"role": "user", "content": "2+2?"}], "reward_model": {"style": "rule"}}]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(ValueError, match=r"row 1 has no field 'reward_model.ground_truth'"):
        vapo.load_prompts(str(path), "train")


def test_nan_loss_stops_with_a_clear_message(tmp_path):
    from common.checkpoint import check_finite

    check_finite(torch.tensor(0.5), "actor", 3, tmp_path)  # a finite loss passes
    with pytest.raises(FloatingPointError, match=r"actor loss is nan at step 4.*last checkpoint \(none yet\) is intact"):
        check_finite(torch.tensor(float("nan")), "actor", 3, tmp_path)
