"""Supervised fine-tuning plumbing: chat conversations to token ids with per-message loss masks, and
a small training loop. The papers' own masks (Agent-R's) are computed in their scripts and arrive as labels;
this module only tokenizes, batches and steps.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

IGNORE_INDEX = -100


@dataclass
class ChatTokens:
    """One rendered conversation: token ids, each token's character span in `text`, and the loss mask."""

    text: str
    input_ids: list[int]
    offsets: list[tuple[int, int]]
    message_spans: list[tuple[int, int]]  # character span of each message's trained part in `text`
    labels: list[int]  # input_ids where trained, IGNORE_INDEX elsewhere


def render_chat(tokenizer, messages, tools=None, add_generation_prompt=False) -> str:
    return tokenizer.apply_chat_template(
        messages, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def tokenize_chat(tokenizer, messages: Sequence[dict], trained: Sequence[bool], tools=None) -> ChatTokens:
    """Render `messages` with the tokenizer's chat template and label the tokens of trained messages.

    `trained[i]` says whether message i is a training target. A trained assistant message contributes
    its content (tool calls included) and its end-of-turn token, not the role header, as in TRL's
    assistant-only loss. Spans are found by character offsets, so this works for any tokenizer.
    """
    if len(trained) != len(messages):
        raise ValueError(f"`trained` has {len(trained)} flags for {len(messages)} messages")
    text = render_chat(tokenizer, messages, tools)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            spans.append((0, 0))
            continue
        head = render_chat(tokenizer, messages[:i], tools, add_generation_prompt=True) if i else ""
        upto = render_chat(tokenizer, messages[: i + 1], tools)
        if not text.startswith(upto) or not upto.startswith(head):
            raise ValueError(f"the chat template does not render message {i} as a prefix of the conversation")
        spans.append((len(head), len(upto.rstrip("\n"))))
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoding["input_ids"], [tuple(o) for o in encoding["offset_mapping"]]
    labels = [IGNORE_INDEX] * len(ids)
    for (start, end), is_trained in zip(spans, trained):
        if not is_trained or start == end:
            continue
        for j, (a, b) in enumerate(offsets):
            if start <= a and b <= end and b > a:
                labels[j] = ids[j]
    return ChatTokens(text, ids, offsets, spans, labels)


def pad_right(rows: Sequence[Sequence], value) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([list(r) + [value] * (width - len(r)) for r in rows])


def token_mean_cross_entropy(logits, labels) -> torch.Tensor:
    """Mean next-token cross-entropy over labelled tokens (the usual SFT loss)."""
    shift_logits, shift_labels = logits[:, :-1].float(), labels[:, 1:]
    ce = F.cross_entropy(shift_logits.transpose(1, 2), shift_labels, ignore_index=IGNORE_INDEX, reduction="none")
    mask = (shift_labels != IGNORE_INDEX).float()
    return (ce * mask).sum() / mask.sum().clamp(min=1)


def labelled_tokens(example: dict) -> int:
    """How many of the example's tokens the loss counts (next-token targets that are labelled)."""
    return sum(label != IGNORE_INDEX for label in example["labels"][1:])


def sft_train(
    model,
    examples: Sequence[dict],
    steps: int,
    batch_size: int = 32,
    lr: float = 1e-3,
    warmup_steps: int = 20,
    weight_decay: float = 0.0,
    grad_clip: float = 1.0,
    seed: int = 0,
    callback: Callable[[int, float], bool] | None = None,
    progress: bool = True,
    micro_batch_size: int | None = None,
    accelerator=None,
    optimizer=None,
) -> list[float]:
    """Train `model` on `examples` (dicts with `input_ids` and `labels`) for `steps` optimizer steps; returns
    the per-step losses, each the token mean over its batch.

    Batches are sampled with replacement from a seeded generator. With `micro_batch_size`, a batch is sorted by
    length and run `micro_batch_size` examples per forward/backward, each weighted by its share of the batch's
    labelled tokens: the same loss and gradient as the whole batch at once, with the padding of a few similar
    lengths instead of the longest of the batch, and memory bounded by the micro-batch. AdamW (β2 0.98), linear
    warmup then constant.
    With `accelerator` (several processes), `model` and `optimizer` are the ones it prepared: the optimizer
    starts afresh (its moments are cleared and its learning rate set here, as a new AdamW would), every process
    draws the same batch and trains on its share of it, and the weights are the micro-batches' shares of the
    whole batch's labelled tokens, so the gradient is the batch's whatever the number of processes.
    `callback(step, loss)` runs after every step; returning True stops training early.
    """
    processes, index = (accelerator.num_processes, accelerator.process_index) if accelerator else (1, 0)
    if batch_size % processes:
        raise ValueError(f"SFT batch size {batch_size} is not a multiple of the number of processes ({processes})")
    device = accelerator.device if accelerator else next(model.parameters()).device
    if optimizer is None:
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=weight_decay)
    else:
        optimizer.state.clear()
        for group in optimizer.param_groups:
            group.update(lr=lr, betas=(0.9, 0.98), weight_decay=weight_decay)
    clip = accelerator.clip_grad_norm_ if accelerator else torch.nn.utils.clip_grad_norm_
    rng = random.Random(seed)
    pad_id = 0
    losses = []
    model.train()
    for step in tqdm(range(steps), desc="sft", disable=not progress, leave=False):
        batch = [examples[rng.randrange(len(examples))] for _ in range(batch_size)]
        if micro_batch_size:
            batch.sort(key=lambda e: len(e["input_ids"]))
        mine = batch[index::processes]
        size = micro_batch_size or len(mine)
        batch_tokens = max(1, sum(labelled_tokens(e) for e in batch))
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / max(1, warmup_steps))
        optimizer.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for start in range(0, len(mine), size):
            micro = mine[start : start + size]
            input_ids = pad_right([e["input_ids"] for e in micro], pad_id).to(device)
            labels = pad_right([e["labels"] for e in micro], IGNORE_INDEX).to(device)
            attention_mask = pad_right([[1] * len(e["input_ids"]) for e in micro], 0).to(device)
            logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
            share = sum(labelled_tokens(e) for e in micro) / batch_tokens  # exactly 1.0 for a whole batch
            loss = token_mean_cross_entropy(logits, labels) * share
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"SFT loss is {loss.item()} at step {step}; lower the learning rate ({lr})")
            if accelerator:
                accelerator.backward(loss * processes)  # processes' gradients are averaged: undo it
            else:
                loss.backward()
            loss_sum += loss.item()
        clip(model.parameters(), grad_clip)
        optimizer.step()
        if accelerator:
            from common.distributed import sum_over_ranks

            loss_sum = sum_over_ranks([loss_sum])[0]
        losses.append(loss_sum)
        if callback is not None and callback(step, loss_sum):
            break
    model.eval()
    return losses


