"""One sampling interface for every script, two backends, and the one log-prob function.

    sampler = HFSampler(model, tokenizer)                    # transformers `generate`, the default
    sampler = VLLMSampler(model_path, tokenizer)             # vLLM, on a GPU
    with sampler.serving(policy):                            # the policy's current weights, on every rank
        samples = sampler.generate(prompts, n=4, max_new_tokens=256, temperature=1.0, top_p=1.0, seed=0)

A prompt is a list of chat messages (rendered with the tokenizer's chat template), a list of token
ids, or a plain string. Each `Sample` carries its response token ids *cut after the first end token or
stop string*, so its response mask is data: ones over `response_ids`. It is never inferred from pad
ids (with Qwen, pad can equal EOS). `collate` lays samples out as a training batch, and
`response_logprobs` computes per-token log-probs (and entropy) of the responses under a model with
the temperature applied exactly as the sampler applies it; every trainer uses it for old and new
log-probs.

On several processes each rank samples its own prompts. `seed` is the run's seed for a call; each rank
draws from its own stream of it (`rank_seed`). Where generation is a collective (transformers under FSDP2,
whose every forward all-gathers; a tensor-parallel vLLM engine, which serves the prompts of its whole
group), the ranks run it in lockstep: every call agrees on how many chunks to run, and `serving` ends
only when every rank has finished its own calls, so ranks may make different numbers of calls inside it
(Agent-R's searches do).
"""

from __future__ import annotations

import importlib.util
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.distributed as dist
from transformers import AttentionInterface, LogitsProcessor, LogitsProcessorList
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from common.distributed import full_weights, is_distributed, is_sharded, rank, unwrapped, world_size


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


def rank_seed(seed: int | None, index: int) -> int | None:
    """The seed of rank (or engine) `index` for a call with the run's `seed`: distinct streams for distinct
    ranks, and exactly `seed` on a single process."""
    return None if seed is None else seed + index * 2**48


def _cpu_grouped_query_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                            **kwargs):
    """transformers' SDPA attention, except that on CPU grouped key/value heads go to torch's SDPA as they are
    (`enable_gqa`) instead of being repeated to every query head first. transformers repeats them whenever a
    padding mask is given, because CUDA's fused kernels take no mask with grouped heads; on CPU the copy is most
    of the cost of decoding (a rollout of 256 samples of up to 560 tokens from the tiny GQA model: about 26 s
    against about 210 s), and the attention it computes is the same (the logits are equal)."""
    if query.device.type != "cpu" or key.shape[1] == query.shape[1] or kwargs.get("output_attentions"):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    output = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling,
        is_causal=query.shape[2] > 1 and attention_mask is None and causal, enable_gqa=True)
    return output.transpose(1, 2).contiguous(), None


CPU_GQA_SDPA = "sdpa_cpu_gqa"
AttentionInterface.register(CPU_GQA_SDPA, _cpu_grouped_query_sdpa)
AttentionMaskInterface.register(CPU_GQA_SDPA, sdpa_mask)


@contextmanager
def grouped_query_decoding(model):
    """`model` decodes with `_cpu_grouped_query_sdpa` inside the block when it uses SDPA attention, and is given
    back its own implementation after it (training's forward and backward passes are left as they were)."""
    before = getattr(model.config, "_attn_implementation", None)
    if before != "sdpa":
        yield
        return
    model.set_attn_implementation(CPU_GQA_SDPA)
    try:
        yield
    finally:
        model.set_attn_implementation(before)


