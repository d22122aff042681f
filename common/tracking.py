"""Run directories: metrics as JSONL, sample completions as JSONL, and a PNG of the curves.

    log = RunLog(run_dir)
    log.metrics(step, {"reward/mean": 0.3, ...})     # one JSON row per step in metrics.jsonl
    log.samples(step, [{"prompt": ..., "completion": ..., "reward": ...}])
    log.plot(["reward/mean", ...])                    # curves.png, rewritten at every call
    log.close()

With `--report-to` (TRL's `report_to`, CleanRL's `--track`) the same metrics also go to experiment trackers,
through accelerate's: the trainer makes its `Accelerator(log_with=experiment_trackers(args.report_to),
project_dir=run_dir)` and hands it to `RunLog`, which starts the trackers with the run's arguments as their
configuration. TensorBoard writes under RUN_DIR/PROJECT.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Sequence


def experiment_trackers(report_to: Sequence[str]) -> list[str] | None:
    """accelerate's `log_with` for `--report-to`: the trackers named, each checked to be one accelerate knows
    and to be installed (accelerate itself skips a tracker whose package is missing, without a word)."""
    from accelerate.tracking import get_available_trackers
    from accelerate.utils import LoggerType

    known = [kind.value for kind in LoggerType if kind != LoggerType.ALL]
    available = [str(kind) for kind in get_available_trackers()]
    for name in report_to:
        if name not in known:
            raise ValueError(f"--report-to {name}: not an experiment tracker; choose among {', '.join(known)}")
        if name not in available:
            package = "tensorboardX" if name == "tensorboard" else name.replace("_", "-")
            raise ValueError(f"--report-to {name}: its package is not installed; pip install {package}")
    return list(report_to) or None


class RunLog:
    def __init__(self, run_dir: str | Path, resume_step: int | None = None, accelerator=None, project: str = "",
                 config=None):
        """Log into `run_dir` (on the main process only, when an `accelerator` is given). When resuming from
        a checkpoint at `resume_step`, rows written after that step (by the run that was killed) are dropped,
        since the resumed run redoes those steps. The accelerator's trackers, if it has any, start here as
        `project` with the dataclass `config` (the run's arguments) as their configuration."""
        self.run_dir = Path(run_dir)
        self.accelerator = accelerator
        self.is_main = accelerator is None or accelerator.is_main_process
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.samples_path = self.run_dir / "samples.jsonl"
        if not self.is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for path in (self.metrics_path, self.samples_path):
            if resume_step is None:
                path.write_text("")
            elif path.exists():
                kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= resume_step]
                path.write_text("".join(line + "\n" for line in kept))
        if accelerator is not None and accelerator.log_with:
            accelerator.init_trackers(project or self.run_dir.name, config=_hyperparameters(config))

    def metrics(self, step: int, values: dict) -> None:
        if not self.is_main:
            return
        row = {"step": step, **{k: _plain(v) for k, v in values.items()}}
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.accelerator is not None and self.accelerator.log_with:
            self.accelerator.log({k: v for k, v in row.items() if _finite(v) and k != "step"}, step=step)

    def close(self) -> None:
        """Flush and finish the trackers (a no-op without them)."""
        if self.accelerator is not None and self.accelerator.log_with:
            self.accelerator.end_training()

    def samples(self, step: int, rows: Sequence[dict]) -> None:
        if not self.is_main:
            return
        with self.samples_path.open("a") as f:
            for row in rows:
                f.write(json.dumps({"step": step, **{k: _plain(v) for k, v in row.items()}}) + "\n")

    def rows(self) -> list[dict]:
        return read_metrics(self.run_dir)

    def plot(self, keys: Sequence[str], title: str = "", path: str | Path | None = None,
             marks: dict[int, str] | None = None) -> Path | None:
        if not self.is_main:
            return None
        return plot_curves(self.rows(), keys, Path(path) if path else self.run_dir / "curves.png", title, marks)


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def plot_curves(rows: Sequence[dict], keys: Sequence[str], path: Path, title: str = "",
                marks: dict[int, str] | None = None) -> Path:
    """One small panel per metric against step; missing values are skipped. `marks` draws a dashed
    vertical line at each given step (e.g. where a phase of training ends), labelled in the legend."""
    # a bare Figure, not pyplot: drawing a file must not change the backend of a notebook that trains
    from matplotlib.figure import Figure

    keys = [k for k in keys if any(_finite(r.get(k)) for r in rows)]
    columns = min(4, max(1, len(keys)))
    lines = max(1, math.ceil(len(keys) / columns))
    fig = Figure(figsize=(4 * columns, 2.8 * lines))
    axes = fig.subplots(lines, columns, squeeze=False)
    for ax in axes.flat[len(keys):]:
        ax.axis("off")
    for ax, key in zip(axes.flat, keys):
        points = [(r["step"], r[key]) for r in rows if _finite(r.get(key))]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="." if len(points) < 40 else None)
        for step, label in (marks or {}).items():
            ax.axvline(step, color="gray", linestyle="--", linewidth=0.8, label=label)
        ax.set_title(key, fontsize=9)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
    if marks and keys:
        axes.flat[0].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _hyperparameters(config) -> dict | None:
    """A dataclass's fields as the flat str/number/bool values every tracker accepts (TensorBoard's hparams
    take nothing else): a tuple, a path or None is written as its text."""
    if config is None:
        return None
    return {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in dataclasses.asdict(config).items()}


def _plain(value):
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return value.item()
    return value
