"""One update of each script on a fixed global batch, split over however many processes run it: what the
multi-process tests compare between 1 and 2 processes."""

from __future__ import annotations

import random
from pathlib import Path

import torch


def fixed_samples(tokenizer, prompts: int, samples_per_prompt: int, seed: int = 0):
    """A rollout that never changes: arithmetic prompts, random responses of 1 to 12 tokens, half correct."""
    from common.sampling import Sample, encode_prompt
    from tasks.arithmetic import ArithmeticTask

    rng = random.Random(seed)
    rows = ArithmeticTask(seed=seed).rows(prompts)
    vocabulary = [i for i in range(len(tokenizer)) if i not in tokenizer.all_special_ids]
    samples, correct = [], []
    for index, row in enumerate(rows):
        ids = encode_prompt(tokenizer, row["prompt"])
        for _ in range(samples_per_prompt):
            response = [rng.choice(vocabulary) for _ in range(rng.randint(1, 12))]
            samples.append(Sample(index, ids, response, "", "stop"))
            correct.append(rng.random() < 0.5)
    return samples, correct


def save_weights(accelerator, out_dir: Path, name: str, models: dict) -> None:
    from tests.multiprocess.launch import full_state

    weights = {key: full_state(model) for key, model in models.items()}  # a collective: every rank gathers
    if accelerator.is_main_process:
        torch.save(weights, out_dir / f"weights-{name}.pt")


def all_updates(model_dir: str, out_dir: Path) -> dict:
    """One update of each script on its fixed global batch."""
    return {"vapo": vapo_update(model_dir, out_dir), "tl": tl_update(model_dir, out_dir),
            "agent_r": agent_r_sft(model_dir, out_dir)}


