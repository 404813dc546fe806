"""One process or many (torchrun): which rank this is, the device it uses, and the collectives.

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; without them this is a single process and every
helper here is a no-op. Backend: nccl on CUDA, gloo on CPU.
"""
import dataclasses
import datetime
import os

import torch
import torch.distributed as dist


@dataclasses.dataclass
class Processes:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def main(self):
        return self.rank == 0

    @property
    def distributed(self):
        return self.world_size > 1


def from_env():
    """The process group this process belongs to, as torchrun describes it (not yet joined)."""
    env = os.environ
    if "RANK" not in env:
        return Processes()
    return Processes(int(env["RANK"]), int(env.get("LOCAL_RANK", 0)), int(env["WORLD_SIZE"]))


def pick_device(requested, procs):
    """The torch.device this process trains on; ValueError for one it cannot use."""
    name = requested or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name}: expected cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: CUDA is not available here; use --device cpu")
        if procs.distributed:  # one GPU per process
            device = torch.device("cuda", procs.local_rank)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise ValueError(f"--device {name}: expected cpu, cuda or cuda:N")
    return device


def join(procs, device, timeout_s=300):
    """Join the process group. A collective that waits more than timeout_s seconds for another
    rank (stopped, stuck) fails instead of blocking for gloo's and nccl's default of 30 minutes."""
    if procs.distributed:
        if not dist.is_available():
            raise RuntimeError("torch.distributed is not available in this PyTorch build")
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=timeout_s))


def leave(procs):
    if procs.distributed and dist.is_initialized():
        dist.destroy_process_group()


def mean_over_ranks(value, procs):
    """value (a 0-d tensor) averaged over all processes (gloo has no AVG, so SUM / world)."""
    if procs.distributed:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= procs.world_size
    return value


def sum_over_ranks(numbers, procs, device):
    """A list of numbers summed elementwise over all processes."""
    if not procs.distributed:
        return list(numbers)
    t = torch.tensor(numbers, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def gather(obj, procs):
    """Every process's obj, in rank order (a one-element list on a single process)."""
    if not procs.distributed:
        return [obj]
    out = [None] * procs.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(procs):
    if procs.distributed:
        dist.barrier()
