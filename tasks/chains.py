"""VAPO's long CPU world (`vapo.py --scale cpu-long`): chains of 2 to 40 additions and subtractions, every step
written out, so that one batch holds solutions of about 25 to 520 tokens.

The three problems VAPO is built for all occur here: the longest solutions are twenty times the shortest
(heterogeneous lengths), the only reward is the final answer's (sparse reward), and a value estimate has to carry
that reward back over hundreds of tokens (value bias over long sequences). A step's mistake is visible on the
line where it happens, and since every step can fail, long chains are hard: with a per-step error p, a chain of
n steps is right about (1 - p)^n of the time.

    Start at 21. In turns +21 and -16: 5 steps.      5. 21+21=42
                                                     4. 42-16=26
                                                     3. 26+21=47
                                                     2. 47-16=31
                                                     1. 31+21=52
                                                     Answer: 52

A chain applies two moves in turns, and each line of the solution (right) carries the number of steps still to
go, the running total and the move: every step reads only the line before it and the prompt's two moves, and the
line numbered 1 is the last: the model has no position in a long prompt to find and no count to compare. Two
formats that need them did not train within the build's budget (docs/vapo.md, "The long task"). Rows use the
DAPO-Math-17k schema, as tasks/arithmetic.py's do, with `extra_info.num_steps`; the answer is checked on the last
line by the same checker as AIME.

The base model, models/tiny-chains, continues models/tiny-arithmetic (same tokenizer and size) by SFT on gold
chains, stopped inside a base-accuracy window:

    python -m tasks.chains --rebuild    # models/tiny-chains
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

from common.cache import MODELS_DIR, build_once, config_key, rebuild_shipped
from tasks.arithmetic import SYSTEM_PROMPT, greedy_answers

# Held-out accuracy is reported per bucket of chain length (number of operations), inclusive ranges.
LENGTH_BUCKETS = ((2, 5), (6, 10), (11, 20), (21, 30), (31, 40))


def length_bucket(num_steps: int) -> str:
    """The name of the bucket holding a chain of `num_steps` operations, e.g. "6-10"."""
    for low, high in LENGTH_BUCKETS:
        if low <= num_steps <= high:
            return f"{low}-{high}"
    raise ValueError(f"a chain of {num_steps} operations is outside every bucket of {LENGTH_BUCKETS}")


def bucket_counts(num_steps: list[int], correct: list[bool]) -> dict[str, list[int]]:
    """[right, total] per length bucket, every bucket in the buckets' order."""
    counts = {f"{low}-{high}": [0, 0] for low, high in LENGTH_BUCKETS}
    for steps, right in zip(num_steps, correct):
        bucket = counts[length_bucket(steps)]
        bucket[0] += bool(right)
        bucket[1] += 1
    return counts


def bucket_accuracy(num_steps: list[int], correct: list[bool]) -> dict[str, float]:
    """Accuracy per length bucket, over the buckets that hold at least one chain, in the buckets' order."""
    return {name: right / total for name, (right, total) in bucket_counts(num_steps, correct).items() if total}


class Move(NamedTuple):
    op: str  # "+" or "-"
    term: int


@dataclass(frozen=True)
class ChainTask:
    """Chains of `min_steps` to `max_steps` operations that apply two moves in turns, e.g. +8 then -5; the running
    total stays within [0, max_total] and each operand is 1 to max_operand."""

    seed: int = 0
    min_steps: int = 2
    max_steps: int = 40
    max_operand: int = 30
    max_total: int = 99

    def problem(self, rng: random.Random) -> tuple[int, tuple[Move, Move], int]:
        """The start, the two moves and the number of steps; drawn again until every total is in range."""
        steps = rng.randint(self.min_steps, self.max_steps)
        while True:
            start = rng.randint(0, self.max_total)
            first_op = rng.choice("+-")
            moves = (Move(first_op, rng.randint(1, self.max_operand)),
                     Move("-" if first_op == "+" else "+", rng.randint(1, self.max_operand)))
            if all(0 <= total <= self.max_total for total in running_totals(start, moves, steps)):
                return start, moves, steps

    def rows(self, n: int, split: str = "train") -> list[dict]:
        """`n` problems; "train" and "test" come from disjoint random streams of the same seed."""
        rng = random.Random(f"chains-{self.seed}-{split}")
        return [chain_row(i, *self.problem(rng)) for i in range(n)]


