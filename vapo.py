"""VAPO: value-based PPO for long chain-of-thought reasoning.

Paper: "VAPO: Efficient and Reliable Reinforcement Learning for Advanced Reasoning Tasks" (ByteDance
Seed, arXiv 2504.05118). PPO with a critic, plus seven techniques against three problems (§3-§4):

    value-model bias          (1) value pretraining          --value-pretrain-steps
                              (2) decoupled GAE              --decoupled-gae / --lam-critic
    heterogeneous lengths     (3) length-adaptive GAE        --length-adaptive-gae / --alpha
                              (4) token-level loss           --token-level-loss
    sparse reward             (5) clip-higher                --clip-low / --clip-high
                              (6) positive-example NLL loss  --nll-coef
                              (7) group sampling             --prompts-per-step / --samples-per-prompt

`--preset vanilla-ppo` turns all seven off (the paper's baseline, §5.1).

    python vapo.py                                   # CPU: tiny warm-started model, synthetic arithmetic
    python vapo.py --preset vanilla-ppo              # the same without the seven techniques
    python vapo.py --resume                          # continue the run in --run-dir from its last checkpoint
    accelerate launch --config_file configs/fsdp.yaml vapo.py --scale paper --backend vllm
                                                     # Qwen2.5-32B on DAPO-Math-17k, the paper's settings

Read top to bottom: Args, the paper's math as pure functions, then the training loop.
"""

from __future__ import annotations

import dataclasses
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import torch
import tyro

# --------------------------------------------------------------------------------------------------
# Args
# --------------------------------------------------------------------------------------------------


@dataclass
class Args:
    # ---- where things come from and go ----
    scale: Literal["cpu", "cpu-long", "paper"] = "cpu"
    """"cpu": a tiny model on the synthetic task, minutes on a laptop; "cpu-long": a tiny model on chains of 2 to
    40 operations (tasks/chains.py), answers of 25-510 tokens; "paper": VAPO §5.1's model, data,
    batch sizes, learning rates and lengths. Applied first; any flag given explicitly wins."""
    preset: Literal["vapo", "vanilla-ppo"] = "vapo"
    """"vapo": all seven techniques; "vanilla-ppo": all seven off (VAPO §5.1's baseline). Applied after
    --scale; any flag given explicitly wins."""
    model: str = "Qwen/Qwen2.5-32B"
    """policy: a hub id, a local directory, or "tiny-arithmetic" (the warm-started tiny CPU model shipped in
    models/tiny-arithmetic). VAPO §5.1: Qwen2.5-32B base."""
    value_model: str | None = None
    """critic initialisation: a reward model or any checkpoint (hub id or directory; "tiny-chains-orm": the long
    task's shipped outcome reward model); default: the policy's weights with a fresh value head. VAPO §5.1
    initialises the critic from a reward model."""
    data: str = "BytedTsinghua-SIA/DAPO-Math-17k"
    """training prompts: a hub id or a local .parquet/.jsonl in the DAPO-Math-17k schema, or
    "synthetic-arithmetic". VAPO trains "under identical settings" to DAPO, i.e. on DAPO-Math-17k."""
    eval_data: str = "BytedTsinghua-SIA/AIME-2024"
    """held-out prompts in the same schema, or "synthetic-arithmetic" (its test split)."""
    run_dir: str = "runs/vapo"
    """metrics.jsonl, samples.jsonl, curves.png and checkpoints go here."""
    resume: bool = False
    """continue from the last checkpoint in --run-dir (same Args)."""
    report_to: tuple[str, ...] = ()
    """experiment trackers beside metrics.jsonl and the PNG, any of accelerate's: tensorboard, wandb, trackio, mlflow, ...
    (their package installed); e.g. --report-to tensorboard writes under --run-dir."""
    seed: int = 1
    backend: Literal["hf", "vllm"] = "hf"
    """rollout sampler: transformers `generate` (anywhere) or vLLM (GPU, `pip install -r requirements-gpu.txt`)."""
    vllm_gpu_memory_utilization: float = 0.61
    """share of GPU memory vLLM may take while it generates; the rest holds the policy's and the critic's
    sharded states. 0.61: what `benchmarks/memory_plan.py qwen2.5-32b` leaves it on 32 x 80 GB GPUs."""
    tensor_parallel_size: int = 4
    """vLLM engines are groups of this many consecutive processes (tensor parallel); it must divide the
    number of processes and the model's attention heads. 4: the memory plan's for Qwen2.5-32B (the smallest
    whose KV cache holds a prompt's 16 samples at full length)."""
    vllm_sleep_mode: bool = True
    """vLLM frees its weights and KV cache while the models train, and takes them back for each rollout
    and evaluation (vLLM's sleep mode, level 2; CUDA only)."""
    dtype: str = "bfloat16"
    """weights' dtype for the policy and the critic ("float32" on CPU)."""
    gradient_checkpointing: bool = True
    """recompute activations in the backward pass: memory bounded for 20k-token responses."""

    # ---- schedule ----
    total_steps: int = 400
    """RL steps (one rollout each), value-pretraining steps included. VAPO reaches 60.4 within 5,000
    gradient steps = about 312 rollouts of 16 mini-batches (Fig. 1)."""
    actor_lr: float = 1e-6
    """VAPO §5.1: 1e-6."""
    critic_lr: float = 2e-6
    """VAPO §5.1: 2e-6 ("the critic needs to update faster to keep pace with policy changes")."""
    lr_warmup_steps: int = 20
    """linear warmup then constant (VAPO §5.1 "warmup-then-constant"; length from DAPO §4.1: 20 steps)."""
    weight_decay: float = 0.1
    """not stated in VAPO; DAPO's verl recipe uses 0.1."""
    grad_clip: float = 1.0
    """max gradient norm, actor and critic; not stated in VAPO; DAPO's verl recipe uses 1.0."""
    ppo_epochs: int = 1
    """passes over each rollout; not stated; one pass gives VAPO's 16 updates per rollout."""
    mini_batch_size: int = 512
    """samples per optimizer step (VAPO §5.1 item 7: 512), so a rollout of 8192 gives 16 updates."""
    micro_batch_tokens: int = 16384
    """token budget of one forward/backward; memory is bounded by it, not by the mini-batch. Rows are
    sorted by length and grouped to minimise padding (`common.sampling.micro_batches`); a row longer than
    the budget (a 22,528-token prompt and response) gets a pass of its own. 16384: the memory plan's for
    Qwen2.5-32B on 32 x 80 GB GPUs (32768 needs about 76 of the 72 usable GiB)."""

    # ---- rollouts ----
    max_new_tokens: int = 20480
    """response length limit; not stated in VAPO; DAPO: 16384 + 4096 overlong buffer = 20480."""
    temperature: float = 1.0
    """sampling temperature for rollouts (top-p 1, no top-k: the ratio must see the true distribution)."""
    reward_correct: float = 1.0
    reward_wrong: float = -1.0
    """binary verifier reward on the last token; VAPO §3.3 says "such as 0 and 1"; DAPO and VC-PPO use ±1."""

    # ---- problem 1: value-model bias over long sequences (§3.1, §4.1) ----
    value_pretrain_steps: int = 50
    """(1) Value pretraining: the first N steps train the critic only, on rollouts of the frozen initial
    policy, with Monte-Carlo targets (λ=1). VAPO §5.1 item 1: 50 steps. 0 turns it off."""
    decoupled_gae: bool = True
    """(2) Decoupled GAE: the critic's targets use --lam-critic, the advantages λ_policy (§4.1). Off: both
    use λ_policy."""
    lam_critic: float = 1.0
    """λ for the critic's targets; 1.0 removes reward decay (VAPO §4.1, VC-PPO)."""

    # ---- problem 2: heterogeneous sequence lengths (§3.2, §4.2) ----
    length_adaptive_gae: bool = True
    """(3) Length-adaptive GAE: λ_policy = 1 - 1/(α·l) per sequence (Eq. 5). Off: --lam-policy for all."""
    alpha: float = 0.05
    """α of Eq. 5 (VAPO §5.1 item 3: 0.05)."""
    lam_policy: float = 0.95
    """fixed λ_policy when length-adaptive GAE is off (vanilla PPO and VC-PPO: 0.95)."""
    token_level_loss: bool = True
    """(4) Token-level loss: the policy loss is the mean over every token of the mini-batch (Eq. 7).
    Off: the mean over samples of each sample's token mean (Eq. 6)."""

    # ---- problem 3: sparse reward (§3.3, §4.3) ----
    clip_low: float = 0.2
    clip_high: float = 0.28
    """(5) Clip-higher: the ratio is clipped to [1 - clip_low, 1 + clip_high] (Eq. 8, §5.1 item 5:
    0.2 / 0.28). --clip-high 0.2 turns it off."""
    nll_coef: float = 0.1
    """(6) Positive-example LM loss weight μ (Eq. 10, §5.1 item 6: 0.1). 0 turns it off."""
    prompts_per_step: int = 512
    samples_per_prompt: int = 16
    """(7) Group sampling: prompts × samples per rollout (§5.1 item 7: 512 × 16; vanilla PPO 8192 × 1)."""

    # ---- what the paper leaves open (our choices, with where they come from) ----
    gamma: float = 1.0
    """discount (VAPO §2.2: 1.0 throughout)."""
    whiten_advantages: bool = True
    """normalise advantages over the rollout's tokens; VAPO is silent; verl, OpenRLHF, TRL all do."""
    value_clip: float = 0.5
    """value-loss clipping around the rollout's values; VAPO is silent; verl's default 0.5."""
    kl_coef: float = 0.0
    """KL penalty to the initial policy; VAPO states none; DAPO removes it. Only 0 is supported."""
    entropy_coef: float = 0.0
    """entropy bonus; VAPO states none; DAPO's recipe uses 0. Only 0 is supported (entropy is logged)."""

    # ---- evaluation, logging, checkpoints ----
    eval_every: int = 10
    """evaluate every N steps (and at the first and last)."""
    eval_prompts: int = 30
    """held-out prompts per evaluation."""
    eval_samples: int = 32
    """samples per held-out prompt; the score is avg@k (VAPO §5.1: avg@32)."""
    eval_temperature: float = 1.0
    """0 = greedy. VAPO §5.1: 1.0."""
    eval_top_p: float = 0.7
    """VAPO §5.1: 0.7."""
    checkpoint_every: int = 10
    """save a checkpoint every N steps (and at the end); a killed run loses at most N steps."""
    log_samples: int = 2
    """completions printed and written to samples.jsonl per step."""

    # derived, filled in after parsing
    rollout_size: tyro.conf.Suppress[int] = 0


