"""Checkpoints that a killed run resumes from exactly.

A checkpoint directory `run_dir/checkpoint-NNNNNN/` holds:
- `accelerate/`: `accelerator.save_state`: every prepared model, optimizer and scheduler (sharded
  under FSDP) and the RNG states of every process;
- one Hugging Face directory per model (`policy/`, `critic/`, ...) loadable by path, e.g. by `evals.py`;
- `trainer_state.json`: the step, the data position and anything else the script needs, with its Args.
It is written under a temporary name and renamed when complete, so a run killed while saving leaves the
previous checkpoint intact, and `latest_checkpoint` never returns a half-written one.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
from pathlib import Path

_NAME = re.compile(r"^checkpoint-(\d+)$")
# save_state warns "Removed shared tensor {'lm_head.weight'}" at every checkpoint of a model whose output layer is
# its tied embedding (the tiny models, Qwen2.5's small ones): the tie is restored on load, so the warning says nothing
logging.getLogger("accelerate.utils.other").setLevel(logging.ERROR)


def save_checkpoint(accelerator, run_dir: Path, step: int, state: dict, models: dict, tokenizer=None,
                    keep_last: int = 2) -> Path:
    run_dir = Path(run_dir)
    final, scratch = run_dir / f"checkpoint-{step:06d}", run_dir / f".checkpoint-{step:06d}.partial"
    if accelerator.is_main_process:
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(scratch / "accelerate"))
    for name, model in models.items():
        full_state = accelerator.get_state_dict(model)  # gathers FSDP shards (a collective: all ranks call it)
        accelerator.unwrap_model(model).save_pretrained(
            scratch / name, state_dict=full_state, is_main_process=accelerator.is_main_process
        )
    if accelerator.is_main_process:
        if tokenizer is not None:
            tokenizer.save_pretrained(scratch / next(iter(models)))
        (scratch / "trainer_state.json").write_text(json.dumps({"step": step, **state}, indent=2, default=str))
        shutil.rmtree(final, ignore_errors=True)
        scratch.rename(final)
        for old in all_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def all_checkpoints(run_dir: Path) -> list[Path]:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [p for p in run_dir.iterdir() if p.is_dir() and _NAME.match(p.name)]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = all_checkpoints(run_dir)
    return found[-1] if found else None


def load_checkpoint(accelerator, checkpoint: Path) -> dict:
    """Restore prepared models, optimizers, schedulers and RNG states; return the trainer state."""
    checkpoint = Path(checkpoint)
    accelerator.load_state(str(checkpoint / "accelerate"))
    return json.loads((checkpoint / "trainer_state.json").read_text())


def check_finite(loss, what: str, step: int, run_dir: Path) -> None:
    """Stop on a NaN or infinite loss before it reaches the weights, naming the checkpoint to resume from."""
    value = float(loss.detach() if hasattr(loss, "detach") else loss)
    if not math.isfinite(value):
        raise FloatingPointError(
            f"the {what} loss is {value} at step {step + 1}; stopping before it reaches the weights. "
            f"The last checkpoint ({latest_checkpoint(run_dir) or 'none yet'}) is intact: lower the learning "
            f"rate or check the data and rewards, then continue with --resume."
        )
