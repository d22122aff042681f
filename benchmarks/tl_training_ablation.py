"""TL-Training's ablation table (the paper's ablation table, arXiv v1) at CPU scale: every row, several seeds.

    python benchmarks/tl_training_ablation.py                          # 5 rows x 3 seeds, the CPU task
    python benchmarks/tl_training_ablation.py --rows "plain SFT" "all three" --seeds 1
    python benchmarks/tl_training_ablation.py --rows all               # also the paper's pairwise rows

Finished runs are read back from --out-dir, so more seeds only run the new ones, and rows can be run in
parallel processes (pin each to a core with `taskset` and OMP_NUM_THREADS=1; keep a row with IRM in the same
process as the SFT-only row it starts from, e.g. "plain SFT" with "+IRM") and the table then assembled by one
more call with every row.

Each row is one `tl_training.py` command line (printed in the table). All rows train on the same data (the
synthetic task of each seed) for the same SFT steps; the rows with IRM add the same PPO steps. The score is
the held-out greedy accuracy at the paper's three levels (tool selection TS, parameter identification PI,
content filling CF = the exact call), mean ± std over seeds, with the paper's ToolAlpaca and RoTBench numbers
beside it. A row with IRM starts PPO from the SFT model of its SFT-only row (same seed, same flags), exactly
what its one-line command does in one go. Writes `results.md`, `results.json` and `levels.png` to --out-dir.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import tl_training  # noqa: E402
from common.cli import parse_with_run_flags  # noqa: E402

# row: (SFT flags, with IRM, paper's ToolAlpaca TS/PI/CF, paper's RoTBench TS/PI/CF) — arXiv v1 ablation table
ROWS = {
    "plain SFT": (["--stages", "sft", "--w-max", "1"], False, (74.56, 70.18, 42.98), (76.19, 55.24, 38.10)),
    "+MAE": (["--stages", "mae", "sft", "--w-max", "1"], False, (73.68, 64.91, 43.68), (78.10, 57.14, 40.95)),
    "+PKT": (["--stages", "sft"], False, (77.78, 71.72, 43.86), (82.86, 63.81, 48.57)),
    "+IRM": (["--stages", "sft", "--w-max", "1"], True, (88.60, 84.21, 57.02), (79.05, 59.05, 44.76)),
    "+MAE +PKT": (["--stages", "mae", "sft"], False, (73.68, 64.91, 43.86), (80.95, 56.19, 40.00)),
    "+MAE +IRM": (["--stages", "mae", "sft", "--w-max", "1"], True, (87.72, 78.95, 57.89), (82.86, 56.19, 45.71)),
    "+PKT +IRM": (["--stages", "sft"], True, (86.84, 79.82, 57.02), (82.86, 63.81, 48.57)),
    "all three": (["--stages", "mae", "sft"], True, (87.72, 78.07, 57.89), (83.81, 54.29, 42.86)),
}
DEFAULT_ROWS = ["plain SFT", "+MAE", "+PKT", "+IRM", "all three"]
LEVELS = list(tl_training.LEVELS)


@dataclass
class Args:
    rows: list[str] = field(default_factory=lambda: list(DEFAULT_ROWS))
    """rows of the table to run (names as in the table), or "all" for the paper's eight rows."""
    seeds: int = 3
    """seeds per row (seeds 1, 2, ...): each seed draws its own synthetic data, batch order and PPO samples; every
    run starts from the same shipped base model."""
    extra: list[str] = field(default_factory=list)
    """flags passed to every run, e.g. --extra --sft-epochs 2; a flag this script does not know
    goes there too (just --sft-epochs 2)."""
    out_dir: str = "runs/tl_training_ablation"


def finished_or_run(run_dir: Path, argv: list[str]) -> tuple[dict, float]:
    """The last stage's evaluation and the wall time of one tl_training.py run, read back when `run_dir` holds a
    finished one (so a killed benchmark, or rows run in parallel processes, are completed without rerunning)."""
    if not (run_dir / "seconds.json").is_file():
        start = time.perf_counter()
        tl_training.train(tl_training.parse_args(argv))
        (run_dir / "seconds.json").write_text(json.dumps(time.perf_counter() - start))
    evaluations = json.loads((run_dir / "evaluations.json").read_text())
    return list(evaluations.values())[-1], json.loads((run_dir / "seconds.json").read_text())


