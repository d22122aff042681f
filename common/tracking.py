"""Run directories: metrics as JSONL, sample completions as JSONL, and a PNG of the curves.

    log = RunLog(run_dir)
    log.metrics(step, {"reward/mean": 0.3, ...})     # one JSON row per step in metrics.jsonl
    log.samples(step, [{"prompt": ..., "completion": ..., "reward": ...}])
    log.plot(["reward/mean", ...])                    # curves.png, rewritten at every call
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence


class RunLog:
    def __init__(self, run_dir: str | Path, resume_step: int | None = None, is_main: bool = True):
        """Log into `run_dir`. When resuming from a checkpoint at `resume_step`, rows written after that
        step (by the run that was killed) are dropped, since the resumed run redoes those steps."""
        self.run_dir = Path(run_dir)
        self.is_main = is_main
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.samples_path = self.run_dir / "samples.jsonl"
        if not is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for path in (self.metrics_path, self.samples_path):
            if resume_step is None:
                path.write_text("")
            elif path.exists():
                kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= resume_step]
                path.write_text("".join(line + "\n" for line in kept))

    def metrics(self, step: int, values: dict) -> None:
        if not self.is_main:
            return
        row = {"step": step, **{k: _plain(v) for k, v in values.items()}}
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")

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


def _plain(value):
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return value.item()
    return value
