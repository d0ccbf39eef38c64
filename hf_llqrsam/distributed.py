"""Process-group glue: unwrapping, gradient-sync control decided before the forward, and rank agreement."""

from collections.abc import Iterator
from contextlib import contextmanager
from typing import cast

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

# Wrapper segments that never belong to a canonical parameter name (`docs/integration.md` §7.4).
_LEADING_WRAPPERS = ("_orig_mod", "module")
_INNER_WRAPPERS = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module")


def unwrap(model: nn.Module) -> nn.Module:
    """Strip `torch.compile` (`_orig_mod`) and DDP (`module`) wrappers, in any nesting order."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = cast(nn.Module, model._orig_mod)
        elif isinstance(model, DistributedDataParallel):
            model = model.module
        else:
            return model


def canonical_name(name: str) -> str:
    """A parameter name with wrapper segments removed, e.g. `_orig_mod.module.vit.x` → `vit.x`.

    `_orig_mod` / `module` are stripped only as leading segments (a model may own a submodule called `module`);
    the FSDP/checkpoint wrapper segments are unique and are dropped wherever they occur.
    """
    parts = name.split(".")
    while parts and parts[0] in _LEADING_WRAPPERS:
        parts = parts[1:]
    return ".".join(p for p in parts if p not in _INNER_WRAPPERS)


@contextmanager
def grad_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Force (`enabled=True`) or disable gradient all-reduce for the forward+backward run inside the block.

    DDP decides at *forward* time (`require_backward_grad_sync` is read in `_pre_forward`/`_post_forward`), so wrapping
    only the backward in `no_sync()` is a silent no-op (davda54/sam#78). The flag is set on the DDP module under any
    `torch.compile` wrapper (`OptimizedModule(DDP(...))`: a naive isinstance check would miss it) and restored after.
    FSDP2 modules use `set_requires_gradient_sync`.
    """
    inner = model._orig_mod if hasattr(model, "_orig_mod") else model
    if isinstance(inner, DistributedDataParallel):
        old = inner.require_backward_grad_sync
        inner.require_backward_grad_sync = enabled
        try:
            yield
        finally:
            inner.require_backward_grad_sync = old
    elif hasattr(inner, "set_requires_gradient_sync"):  # FSDP2 FSDPModule
        set_sync = getattr(inner, "set_requires_gradient_sync")  # noqa: B009  (FSDPModule, untyped here)
        set_sync(enabled)
        try:
            yield
        finally:
            set_sync(True)
    else:
        yield


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if `flag` is True on any rank (MAX all-reduce); the flag itself without a process group."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)
