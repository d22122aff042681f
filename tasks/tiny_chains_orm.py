"""models/tiny-chains-orm: a tiny outcome reward model for the long task, to initialise VAPO's critic from.

VAPO §5.1 initialises the value model from a reward model; `python vapo.py --scale cpu-long --value-model
tiny-chains-orm` does the same at the CPU scale. The reward model is the long task's base (`models/tiny-chains`)
with a scalar head, trained by regression on its own samples: the base samples `samples_per_prompt` answers to
each of `train_prompts` training chains at temperature 1 (as VAPO's rollouts), each answer is scored +1 or -1
by the task's verifier (VAPO's rewards), and the head's value at the answer's last token learns that score. Only
the last token is trained, as an outcome reward model is, so its values at earlier tokens are whatever the
backbone makes of them: the bias at early tokens that VAPO's value pretraining exists to remove (§4.1). The
build measures both on held-out chains: explained variance of the outcome at the last token and at the first
32 tokens.

    python -m tasks.tiny_chains_orm --rebuild
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from common.cache import MODELS_DIR, config_key, rebuild_shipped
from common.rewards import check_math_answer
from tasks.chains import ChainTask

NAME = "tiny-chains-orm"


@dataclass(frozen=True)
class OutcomeRewardModel:
    task: ChainTask = ChainTask()
    train_prompts: int = 256
    samples_per_prompt: int = 8
    eval_prompts: int = 64
    max_new_tokens: int = 560  # vapo.py --scale cpu-long
    temperature: float = 1.0
    reward_correct: float = 1.0  # vapo.py's rewards
    reward_wrong: float = -1.0
    epochs: int = 3
    batch_size: int = 32
    lr: float = 5e-4
    seed: int = 0
    base_dir: str | None = field(default=None, compare=False)  # the base's folder; default models/tiny-chains

    def base_folder(self) -> Path:
        return Path(self.base_dir) if self.base_dir else MODELS_DIR / "tiny-chains"

    def record(self) -> dict:
        """The config as the card and reward_model.json record it (without `base_dir`, a local path)."""
        return {k: v for k, v in asdict(self).items() if k != "base_dir"}

    def key(self) -> str:
        """Names the build: the config, the task's rows and the base model's weights."""
        weights = hashlib.sha256((self.base_folder() / "model.safetensors").read_bytes()).hexdigest()
        return config_key({"config": self.record(), "rows": self.task.rows(5), "base": weights})


def scored_samples(policy, tokenizer, rows: list[dict], config: OutcomeRewardModel, seed: int):
    """The base's samples of `rows` at the config's temperature, and each one's reward."""
    from common.sampling import HFSampler

    samples = HFSampler(policy, tokenizer).generate([r["prompt"] for r in rows], n=config.samples_per_prompt,
                                                     max_new_tokens=config.max_new_tokens,
                                                     temperature=config.temperature, seed=seed)
    rewards = [config.reward_correct if check_math_answer(s.text, rows[s.prompt_index]["reward_model"]["ground_truth"]).correct
               else config.reward_wrong for s in samples]
    return samples, torch.tensor(rewards)


