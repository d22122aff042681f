"""VAPO's CPU world: a synthetic, verifiable arithmetic task, the tiny model's text, and the warm start that
makes RL worthwhile.

`ArithmeticTask` is multi-step addition and subtraction with a chain of thought: one line per
operation, then `Answer: N`. Problems have 2 to 8 terms, so the chain of thought of one problem is
up to seven times as long as another's (VAPO's heterogeneous lengths), and the only reward is whether
the final answer is right (VAPO's sparse reward), checked by the same checker as AIME.

Rows use the DAPO-Math-17k record schema, so the RL scripts read synthetic and real data alike:
`{"data_source", "prompt": [chat messages], "ability", "reward_model": {"style", "ground_truth"},
"extra_info": {"index"}}`, plus `solution` (the gold chain of thought, for SFT).

The two warm starts VAPO uses are shipped in models/; this module rebuilds them:

    python -m tasks.arithmetic --rebuild            # models/tiny-arithmetic, about 11 minutes on 2 cores
    python -m tasks.arithmetic --rebuild --quick    # models/tiny-arithmetic-quick, about a minute
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from common.cache import build_once, config_key, rebuild_shipped
from common.rewards import check_math_answer

# A short system prompt: on a CPU every prompt token is paid for in every forward pass.
SYSTEM_PROMPT = "Calculate step by step."


@dataclass(frozen=True)
class ArithmeticTask:
    """Chains of additions and subtractions whose running total stays within [0, max_total]."""

    seed: int = 0
    min_terms: int = 2
    max_terms: int = 8
    max_operand: int = 30
    max_total: int = 99

    def problem(self, rng: random.Random) -> tuple[list[int], list[str]]:
        n_terms = rng.randint(self.min_terms, self.max_terms)
        terms, ops = [rng.randint(1, self.max_total)], []
        for _ in range(n_terms - 1):
            total = _evaluate(terms, ops)
            term = rng.randint(1, self.max_operand)
            can_add, can_sub = total + term <= self.max_total, total - term >= 0
            op = "+" if can_add and (not can_sub or rng.random() < 0.5) else "-"
            if not can_add and not can_sub:
                term = total // 2 or 1
                op = "-" if total - term >= 0 else "+"
            terms.append(term)
            ops.append(op)
        return terms, ops

    def rows(self, n: int, split: str = "train") -> list[dict]:
        """`n` problems; "train" and "test" come from disjoint random streams of the same seed."""
        rng = random.Random(f"{self.seed}-{split}")
        return [self._row(i, *self.problem(rng)) for i in range(n)]

    def _row(self, index: int, terms: list[int], ops: list[str]) -> dict:
        expression = str(terms[0]) + "".join(f"{op}{t}" for op, t in zip(ops, terms[1:]))
        lines, total = [], terms[0]
        for op, term in zip(ops, terms[1:]):
            new_total = total + term if op == "+" else total - term
            lines.append(f"{total}{op}{term}={new_total}")
            total = new_total
        lines.append(f"Answer: {total}")
        return {
            "data_source": "synthetic_arithmetic",
            "prompt": [
                {"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": f"Compute {expression}."},
            ],
            "ability": "MATH",
            "reward_model": {"style": "rule", "ground_truth": str(total)},
            "extra_info": {"index": index, "num_steps": len(ops)},
            "solution": "\n".join(lines),
        }


def _evaluate(terms: list[int], ops: list[str]) -> int:
    total = terms[0]
    for op, term in zip(ops, terms[1:]):
        total = total + term if op == "+" else total - term
    return total


def tiny_corpus() -> list[str]:
    """Text the tiny tokenizer's merges are trained on: chat scaffolding, the math prompt of evals.py's AIME, and
    the task's problems and gold traces."""
    from common.models import CHAT_SCAFFOLDING

    math_prompt = ("Solve the following math problem step by step. The last line of your response should be of the "
                   "form Answer: $Answer (without quotes) where $Answer is the answer to the problem.")
    problems = []
    for row in ArithmeticTask(seed=0).rows(2000):
        problems += [message["content"] for message in row["prompt"]]
        problems.append(row["solution"])
    return (CHAT_SCAFFOLDING + [math_prompt]) * 20 + problems


# --------------------------------------------------------------------------------------------------
# Warm start: SFT of the tiny model on the task's gold traces, stopped inside a base-accuracy window.
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class WarmStartConfig:
    task: ArithmeticTask = ArithmeticTask()
    hidden_size: int = 128
    num_layers: int = 4
    train_rows: int = 20000
    eval_rows: int = 200
    batch_size: int = 64
    lr: float = 2e-3
    max_steps: int = 3000
    eval_every: int = 25
    target_accuracy: float = 0.40  # stop at the first evaluation at or above this ...
    accuracy_window: tuple[float, float] = (0.10, 0.50)  # ... and never keep a model outside this window
    seed: int = 0

    def key(self) -> str:
        """Names the build; it changes with the config and with the task's rows themselves."""
        return config_key({"config": asdict(self), "rows": self.task.rows(5)})


# A warm start for quick demonstrations (tests, notebooks): single-digit chains of up to five terms,
# learned in a small fraction of the default's steps.
QUICK_WARM_START = WarmStartConfig(task=ArithmeticTask(max_terms=5, max_operand=9, max_total=9), train_rows=4000,
                                   eval_rows=100, eval_every=10, target_accuracy=0.25)


