"""TL-Training: SFT that ignores adverse tool calls and prioritises key tokens, then PPO with a reward per
tool-call error category.

Paper: "TL-Training: A Task-Feature-Based Framework for Training Large Language Models in Tool Use"
(Ye et al., arXiv 2412.15495, Findings of EMNLP 2025; official code Junjie-Ye/TL-Training). Three
techniques, one per feature of tool-use data the paper measures:

    (1) MAE  mitigating adverse effects      a tool call answered by an error gets no loss     --stages mae
    (2) PKT  prioritizing key tokens         the tool-name tokens that decide the call weigh    --w-max
                                             up to 9x in the SFT loss (--w-max 1: plain SFT)
    (3) IRM  introducing a reward mechanism  PPO with a reward per error category               --stages irm

    python tl_training.py                                   # CPU: tiny model, synthetic tool-use task, all three
    python tl_training.py --stages sft --w-max 1            # plain SFT, the paper's baseline
    python tl_training.py --stages mae --data raw_data.json # MAE alone: write the masked training data
    python tl_training.py --stages irm --model runs/tl_training/sft/model   # IRM alone, from an SFT model
    python tl_training.py --resume                          # continue the run in --run-dir
    accelerate launch tl_training.py --scale paper --data trajectories.jsonl --eval-data held_out.jsonl

Read top to bottom: Args; the paper's math as pure functions, (1) MAE, (2) PKT, (3) IRM; how a
conversation becomes tokens and weights; data (the two file formats); the three stages; the error-category
plot. The synthetic CPU task is in tasks/tool_use.py, its tiny base model in tasks/tiny_tool_use.py.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import math
import random
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import torch
import tyro

from tasks.tool_use import PAPER_SEARCH, ToolUseTask, synthetic_data

# --------------------------------------------------------------------------------------------------
# Args
# --------------------------------------------------------------------------------------------------


@dataclass
class Args:
    # ---- where things come from and go ----
    scale: Literal["cpu", "paper"] = "cpu"
    """"cpu": the tiny model on the synthetic tool-use task, minutes on a laptop; "paper": the official
    scripts' settings (code/pkt/finetune.sh, code/irm/RL_run.sh). Applied first; explicit flags win."""
    stages: tuple[Literal["mae", "sft", "irm"], ...] = ("mae", "sft", "irm")
    """stages to run, always in this order: "mae" (1) leaves the adverse tool calls of the training data
    untrained (without it every assistant turn is trained); "sft" fine-tunes, with PKT's key-token weights
    (2) unless --w-max 1; "irm" (3) runs PPO with the error-category reward. `--stages mae` writes the
    masked data and stops; `--stages irm` starts PPO from --model."""
    model: str = "Qwen/Qwen2.5-7B"
    """base model: a hub id, a local directory, or "tiny-tool-use" (a tiny Qwen2 pretrained on another tool
    domain, shipped in models/tiny-tool-use; see tasks/tiny_tool_use.py). The paper fine-tunes CodeLlama-7b-hf,
    whose tokenizer has no chat template for tools; Qwen2.5-7B is the base model of the same size whose template
    renders `tools=`."""
    data: str = "synthetic-tool-use"
    """training trajectories: a hub id or a local .json/.jsonl/.parquet in the official raw format
    ({"id", "conversations": [system/user/assistant/function messages]}) or the OpenAI format
    ({"messages", "tools"}); or "synthetic-tool-use". The paper's 1,217 trajectories are not released."""
    eval_data: str = "synthetic-tool-use"
    """held-out conversations in either format: every correct single tool call in them is a query."""
    run_dir: str = "runs/tl_training"
    """each stage writes into its own folder here (mae/, sft/, irm/): metrics, curves, checkpoints, model."""
    resume: bool = False
    """skip the stages that finished and continue the interrupted one from its last checkpoint."""
    report_to: tuple[str, ...] = ()
    """experiment trackers beside metrics.jsonl and the PNG, any of accelerate's: tensorboard, wandb, trackio, mlflow, ...
    (their package installed); e.g. --report-to tensorboard writes under --run-dir."""
    seed: int = 1234
    """code/irm/RL_run.sh: --seed 1234."""
    dtype: str = "bfloat16"
    """weights' dtype (finetune.sh: bf16); "float32" on CPU."""
    gradient_checkpointing: bool = True
    """recompute activations in the backward pass (finetune.sh: --gradient_checkpointing True)."""

    # ---- (2) PKT: the SFT stage (code/pkt/finetune.sh) ----
    w_max: float = 9.0
    """largest weight of a key token (finetune.sh: --max_weight 9). 1 gives every token weight 1: plain SFT."""
    pkt_normalization: Literal["token", "sample"] = "token"
    """how the weighted loss is averaged (`normalized_weights`). "token": Σ w·CE / Σ w over the batch's trained
    tokens, the paper's objective (Fig. 2 sums w·log p over every token of the data), so a long response weighs
    more than a short one. "sample": each response's Σ w·CE / Σ w, averaged over the batch's responses, what the
    official code computes (GCELoss at batch size 1 on one assistant turn per sample), so every response weighs
    the same. Either way the average is over the whole batch, all micro-batches and processes."""
    sft_epochs: float = 1.0
    """passes over the training conversations (finetune.sh: --num_train_epochs 1)."""
    sft_batch_size: int = 4
    """conversations per optimizer step (finetune.sh: 4 GPUs x per-device batch 1 x accumulation 1)."""
    sft_micro_batch_size: int = 1
    """conversations per forward/backward on each process; memory is bounded by it, not the batch."""
    sft_lr: float = 1e-6
    """finetune.sh: --learning_rate 1e-6, cosine schedule."""
    sft_warmup_ratio: float = 0.01
    """finetune.sh: --warmup_ratio 0.01."""
    sft_weight_decay: float = 0.01
    """finetune.sh: --weight_decay 0.01."""
    adam_beta2: float = 0.95
    """finetune.sh: --adam_beta2 0.95 (also DeepSpeed-Chat's PPO default)."""
    max_length: int = 8192
    """longest training conversation in tokens (finetune.sh: --model_max_length 8192); longer ones are
    skipped and counted, never cut (a cut conversation would train a call without its end)."""

    # ---- (3) IRM: the reward and PPO (code/irm/RL_run.sh, DeepSpeed-Chat step 3) ----
    irm_epochs: float = 3.0
    """passes over the IRM prompts (RL_run.sh: --num_train_epochs 3)."""
    rollout_batch_size: int = 8
    """prompts per PPO step, one response each (RL_run.sh: 8 GPUs x per-device batch 1); one update per step."""
    ppo_micro_batch_size: int = 1
    """responses per forward/backward on each process."""
    actor_lr: float = 2e-7
    """RL_run.sh: --actor_learning_rate 2e-7, cosine schedule."""
    critic_lr: float = 1e-7
    """RL_run.sh: --critic_learning_rate 1e-7, cosine schedule."""
    ppo_warmup_steps: int = 100
    """DeepSpeed-Chat's default --num_warmup_steps 100."""
    kl_coef: float = 0.4
    """β of the KL penalty to the SFT model, per response token (Fig. 2 objective, which gives no value). 0.4 is
    what the official run used: RL_run.sh passes --kl_ctl 0.3, but the trainer never reads that flag and
    hard-codes 0.4, so the published model was trained with 0.4. Here the flag is used."""
    gamma: float = 1.0
    """GAE discount (ppo_trainer.py: 1.0)."""
    lam: float = 0.95
    """GAE λ (ppo_trainer.py: 0.95)."""
    clip: float = 0.2
    """PPO ratio clip (ppo_trainer.py: cliprange 0.2)."""
    value_clip: float = 0.2
    """critic clip around the rollout's values (ppo_trainer.py: cliprange_value 0.2)."""
    rollout_temperature: float = 1.0
    """sampling temperature of rollouts (top-p 1). The official trainer passes 0.7 but decodes greedily
    (do_sample=False), so PPO never explores; 0 reproduces that."""
    max_new_tokens: int = 512
    """response length limit for rollouts and evaluation (RL_run.sh: --max_answer_seq_len 512)."""
    grad_clip: float = 1.0
    """max gradient norm, every stage (HF Trainer's and DeepSpeed-Chat's default 1.0)."""

    # ---- the synthetic task (used when --data / --eval-data is "synthetic-tool-use") ----
    train_conversations: int = 1217
    """training trajectories (the paper trains on 1,217)."""
    eval_queries: int = 200
    """held-out queries, each answered by one tool call; none of their texts occurs in the training data."""
    adverse_rate: float = 0.17
    """share of the teacher's calls that it first gets wrong, with one of its mistakes for that tool drawn at
    random, answered by the tool with an error and then corrected: the paper counts about 17% of RoTLLaMA's
    training interactions as erroneous (Fig. 1). 0.7 makes the mistakes frequent enough that plain SFT imitates
    them, the harm MAE is built to prevent, in its starkest form."""

    # ---- evaluation, logging, checkpoints ----
    eval_every: int = 50
    """evaluate on the held-out queries every N PPO steps (and after every stage)."""
    checkpoint_every: int = 50
    """save a checkpoint every N steps of each stage; a killed run loses at most N steps."""
    log_samples: int = 2
    """responses written to samples.jsonl (and printed at checkpoints) per PPO step."""
    compare_plain_sft: bool = False
    """also train plain SFT (no MAE, weights 1) on the same data for the same steps, and evaluate it
    beside the others (the paper's baseline); with the "irm" stage, also run the same PPO from it (the
    ablation's "+IRM" row), which shows what IRM removes when SFT has left errors."""


