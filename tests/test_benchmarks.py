"""The VAPO-vs-TRL benchmark's summary metrics, on hand-made accuracy curves (the benchmark itself is run by hand)."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import vapo_vs_trl  # noqa: E402

# (generated samples, training seconds, held-out accuracy) after each rollout of 512
CURVE = [(0, 0.0, 0.40), (512, 1.0, 0.45), (1024, 2.0, 0.62), (1536, 3.0, 0.55), (2048, 4.0, 0.61), (2560, 5.0, 0.66)]


def test_samples_to_target_first_crossing_and_smoothed_by_hand():
    assert vapo_vs_trl.samples_to_target(CURVE, 0.60) == 1024  # the first evaluation at or above 0.60
    # trailing means of 3: 0.49 (at 1024), 0.54, 0.593, 0.607 (at 2560)
    assert vapo_vs_trl.samples_to_target(CURVE, 0.60, smooth=3) == 2560
    assert vapo_vs_trl.samples_to_target(CURVE, 0.67) is None
    assert vapo_vs_trl.samples_to_target(CURVE, 0.40, smooth=3) == 1024  # no window shorter than 3 counts


def test_summary_counts_policy_samples_after_frozen_rollouts_and_medians_over_misses():
    def run(system, seed, curve, frozen=0):
        return {"system": system, "seed": seed, "curve": curve, "train_s": 10.0, "samples": 2560,
                "frozen_samples": frozen, "peak_rss_mb": 100.0, "final_length": 40.0, "padding_efficiency": None}

    never = [(s, t, 0.40) for s, t, _ in CURVE]
    runs = [run("vapo", 1, CURVE, frozen=512), run("vapo", 2, CURVE, frozen=512), run("vapo", 3, never, frozen=512),
            run("trl-grpo-dapo", 1, CURVE)]
    args = vapo_vs_trl.Args(systems=("vapo", "trl-grpo-dapo"), target_gain=0.20)
    table, target = vapo_vs_trl.summarise(args, runs)
    assert abs(target - 0.60) < 1e-9  # every curve starts at 0.40
    vapo_row, trl_row = table
    assert vapo_row["samples_to_target_per_seed"] == [1024, 1024, None]
    assert (vapo_row["samples_to_target"], vapo_row["reached"]) == (1024, "2/3")  # a miss counts as beyond the budget
    assert vapo_row["policy_samples_to_target"] == 512
    assert (vapo_row["smoothed_samples_to_target"], vapo_row["smoothed_reached"]) == (2560, "2/3")
    assert (trl_row["samples_to_target"], trl_row["policy_samples_to_target"]) == (1024, 1024)
    text = vapo_vs_trl.markdown(table, target, 0.40, args.smooth)
    assert "| vapo | 3 | 1024 (2/3) | 1.00 | 1024, 1024, not reached | 512 | 2560 (2/3) | 1.00 |" in text


def test_long_scale_sets_the_benchmark_defaults_and_explicit_flags_win():
    args = vapo_vs_trl.parse_args(["--scale", "cpu-long", "--eval-every", "2"])
    assert (args.prompts_per_step, args.max_new_tokens, args.target_gain, args.eval_every) == (32, 560, 0.10, 2)
    assert vapo_vs_trl.parse_args([]).max_new_tokens == 96
    shared = vapo_vs_trl.shared_settings(args)
    assert (shared.model, shared.data, shared.eval_prompts, shared.eval_samples) == ("tiny-chains", "synthetic-chains", 200, 1)


def test_a_killed_vapo_run_resumes_from_its_checkpoint(tmp_path):
    args = vapo_vs_trl.parse_args(["--scale", "cpu-long"])
    assert "--resume" not in vapo_vs_trl.command(args, "vapo", 1, tmp_path)
    (tmp_path / "checkpoint-000010").mkdir()
    command = vapo_vs_trl.command(args, "vanilla-ppo", 1, tmp_path)
    assert "--resume" in command and command[command.index("--scale") + 1] == "cpu-long"


def test_explained_variance_by_bin_averages_the_rl_steps_only_and_skips_nan():
    nan = float("nan")
    rows = [{"step": 0, "eval/accuracy": 0.3},
            {"step": 1, "phase": "value_pretrain", "value/explained_variance_pos_0-31": -5.0},
            {"step": 2, "phase": "rl", "value/explained_variance_pos_0-31": 0.1, "value/explained_variance_len_512+": nan,
             "value/group_baseline_explained_variance_pos_0-31": 0.3, "value/explained_variance": 9.0},
            {"step": 3, "phase": "rl", "value/explained_variance_pos_0-31": 0.3, "value/explained_variance_len_512+": 0.5}]
    found = vapo_vs_trl.binned_explained_variance_over_rl_steps(rows)
    assert found == {"value/explained_variance_pos_0-31": 0.2, "value/explained_variance_len_512+": 0.5,
                     "value/group_baseline_explained_variance_pos_0-31": 0.3}
    table = [{"system": "vapo", "explained_variance": found}]
    text = vapo_vs_trl.explained_variance_markdown(table)
    assert "| vapo | critic | 0.200 |  |  |  |  |  |  |  |  | 0.500 |" in text
    assert "| vapo | group mean of the others | 0.300 |" in text


def test_finished_runs_are_recorded_and_a_recorded_run_is_not_run_again(tmp_path, monkeypatch):
    record = tmp_path / "record.json"
    args = vapo_vs_trl.parse_args(["--scale", "cpu-long", "--out-dir", str(tmp_path / "runs"), "--results", str(record)])
    finished = {"system": "vapo", "seed": 1, "curve": CURVE}
    (tmp_path / "runs" / "vapo-seed1").mkdir(parents=True)
    (tmp_path / "runs" / "vapo-seed1" / "result.json").write_text(json.dumps(finished))
    ran = []
    monkeypatch.setattr(vapo_vs_trl, "run_in_child", lambda *a: ran.append(a))
    assert vapo_vs_trl.run_one(args, "vapo", 1)["seed"] == 1 and not ran  # read back from --out-dir...
    (tmp_path / "runs" / "vapo-seed1" / "result.json").unlink()
    assert vapo_vs_trl.run_one(args, "vapo", 1)["seed"] == 1 and not ran  # ... and then from the record
    stored = json.loads(record.read_text())
    assert stored["base"]["model"] == "tiny-chains" and stored["base"]["max_new_tokens"] == 560
    assert list(stored["runs"]) == ["vapo/seed1"]
    with pytest.raises(SystemExit, match="another base model"):  # other sizes are never mixed into the record
        vapo_vs_trl.run_one(vapo_vs_trl.parse_args(["--scale", "cpu-long", "--steps", "20", "--results", str(record)]), "vapo", 2)


def test_the_ablation_without_group_sampling_spends_the_scales_rollout():
    import vapo_ablation

    assert vapo_ablation.row_flags("w/o group sampling", []) == ["--prompts-per-step", "512", "--samples-per-prompt", "1"]
    assert vapo_ablation.row_flags("w/o group sampling", ["--scale", "cpu-long"])[1] == "256"
    assert vapo_ablation.row_flags("w/o decoupled GAE", ["--scale", "cpu-long"]) == ["--no-decoupled-gae"]


def test_flags_after_extra_and_flags_the_script_does_not_know_go_to_every_run():
    import vapo_ablation

    from common.cli import parse_with_run_flags

    args = parse_with_run_flags(vapo_ablation.Args, ["--seeds", "1", "--extra", "--scale", "cpu-long", "--rows", "vapo"])
    assert (args.seeds, args.rows, args.extra) == (1, ["vapo"], ["--scale", "cpu-long"])
    assert parse_with_run_flags(vapo_ablation.Args, ["--total-steps", "40", "--eval-every", "2"]).extra == [
        "--total-steps", "40", "--eval-every", "2"]
