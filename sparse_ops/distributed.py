"""Data-parallel IMP: torchrun is the launcher, torch.distributed the engine.

``torchrun --nproc-per-node N -m sparse_ops prune ...`` starts N processes with
``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` (and the rendezvous address) in their
environment. :func:`init_from_env` turns that into a process group: NCCL when the
process trains on a GPU, gloo on the CPU. Code that finds a process group already
initialised (``imp.run`` called from the user's own DDP script) uses that one.

The contract inside a group:

* every rank builds the same model from the same seed; DDP broadcasts rank 0's
  parameters and buffers when it wraps the model, so they start identical;
* each global batch (``batch_size × world_size`` samples of one seeded permutation,
  the same on every rank) is cut into one contiguous shard per rank, so N ranks at
  batch ``b`` see exactly the samples one process at batch ``N·b`` sees, and DDP's
  gradient average equals that process's mean loss gradient (no BatchNorm: BN
  normalises per shard, as in every DDP run without SyncBatchNorm);
* evaluation is sharded and its counts summed over ranks, so every rank picks the
  same best epoch;
* masks are computed on rank 0 only and broadcast (post-processing such as regroup
  runs once), so every rank holds bit-identical masks;
* only rank 0 writes files and prints.

A rank that raises ends its process; torchrun then stops the others and the job
fails, naming the rank (``torchrun`` prints each failed rank's exit code and, with
:func:`record` on the entry point, its traceback).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from .errors import SparseOpsError


class DistributedError(SparseOpsError):
    """A distributed run that cannot work as configured."""


def active() -> bool:
    """Inside an initialised process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank: the group's, else torchrun's ``RANK`` (also once the group
    is shut down), else 0."""
    if active():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0")) if launched() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0 (or no process group): the process that writes files and prints."""
    return rank() == 0


def launched() -> bool:
    """The environment of a torchrun worker of a multi-process job."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(device: str = "auto", timeout_s: float = 1800) -> torch.device:
    """Join the job torchrun started (no-op for a single process); return the device.

    ``device``: ``auto`` (a GPU if there is one), ``cuda`` or ``cpu``. With GPUs each
    rank takes ``cuda:LOCAL_RANK`` and the group uses NCCL; on CPUs, gloo.
    """
    if device not in ("auto", "cuda", "cpu"):
        raise DistributedError(f"device must be auto, cuda or cpu, got {device!r}")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise DistributedError("--device cuda, but torch sees no CUDA device")
    if not launched():
        return torch.device("cuda" if use_cuda else "cpu")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        if local >= torch.cuda.device_count():
            raise DistributedError(
                f"LOCAL_RANK {local} but only {torch.cuda.device_count()} CUDA devices: "
                "--nproc-per-node must not exceed the GPUs of a node"
            )
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group(
            "nccl" if use_cuda else "gloo", timeout=timedelta(seconds=timeout_s)
        )
    return torch.device("cuda", local) if use_cuda else torch.device("cpu")


def shutdown() -> None:
    """Leave the process group (after a final barrier) if there is one."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _comm_device() -> torch.device:
    # NCCL moves only CUDA tensors; gloo only CPU ones.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def shard(indices: torch.Tensor) -> torch.Tensor:
    """This rank's contiguous share of ``indices`` (equal shares when it divides)."""
    return indices.tensor_split(world_size())[rank()]


def usable_length(n: int) -> int:
    """Samples per epoch that give every rank equal shards: ``n`` rounded down to a
    multiple of the world size (at most ``world_size - 1`` samples are left out)."""
    return n - n % world_size()


def all_sum(values: Iterable[float]) -> list[float]:
    """Element-wise sum over ranks (float64, so counts stay exact)."""
    values = list(values)
    if not active():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return t.tolist()


def broadcast_masks(masks: dict[str, torch.Tensor] | None, names: list[str], like: dict):
    """Rank 0's ``masks`` on every rank, as bool tensors shaped like ``like[name]``.

    Other ranks pass ``None``; ``names`` (the same on every rank) fixes the order.
    """
    if not active():
        return masks
    device = _comm_device()
    out = {}
    for name in names:
        if rank() == 0:
            t = masks[name].to(device=device, dtype=torch.uint8)
        else:
            t = torch.empty(like[name].shape, dtype=torch.uint8, device=device)
        dist.broadcast(t, 0)
        out[name] = t.bool().cpu()
    return out


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` (picklable, from our own process, never from a file)."""
    if not active():
        return obj
    box = [obj if rank() == 0 else None]
    dist.broadcast_object_list(box, 0, device=_comm_device())
    return box[0]


def broadcast_module_state(module: torch.nn.Module, *, buffers_only: bool = False) -> None:
    """Overwrite every parameter and buffer (or only the buffers) with rank 0's values."""
    if not active():
        return
    device = _comm_device()
    tensors = list(module.buffers()) + ([] if buffers_only else list(module.parameters()))
    with torch.no_grad():
        for t in tensors:
            buf = t.detach().to(device)
            dist.broadcast(buf, 0)
            if buf is not t:
                t.copy_(buf)


def digest(tensors: dict[str, torch.Tensor]) -> list[float]:
    """A cheap fingerprint of a tensor dict: per tensor, its sum and a position-weighted
    sum (equal tensors give equal digests; a moved or changed entry almost surely not)."""
    out = []
    for name in sorted(tensors):
        flat = tensors[name].detach().reshape(-1).double().cpu()
        pos = torch.arange(1, flat.numel() + 1, dtype=torch.float64)
        out += [float(flat.sum()), float((flat * pos).sum())]
    return out


def check_identical(tensors: dict[str, torch.Tensor], what: str = "masks") -> None:
    """Raise :class:`DistributedError` if any rank holds other ``tensors`` than rank 0."""
    if not active():
        return
    mine = torch.tensor(digest(tensors), dtype=torch.float64, device=_comm_device())
    ref = mine.clone()
    dist.broadcast(ref, 0)
    bad = torch.tensor([float(not torch.equal(mine, ref))], device=_comm_device())
    dist.all_reduce(bad)
    if bad.item():
        raise DistributedError(
            f"{what} differ between ranks ({int(bad.item())} of {world_size()} differ from rank "
            "0); every rank must build the same model from the same seed"
        )
