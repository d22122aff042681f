"""VAPO's ablation table (VAPO Table 1) reproduced at CPU scale: every row, several seeds.

    python benchmarks/vapo_ablation.py                       # 9 rows x 3 seeds at the CPU scale
    python benchmarks/vapo_ablation.py --seeds 1 --rows vapo vanilla-ppo
    python benchmarks/vapo_ablation.py --recorded-only        # the table of the runs recorded so far

Each row is one `vapo.py` command line (printed in the table). All rows spend the same sample budget:
the same number of steps with the same number of samples per step. The score is the held-out accuracy
at the last step (vapo.py's evaluation; at the CPU scale avg@4 on 128 prompts); the table gives
mean ± std over seeds, the paper's AIME24 number beside it, and writes `results.md`, `results.json` and `curves.png` into --out-dir.

Every finished run is also recorded in --results (a file kept in the repository), so a table can be built over
several sessions or machines: a run found there is not run again. The record names the base model it was measured
on (the warm start's step and accuracy); runs on a different base are never mixed into the same table.
"""

from __future__ import annotations

import fcntl
import json
import statistics
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import vapo  # noqa: E402
from common.checkpoint import latest_checkpoint  # noqa: E402
from common.cli import parse_with_run_flags  # noqa: E402
from common.tracking import read_metrics  # noqa: E402

# (row name, flags, VAPO Table 1 AIME24 avg@32)
ROWS = {
    "vapo": ([], 60),
    "w/o value pretraining": (["--value-pretrain-steps", "0"], 11),
    "w/o decoupled GAE": (["--no-decoupled-gae"], 33),
    "w/o length-adaptive GAE": (["--no-length-adaptive-gae"], 45),
    "w/o clip-higher": (["--clip-high", "0.2"], 46),
    "w/o token-level loss": (["--no-token-level-loss"], 53),
    "w/o positive-example LM loss": (["--nll-coef", "0"], 54),
    "w/o group sampling": (None, 55),  # one response for each of as many prompts: `row_flags`
    "vanilla-ppo": (["--preset", "vanilla-ppo"], 5),
}


@dataclass
class Args:
    rows: list[str] = field(default_factory=lambda: list(ROWS))
    """which rows of the table to run (names as in the table)."""
    seeds: int = 3
    """seeds per row."""
    extra: list[str] = field(default_factory=list)
    """flags passed to every run, e.g. --extra --total-steps 40; a flag this script does not know
    goes there too (just --total-steps 40)."""
    out_dir: str = "runs/vapo_ablation"
    results: str = "benchmarks/results/vapo_ablation.json"
    """finished runs, kept across machines: {"base": ..., "runs": {"<row>/seed<N>": {...}}}."""
    recorded_only: bool = False
    """run nothing: build the table from the runs already in --results (a row shows the seeds it has)."""


def row_flags(name: str, extra: list[str]) -> list[str]:
    """A row's flags; "w/o group sampling" spends the rollout's samples (prompts x samples at the scale --extra
    sets: 512 at the CPU scale, 256 at cpu-long) as one response for each of as many prompts."""
    flags, _ = ROWS[name]
    if flags is None:
        flags = ["--prompts-per-step", str(vapo.parse_args(extra).rollout_size), "--samples-per-prompt", "1"]
    return flags


def base_fingerprint(extra: list[str]) -> dict:
    """What every row shares: the flags given to all runs, and the model they start from, named for the tiny
    model by the warm start's selected step and greedy accuracy (the warm start is picked at an evaluation
    during SFT, so another CPU or library build can pick another model)."""
    model = vapo.parse_args(extra).model
    path = Path(vapo.resolve_model(model)) / "warm_start.json"
    fingerprint = {"model": model, "extra": extra}
    if path.is_file():
        record = json.loads(path.read_text())
        fingerprint |= {"warm_start_step": record["step"], "warm_start_accuracy": record["accuracy"]}
    return fingerprint


