"""Per-GPU memory of a `vapo.py --scale paper --backend vllm` run, on paper: the policy's and the critic's
sharded training states, the activations of one micro-batch, the log-prob chunks, and the colocated vLLM
engine's weights and KV cache, awake and asleep; the smallest GPU count that fits; and the settings to use.

    python benchmarks/memory_plan.py qwen2.5-32b                     # smallest whole nodes of 8 x 80 GB
    python benchmarks/memory_plan.py qwen2.5-7b --gpus 8 --json plan.json
    python benchmarks/memory_plan.py path/to/config.json --gpus 16 --micro-batch-tokens 32768
    python benchmarks/memory_plan.py --check-on-cpu                  # predicted vs measured peak, small shapes

MODEL_OR_CONFIG is a shape name (qwen2.5-0.5b, -1.5b, -7b, -32b: the sizes in their config.json) or a
Qwen2 config.json / model directory; nothing is downloaded. The critic is the same backbone with a value
head (`common.models.load_value_model`). Every term below is a small function of the shape that says what
it counts. The run modelled: accelerate FSDP2 full sharding with bf16 mixed precision (configs/fsdp.yaml),
gradient checkpointing per decoder layer, micro-batches cut by a token budget, log-probs by the project's
`common.sampling.response_logprobs` (the model's logits and one gradient buffer of their size, both over
every position of the micro-batch, read in fp32 chunks of `LOGPROB_CHUNK` response positions), and vLLM
colocated in the training processes (tensor-parallel groups of the training ranks, sleep mode level 2
while training; the training states stay on the GPU while it generates). The per-GPU peak is the larger
of the training phase and the generation phase; a GPU's usable memory is 0.9 of it (CUDA context, NCCL
and allocator fragmentation take the rest).

`--check-on-cpu` runs one training micro-batch (policy forward with gradient checkpointing,
`response_logprobs` on a collated `RolloutBatch`, backward, AdamW step) at two small shapes with Qwen2.5's
vocabulary and one with a small vocabulary, in float32, each in a fresh process, and compares the peak
memory with this plan's prediction for the same dtype (benchmarks/results/memory_plan_cpu_check.json).
"""

from __future__ import annotations

import json
import math
import multiprocessing
import resource
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import tyro

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common.sampling import LOGPROB_CHUNK  # noqa: E402

GiB = 2**30


@dataclass
class Args:
    model: tyro.conf.Positional[str] = "qwen2.5-32b"
    """MODEL_OR_CONFIG: qwen2.5-0.5b, qwen2.5-1.5b, qwen2.5-7b, qwen2.5-32b, or a config.json / model directory."""
    gpus: int | None = None
    """GPUs of the run (all of them: FSDP shards over every GPU); default: the smallest whole nodes that fit."""
    gpu_gb: float = 80.0
    """memory of one GPU in GiB (A100 / H100 80 GB)."""
    dtype: Literal["bfloat16", "float32"] = "bfloat16"
    """compute dtype. bfloat16: configs/fsdp.yaml's mixed precision (fp32 master weights, bf16 compute);
    float32: everything in fp32 (a CPU run)."""
    micro_batch_tokens: int | None = None
    """vapo.py --micro-batch-tokens; default: the largest power of two that fits."""
    tensor_parallel_size: int | None = None
    """vapo.py --tensor-parallel-size; default: the smallest that holds a prompt's samples at full length."""
    gpu_memory_utilization: float | None = None
    """vapo.py --vllm-gpu-memory-utilization; default: all that the resident training states leave."""
    prompt_tokens: int = 2048
    """prompt length limit (DAPO-Math-17k prompts)."""
    response_tokens: int = 20480
    """vapo.py --max-new-tokens (VAPO paper scale: 20,480)."""
    prompts: int = 512
    samples: int = 16
    """rollout: prompts x samples sequences (VAPO §5.1: 512 x 16)."""
    json: str | None = None
    """also write the plan to this file."""
    check_on_cpu: bool = False
    """measure the peak memory of one training micro-batch at three small shapes and compare with the plan."""


