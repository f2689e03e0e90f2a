"""Process-group set-up from the environment (torchrun or SLURM) and the gradient-SUM hook.

Nothing is read at import time: :func:`init_distributed` is called by the trainer, so importing
``training`` in a test or a notebook never touches the environment or a process group.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def env_rank_world() -> tuple[int, int, int]:
    """(rank, world size, local rank): torchrun's variables first, then SLURM's, else (0, 1, 0)."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    return 0, 1, 0


def pick_device(preference: str, local_rank: int) -> torch.device:
    if preference == "cpu" or (preference == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but CUDA is not available")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def init_distributed(device_preference: str = "auto") -> DistInfo:
    """Join the job's process group (nccl on CUDA, gloo on CPU) when the world has >1 process.

    Under SLURM without torchrun, MASTER_ADDR must be exported by the batch script (the first
    host of ``scontrol show hostnames $SLURM_JOB_NODELIST``); MASTER_PORT defaults to 29500.
    """
    rank, world, local_rank = env_rank_world()
    device = pick_device(device_preference, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ:
            raise RuntimeError("a multi-process run needs MASTER_ADDR (torchrun sets it)")
        os.environ.setdefault("MASTER_PORT", "29500")
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=rank, world_size=world)
    return DistInfo(rank, world, local_rank, device)


def barrier(info: DistInfo) -> None:
    if info.distributed and dist.is_initialized():
        if info.device.type == "cuda":
            dist.barrier(device_ids=[info.device.index])
        else:
            dist.barrier()


def close_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def allreduce_sum_hook(process_group, bucket):
    """DDP comm hook that SUMS gradient buckets over ranks instead of averaging them.

    FaceRecognitionLoss returns the global-batch mean on every rank and each rank's backward
    already yields exactly its share of that mean's gradient, so the single-process gradient is
    the sum of the shares. DDP's default (mean) would shrink the backbone update by the world size.
    """
    group = process_group if process_group is not None else dist.group.WORLD
    fut = dist.all_reduce(bucket.buffer(), group=group, async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])
