"""Multi-process training under torchrun: process group, per-rank device, data sharding, reductions.

The training data is split so that a run with N processes sees the same global batches as a run with one:
each rank takes its contiguous slice of every global batch a single process would draw. DDP averages the
gradients of equal-sized slices, which is the gradient of the global batch's mean loss. Evaluation shards
each split without padding, so every sample is counted exactly once, and gathers the results in order.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import BatchSampler, Sampler

from lora_cls.errors import UserError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed() -> DistInfo:
    """Join the process group torchrun describes (env:// rendezvous); a no-op for a single process."""
    if not launched_by_torchrun():
        return DistInfo()
    if not dist.is_initialized():
        # gloo for CPU tensors, nccl for CUDA tensors: a run may keep its data on either.
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def current() -> DistInfo:
    if not (dist.is_available() and dist.is_initialized()):
        return DistInfo()
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def device_for(info: DistInfo, device: torch.device) -> torch.device:
    """One GPU per process: cuda → cuda:<local rank>."""
    if info.enabled and device.type == "cuda":
        if info.local_rank >= torch.cuda.device_count():
            raise UserError(f"local rank {info.local_rank} has no GPU ({torch.cuda.device_count()} visible); "
                            "use --nproc_per_node <= the number of GPUs")
        torch.cuda.set_device(info.local_rank)
        return torch.device("cuda", info.local_rank)
    return device


def per_rank_batch(batch_size: int, info: DistInfo) -> int:
    if batch_size % info.world_size:
        raise UserError(f"trainer.batch_size={batch_size} (the global batch) must be divisible by the number of "
                        f"processes ({info.world_size})")
    return batch_size // info.world_size


class RankSliceBatchSampler(Sampler[list[int]]):
    """This rank's contiguous slice of each global batch of `batches` (a single process's batch sampler)."""

    def __init__(self, batches: BatchSampler, info: DistInfo) -> None:
        self.batches, self.info = batches, info

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.batches:
            size = -(-len(batch) // self.info.world_size)
            part = batch[self.info.rank * size:(self.info.rank + 1) * size]
            yield part if part else batch[-1:]  # never empty: DDP needs every rank to step together

    def __len__(self) -> int:
        return len(self.batches)


def shard(n: int, info: DistInfo) -> range:
    """Contiguous, unpadded shard of range(n) for this rank (sizes differ by at most one)."""
    start = n * info.rank // info.world_size
    return range(start, n * (info.rank + 1) // info.world_size)


def gather_arrays(arrays: Sequence[np.ndarray], info: DistInfo) -> list[np.ndarray]:
    """Concatenate each array over ranks, in rank order (with `shard`, the original sample order)."""
    if not info.enabled:
        return list(arrays)
    gathered: list = [None] * info.world_size
    dist.all_gather_object(gathered, [np.asarray(a) for a in arrays])
    return [np.concatenate([g[i] for g in gathered]) for i in range(len(arrays))]


def all_reduce_sum(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast(obj, info: DistInfo):
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