class HFSampler:
    """Batched sampling with transformers `generate`: left padding, KV cache, chunks of `batch_size`.

    It samples from the module it is given, the one being trained, so its weights are always current. Under
    FSDP2 that module's forward is a collective, so generation runs in lockstep (see the module docstring)."""

    def __init__(self, model, tokenizer, batch_size: int = 256):
        self.model, self.tokenizer, self.batch_size = unwrapped(model), tokenizer, batch_size
        self.end_ids = end_token_ids(tokenizer, getattr(self.model, "generation_config", None))
        self.lockstep = is_distributed() and is_sharded(self.model)

    @contextmanager
    def serving(self, model):
        """Generation from `model`, the policy being trained (the module this sampler samples from: nothing
        to push). Ends when every rank has made all its calls."""
        if unwrapped(model) is not self.model:
            raise ValueError("HFSampler.serving: this sampler samples from another module than the policy given")
        yield self
        if self.lockstep:
            while (chunks := self._agree(None)) is not None:
                for _ in range(chunks):
                    self._idle_chunk()

    def _agree(self, chunks: int | None) -> int | None:
        """Lockstep: this rank's chunk count (None: it has no call left); returns the largest count of any
        rank, or None when no rank has a call left."""
        mine = torch.tensor([0 if chunks is None else 1, chunks or 0], device=self._device())
        dist.all_reduce(mine, op=dist.ReduceOp.MAX)
        return int(mine[1]) if mine[0] else None

    def _device(self):
        return next(self.model.parameters()).device

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
        chunks = [jobs[start : start + self.batch_size] for start in range(0, len(jobs), self.batch_size)]
        rounds = self._agree(len(chunks)) if self.lockstep else len(chunks)
        device = self._device()
        was_training = self.model.training
        self.model.eval()
        samples: list[Sample] = []
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            if seed is not None:
                torch.manual_seed(rank_seed(seed, rank()))
            for chunk in chunks:
                samples += self._generate_chunk(chunk, device, max_new_tokens, temperature, top_p, list(stop))
            for _ in range(rounds - len(chunks)):
                self._idle_chunk()
        self.model.train(was_training)
        return samples

    def _idle_chunk(self) -> None:
        """Lockstep: a one-token generation that keeps running forward passes while other ranks generate."""
        was_training = self.model.training
        self.model.eval()
        self._generate_chunk([(0, [self.tokenizer.pad_token_id])], self._device(), 1, 0.0, 1.0, [])
        self.model.train(was_training)

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
        with grouped_query_decoding(self.model):
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
                synced_gpus=self.lockstep,
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
    """Sampling with a vLLM engine colocated in the training processes (TRL's colocate mode, verl's hybrid
    engine); `serving(policy)` pushes the trainer's current weights into it, so every rollout comes from the
    policy being trained, on every rank.

    On one process the engine runs in-process (with vLLM's own workers for tensor parallelism). On several,
    each process is one vLLM worker (`distributed_executor_backend="external_launcher"`) and groups of
    `tensor_parallel_size` consecutive ranks form one engine: the group gathers its ranks' prompts,
    generates them all, and each rank keeps its own outputs. With `enable_sleep_mode` the engine frees its weights and KV cache while the trainer trains
    (vLLM's sleep level 2) and takes them back, with the pushed weights, in `serving`. `max_model_len`
    should be the prompt limit plus the response limit (vLLM's default reserves the model's whole context).
    `engine_kwargs` go to `vllm.LLM` (e.g. `enforce_eager`).
    """

    def __init__(self, model_name_or_path: str, tokenizer, tensor_parallel_size: int = 1,
                 gpu_memory_utilization: float = 0.4, max_model_len: int | None = None,
                 enable_sleep_mode: bool = False, dtype: str = "bfloat16", **engine_kwargs):
        require_vllm()
        self.group = None
        if is_distributed():
            if world_size() % tensor_parallel_size:
                raise ValueError(f"--tensor-parallel-size {tensor_parallel_size} must divide the number of processes "
                                 f"({world_size()}): each engine is a group of that many consecutive ranks")
            engine_kwargs["distributed_executor_backend"] = "external_launcher"
            if tensor_parallel_size > 1:
                self.group, _ = dist.new_subgroups_by_enumeration(
                    [list(range(first, first + tensor_parallel_size))
                     for first in range(0, world_size(), tensor_parallel_size)])
        else:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in-process, so that the weight push reaches it
        from vllm import LLM

        self.tokenizer = tokenizer
        self.end_ids = end_token_ids(tokenizer)
        self.dtype = getattr(torch, dtype)
        self.sleeps = enable_sleep_mode
        # prompts go in as ids and come out as ids: vLLM never needs to load the tokenizer itself; the engine's
        # own seed must be the same on every rank of a tensor-parallel group
        self.llm = LLM(model=model_name_or_path, skip_tokenizer_init=True, tensor_parallel_size=tensor_parallel_size,
                       gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
                       enable_sleep_mode=enable_sleep_mode, dtype=dtype, seed=rank() // tensor_parallel_size,
                       **engine_kwargs)
        if self.sleeps:
            self.llm.sleep(level=2)

    def load_weights(self, named_tensors) -> None:
        """Copy (name, tensor) pairs, e.g. one layer of `model.state_dict().items()`, into the running engine;
        parameters not given keep their values."""
        weights = [(name, tensor.detach()) for name, tensor in named_tensors]
        # vLLM's in-place reload re-runs its checkpoint loading (fused QKV, repacked kernels) on these
        # tensors; loading straight into the model's parameters fails once they were repacked.
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True})
        self.llm.reset_prefix_cache()  # cached prompt states were computed with the old weights

    @contextmanager
    def serving(self, model):
        """Generation from `model`'s current weights: wake the engine, push the weights a decoder layer at a
        time (under FSDP2 every rank gathers them: `common.distributed.full_weights`), generate inside the
        block, then sleep again once every rank of the group has made its calls."""
        if self.sleeps:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # give the training's freed activations back before vLLM takes memory
            self.llm.wake_up(tags=["weights"])
        for layer in full_weights(model, self.dtype):
            self.load_weights(layer)
        if self.sleeps:
            self.llm.wake_up(tags=["kv_cache"])
        yield self
        if self.group is not None:
            while self._run(None) is not None:
                pass
        if self.sleeps:
            self.llm.sleep(level=2)

    def _run(self, requests: list[tuple[list[int], dict]] | None):
        """Generate (prompt ids, sampling settings) requests; None: this rank has no call left. In a
        tensor-parallel group every rank must submit the same requests, so the group's requests are gathered
        and each rank keeps the outputs of its own. Returns None once no rank of the group has a call left."""
        from vllm import SamplingParams, TokensPrompt

        everything, first = requests or [], 0
        if self.group is not None:
            parts = [None] * dist.get_world_size(self.group)
            dist.all_gather_object(parts, requests, group=self.group)
            if all(part is None for part in parts):
                return None
            first = sum(len(part or []) for part in parts[: dist.get_rank(self.group)])
            everything = [request for part in parts for request in part or []]
        if not everything:
            return []
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=ids) for ids, _ in everything],
                                    [SamplingParams(**settings) for _, settings in everything], use_tqdm=False)
        return outputs[first : first + len(requests or [])]

    def generate(self, prompts, n=1, max_new_tokens=256, temperature=1.0, top_p=1.0, seed=None, stop=(), tools=None):
        prompt_ids = [encode_prompt(self.tokenizer, p, tools) for p in prompts]
        settings = dict(
            n=n,
            temperature=temperature,
            top_p=top_p if temperature > 0 else 1.0,
            top_k=0 if temperature > 0 else 1,  # no top-k: the same distribution as the HF sampler
            max_tokens=max_new_tokens,
            seed=rank_seed(seed, rank()),
            stop_token_ids=self.end_ids,
            logprobs=0,  # the sampled token's log-prob
            detokenize=False,
        )
        outputs = self._run([(ids, settings) for ids in prompt_ids])
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


