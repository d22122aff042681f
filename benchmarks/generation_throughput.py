"""Generation throughput: the project's samplers against a plain `model.generate` call on the same batch.

    python benchmarks/generation_throughput.py                        # the warm-started tiny model, CPU
    python benchmarks/generation_throughput.py --model Qwen/Qwen2.5-1.5B --dtype bfloat16 --vllm   # on a GPU

`HFSampler` wraps `generate` with its own temperature/top-p processor that also records each sampled
token's log-prob; this checks that the wrapper costs (almost) nothing over the plain call with the same
sampling (top_k=0, top_p=1, T=1, the same prompts, samples and lengths). With `--vllm` (a GPU and
`requirements-gpu.txt`), `VLLMSampler` is timed on the same batch. Prints generated tokens per second,
the median of `--repeats` runs after one warm-up, and the ratio to the plain call.
"""

from __future__ import annotations

import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import vapo  # noqa: E402
from common.models import load_policy  # noqa: E402
from common.sampling import HFSampler, VLLMSampler, encode_prompt, end_token_ids  # noqa: E402


@dataclass
class Args:
    model: str = "tiny-arithmetic"
    dtype: str = "float32"
    prompts: int = 64
    samples_per_prompt: int = 8
    max_new_tokens: int = 96
    repeats: int = 3
    vllm: bool = False
    """also time the vLLM backend (GPU only)."""


def timed(generate) -> tuple[float, int]:
    start = time.perf_counter()
    tokens = generate()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start, tokens


def main(args: Args) -> None:
    model_path = vapo.resolve_model(args.model)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer = load_policy(model_path, args.dtype, False)
    model.to(device).eval()
    rows = vapo.load_prompts("synthetic-arithmetic", "test")[: args.prompts]
    prompts = [r["prompt"] for r in rows]
    n, batch = args.samples_per_prompt, args.prompts * args.samples_per_prompt

    def plain() -> int:
        ids = [encode_prompt(tokenizer, p) for p in prompts for _ in range(n)]
        width = max(map(len, ids))
        pad = tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids], device=device)
        attention_mask = (torch.arange(width).expand(len(ids), -1) >= torch.tensor([width - len(x) for x in ids])[:, None]).long().to(device)
        with torch.no_grad():
            out = model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=True, temperature=1.0,
                                 top_p=1.0, top_k=0, max_new_tokens=args.max_new_tokens, pad_token_id=pad,
                                 eos_token_id=end_token_ids(tokenizer, model.generation_config))
        generated = out[:, width:]
        # count tokens up to and including the first end token, as the samplers do
        ends = torch.isin(generated, torch.tensor(end_token_ids(tokenizer, model.generation_config), device=device))
        first_end = torch.where(ends.any(-1), ends.float().argmax(-1) + 1, torch.full_like(ends[:, 0], generated.shape[1], dtype=torch.long))
        return int(first_end.sum())

    sampler = HFSampler(model, tokenizer, batch_size=batch)

    def ours(s) -> int:
        return sum(len(x.response_ids) for x in s.generate(prompts, n=n, max_new_tokens=args.max_new_tokens,
                                                             temperature=1.0, top_p=1.0))

    backends = {"plain model.generate": plain, "HFSampler": lambda: ours(sampler)}
    if args.vllm:
        engine = VLLMSampler(model_path, tokenizer, dtype=args.dtype)
        backends["VLLMSampler"] = lambda: ours(engine)
    results = {}
    for name, generate in backends.items():
        generate()  # warm-up
        runs = [timed(generate) for _ in range(args.repeats)]
        results[name] = statistics.median(tokens / seconds for seconds, tokens in runs)
    reference = results["plain model.generate"]
    print(f"{args.model} on {device}, {args.prompts} prompts x {n} samples, up to {args.max_new_tokens} new tokens, "
          f"median of {args.repeats}")
    print("| backend | generated tokens/s | / plain generate |\n|---|---|---|")
    for name, rate in results.items():
        print(f"| {name} | {rate:,.0f} | {rate / reference:.2f} |")


if __name__ == "__main__":
    main(tyro.cli(Args))
