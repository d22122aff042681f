"""Run logs and experiment trackers: metrics.jsonl, and the same metrics in TensorBoard through accelerate."""

import dataclasses
import struct
from pathlib import Path

import pytest
import accelerate.tracking
from accelerate import Accelerator
from accelerate.utils import LoggerType

from common.tracking import RunLog, experiment_trackers, read_metrics


def tensorboard_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the TensorBoard event files under `log_dir`: tag -> [(step, value)], read record by
    record (TFRecord: length, its checksum, the Event proto, its checksum)."""
    from tensorboardX.proto.event_pb2 import Event

    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(log_dir.rglob("events.out.tfevents.*")):
        data = path.read_bytes()
        position = 0
        while position < len(data):
            (length,) = struct.unpack("<Q", data[position : position + 8])
            event = Event.FromString(data[position + 12 : position + 12 + length])
            position += 12 + length + 4
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


@dataclasses.dataclass
class Settings:
    lr: float = 1e-6
    run_dir: Path = Path("runs/x")
    report_to: tuple[str, ...] = ("tensorboard",)


def test_metrics_reach_tensorboard_as_they_reach_the_jsonl(tmp_path):
    accelerator = Accelerator(log_with=experiment_trackers(("tensorboard",)), project_dir=tmp_path)
    log = RunLog(tmp_path, accelerator=accelerator, project="demo", config=Settings())
    log.metrics(1, {"reward/mean": 0.25, "phase": "rl"})
    log.metrics(2, {"reward/mean": 0.5, "eval/accuracy": float("nan")})
    log.close()
    assert [r["reward/mean"] for r in read_metrics(tmp_path)] == [0.25, 0.5]
    scalars = tensorboard_scalars(tmp_path / "demo")
    assert scalars["reward/mean"] == [(1, 0.25), (2, 0.5)]
    assert "eval/accuracy" not in scalars and "phase" not in scalars  # text and NaN stay in the JSONL only
    hparams = next((tmp_path / "demo").rglob("hparams.yml")).read_text()
    assert "lr: 1.0e-06" in hparams and "run_dir: runs/x" in hparams and "report_to: ('tensorboard',)" in hparams


def test_without_trackers_only_the_run_directory_is_written(tmp_path):
    assert experiment_trackers(()) is None
    log = RunLog(tmp_path, accelerator=Accelerator(log_with=experiment_trackers(()), project_dir=tmp_path))
    log.metrics(1, {"reward/mean": 0.25})
    log.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl", "samples.jsonl"]


def test_an_unknown_or_missing_tracker_is_a_clear_error(monkeypatch):
    with pytest.raises(ValueError, match="--report-to tensorbord: not an experiment tracker; choose among"):
        experiment_trackers(("tensorbord",))
    monkeypatch.setattr(accelerate.tracking, "get_available_trackers", lambda: [LoggerType.TENSORBOARD])
    with pytest.raises(ValueError, match="--report-to wandb: its package is not installed; pip install wandb"):
        experiment_trackers(("tensorboard", "wandb"))