# Scale presets: plain overrides applied before the command line, which wins over them.
SCALES = {
    "paper": {},  # the dataclass defaults are the official scripts' settings
    "cpu": dict(
        model="tiny-tool-use", dtype="float32", gradient_checkpointing=False,
        sft_epochs=10.0, sft_batch_size=16, sft_micro_batch_size=16, sft_lr=4e-3, sft_warmup_ratio=0.05,
        sft_weight_decay=0.0, max_length=1024,
        irm_epochs=1.0, rollout_batch_size=64, ppo_micro_batch_size=64, actor_lr=1e-4, critic_lr=4e-4,
        ppo_warmup_steps=2, max_new_tokens=48, eval_every=5, checkpoint_every=10, compare_plain_sft=True,
    ),
}
STAGE_ORDER = ("mae", "sft", "irm")


def parse_args(argv: list[str] | None = None) -> Args:
    """--scale first, then every explicit flag."""
    argv = sys.argv[1:] if argv is None else argv
    chosen = tyro.cli(Args, args=argv)  # only to read --scale (and to validate argv)
    args = tyro.cli(Args, args=argv, default=dataclasses.replace(Args(), **SCALES[chosen.scale]))
    args.stages = tuple(s for s in STAGE_ORDER if s in args.stages)
    if not args.stages:
        raise ValueError("--stages needs at least one of: mae sft irm")
    if args.w_max < 1:
        raise ValueError(f"--w-max {args.w_max}: key tokens never weigh less than the others; use 1 for plain SFT")
    return args


# --------------------------------------------------------------------------------------------------
# (1) MAE: mitigating adverse effects (§3.1, Fig. 2 left)
# An adverse tool-calling interaction (ATI) is an assistant tool call whose tool feedback is an error. It stays
# in the context of later turns, but its own tokens get no loss.
# --------------------------------------------------------------------------------------------------

# code/mae/mae.py: a tool output "is an error" when one of these, normalised, occurs in it, normalised.
ERROR_KEYWORDS = (
    "is not defined", "positional argument", "unexpected keyword", "'related_searches'", "ConnectionError",
    '"error":', "not supported", "Invalid API call", "Response error",
    "Object of type SerpResults is not JSON serializable", "400 Client Error", "'error'",
    "slice indices must be integers or None or have an __index__ method", "connection error",
)


def _normalize(text: str) -> str:
    """mae.py's normalisation: lower case, and every character that is not a letter, digit or CJK removed."""
    return re.sub(r"[^a-z0-9\u4e00-\u9fff]", "", text.lower())


_NORMALIZED_KEYWORDS = tuple(_normalize(k) for k in ERROR_KEYWORDS)


def is_error_feedback(output: str) -> bool:
    """Whether a tool's output reports an error, by the official rule (mae.py). Because punctuation is
    removed before matching, the keyword `'error'` becomes `error`: any output containing the letters
    "error" counts, as do Python's messages for undefined tools and wrong arguments."""
    text = _normalize(output)
    return any(keyword in text for keyword in _NORMALIZED_KEYWORDS)


def adverse_turns(messages: Sequence[dict]) -> list[int]:
    """Indices of the adverse assistant turns (ATIs) of a conversation: turns that call tools and whose
    feedback (the tool messages right after them, role "tool", or "function" in the raw format) holds an
    error. A call with no feedback after it (the last turn) is not adverse."""
    adverse = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or not message.get("tool_calls"):
            continue
        j = i + 1
        while j < len(messages) and messages[j]["role"] in ("tool", "function"):
            if is_error_feedback(str(messages[j]["content"])):
                adverse.append(i)
                break
            j += 1
    return adverse


def trained_turns(messages: Sequence[dict], mae: bool) -> list[bool]:
    """Which messages are SFT targets: every assistant turn, except the adverse ones when `mae` is on
    (L_MAE sums the log-likelihood over the turns that are not ATIs)."""
    adverse = set(adverse_turns(messages)) if mae else set()
    return [m["role"] == "assistant" and i not in adverse for i, m in enumerate(messages)]


# --------------------------------------------------------------------------------------------------
# (2) PKT: prioritizing key tokens (§3.2, Fig. 2 middle)
# --------------------------------------------------------------------------------------------------


def key_token_positions(gold: Sequence[int], alternatives: Sequence[Sequence[int]]) -> list[int]:
    """The key tokens of one tool call, as positions in `gold`.

    `gold` holds the call's tokens from the first token of the tool name on; each alternative holds the
    tokens of the same text with another offered tool's name in its place. Key (Fig. 2): the first token
    of the name, and for each alternative that shares a non-empty token prefix with the gold, the first
    token where they diverge, i.e. where the model chooses between the two tools.
    """
    keys = {0}
    for other in alternatives:
        common = 0
        while common < min(len(gold), len(other)) and gold[common] == other[common]:
            common += 1
        if 0 < common < len(gold):
            keys.add(common)
    return sorted(keys)


def key_token_weights(num_tokens: int, key_positions: Sequence[int], w_max: float) -> list[float]:
    """Per-token weights of one response (Fig. 2): w = clip(|NK| / |K|, 1, w_max) for the key tokens K,
    1 for the other tokens NK of the response. Recomputed for every response, so the key tokens together
    weigh about as much as all the others, up to w_max each."""
    keys = set(key_positions)
    key_weight = min(max((num_tokens - len(keys)) / len(keys), 1.0), w_max) if keys else 1.0
    return [key_weight if t in keys else 1.0 for t in range(num_tokens)]


def weighted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor,
                           total_weight: float | torch.Tensor) -> torch.Tensor:
    """PKT's objective (Fig. 2; code/pkt/utils.py GCELoss): Σ w·CE / Σ w over the trained tokens.

    logits (B, L, V), labels (B, L) with -100 where untrained, weights (B, L) aligned with labels. The
    token at t is predicted from the logits at t-1. `total_weight` is Σ w over the whole optimizer batch
    (all micro-batches and processes), so that summing this over micro-batches gives the batch's loss.
    With every weight 1 it is the usual token-mean SFT loss.
    """
    shift_logits, shift_labels, shift_weights = logits[:, :-1].float(), labels[:, 1:], weights[:, 1:].float()
    trained = shift_labels != -100
    ce = torch.nn.functional.cross_entropy(shift_logits.transpose(1, 2), shift_labels.clamp(min=0), reduction="none")
    return (ce * shift_weights * trained).sum() / total_weight


