"""The tiny agent of Agent-R's CPU default, "tiny-textcraft": the CPU stand-in for an instruct model, a tiny
Qwen2 warm-started on TextCraft's expert planner and on the judging and revision sentences an instruct model
can already write.

Its training data is built with Agent-R's own pieces (the verifier prompt, the revision thoughts, the
trajectory format), so this module imports agent_r; agent_r never imports it at module level.

    python -m tasks.tiny_textcraft --rebuild     # models/tiny-textcraft, about 5 minutes on 2 idle cores
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import agent_r
from agent_r import (REVISION_ACTION, REVISION_OBSERVATION, REVISION_THOUGHTS, VERIFIER_PROMPT, good_trajectory,
                     opening, training_example, training_pool, verifier_prompt)
from common.cache import build_once, config_key, rebuild_shipped
from tasks.textcraft import (CPU_INSTRUCTION, TEXTCRAFT_INSTRUCTION_2025, TextCraft, action_text, expert_plan,
                             noisy_expert, react_turn)


@dataclass(frozen=True)
class WarmStart:
    """How the tiny CPU agent is made: what Llama-3.1-8B-Instruct brings to the paper, in miniature.

    A fresh tiny Qwen2 is trained by SFT on three kinds of conversation:
    - expert demonstrations from the planner, a share of which contain one mistake that the
      demonstration never corrects (so the agent fails sometimes and does not recover);
    - verifier answers to the paper's prompt, labelled by the environment (a step whose observation is
      an error is Bad, any other Good): the judging an instruct model can already do;
    - the ten revision thoughts as plain chat replies: an instruct model can already write these
      sentences, a fresh tiny model cannot, and learning them from nothing in Phase II swamps it.
    The last two are the "general chat" of the CPU run (`--general-data warm-start`), mixed into Phase II
    at η as the paper mixes ShareGPT. Held-out goals and held-out seeds are never demonstrated."""

    recipes: str = "synthetic"
    instruction: str = CPU_INSTRUCTION
    held_out: tuple[int, ...] = agent_r.synthetic_eval_tasks()  # held-out goals (task indices): never demonstrated
    held_out_seeds: tuple[int, ...] = ()  # held-out task indices inside train_pool: never demonstrated
    train_pool: int = 880
    demonstrations: int = 400
    noise: float = 0.3
    verifier_examples: int = 400
    sentence_examples: int = 50
    hidden_size: int = 128
    num_layers: int = 4
    vocab_size: int = 1024
    steps: int = 350
    batch_size: int = 16
    micro_batch_size: int = 4
    lr: float = 2e-3
    seed: int = 0

    def key(self) -> str:
        return config_key(dataclasses.asdict(self))


class DemonstrationStep(NamedTuple):
    """One step of a demonstration, as the verifier prompt asks about it."""

    task: str  # the task description
    history: list[tuple[str, str]]  # the (action, observation) steps before it
    action: str
    observation: str


def warm_start(config: WarmStart, out_dir: Path) -> Path:
    """`out_dir`, holding the warm-started tiny agent and its `general.jsonl`; built there if missing."""
    return build_once(out_dir, lambda folder: _train_warm_start(config, folder))


def _train_warm_start(config: WarmStart, folder: Path) -> None:
    import torch

    from common.models import QWEN25_CHAT_TEMPLATE, build_tiny_model, load_policy
    from common.sft import sft_train

    env = TextCraft.from_source(config.recipes, config.instruction)
    rng = random.Random(config.seed)
    pool = training_pool(config.train_pool, env.num_tasks(), config.held_out, config.held_out_seeds)
    demonstrations, steps = [], []  # conversations; DemonstrationSteps
    for task in rng.sample(pool, min(config.demonstrations, len(pool))):
        start = opening(env, task)
        if rng.random() < config.noise:
            plan, _ = noisy_expert(env.rules, env.goal, rng)
        else:
            plan = expert_plan(env.rules, env.goal)
        turns = []
        for thought, action in plan:
            observation, _, _ = env.step(react_turn(thought, action))
            steps.append(DemonstrationStep(start[2]["content"], [(action_text(r), o) for r, o in turns], action,
                                           observation))
            turns.append((react_turn(thought, action), observation))
        demonstrations.append(good_trajectory(start, turns))
    failed = [s for s in steps if TextCraft.is_error(s.observation)]
    worked = [s for s in steps if not TextCraft.is_error(s.observation)]
    half = config.verifier_examples // 2
    general = []
    judged = rng.sample(failed, min(half, len(failed))) + rng.sample(worked, min(half, len(worked)))
    for task, history, action, observation in judged:
        answer = ("The action failed, so it does not help.\nJudgment: Bad" if TextCraft.is_error(observation)
                  else "The action worked and moves toward the goal.\nJudgment: Good")
        general.append([{"role": "user", "content": verifier_prompt(task, history, action, observation)},
                        {"role": "assistant", "content": answer}])
    for k in range(config.sentence_examples):
        general.append([{"role": "user", "content": "Say in one sentence that you made a mistake and will fix it."},
                        {"role": "assistant", "content": REVISION_THOUGHTS[k % len(REVISION_THOUGHTS)]}])

    corpus = ([TEXTCRAFT_INSTRUCTION_2025, config.instruction, VERIFIER_PROMPT, QWEN25_CHAT_TEMPLATE,
               react_turn(REVISION_THOUGHTS[0], REVISION_ACTION), REVISION_OBSERVATION] * 20
              + [env.reset(t) for t in range(env.num_tasks())]
              + [m["content"] for conversation in demonstrations + general for m in conversation])
    build_tiny_model(folder, corpus, config.hidden_size, config.num_layers, vocab_size=config.vocab_size,
                     seed=config.seed)
    model, tokenizer = load_policy(str(folder))
    trained = [[m | {"loss": m["role"] == "assistant"} for m in chat] for chat in general]
    examples = [training_example(tokenizer, m) for m in demonstrations + trained]
    print(f"warm start: {len(demonstrations)} demonstrations, {len(general)} general chats, {config.steps} SFT steps")
    torch.manual_seed(config.seed)
    losses = sft_train(model, examples, config.steps, config.batch_size, config.lr, seed=config.seed,
                       micro_batch_size=config.micro_batch_size)
    model.save_pretrained(folder)
    (folder / "general.jsonl").write_text("".join(json.dumps({"messages": chat}) + "\n" for chat in general))
    record = {"config": dataclasses.asdict(config), "key": config.key(), "final_loss": losses[-1]}
    (folder / "warm_start.json").write_text(json.dumps(record, indent=2))


# --------------------------------------------------------------------------------------------------
# The shipped tiny agent
# --------------------------------------------------------------------------------------------------

DESCRIPTION = (
    "Agent-R's CPU agent, the stand-in for Llama-3.1-8B-Instruct: a tiny Qwen2 (4 layers, hidden size 128) with a "
    "tokenizer trained here, given SFT on 400 expert demonstrations of the synthetic TextCraft world (30% with one "
    "uncorrected mistake), 400 verifier answers labelled by the environment and 50 replies that are the revision "
    "thoughts (`tasks/tiny_textcraft.py`, `WarmStart()`). The last two are its general chats, `general.jsonl`, "
    "which `python agent_r.py` mixes into Phase II (`--general-data warm-start`); the run starts from this model "
    "(`--model tiny-textcraft`). The CPU default's held-out goals and held-out seeds of training goals are never "
    "demonstrated. The build takes 2-3 minutes on 2 idle cores and up to 10 on a busy machine, its held-out "
    "evaluation 2-3 more.")


def evaluate_on_the_cpu_default(model_dir: Path) -> dict:
    """The held-out evaluations `python agent_r.py` makes before its first iteration (iteration 0): held-out
    goals (eval/...) and held-out seeds of training goals (eval_seen/...)."""
    from common.models import load_policy
    from common.sampling import HFSampler

    cpu = agent_r.parse_args([])
    env = TextCraft.from_source(cpu.recipes, cpu.instruction, cpu.textcraft_client)
    model, tokenizer = load_policy(str(model_dir), cpu.dtype, cpu.gradient_checkpointing)
    sampler = HFSampler(model, tokenizer)
    agent = agent_r.Agent(sampler, cpu.max_new_tokens, cpu.verifier_max_new_tokens)
    metrics = {}
    for prefix, tasks in (("eval", cpu.eval_tasks), ("eval_seen", cpu.eval_seen_tasks)):
        with sampler.serving(model):
            found, _ = agent_r.evaluate(agent, lambda: TextCraft(env.rules, env.instruction, client=env.client), tasks,
                                        cpu.eval_max_steps, cpu.eval_temperature, cpu.seed, model, tokenizer,
                                        REVISION_THOUGHTS[: cpu.revision_thoughts])
        metrics |= {key.replace("eval/", f"{prefix}/", 1): value for key, value in found.items()}
    return metrics


def rebuild() -> Path:
    """Rebuild models/tiny-textcraft, with its held-out evaluation (`evaluation.json`) and its card."""
    config = WarmStart()

    def build(folder: Path) -> str:
        _train_warm_start(config, folder)
        metrics = evaluate_on_the_cpu_default(folder)
        (folder / "evaluation.json").write_text(json.dumps(metrics, indent=2))
        final_loss = json.loads((folder / "warm_start.json").read_text())["final_loss"]
        cpu = agent_r.parse_args([])
        return (f"final SFT loss {final_loss:.3f} (`warm_start.json`); greedy, as `python agent_r.py` evaluates it "
                f"before its first iteration (`evaluation.json`): on the CPU default's {len(cpu.eval_tasks)} held-out "
                f"goals, success {metrics['eval/success_rate']:.1%}, recovery from a forced failed prefix "
                f"{metrics['eval/recovery_rate']:.1%}; on its {len(cpu.eval_seen_tasks)} held-out seeds of training "
                f"goals, success {metrics['eval_seen/success_rate']:.1%}, recovery "
                f"{metrics['eval_seen/recovery_rate']:.1%}")

    return rebuild_shipped("tiny-textcraft", build, DESCRIPTION, {"key": config.key(), **dataclasses.asdict(config)})


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Rebuild Agent-R's shipped tiny agent in models/.")
    parser.add_argument("--rebuild", action="store_true", help="rebuild models/tiny-textcraft")
    if not parser.parse_args().rebuild:
        parser.error("pass --rebuild")
    print(rebuild())