def vapo_update(model_dir: str, out_dir: Path) -> dict:
    """vapo.py's steps 2-5 on a fixed rollout of 8 prompts x 2 samples: rewards, old log-probs and values,
    advantages and returns, and the PPO updates (2 mini-batches of 8, token-budget micro-batches)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    import vapo
    from common.distributed import sum_over_ranks
    from common.sampling import collate

    args = vapo.parse_args(["--model", model_dir, "--dtype", "float32", "--no-gradient-checkpointing",
                            "--prompts-per-step", "8", "--samples-per-prompt", "2", "--mini-batch-size", "8",
                            "--micro-batch-tokens", "64", "--actor-lr", "1e-3", "--critic-lr", "1e-3",
                            "--lr-warmup-steps", "1"])
    accelerator = Accelerator(step_scheduler_with_optimizer=False)
    vapo.check_process_count(args, accelerator.num_processes)
    set_seed(args.seed, device_specific=True)  # as vapo.train: the critic's new value head is drawn on rank 0
    policy, critic, tokenizer, (actor_opt, critic_opt), _ = vapo.prepared_models(args, args.model, accelerator)
    samples, correct = fixed_samples(tokenizer, args.prompts_per_step, args.samples_per_prompt)
    share = len(samples) // accelerator.num_processes
    first = accelerator.process_index * share
    samples, correct = samples[first : first + share], torch.tensor(correct[first : first + share])
    batch = collate(samples, tokenizer.pad_token_id)
    mask = batch.response_mask
    old_logprobs, old_values = vapo.score_rollout(policy, critic, batch, args.micro_batch_tokens, args.temperature)
    _, _, advantages, returns = vapo.phase_targets(mask, correct, old_values, False, args)
    rollout = vapo.Rollout(batch, correct, old_logprobs, old_values, advantages, returns, first_sample=first)
    sums = vapo.ppo_update(policy, critic, actor_opt, critic_opt, accelerator, rollout, args, step=0,
                           train_actor=True, run_dir=out_dir)
    grad_norms = {k: sums.pop(k) for k in ("actor_grad_norm", "critic_grad_norm", "updates")}
    totals = dict(zip(sums, sum_over_ranks(list(sums.values())))) | grad_norms
    save_weights(accelerator, out_dir, "vapo", {"policy": policy, "critic": critic})
    return {"totals": totals, "old_logprob_sum": sum_over_ranks([float((old_logprobs * mask).sum())])[0],
            "advantage_sum": sum_over_ranks([float((advantages * mask).sum())])[0]}


def tl_update(model_dir: str, out_dir: Path) -> dict:
    """tl_training.py's PPO step on a fixed rollout of 8 responses with fixed IRM rewards: log-probs of the
    policy and the SFT reference, values, KL rewards, GAE and the one update (micro-batches of 2)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    import tl_training as tl
    from common.distributed import sum_over_ranks
    from common.sampling import collate

    args = tl.parse_args(["--model", model_dir, "--dtype", "float32", "--no-gradient-checkpointing",
                          "--rollout-batch-size", "8", "--ppo-micro-batch-size", "2", "--actor-lr", "1e-3",
                          "--critic-lr", "1e-3", "--ppo-warmup-steps", "1"])
    accelerator = Accelerator()
    set_seed(args.seed)
    policy, critic, reference, tokenizer, actor_opt, critic_opt = tl.irm_models(args, model_dir, accelerator)
    samples, _ = fixed_samples(tokenizer, args.rollout_batch_size, 1, seed=1)
    rewards = [tl.REWARDS[c] for c in tl.CATEGORIES] * args.rollout_batch_size
    share = len(samples) // accelerator.num_processes
    first = accelerator.process_index * share
    batch = collate(samples[first : first + share], tokenizer.pad_token_id)
    final_reward = torch.tensor(rewards[first : first + share])
    # the policy is moved off the reference first, so that the KL reward is not zero
    with torch.no_grad():
        for parameter in policy.parameters():
            parameter.mul_(1.01)
    sums, scored = tl.irm_step(policy, critic, reference, actor_opt, critic_opt, accelerator, batch, final_reward,
                               args, step=0, total_steps=1, stage_dir=out_dir)
    mask, old_logprobs, ref_logprobs = batch.response_mask, scored["old_logprobs"], scored["ref_logprobs"]
    local = ("pg_loss", "value_loss", "clipped", "approx_kl", "entropy")
    totals = dict(zip(local, sum_over_ranks([sums[k] for k in local]))) | {
        k: sums[k] for k in ("actor_grad_norm", "critic_grad_norm")}
    save_weights(accelerator, out_dir, "tl", {"policy": policy, "critic": critic})
    return {"totals": totals, "kl_sum": sum_over_ranks([float(((old_logprobs - ref_logprobs) * mask).sum())])[0]}


def agent_r_sft(model_dir: str, out_dir: Path) -> dict:
    """agent_r.py's Phase II (common.sft.sft_train with the prepared AdamW) on fixed conversations: 2 steps
    of batches of 4, micro-batches of 1."""
    from accelerate import Accelerator

    import agent_r
    from common.models import load_policy
    from common.sft import sft_train

    accelerator = Accelerator()
    model, tokenizer = load_policy(model_dir)
    model, optimizer = accelerator.prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-3))
    rng = random.Random(2)
    chats = []
    for k in range(6):
        words = " ".join(rng.choice(["craft", "get", "stick", "plank", "wood", "inventory"]) for _ in range(k + 2))
        chats.append([{"role": "user", "content": f"Task {k}: {words}", "loss": False},
                      {"role": "assistant", "content": f"Thought: {words[::-1]}\nAction: get {k}", "loss": True}])
    examples = [agent_r.training_example(tokenizer, chat) for chat in chats]
    losses = sft_train(model, examples, steps=2, batch_size=4, lr=1e-3, warmup_steps=1, seed=3, progress=False,
                       micro_batch_size=1, accelerator=accelerator, optimizer=optimizer)
    save_weights(accelerator, out_dir, "agent_r", {"policy": model})
    return {"losses": losses}
