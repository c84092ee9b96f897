"""Data-parallel training over the processes ``torchrun`` starts (gloo on CPU, nccl on GPU).

``torchrun --nproc-per-node G -m fss.train ...`` sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; a
plain ``fss-train`` is a world of one process and touches no process group.
"""

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from fss.errors import SettingError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sum(self, values: np.ndarray) -> np.ndarray:
        """Element-wise sum over the processes (float64 or int64 arrays)."""
        if self.size == 1:
            return values
        tensor = torch.from_numpy(np.ascontiguousarray(values)).to(self.device)
        dist.all_reduce(tensor)
        return tensor.cpu().numpy()

    def sum_tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        """A detached copy summed over the processes."""
        tensor = tensor.detach().clone()
        if self.size > 1:
            dist.all_reduce(tensor)
        return tensor


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise SettingError("{device} cuda: no CUDA device is available")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    if name == "cpu":
        return torch.device("cpu")
    raise SettingError("{device} must be auto, cpu or cuda, got {name!r}", name=name)


def init_world(device: str = "auto") -> World:
    """This process's place in the world ``torchrun`` started (a world of one without torchrun)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    resolved = resolve_device(device, local_rank)
    if size > 1 and not dist.is_initialized():
        if resolved.type == "cuda":
            torch.cuda.set_device(resolved)
        dist.init_process_group("nccl" if resolved.type == "cuda" else "gloo")
    return World(rank, size, resolved)


def close_world(world: World, finished: bool = False) -> None:
    """Leave the world; ``finished``: every process got to the end, so all leave together (a barrier)
    and none tears down its connections while a peer is still using them."""
    if world.size > 1 and dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()