def micro_batches(lengths: list[int], rows: list[int], token_budget: int, pass_cost: int = 256) -> list[list[int]]:
    """Split `rows` into micro-batches whose padded size (rows × longest) fits `token_budget`, with as
    little padding as possible.

    Sorted by length, the best micro-batches are runs of neighbours, and a run's padded size is its row
    count times its last row's length; dynamic programming picks the runs that minimise the padded
    tokens plus `pass_cost` tokens per forward pass (a pass has a fixed cost, so one row per pass, which
    has no padding at all, is not the cheapest). A row longer than the budget gets a pass of its own.
    """
    ordered = sorted(rows, key=lambda r: lengths[r])
    n = len(ordered)
    cost, start_of = [0.0] + [math.inf] * n, [0] * (n + 1)  # best cost of the first j rows; where its last run starts
    for j in range(1, n + 1):
        longest = lengths[ordered[j - 1]]
        for i in range(j - 1, -1, -1):
            padded = (j - i) * longest
            if padded > token_budget and j - i > 1:
                break
            if cost[i] + padded + pass_cost < cost[j]:
                cost[j], start_of[j] = cost[i] + padded + pass_cost, i
    groups, j = [], n
    while j:
        groups.append(ordered[start_of[j] : j])
        j = start_of[j]
    return groups[::-1]


