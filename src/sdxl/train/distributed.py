"""Several training processes (torchrun): joining the process group, the decisions every rank takes
together, DDP / FSDP wrapping, and moving tensors in and out of FSDP shards.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from .config import TrainConfig


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False  # this run created the process group (and destroys it at the end)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup_distributed(cfg: TrainConfig) -> DistInfo:
    """Join the process group torchrun describes in the environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*).

    One process without those variables is an ordinary single-device run. The backend is nccl on GPUs and
    gloo on CPUs unless `dist.backend` says otherwise.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    want = cfg.train.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(want)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    info = DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device)
    if world_size > 1 and not dist.is_initialized():
        backend = cfg.dist.backend
        if backend == "auto":
            backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=cfg.dist.timeout))
        info.owns_group = True
    return info


def lost_contact(e: RuntimeError) -> bool:
    """A collective that failed because another process died (connection reset) or hung (timeout)."""
    text = str(e)
    words = ("gloo", "NCCL", "Connection reset", "Connection closed", "Timed out", "timed out")
    return isinstance(e, dist.DistError) or any(w in text for w in words)


def all_true(flag: bool, info: DistInfo) -> bool:
    """True only if `flag` is true on every process (the decision every rank must take together)."""
    if not info.distributed:
        return flag
    t = torch.tensor([0 if flag else 1], dtype=torch.int32,
                     device=info.device if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return int(t.item()) == 0


def any_true(flag: bool, info: DistInfo) -> bool:
    return not all_true(not flag, info)


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def ddp(module: nn.Module, info: DistInfo) -> nn.Module:
    """DistributedDataParallel around `module` (gradients all-reduced at each backward)."""
    device_ids = [info.device.index] if info.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids)


def shard_fsdp(module: nn.Module, units: list[nn.Module]) -> nn.Module:
    """FSDP2: shard each unit (a block of `module`), then the root (torch.distributed.fsdp.fully_shard)."""
    from torch.distributed.fsdp import fully_shard  # lazy: ~0.7 s of import, for FSDP runs only

    for sub in units:
        fully_shard(sub)
    fully_shard(module)
    return module


def full_tensor(t: Tensor) -> Tensor:
    """A plain tensor from a (possibly FSDP-sharded DTensor) parameter; a collective under FSDP."""
    gather = getattr(t, "full_tensor", None)
    return gather() if gather is not None else t


def assign_full(param: Tensor, value: Tensor) -> None:
    """Copy a full tensor into a parameter or EMA buffer that may be an FSDP shard."""
    with torch.no_grad():
        mesh = getattr(param, "device_mesh", None)
        if mesh is not None:
            from torch.distributed.tensor import distribute_tensor  # lazy: ~0.7 s of import, FSDP only

            value = distribute_tensor(value.to(param.device, param.dtype), mesh, param.placements)
        param.copy_(value.to(param.dtype))