def main(args: Args) -> None:
    names = list(ROWS) if args.rows == ["all"] else args.rows
    out = Path(args.out_dir)
    results = {}
    for name in names:
        sft_flags, with_irm, _, _ = ROWS[name]
        results[name] = {"scores": [], "seconds": []}
        for seed in range(1, args.seeds + 1):
            # the plain-SFT baseline is a row of its own, not retrained beside every row
            common = ["--seed", str(seed), "--no-compare-plain-sft", *args.extra]
            # the SFT-only run of these flags, done once and shared by the row with IRM on top of it
            sft_dir = out / "sft" / "_".join(sft_flags).replace("--", "") / f"seed{seed}"
            evaluation, seconds = finished_or_run(sft_dir, sft_flags + common + ["--run-dir", str(sft_dir)])
            if with_irm:
                irm_dir = out / name.replace(" ", "").replace("+", "_") / f"seed{seed}"
                evaluation, irm_seconds = finished_or_run(
                    irm_dir, ["--stages", "irm", "--model", str(sft_dir / "sft" / "model"), *common,
                              "--run-dir", str(irm_dir)])
                seconds += irm_seconds
            results[name]["scores"].append({level: evaluation[f"eval/{level}"] for level in LEVELS})
            results[name]["seconds"].append(seconds)
            print(f"{name} seed {seed}: " + ", ".join(f"{k} {v:.1%}" for k, v in results[name]["scores"][-1].items())
                  + f" ({seconds:.0f} s)", flush=True)
        stages = sft_flags[: sft_flags.index("sft") + 1] + (["irm"] if with_irm else []) + sft_flags[sft_flags.index("sft") + 1 :]
        results[name]["command"] = " ".join(["python tl_training.py", *stages, *args.extra])
    write_outputs(results, out, args.seeds)


def mean_std(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.1f} ± {100 * std:.1f}"


def write_outputs(results: dict, out: Path, seeds: int) -> None:
    from matplotlib.figure import Figure

    out.mkdir(parents=True, exist_ok=True)
    lines = [f"| setting | TS | PI | CF (exact call) | CF per seed | paper ToolAlpaca TS / PI / CF "
             f"| paper RoTBench TS / PI / CF | time per seed | command |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        _, _, alpaca, rotbench = ROWS[name]
        cells = [mean_std([s[level] for s in r["scores"]]) for level in LEVELS]
        per_seed = ", ".join(f"{100 * s['content_filling']:.1f}" for s in r["scores"])
        lines.append(f"| {name} | {cells[0]} | {cells[1]} | **{cells[2]}** | {per_seed} | {' / '.join(map(str, alpaca))} | "
                     f"{' / '.join(map(str, rotbench))} | {statistics.mean(r['seconds']):.0f} s | `{r['command']}` |")
    lines.append(f"\nHeld-out greedy accuracy (%), mean ± std over {seeds} seeds (--seed 1..{seeds}); each seed "
                 f"has its own synthetic data, batch order and PPO samples, from the same shipped base model.")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=2))
    fig = Figure(figsize=(9, 4))
    ax = fig.subplots()
    width = 0.8 / len(results)
    for k, (name, r) in enumerate(results.items()):
        means = [100 * statistics.mean(s[level] for s in r["scores"]) for level in LEVELS]
        stds = [100 * statistics.stdev([s[level] for s in r["scores"]]) if seeds > 1 else 0.0 for level in LEVELS]
        ax.bar([i + k * width for i in range(len(LEVELS))], means, width, yerr=stds, label=name, capsize=2)
    ax.set_xticks([i + width * (len(results) - 1) / 2 for i in range(len(LEVELS))],
                  ["tool selection (TS)", "parameter identification (PI)", "content filling (CF)"])
    ax.set_ylabel(f"held-out accuracy, % (mean ± std, {seeds} seeds)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "levels.png", dpi=110)
    print("\n".join(lines))


if __name__ == "__main__":
    main(parse_with_run_flags(Args))
