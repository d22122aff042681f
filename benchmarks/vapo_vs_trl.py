"""`vapo.py` against TRL's `GRPOTrainer` on the same model, task, prompts, sampling and sample budget.

    pip install -r benchmarks/requirements.txt           # TRL, only for this benchmark
    python benchmarks/vapo_vs_trl.py                      # 3 systems x 3 seeds at the CPU scale
    python benchmarks/vapo_vs_trl.py --seeds 1 --systems vapo trl-grpo-dapo --steps 20
    python benchmarks/vapo_vs_trl.py --summarise-only     # the table and plot of the runs already in --out-dir
                                                          # (with --results: of the runs recorded there)
    python benchmarks/vapo_vs_trl.py --scale cpu-long --seeds 1   # the long task (tasks/chains.py), ~1 h a run

Systems, each a separate process (so peak memory is its own):
- `vapo`: `vapo.py` with every technique (its CPU scale);
- `vanilla-ppo`: `vapo.py --preset vanilla-ppo` (the same samples as prompts x 1);
- `trl-grpo-dapo`: TRL's `GRPOTrainer` with its DAPO options (`loss_type="dapo"`, `epsilon_high=0.28`,
  group-normalised rewards, no KL, truncated completions masked).
A DAPO-like row from `vapo.py` itself is not possible: `vapo.py` always trains a critic and takes its
advantages from GAE, while DAPO has no critic; the TRL row is the DAPO-like configuration.

Shared by all: the warm-started tiny model and the task of `vapo.py --scale S` (`--scale cpu`: tiny-arithmetic
on the arithmetic task; `--scale cpu-long`: tiny-chains on tasks/chains.py), the same training prompts in the
same order (`vapo.py`'s seeded shuffle), P prompts x G samples per rollout at T=1, top-p 1, no top-k,
`--max-new-tokens`, optimizer steps of `--mini-batch` samples (one pass per rollout), the same learning rate
and warmup, and the same evaluation as that scale's (cpu: avg@4 on 128 held-out prompts; cpu-long: avg@1 on
200 held-out chains; T=1.0, top-p 0.7), with the same seeds, every `--eval-every` rollouts. Every system decodes
with the same attention kernel (`common.sampling.grouped_query_decoding`). Samples are counted when generated,
so VAPO's value-pretraining rollouts count against it.

Prints, as ratios to TRL: generated samples to reach the target accuracy (initial + `--target-gain`; also
counted after `vapo.py`'s policy-frozen value-pretraining rollouts, and at the first evaluation where the mean
of the last `--smooth` evaluations reaches it), training wall time per generated sample (evaluations
excluded), peak resident memory, final accuracy;
for `vapo.py`'s systems, the critic's and the group baseline's explained variance of the outcome by position in
the response and by response length, averaged over the RL steps; and writes `results.json`, `results.md` and
`curves.png` (accuracy against samples and against wall time) into `--out-dir`.
"""

from __future__ import annotations

import json
import math
import os
import random
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import tyro

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import vapo  # noqa: E402
from vapo_ablation import base_fingerprint, commit, locked_results  # noqa: E402
from common.checkpoint import latest_checkpoint  # noqa: E402
from common.tracking import read_metrics  # noqa: E402

System = Literal["vapo", "vanilla-ppo", "trl-grpo-dapo"]


@dataclass
class Args:
    scale: Literal["cpu", "cpu-long"] = "cpu"
    """`vapo.py --scale` whose model, task and evaluation every system shares; it also sets this script's
    defaults below (BENCHMARK_SCALES); any flag given explicitly wins."""
    systems: tuple[System, ...] = ("vapo", "vanilla-ppo", "trl-grpo-dapo")
    seeds: tuple[int, ...] = (1, 2, 3)
    steps: int = 40
    """rollouts per run; every system generates steps x prompts x samples samples."""
    prompts_per_step: int = 64
    samples_per_prompt: int = 8
    mini_batch: int = 128
    """samples per optimizer step."""
    max_new_tokens: int = 96
    lr: float = 2e-4
    """policy learning rate, every system (vapo.py's CPU scale)."""
    warmup_updates: int = 3
    """optimizer steps of linear warmup, then constant (vapo.py's CPU scale)."""
    eval_prompts: int | None = None
    """held-out prompts per evaluation (default: the scale's, 128 or 200)."""
    eval_every: int = 1
    """rollouts between evaluations (1: samples to target is known to the rollout)."""
    target_gain: float = 0.20
    """target held-out accuracy = the initial accuracy + this (the issue: base + 20 points)."""
    smooth: int = 3
    """evaluations averaged for the smoothed samples to target (one evaluation swings by a few points, so the
    first one above the target is partly luck)."""
    out_dir: str = "runs/benchmarks/vapo_vs_trl"
    results: str | None = None
    """finished runs kept across machines and sessions (a file in the repository): a run recorded there is not
    run again, and --summarise-only reads the runs from it. The record names the base model and the sizes;
    runs with others are never mixed into it."""
    summarise_only: bool = False
    """run nothing: summarise the finished runs recorded in --results, or without it those in --out-dir
    (`*/result.json`), whatever their seeds."""
    threads: int = 0
    """torch threads per run (0: torch's default). Runs go one after another."""
    trl_worker_seed: int = 0
    """internal: run only the TRL system with this seed, in this process, into --out-dir."""


