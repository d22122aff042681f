"""A stand-in for a colocated vLLM engine, for multi-process tests on CPU.

It has the part of vLLM's API that `common.sampling.VLLMSampler` uses, and an engine's behaviour where
the trainer can get it wrong: it keeps its own copy of the weights, which change only through the weight
push (`collective_rpc("reload_weights", ...)`); sleeping at level 2 discards them (they become NaN, so
sampling from weights that were never pushed again fails loudly); it refuses to load weights or generate
while asleep; and in a tensor-parallel group it checks that every rank submitted the same requests, as a
real engine needs. Generation itself is transformers' `generate` on the copy.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from common.models import load_policy
from common.sampling import HFSampler


class SamplingParams:
    def __init__(self, **settings):
        self.settings = settings


class TokensPrompt(dict):
    pass


class Logprob:
    def __init__(self, logprob: float):
        self.logprob = logprob


class _Completion:
    def __init__(self, token_ids, logprobs):
        self.token_ids, self.logprobs = token_ids, logprobs


class _RequestOutput:
    def __init__(self, outputs):
        self.outputs = outputs


class LLM:
    def __init__(self, model: str, skip_tokenizer_init: bool, tensor_parallel_size: int = 1,
                 gpu_memory_utilization: float = 0.9, max_model_len: int | None = None,
                 enable_sleep_mode: bool = False, dtype: str = "float32", seed: int = 0,
                 distributed_executor_backend: str | None = None, **_):
        world = dist.get_world_size() if dist.is_initialized() else 1
        if world > 1 and distributed_executor_backend != "external_launcher":
            raise RuntimeError("several training processes need distributed_executor_backend='external_launcher'")
        if world % tensor_parallel_size:
            raise RuntimeError(f"tensor_parallel_size {tensor_parallel_size} does not divide {world} processes")
        self.group = None
        if tensor_parallel_size > 1:
            self.group, _ = dist.new_subgroups_by_enumeration(
                [list(range(first, first + tensor_parallel_size)) for first in range(0, world, tensor_parallel_size)])
        self.max_model_len, self.sleep_mode = max_model_len, enable_sleep_mode
        self.model, tokenizer = load_policy(model, dtype)
        self.model.requires_grad_(False)
        self.sampler = HFSampler(self.model, tokenizer)
        self.sampler.inside_stand_in_engine = True  # not one of the trainer's generations
        self.awake = {"weights": True, "kv_cache": True}
        self.events: list[str] = []  # what the trainer did to the engine, in order

    def sleep(self, level: int = 1) -> None:
        if not self.sleep_mode:
            raise RuntimeError("sleep() needs enable_sleep_mode=True")
        if level == 2:
            with torch.no_grad():
                for parameter in self.model.parameters():
                    parameter.fill_(float("nan"))
        self.awake = {"weights": False, "kv_cache": False}
        self.events.append(f"sleep{level}")

    def wake_up(self, tags: list[str] | None = None) -> None:
        for tag in tags or ["weights", "kv_cache"]:
            self.awake[tag] = True
        self.events.append("wake:" + ",".join(tags or ["all"]))

    def collective_rpc(self, method: str, kwargs: dict) -> None:
        if method != "reload_weights":  # the only call the sampler makes; any other is a change to catch
            raise RuntimeError(f"the stand-in engine answers collective_rpc('reload_weights') only, not {method!r}")
        if not self.awake["weights"]:
            raise RuntimeError("weights pushed into a sleeping engine")
        own = dict(self.model.named_parameters()) | dict(self.model.named_buffers())
        tied = getattr(self.model.config, "tie_word_embeddings", False)
        with torch.no_grad():
            for name, tensor in kwargs["weights_iterator"]:
                if name not in own:
                    if tied and name == "lm_head.weight":
                        continue
                    raise KeyError(f"the engine has no weight {name}")
                own[name].copy_(tensor)
        self.events.append("push")

    def reset_prefix_cache(self) -> None:
        self.events.append("reset_prefix_cache")

    def generate(self, prompts, params, use_tqdm: bool = False):
        if not all(self.awake.values()):
            raise RuntimeError(f"generate() on a sleeping engine ({self.awake})")
        if any(torch.isnan(p).any() for p in self.model.parameters()):
            raise RuntimeError("generate() with weights discarded by sleep and never pushed again")
        requests = [(list(p["prompt_token_ids"]), sorted(s.settings.items())) for p, s in zip(prompts, params)]
        if self.group is not None:
            every = [None] * dist.get_world_size(self.group)
            dist.all_gather_object(every, requests, group=self.group)
            if any(other != requests for other in every):
                raise RuntimeError("the ranks of a tensor-parallel engine submitted different requests")
        if self.max_model_len is not None:
            for ids, settings in requests:
                if len(ids) + dict(settings)["max_tokens"] > self.max_model_len:
                    raise ValueError(f"prompt + max_tokens exceed max_model_len {self.max_model_len}")
        outputs = []
        for prompt, param in zip(prompts, params):
            s = param.settings
            if s["seed"] is not None:
                torch.manual_seed(s["seed"])
            samples = self.sampler.generate([list(prompt["prompt_token_ids"])], n=s["n"], max_new_tokens=s["max_tokens"],
                                       temperature=s["temperature"], top_p=s["top_p"])
            outputs.append(_RequestOutput([
                _Completion(sample.response_ids, [{t: Logprob(lp)} for t, lp in zip(sample.response_ids, sample.logprobs)])
                for sample in samples]))
        self.events.append("generate")
        return outputs