# Scale and technique presets: plain overrides applied before the command line, which wins over them.
SCALES = {
    "paper": {},  # the dataclass defaults above are VAPO §5.1's settings
    # Sizes, learning rates and lengths for a 1M-parameter model and 15-75-token answers. α: at these
    # lengths 0.05 gives λ_policy of 0-0.7, nearly TD(0) on a critic that explains little of the
    # outcome, and the policy collapsed (README); α = 1 gives λ of 0.93-0.99, the range 0.05 gives at
    # the paper's lengths of thousands of tokens.
    "cpu": dict(
        model="tiny-arithmetic", data="synthetic-arithmetic", eval_data="synthetic-arithmetic",
        dtype="float32", gradient_checkpointing=False, total_steps=40, value_pretrain_steps=10, alpha=1.0,
        actor_lr=2e-4, critic_lr=4e-4, lr_warmup_steps=3, weight_decay=0.0,
        prompts_per_step=64, samples_per_prompt=8, mini_batch_size=128, micro_batch_tokens=4096,
        max_new_tokens=96, eval_every=10, eval_prompts=128, eval_samples=4, checkpoint_every=10,
        tensor_parallel_size=1,
    ),
}
# The cpu scale on tasks/chains.py: answers of 25-510 tokens in one batch, the longest twenty times the shortest.
# α = 1 gives λ_policy of 0.96-0.998 at these lengths, the range 0.05 gives at the paper's thousands of tokens.
SCALES["cpu-long"] = dict(
    SCALES["cpu"], model="tiny-chains", data="synthetic-chains", eval_data="synthetic-chains",
    prompts_per_step=32, mini_batch_size=128, micro_batch_tokens=8192, max_new_tokens=560, eval_prompts=200,
    eval_samples=1,
)
PRESETS = {
    "vapo": {},
    "vanilla-ppo": dict(
        value_pretrain_steps=0, decoupled_gae=False, length_adaptive_gae=False, lam_policy=0.95,
        token_level_loss=False, clip_high=0.2, nll_coef=0.0,
    ),
}