def running_totals(start: int, moves: tuple[Move, Move], steps: int) -> list[int]:
    """The total after each of `steps` operations, the moves applied in turns from `start`."""
    totals, total = [], start
    for step in range(steps):
        move = moves[step % 2]
        total = total + move.term if move.op == "+" else total - move.term
        totals.append(total)
    return totals


def chain_row(index: int, start: int, moves: tuple[Move, Move], steps: int) -> dict:
    """A row in the DAPO-Math-17k schema, with the gold solution in `solution`."""
    first, second = (f"{move.op}{move.term}" for move in moves)
    question = f"Start at {start}. In turns {first} and {second}: {steps} steps."
    lines, total = [], start
    for step, new_total in enumerate(running_totals(start, moves, steps)):
        move = moves[step % 2]
        lines.append(f"{steps - step}. {total}{move.op}{move.term}={new_total}")  # numbered by the steps to go
        total = new_total
    lines.append(f"Answer: {total}")
    return {
        "data_source": "synthetic_chains",
        "prompt": [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question}],
        "ability": "MATH",
        "reward_model": {"style": "rule", "ground_truth": str(total)},
        "extra_info": {"index": index, "num_steps": steps},
        "solution": "\n".join(lines),
    }


# --------------------------------------------------------------------------------------------------
# Warm start: models/tiny-arithmetic, SFT further on gold chains, stopped inside a base-accuracy window.
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ChainWarmStart:
    """The held-out evaluation is on `task`; training mixes its rows with as many of `short_task`'s, whose short
    chains teach the format and the arithmetic at a fraction of the cost of a long one."""

    task: ChainTask = ChainTask()
    short_task: ChainTask = ChainTask(max_steps=10)
    base: str = "tiny-arithmetic"
    train_rows: int = 20000  # half from each task
    eval_rows: int = 200
    batch_size: int = 32
    micro_batch_size: int = 8
    lr: float = 2e-3
    max_steps: int = 1500
    eval_every: int = 40
    max_new_tokens: int = 520  # the longest gold solution is about 510 tokens
    target_accuracy: float = 0.25  # stop at the first evaluation at or above this ...
    accuracy_window: tuple[float, float] = (0.10, 0.40)  # ... and never keep a model outside this window
    seed: int = 0
    base_dir: str | None = field(default=None, compare=False)  # the base's folder; default models/<base>

    def base_folder(self) -> Path:
        return Path(self.base_dir) if self.base_dir else MODELS_DIR / self.base

    def record(self) -> dict:
        """The config as the card and warm_start.json record it (without `base_dir`, a local path)."""
        return {k: v for k, v in asdict(self).items() if k != "base_dir"}

    def key(self) -> str:
        """Names the build: the config, the task's rows and the base model's weights."""
        config = self.record()
        weights = hashlib.sha256((self.base_folder() / "model.safetensors").read_bytes()).hexdigest()
        return config_key({"config": config, "rows": self.task.rows(5), "base": weights})


def evaluate_chains(model, tokenizer, rows: list[dict], max_new_tokens: int, batch_size: int = 256) -> dict:
    """Greedy held-out accuracy, overall and per length bucket."""
    samples, correct = greedy_answers(model, tokenizer, rows, max_new_tokens, batch_size)
    return {"accuracy": sum(correct) / len(correct),
            "buckets": bucket_accuracy([r["extra_info"]["num_steps"] for r in rows], correct),
            "example": samples[0].text}


def warm_start(config: ChainWarmStart, out_dir: Path, progress: bool = True) -> Path:
    """`out_dir`, holding the warm-started model; built there if missing (see `_train_warm_start`)."""
    return build_once(out_dir, lambda folder: _train_warm_start(config, folder, progress))


