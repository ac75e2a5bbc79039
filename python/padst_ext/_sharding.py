"""Sharded tensors (FSDP2's DTensor parameters and optimizer states) seen whole, for the code that runs between
optimizer steps: DST updates, the soft permutations' clock and hardening."""

from __future__ import annotations

from torch import Tensor

try:
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # pragma: no cover - a torch without DTensor
    DTensor = distribute_tensor = None

__all__ = ["is_sharded", "full_tensor", "copy_full_into"]


def is_sharded(t) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def full_tensor(t: Tensor) -> Tensor:
    """``t`` whole on every rank: a DTensor is gathered, any other tensor returned as it is."""
    return t.full_tensor() if is_sharded(t) else t


def copy_full_into(dst: Tensor, full: Tensor) -> None:
    """``dst.copy_(full)`` in place; for a DTensor, each rank copies its own shard of ``full`` (the same on every
    rank) into its local storage."""
    if is_sharded(dst):
        dst.to_local().copy_(distribute_tensor(full.to(dst.dtype), dst.device_mesh, dst.placements,
                                               src_data_rank=None).to_local())
    else:
        dst.copy_(full)