def sft_into_accuracy_window(
    model,
    examples: Sequence[dict],
    evaluate: Callable[[], dict],
    accuracy_window: tuple[float, float],
    target_accuracy: float,
    eval_every: int,
    max_steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    micro_batch_size: int | None = None,
    describe: Callable[[int, float, dict], str] | None = None,
) -> tuple[int, dict, list[dict]]:
    """Warm-start `model` by SFT until an evaluation reaches `target_accuracy`, and keep the last model whose
    accuracy lies inside `accuracy_window` (accuracy can jump past the window between two evaluations).

    `evaluate()` measures the model in place and returns a dict with at least `accuracy`; it runs every
    `eval_every` steps. `describe(step, loss, evaluation)`, if given, is printed at each evaluation. Returns the
    kept step, its evaluation and every evaluation as `{"step", "loss", **evaluation}`; `model` holds the kept
    weights. The training runs on one thread (the caller's thread count is given back): the kept model is chosen
    at an evaluation, so the last bits of the arithmetic decide it, and one thread makes them independent of the
    number of cores (they still depend on the CPU's instruction set).
    """
    low, high = accuracy_window
    kept = {"weights": None, "step": 0, "evaluation": None}
    history = []

    def at_step(step: int, loss: float) -> bool:
        if (step + 1) % eval_every:
            return False
        evaluation = evaluate()
        model.train()
        history.append({"step": step + 1, "loss": loss, **evaluation})
        if describe is not None:
            print(describe(step + 1, loss, evaluation), flush=True)
        if low <= evaluation["accuracy"] <= high:
            kept.update(weights={k: v.clone() for k, v in model.state_dict().items()}, step=step + 1,
                        evaluation=evaluation)
        return evaluation["accuracy"] >= target_accuracy

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(seed)
        sft_train(model, examples, max_steps, batch_size, lr, seed=seed, callback=at_step,
                  progress=describe is not None, micro_batch_size=micro_batch_size)
    finally:
        torch.set_num_threads(threads)
    if kept["weights"] is None:
        raise RuntimeError(f"the warm start never reached held-out accuracy in [{low:.0%}, {high:.0%}] within "
                           f"{max_steps} steps; raise max_steps or lr in its config")
    model.load_state_dict(kept["weights"])
    return kept["step"], kept["evaluation"], history