def normalized_weights(weights: Sequence[float], responses: Sequence[int],
                       normalization: Literal["token", "sample"]) -> list[float]:
    """The per-token weights of one conversation as PKT's loss uses them; their sum over a batch is the loss's
    denominator (`weighted_cross_entropy`'s `total_weight`). `responses[t]` is the index of the trained response
    token t belongs to, -1 where untrained.

    "token": the weights as they are, so the batch's loss is Σ w·CE / Σ w over all its trained tokens: Fig. 2's
    L_PKT, a sum of w·log p over every token of the data, up to the batch's constant Σ w.
    "sample": each response's weights divided by their sum, so that the batch's loss is the mean over its
    responses of Σ w·CE / Σ w within each (code/pkt/utils.py GCELoss, computed at batch size 1 on MAE's
    one-turn samples); the denominator is then the number of responses.
    """
    if normalization == "token":
        return list(weights)
    totals: dict[int, float] = {}
    for w, r in zip(weights, responses):
        if r >= 0:
            totals[r] = totals.get(r, 0.0) + w
    return [w / totals[r] if r >= 0 else w for w, r in zip(weights, responses)]


# --------------------------------------------------------------------------------------------------
# (3) IRM: the reward from the error categories (§3.3, Fig. 2 right), then PPO
# --------------------------------------------------------------------------------------------------

# Fig. 2's reward table; the five parameter-identification cases and their order come from
# code/irm/dschat/rlhf/ppo_trainer.py::test_answer_for_reward. hallucinated = a parameter the tool does not
# declare; redundant = a declared parameter the gold call does not use; missing = a gold parameter left out.
REWARDS = {
    "format_error": -2.0,
    "tool_hallucination": -2.0,
    "wrong_tool": -1.5,
    "param_hallucinated_redundant_missing": -1.8,
    "param_hallucinated_and_redundant_or_missing": -1.3,
    "param_redundant_and_missing": -1.0,
    "param_hallucinated": -0.8,
    "param_redundant_or_missing": -0.5,
    "content_filling_issue": -0.25,
    "correct": 1.0,
}
CATEGORIES = tuple(REWARDS)
# The paper's three evaluation levels: a category passes a level if the call is right up to that level.
TOOL_SELECTION_ERRORS = ("format_error", "tool_hallucination", "wrong_tool")
LEVELS = {
    "tool_selection": [c for c in CATEGORIES if c not in TOOL_SELECTION_ERRORS],
    "parameter_identification": ["content_filling_issue", "correct"],
    "content_filling": ["correct"],
}

_TOOL_CALL_BLOCK = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
_MAX_CALL_CHARS = 20_000  # longer text is not one call; bounds the parser's time on garbage


def parse_call(text: str) -> dict | None:
    """The one tool call of a model response as {"name", "arguments"}, or None when there is not exactly
    one readable call (a format error). Never raises.

    Reads Qwen2.5's `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` as JSON, or as a Python
    literal (so single quotes work too), and, when the response has no such block, the Python call syntax
    `name(key='value', ...)` of the official CodeLlama prompts. Both go through real parsers (json, ast),
    so quoting, spacing and nested values do not matter; the official regex only read single quotes.
    """
    if len(text) > _MAX_CALL_CHARS:
        return None
    blocks = _TOOL_CALL_BLOCK.findall(text)
    if len(blocks) > 1:
        return None
    call = _literal(blocks[0]) if blocks else _python_call(text.strip())
    if not isinstance(call, dict) or not isinstance(call.get("name"), str) or not call["name"]:
        return None
    arguments = call.get("arguments", {})
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        arguments = _literal(arguments)
    if not isinstance(arguments, dict) or not all(isinstance(k, str) for k in arguments):
        return None
    return {"name": call["name"], "arguments": arguments}


def _literal(text: str):
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        pass
    try:
        return ast.literal_eval(text.strip())
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return None


def _python_call(text: str) -> dict | None:
    try:
        node = ast.parse(text, mode="eval").body
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name) or node.args:
            return None
        if any(k.arg is None for k in node.keywords):  # **kwargs
            return None
        return {"name": node.func.id, "arguments": {k.arg: ast.literal_eval(k.value) for k in node.keywords}}
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return None


def tool_schemas(tools: Sequence[dict]) -> dict[str, dict]:
    """Offered tools by name; accepts OpenAI's {"type": "function", "function": {...}} or the bare function."""
    return {tool.get("function", tool)["name"]: tool.get("function", tool) for tool in tools}


def function_of(call: dict) -> dict:
    """A tool call's {"name", "arguments"}, whether wrapped as OpenAI's {"type", "function": {...}} or not."""
    return call.get("function", call)


def _renamed(call: dict, name: str) -> dict:
    return {**call, "function": {**call["function"], "name": name}} if "function" in call else {**call, "name": name}


def _canonical(value) -> str:
    return json.dumps(value, sort_keys=True, default=repr)


def classify_tool_call(predicted: str, gold: dict, tools: Sequence[dict]) -> str:
    """The error category (a key of REWARDS) of a response `predicted` against the gold call
    {"name", "arguments"}, given the offered tools as JSON schemas. Order as in the official reward:
    format, hallucinated tool, wrong tool, the parameter cases, values, then correct."""
    call = parse_call(predicted)
    if call is None:
        return "format_error"
    schemas = tool_schemas(tools)
    if call["name"] not in schemas:
        return "tool_hallucination"
    if call["name"] != gold["name"]:
        return "wrong_tool"
    declared = set((schemas[call["name"]].get("parameters") or {}).get("properties") or {})
    given, needed = set(call["arguments"]), set(gold["arguments"])
    hallucinated = bool(given - declared)
    redundant = bool((given & declared) - needed)
    missing = bool(needed - given)
    if hallucinated and redundant and missing:
        return "param_hallucinated_redundant_missing"
    if hallucinated and (redundant or missing):
        return "param_hallucinated_and_redundant_or_missing"
    if redundant and missing:
        return "param_redundant_and_missing"
    if hallucinated:
        return "param_hallucinated"
    if redundant or missing:
        return "param_redundant_or_missing"
    if _canonical(call["arguments"]) != _canonical(gold["arguments"]):
        return "content_filling_issue"
    return "correct"


def tool_call_reward(predicted: str, gold: dict, tools: Sequence[dict]) -> float:
    """IRM's reward R for one response (Fig. 2 reward table): the value of its error category."""
    return REWARDS[classify_tool_call(predicted, gold, tools)]


# PPO (Fig. 2: maximise E[R - β·KL(π ‖ π_sft)]), as DeepSpeed-Chat step 3 implements it.
# Shapes: B responses, T response tokens (right-padded); `mask` is 1 on real response tokens.


def kl_penalized_rewards(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor,
                         final_reward: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Per-token rewards (B, T): r_t = -β (log π(a_t) - log π_sft(a_t)) on every response token, plus the
    call's reward R (B,) on its last token (ppo_trainer.py compute_rewards, reward_last_token=1)."""
    rewards = -kl_coef * (logprobs - ref_logprobs) * mask
    last = mask.sum(-1).long() - 1
    rows = torch.arange(len(rewards), device=rewards.device)
    rewards[rows, last] += final_reward.to(rewards.dtype)
    return rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> torch.Tensor:
    """Generalised advantage estimation over each response, advantages (B, T).

    δ_t = r_t + γ V_{t+1} - V_t,  A_t = Σ_l (γλ)^l δ_{t+l}; rewards and values after a response's end are zero
    (ppo_trainer.py get_advantages_and_returns, whose returns A + V are the critic's targets in `irm_targets`;
    advantages are not whitened).
    """
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(values)
    running = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        next_value = values[:, t + 1] if t + 1 < values.shape[1] else torch.zeros_like(running)
        running = rewards[:, t] + gamma * next_value - values[:, t] + gamma * lam * running
        advantages[:, t] = running
    return advantages * mask


def ppo_policy_loss(logprobs, old_logprobs, advantages, mask, clip: float, total_tokens: float):
    """Clipped surrogate, token mean over the rollout (ppo_trainer.py actor_loss_fn):
    Σ max(-A·r, -A·clip(r, 1±ε)) / Σ mask, r = π/π_old. Also returns where the clip was active (B, T)."""
    ratio = torch.exp((logprobs - old_logprobs) * mask)
    loss = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1.0 - clip, 1.0 + clip))
    clipped = (-advantages * ratio.clamp(1.0 - clip, 1.0 + clip) > -advantages * ratio) & (mask > 0)
    return (loss * mask).sum() / total_tokens, clipped