# Response positions whose log-probs are computed at once: a float32 copy of this many rows of logits
# (x the vocabulary) is the largest temporary; 1,024 x Qwen2.5's 152,064 tokens is 0.6 GB.
LOGPROB_CHUNK = 1024


def response_logprobs(model, batch: RolloutBatch, temperature: float = 1.0, with_entropy: bool = False):
    """Log-prob of each response token (B, T) under `model`, and the entropy of each token's
    distribution (B, T) if asked (without gradient: it is only logged), with logits divided by
    `temperature` as the sampler divides them. Padding positions hold 0.

    The model's logits (in its own dtype) and, in backward, their gradient are the only full-vocabulary
    tensors: `_ChunkedLogprobs` reads the logits `LOGPROB_CHUNK` response positions at a time in float32,
    and its backward writes each chunk's gradient into the one gradient buffer, so memory does not grow
    with a float32 (tokens x vocabulary) copy.
    """
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
    rows, columns = batch.response_mask.bool().nonzero(as_tuple=True)
    positions = batch.prompt_lengths[rows] - 1 + columns  # the logits at t - 1 predict response token t
    tokens = batch.input_ids[rows, positions + 1]
    logprobs, entropy = _ChunkedLogprobs.apply(logits, rows, positions, tokens, temperature, with_entropy)
    shape = batch.response_mask.shape
    logprobs = torch.zeros(shape, dtype=logprobs.dtype, device=logits.device).index_put((rows, columns), logprobs)
    if not with_entropy:
        return logprobs
    return logprobs, torch.zeros(shape, dtype=entropy.dtype, device=logits.device).index_put((rows, columns), entropy)


class _ChunkedLogprobs(torch.autograd.Function):
    """log softmax(logits[r, p] / T)[token] at the given (row, position, token) entries, and the entropy
    there, `LOGPROB_CHUNK` entries at a time. d log p / d z = (onehot(token) - softmax(z)) / T.
    In place where it can be: a chunk's largest moment is two float32 (chunk x vocabulary) copies."""

    @staticmethod
    def forward(ctx, logits, rows, positions, tokens, temperature, with_entropy):
        logprobs = torch.empty(len(rows), dtype=torch.float32, device=logits.device)
        entropy = torch.empty(len(rows) if with_entropy else 0, dtype=torch.float32, device=logits.device)
        for chunk in _chunks(len(rows)):
            z = logits[rows[chunk], positions[chunk]].float().div_(temperature)  # (n, V)
            log_normalizer = torch.logsumexp(z, dim=-1)
            logprobs[chunk] = z.gather(-1, tokens[chunk].unsqueeze(-1)).squeeze(-1) - log_normalizer
            if with_entropy:
                probs = (z - log_normalizer.unsqueeze(-1)).exp_()
                entropy[chunk] = log_normalizer - probs.mul_(z).sum(-1)
                del probs
            del z  # before the next chunk's copy is made
        ctx.save_for_backward(logits, rows, positions, tokens)
        ctx.temperature = temperature
        ctx.mark_non_differentiable(entropy)
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        logits, rows, positions, tokens = ctx.saved_tensors
        grad = torch.zeros_like(logits)
        for chunk in _chunks(len(rows)):
            upstream = grad_logprobs[chunk].unsqueeze(-1)
            g = logits[rows[chunk], positions[chunk]].float().div_(ctx.temperature).softmax(-1)
            g.mul_(-upstream).scatter_add_(-1, tokens[chunk].unsqueeze(-1), upstream).div_(ctx.temperature)
            grad[rows[chunk], positions[chunk]] = g.to(grad.dtype)
            del g  # before the next chunk's copy is made
        return grad, None, None, None, None, None


def _chunks(n: int) -> list[slice]:
    return [slice(start, min(n, start + LOGPROB_CHUNK)) for start in range(0, n, LOGPROB_CHUNK)]
