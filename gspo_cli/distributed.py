"""Data parallel over K ranks with PyTorch's own engine (torch.distributed + DDP); K = 1 is a no-op everywhere.

Ranks come from torchrun (`torchrun --nproc_per_node=K -m gspo_cli.cli train ...`, or `trainer.devices=K`, which
re-launches through it) or from SLURM tasks started by submitit (`hydra/launcher=slurm_8gpu`). Each rank samples
its own whole prompt groups, so group advantages never straddle ranks; DDP all-reduces (averages) gradients;
metrics are reduced across ranks before rank 0 logs them; only rank 0 writes logs and checkpoints.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Ranks:
    rank: int = 0
    world: int = 1
    local: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def world_size_from_env() -> int:
    if "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SUBMITIT_EXECUTOR" in os.environ:
        return int(os.environ["SLURM_NTASKS"])
    return 1


def rank_from_env() -> int:
    """This process's global rank before the process group exists: torchrun's RANK, or a SLURM task's id."""
    if "RANK" in os.environ:
        return int(os.environ["RANK"])
    return int(os.environ.get("SLURM_PROCID", "0")) if world_size_from_env() > 1 else 0


def setup() -> Ranks:
    """Join the process group when launched as several ranks (nccl on CUDA, gloo on CPU)."""
    if world_size_from_env() == 1:
        return Ranks()
    if "WORLD_SIZE" not in os.environ:  # a SLURM task from submitit: export RANK, WORLD_SIZE, MASTER_ADDR/PORT
        from submitit.helpers import TorchDistributedEnvironment
        TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return Ranks(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def teardown(r: Ranks) -> None:
    if r.world > 1 and dist.is_initialized():
        dist.destroy_process_group()


def total(t: torch.Tensor, r: Ranks) -> torch.Tensor:
    """A tensor summed over ranks (differentiable use not needed: statistics only)."""
    if r.world == 1:
        return t
    t = t.clone()
    dist.all_reduce(t)
    return t


def all_sum(x: float, r: Ranks, device) -> float:
    """A Python number summed over ranks."""
    return x if r.world == 1 else total(torch.tensor(float(x), dtype=torch.float64, device=device), r).item()


def any_rank(flag: bool, r: Ranks, device) -> bool:
    return all_sum(float(flag), r, device) > 0


def gather(t: torch.Tensor, r: Ranks) -> torch.Tensor:
    """Concatenate a (n, ...) tensor of equal shape on every rank, in rank order."""
    if r.world == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(r.world)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def gather_objects(obj, r: Ranks) -> list:
    if r.world == 1:
        return [obj]
    out = [None] * r.world
    dist.all_gather_object(out, obj)
    return out


MIN_KEYS, MAX_KEYS = {"ratio/min"}, {"ratio/max", "time/rollout", "time/update", "time/step", "time/generate",
                                     "time/weight_sync"}
SUM_KEYS = {"reward/verifier_errors", "tokens_per_s"}


def reduce_metrics(m: dict, r: Ranks, device) -> dict:
    """Every rank's metrics -> one dict: min/max for the ratio's range and timings, sums for counts and
    throughput, the mean of the ranks' values otherwise (ranks hold equal numbers of responses)."""
    if r.world == 1:
        return m
    keys = sorted(m)
    t = torch.tensor([float(m[k]) for k in keys], dtype=torch.float64, device=device)
    lo, hi, sums = t.clone(), t.clone(), total(t, r)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    return {k: (lo[i] if k in MIN_KEYS else hi[i] if k in MAX_KEYS else sums[i] if k in SUM_KEYS
                else sums[i] / r.world).item() for i, k in enumerate(keys)}