def greedy_answers(model, tokenizer, rows: list[dict], max_new_tokens: int, batch_size: int = 256):
    """The greedy completion of each row and whether its final answer is right: (samples, correct)."""
    from common.sampling import HFSampler

    sampler = HFSampler(model, tokenizer, batch_size=batch_size)
    samples = sampler.generate([r["prompt"] for r in rows], n=1, max_new_tokens=max_new_tokens, temperature=0.0)
    return samples, [check_math_answer(s.text, r["reward_model"]["ground_truth"]).correct for s, r in zip(samples, rows)]


def greedy_accuracy(model, tokenizer, rows: list[dict], max_new_tokens: int = 80, batch_size: int = 256) -> float:
    """Share of `rows` whose greedy completion has the right final answer."""
    _, correct = greedy_answers(model, tokenizer, rows, max_new_tokens, batch_size)
    return sum(correct) / len(correct)


def warm_start(config: WarmStartConfig, out_dir: Path, progress: bool = True) -> Path:
    """`out_dir`, holding the warm-started tiny model; built there if missing.

    The base model is a fresh tiny Qwen2 trained by SFT on gold traces, evaluated greedily every
    `eval_every` steps on held-out problems, and stopped at the first evaluation that reaches
    `target_accuracy`; if accuracy jumps past the window's top, the last model inside the window is
    kept. The measured accuracy is saved beside the weights in `warm_start.json`.
    """
    return build_once(out_dir, lambda folder: _train_warm_start(config, folder, progress))


def _train_warm_start(config: WarmStartConfig, folder: Path, progress: bool) -> None:
    from common.models import build_tiny_model, load_policy
    from common.sft import sft_into_accuracy_window, tokenize_chat

    build_tiny_model(folder, tiny_corpus(), hidden_size=config.hidden_size, num_layers=config.num_layers,
                     seed=config.seed)
    model, tokenizer = load_policy(str(folder))
    examples = []
    for row in config.task.rows(config.train_rows, "train"):
        messages = row["prompt"] + [{"role": "assistant", "content": row["solution"]}]
        chat = tokenize_chat(tokenizer, messages, trained=[False] * len(row["prompt"]) + [True])
        examples.append({"input_ids": chat.input_ids, "labels": chat.labels})
    eval_rows = config.task.rows(config.eval_rows, "test")
    step, evaluation, _ = sft_into_accuracy_window(
        model, examples, lambda: {"accuracy": greedy_accuracy(model, tokenizer, eval_rows)},
        config.accuracy_window, config.target_accuracy, config.eval_every, config.max_steps, config.batch_size,
        config.lr, config.seed,
        describe=(lambda step, loss, e: f"warm start: step {step} loss {loss:.3f} held-out accuracy "
                                        f"{e['accuracy']:.1%}") if progress else None)
    model.save_pretrained(folder)
    (folder / "warm_start.json").write_text(
        json.dumps({"accuracy": evaluation["accuracy"], "step": step, "config": asdict(config),
                    "key": config.key()}, indent=2)
    )


# --------------------------------------------------------------------------------------------------
# The shipped warm starts
# --------------------------------------------------------------------------------------------------

SHIPPED = {"tiny-arithmetic": WarmStartConfig(), "tiny-arithmetic-quick": QUICK_WARM_START}
DESCRIPTIONS = {
    "tiny-arithmetic": (
        "VAPO's CPU base model: a tiny Qwen2 (4 layers, hidden size 128) with a byte-level BPE tokenizer trained "
        "here, warm-started by SFT on the gold traces of the synthetic arithmetic task (`tasks/arithmetic.py`, "
        "`WarmStartConfig()`), evaluated greedily every 25 steps on held-out problems and stopped at the first "
        "evaluation that reaches 40% accuracy, or, when accuracy jumps past 50% first, kept at the last evaluation "
        "inside 10-50%. `python vapo.py` starts from it (`--model tiny-arithmetic`), as do evals.py's "
        "`tiny-arithmetic` and the benchmarks. The build takes about 11 minutes on 2 cores."),
    "tiny-arithmetic-quick": (
        "The quick warm start (`QUICK_WARM_START` in `tasks/arithmetic.py`): the same tiny Qwen2 warm-started on "
        "single-digit chains of up to five terms, evaluated every 10 steps and stopped at the first held-out "
        "evaluation that reaches 25% greedy accuracy (never outside 10-50%). The VAPO notebook and the tests use "
        "it. The build takes about a minute on 2 cores."),
}


def rebuild(name: str) -> Path:
    """Rebuild the shipped warm start `name` in models/, with its card."""
    config = SHIPPED[name]

    def build(folder: Path) -> str:
        _train_warm_start(config, folder, progress=True)
        record = json.loads((folder / "warm_start.json").read_text())
        return (f"greedy accuracy {record['accuracy']:.1%} on {config.eval_rows} held-out problems, at SFT step "
                f"{record['step']} (`warm_start.json`)")

    return rebuild_shipped(name, build, DESCRIPTIONS[name], {"key": config.key(), **asdict(config)})


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Rebuild VAPO's shipped warm starts in models/.")
    parser.add_argument("--rebuild", action="store_true", help="rebuild models/tiny-arithmetic")
    parser.add_argument("--quick", action="store_true", help="with --rebuild: models/tiny-arithmetic-quick instead")
    options = parser.parse_args()
    if not options.rebuild:
        parser.error("pass --rebuild (and --quick for the quick warm start)")
    print(rebuild("tiny-arithmetic-quick" if options.quick else "tiny-arithmetic"))
