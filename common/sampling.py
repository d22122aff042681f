"""One sampling interface for every script, two backends, and the one log-prob function.

    sampler = HFSampler(model, tokenizer)                    # transformers `generate`, the default
    sampler = VLLMSampler(model_path, tokenizer)             # vLLM, on a GPU
    samples = sampler.generate(prompts, n=4, max_new_tokens=256, temperature=1.0, top_p=1.0, seed=0)

A prompt is a list of chat messages (rendered with the tokenizer's chat template), a list of token
ids, or a plain string. Each `Sample` carries its response token ids *cut after the first end token or
stop string*, so its response mask is data: ones over `response_ids`. It is never inferred from pad
ids (with Qwen, pad can equal EOS). `collate` lays samples out as a training batch, and
`response_logprobs` computes per-token log-probs (and entropy) of the responses under a model with
the temperature applied exactly as the sampler applies it; every trainer uses it for old and new
log-probs.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from transformers import LogitsProcessor, LogitsProcessorList


@dataclass
class Sample:
    prompt_index: int
    prompt_ids: list[int]
    response_ids: list[int]  # up to and including the end token or stop string
    text: str  # the decoded response, special tokens removed
    finish_reason: str  # "stop" (end token or stop string) or "length" (max_new_tokens reached)
    logprobs: list[float] = field(default_factory=list)  # the sampler's, one per response token

    @property
    def response_mask(self) -> list[int]:
        return [1] * len(self.response_ids)


def encode_prompt(tokenizer, prompt, tools=None) -> list[int]:
    if isinstance(prompt, str):
        return tokenizer.encode(prompt, add_special_tokens=False)
    if prompt and isinstance(prompt[0], dict):
        text = tokenizer.apply_chat_template(list(prompt), tools=tools, tokenize=False, add_generation_prompt=True)
        return tokenizer.encode(text, add_special_tokens=False)
    return list(prompt)


def end_token_ids(tokenizer, model_config=None) -> list[int]:
    """The ids that end a response: the generation config's EOS ids, and the tokenizer's EOS."""
    ids = {tokenizer.eos_token_id}
    eos = getattr(model_config, "eos_token_id", None) if model_config is not None else None
    ids.update(eos if isinstance(eos, list) else [eos])
    return sorted(i for i in ids if i is not None)


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filtering: keep the smallest set of tokens whose probability reaches `top_p`."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    cumulative = sorted_logits.softmax(-1).cumsum(-1)
    remove = cumulative - sorted_logits.softmax(-1) >= top_p  # keep a token if the mass before it < top_p
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


class _ProcessAndRecord(LogitsProcessor):
    """Applies temperature and top-p (so `generate` adds no warpers of its own) and records the
    log-prob of each sampled token under that processed distribution, one step behind."""

    def __init__(self, temperature: float, top_p: float):
        self.temperature, self.top_p = temperature, top_p
        self.last_logprobs: torch.Tensor | None = None
        self.recorded: list[torch.Tensor] = []

    def __call__(self, input_ids, scores):
        if self.last_logprobs is not None:
            self.recorded.append(self.last_logprobs.gather(-1, input_ids[:, -1:]).squeeze(-1))
        scores = top_p_filter(scores / self.temperature, self.top_p)
        self.last_logprobs = scores.log_softmax(-1)
        return scores

    def logprobs(self, generated: torch.Tensor) -> torch.Tensor:
        steps = self.recorded + [self.last_logprobs.gather(-1, generated[:, -1:]).squeeze(-1)]
        return torch.stack(steps, dim=1)[:, : generated.shape[1]]


class HFSampler:
    """Batched sampling with transformers `generate`: left padding, KV cache, chunks of `batch_size`."""

    def __init__(self, model, tokenizer, batch_size: int = 256, synced_gpus: bool = False):
        self.model, self.tokenizer, self.batch_size, self.synced_gpus = model, tokenizer, batch_size, synced_gpus
        self.end_ids = end_token_ids(tokenizer, getattr(model, "generation_config", None))

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence,
        n: int = 1,
        max_new_tokens: int = 256,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: Sequence[str] = (),
        tools=None,
    ) -> list[Sample]:
        """`n` samples per prompt, prompt-major. temperature 0 means greedy decoding."""
        prompt_ids = [encode_prompt(self.tokenizer, p, tools) for p in prompts]
        jobs = [(i, ids) for i, ids in enumerate(prompt_ids) for _ in range(n)]
        device = next(self.model.parameters()).device
        was_training = self.model.training
        self.model.eval()
        samples: list[Sample] = []
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            if seed is not None:
                torch.manual_seed(seed)
            for start in range(0, len(jobs), self.batch_size):
                samples += self._generate_chunk(jobs[start : start + self.batch_size], device, max_new_tokens,
                                                temperature, top_p, list(stop))
        self.model.train(was_training)
        return samples

    def _generate_chunk(self, jobs, device, max_new_tokens, temperature, top_p, stop) -> list[Sample]:
        width = max(len(ids) for _, ids in jobs)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for _, ids in jobs], device=device)
        attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for _, ids in jobs], device=device)
        greedy = temperature == 0
        recorder = _ProcessAndRecord(1.0 if greedy else temperature, 1.0 if greedy else top_p)
        # temperature and top-p are applied by `recorder`; generate's own warpers stay off, and its
        # default top_k=50 would silently change the distribution that PPO's ratio assumes
        warpers_off = {} if greedy else {"temperature": 1.0, "top_p": 1.0, "top_k": 0}
        output = self.model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            do_sample=not greedy,
            **warpers_off,
            max_new_tokens=max_new_tokens,
            eos_token_id=self.end_ids,
            pad_token_id=pad,
            logits_processor=LogitsProcessorList([recorder]),
            stop_strings=stop or None,
            tokenizer=self.tokenizer if stop else None,
            synced_gpus=self.synced_gpus,
        )
        generated = output[:, width:]
        logprobs = recorder.logprobs(generated).tolist()
        samples = []
        for row, (prompt_index, ids) in enumerate(jobs):
            response, finish = cut_response(generated[row].tolist(), self.end_ids, stop, self.tokenizer)
            text = self.tokenizer.decode(response, skip_special_tokens=True)
            samples.append(Sample(prompt_index, ids, response, text, finish, logprobs[row][: len(response)]))
        return samples


def cut_response(tokens: list[int], end_ids: Sequence[int], stop: Sequence[str], tokenizer) -> tuple[list[int], str]:
    """Cut a generated row after its first end token or the token completing a stop string.

    Everything after that point is padding that `generate` wrote into finished rows, whatever its id.
    """
    end = next((i + 1 for i, t in enumerate(tokens) if t in end_ids), None)
    if stop:
        text = tokenizer.decode(tokens[:end], skip_special_tokens=False)
        hits = [text.find(s) + len(s) for s in stop if s in text]
        if hits:
            chars = min(hits)
            lo, hi = 1, len(tokens[:end]) if end else len(tokens)
            while lo < hi:  # the shortest prefix whose text holds the stop string
                mid = (lo + hi) // 2
                if len(tokenizer.decode(tokens[:mid], skip_special_tokens=False)) >= chars:
                    hi = mid
                else:
                    lo = mid + 1
            return tokens[:lo], "stop"
    if end is not None:
        return tokens[:end], "stop"
    return tokens, "length"


class VLLMSampler:
    """Sampling with vLLM; `load_weights` pushes the trainer's current weights into the engine (no
    checkpoint written), so every rollout comes from the policy being trained.

    The engine runs in this process (so that `load_weights` reaches its model). `engine_kwargs` go to
    `vllm.LLM`, e.g. `gpu_memory_utilization`, `tensor_parallel_size`, `max_model_len`, `dtype`.
    """

    def __init__(self, model_name_or_path: str, tokenizer, **engine_kwargs):
        require_vllm()
        import os

        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        from vllm import LLM

        self.tokenizer = tokenizer
        self.end_ids = end_token_ids(tokenizer)
        engine_kwargs = {"gpu_memory_utilization": 0.4, "dtype": "bfloat16", **engine_kwargs}
        # prompts go in as ids and come out as ids: vLLM never needs to load the tokenizer itself
        self.llm = LLM(model=model_name_or_path, skip_tokenizer_init=True, **engine_kwargs)

    def load_weights(self, named_tensors) -> None:
        """Copy (name, tensor) pairs, e.g. `model.state_dict().items()`, into the running engine."""
        weights = [(name, tensor.detach()) for name, tensor in named_tensors]
        # vLLM's in-place reload re-runs its checkpoint loading (fused QKV, repacked kernels) on these
        # tensors; loading straight into the model's parameters fails once they were repacked.
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True})
        self.llm.reset_prefix_cache()  # cached prompt states were computed with the old weights

    def generate(self, prompts, n=1, max_new_tokens=256, temperature=1.0, top_p=1.0, seed=None, stop=(), tools=None):
        from vllm import SamplingParams, TokensPrompt

        prompt_ids = [encode_prompt(self.tokenizer, p, tools) for p in prompts]
        params = SamplingParams(
            n=n,
            temperature=temperature,
            top_p=top_p if temperature > 0 else 1.0,
            top_k=0 if temperature > 0 else 1,  # no top-k: the same distribution as the HF sampler
            max_tokens=max_new_tokens,
            seed=seed,
            stop_token_ids=self.end_ids,
            logprobs=0,  # the sampled token's log-prob
            detokenize=False,
        )
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids], params, use_tqdm=False)
        samples = []
        for index, (ids, output) in enumerate(zip(prompt_ids, outputs)):
            for completion in output.outputs:
                tokens = list(completion.token_ids)
                response, finish = cut_response(tokens, self.end_ids, list(stop), self.tokenizer)
                logprobs = [entry[token].logprob for entry, token in zip(completion.logprobs or [], tokens)]
                text = self.tokenizer.decode(response, skip_special_tokens=True)
                samples.append(Sample(index, ids, response, text, finish, logprobs[: len(response)]))
        return samples


def require_vllm() -> None:
    """vLLM must be installed, and run on a CUDA GPU (or be a CPU build of vLLM)."""
    if importlib.util.find_spec("vllm") is None:
        raise RuntimeError(
            "The vLLM backend needs the `vllm` package, which is not installed. It runs on NVIDIA GPUs: "
            "install it in its own environment with `pip install -r requirements-gpu.txt`, or use the "
            "default transformers backend (`--backend hf`)."
        )
    if torch.cuda.is_available():
        return
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        raise RuntimeError(
            "The vLLM backend needs a CUDA GPU and none is visible (torch.cuda.is_available() is False). "
            "Run on a GPU machine, or use the transformers backend (`--backend hf`)."
        )


# --------------------------------------------------------------------------------------------------
# Training batches and log-probs
# --------------------------------------------------------------------------------------------------

@dataclass
class RolloutBatch:
    """Samples laid out as whole sequences, [prompt | response | padding], every row starting at column 0.

    Padding whole sequences on the right (rather than left-padding prompts and right-padding responses)
    leaves only the difference in total length as padding, so rows sorted by total length pack tightly.
    Response token t of row i is `input_ids[i, prompt_lengths[i] + t]`; the position just before it holds
    the logits that predict it and the critic's V(s_t).
    """

    input_ids: torch.Tensor  # (B, L)
    attention_mask: torch.Tensor  # (B, L)
    response_mask: torch.Tensor  # (B, T) float, 1 on response tokens
    prompt_lengths: torch.Tensor  # (B,) long

    def to(self, device) -> "RolloutBatch":
        return RolloutBatch(self.input_ids.to(device), self.attention_mask.to(device),
                            self.response_mask.to(device), self.prompt_lengths.to(device))

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def response_states(self, per_position: torch.Tensor) -> torch.Tensor:
        """(B, L, ...) -> (B, T, ...): the entries at the positions just before each response token."""
        B, L = self.input_ids.shape
        T = self.response_mask.shape[1]
        before = self.prompt_lengths.unsqueeze(1) - 1 + torch.arange(T, device=self.input_ids.device)
        # slots past a row's end point beyond L when its prompt is longer than others'; they are masked
        before = before.clamp(max=L - 1)
        return per_position[torch.arange(B, device=before.device).unsqueeze(1), before]

    def response_tokens(self) -> torch.Tensor:
        """(B, T) the response token ids (padding where a row's response is shorter)."""
        return self.response_states(torch.cat([self.input_ids[:, 1:], self.input_ids[:, -1:]], dim=1))

    def select(self, rows) -> "RolloutBatch":
        """The given rows, trimmed to their longest sequence and longest response (less padding)."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        lengths = self.attention_mask[rows].sum(1)
        prompt_lengths = self.prompt_lengths[rows]
        keep = int(lengths.max())
        keep_response = max(1, int((lengths - prompt_lengths).max()))
        return RolloutBatch(self.input_ids[rows, :keep], self.attention_mask[rows, :keep],
                            self.response_mask[rows, :keep_response], prompt_lengths)


def collate(samples: Sequence[Sample], pad_id: int) -> RolloutBatch:
    L = max(len(s.prompt_ids) + len(s.response_ids) for s in samples)
    T = max(max(len(s.response_ids) for s in samples), 1)
    ids, attention, response_mask = [], [], []
    for s in samples:
        real = len(s.prompt_ids) + len(s.response_ids)
        ids.append(s.prompt_ids + s.response_ids + [pad_id] * (L - real))
        attention.append([1] * real + [0] * (L - real))
        response_mask.append(s.response_mask + [0] * (T - len(s.response_ids)))
    return RolloutBatch(torch.tensor(ids), torch.tensor(attention), torch.tensor(response_mask, dtype=torch.float32),
                        torch.tensor([len(s.prompt_ids) for s in samples]))


def response_logprobs(model, batch: RolloutBatch, temperature: float = 1.0, with_entropy: bool = False):
    """Log-prob of each response token (B, T) under `model`, and the entropy of each token's
    distribution (B, T) if asked, with logits divided by `temperature` as the sampler divides them.

    Computed as logit - logsumexp(logits) so that no (B, T, V) log-softmax copy is kept.
    """
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
    logits = batch.response_states(logits).float() / temperature  # (B, T, V): logits at t-1 predict token t
    tokens = batch.response_tokens()
    log_normalizer = torch.logsumexp(logits, dim=-1)
    logprobs = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - log_normalizer
    if not with_entropy:
        return logprobs
    probs = F.softmax(logits, dim=-1)
    entropy = log_normalizer - (probs * logits).sum(-1)
    return logprobs, entropy