def ppo_value_loss(values, old_values, returns, mask, clip: float, total_tokens: float) -> torch.Tensor:
    """Clipped value loss (ppo_trainer.py critic_loss_fn): 0.5 Σ max((V-R)², (clip(V, V_old±c)-R)²) / Σ mask."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * (torch.maximum((values - returns) ** 2, (clipped - returns) ** 2) * mask).sum() / total_tokens


def irm_targets(final_reward: torch.Tensor, old_logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                old_values: torch.Tensor, mask: torch.Tensor, kl_coef: float, gamma: float,
                lam: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What one PPO step learns from a rollout (DeepSpeed-Chat step 3, as the official code runs it): the
    per-token rewards, -β·KL to the SFT model plus the call's IRM reward on its last token; the GAE
    advantages over them; and the critic's targets, the returns A + V. All (B, T)."""
    rewards = kl_penalized_rewards(old_logprobs, ref_logprobs, mask, final_reward, kl_coef)
    advantages = gae(rewards, old_values * mask, mask, gamma, lam)
    return rewards, advantages, (advantages + old_values) * mask


def ppo_losses(logprobs, values, old_logprobs, old_values, advantages, returns, mask, clip: float,
               value_clip: float, total_tokens: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One micro-batch's share of the step's two losses (ppo_trainer.py train_rlhf): the actor's clipped
    surrogate, whose ratio is taken against the rollout policy π_old (the SFT model enters only through the
    KL reward), and the critic's clipped regression to the returns; both token means over the whole rollout
    (`total_tokens`, all micro-batches and processes). Also returns where the ratio clip was active."""
    policy_loss, clipped = ppo_policy_loss(logprobs, old_logprobs, advantages, mask, clip, total_tokens)
    return policy_loss, ppo_value_loss(values, old_values, returns, mask, value_clip, total_tokens), clipped


def cosine_lr(step: int, total_steps: int, warmup_steps: int, peak: float) -> float:
    """Linear warmup to `peak`, then cosine decay to 0 (the scripts' `cosine` schedule) at 0-based `step`."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


# --------------------------------------------------------------------------------------------------
# A conversation as tokens, labels and PKT weights, through the model's own chat template
# --------------------------------------------------------------------------------------------------

_NAME_PROBE = "PKT_TOOL_NAME_PROBE"  # rendered in place of a tool name to find where the template puts it


def key_token_indices(tokenizer, chat, messages, index: int, tools: Sequence[dict]) -> list[int]:
    """Indices in `chat.input_ids` of the key tokens of assistant message `index` (every call in it).

    Character offsets only, so any tokenizer and template work: the template is rendered once with a probe
    in place of each call's name, which gives the name's character position; the response is tokenized
    from its start with the gold name and with every other offered name there, and the positions that
    `key_token_positions` returns are mapped back to the conversation's tokens by character.
    """
    from common.sft import render_chat

    start, end = chat.message_spans[index]
    response = chat.text[start:end]
    names = list(tool_schemas(tools))
    keys = []
    for c, call in enumerate(messages[index]["tool_calls"]):
        probed_calls = list(messages[index]["tool_calls"])
        probed_calls[c] = _renamed(call, _NAME_PROBE)
        probed = [*messages[:index], {**messages[index], "tool_calls": probed_calls}]
        at = render_chat(tokenizer, probed, tools).find(_NAME_PROBE, start) - start
        gold_name = function_of(call)["name"]
        if at < 0 or response[at : at + len(gold_name)] != gold_name:
            raise ValueError(f"the chat template does not render the tool name {gold_name!r} verbatim")

        def tokens_from_name(name: str):
            text = response[:at] + name + response[at + len(gold_name) :]
            encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            first = next(i for i, (a, b) in enumerate(encoding["offset_mapping"]) if b > at)
            return encoding["input_ids"][first:], [a for a, _ in encoding["offset_mapping"][first:]]

        gold_ids, gold_starts = tokens_from_name(gold_name)
        alternatives = [ids for ids, _ in (tokens_from_name(name) for name in names if name != gold_name)]
        for position in key_token_positions(gold_ids, alternatives):
            char = start + gold_starts[position]
            keys += [j for j, (a, b) in enumerate(chat.offsets) if a <= char < b]
    return sorted(set(keys))


def sft_example(tokenizer, conversation: dict, trained: Sequence[bool], w_max: float) -> dict:
    """Token ids, labels (trained assistant turns only), PKT weights and responses of one conversation.

    Each trained turn that calls tools is one response of Fig. 2: its key tokens get
    clip(|NK|/|K|, 1, w_max), its other tokens 1. Turns without a call (final answers) weigh 1.
    `responses[t]` is the index of the message whose trained tokens include token t, -1 for the others.
    """
    from common.sft import IGNORE_INDEX, tokenize_chat

    messages, tools = conversation["messages"], conversation["tools"]
    chat = tokenize_chat(tokenizer, messages, trained, tools=tools)
    weights, responses = [1.0] * len(chat.input_ids), [-1] * len(chat.input_ids)
    for i, message in enumerate(messages):
        if not trained[i]:
            continue
        start, end = chat.message_spans[i]
        response = [j for j, (a, b) in enumerate(chat.offsets)
                    if chat.labels[j] != IGNORE_INDEX and start <= a and b <= end and b > a]
        for j in response:
            responses[j] = i
        if not message.get("tool_calls") or w_max == 1:
            continue
        keys = [j for j in key_token_indices(tokenizer, chat, messages, i, tools) if j in response]
        for j, w in zip(response, key_token_weights(len(response), [response.index(k) for k in keys], w_max)):
            weights[j] = w
    return {"input_ids": chat.input_ids, "labels": chat.labels, "weights": weights, "responses": responses}


# --------------------------------------------------------------------------------------------------
# Data: the official raw trajectories and OpenAI-style messages (the synthetic CPU task is tasks/tool_use.py)
# A conversation here is {"id", "messages" (OpenAI roles and tool_calls), "tools" (JSON schemas)}.
# --------------------------------------------------------------------------------------------------


def conversation_from_row(row: dict, index: int, source: str) -> dict:
    """One dataset row in either format as a conversation, checked: an unknown role, a malformed call, or a
    call to an undeclared tool that the tool did not answer with an error stops with the row named."""
    from common.data import DataError

    where = f"{source}: row {index}" + (f" (id {row['id']!r})" if row.get("id") is not None else "")
    if "conversations" in row:
        conversation = _from_raw_trajectory(row, where)
    elif "messages" in row:
        conversation = _from_messages(row, where)
    else:
        raise DataError(f"{where} has neither 'conversations' (the official raw format) nor 'messages' "
                        f"(the OpenAI format); its fields: {sorted(row)}")
    declared = set(tool_schemas(conversation["tools"]))
    adverse = set(adverse_turns(conversation["messages"]))
    for i, message in enumerate(conversation["messages"]):
        for call in message.get("tool_calls") or []:
            if function_of(call)["name"] not in declared and i not in adverse:
                raise DataError(
                    f"{where}: message {i} calls {function_of(call)['name']!r}, which is not among the declared "
                    f"tools {sorted(declared)}, and no error feedback follows it. A call to an undeclared tool is "
                    f"only valid as an adverse turn answered by an error; declare the tool or fix the call."
                )
    return conversation


def _from_raw_trajectory(row: dict, where: str) -> dict:
    """The official format (code/mae/mae.py input): system = JSON list of tools, assistant =
    "<tool name>\\n<JSON arguments>", function = the tool's output."""
    from common.data import DataError

    tools, messages = [], []
    if not isinstance(row["conversations"], list):
        raise DataError(f"{where}: 'conversations' should be a list of messages")
    for k, turn in enumerate(row["conversations"]):
        role, content = turn.get("role"), turn.get("content")
        if not isinstance(content, str):
            raise DataError(f"{where}: message {k} has no string 'content'")
        if role == "system":
            try:
                tools = json.loads(content)
            except json.JSONDecodeError as error:
                raise DataError(f"{where}: the system message should be the JSON list of tools ({error})") from error
        elif role == "user":
            messages.append({"role": "user", "content": content})
        elif role == "assistant":
            name, _, arguments = content.partition("\n")
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError as error:
                raise DataError(f"{where}: message {k}'s arguments are not JSON ({error}): {arguments[:200]!r}") from error
            messages.append({"role": "assistant", "content": "", "tool_calls": [
                {"type": "function", "function": {"name": name.strip(), "arguments": arguments}}]})
        elif role == "function":
            messages.append({"role": "tool", "content": content})
        else:
            raise DataError(f"{where}: message {k} has the unknown role {role!r}; the raw trajectory format has "
                            f"system, user, assistant and function")
    return {"id": str(row.get("id", where)), "messages": messages, "tools": _checked_tools(tools, where)}


def _from_messages(row: dict, where: str) -> dict:
    """The OpenAI format: {"messages": [system/user/assistant/tool], "tools": [...]}, arguments as objects or
    JSON strings."""
    from common.data import DataError

    messages = []
    for k, message in enumerate(row["messages"]):
        role = message.get("role")
        if role not in ("system", "user", "assistant", "tool"):
            raise DataError(f"{where}: message {k} has the unknown role {role!r}; the messages format has "
                            f"system, user, assistant and tool")
        clean = {"role": role, "content": message.get("content") or ""}
        if role == "assistant" and message.get("tool_calls"):
            calls = []
            for call in message["tool_calls"]:
                function = function_of(call)
                arguments = function.get("arguments") or {}
                if isinstance(arguments, str):
                    try:
                        arguments = json.loads(arguments)
                    except json.JSONDecodeError as error:
                        raise DataError(f"{where}: message {k}'s arguments are not JSON ({error})") from error
                if not isinstance(function.get("name"), str) or not isinstance(arguments, dict):
                    raise DataError(f"{where}: message {k} has a tool call without a name or an arguments object")
                calls.append({"type": "function", "function": {"name": function["name"], "arguments": arguments}})
            clean["tool_calls"] = calls
        messages.append(clean)
    tools = row.get("tools") or []
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as error:
            raise DataError(f"{where}: 'tools' is a string but not JSON ({error})") from error
    return {"id": str(row.get("id", where)), "messages": messages, "tools": _checked_tools(tools, where)}


def _checked_tools(tools, where: str) -> list[dict]:
    from common.data import DataError

    if not isinstance(tools, list) or not all(isinstance(t, dict) and "name" in t.get("function", t) for t in tools):
        raise DataError(f"{where}: the tools should be a list of JSON schemas with a 'name' (OpenAI function format)")
    return [t if "function" in t else {"type": "function", "function": t} for t in tools]


def call_targets(conversation: dict) -> list[dict]:
    """The queries a conversation holds for IRM and evaluation: every assistant turn that makes exactly one
    call and is not adverse, with the messages before it as the prompt and its call as the gold."""
    adverse = set(adverse_turns(conversation["messages"]))
    targets = []
    for i, message in enumerate(conversation["messages"]):
        calls = message.get("tool_calls") or []
        if message["role"] == "assistant" and len(calls) == 1 and i not in adverse:
            gold = function_of(calls[0])
            targets.append({"messages": conversation["messages"][:i], "tools": conversation["tools"],
                            "gold": {"name": gold["name"], "arguments": gold["arguments"]}})
    return targets


def load_conversations(source: str, split: str, args: Args) -> list[dict]:
    """Conversations from a file or hub id in either format, or the synthetic CPU task (tasks/tool_use.py)."""
    if source == "synthetic-tool-use":
        task = ToolUseTask(PAPER_SEARCH, seed=args.seed, adverse_rate=args.adverse_rate)
        return synthetic_data(task, args.train_conversations, args.eval_queries)[0 if split == "train" else 1]
    from common.data import load_rows

    return [conversation_from_row(row, i, source) for i, row in enumerate(load_rows(source, split))]


def resolve_model(args: Args) -> str:
    """A hub id or a directory as given; "tiny-tool-use" is the tiny base model shipped in models/."""
    from common.cache import shipped_model

    return shipped_model(args.model) if args.model == "tiny-tool-use" else args.model


def require_chat_template(tokenizer, name: str) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"the tokenizer of {name} has no chat template: TL-Training renders tools and tool calls through it "
            f"(`apply_chat_template(..., tools=...)`). Use a model whose template supports tools (Qwen2.5, "
            f"Llama 3.1, ...) or set `tokenizer.chat_template` in its tokenizer_config.json."
        )


# --------------------------------------------------------------------------------------------------
# Evaluation: greedy calls on held-out queries, counted by error category and by the paper's levels
# --------------------------------------------------------------------------------------------------


def evaluate(model, tokenizer, targets: Sequence[dict], max_new_tokens: int, accelerator) -> dict:
    """Share of held-out queries in each error category, and the three levels: tool selection (TS),
    parameter identification (PI), content filling (CF = the exact call, reported as eval/accuracy).
    Every process answers its share of the queries with greedy decoding."""
    from common.distributed import shard
    from common.sampling import HFSampler, encode_prompt

    mine = shard(targets, accelerator.process_index, accelerator.num_processes)
    prompts = [encode_prompt(tokenizer, t["messages"], t["tools"]) for t in mine]
    sampler = HFSampler(model, tokenizer)
    with sampler.serving(model):
        samples = sampler.generate(prompts, n=1, max_new_tokens=max_new_tokens, temperature=0.0)
    counts = torch.zeros(len(CATEGORIES), dtype=torch.float64, device=accelerator.device)
    for sample, target in zip(samples, mine):
        counts[CATEGORIES.index(classify_tool_call(sample.text, target["gold"], target["tools"]))] += 1
    counts = accelerator.reduce(counts, "sum")
    result = {f"eval/{c}": (counts[i] / counts.sum()).item() for i, c in enumerate(CATEGORIES)}
    for level, passing in LEVELS.items():
        result[f"eval/{level}"] = sum(result[f"eval/{c}"] for c in passing)
    result["eval/accuracy"] = result["eval/content_filling"]
    return result


def save_final(accelerator, model, tokenizer, stage_dir: Path, evaluation: dict) -> Path:
    """The stage's model in `stage_dir/model` (loadable by path) and its evaluation beside it, written under a
    temporary name and renamed, so that an existing `model/` is always complete."""
    final, scratch = stage_dir / "model", stage_dir / ".model.partial"
    if accelerator.is_main_process:
        shutil.rmtree(scratch, ignore_errors=True)
    accelerator.wait_for_everyone()
    state = accelerator.get_state_dict(model)
    accelerator.unwrap_model(model).save_pretrained(scratch, state_dict=state, is_main_process=accelerator.is_main_process)
    if accelerator.is_main_process:
        tokenizer.save_pretrained(scratch)
        (scratch / "evaluation.json").write_text(json.dumps(evaluation, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        scratch.rename(final)
    accelerator.wait_for_everyone()
    return final


def finished(stage_dir: Path, resume: bool) -> tuple[Path, dict] | None:
    """A stage's model and evaluation if --resume finds the stage complete."""
    evaluation = stage_dir / "model" / "evaluation.json"
    if resume and evaluation.is_file():
        return stage_dir / "model", json.loads(evaluation.read_text())
    return None


# --------------------------------------------------------------------------------------------------
# The stages
# --------------------------------------------------------------------------------------------------


def run_mae(conversations: Sequence[dict], stage_dir: Path, mae: bool) -> dict:
    """(1) MAE: which turns of each conversation are trained. Writes them as `data.jsonl` (each conversation
    with a `trained` flag per message, what the official mae.py writes as one sample per turn) and counts."""
    stage_dir.mkdir(parents=True, exist_ok=True)
    summary = {"conversations": len(conversations), "assistant_turns": 0, "adverse_turns": 0, "trained_turns": 0}
    with (stage_dir / "data.jsonl").open("w") as f:
        for conversation in conversations:
            trained = trained_turns(conversation["messages"], mae)
            summary["assistant_turns"] += sum(m["role"] == "assistant" for m in conversation["messages"])
            summary["adverse_turns"] += len(adverse_turns(conversation["messages"]))
            summary["trained_turns"] += sum(trained)
            f.write(json.dumps({**conversation, "trained": trained}) + "\n")
    (stage_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def length_grouped_batches(lengths: Sequence[int], batch_size: int, steps: int, seed: int,
                           pool: int = 50) -> list[list[int]]:
    """`steps` batches of example indices, epoch after epoch: each epoch shuffles the examples, sorts each pool
    of `pool` batches by length (little padding) and shuffles the batches. A fixed list: a resumed run sees the
    same batches."""
    rng, batches = random.Random(seed), []
    while len(batches) < steps:
        order = list(range(len(lengths)))
        rng.shuffle(order)
        epoch = []
        for start in range(0, len(order), pool * batch_size):
            chunk = sorted(order[start : start + pool * batch_size], key=lengths.__getitem__)
            epoch += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
        rng.shuffle(epoch)
        batches += epoch
    return batches[:steps]


def run_sft(args: Args, stage_dir: Path, base_model: str, conversations: Sequence[dict], mae: bool, w_max: float,
            eval_targets: Sequence[dict]) -> tuple[Path, dict]:
    """(2) SFT on the trained turns with PKT's weights (w_max = 1: plain SFT). Returns the model's directory
    and its held-out evaluation."""
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    from common.checkpoint import check_finite, latest_checkpoint, load_checkpoint, save_checkpoint
    from common.models import load_policy
    from common.sft import IGNORE_INDEX, pad_right
    from common.tracking import RunLog, experiment_trackers

    checkpoint = latest_checkpoint(stage_dir) if args.resume else None
    accelerator = Accelerator(log_with=experiment_trackers(args.report_to), project_dir=stage_dir)
    if args.sft_batch_size % accelerator.num_processes:
        raise ValueError(f"--sft-batch-size {args.sft_batch_size} is not a multiple of the number of processes "
                         f"({accelerator.num_processes}): every process takes an equal share of each batch")
    if checkpoint is None and accelerator.is_main_process:
        shutil.rmtree(stage_dir, ignore_errors=True)
    model, tokenizer = load_policy(base_model, args.dtype, args.gradient_checkpointing)
    require_chat_template(tokenizer, base_model)

    # ---- data: MAE's masks (1) and PKT's weights (2), through the model's chat template ----
    examples, skipped = [], {"too_long": 0, "nothing_trained": 0}
    for conversation in conversations:
        example = sft_example(tokenizer, conversation, trained_turns(conversation["messages"], mae), w_max)
        example["weights"] = normalized_weights(example["weights"], example["responses"], args.pkt_normalization)
        if len(example["input_ids"]) > args.max_length:
            skipped["too_long"] += 1
        elif all(label == IGNORE_INDEX for label in example["labels"]):
            skipped["nothing_trained"] += 1
        else:
            examples.append(example)
    if not examples:
        raise ValueError(f"no conversation has a turn to train on ({skipped}); check --data and --max-length")
    steps = math.ceil(args.sft_epochs * len(examples) / args.sft_batch_size)
    warmup = math.ceil(args.sft_warmup_ratio * steps)
    schedule = length_grouped_batches([len(e["input_ids"]) for e in examples], args.sft_batch_size, steps, args.seed)

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.sft_lr, betas=(0.9, args.adam_beta2),
                                  weight_decay=args.sft_weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    start = load_checkpoint(accelerator, checkpoint)["step"] if checkpoint else 0
    log = RunLog(stage_dir, resume_step=start if checkpoint else None, accelerator=accelerator,
                 project=f"tl_training-{stage_dir.name}", config=args)
    if start == 0:
        accelerator.print(f"SFT: {len(examples)} conversations ({skipped['too_long']} longer than --max-length and "
                          f"{skipped['nothing_trained']} with no trained turn skipped), {steps} steps, "
                          f"{'MAE on' if mae else 'MAE off'}, w_max {w_max:g}")
    model.train()
    for step in tqdm(range(start, steps), initial=start, total=steps, desc=stage_dir.name,
                     disable=not accelerator.is_main_process):
        step_start = time.perf_counter()
        rows = schedule[step]
        # Σ w over the whole batch (all processes; with --pkt-normalization sample, its number of responses): the
        # loss is Σ w·CE / Σ w of the batch, however it is split
        total_weight = sum(w for i in rows for w, label in zip(examples[i]["weights"][1:], examples[i]["labels"][1:])
                           if label != IGNORE_INDEX)
        mine = rows[accelerator.process_index :: accelerator.num_processes]
        loss_sum = torch.zeros((), device=accelerator.device)
        for start_row in range(0, len(mine), args.sft_micro_batch_size):
            micro = [examples[i] for i in mine[start_row : start_row + args.sft_micro_batch_size]]
            input_ids = pad_right([e["input_ids"] for e in micro], tokenizer.pad_token_id).to(accelerator.device)
            labels = pad_right([e["labels"] for e in micro], IGNORE_INDEX).to(accelerator.device)
            weights = pad_right([e["weights"] for e in micro], 0.0).to(accelerator.device)
            attention_mask = pad_right([[1] * len(e["input_ids"]) for e in micro], 0).to(accelerator.device)
            logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
            loss = weighted_cross_entropy(logits, labels, weights, total_weight)
            check_finite(loss, "SFT", step, stage_dir)
            accelerator.backward(loss * accelerator.num_processes)  # processes' gradients are averaged: undo it
            loss_sum += loss.detach()
        lr = cosine_lr(step, steps, warmup, args.sft_lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        log.metrics(done, {"sft/loss": accelerator.reduce(loss_sum, "sum").item(), "sft/lr": lr,
                           "sft/grad_norm": float(grad_norm), "time/step_s": time.perf_counter() - step_start})
        if done % args.checkpoint_every == 0 or done == steps:
            save_checkpoint(accelerator, stage_dir, done, {"stage": stage_dir.name, "args": dataclasses.asdict(args)},
                            {"policy": model}, tokenizer)
            log.plot(["sft/loss", "sft/lr", "sft/grad_norm", "time/step_s"], title=f"TL-Training {stage_dir.name}")
    model.eval()
    evaluation = evaluate(model, tokenizer, eval_targets, args.max_new_tokens, accelerator)
    log.metrics(steps, evaluation)
    log.close()
    return save_final(accelerator, model, tokenizer, stage_dir, evaluation), evaluation


def irm_update(policy, critic, actor_opt, critic_opt, accelerator, batch, old_logprobs, old_values, advantages,
               returns, args: Args, step: int, total_steps: int, stage_dir: Path) -> dict:
    """One PPO update of actor and critic on the whole rollout (DeepSpeed-Chat: one epoch, one optimizer step
    each), in micro-batches of --ppo-micro-batch-size responses whose losses are their share of the rollout's
    token mean over every process. Returns this process's summed losses and counts, and the grad norms."""
    from common.checkpoint import check_finite
    from common.distributed import sum_over_ranks
    from common.models import token_values
    from common.sampling import response_logprobs

    mask = batch.response_mask
    total_tokens = sum_over_ranks([float(mask.sum())])[0]
    logprob_temperature = args.rollout_temperature or 1.0  # greedy rollouts are scored at temperature 1
    policy.train()
    critic.train()
    sums = dict.fromkeys(("pg_loss", "value_loss", "clipped", "approx_kl", "entropy"), 0.0)
    for start in range(0, len(batch), args.ppo_micro_batch_size):
        micro = list(range(start, min(start + args.ppo_micro_batch_size, len(batch))))
        part = batch.select(micro)
        width, m = part.response_mask.shape[1], part.response_mask
        logprobs, entropy = response_logprobs(policy, part, logprob_temperature, with_entropy=True)
        pg_loss, value_loss, clipped = ppo_losses(
            logprobs, token_values(critic, part), old_logprobs[micro, :width], old_values[micro, :width],
            advantages[micro, :width], returns[micro, :width], m, args.clip, args.value_clip, total_tokens)
        check_finite(pg_loss, "policy", step, stage_dir)
        check_finite(value_loss, "value", step, stage_dir)
        accelerator.backward((pg_loss + value_loss) * accelerator.num_processes)  # processes' gradients are averaged
        with torch.no_grad():
            log_ratio = (logprobs - old_logprobs[micro, :width]) * m
            sums["pg_loss"] += pg_loss.item()
            sums["value_loss"] += value_loss.item()
            sums["clipped"] += float(clipped.sum())
            sums["approx_kl"] += float(((log_ratio.exp() - 1 - log_ratio) * m).sum())  # k3 estimator
            sums["entropy"] += float((entropy * m).sum())
    lrs = {"actor_lr": cosine_lr(step, total_steps, args.ppo_warmup_steps, args.actor_lr),
           "critic_lr": cosine_lr(step, total_steps, args.ppo_warmup_steps, args.critic_lr)}
    for optimizer, lr in ((actor_opt, lrs["actor_lr"]), (critic_opt, lrs["critic_lr"])):
        for group in optimizer.param_groups:
            group["lr"] = lr
    sums["actor_grad_norm"] = float(accelerator.clip_grad_norm_(policy.parameters(), args.grad_clip))
    sums["critic_grad_norm"] = float(accelerator.clip_grad_norm_(critic.parameters(), args.grad_clip))
    for optimizer in (actor_opt, critic_opt):
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return sums | lrs


def irm_models(args: Args, sft_model: str, accelerator):
    """Actor and critic from the SFT model (the critic with a new value head), each prepared with its AdamW
    (FSDP2 takes one model with its optimizer per `prepare`), and the frozen SFT reference."""
    from common.distributed import prepare_frozen
    from common.models import load_policy, load_value_model

    policy, tokenizer = load_policy(sft_model, args.dtype, args.gradient_checkpointing)
    require_chat_template(tokenizer, sft_model)
    critic = load_value_model(sft_model, args.dtype, args.gradient_checkpointing)
    reference, _ = load_policy(sft_model, args.dtype)
    reference = prepare_frozen(accelerator, reference)
    policy, actor_opt = accelerator.prepare(
        policy, torch.optim.AdamW(policy.parameters(), lr=args.actor_lr, betas=(0.9, args.adam_beta2)))
    critic, critic_opt = accelerator.prepare(
        critic, torch.optim.AdamW(critic.parameters(), lr=args.critic_lr, betas=(0.9, args.adam_beta2)))
    return policy, critic, reference, tokenizer, actor_opt, critic_opt


def score_irm_rollout(policy, reference, critic, batch, micro_batch_size: int, temperature: float):
    """Log-probs of the rollout policy and of the SFT reference, and the critic's values (B, T), without
    gradient, in micro-batches of `micro_batch_size` responses."""
    from common.models import token_values
    from common.sampling import response_logprobs

    mask = batch.response_mask
    old_logprobs, ref_logprobs, old_values = (torch.zeros_like(mask) for _ in range(3))
    policy.eval()
    critic.eval()
    with torch.no_grad():
        for start in range(0, len(batch), micro_batch_size):
            micro = list(range(start, min(start + micro_batch_size, len(batch))))
            part = batch.select(micro)
            width = part.response_mask.shape[1]
            old_logprobs[micro, :width] = response_logprobs(policy, part, temperature)
            ref_logprobs[micro, :width] = response_logprobs(reference, part, temperature)
            old_values[micro, :width] = token_values(critic, part)
    return old_logprobs, ref_logprobs, old_values


def irm_step(policy, critic, reference, actor_opt, critic_opt, accelerator, batch, final_reward: torch.Tensor,
             args: Args, step: int, total_steps: int, stage_dir: Path) -> tuple[dict, dict]:
    """One PPO step on a rollout whose calls got `final_reward` (B,): log-probs of the rollout policy and of the
    SFT reference and the critic's values (`score_irm_rollout`), the KL-penalised rewards, advantages and
    returns (`irm_targets`), and the update (`irm_update`). Returns the update's sums and the scored tensors."""
    mask = batch.response_mask
    old_logprobs, ref_logprobs, old_values = score_irm_rollout(
        policy, reference, critic, batch, args.ppo_micro_batch_size, args.rollout_temperature or 1.0)
    old_values = old_values * mask
    rewards, advantages, returns = irm_targets(final_reward, old_logprobs, ref_logprobs, old_values, mask,
                                               args.kl_coef, args.gamma, args.lam)
    sums = irm_update(policy, critic, actor_opt, critic_opt, accelerator, batch, old_logprobs, old_values, advantages,
                      returns, args, step, total_steps, stage_dir)
    return sums, {"old_logprobs": old_logprobs, "ref_logprobs": ref_logprobs, "old_values": old_values,
                  "rewards": rewards, "advantages": advantages, "returns": returns}


def run_irm(args: Args, stage_dir: Path, sft_model: str, targets: Sequence[dict],
            eval_targets: Sequence[dict]) -> tuple[Path, dict]:
    """(3) IRM: PPO from the SFT model, one call per prompt, the error-category reward on its last token and a
    KL penalty to the SFT model on every token (DeepSpeed-Chat step 3, as the official code runs it)."""
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    from common.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
    from common.distributed import explained_variance, shard, sum_over_ranks
    from common.sampling import HFSampler, collate, encode_prompt
    from common.tracking import RunLog, experiment_trackers

    if not targets:
        raise ValueError("IRM has no prompts: no training conversation has a correct single tool call")
    checkpoint = latest_checkpoint(stage_dir) if args.resume else None
    accelerator = Accelerator(log_with=experiment_trackers(args.report_to), project_dir=stage_dir)
    if args.rollout_batch_size % accelerator.num_processes:
        raise ValueError(f"--rollout-batch-size {args.rollout_batch_size} is not a multiple of the number of "
                         f"processes ({accelerator.num_processes}): every process takes an equal share")
    if checkpoint is None and accelerator.is_main_process:
        shutil.rmtree(stage_dir, ignore_errors=True)
    device = accelerator.device
    policy, critic, reference, tokenizer, actor_opt, critic_opt = irm_models(args, sft_model, accelerator)
    start = load_checkpoint(accelerator, checkpoint)["step"] if checkpoint else 0

    prompt_ids = [encode_prompt(tokenizer, t["messages"], t["tools"]) for t in targets]
    steps = math.ceil(args.irm_epochs * len(targets) / args.rollout_batch_size)
    order = []
    shuffle = random.Random(args.seed)
    while len(order) < steps * args.rollout_batch_size:  # epochs of shuffled prompts, fixed for resuming
        epoch = list(range(len(targets)))
        shuffle.shuffle(epoch)
        order += epoch
    sampler = HFSampler(policy, tokenizer)
    log = RunLog(stage_dir, resume_step=start if checkpoint else None, accelerator=accelerator,
                 project=f"tl_training-{stage_dir.name}", config=args)
    plotted = ["eval/accuracy", "eval/tool_selection", "eval/parameter_identification", "reward/mean",
               "rollout/correct", "policy/kl_to_sft", "policy/approx_kl", "policy/clipfrac", "policy/entropy",
               "value/loss", "value/explained_variance", "response/length_mean"]
    evaluation = None
    progress = tqdm(range(start, steps), initial=start, total=steps, desc="irm", disable=not accelerator.is_main_process)
    for step in progress:
        step_start = time.perf_counter()
        rows = order[step * args.rollout_batch_size : (step + 1) * args.rollout_batch_size]
        mine = shard(rows, accelerator.process_index, accelerator.num_processes)

        # ---- 1. rollout: one response per prompt ----
        with sampler.serving(policy):
            samples = sampler.generate([prompt_ids[r] for r in mine], n=1, max_new_tokens=args.max_new_tokens,
                                       temperature=args.rollout_temperature, top_p=1.0,
                                       seed=args.seed * 1_000_003 + step * 101)

        # ---- 2. reward: the error category of each call (IRM) ----
        categories = [classify_tool_call(s.text, targets[r]["gold"], targets[r]["tools"]) for s, r in zip(samples, mine)]
        final_reward = torch.tensor([REWARDS[c] for c in categories], device=device)
        batch = collate(samples, tokenizer.pad_token_id).to(device)
        mask = batch.response_mask  # (B, T)

        # ---- 3-5. log-probs of the policy and the SFT reference, values; KL rewards and GAE; one PPO update ----
        sums, scored = irm_step(policy, critic, reference, actor_opt, critic_opt, accelerator, batch, final_reward,
                                args, step, steps, stage_dir)
        old_logprobs, ref_logprobs, old_values, returns = (scored[k] for k in ("old_logprobs", "ref_logprobs",
                                                                                "old_values", "returns"))

        # ---- 6. metrics over every process's responses, samples, evaluation, checkpoint ----
        counted = [float(final_reward.sum()), len(samples), float(mask.sum()),
                   float(((old_logprobs - ref_logprobs) * mask).sum()), sums["pg_loss"], sums["value_loss"],
                   sums["clipped"], sums["approx_kl"], sums["entropy"]] + [categories.count(c) for c in CATEGORIES]
        reward_sum, n, tokens, kl_sum, pg_loss, value_loss, clipped, approx_kl, entropy, *category_counts = \
            sum_over_ranks(counted)
        metrics = {
            "reward/mean": reward_sum / n,
            **{f"rollout/{c}": count / n for c, count in zip(CATEGORIES, category_counts)},
            "response/length_mean": tokens / n,
            "policy/kl_to_sft": kl_sum / n,
            "policy/approx_kl": approx_kl / tokens,
            "policy/clipfrac": clipped / tokens,
            "policy/entropy": entropy / tokens,
            "policy/pg_loss": pg_loss,
            "policy/grad_norm": sums["actor_grad_norm"],
            "value/loss": value_loss,
            "value/explained_variance": explained_variance(old_values, returns, mask, across_ranks=True),
            "value/grad_norm": sums["critic_grad_norm"],
            "lr/actor": sums["actor_lr"],
            "lr/critic": sums["critic_lr"],
            "time/step_s": time.perf_counter() - step_start,
        }
        done = step + 1
        if done % args.eval_every == 0 or done == steps:
            evaluation = evaluate(policy, tokenizer, eval_targets, args.max_new_tokens, accelerator)
            metrics |= evaluation
        log.metrics(done, metrics)
        examples = [{"prompt": targets[r]["messages"][-1]["content"], "response": s.text, "category": c,
                     "reward": REWARDS[c]} for s, r, c in list(zip(samples, mine, categories))[: args.log_samples]]
        log.samples(done, examples)
        progress.set_postfix(reward=f"{metrics['reward/mean']:.2f}", correct=f"{metrics['rollout/correct']:.2f}",
                             kl=f"{metrics['policy/kl_to_sft']:.3f}")
        if done % args.checkpoint_every == 0 or done == steps:
            save_checkpoint(accelerator, stage_dir, done, {"stage": "irm", "args": dataclasses.asdict(args)},
                            {"policy": policy, "critic": critic}, tokenizer)
            log.plot(plotted, title="TL-Training IRM (PPO)")
            for example in examples:
                progress.write(f"[irm {done}] {example['category']} ({example['reward']:+g}) | {example['prompt']!r} "
                               f"-> {example['response']!r}")
    if evaluation is None:  # resumed at the last step
        evaluation = evaluate(policy, tokenizer, eval_targets, args.max_new_tokens, accelerator)
    log.close()
    return save_final(accelerator, policy, tokenizer, stage_dir, evaluation), evaluation


def evaluate_base(args: Args, stage_dir: Path, model_name: str, eval_targets: Sequence[dict]) -> dict:
    """The held-out evaluation of the model a run starts from (cached in `stage_dir`)."""
    from accelerate import Accelerator

    from common.distributed import prepare_frozen
    from common.models import load_policy

    path = stage_dir / "evaluation.json"
    if args.resume and path.is_file():
        return json.loads(path.read_text())
    accelerator = Accelerator()
    model, tokenizer = load_policy(model_name, args.dtype)
    require_chat_template(tokenizer, model_name)
    evaluation = evaluate(prepare_frozen(accelerator, model), tokenizer, eval_targets, args.max_new_tokens, accelerator)
    if accelerator.is_main_process:
        stage_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(evaluation, indent=2))
    return evaluation


def train(args: Args) -> Path:
    """Run the chosen stages; returns the run directory. Each stage's model is `run_dir/<stage>/model`."""
    run_dir = Path(args.run_dir)
    torch.manual_seed(args.seed)
    conversations = load_conversations(args.data, "train", args)
    if "mae" in args.stages:
        summary = run_mae(conversations, run_dir / "mae", mae=True)
        print(f"MAE: {summary['adverse_turns']} of {summary['assistant_turns']} assistant turns are adverse "
              f"tool-calling interactions and get no loss; data in {run_dir / 'mae' / 'data.jsonl'}")
    if args.stages == ("mae",):
        return run_dir

    model = resolve_model(args)
    eval_targets = [t for c in load_conversations(args.eval_data, "test", args) for t in call_targets(c)]
    evaluations = {"start": evaluate_base(args, run_dir / "base", model, eval_targets)}
    # --resume skips a finished stage here, before its models are loaded
    if "sft" in args.stages:
        if args.compare_plain_sft:
            plain_model, evaluations["plain SFT"] = finished(run_dir / "plain_sft", args.resume) or run_sft(
                args, run_dir / "plain_sft", model, conversations, False, 1.0, eval_targets)
        techniques = " + ".join(["SFT"] + ["MAE"] * ("mae" in args.stages) + ["PKT"] * (args.w_max > 1))
        model, evaluations[techniques] = finished(run_dir / "sft", args.resume) or run_sft(
            args, run_dir / "sft", model, conversations, "mae" in args.stages, args.w_max, eval_targets)
        model = str(model)
    if "irm" in args.stages:
        targets = [t for c in conversations for t in call_targets(c)]
        _, evaluations["+ IRM (PPO)"] = finished(run_dir / "irm", args.resume) or run_irm(
            args, run_dir / "irm", model, targets, eval_targets)
        if "sft" in args.stages and args.compare_plain_sft:
            _, evaluations["plain SFT + IRM (PPO)"] = finished(run_dir / "plain_sft_irm", args.resume) or run_irm(
                args, run_dir / "plain_sft_irm", str(plain_model), targets, eval_targets)

    (run_dir / "evaluations.json").write_text(json.dumps(evaluations, indent=2))
    plot_error_categories(evaluations, run_dir / "error_categories.png",
                          f"TL-Training: {len(eval_targets)} held-out queries, greedy")
    print(f"{'':<24}" + "".join(f"{level:>26}" for level in LEVELS))
    for name, evaluation in evaluations.items():
        print(f"{name:<24}" + "".join(f"{evaluation[f'eval/{level}']:>26.1%}" for level in LEVELS))
    return run_dir


# --------------------------------------------------------------------------------------------------
# The error-category breakdown before and after each stage
# --------------------------------------------------------------------------------------------------


def plot_error_categories(evaluations: dict[str, dict], path: Path, title: str) -> Path:
    """One stacked bar per evaluated model: the share of held-out queries in each error category."""
    # a bare Figure, not pyplot: drawing a file must not change the backend of a notebook that imports this
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    names = list(evaluations)
    colors = colormaps["RdYlGn"]([0.0, 0.08, 0.18, 0.26, 0.32, 0.38, 0.44, 0.5, 0.68, 0.9])
    fig = Figure(figsize=(10, 1.0 + 0.6 * len(names)))
    ax = fig.subplots()
    left = [0.0] * len(names)
    for category, color in zip(CATEGORIES, colors):
        shares = [evaluations[n][f"eval/{category}"] for n in names]
        ax.barh(names, shares, left=left, color=color, label=f"{category} ({REWARDS[category]:+g})")
        left = [a + b for a, b in zip(left, shares)]
    for y, name in enumerate(names):
        ax.text(1.01, y, f"{evaluations[name]['eval/accuracy']:.0%} exact", va="center", fontsize=9)
    ax.set_xlim(0, 1)
    ax.invert_yaxis()
    ax.set_xlabel("share of held-out queries (category and its IRM reward)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.35 - 0.05 * len(names)))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


if __name__ == "__main__":
    train(parse_args())