def _train_warm_start(config: ChainWarmStart, folder: Path, progress: bool) -> None:
    """The base's files are copied into `folder`, trained by SFT on gold chains and evaluated greedily every
    `eval_every` steps on held-out chains; training stops at the first evaluation that reaches `target_accuracy`,
    and the last model inside `accuracy_window` is kept. What was measured goes to `warm_start.json`."""
    from common.models import load_policy
    from common.sft import sft_into_accuracy_window, tokenize_chat

    for path in config.base_folder().iterdir():
        if path.suffix in {".json", ".jinja", ".safetensors"} and path.name != "warm_start.json":
            shutil.copy(path, folder / path.name)
    model, tokenizer = load_policy(str(folder))
    examples = []
    half = config.train_rows // 2
    for row in config.task.rows(half, "train") + config.short_task.rows(config.train_rows - half, "train"):
        messages = row["prompt"] + [{"role": "assistant", "content": row["solution"]}]
        chat = tokenize_chat(tokenizer, messages, trained=[False] * len(row["prompt"]) + [True])
        examples.append({"input_ids": chat.input_ids, "labels": chat.labels})
    eval_rows = config.task.rows(config.eval_rows, "test")

    def describe(step: int, loss: float, evaluation: dict) -> str:
        buckets = " ".join(f"{k}:{v:.0%}" for k, v in evaluation["buckets"].items())
        return (f"chains warm start: step {step} loss {loss:.3f} held-out accuracy {evaluation['accuracy']:.1%} "
                f"({buckets}); a completion: {evaluation['example']!r}")

    step, evaluation, history = sft_into_accuracy_window(
        model, examples, lambda: evaluate_chains(model, tokenizer, eval_rows, config.max_new_tokens),
        config.accuracy_window, config.target_accuracy, config.eval_every, config.max_steps, config.batch_size,
        config.lr, config.seed, micro_batch_size=config.micro_batch_size, describe=describe if progress else None)
    model.save_pretrained(folder)
    record = {"accuracy": evaluation["accuracy"], "buckets": evaluation["buckets"], "step": step,
              "history": history, "key": config.key(), "config": config.record()}
    (folder / "warm_start.json").write_text(json.dumps(record, indent=2))


# --------------------------------------------------------------------------------------------------
# The shipped warm start
# --------------------------------------------------------------------------------------------------

NAME = "tiny-chains"
DESCRIPTION = (
    "VAPO's long CPU base model (`vapo.py --scale cpu-long`): models/tiny-arithmetic (a tiny Qwen2, 4 layers, "
    "hidden size 128, its tokenizer) trained further by SFT on the gold solutions of chains of 2 to 40 additions "
    "and subtractions, two moves applied in turns (`tasks/chains.py`, `ChainWarmStart()`; half of the training "
    "chains are of 2 to 10 operations), evaluated greedily every 40 steps on 200 held-out chains of 2 to 40 "
    "operations and stopped at the first evaluation that reaches 25% accuracy, keeping the last evaluation inside "
    "10-40%. Accuracy falls with chain length; the measurement below gives it per bucket of chain length.")


def rebuild() -> Path:
    """Rebuild models/tiny-chains, with its card."""
    config = ChainWarmStart()

    def build(folder: Path) -> str:
        _train_warm_start(config, folder, progress=True)
        record = json.loads((folder / "warm_start.json").read_text())
        buckets = ", ".join(f"{name} operations {accuracy:.0%}" for name, accuracy in record["buckets"].items())
        return (f"greedy accuracy {record['accuracy']:.1%} on {config.eval_rows} held-out chains, at SFT step "
                f"{record['step']}; by chain length: {buckets} (`warm_start.json`)")

    return rebuild_shipped(NAME, build, DESCRIPTION, {"key": config.key(), **config.record()})


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Rebuild VAPO's long CPU base model in models/tiny-chains.")
    parser.add_argument("--rebuild", action="store_true", help="rebuild models/tiny-chains")
    if not parser.parse_args().rebuild:
        parser.error("pass --rebuild")
    print(rebuild())
