"""The VAPO-vs-TRL benchmark's summary metrics, on hand-made accuracy curves (the benchmark itself is run by hand)."""

import sys
from pathlib import Path

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