def parse_args(argv: list[str] | None = None) -> Args:
    """--scale, then --preset, then every explicit flag."""
    argv = sys.argv[1:] if argv is None else argv
    chosen = tyro.cli(Args, args=argv)  # only to read --scale and --preset (and to validate argv)
    defaults = dataclasses.replace(Args(), **SCALES[chosen.scale])
    defaults = dataclasses.replace(defaults, **PRESETS[chosen.preset])
    if chosen.preset == "vanilla-ppo":
        # vanilla PPO samples one response for each of as many prompts (§5.1: 8192 × 1)
        defaults.prompts_per_step, defaults.samples_per_prompt = defaults.prompts_per_step * defaults.samples_per_prompt, 1
    args = tyro.cli(Args, args=argv, default=defaults)
    args.rollout_size = args.prompts_per_step * args.samples_per_prompt
    if args.rollout_size % args.mini_batch_size:
        raise ValueError(f"rollout size {args.rollout_size} is not a multiple of --mini-batch-size {args.mini_batch_size}")
    if args.kl_coef != 0 or args.entropy_coef != 0:
        raise ValueError("VAPO uses neither a KL penalty nor an entropy bonus; --kl-coef and --entropy-coef must be 0")
    return args


def check_process_count(args: Args, num_processes: int) -> None:
    """The rollout and every mini-batch must split evenly over the processes: each process samples
    prompts_per_step / N prompts and holds mini_batch_size / N samples of every mini-batch."""
    for name, value in (("--prompts-per-step", args.prompts_per_step), ("--mini-batch-size", args.mini_batch_size)):
        if value % num_processes:
            raise ValueError(f"{name} {value} is not a multiple of the number of processes ({num_processes}): "
                             f"every process takes an equal share; choose a multiple of {num_processes}")


# --------------------------------------------------------------------------------------------------
# The paper's math: pure functions of tensors, in the paper's order
# Shapes: B samples, T response tokens (right-padded); `response_mask` is 1 on real response tokens.
# --------------------------------------------------------------------------------------------------


def gae(rewards: torch.Tensor, values: torch.Tensor, response_mask: torch.Tensor, gamma: float,
        lam: float | torch.Tensor) -> torch.Tensor:
    """Generalised advantage estimation (VAPO Eq. 3), advantages (B, T).

    A_t = Σ_l (γλ)^l δ_{t+l},  δ_t = r_t + γ V(s_{t+1}) - V(s_t),  V after the last token = 0.
    `lam` is a float or a per-sequence tensor (B,) (length-adaptive GAE). Masked positions are
    skipped: they neither contribute a δ nor break the chain, and their values are never read.
    The critic's targets are `gae(..., lam=λ_critic) + values` (decoupled GAE, §4.1).
    """
    B, T = rewards.shape
    lam = torch.as_tensor(lam, dtype=values.dtype, device=values.device).expand(B)
    mask = response_mask.to(values.dtype)
    advantages = torch.zeros_like(values)
    next_value = torch.zeros(B, dtype=values.dtype, device=values.device)
    running = torch.zeros_like(next_value)
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        updated = delta + gamma * lam * running
        running = torch.where(mask[:, t] > 0, updated, running)
        next_value = torch.where(mask[:, t] > 0, values[:, t], next_value)
        advantages[:, t] = running
    return advantages * mask


def length_adaptive_lambda(response_lengths: torch.Tensor, alpha: float) -> torch.Tensor:
    """λ_policy per sequence (VAPO §4.2, Eq. 5): λ = 1 - 1/(α·l), clamped to [0, 1].

    Chosen so that Σ_t λ^t = 1/(1-λ) = α·l: the TD window grows with the response. For l ≤ 1/α the
    formula goes to 0 or below; the clamp makes those sequences TD(0) (A_t = δ_t).
    """
    lengths = response_lengths.to(torch.float64)
    return (1.0 - 1.0 / (alpha * lengths)).clamp(0.0, 1.0).to(torch.float32)


def whiten(values: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8, across_ranks: bool = False) -> torch.Tensor:
    """(x - mean) / std over the masked entries (not part of VAPO; see Args.whiten_advantages).
    `across_ranks`: the mean and std of every rank's entries, so the rollout is whitened as one batch."""
    from common.distributed import sum_over_ranks

    sums = [(values * mask).sum(), (values * values * mask).sum(), mask.sum()]
    total, squares, n = sum_over_ranks(sums) if across_ranks else [float(v) for v in sums]
    mean = total / n
    var = max(squares / n - mean * mean, 0.0)
    return (values - mean) * (var + eps) ** -0.5 * mask