# The long task's sizes are vapo.py's cpu-long scale; an evaluation of 200 chains takes as long as two rollouts,
# so it runs every 5 rollouts, and the target is 10 points (avg@1 on 200 chains: a standard error of ~3 points).
BENCHMARK_SCALES = {
    "cpu": {},
    "cpu-long": dict(prompts_per_step=32, max_new_tokens=560, eval_every=5, target_gain=0.10,
                     out_dir="runs/benchmarks/vapo_vs_trl_cpu_long", results="benchmarks/results/vapo_vs_trl_cpu_long.json"),
}


def parse_args(argv: list[str] | None = None) -> Args:
    """--scale, then every explicit flag."""
    chosen = tyro.cli(Args, args=argv)
    return tyro.cli(Args, args=argv, default=Args(**{**vars(Args()), **BENCHMARK_SCALES[chosen.scale], "scale": chosen.scale}))


def shared_settings(args: Args) -> "vapo.Args":
    """What every system takes from `vapo.py --scale`: model, task, evaluation prompts and sampling."""
    shared = vapo.parse_args(["--scale", args.scale])
    shared.eval_prompts = args.eval_prompts or shared.eval_prompts
    return shared


# ------------------------------------------------------------------------------------------------
# the TRL side, run in its own process (`--trl-worker-seed S`)
# ------------------------------------------------------------------------------------------------