def last_token_values(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Each response's value at its last response token (B,), from values (B, T) and the response mask."""
    last = mask.sum(-1).long().clamp(min=1) - 1
    return values.gather(1, last.unsqueeze(-1)).squeeze(-1)


def measure(critic, samples, rewards: torch.Tensor, pad_id: int, batch_size: int) -> dict:
    """Explained variance of the outcome by the values at the last response token, and over the first 32 tokens
    of every response."""
    from common.distributed import explained_variance
    from common.models import token_values
    from common.sampling import collate

    last, early_values, early_outcomes = [], [], []
    critic.eval()
    with torch.no_grad():
        for start in range(0, len(samples), batch_size):
            batch = collate(samples[start:start + batch_size], pad_id)
            values = token_values(critic, batch)
            last.append(last_token_values(values, batch.response_mask))
            early = batch.response_mask[:, :32].bool()
            early_values.append(values[:, :32][early])
            early_outcomes.append(rewards[start:start + batch_size, None].expand(early.shape)[early])

    def ev(values: list[torch.Tensor], targets: torch.Tensor) -> float:
        values = torch.cat(values)[None]
        return explained_variance(values, targets[None], torch.ones_like(values))

    return {"explained_variance_last_token": ev(last, rewards),
            "explained_variance_first_32_tokens": ev(early_values, torch.cat(early_outcomes))}


def train_reward_model(critic, samples, rewards: torch.Tensor, config: OutcomeRewardModel, pad_id: int) -> list[float]:
    """Regression of the value at each answer's last token on its reward, `epochs` passes in shuffled batches
    (AdamW); returns the loss of each step."""
    from common.models import token_values
    from common.sampling import collate

    optimizer = torch.optim.AdamW(critic.parameters(), lr=config.lr, weight_decay=0.0)
    order, losses = list(range(len(samples))), []
    rng = random.Random(config.seed)
    critic.train()
    for _ in range(config.epochs):
        rng.shuffle(order)
        for start in range(0, len(order), config.batch_size):
            rows = order[start:start + config.batch_size]
            batch = collate([samples[i] for i in rows], pad_id)
            predicted = last_token_values(token_values(critic, batch), batch.response_mask)
            loss = torch.nn.functional.mse_loss(predicted, rewards[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(critic.parameters(), 1.0)
            optimizer.step()
            losses.append(loss.item())
    critic.eval()
    return losses


def build(config: OutcomeRewardModel, folder: Path) -> dict:
    """Sample, score and train into `folder` (the base's tokenizer files beside the weights); returns what was
    measured, also written to `reward_model.json`."""
    from common.models import load_policy, load_value_model

    base = config.base_folder()
    torch.manual_seed(config.seed)
    policy, tokenizer = load_policy(str(base))
    train_rows = config.task.rows(config.train_prompts, "train")
    eval_rows = config.task.rows(config.eval_prompts, "test")
    train_samples, train_rewards = scored_samples(policy, tokenizer, train_rows, config, seed=config.seed)
    eval_samples, eval_rewards = scored_samples(policy, tokenizer, eval_rows, config, seed=config.seed + 1)
    del policy
    critic = load_value_model(str(base))
    pad = tokenizer.pad_token_id
    before = measure(critic, eval_samples, eval_rewards, pad, config.batch_size)
    losses = train_reward_model(critic, train_samples, train_rewards, config, pad)
    after = measure(critic, eval_samples, eval_rewards, pad, config.batch_size)
    critic.save_pretrained(folder)
    for path in base.iterdir():
        if path.name.startswith("tokenizer") or path.suffix == ".jinja":
            shutil.copy(path, folder / path.name)
    record = {"key": config.key(), "config": config.record(),
              "train_accuracy": float((train_rewards == config.reward_correct).float().mean()),
              "eval_accuracy": float((eval_rewards == config.reward_correct).float().mean()),
              "loss_first": losses[0], "loss_last": losses[-1], "steps": len(losses),
              "held_out_before": before, "held_out": after}
    (folder / "reward_model.json").write_text(json.dumps(record, indent=2))
    return record


DESCRIPTION = (
    "An outcome reward model for VAPO's long CPU task (`vapo.py --scale cpu-long --value-model tiny-chains-orm`; "
    "VAPO §5.1 initialises the critic from a reward model): models/tiny-chains with a scalar head "
    "(`AutoModelForTokenClassification`, one label), trained by regression of the value at each answer's last "
    "token on its reward (+1 right, -1 wrong, vapo.py's) over the base's own samples at temperature 1 "
    "(`tasks/tiny_chains_orm.py`, `OutcomeRewardModel()`). Only the last token is trained, so the values at "
    "earlier tokens are biased, which is what VAPO's value pretraining removes.")


def rebuild() -> Path:
    """Rebuild models/tiny-chains-orm, with its card."""
    config = OutcomeRewardModel()

    def build_here(folder: Path) -> str:
        record = build(config, folder)
        after, before = record["held_out"], record["held_out_before"]
        return (f"on {config.eval_prompts} x {config.samples_per_prompt} held-out samples of the base "
                f"({record['eval_accuracy']:.1%} right), explained variance of the outcome "
                f"{after['explained_variance_last_token']:.3f} at the last token and "
                f"{after['explained_variance_first_32_tokens']:.3f} over the first 32 tokens (a fresh head: "
                f"{before['explained_variance_last_token']:.3f} and {before['explained_variance_first_32_tokens']:.3f}); "
                f"{record['steps']} steps on {config.train_prompts} x {config.samples_per_prompt} samples "
                f"({record['train_accuracy']:.1%} right), loss {record['loss_first']:.3f} -> {record['loss_last']:.3f} "
                f"(`reward_model.json`)")

    return rebuild_shipped(NAME, build_here, DESCRIPTION, {"key": config.key(), **config.record()})


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Rebuild the long task's outcome reward model in models/tiny-chains-orm.")
    parser.add_argument("--rebuild", action="store_true", help="rebuild models/tiny-chains-orm")
    if not parser.parse_args().rebuild:
        parser.error("pass --rebuild")
    print(rebuild())