# --------------------------------------------------------------------------------------------------
# Shapes
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """A Qwen2 decoder (q/k/v projections with biases, SwiGLU MLP, RMSNorm); field names as in config.json."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    tie_word_embeddings: bool

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


# from the config.json of Qwen/Qwen2.5-0.5B, -1.5B, -7B and -32B
SHAPES = {
    "qwen2.5-0.5b": Shape(896, 4864, 24, 14, 2, 151936, True),
    "qwen2.5-1.5b": Shape(1536, 8960, 28, 12, 2, 151936, True),
    "qwen2.5-7b": Shape(3584, 18944, 28, 28, 4, 152064, False),
    "qwen2.5-32b": Shape(5120, 27648, 64, 40, 8, 152064, False),
}


def load_shape(model: str) -> Shape:
    """A shape by name, or read from a config.json (or the one in a model directory)."""
    if model in SHAPES:
        return SHAPES[model]
    path = Path(model)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise SystemExit(f"{model!r} is neither a known shape ({', '.join(SHAPES)}) nor a config.json or model directory")
    config = json.loads(path.read_text())
    if config.get("model_type", "qwen2") != "qwen2":
        raise SystemExit(f"{path} is a {config['model_type']!r} model; the parameter count here is Qwen2's")
    return Shape(config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"],
                 config["num_attention_heads"], config.get("num_key_value_heads", config["num_attention_heads"]),
                 config["vocab_size"], config.get("tie_word_embeddings", False))  # Qwen2Config's default


# --------------------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------------------


def layer_params(s: Shape) -> int:
    """One decoder layer: q (with bias), k and v (with biases, num_key_value_heads heads each), o, the MLP's
    gate, up and down, and two RMSNorm weights."""
    h, kv = s.hidden_size, s.num_key_value_heads * s.head_dim
    return (h * h + h) + 2 * (h * kv + kv) + h * h + 3 * h * s.intermediate_size + 2 * h


def root_params(s: Shape, value_head: bool) -> int:
    """What is not in a decoder layer (FSDP's root unit): the embeddings, the final RMSNorm and the head,
    an lm_head (vocab x hidden, none when tied to the embeddings) or the critic's value head (hidden + bias)."""
    embeddings = s.vocab_size * s.hidden_size
    head = s.hidden_size + 1 if value_head else (0 if s.tie_word_embeddings else embeddings)
    return embeddings + s.hidden_size + head


def model_params(s: Shape, value_head: bool) -> int:
    """The policy (value_head=False) or the critic (value_head=True)."""
    return s.num_hidden_layers * layer_params(s) + root_params(s, value_head)


# --------------------------------------------------------------------------------------------------
# Training phase (the engine asleep); `b` is the compute dtype's bytes per element
# --------------------------------------------------------------------------------------------------


def training_states(params: int, gpus: int) -> float:
    """Weights, gradients and AdamW moments of one model, sharded over every GPU: 16 B per parameter. Under
    bf16 mixed precision accelerate upcasts the trainable parameters to fp32 master weights (4 B), whose
    gradients are fp32 (4 B), and AdamW keeps exp_avg and exp_avg_sq in fp32 (4 + 4 B); in float32 it is the
    same 4 + 4 + 8 B. The gradients live through the whole mini-batch (accumulated over micro-batches)."""
    return 16 * params / gpus


def fsdp_gathered(s: Shape, b: int) -> float:
    """FSDP2's unsharded copies, in the compute dtype, of the model being trained (the larger of the two):
    the root unit (embeddings, final norm, head), which stays gathered from forward to the end of backward,
    with its unsharded gradient, which is reduce-scattered only when backward ends; and two decoder layers
    (the one computing and the one prefetched) with one layer's unsharded gradient."""
    root = max(root_params(s, value_head=False), root_params(s, value_head=True))
    return (2 * root + 3 * layer_params(s)) * b


def rmsnorm_saved(b: int) -> float:
    """Hidden-sized tensors (in units of tokens x hidden x b) an RMSNorm keeps for backward: its input in
    fp32 (a copy in bf16, 4/b units; the input itself in float32), the normalised input, and the
    weighted output, which the next projection saves."""
    return 4 / b + 2


def checkpointed_inputs(s: Shape, tokens: int, b: int) -> float:
    """Gradient checkpointing per decoder layer keeps every layer's input (tokens x hidden x b), and the
    final RMSNorm, outside the checkpointed layers, keeps its own tensors for the head's backward."""
    return (s.num_hidden_layers + rmsnorm_saved(b)) * tokens * s.hidden_size * b


def layer_recompute(s: Shape, tokens: int, b: int) -> float:
    """One decoder layer's working set in backward: its forward recomputed with everything it saves, plus
    the gradients being formed. Hidden-sized (tokens x hidden x b): two RMSNorms (`rmsnorm_saved` each);
    attention's q, and k and v repeated to every head (transformers' SDPA path repeats them when a padding
    mask is given, which a packed micro-batch has), SDPA's output and its reshaped copy for o_proj (5); the
    gradients entering and leaving the layer (2). Intermediate-sized (tokens x intermediate x b): the MLP's
    gate output, SiLU(gate), up output and their product (4), and the two gradients of that product (2).
    SDPA with flash/memory-efficient kernels saves no tokens x tokens matrix."""
    hidden_sized = 2 * rmsnorm_saved(b) + 5 + 2
    return tokens * (hidden_sized * s.hidden_size + 6 * s.intermediate_size) * b


def logits_and_gradient(s: Shape, tokens: int, b: int) -> float:
    """The two full-vocabulary tensors of `response_logprobs`, each tokens x vocab in the compute dtype and
    over every position of the pass (prompts and padding included, not only the response positions): the
    policy's logits, which `_ChunkedLogprobs` saves as they are (no copy) for its backward, and the one
    gradient buffer its backward allocates, `torch.zeros_like(logits)`, into which each chunk's gradient is
    written (no concatenation of chunk gradients)."""
    return 2 * tokens * s.vocab_size * b


def logprob_chunk(s: Shape, tokens: int, b: int, chunk: int = LOGPROB_CHUNK) -> float:
    """The chunks' largest moment beside the logits and their gradient buffer, in fp32 copies of a chunk
    (chunk response positions x vocab x 4 B), counted op by op in `_ChunkedLogprobs` (`tokens` bounds the
    response positions). Backward, per chunk: `logits[rows, positions]` gathers a copy in the logits' dtype
    (half a copy in bf16, freed once upcast; in float32 it is the fp32 copy itself), `.float().div_(T)`
    upcasts it (1), `.softmax(-1)` writes its output (1) while the upcast lives: 2 copies. The in-place mul_,
    scatter_add_ and div_ add none, `g.to(bf16)` for the buffer is half a copy beside `g` alone, and each
    chunk's copies are released (`del`) before the next chunk's are made. In bf16 and float32 alike. The
    forward holds at most a chunk's z and probs (2 copies, and the gather's half copy in bf16) but no
    gradient buffer yet, so the backward is the peak."""
    copies = 2
    return copies * min(chunk, tokens) * s.vocab_size * 4


def activation_peak(s: Shape, tokens: int, b: int, chunk: int = LOGPROB_CHUNK) -> dict:
    """The policy's activations at their peak, term by term. The policy's and the critic's forward/backward
    never overlap, and the critic (a 1-output head) has the policy's checkpoints and recompute without the
    logits, so the policy's peak is the run's. Within it, the log-prob backward (logits, their gradient
    buffer, the chunks' copies) comes first and the layer recomputes after it, once the logits and the
    buffer are freed (the lm_head's backward consumes the buffer): the larger counts."""
    logprob = logits_and_gradient(s, tokens, b) + logprob_chunk(s, tokens, b, chunk)
    recompute = layer_recompute(s, tokens, b)
    return {"checkpointed_inputs": checkpointed_inputs(s, tokens, b),
            "logits_and_gradient": logits_and_gradient(s, tokens, b),
            "logprob_chunk": logprob_chunk(s, tokens, b, chunk),
            "layer_recompute": recompute,
            "peak": checkpointed_inputs(s, tokens, b) + max(logprob, recompute),
            "binding": "logprob" if logprob >= recompute else "layer_recompute"}


def rollout_tensors(rows: int, length: int) -> float:
    """This GPU's share of the rollout, padded to the longest sequence: input_ids and attention_mask (int64,
    8 + 8 B), response_mask, old log-probs, old values, advantages and returns (fp32, 5 x 4 B): 36 B a position."""
    return 36 * rows * length


# --------------------------------------------------------------------------------------------------
# Generation phase (the engine awake)
# --------------------------------------------------------------------------------------------------

VLLM_ASLEEP = 2.5 * GiB
"""What sleep mode level 2 keeps per GPU: CUDA graphs' memory pool, NCCL buffers and allocator state
(NeMo-RL measured 0.8 GB asleep at tensor parallel 1 and 2.4 GB at 2, NVIDIA-NeMo/RL issue 223)."""
VLLM_MAX_NUM_BATCHED_TOKENS, VLLM_MAX_NUM_SEQS = 16384, 1024
"""vLLM's defaults for the `LLM` class on 80 GB H100-class GPUs (EngineArgs.get_batch_defaults)."""


def resident_states(params: int, gpus: int) -> float:
    """Training states that stay on the GPU while it generates: fp32 weights and AdamW's two moments,
    12 B per parameter over every GPU (the gradients are freed by zero_grad(set_to_none=True) after each
    optimizer step)."""
    return 12 * params / gpus


def engine_weights(params: int, tp: int, b: int) -> float:
    """The policy's weights in the engine, split over its tensor-parallel group."""
    return params * b / tp


def engine_workspace(s: Shape, tp: int, b: int) -> float:
    """What vLLM's profiling run reserves beside weights and KV cache: a forward of max_num_batched_tokens
    tokens (the MLP's gate/up output and activation, 3 x intermediate / TP, and about 4 hidden-sized
    tensors, in the compute dtype) and the sampler's fp32 logits and probabilities over max_num_seqs
    sequences."""
    forward = VLLM_MAX_NUM_BATCHED_TOKENS * (3 * s.intermediate_size / tp + 4 * s.hidden_size) * b
    return forward + VLLM_MAX_NUM_SEQS * s.vocab_size * 4 * 2


def kv_bytes_per_token(s: Shape, tp: int, b: int) -> float:
    """KV cache per token on one GPU: K and V for every layer and this GPU's key-value heads (vLLM splits
    them over the group and replicates them when TP exceeds their number)."""
    return 2 * s.num_hidden_layers * math.ceil(s.num_key_value_heads / tp) * s.head_dim * b


# --------------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------------

USABLE_FRACTION = 0.9
"""of a GPU's memory: the CUDA context, NCCL and the caching allocator's fragmentation take the rest."""


def training_phase(s: Shape, gpus: int, tokens: int, b: int, rows: int, length: int) -> dict:
    """Per-GPU bytes while training, engine asleep. `tokens` is the largest pass: the micro-batch budget,
    or the longest sequence when it is longer (a row over the budget gets a pass of its own)."""
    act = activation_peak(s, tokens, b)
    terms = {"policy_states": training_states(model_params(s, False), gpus),
             "critic_states": training_states(model_params(s, True), gpus),
             "fsdp_gathered": fsdp_gathered(s, b),
             **{k: act[k] for k in ("checkpointed_inputs", "logits_and_gradient", "logprob_chunk", "layer_recompute")},
             "rollout_tensors": rollout_tensors(math.ceil(rows / gpus), length),
             "vllm_asleep": VLLM_ASLEEP}
    not_at_peak = ("layer_recompute",) if act["binding"] == "logprob" else ("logits_and_gradient", "logprob_chunk")
    return {"terms": terms, "not_at_peak": list(not_at_peak),
            "peak": sum(v for k, v in terms.items() if k not in not_at_peak)}


def generation_phase(s: Shape, gpus: int, tp: int, utilization: float, gpu_bytes: float, b: int) -> dict:
    """Per-GPU bytes while generating, engine awake: the resident training states beside the engine's
    whole share, gpu_memory_utilization x GPU memory, of which the KV cache is what weights, workspace
    and the graphs/NCCL residue leave."""
    engine = utilization * gpu_bytes
    terms = {"policy_states": resident_states(model_params(s, False), gpus),
             "critic_states": resident_states(model_params(s, True), gpus),
             "vllm_weights": engine_weights(model_params(s, False), tp, b),
             "vllm_workspace": engine_workspace(s, tp, b),
             "vllm_asleep": VLLM_ASLEEP}
    terms["vllm_kv_cache"] = engine - terms["vllm_weights"] - terms["vllm_workspace"] - VLLM_ASLEEP
    kv_tokens = max(0, int(terms["vllm_kv_cache"] // kv_bytes_per_token(s, tp, b)))
    return {"terms": terms, "peak": terms["policy_states"] + terms["critic_states"] + engine, "kv_tokens": kv_tokens}


def tp_shards_heads(s: Shape, tp: int) -> bool:
    """Whether vLLM can split the model over `tp` GPUs: the size must divide the attention heads (40 at
    32B, 28 at 7B, 12 at 1.5B; vLLM's ModelConfig checks it) and divide the key-value heads or be a multiple
    of their number (they are split, or replicated when TP exceeds them)."""
    kv = s.num_key_value_heads
    return s.num_attention_heads % tp == 0 and (kv % tp == 0 if tp <= kv else tp % kv == 0)


def tp_choices(s: Shape, gpus: int) -> list[int]:
    """Tensor-parallel sizes vLLM can use here: within a node (1-8), dividing the GPU count (an engine is a
    group of consecutive ranks), and splitting the heads (`tp_shards_heads`)."""
    return [tp for tp in (1, 2, 4, 8) if gpus % tp == 0 and tp_shards_heads(s, tp)]


def plan(s: Shape, gpus: int, args: Args) -> dict:
    """Every term at `gpus` GPUs with the settings of `args`, those not given chosen to fit: the largest
    power-of-two micro-batch, all the memory the resident states leave to vLLM, and the smallest tensor
    parallel size whose KV cache holds one prompt's samples at full length (else one sequence)."""
    b = 2 if args.dtype == "bfloat16" else 4
    usable, gpu_bytes = USABLE_FRACTION * args.gpu_gb * GiB, args.gpu_gb * GiB
    length, rows = args.prompt_tokens + args.response_tokens, args.prompts * args.samples

    def train(budget: int) -> dict:
        return training_phase(s, gpus, max(budget, length), b, rows, length)

    fitting = [2**k for k in range(10, 21) if train(2**k)["peak"] <= usable]
    tokens = args.micro_batch_tokens or (fitting[-1] if fitting else 2 ** int(math.log2(length)))
    resident = resident_states(model_params(s, False), gpus) + resident_states(model_params(s, True), gpus)
    utilization = args.gpu_memory_utilization or max(0.0, math.floor(100 * (usable - resident) / gpu_bytes) / 100)
    if args.tensor_parallel_size:
        tp = args.tensor_parallel_size
    else:
        choices = tp_choices(s, gpus) or [1]
        generating = {tp: generation_phase(s, gpus, tp, utilization, gpu_bytes, b)["kv_tokens"] for tp in choices}
        tp = next((tp for tp in choices if generating[tp] >= args.samples * length),
                  next((tp for tp in choices if generating[tp] >= length), choices[-1]))
    training, generation = train(tokens), generation_phase(s, gpus, tp, utilization, gpu_bytes, b)
    sequences = generation["kv_tokens"] // length
    per_engine = math.ceil(rows / max(1, gpus // tp))
    return {
        "gpus": gpus, "gpu_gb": args.gpu_gb, "usable_gib": usable / GiB, "dtype": args.dtype,
        "micro_batch_tokens": tokens, "largest_pass_tokens": max(tokens, length), "tensor_parallel_size": tp,
        "gpu_memory_utilization": utilization, "max_model_len": length,
        "training": training, "generation": generation,
        "fits": bool(training["peak"] <= usable and generation["peak"] <= usable and sequences >= 1
                     and tp in tp_choices(s, gpus)),
        "kv_sequences_per_engine": sequences, "rollout_sequences_per_engine": per_engine,
        "waves_at_full_length": math.ceil(per_engine / sequences) if sequences else None,
    }


def smallest_gpus(s: Shape, args: Args, step: int, limit: int = 4096) -> dict | None:
    """The plan at the smallest GPU count that fits: a multiple of `step` (8: whole nodes) that divides the
    rollout's prompts, since every process samples an equal share of them (vapo.py refuses other counts;
    its mini-batch of 512 has the same divisors as the paper's 512 prompts)."""
    counts = (gpus for gpus in range(step, limit + 1, step) if args.prompts % gpus == 0)
    return next((p for gpus in counts if (p := plan(s, gpus, args))["fits"]), None)


# --------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------

LABELS = {
    "policy_states": "policy: fp32 weights+AdamW (+grads training)",
    "critic_states": "critic: fp32 weights+AdamW (+grads training)",
    "fsdp_gathered": "FSDP all-gathered units and their grads",
    "checkpointed_inputs": "checkpointed layer inputs, final norm",
    "logits_and_gradient": "logits and their gradient",
    "logprob_chunk": "log-prob chunks' fp32 copies, in backward",
    "layer_recompute": "one layer's recompute in backward",
    "rollout_tensors": "rollout tensors (this GPU's rows)",
    "vllm_weights": "vLLM weights / TP",
    "vllm_kv_cache": "vLLM KV cache",
    "vllm_workspace": "vLLM workspace (profiled activations)",
    "vllm_asleep": "vLLM graphs, NCCL (kept asleep)",
}


def table(name: str, p: dict) -> str:
    """The terms of one plan, per GPU, training (engine asleep) beside generation (engine awake)."""
    train, gen = p["training"], p["generation"]
    lines = [f"{name} on {p['gpus']} x {p['gpu_gb']:g} GiB ({p['usable_gib']:.1f} usable), {p['dtype']}, "
             f"--micro-batch-tokens {p['micro_batch_tokens']} (largest pass {p['largest_pass_tokens']}), "
             f"--tensor-parallel-size {p['tensor_parallel_size']}, "
             f"--vllm-gpu-memory-utilization {p['gpu_memory_utilization']:.2f}",
             f"{'GiB per GPU':<46}{'training':>10}{'generating':>12}"]
    for key, label in LABELS.items():
        t, g = train["terms"].get(key), gen["terms"].get(key)
        cell = "" if t is None else (f"({t / GiB:.1f})" if key in train["not_at_peak"] else f"{t / GiB:.1f}")
        lines.append(f"{label:<46}{cell:>10}{'' if g is None else f'{g / GiB:.1f}':>12}")
    lines.append(f"{'peak':<46}{train['peak'] / GiB:>10.1f}{gen['peak'] / GiB:>12.1f}")
    lines.append("(in parentheses: not at the peak; the log-prob backward and the layer recomputes come one after the other)")
    lines.append(f"fits: {'yes' if p['fits'] else 'no'}; KV cache {gen['kv_tokens']:,} tokens per engine = "
                 f"{p['kv_sequences_per_engine']} sequences of {p['max_model_len']:,}; "
                 f"{p['rollout_sequences_per_engine']} rollout sequences per engine"
                 + (f", {p['waves_at_full_length']} waves if all ran to full length" if p["waves_at_full_length"] else ""))
    return "\n".join(lines)


def gib(p: dict) -> dict:
    """A plan with its byte counts in GiB, for JSON."""
    out = dict(p)
    for phase in ("training", "generation"):
        out[phase] = {**p[phase], "terms": {k: round(v / GiB, 3) for k, v in p[phase]["terms"].items()},
                      "peak_gib": round(p[phase]["peak"] / GiB, 3)}
        del out[phase]["peak"]
    return out


def main(args: Args) -> dict:
    if args.check_on_cpu:
        return check_on_cpu()
    s = load_shape(args.model)
    tp = args.tensor_parallel_size
    if tp and not tp_shards_heads(s, tp):
        raise SystemExit(f"--tensor-parallel-size {tp} cannot split {s.num_attention_heads} attention heads and "
                         f"{s.num_key_value_heads} key-value heads; vLLM accepts "
                         f"{[t for t in (1, 2, 4, 8) if tp_shards_heads(s, t)]} within a node")
    path = Path(args.model).resolve()
    name = args.model if args.model in SHAPES else (path.parent.name if path.name == "config.json" else path.name)
    nodes, any_count = smallest_gpus(s, args, 8), smallest_gpus(s, args, 1)
    shown = plan(s, args.gpus, args) if args.gpus else nodes
    policy, critic = model_params(s, False), model_params(s, True)
    print(f"{name}: policy {policy / 1e9:.2f}B parameters, critic {critic / 1e9:.2f}B; rollout {args.prompts} x "
          f"{args.samples}, sequences up to {args.prompt_tokens:,} + {args.response_tokens:,} tokens")
    if shown is None:
        print(f"does not fit on any number of {args.gpu_gb:g} GiB GPUs up to 4096")
    else:
        print(table(name, shown))
    for label, p in (("smallest whole nodes", nodes), ("smallest GPU count", any_count)):
        if p:
            print(f"{label}: {p['gpus']} GPU{'s' if p['gpus'] > 1 else ''}: --micro-batch-tokens {p['micro_batch_tokens']} --tensor-parallel-size "
                  f"{p['tensor_parallel_size']} --vllm-gpu-memory-utilization {p['gpu_memory_utilization']:.2f} "
                  f"(peak {p['training']['peak'] / GiB:.1f} GiB training, {p['generation']['peak'] / GiB:.1f} generating)")
    report = {"model": name, "shape": asdict(s), "policy_params": policy, "critic_params": critic,
              "rollout": [args.prompts, args.samples], "plan": gib(shown) if shown else None,
              "smallest_whole_nodes": gib(nodes) if nodes else None,
              "smallest_gpus": gib(any_count) if any_count else None}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    return report


# --------------------------------------------------------------------------------------------------
# The check against measurement, on the CPU
# --------------------------------------------------------------------------------------------------

# Two small shapes with Qwen2.5's vocabulary, where the logits bind as they do at every Qwen2.5 size, and
# one with a small vocabulary, where the decoder layers' checkpoints and recompute bind. Each row is a
# 64-token prompt and its response; the last row is 64 tokens shorter, so it ends in padding as a packed
# micro-batch's rows do (transformers then passes a padding mask to SDPA). The measuring process sets
# `common.sampling.LOGPROB_CHUNK` to `chunk` (256), so that a micro-batch's response positions span several
# chunks as a paper-scale one's span many of 1,024; the plan is told the same chunk.
CPU_CHECK = [
    dict(shape=Shape(256, 1024, 4, 4, 2, 151936, True), rows=2, length=512, chunk=256),
    dict(shape=Shape(512, 2048, 8, 8, 2, 151936, True), rows=4, length=512, chunk=256),
    dict(shape=Shape(1024, 4096, 6, 8, 2, 4096, True), rows=4, length=512, chunk=256),
]
CPU_CHECK_PROMPT, CPU_CHECK_SHORTER = 64, 64
# glibc keeps freed blocks below its dynamic mmap threshold (up to 32 MiB) in its heap, so the memory of
# the first step's freed activations stays resident; with every block of 64 KiB or more mmapped, resident
# memory follows the live tensors, as torch.cuda.max_memory_allocated does on a GPU.
ALLOCATORS = {"glibc default": {}, "mmap from 64 KiB": {"MALLOC_MMAP_THRESHOLD_": "65536"}}


def check_batch(vocab_size: int, rows: int, length: int):
    """A `RolloutBatch` of `rows` random sequences of `length` tokens, each a `CPU_CHECK_PROMPT`-token
    prompt and its response, the last row `CPU_CHECK_SHORTER` tokens shorter (padded by `collate`): rows x
    length positions, as `response_logprobs` gets a micro-batch."""
    import torch

    from common.sampling import Sample, collate

    ids = torch.randint(vocab_size, (rows, length)).tolist()
    lengths = [length] * (rows - 1) + [length - CPU_CHECK_SHORTER]
    samples = [Sample(row, ids[row][:CPU_CHECK_PROMPT], ids[row][CPU_CHECK_PROMPT:n], "", "length")
               for row, n in enumerate(lengths)]
    return collate(samples, pad_id=0)


def measure_step(s: Shape, rows: int, length: int, chunk: int) -> dict:
    """In a fresh process: build the policy from the shape (float32), then run a training micro-batch twice
    (forward with gradient checkpointing and `common.sampling.response_logprobs` with entropy, as vapo.py's
    actor update calls it, in chunks of `chunk` response positions; backward; AdamW step); the second, with
    the gradients and AdamW's moments resident as in every micro-batch after a run's first, is measured.
    Returns the process's resident memory (bytes) before the model, before the measured step and at peak."""
    import psutil
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    import common.sampling

    common.sampling.LOGPROB_CHUNK = chunk  # read by _ChunkedLogprobs at every call
    process = psutil.Process()
    before_model = process.memory_info().rss
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(Qwen2Config(**asdict(s), use_cache=False), dtype=torch.float32)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    batch = check_batch(s.vocab_size, rows, length)
    assert batch.input_ids.shape == (rows, length)
    mask = batch.response_mask

    def step():
        logprobs, _ = common.sampling.response_logprobs(model, batch, temperature=1.0, with_entropy=True)
        (-(logprobs * mask).sum() / mask.sum()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)  # gradients stay allocated, as while accumulating a mini-batch

    step()
    warm_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    before_step = process.memory_info().rss
    step()
    return {"params": sum(p.numel() for p in model.parameters()), "before_model": before_model,
            "before_step": before_step, "warm_peak": warm_peak,
            "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "response_positions": int(mask.sum())}


def _measure_in_child(queue, s: Shape, rows: int, length: int, chunk: int) -> None:
    queue.put(measure_step(s, rows, length, chunk))


def measure_in_fresh_process(case: dict, environment: dict) -> dict:
    """`measure_step` in a new interpreter started with `environment` added to this one's."""
    import os

    context, saved = multiprocessing.get_context("spawn"), dict(os.environ)
    os.environ.update(environment)
    try:
        queue = context.Queue()
        child = context.Process(target=_measure_in_child,
                                args=(queue, case["shape"], case["rows"], case["length"], case["chunk"]))
        child.start()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    measured = queue.get()
    child.join()
    return measured


def check_on_cpu() -> dict:
    """Predicted vs measured memory of one float32 training micro-batch on this CPU, for each CPU_CHECK
    shape and allocator setting: the states (16 B per parameter; measured as the memory gained from before
    the model was built to just before the measured step) and the activations (this plan's activation
    peak; measured as the peak minus the memory just before the step). Single process, no FSDP: nothing
    is all-gathered."""
    results = []
    for case in CPU_CHECK:
        s, tokens = case["shape"], case["rows"] * case["length"]
        act = activation_peak(s, tokens, 4, case["chunk"])
        predicted = {"states": training_states(model_params(s, False), 1), "activations": act["peak"]}
        predicted["total"] = sum(predicted.values())
        for allocator, environment in ALLOCATORS.items():
            m = measure_in_fresh_process(case, environment)
            measured = {"states": m["before_step"] - m["before_model"], "activations": m["peak"] - m["before_step"]}
            measured["total"] = sum(measured.values())
            results.append({
                "shape": asdict(s), "rows": case["rows"], "length": case["length"], "tokens": tokens,
                "chunk": case["chunk"], "response_positions": m["response_positions"], "allocator": allocator,
                "params_counted": model_params(s, False), "params_built": m["params"],
                "predicted_terms_gib": {k: round(act[k] / GiB, 3) for k in
                                        ("checkpointed_inputs", "logits_and_gradient", "logprob_chunk", "layer_recompute")},
                "binding": act["binding"],
                **{f"{k}_gib": {"predicted": round(predicted[k] / GiB, 3), "measured": round(measured[k] / GiB, 3),
                                "relative_error": round(predicted[k] / measured[k] - 1, 3)} for k in predicted},
                "measured_step_set_the_peak": m["peak"] > m["warm_peak"],
            })
    print(f"{'shape':<20}{'tokens':>7}  {'allocator':<18}{'term':<13}{'predicted':>10}{'measured':>10}{'error':>8}  (GiB)")
    for r in results:
        name = f"h{r['shape']['hidden_size']} L{r['shape']['num_hidden_layers']} V{r['shape']['vocab_size']}"
        for k in ("states", "activations", "total"):
            c = r[f"{k}_gib"]
            print(f"{name:<20}{r['tokens']:>7}  {r['allocator']:<18}{k:<13}{c['predicted']:>10.3f}{c['measured']:>10.3f}"
                  f"{c['relative_error']:>+8.1%}")
    report = {"dtype": "float32", "cases": results}
    out = ROOT / "benchmarks" / "results" / "memory_plan_cpu_check.json"
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")
    return report


if __name__ == "__main__":
    main(tyro.cli(Args))