def run_trl(args: Args, seed: int, run_dir: Path) -> None:
    """TRL GRPO with DAPO's options on exactly the work `vapo.py` does; writes metrics.jsonl like vapo.py."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from common.models import load_policy
    from common.rewards import check_math_answer
    from common.sampling import HFSampler, grouped_query_decoding

    shared = shared_settings(args)
    policy, tokenizer = load_policy(vapo.resolve_model(shared.model), "float32", False)
    train_rows = vapo.load_prompts(shared.data, "train")
    eval_rows = vapo.load_prompts(shared.eval_data, "test")[: shared.eval_prompts]
    # vapo.py's prompt order: a seeded shuffle, consumed P prompts per rollout
    order = list(range(len(train_rows)))
    random.Random(seed).shuffle(order)
    used = [train_rows[order[i % len(order)]] for i in range(args.steps * args.prompts_per_step)]
    dataset = Dataset.from_list([{"prompt": r["prompt"], "ground_truth": str(r["reward_model"]["ground_truth"])}
                                 for r in used])

    def correctness(completions, ground_truth, **_):
        return [1.0 if check_math_answer(c[-1]["content"], g).correct else -1.0
                for c, g in zip(completions, ground_truth)]

    updates_per_rollout = args.prompts_per_step * args.samples_per_prompt // args.mini_batch
    config = GRPOConfig(
        output_dir=str(run_dir / "trl"), seed=seed, use_cpu=True, report_to="none", save_strategy="no",
        # vapo.py's CPU scale: float32 weights and compute, no gradient checkpointing (TRL's defaults differ)
        bf16=False, fp16=False, gradient_checkpointing=False,
        logging_steps=updates_per_rollout, disable_tqdm=True, shuffle_dataset=False,
        max_steps=args.steps * updates_per_rollout, num_iterations=1,
        per_device_train_batch_size=args.mini_batch, gradient_accumulation_steps=1,
        steps_per_generation=updates_per_rollout, num_generations=args.samples_per_prompt,
        max_completion_length=args.max_new_tokens, temperature=1.0, top_p=1.0, top_k=0,
        learning_rate=args.lr, lr_scheduler_type="constant_with_warmup", warmup_steps=args.warmup_updates,
        weight_decay=0.0, max_grad_norm=1.0, adam_beta1=0.9, adam_beta2=0.999,
        loss_type="dapo", epsilon=0.2, epsilon_high=0.28, beta=0.0, scale_rewards="group",
        mask_truncated_completions=True,
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    log_path = run_dir / "metrics.jsonl"
    log_path.write_text("")
    clock = {"train_s": 0.0, "since": time.perf_counter()}
    sampler_of = lambda model: HFSampler(model, tokenizer)  # noqa: E731

    def evaluate(model, step: int) -> float:
        samples = sampler_of(model).generate([r["prompt"] for r in eval_rows], n=shared.eval_samples,
                                             max_new_tokens=args.max_new_tokens, temperature=shared.eval_temperature,
                                             top_p=shared.eval_top_p, seed=vapo.evaluation_seed(seed, step))
        return statistics.mean(check_math_answer(s.text, str(eval_rows[s.prompt_index]["reward_model"]["ground_truth"])).correct
                               for s in samples)

    def write(row: dict) -> None:
        with log_path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    class Measure(TrainerCallback):
        """After each rollout's updates (TRL logs once per rollout): training time without evaluations,
        TRL's mean completion length, and vapo.py's evaluation."""

        def on_log(self, _args, state, control, logs=None, model=None, **kwargs):
            if not logs or "completions/mean_length" not in logs:
                return
            rollout = state.global_step // updates_per_rollout
            clock["train_s"] += time.perf_counter() - clock["since"]
            row = {"step": rollout, "time/train_s": clock["train_s"], "response/length_mean": float(logs["completions/mean_length"])}
            if rollout % args.eval_every == 0 or rollout == args.steps:
                row["eval/accuracy"] = evaluate(model, rollout)
            write(row)
            clock["since"] = time.perf_counter()

    trainer = GRPOTrainer(model=policy, reward_funcs=correctness, args=config, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[Measure()])
    # TRL's rollouts decode with the attention kernel vapo.py's sampler uses (on CPU, transformers' own SDPA
    # path repeats the key/value heads at every decoding step and takes several times as long)
    generate_single_turn = trainer._generate_single_turn

    def generate_with_grouped_query_decoding(*inputs, **options):
        with grouped_query_decoding(trainer.model):
            return generate_single_turn(*inputs, **options)

    trainer._generate_single_turn = generate_with_grouped_query_decoding
    write({"step": 0, "time/train_s": 0.0, "eval/accuracy": evaluate(policy, 0)})
    clock["since"] = time.perf_counter()
    with torch.random.fork_rng():
        trainer.train()


# ------------------------------------------------------------------------------------------------
# running the systems and comparing them
# ------------------------------------------------------------------------------------------------


def command(args: Args, system: System, seed: int, run_dir: Path) -> list[str]:
    if system == "trl-grpo-dapo":
        return [sys.executable, __file__, "--scale", args.scale, "--trl-worker-seed", str(seed), "--out-dir", str(run_dir),
                "--steps", str(args.steps), "--prompts-per-step", str(args.prompts_per_step),
                "--samples-per-prompt", str(args.samples_per_prompt), "--mini-batch", str(args.mini_batch),
                "--max-new-tokens", str(args.max_new_tokens), "--lr", str(args.lr),
                "--warmup-updates", str(args.warmup_updates), "--eval-every", str(args.eval_every),
                "--eval-prompts", str(shared_settings(args).eval_prompts)]
    # vanilla PPO spends the same samples as one response for each of P x G prompts (vapo.py's preset)
    prompts, samples = (args.prompts_per_step, args.samples_per_prompt) if system == "vapo" else \
        (args.prompts_per_step * args.samples_per_prompt, 1)
    preset = ["--preset", "vanilla-ppo"] if system == "vanilla-ppo" else []
    shared = shared_settings(args)
    return [sys.executable, str(ROOT / "vapo.py"), "--scale", args.scale, *preset, "--seed", str(seed), "--run-dir", str(run_dir),
            "--total-steps", str(args.steps), "--prompts-per-step", str(prompts),
            "--samples-per-prompt", str(samples), "--mini-batch-size", str(args.mini_batch),
            "--max-new-tokens", str(args.max_new_tokens), "--actor-lr", str(args.lr),
            "--lr-warmup-steps", str(args.warmup_updates), "--eval-every", str(args.eval_every),
            "--eval-prompts", str(shared.eval_prompts), "--eval-samples", str(shared.eval_samples),
            "--checkpoint-every", "10", *(["--resume"] if latest_checkpoint(run_dir) else [])]


def run_one(args: Args, system: System, seed: int) -> dict:
    """One system and seed: its curve, training time and peak memory, run in a child process if not done yet.

    A run recorded in --results, or finished before in --out-dir (its `result.json` exists), is read back, not
    run again, so a killed benchmark resumes and seeds run on separate machines, cores or sessions are
    summarised together; a finished run is recorded in --results. A killed
    `vapo.py` run resumes from its last checkpoint (every 10 rollouts; its peak memory is then the resumed
    process's); a killed TRL run starts again."""
    run_dir = Path(args.out_dir) / f"{system}-seed{seed}"
    if args.results:
        with locked_results(Path(args.results), record_base(args)) as recorded:
            if f"{system}/seed{seed}" in recorded["runs"]:
                return recorded["runs"][f"{system}/seed{seed}"]
    if not (run_dir / "result.json").exists():
        run_in_child(args, system, seed, run_dir)
    result = json.loads((run_dir / "result.json").read_text())
    if args.results:
        with locked_results(Path(args.results), record_base(args)) as recorded:
            recorded["runs"][f"{system}/seed{seed}"] = result
    return result


def run_in_child(args: Args, system: System, seed: int, run_dir: Path) -> None:
    """Run one system and seed to the end in a child process and write its `result.json`."""
    run_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}))
    with open(run_dir / "stdout.log", "a") as out:
        child = subprocess.Popen(command(args, system, seed, run_dir), stdout=out, stderr=subprocess.STDOUT,
                                 env=env, cwd=ROOT)
        _, status, usage = os.wait4(child.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{system} seed {seed} failed; see {run_dir / 'stdout.log'}")
    rows = read_metrics(run_dir)
    rollout = args.prompts_per_step * args.samples_per_prompt
    if system == "trl-grpo-dapo":
        train_s = rows[-1]["time/train_s"]
        cumulative = {r["step"]: r["time/train_s"] for r in rows}
    else:
        total, cumulative = 0.0, {0: 0.0}
        for r in rows[1:]:
            total += r["time/step_s"]
            cumulative[r["step"]] = total
        train_s = total
    curve = [(r["step"] * rollout, cumulative[r["step"]], r["eval/accuracy"]) for r in rows if "eval/accuracy" in r]
    lengths = [r["response/length_mean"] for r in rows if r.get("response/length_mean") is not None]
    padding = [r["perf/padding_efficiency"] for r in rows if "perf/padding_efficiency" in r]
    frozen_rollouts = sum(r.get("phase") == "value_pretrain" for r in rows)  # vapo.py's policy-frozen rollouts
    result = {"system": system, "seed": seed, "curve": curve, "train_s": train_s,
              "samples": args.steps * rollout, "frozen_samples": frozen_rollouts * rollout, "peak_rss_mb": usage.ru_maxrss / 1024,
              "final_length": lengths[-1] if lengths else None, "min_length": min(lengths) if lengths else None,
              "padding_efficiency": statistics.mean(padding) if padding else None,
              "explained_variance": binned_explained_variance_over_rl_steps(rows), "commit": commit(),
              "threads": args.threads}
    (run_dir / "result.json").write_text(json.dumps(result))


def record_base(args: Args) -> dict:
    """What every recorded run shares: the base model (named by its warm start) and every size of the work."""
    sizes = ("steps", "prompts_per_step", "samples_per_prompt", "mini_batch", "max_new_tokens", "lr", "warmup_updates",
             "eval_every")
    return base_fingerprint(["--scale", args.scale]) | {name: getattr(args, name) for name in sizes} | {
        "eval_prompts": shared_settings(args).eval_prompts}


def binned_explained_variance_over_rl_steps(rows: list[dict]) -> dict[str, float]:
    """The mean over a vapo.py run's RL steps (value pretraining's left out) of each binned explained variance it
    logged (`value/..._pos_A-B`, `value/..._len_A-B`: the critic's and the group baseline's), skipping the steps
    where a bin's outcomes were all equal (NaN)."""
    found: dict[str, list[float]] = {}
    for row in rows:
        if row.get("phase") != "rl":
            continue
        for key, value in row.items():
            if key.startswith("value/") and ("_pos_" in key or "_len_" in key) and not math.isnan(value):
                found.setdefault(key, []).append(value)
    return {key: statistics.mean(values) for key, values in found.items()}


def samples_to_target(curve, target: float, smooth: int = 1) -> int | None:
    """Generated samples at the first evaluation where the mean of the last `smooth` evaluations (this one and
    the ones before it) reaches `target`; None if none does."""
    accuracies = [accuracy for _, _, accuracy in curve]
    for i, (samples, _, _) in enumerate(curve):
        window = accuracies[max(0, i - smooth + 1) : i + 1]
        if len(window) == smooth and statistics.mean(window) >= target:
            return samples
    return None


def median_or_none(values: list[int | None]) -> float | None:
    """Median where a run that never reached the target counts as needing more than the budget: defined while
    fewer than half of the runs miss."""
    median = statistics.median(math.inf if x is None else x for x in values)
    return None if math.isinf(median) else median


def summarise(args: Args, runs: list[dict]) -> tuple[list[dict], float]:
    initial = statistics.mean(r["curve"][0][2] for r in runs)  # the same model and evaluation everywhere
    target = initial + args.target_gain
    table = []
    for system in args.systems:
        mine = [r for r in runs if r["system"] == system]
        reached = [samples_to_target(r["curve"], target) for r in mine]
        smoothed = [samples_to_target(r["curve"], target, args.smooth) for r in mine]
        table.append({
            "system": system, "seeds": len(mine),
            "samples_to_target": median_or_none(reached),
            "reached": f"{sum(x is not None for x in reached)}/{len(mine)}",
            "samples_to_target_per_seed": reached,
            # value pretraining's rollouts leave the policy where it was: the samples after them show how
            # fast the policy updates themselves learn
            "policy_samples_to_target": median_or_none(
                [None if x is None else x - r["frozen_samples"] for x, r in zip(reached, mine)]),
            "smoothed_samples_to_target": median_or_none(smoothed),
            "smoothed_reached": f"{sum(x is not None for x in smoothed)}/{len(mine)}",
            "us_per_sample": statistics.median(r["train_s"] / r["samples"] * 1e6 for r in mine),
            "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in mine if r["peak_rss_mb"] is not None),
            "final_accuracy": statistics.mean(r["curve"][-1][2] for r in mine),
            "final_accuracy_sd": statistics.pstdev(r["curve"][-1][2] for r in mine),
            "collapsed": sum(r["curve"][-1][2] < 0.02 or (r["final_length"] or 99) <= 3 for r in mine),
            "padding_efficiency": (statistics.mean(r["padding_efficiency"] for r in mine)
                                   if mine[0]["padding_efficiency"] is not None else None),
            "explained_variance": {k: statistics.mean(r["explained_variance"][k] for r in mine if k in r.get("explained_variance", {}))
                                   for k in sorted({k for r in mine for k in r.get("explained_variance", {})})},
        })
    return table, target


def count(value) -> str:
    return "not reached" if value is None else f"{value:.0f}"


def ratio(value, reference):
    return f"{value / reference:.2f}" if value is not None and reference else "n/a"


def markdown(table: list[dict], target: float, initial: float, smooth: int, metric: str = "avg@4") -> str:
    trl = next((row for row in table if row["system"] == "trl-grpo-dapo"), None)
    lines = [f"initial held-out {metric} {initial:.3f}; target {target:.3f}; medians over seeds",
             "", "| system | seeds | samples to target (reached) | / TRL | per seed | after the policy-frozen rollouts "
             f"| mean of {smooth} evaluations at target (reached) | / TRL | µs per sample | / TRL | peak RSS MB | / TRL "
             "| final accuracy | / TRL | collapsed | padding efficiency |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in table:
        padding = "" if row["padding_efficiency"] is None else f"{row['padding_efficiency']:.3f}"
        per_seed = ", ".join(count(x) for x in row["samples_to_target_per_seed"])
        lines.append(
            f"| {row['system']} | {row['seeds']} | {count(row['samples_to_target'])} ({row['reached']}) "
            f"| {ratio(row['samples_to_target'], trl and trl['samples_to_target'])} | {per_seed} "
            f"| {count(row['policy_samples_to_target'])} "
            f"| {count(row['smoothed_samples_to_target'])} ({row['smoothed_reached']}) "
            f"| {ratio(row['smoothed_samples_to_target'], trl and trl['smoothed_samples_to_target'])} "
            f"| {row['us_per_sample']:.0f} | {ratio(row['us_per_sample'], trl and trl['us_per_sample'])} "
            f"| {row['peak_rss_mb']:.0f} | {ratio(row['peak_rss_mb'], trl and trl['peak_rss_mb'])} "
            f"| {row['final_accuracy']:.3f} ± {row['final_accuracy_sd']:.3f} "
            f"| {ratio(row['final_accuracy'], trl and trl['final_accuracy'])} | {row['collapsed']} "
            f"| {padding} |")
    return "\n".join(lines) + "\n" + explained_variance_markdown(table)


def explained_variance_markdown(table: list[dict]) -> str:
    """The critic's and the group baseline's explained variance of the outcome over the RL steps, by position in
    the response (tokens A to B) and by the response's length (A to B tokens): where the samples go."""
    columns = [f"{kind}_{name}" for kind in ("pos", "len") for name in vapo.bin_names()]
    rows = []
    for row in table:
        for predictor, label in (("value/explained_variance", "critic"), ("value/group_baseline_explained_variance",
                                                                          "group mean of the others")):
            found = {c: row["explained_variance"].get(f"{predictor}_{c}") for c in columns}
            if any(v is not None for v in found.values()):
                rows.append(f"| {row['system']} | {label} | " + " | ".join("" if v is None else f"{v:.3f}" for v in found.values()) + " |")
    if not rows:
        return ""
    header = [f"position {name}" for name in vapo.bin_names()] + [f"length {name}" for name in vapo.bin_names()]
    return ("\nexplained variance of the outcome over the RL steps (mean over seeds), by position in the response "
            "and by response length (tokens)\n\n| system | predictor | " + " | ".join(header) + " |\n"
            + "|---|---|" + "---|" * len(header) + "\n" + "\n".join(rows) + "\n")


def plot(runs: list[dict], target: float, path: Path, metric: str = "avg@4") -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4))
    by_samples, by_time = fig.subplots(1, 2)
    colours = {"vapo": "C0", "vanilla-ppo": "C1", "trl-grpo-dapo": "C2"}
    for r in runs:
        samples, seconds, accuracy = zip(*r["curve"])
        label = r["system"] if r["seed"] == min(x["seed"] for x in runs if x["system"] == r["system"]) else None
        by_samples.plot(samples, accuracy, color=colours[r["system"]], alpha=0.8, label=label)
        by_time.plot(seconds, accuracy, color=colours[r["system"]], alpha=0.8, label=label)
    for ax, xlabel in ((by_samples, "generated samples"), (by_time, "training wall time (s)")):
        ax.axhline(target, color="grey", linestyle="--", linewidth=1)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"held-out {metric}")
        ax.grid(alpha=0.3)
    by_samples.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(args: Args) -> None:
    if args.trl_worker_seed:
        run_trl(args, args.trl_worker_seed, Path(args.out_dir))
        return
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if args.summarise_only:
        if args.results:
            runs = list(json.loads(Path(args.results).read_text())["runs"].values())
        else:
            runs = [json.loads(p.read_text()) for p in sorted(out.glob("*/result.json"))]
        runs = [r for r in runs if r["system"] in args.systems]
        missing = [s for s in args.systems if not any(r["system"] == s for r in runs)]
        if missing:
            raise SystemExit(f"no finished run of {', '.join(missing)} in {out}; run them or leave them out of --systems")
    else:
        runs = []
        for seed in args.seeds:
            for system in args.systems:
                print(f"running {system} seed {seed} ...", flush=True)
                runs.append(run_one(args, system, seed))
                print(f"  final accuracy {runs[-1]['curve'][-1][2]:.3f}, {runs[-1]['train_s']:.0f} s", flush=True)
    table, target = summarise(args, runs)
    initial = target - args.target_gain
    metric = f"avg@{shared_settings(args).eval_samples}"
    text = markdown(table, target, initial, args.smooth, metric)
    print(text)
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps({"args": vars(args), "table": table, "runs": runs}, indent=1))
    plot(runs, target, out / "curves.png", metric)


if __name__ == "__main__":
    main(parse_args())