@contextmanager
def locked_results(path: Path, base: dict):
    """The results file, read and written under a lock (rows may run in parallel processes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        results = json.loads(path.read_text()) if path.is_file() else {"base": base, "runs": {}}
        if results["base"] != base:
            raise SystemExit(
                f"{path} holds runs measured from another base model or with other --extra flags ({results['base']}); "
                f"these runs would be {base}. They are not comparable: pass another --results, or move {path} away."
            )
        yield results
        path.write_text(json.dumps(results, indent=1) + "\n")


def commit() -> str:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()


def main(args: Args) -> None:
    out = Path(args.out_dir)
    # a table of recorded runs needs neither the base model nor its fingerprint
    recorded_runs = json.loads(Path(args.results).read_text())["runs"] if args.recorded_only else None
    base = None if args.recorded_only else base_fingerprint(args.extra)
    results = {}
    for name in args.rows:
        flags, paper = row_flags(name, args.extra), ROWS[name][1]
        finals, curves = [], []
        for seed in range(1, args.seeds + 1):
            key = f"{name}/seed{seed}"
            if args.recorded_only:
                done = recorded_runs.get(key)
                if done is None:
                    continue
            else:
                with locked_results(Path(args.results), base) as recorded:
                    done = recorded["runs"].get(key)
            if done is None:
                run_dir = out / name.replace("/", "").replace(" ", "-") / f"seed{seed}"
                argv = flags + args.extra + ["--seed", str(seed), "--run-dir", str(run_dir)]
                # a run with a checkpoint continues from it: rerunning the benchmark resumes where it was killed
                vapo.train(vapo.parse_args(argv + ["--resume"] * (latest_checkpoint(run_dir) is not None)))
                evals = [{"step": r["step"], "eval/accuracy": r["eval/accuracy"]}
                         for r in read_metrics(run_dir) if "eval/accuracy" in r]
                done = {"command": "python vapo.py " + " ".join(argv[:-2]), "commit": commit(), "evals": evals}
                with locked_results(Path(args.results), base) as recorded:
                    recorded["runs"][key] = done
            finals.append(done["evals"][-1]["eval/accuracy"])
            curves.append(done["evals"])
        if not finals:
            continue
        results[name] = {
            "command": " ".join(["python vapo.py"] + flags + args.extra),
            "base": statistics.mean(c[0]["eval/accuracy"] for c in curves),
            "mean": statistics.mean(finals),
            "std": statistics.stdev(finals) if len(finals) > 1 else 0.0,
            "finals": finals,
            "paper": paper,
            "curves": curves,
        }
        print(f"{name}: {results[name]['mean']:.3f} ± {results[name]['std']:.3f} (paper {paper})", flush=True)
    write_outputs(results, out)


def write_outputs(results: dict, out: Path) -> None:
    from matplotlib.figure import Figure

    out.mkdir(parents=True, exist_ok=True)
    lines = ["| setting | seeds | held-out accuracy, base → final (mean ± sample std) | per seed | paper AIME24 | command |",
             "|---|---|---|---|---|---|"]
    for name, r in results.items():
        per_seed = ", ".join(f"{f:.1%}" for f in r["finals"])
        lines.append(f"| {name} | {len(r['finals'])} | {r['base']:.1%} → **{r['mean']:.1%} ± {r['std']:.1%}** | {per_seed} "
                     f"| {r['paper']} | `{r['command']}` |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=2))
    fig = Figure(figsize=(8, 5))
    ax = fig.subplots()
    for name, r in results.items():
        steps = [e["step"] for e in r["curves"][0]]
        mean = [statistics.mean(c[i]["eval/accuracy"] for c in r["curves"]) for i in range(len(steps))]
        ax.plot(steps, mean, label=f"{name} ({r['mean']:.0%})", linewidth=2.5 if name == "vapo" else 1.2)
    ax.set_xlabel("step (same number of samples per step for every row)")
    ax.set_ylabel("held-out accuracy (mean over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    print("\n".join(lines))


if __name__ == "__main__":
    main(parse_with_run_flags(Args))