def clipped_policy_loss(logprobs, old_logprobs, advantages, clip_low: float, clip_high: float):
    """Per-token PPO surrogate with clip-higher (VAPO Eq. 2 and Eq. 8), to be minimised, (B, T).

    loss = -min(r·A, clip(r, 1 - ε_low, 1 + ε_high)·A),  r = π_θ / π_θold.
    Also returns where the clip was active, split by side: high (A > 0, r > 1 + ε_high) and
    low (A < 0, r < 1 - ε_low), since clip-higher treats them differently.
    """
    ratio = torch.exp((logprobs - old_logprobs).clamp(-20.0, 20.0))
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(unclipped, clipped)
    clipped_high = (advantages > 0) & (ratio > 1.0 + clip_high)
    clipped_low = (advantages < 0) & (ratio < 1.0 - clip_low)
    return loss, clipped_high, clipped_low


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, token_level: bool, total_tokens: float,
              total_sequences: float) -> torch.Tensor:
    """Reduce a per-token loss (B, T) to this micro-batch's share of the mini-batch loss.

    token_level (VAPO Eq. 7):  Σ_i Σ_t ℓ_it / Σ_i |o_i|         (every token weighs the same)
    sample level (VAPO Eq. 6): (1/G) Σ_i (1/|o_i|) Σ_t ℓ_it     (every sample weighs the same)
    The denominators are the whole mini-batch's token count and sample count, across gradient-
    accumulation micro-batches and processes, passed in; summing this over the micro-batches of a
    mini-batch gives exactly the loss of the mini-batch taken as one batch.
    """
    if token_level:
        return (per_token * mask).sum() / total_tokens
    per_sample = (per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    return per_sample.sum() / total_sequences


def positive_nll_loss(logprobs: torch.Tensor, mask: torch.Tensor, correct: torch.Tensor,
                      total_correct_tokens: float) -> torch.Tensor:
    """Positive-example LM loss (VAPO §4.3, Eq. 9): -Σ_{o∈T} Σ_t log π(a_t|s_t) / Σ_{o∈T} |o|,
    T = the correct responses of the mini-batch; 0 when there are none. `correct` is (B,) bool."""
    if total_correct_tokens == 0:
        return logprobs.sum() * 0.0
    positive = mask * correct.to(mask.dtype).unsqueeze(-1)
    return -(logprobs * positive).sum() / total_correct_tokens


def value_loss(values, old_values, returns, mask, clip: float | None, total_tokens: float) -> torch.Tensor:
    """Critic regression to the returns, token-mean over the mini-batch:
    0.5·max((V - R)², (clip(V, V_old ± c) - R)²). VAPO does not state its value loss; this is verl's.
    """
    squared = (values - returns) ** 2
    if clip is not None:
        clipped = old_values + (values - old_values).clamp(-clip, clip)
        squared = torch.maximum(squared, (clipped - returns) ** 2)
    return 0.5 * (squared * mask).sum() / total_tokens


def leave_one_out_baseline(rewards: torch.Tensor, prompt_ids: torch.Tensor) -> torch.Tensor:
    """Each sample's baseline from its group (B,): the mean reward of the *other* samples of its prompt
    (RLOO's baseline; GRPO subtracts the group mean with the sample itself in it). NaN for a prompt with one sample.
    Not part of VAPO: its explained variance, logged beside the critic's, says whether the critic is a better
    baseline than what group sampling gives a critic-free method for nothing."""
    ids = prompt_ids.long()
    totals = torch.zeros(int(ids.max()) + 1, dtype=rewards.dtype, device=rewards.device).index_add_(0, ids, rewards)
    counts = torch.bincount(ids).to(rewards.dtype)
    return (totals[ids] - rewards) / (counts[ids] - 1)


# Token positions and response lengths binned for the critic's explained variance: the CPU default's answers fill
# the first two bins, the long task's all five, the paper's thousands of tokens the last.
LENGTH_BINS = (0, 32, 128, 256, 512)


def bin_names(edges: tuple[int, ...] = LENGTH_BINS) -> list[str]:
    return [f"{a}-{b - 1}" for a, b in zip(edges, edges[1:])] + [f"{edges[-1]}+"]


def position_and_length_bins(mask: torch.Tensor, edges: tuple[int, ...] = LENGTH_BINS) -> tuple[torch.Tensor, torch.Tensor]:
    """Each response token's bin (B, T) by its position in the response (0-based), and by its response's length
    (every token of a response in one bin), for `edges` as in LENGTH_BINS (the last bin is open)."""
    boundaries = torch.tensor(edges[1:], device=mask.device)
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask).contiguous()
    lengths = mask.sum(-1, keepdim=True).long().expand_as(mask).contiguous()
    return torch.bucketize(positions, boundaries, right=True), torch.bucketize(lengths, boundaries, right=True)


def binned_explained_variance(predictions: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
                              bins: torch.Tensor, num_bins: int) -> list[float]:
    """`explained_variance` of `predictions` (B, T) for `targets` (B, T) over the response tokens of each bin
    (`bins` (B, T) of bin indices), over every process's tokens; NaN for a bin without tokens or variance.
    With the values as predictions and the outcome as target: where in a response, and in which responses, the
    critic knows how the response will end (issue: does the critic earn its cost over long chains of thought?)."""
    from common.distributed import explained_variance

    return [explained_variance(predictions, targets, mask * (bins == k), across_ranks=True) for k in range(num_bins)]


def token_rewards(response_mask: torch.Tensor, correct: torch.Tensor, reward_correct: float,
                  reward_wrong: float) -> torch.Tensor:
    """The verifier's verdict as a reward on each response's last token and 0 on every other (B, T)
    (VAPO §2.2 and §3.3: a rule-based outcome reward, so the reward is sparse). `correct` is (B,) bool."""
    lengths = response_mask.sum(-1).long()
    if (lengths == 0).any():
        raise ValueError("a response has no tokens: its reward has no token to sit on")
    rewards = torch.zeros_like(response_mask)
    final = torch.where(correct, reward_correct, reward_wrong).to(response_mask.dtype)
    rewards[torch.arange(len(lengths), device=lengths.device), lengths - 1] = final
    return rewards


def policy_lambda(lengths: torch.Tensor, length_adaptive: bool, alpha: float, lam_policy: float) -> torch.Tensor:
    """λ of the advantages, one per sequence (B,): (3) length-adaptive, 1 - 1/(α·l) (VAPO Eq. 5), or the
    fixed λ_policy of vanilla PPO."""
    if length_adaptive:
        return length_adaptive_lambda(lengths, alpha)
    return torch.full(lengths.shape, lam_policy, dtype=torch.float32, device=lengths.device)


def critic_lambda(value_pretraining: bool, decoupled_gae: bool, lam_critic: float,
                  lam_policy: torch.Tensor) -> float | torch.Tensor:
    """λ of the critic's targets: (1) value pretraining regresses on Monte-Carlo returns, λ = 1 (VAPO
    §4.1, VC-PPO); (2) decoupled GAE, λ_critic (1.0: no reward decay, §4.1); without it the critic
    shares the policy's λ, as in vanilla PPO."""
    if value_pretraining:
        return 1.0
    return lam_critic if decoupled_gae else lam_policy


