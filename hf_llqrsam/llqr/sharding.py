"""DTensor helpers for U under FSDP2, in pure torch (`docs/integration.md` §7.5).

FSDP2 (`fully_shard`) stores every parameter as a `DTensor` sharded on dim 0 (`Shard(0)`, `torch.chunk` sizes, so
shards may be uneven or empty). A diagonal U has the shape of its parameter, so it is stored as a DTensor with the
parameter's mesh and placements: rank r holds exactly the entries of U that multiply its own gradient shard, and
U·g is a local elementwise product. The refresh works on full tensors (every rank holds the same ones), so the only
conversions needed are full → shard (a local slice, no communication) and shard → full (an all-gather).
"""

import sys

import torch
from torch import Tensor

__all__ = ["full_tensor", "is_dtensor", "local_tensor", "shard_like"]


def is_dtensor(t: object) -> bool:
    """Whether `t` is a `torch.distributed.tensor.DTensor`.

    Checked without importing `torch.distributed.tensor`: no tensor can be a DTensor before that module is loaded.
    """
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def full_tensor(t: Tensor) -> Tensor:
    """The whole tensor: `t.full_tensor()` (an all-gather, a collective) for a DTensor, `t` itself otherwise."""
    if is_dtensor(t):
        out: Tensor = t.full_tensor()  # type: ignore[attr-defined]
        return out
    return t


def local_tensor(t: Tensor) -> Tensor:
    """This rank's shard (`to_local()`) of a DTensor, `t` itself otherwise."""
    if is_dtensor(t):
        out: Tensor = t.to_local()  # type: ignore[attr-defined]
        return out
    return t


@torch.no_grad()
def shard_like(full: Tensor, like: Tensor) -> Tensor:
    """`full` as a DTensor with the mesh and placements of the DTensor `like`, cut locally (no communication).

    `full` must hold the same values on every rank (a replicated refresh, or a tensor read from the same file). For a
    plain `like`, `full` is returned unchanged.
    """
    if not is_dtensor(like):
        return full
    from torch.distributed.tensor import distribute_tensor

    out: Tensor = distribute_tensor(
        full.to(like.device),
        like.device_mesh,  # type: ignore[attr-defined]
        like.placements,  # type: ignore[attr-defined]
        src_data_rank=None,
    )
    return out
