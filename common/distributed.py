"""What several processes need beyond one: the same number of passes on every rank, the policy's full
weights on every rank, and metrics over every rank's samples.

Under FSDP2 every forward of a model (with or without grad) all-gathers its parameters and every backward
reduce-scatters its gradients; under DDP every backward all-reduces. Each pass is a collective, so ranks
whose data differ (response lengths, search trees) must still run the same number of passes, or they wait
for each other forever. With one process every function here is the plain single-process computation.
"""

from __future__ import annotations

import hashlib
from typing import Iterator, Sequence

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_sharded(model) -> bool:
    """Whether `model` is an FSDP2 module (its forward is a collective of all ranks)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def unwrapped(model):
    """The module itself: DDP's wrapper removed (FSDP2 shards in place and adds no wrapper)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def largest(count: int, group=None) -> int:
    """The largest `count` of any rank (of `group`); `count` itself with one process."""
    if not is_distributed():
        return count
    value = torch.tensor([count], dtype=torch.long)
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=group)
    return int(value.item())


def sum_over_ranks(values: Sequence[float]) -> list[float]:
    """Each value summed over all ranks, in float64."""
    if not is_distributed():
        return [float(v) for v in values]
    total = torch.tensor([float(v) for v in values], dtype=torch.float64)
    dist.all_reduce(total)
    return total.tolist()


def gather_lists(items: list) -> list:
    """Every rank's `items`, concatenated in rank order (picklable objects)."""
    if not is_distributed():
        return list(items)
    gathered = [None] * world_size()
    dist.all_gather_object(gathered, list(items))
    return [item for part in gathered for item in part]


def split_to_count(groups: list[list[int]], count: int) -> list[list[int]]:
    """Split the largest groups in halves until there are `count` groups (verl's `same_micro_num_in_dp`):
    the rank with fewer micro-batches than another runs as many passes, each smaller. Groups keep their
    order; `count` must not exceed the number of rows."""
    groups = [list(g) for g in groups]
    if count > sum(len(g) for g in groups):
        raise ValueError(f"cannot make {count} non-empty micro-batches of {sum(len(g) for g in groups)} rows")
    while len(groups) < count:
        i = max(range(len(groups)), key=lambda k: len(groups[k]))
        half = (len(groups[i]) + 1) // 2
        groups[i : i + 1] = [groups[i][:half], groups[i][half:]]
    return groups


def equal_micro_batches(lengths: Sequence[int], rows: Sequence[int], token_budget: int) -> list[list[int]]:
    """Token-budget micro-batches of `rows` (`common.sampling.micro_batches`), as many on every rank: the
    count is the largest any rank needs, and ranks that need fewer split their largest micro-batches."""
    from common.sampling import micro_batches

    groups = micro_batches(lengths, list(rows), token_budget)
    return split_to_count(groups, largest(len(groups)))


def shard(items: Sequence, process_index: int | None = None, num_processes: int | None = None) -> list:
    """This process's share of `items`: every `num_processes`-th item from its index."""
    process_index = rank() if process_index is None else process_index
    num_processes = world_size() if num_processes is None else num_processes
    return list(items[process_index::num_processes])


def full_weights(model, dtype: torch.dtype | None = None) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """The model's full state, one group of (name, tensor) per decoder layer (and one for the rest), so
    that a weight push never holds more than a layer of full tensors.

    Under FSDP2 every entry is a shard (a DTensor) and `full_tensor()` all-gathers it: a collective, so
    every rank iterates, and every rank ends up with the full tensors (torch's full state dict would give
    them to rank 0 only). Names are the Hugging Face checkpoint names (vLLM's loaders expect them).
    """
    from torch.distributed.tensor import DTensor

    group, key = [], None
    for name, tensor in unwrapped(model).state_dict().items():
        tensor = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
        tensor = tensor.detach().to(dtype) if dtype is not None else tensor.detach()
        layer = _layer_of(name)
        if group and layer != key:
            yield group
            group = []
        group.append((name, tensor))
        key = layer
    if group:
        yield group


def _layer_of(name: str) -> str:
    parts = name.split(".")
    return ".".join(parts[: parts.index("layers") + 2]) if "layers" in parts else ""


def weights_fingerprint(named_tensors) -> str:
    """A hash of (name, bytes) of every tensor: two models' weights are equal iff their fingerprints are."""
    digest = hashlib.sha256()
    for name, tensor in sorted(named_tensors, key=lambda item: item[0]):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def prepare_frozen(accelerator, model):
    """A model that is only run forward (a reference policy): sharded like the trained ones under FSDP2
    (accelerate's `prepare` wants an optimizer beside every FSDP2 model), placed on the device otherwise.
    Under FSDP2 with `fsdp_cpu_ram_efficient_loading` only rank 0 loaded real weights; sharding broadcasts
    them, as for the trained models."""
    if accelerator.is_fsdp2:
        from accelerate.utils.fsdp_utils import fsdp2_prepare_model

        model = fsdp2_prepare_model(accelerator, model)
    else:
        model = accelerator.prepare_model(model, evaluation_mode=True)
    return model.requires_grad_(False).eval()


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                       across_ranks: bool = False) -> float:
    """1 - Var(R - V) / Var(R) over response tokens: 1 is a perfect critic, 0 no better than a constant
    (VC-PPO and VAPO stop value pretraining once it is good enough). NaN when every return is equal.

    `across_ranks` pools the tokens of every rank (from the sums of R, R², R - V, (R - V)² and the count,
    so that no rank's tokens need to travel)."""
    m = mask.bool()
    r, d = returns[m].double(), (returns[m] - values[m]).double()
    sums = [r.sum(), (r * r).sum(), d.sum(), (d * d).sum(), float(m.sum())]
    n_r, rr, n_d, dd, n = sum_over_ranks(sums) if across_ranks else [float(s) for s in sums]
    if n == 0:
        return float("nan")
    variance = rr / n - (n_r / n) ** 2
    if variance < 1e-8:
        return float("nan")
    return 1.0 - (dd / n - (n_d / n) ** 2) / variance