def advantages_and_returns(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
                           lam_policy: float | torch.Tensor, lam_critic: float | torch.Tensor,
                           whiten_advantages: bool, across_ranks: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The policy's advantages GAE(λ_policy) (VAPO Eq. 3), whitened over the rollout if asked, and the
    critic's targets GAE(λ_critic) + V (decoupled GAE, §4.1), both (B, T) and 0 off the response."""
    advantages = gae(rewards, values, mask, gamma, lam_policy)
    returns = (gae(rewards, values, mask, gamma, lam_critic) + values) * mask
    if whiten_advantages:
        advantages = whiten(advantages, mask, across_ranks=across_ranks)
    return advantages, returns


def phase_targets(mask: torch.Tensor, correct: torch.Tensor, values: torch.Tensor, value_pretraining: bool,
                  args: Args) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """What one rollout's updates learn from, in the phase the step is in: the verdicts as token rewards
    (§2.2), the policy's λ per sequence (3), the critic's λ (1, 2), and from them the advantages and the
    critic's targets (Eq. 3, §4.1), whitened over every process's tokens if asked. Returns (rewards,
    lam_policy, advantages, returns); `values` are the critic's V(s_t) of the rollout (B, T)."""
    rewards = token_rewards(mask, correct, args.reward_correct, args.reward_wrong)
    lam_policy = policy_lambda(mask.sum(-1), args.length_adaptive_gae, args.alpha, args.lam_policy)
    lam_critic = critic_lambda(value_pretraining, args.decoupled_gae, args.lam_critic, lam_policy)
    advantages, returns = advantages_and_returns(rewards, values, mask, args.gamma, lam_policy, lam_critic,
                                                 args.whiten_advantages, across_ranks=True)
    return rewards, lam_policy, advantages, returns


class Denominators(NamedTuple):
    """A mini-batch's denominators of the token mean (Eq. 7), the sample mean (Eq. 6) and the positive-example LM
    loss (Eq. 9)."""

    tokens: float
    samples: float
    correct_tokens: float  # tokens of the correct samples


def loss_denominators(mask: torch.Tensor, correct: torch.Tensor) -> Denominators:
    """A mini-batch's denominators. The loop sums them over processes, so every micro-batch's loss is its share
    of the whole mini-batch's."""
    return Denominators(float(mask.sum()), float(mask.shape[0]),
                        float((mask * correct.to(mask.dtype).unsqueeze(-1)).sum()))


def actor_loss(logprobs, old_logprobs, advantages, mask, correct, denominators: Denominators, clip_low: float,
               clip_high: float, token_level_loss: bool, nll_coef: float) -> tuple[torch.Tensor, dict]:
    """One micro-batch's share of the actor's loss: the clipped surrogate with clip-higher (Eq. 8),
    reduced by token or by sample (Eq. 7 / Eq. 6), plus μ times the positive-example LM loss (Eq. 10).
    `denominators` are the whole mini-batch's (`loss_denominators`, summed over processes). Also returns
    the parts and the clipped-token counts for logging."""
    n_tokens, n_samples, n_correct_tokens = denominators
    per_token, clipped_high, clipped_low = clipped_policy_loss(logprobs, old_logprobs, advantages, clip_low, clip_high)
    pg_loss = aggregate(per_token, mask, token_level_loss, n_tokens, n_samples)
    nll = positive_nll_loss(logprobs, mask, correct, n_correct_tokens)
    parts = {"pg_loss": pg_loss.item(), "nll_loss": nll.item(), "clip_high": float((clipped_high * mask).sum()),
             "clip_low": float((clipped_low * mask).sum())}
    return pg_loss + nll_coef * nll, parts


def minibatch_rows(first_sample: int, num_samples: int, updates: int, seed: int) -> list[list[int]]:
    """This process's rows of each of a rollout's `updates` mini-batches; the process holds the rollout's
    samples [first_sample, first_sample + num_samples).

    A shuffle stratified by position: each run of `updates` consecutive samples of the rollout (a tile)
    sends one sample to every mini-batch, in a random order of its own. The mini-batches are then the same
    however the rollout is split over processes, and every process holds an equal share of each. (With the
    paper's 16 samples per prompt and 16 updates, each mini-batch holds one sample of every prompt.)"""
    if num_samples % updates or first_sample % updates:
        raise ValueError(f"a process's {num_samples} samples from sample {first_sample} do not split into "
                         f"{updates} equal shares of every mini-batch")
    batches: list[list[int]] = [[] for _ in range(updates)]
    for tile in range(first_sample // updates, (first_sample + num_samples) // updates):
        order = torch.randperm(updates, generator=torch.Generator().manual_seed(seed * 1_000_003 + tile)).tolist()
        for position, batch in enumerate(order):
            batches[batch].append(tile * updates + position - first_sample)
    return batches


# --------------------------------------------------------------------------------------------------
# Plumbing helpers (data, batching); the algorithm is in `train` below
# --------------------------------------------------------------------------------------------------


def load_prompts(source: str, split: str) -> list[dict]:
    """Rows in the DAPO-Math-17k schema: `prompt` (chat messages) and `reward_model.ground_truth`."""
    from common.data import load_rows, require
    from tasks.arithmetic import ArithmeticTask

    if source == "synthetic-arithmetic":
        return ArithmeticTask().rows(20000 if split == "train" else 1000, split)
    if source == "synthetic-chains":
        from tasks.chains import ChainTask

        return ChainTask().rows(20000 if split == "train" else 1000, split)
    rows = load_rows(source, split)
    for index, row in enumerate(rows):
        require(row, index, source, "prompt", list)
        require(row, index, source, "reward_model.ground_truth", (str, int))
    return rows


def resolve_model(name: str) -> str:
    """A hub id or a directory as given; "tiny-arithmetic" and "tiny-chains" are the warm-started tiny models
    shipped in models/, "tiny-chains-orm" the long task's outcome reward model (for --value-model)."""
    from common.cache import shipped_model

    return shipped_model(name) if name in ("tiny-arithmetic", "tiny-chains", "tiny-chains-orm") else name


def length_bucket_accuracy(num_steps: list[int], correct: list[bool]) -> dict[str, float]:
    """eval/accuracy_len_A-B: accuracy over the samples of the chains of A to B operations (tasks/chains.py's
    buckets), over every process's samples; buckets without a sample are left out."""
    from common.distributed import sum_over_ranks
    from tasks.chains import bucket_counts

    counts = bucket_counts(num_steps, correct)
    totals = sum_over_ranks([n for right_and_total in counts.values() for n in right_and_total])
    return {f"eval/accuracy_len_{name}": totals[2 * i] / totals[2 * i + 1]
            for i, name in enumerate(counts) if totals[2 * i + 1]}


def evaluation_seed(seed: int, step: int) -> int:
    """Sampling seed of the evaluation after `step` rollouts. Each run seed has its own stream: with
    `seed + step`, the runs of seeds s and s + 1 would share their evaluations one step apart, and
    while the policy is frozen (value pretraining) report the same numbers shifted by a step."""
    return seed * 1_000_003 + 10**6 + step


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


@dataclass
class Rollout:
    """One rollout on this process, laid out for the updates: every tensor (B, T) but `correct` (B,)."""

    batch: "RolloutBatch"
    correct: torch.Tensor
    old_logprobs: torch.Tensor
    old_values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    first_sample: int  # this process's first sample in the rollout (the rollout is split over processes)


def score_rollout(policy, critic, batch, micro_batch_tokens: int, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of the rollout policy π_θold and values V(s_t) of the critic (B, T), without gradient, in
    token-budget micro-batches (as many on every process)."""
    from common.distributed import equal_micro_batches
    from common.models import token_values
    from common.sampling import response_logprobs

    mask = batch.response_mask
    old_logprobs, old_values = torch.zeros_like(mask), torch.zeros_like(mask)
    policy.eval()
    critic.eval()
    with torch.no_grad():
        for rows in equal_micro_batches(batch.attention_mask.sum(-1).tolist(), range(len(batch)), micro_batch_tokens):
            part = batch.select(rows)
            width = part.response_mask.shape[1]
            old_logprobs[rows, :width] = response_logprobs(policy, part, temperature)
            old_values[rows, :width] = token_values(critic, part)
    return old_logprobs, old_values * mask


def ppo_update(policy, critic, actor_opt, critic_opt, accelerator, rollout: Rollout, args: Args, step: int,
               train_actor: bool, run_dir: Path) -> dict:
    """PPO on one rollout: `ppo_epochs` passes over the rollout's global mini-batches (rollout size /
    --mini-batch-size optimizer steps per pass, whatever the number of processes), each mini-batch run as
    token-budget micro-batches whose losses are their share of the whole mini-batch's (the denominators
    are the mini-batch's, over all processes), so the gradient is that of the mini-batch taken as one
    batch. With `train_actor` off (value pretraining) only the critic learns. Returns the summed losses
    and counts of this process."""
    from common.checkpoint import check_finite
    from common.distributed import equal_micro_batches, sum_over_ranks
    from common.models import token_values
    from common.sampling import response_logprobs

    batch, mask, correct = rollout.batch, rollout.batch.response_mask, rollout.correct
    lengths = batch.attention_mask.sum(-1).tolist()
    updates_per_epoch = args.rollout_size // args.mini_batch_size
    per_process = accelerator.num_processes  # gradients are averaged over processes: undo it
    sums = dict.fromkeys(("pg_loss", "nll_loss", "value_loss", "clip_high", "clip_low", "approx_kl", "entropy",
                          "tokens", "padded_tokens", "actor_grad_norm", "critic_grad_norm", "updates"), 0.0)
    policy.train()
    critic.train()
    for epoch in range(args.ppo_epochs):
        shuffle_seed = args.seed * 1_000_003 + step * 101 + epoch
        for mb_rows in minibatch_rows(rollout.first_sample, len(batch), updates_per_epoch, shuffle_seed):
            denominators = Denominators(*sum_over_ranks(loss_denominators(mask[mb_rows], correct[mb_rows])))
            for rows in equal_micro_batches(lengths, mb_rows, args.micro_batch_tokens):
                part = batch.select(rows)
                width, m = part.response_mask.shape[1], part.response_mask
                sums["tokens"] += float(part.attention_mask.sum())
                sums["padded_tokens"] += part.attention_mask.numel()
                if train_actor:
                    logprobs, entropy = response_logprobs(policy, part, args.temperature, with_entropy=True)
                    old = rollout.old_logprobs[rows, :width]
                    loss, parts = actor_loss(logprobs, old, rollout.advantages[rows, :width], m, correct[rows],
                                             denominators, args.clip_low, args.clip_high, args.token_level_loss,
                                             args.nll_coef)
                    check_finite(loss, "actor", step, run_dir)
                    accelerator.backward(loss * per_process)
                    with torch.no_grad():
                        log_ratio = (logprobs - old) * m
                        sums["approx_kl"] += float((((log_ratio.exp() - 1) - log_ratio) * m).sum())  # k3
                        sums["entropy"] += float((entropy * m).sum())
                    for key, value in parts.items():
                        sums[key] += value
                critic_loss = value_loss(token_values(critic, part), rollout.old_values[rows, :width],
                                         rollout.returns[rows, :width], m, args.value_clip, denominators.tokens)
                check_finite(critic_loss, "critic", step, run_dir)
                accelerator.backward(critic_loss * per_process)
                sums["value_loss"] += critic_loss.item()
            if train_actor:
                sums["actor_grad_norm"] += float(accelerator.clip_grad_norm_(policy.parameters(), args.grad_clip))
                actor_opt.step()
                actor_opt.zero_grad(set_to_none=True)
            sums["critic_grad_norm"] += float(accelerator.clip_grad_norm_(critic.parameters(), args.grad_clip))
            critic_opt.step()
            critic_opt.zero_grad(set_to_none=True)
            sums["updates"] += 1
    return sums


def prepared_models(args: Args, model_path: str, accelerator):
    """The policy and the critic (VAPO §5.1: a separate critic, from --value-model or the policy), each with
    its AdamW and its warmup-then-constant schedule (counted in rollouts), prepared by accelerate one model
    at a time (FSDP2 takes one model with its optimizer per `prepare`)."""
    from common.models import load_policy, load_value_model

    policy, tokenizer = load_policy(model_path, args.dtype, args.gradient_checkpointing)
    critic = load_value_model(resolve_model(args.value_model) if args.value_model else model_path, args.dtype,
                              args.gradient_checkpointing)
    warmup = lambda rollouts: min(1.0, (rollouts + 1) / max(1, args.lr_warmup_steps))  # noqa: E731
    prepared = []
    for model, lr in ((policy, args.actor_lr), (critic, args.critic_lr)):
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=args.weight_decay)
        prepared.append(accelerator.prepare(model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, warmup)))
    (policy, actor_opt, actor_sched), (critic, critic_opt, critic_sched) = prepared
    return policy, critic, tokenizer, (actor_opt, critic_opt), (actor_sched, critic_sched)


def train(args: Args) -> Path:
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    from common.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
    from common.distributed import explained_variance, largest, shard, sum_over_ranks
    from common.rewards import check_math_answer
    from common.sampling import HFSampler, VLLMSampler, collate, encode_prompt
    from common.tracking import RunLog, experiment_trackers

    # schedulers step once per rollout, whatever the number of processes (accelerate's default would step
    # them once per process)
    run_dir = Path(args.run_dir)
    accelerator = Accelerator(step_scheduler_with_optimizer=False, log_with=experiment_trackers(args.report_to),
                              project_dir=run_dir)
    check_process_count(args, accelerator.num_processes)
    set_seed(args.seed, device_specific=True)
    checkpoint = latest_checkpoint(run_dir) if args.resume else None
    if args.resume and checkpoint is None:
        raise FileNotFoundError(f"--resume: no checkpoint in {run_dir}; run once without --resume first")

    # ---- models: the policy, and a separate critic with its own optimizer (VAPO §5.1) ----
    model_path = resolve_model(args.model)
    policy, critic, tokenizer, (actor_opt, critic_opt), (actor_sched, critic_sched) = prepared_models(
        args, model_path, accelerator)
    device = accelerator.device

    # ---- data: each process samples its own share of the prompts ----
    train_rows = load_prompts(args.data, "train")
    eval_rows = load_prompts(args.eval_data, "test")[: args.eval_prompts]
    order = list(range(len(train_rows)))
    random.Random(args.seed).shuffle(order)
    prompts_here = args.prompts_per_step // accelerator.num_processes
    state = {"position": 0}  # index in `order` of the next step's first prompt, the same on every process
    start_step = 0
    if checkpoint is not None:
        saved = load_checkpoint(accelerator, checkpoint)
        start_step, state["position"] = saved["step"], saved["position"]
        accelerator.print(f"resumed from {checkpoint} at step {start_step}")

    if args.backend == "vllm":
        longest_prompt = max(len(encode_prompt(tokenizer, r["prompt"])) for r in train_rows + eval_rows)
        sampler = VLLMSampler(model_path, tokenizer, tensor_parallel_size=args.tensor_parallel_size,
                              gpu_memory_utilization=args.vllm_gpu_memory_utilization,
                              max_model_len=longest_prompt + args.max_new_tokens, enable_sleep_mode=args.vllm_sleep_mode,
                              dtype=args.dtype)
    else:
        sampler = HFSampler(policy, tokenizer)
    log = RunLog(run_dir, resume_step=start_step if checkpoint else None, accelerator=accelerator, project="vapo",
                 config=args)
    plotted = ["eval/accuracy", "reward/accuracy", "reward/mean", "response/length_mean", "value/explained_variance",
               "value/group_baseline_explained_variance", "value/loss", "policy/clipfrac_high", "policy/clipfrac_low",
               "policy/approx_kl", "policy/entropy", "policy/nll_loss", "response/truncated_frac",
               "gae/lambda_policy_mean", "time/step_s"]
    if args.eval_data == "synthetic-chains":
        from tasks.chains import LENGTH_BUCKETS

        plotted[1:1] = [f"eval/accuracy_len_{low}-{high}" for low, high in LENGTH_BUCKETS]

    def evaluate(step: int) -> dict:
        """avg@k accuracy on the held-out prompts with the eval sampling settings (VAPO §5.1), sampled from the
        policy's current weights."""
        rows = shard(eval_rows, accelerator.process_index, accelerator.num_processes)
        with sampler.serving(policy):
            samples = sampler.generate([r["prompt"] for r in rows], n=args.eval_samples, max_new_tokens=args.max_new_tokens,
                                       temperature=args.eval_temperature, top_p=args.eval_top_p,
                                       seed=evaluation_seed(args.seed, step))
        correct = [check_math_answer(s.text, str(rows[s.prompt_index]["reward_model"]["ground_truth"])).correct
                   for s in samples]
        hits, total = sum_over_ranks([sum(correct), len(samples)])
        if args.eval_data != "synthetic-chains":
            return {"eval/accuracy": hits / total}
        steps = [rows[s.prompt_index]["extra_info"]["num_steps"] for s in samples]
        return {"eval/accuracy": hits / total} | length_bucket_accuracy(steps, correct)

    if start_step == 0:
        first = evaluate(0)
        log.metrics(0, first)
        accelerator.print(f"step 0: held-out accuracy {first['eval/accuracy']:.1%} (avg@{args.eval_samples} on "
                          f"{len(eval_rows)} prompts)")
    progress = tqdm(range(start_step, args.total_steps), initial=start_step, total=args.total_steps,
                    disable=not accelerator.is_main_process, desc="vapo")
    for step in progress:
        step_start = time.perf_counter()
        # (1) Value pretraining: the policy stays frozen at its initial weights, only the critic learns.
        value_pretraining = step < args.value_pretrain_steps

        # ---- 1. rollout: group sampling, prompts × samples per prompt (§4.3 item 7) ----
        first = state["position"] + accelerator.process_index * prompts_here
        prompts = [train_rows[order[(first + j) % len(order)]] for j in range(prompts_here)]
        state["position"] += args.prompts_per_step
        generate_start = time.perf_counter()
        with sampler.serving(policy):
            samples = sampler.generate([p["prompt"] for p in prompts], n=args.samples_per_prompt,
                                       max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                       top_p=1.0, seed=args.seed * 100_003 + step * 997)
        generate_time = time.perf_counter() - generate_start

        # ---- 2. reward: the verifier's verdict, on the last response token only (§2.2) ----
        verdicts = [check_math_answer(s.text, str(prompts[s.prompt_index]["reward_model"]["ground_truth"]))
                    for s in samples]
        correct = torch.tensor([v.correct for v in verdicts], device=device)
        batch = collate(samples, tokenizer.pad_token_id).to(device)
        mask = batch.response_mask  # (B, T)
        lengths = mask.sum(-1)

        # ---- 3. old log-probs and values, no gradient ----
        score_start = time.perf_counter()
        old_logprobs, old_values = score_rollout(policy, critic, batch, args.micro_batch_tokens, args.temperature)
        score_time = time.perf_counter() - score_start

        # ---- 4. token rewards, λs, advantages and returns of this phase (§4.1, §4.2) ----
        rewards, lam_policy, advantages, returns = phase_targets(mask, correct, old_values, value_pretraining, args)

        # ---- 5. PPO updates, then the schedulers (once per rollout) ----
        update_start = time.perf_counter()
        rollout = Rollout(batch, correct, old_logprobs, old_values, advantages, returns,
                          first_sample=accelerator.process_index * len(samples))
        sums = ppo_update(policy, critic, actor_opt, critic_opt, accelerator, rollout, args, step,
                          train_actor=not value_pretraining, run_dir=run_dir)
        if not value_pretraining:
            actor_sched.step()
        critic_sched.step()
        update_time = time.perf_counter() - update_start

        # ---- 6. metrics over every process's samples, evaluation, checkpoint ----
        updates = sums.pop("updates")
        grad_norms = {k: sums.pop(k) / updates for k in ("actor_grad_norm", "critic_grad_norm")}  # already global
        total = dict(zip(sums, sum_over_ranks(list(sums.values()))))
        n_samples, n_correct, n_unparsed, n_truncated, n_tokens, reward_sum, lambda_sum, abs_advantage = sum_over_ranks([
            len(samples), float(correct.sum()), sum(v.parse_failed for v in verdicts),
            sum(s.finish_reason == "length" for s in samples), float(mask.sum()),
            float(rewards.sum()), float(lam_policy.sum()), float((advantages.abs() * mask).sum())])
        update_tokens = max(1.0, n_tokens) * args.ppo_epochs
        metrics = {
            "phase": "value_pretrain" if value_pretraining else "rl",
            "reward/mean": reward_sum / n_samples,
            "reward/accuracy": n_correct / n_samples,
            "reward/parse_failures": n_unparsed / n_samples,
            "response/length_mean": n_tokens / n_samples,
            "response/length_max": largest(int(lengths.max())),
            "response/truncated_frac": n_truncated / n_samples,
            "value/loss": total["value_loss"] / updates,
            "value/explained_variance": explained_variance(old_values, returns, mask, across_ranks=True),
            "value/mean": sum_over_ranks([float(old_values.sum())])[0] / n_tokens,
            "gae/lambda_policy_mean": lambda_sum / n_samples,
            "gae/advantage_abs_mean": abs_advantage / n_tokens,
            "value/grad_norm": grad_norms["critic_grad_norm"],
            "perf/padding_efficiency": total["tokens"] / max(1.0, total["padded_tokens"]),
            "lr/actor": actor_sched.get_last_lr()[0],
            "lr/critic": critic_sched.get_last_lr()[0],
        }
        if args.samples_per_prompt > 1:  # the critic against the baseline a critic-free method would get
            prompt_ids = torch.tensor([s.prompt_index for s in samples], device=device)
            final_reward = rewards.sum(-1)
            group_baseline = leave_one_out_baseline(final_reward, prompt_ids).unsqueeze(-1) * mask
            metrics["value/group_baseline_explained_variance"] = explained_variance(group_baseline, returns, mask,
                                                                                    across_ranks=True)
        # by position in the response and by response length, against the outcome (the Monte-Carlo return), so
        # that runs with different λs compare
        outcome = gae(rewards, torch.zeros_like(old_values), mask, args.gamma, 1.0)
        predictors = {"value/explained_variance": old_values}
        if args.samples_per_prompt > 1:
            predictors["value/group_baseline_explained_variance"] = group_baseline
        for kind, bins in zip(("pos", "len"), position_and_length_bins(mask)):
            tokens = sum_over_ranks([float((mask * (bins == k)).sum()) for k in range(len(LENGTH_BINS))])
            for name, predictions in predictors.items():
                found = binned_explained_variance(predictions, outcome, mask, bins, len(LENGTH_BINS))
                metrics |= {f"{name}_{kind}_{bin_name}": ev  # NaN, as the overall one, when its outcomes are all equal
                            for bin_name, ev, n in zip(bin_names(), found, tokens) if n}
        if not value_pretraining:
            metrics |= {
                "policy/pg_loss": total["pg_loss"] / updates,
                "policy/nll_loss": total["nll_loss"] / updates,
                "policy/clipfrac_high": total["clip_high"] / update_tokens,
                "policy/clipfrac_low": total["clip_low"] / update_tokens,
                "policy/approx_kl": total["approx_kl"] / update_tokens,
                "policy/entropy": total["entropy"] / update_tokens,
                "policy/grad_norm": grad_norms["actor_grad_norm"],
            }
        step_time = time.perf_counter() - step_start
        all_tokens = sum_over_ranks([float(batch.attention_mask.sum())])[0]
        metrics |= {"time/generate_s": generate_time, "time/score_s": score_time, "time/update_s": update_time,
                    "time/step_s": step_time, "perf/tokens_per_s": all_tokens * (1 + args.ppo_epochs) / step_time}
        done = step + 1
        if done % args.eval_every == 0 or done == args.total_steps:
            metrics |= evaluate(done)
            progress.write(f"step {done}: held-out accuracy {metrics['eval/accuracy']:.1%}")
        log.metrics(done, metrics)
        examples = [{"prompt": prompts[s.prompt_index]["prompt"][-1]["content"], "completion": s.text,
                     "reward": float(rewards[i].sum()), "advantage_mean": float((advantages[i] * mask[i]).sum() / lengths[i])}
                    for i, s in enumerate(samples[: args.log_samples])]
        log.samples(done, examples)
        progress.set_postfix(reward=f"{metrics['reward/mean']:.2f}", acc=f"{metrics['reward/accuracy']:.2f}",
                             ev=f"{metrics['value/explained_variance']:.2f}", len=f"{metrics['response/length_mean']:.0f}")
        if done % args.checkpoint_every == 0 or done == args.total_steps:
            save_checkpoint(accelerator, run_dir, done, {"position": state["position"], "args": dataclasses.asdict(args)},
                            {"policy": policy, "critic": critic}, tokenizer)
            log.plot(plotted, title=f"VAPO ({args.preset}, {args.scale} scale)",
                     marks={args.value_pretrain_steps: "value pretraining ends"} if args.value_pretrain_steps else None)
            for example in examples:
                progress.write(f"[step {done}] reward {example['reward']:+.0f} | {example['prompt']!r} -> {example['completion']!r}")
    log.close()
    return run_dir


if __name__ == "__main__":
    train(parse_args())
