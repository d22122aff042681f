"""One `vapo.py` step at a real model's shape: Qwen2.5-0.5B or -1.5B built from its config (random weights,
nothing downloaded), with the time of each phase and the peak memory.

    python benchmarks/real_size_step.py                       # 0.5B on a CPU: 4 prompts x 4 samples of 128 tokens
    python benchmarks/real_size_step.py --shape 1.5b --dtype bfloat16 --prompts 64 --samples 8 \\
        --max-new-tokens 2048 --micro-batch-tokens 32768 --backend vllm                       # on a GPU

The step is `vapo.py`'s own (`vapo.train --scale paper`, one rollout and its updates, no value pretraining):
a policy and a critic of that size with their AdamW states, gradient checkpointing, token-budget
micro-batches and a checkpoint at the end, so what fits here fits in a run with the same lengths. The
weights are random, so every response runs to --max-new-tokens (the longest case) and every reward is -1;
neither changes what a step costs. The model is built once into --out-dir, in its own process so that
building does not count in the peak memory.
"""

from __future__ import annotations

import json
import multiprocessing
import resource
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import tyro

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import vapo  # noqa: E402
from common.models import build_tiny_model  # noqa: E402
from common.tracking import read_metrics  # noqa: E402
from tasks.arithmetic import tiny_corpus  # noqa: E402

# the shapes in the config.json of Qwen/Qwen2.5-0.5B and Qwen/Qwen2.5-1.5B
SHAPES = {
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2),
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2),
}
QWEN25 = dict(vocab_size=151936, max_position_embeddings=32768, rope_theta=1_000_000.0, tie_word_embeddings=True)


@dataclass
class Args:
    shape: Literal["0.5b", "1.5b"] = "0.5b"
    dtype: str = "float32"
    """weights' dtype of the policy and the critic ("bfloat16" on a GPU)."""
    backend: Literal["hf", "vllm"] = "hf"
    prompts: int = 4
    samples: int = 4
    """samples per prompt; the step's rollout is prompts x samples, one mini-batch."""
    max_new_tokens: int = 128
    micro_batch_tokens: int = 2048
    """vapo.py's token budget of one forward/backward (bounds the (tokens x 151,936) logits)."""
    out_dir: str = "runs/benchmarks/real_size_step"


def build(model_dir: Path, shape: str) -> None:
    """The model directory, written under a temporary name and renamed when complete."""
    scratch = model_dir.with_name(model_dir.name + ".building")
    shutil.rmtree(scratch, ignore_errors=True)
    build_tiny_model(scratch, tiny_corpus(), config_overrides=SHAPES[shape] | QWEN25)
    scratch.rename(model_dir)


def main(args: Args) -> None:
    out = Path(args.out_dir)
    model_dir = out / f"qwen2.5-{args.shape}-shape"
    if not model_dir.exists():
        out.mkdir(parents=True, exist_ok=True)
        child = multiprocessing.get_context("spawn").Process(target=build, args=(model_dir, args.shape))
        child.start()
        child.join()
        if child.exitcode != 0:
            raise SystemExit(f"building the {args.shape} model into {model_dir} failed (exit code {child.exitcode})")
    run_dir = out / f"run-{args.shape}-{args.dtype}-{args.backend}"
    shutil.rmtree(run_dir, ignore_errors=True)
    rollout = args.prompts * args.samples
    start = time.perf_counter()
    vapo.train(vapo.parse_args([
        "--scale", "paper", "--model", str(model_dir), "--data", "synthetic-arithmetic",
        "--eval-data", "synthetic-arithmetic", "--run-dir", str(run_dir), "--dtype", args.dtype, "--backend", args.backend,
        "--total-steps", "1", "--value-pretrain-steps", "0", "--prompts-per-step", str(args.prompts),
        "--samples-per-prompt", str(args.samples), "--mini-batch-size", str(rollout),
        "--max-new-tokens", str(args.max_new_tokens), "--micro-batch-tokens", str(args.micro_batch_tokens),
        "--eval-prompts", "1", "--eval-samples", "1", "--log-samples", "0",
    ]))
    total = time.perf_counter() - start
    step = read_metrics(run_dir)[-1]
    report = {
        "shape": args.shape, "dtype": args.dtype, "backend": args.backend, "rollout": rollout,
        "max_new_tokens": args.max_new_tokens, "response_length_mean": step["response/length_mean"],
        "hidden_size": SHAPES[args.shape]["hidden_size"], "layers": SHAPES[args.shape]["num_hidden_layers"],
        **{k: round(v, 1) for k, v in step.items() if k.startswith("time/")},
        "padding_efficiency": round(step["perf/padding_efficiency"], 3),
        "tokens_per_s": round(step["perf/tokens_per_s"], 1),
        "whole_command_s": round(total, 1),  # loading, the two one-sample evaluations and the checkpoint included
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "peak_gpu_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None,
    }
    (run_dir / "report.json").write_text(json.dumps(report, indent=1))
    for key, value in report.items():
        print(f"{key:>22}: {value}")


if __name__ == "__main__":
    main(tyro.cli(Args))
