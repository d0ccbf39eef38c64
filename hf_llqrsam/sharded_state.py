"""FSDP2 checkpoints of the SAM state and U: DTensor shards go to `torch.distributed.checkpoint` (DCP).

Under FSDP2 the SAM buffers (FSAM ḡ, VaSSO d, infoSAM m/v) and the diagonal U are DTensors sharded like their
parameters. [`split_dtensors`] takes them out of the state dict and leaves `{"__dcp__": key}` placeholders, so
`llqrsam_state.pt` (written by rank 0) keeps only primitives and replicated tensors and still loads with
`torch.load(weights_only=True)`. Every rank writes its own shards with [`save_sharded`] into `llqrsam_dcp/` next to
it (DCP's per-rank `.distcp` files and one `.metadata`). [`load_sharded`] reads them back into templates the
trainer builds from the live run: a DTensor template reads only this rank's shard, so a checkpoint also loads at
another world size, and a plain template reads the whole tensor (a DDP or one-process resume of an FSDP2 run).
The keys are the `/`-joined paths in the state dict, e.g. `llqr/blocks/<parameter name>/d` or
`sam/buffers/gbar/<parameter name>`.
"""

import os
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from .sam import is_dtensor

__all__ = ["DCP_DIR", "PLACEHOLDER", "has_placeholders", "load_sharded", "save_sharded", "split_dtensors"]

DCP_DIR = "llqrsam_dcp"
PLACEHOLDER = "__dcp__"

Path = tuple[str, ...]


def split_dtensors(state: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """`(state with every DTensor replaced by {"__dcp__": key}, {key: DTensor})`; nested dicts are copied, the rest
    is shared. Without DTensors the second dict is empty and the first equals `state`."""
    shards: dict[str, Tensor] = {}

    def walk(x: Any, path: Path) -> Any:
        if isinstance(x, Mapping):
            return {k: walk(v, (*path, str(k))) for k, v in x.items()}
        if isinstance(x, Tensor) and is_dtensor(x):
            key = "/".join(path)
            shards[key] = x
            return {PLACEHOLDER: key}
        return x

    return walk(state, ()), shards


def _placeholders(state: Any, path: Path = ()) -> dict[str, Path]:
    if isinstance(state, Mapping):
        if set(state) == {PLACEHOLDER}:
            return {str(state[PLACEHOLDER]): path}
        out: dict[str, Path] = {}
        for k, v in state.items():
            out.update(_placeholders(v, (*path, str(k))))
        return out
    return {}


def has_placeholders(state: Mapping[str, Any]) -> bool:
    """Whether a loaded `llqrsam_state.pt` refers to DCP shards (an FSDP2 checkpoint)."""
    return bool(_placeholders(state))


def save_sharded(output_dir: str, shards: Mapping[str, Tensor]) -> str:
    """Write the DTensor `shards` to `output_dir/llqrsam_dcp` with DCP; a collective (call it on every rank).

    Returns the directory. Each rank writes only its local shards (no gather).
    """
    from torch.distributed.checkpoint.filesystem import FileSystemWriter
    from torch.distributed.checkpoint.state_dict_saver import save

    path = os.path.join(output_dir, DCP_DIR)
    save(dict(shards), storage_writer=FileSystemWriter(path, overwrite=True))  # a rewritten checkpoint-N replaces it
    return path


def load_sharded(
    checkpoint_dir: str, state: Mapping[str, Any], template: Callable[[Path, torch.Size, torch.dtype], Tensor]
) -> dict[str, Any]:
    """`state` with every placeholder replaced by its tensor, read from `checkpoint_dir/llqrsam_dcp` with DCP.

    A collective when the templates are DTensors (call it on every rank).

    Args:
        checkpoint_dir (`str`): the checkpoint directory.
        state (`Mapping[str, Any]`): a loaded `llqrsam_state.pt`.
        template (`Callable`): `(path, saved shape, saved dtype) ↦` an (uninitialised) tensor to read into: a DTensor
            sharded like the live tensor it will replace (only this rank's shard is read), or a plain tensor of the
            saved shape (read whole).

    Raises:
        `ValueError`: the DCP directory is missing or lacks a key the file refers to; the message names both.
    """
    from torch.distributed.checkpoint.filesystem import FileSystemReader
    from torch.distributed.checkpoint.state_dict_loader import load

    wanted = _placeholders(state)
    if not wanted:
        return dict(state)
    path = os.path.join(checkpoint_dir, DCP_DIR)
    if not os.path.isdir(path):
        raise ValueError(
            f"Cannot resume: {os.path.join(checkpoint_dir, 'llqrsam_state.pt')} refers to {len(wanted)} sharded "
            f"tensors (an FSDP2 checkpoint) but {path} is missing. Copy the whole checkpoint directory, or delete "
            "llqrsam_state.pt to resume with fresh SAM/LLQR state."
        )
    metadata = FileSystemReader(path).read_metadata().state_dict_metadata
    missing = sorted(set(wanted) - set(metadata))
    if missing:
        raise ValueError(f"Cannot resume: {path} lacks the sharded tensors {missing[:5]} of llqrsam_state.pt.")
    targets = {}
    for key, where in wanted.items():
        meta = metadata[key]
        targets[key] = template(where, meta.size, meta.properties.dtype)  # type: ignore[union-attr]
    load(targets, checkpoint_id=path)

    def fill(x: Any) -> Any:
        if isinstance(x, Mapping):
            if set(x) == {PLACEHOLDER}:
                return targets[str(x[PLACEHOLDER])]
            return {k: fill(v) for k, v in x.items()}
        return x

    return fill(state)  # type: ignore[no-any-return]
