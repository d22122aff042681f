"""Agent-R against its baselines at CPU scale, iteration by iteration (Agent-R Fig. 3, Tables 2 and 3).

    python benchmarks/agent_r_compare.py                               # 4 rows x 1 seed, the CPU default
    python benchmarks/agent_r_compare.py --rows agent-r good-only --seeds 2

Each row is one `agent_r.py` command line (printed in the table). Every row starts from the same warm-started
tiny agent and searches the same tasks with the same budget in its first iteration; the rows differ only in
what Phase II trains on: revision + good trajectories (Agent-R), good trajectories only (the paper's
"optimal" baseline), or revision trajectories whose revision comes at the end of the bad trajectory
(Direct-Revision), or revision trajectories alone (a diagnostic). The table gives the held-out success rate and the revision test's recovery rate after
each iteration (mean over seeds), with the paper's TextCraft numbers beside them; writes `results.md`,
`results.json` and `curves.png` into --out-dir.
"""

from __future__ import annotations

import json
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import agent_r  # noqa: E402
from common.cli import parse_with_run_flags  # noqa: E402
from common.tracking import read_metrics  # noqa: E402

# row: (flags, the paper's TextCraft numbers for the same training data, Llama-3.1-8B)
ROWS = {
    "agent-r": ([], "success 78.00 (Table 2, iter 3); revision test 43.24 (Table 3, iter 3)"),
    "good-only": (["--no-revision"], "revision test 0.00 for optimal-trajectory training (Table 3)"),
    "direct-revision": (["--transition", "end"], "success 66.00 (Table 2)"),
    "revision-only": (["--no-good-trajectories"], "not in the paper (a diagnostic: the revision data alone)"),
}
METRICS = ("eval/success_rate", "eval/recovery_rate", "eval/repeated_actions", "data/first_bad_step")


@dataclass
class Args:
    rows: list[str] = field(default_factory=lambda: list(ROWS))
    """which rows to run (names as in the table)."""
    seeds: int = 1
    """seeds per row."""
    extra: list[str] = field(default_factory=list)
    """flags passed to every run, e.g. --extra --iterations 2; a flag this script does not know
    goes there too (just --iterations 2)."""
    out_dir: str = "runs/agent_r_compare"


def main(args: Args) -> None:
    out = Path(args.out_dir)
    results = {}
    for name in args.rows:
        flags, paper = ROWS[name]
        runs = []
        for seed in range(1, args.seeds + 1):
            run_dir = out / name / f"seed{seed}"
            agent_r.train(agent_r.parse_args(flags + args.extra + ["--seed", str(seed), "--run-dir", str(run_dir)]))
            runs.append(read_metrics(run_dir))
        iterations = [row["step"] for row in runs[0]]
        results[name] = {
            "command": "python agent_r.py " + " ".join(flags + args.extra),
            "paper": paper,
            "iterations": iterations,
            **{key: [statistics.mean(run[i].get(key, float("nan")) for run in runs) for i in range(len(iterations))]
               for key in METRICS},
        }
    write_outputs(results, out, args.seeds)


def write_outputs(results: dict, out: Path, seeds: int) -> None:
    from matplotlib.figure import Figure  # not pyplot: importing this module must not change a notebook's backend

    out.mkdir(parents=True, exist_ok=True)
    lines = [f"| setting | held-out success by iteration (mean of {seeds} seed{'s' * (seeds > 1)}) | recovery rate by "
             "iteration | repeated actions per episode, last | paper, TextCraft | command |",
             "|---|---|---|---|---|---|"]
    for name, r in results.items():
        success = " → ".join(f"{v:.0%}" for v in r["eval/success_rate"])
        recovery = " → ".join(f"{v:.0%}" for v in r["eval/recovery_rate"])
        lines.append(f"| {name} | {success} | {recovery} | {r['eval/repeated_actions'][-1]:.2f} | {r['paper']} | "
                     f"`{r['command']}` |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=2))
    fig = Figure(figsize=(4 * len(METRICS), 3.4))
    axes = fig.subplots(1, len(METRICS))
    for ax, key in zip(axes, METRICS):
        for name, r in results.items():
            ax.plot(r["iterations"], r[key], marker="o", label=name)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    print("\n".join(lines))


if __name__ == "__main__":
    main(parse_with_run_flags(Args))
