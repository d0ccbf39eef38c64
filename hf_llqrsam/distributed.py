"""Process-group glue: unwrapping, gradient-sync control decided before the forward, rank agreement through
Accelerate's collectives, and the FSDP2 pieces of the LLQR refresh (`docs/integration.md` §7)."""

import sys
import types
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from .sam import is_dtensor

__all__ = [
    "accelerate_all_reduce",
    "accelerate_broadcast",
    "any_rank",
    "canonical_name",
    "fsdp2_modules",
    "grad_sync",
    "is_fsdp2",
    "sharded_update_probe",
    "unsharded_view",
    "unwrap",
]

# Wrapper segments that never belong to a canonical parameter name (`docs/integration.md` §7.4).
_LEADING_WRAPPERS = ("_orig_mod", "module")
_INNER_WRAPPERS = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module")
# Forward hooks installed by FSDP2 (`fully_shard`) live in these modules; the refresh view drops them.
_FSDP_HOOK_MODULES = ("torch.distributed.fsdp",)


def unwrap(model: nn.Module) -> nn.Module:
    """Strip `torch.compile` (`_orig_mod`) and DDP (`module`) wrappers, in any nesting order.

    FSDP2 does not wrap: a `fully_shard` model is its own module (of class `FSDP<Class>`), so it is returned as is.
    """
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


def _fsdp_module_class() -> type | None:
    # FSDPModule without importing FSDP: no module can be an FSDPModule before `torch.distributed.fsdp` is loaded.
    module = sys.modules.get("torch.distributed.fsdp")
    return getattr(module, "FSDPModule", None) if module is not None else None


def fsdp2_modules(model: nn.Module) -> list[nn.Module]:
    """Every FSDP2 (`fully_shard`) module in `model`'s tree (under any compile/DDP wrapper), root first."""
    cls = _fsdp_module_class()
    if cls is None:
        return []
    return [m for m in unwrap(model).modules() if isinstance(m, cls)]


def is_fsdp2(model: nn.Module) -> bool:
    """Whether `model` is sharded by FSDP2: a `fully_shard` module, or any DTensor among its parameters."""
    inner = unwrap(model)
    return bool(fsdp2_modules(inner)) or any(is_dtensor(p) for p in inner.parameters())


def _sync_flags(module: nn.Module) -> list[tuple[Any, bool, bool]]:
    # (param group, reduce_grads, all_reduce_grads) of one FSDP2 module: FSDP2 has setters but no getters, so the
    # previous state is read from its param groups to be restored exactly (HSDP's all-reduce flag included).
    state = module._get_fsdp_state()  # type: ignore[operator]
    groups = getattr(state, "_fsdp_param_groups", None)  # torch >= 2.12; one `_fsdp_param_group` before
    if groups is None:
        group = getattr(state, "_fsdp_param_group", None)
        groups = [] if group is None else [group]
    return [(g, g.reduce_grads, g.all_reduce_grads) for g in groups]


@contextmanager
def grad_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Force (`enabled=True`) or disable gradient reduction for the forward+backward run inside the block.

    DDP decides at *forward* time (`require_backward_grad_sync` is read in `_pre_forward`/`_post_forward`), so wrapping
    only the backward in `no_sync()` is a silent no-op (davda54/sam#78). The flag is set on the DDP module under any
    `torch.compile` wrapper (`OptimizedModule(DDP(...))`: a naive isinstance check would miss it) and restored after.

    FSDP2: `set_requires_gradient_sync` on every `fully_shard` module of the tree (also when the root itself is not
    sharded), and each module's previous reduce-scatter / all-reduce flags are restored afterwards, so the block works
    inside the Trainer's own `no_sync` (Accelerate's, or `_defer_fsdp_gradient_reduction`) without ending it. While
    sync is off FSDP2 accumulates unsharded gradients; the next synced backward reduce-scatters them and adds the
    result to the sharded `p.grad`.
    """
    inner = cast(nn.Module, model._orig_mod) if hasattr(model, "_orig_mod") else model
    if isinstance(inner, DistributedDataParallel):
        old = inner.require_backward_grad_sync
        inner.require_backward_grad_sync = enabled
        try:
            yield
        finally:
            inner.require_backward_grad_sync = old
        return
    modules = fsdp2_modules(inner)
    if not modules:
        yield
        return
    saved = [flags for m in modules for flags in _sync_flags(m)]
    for m in modules:
        m.set_requires_gradient_sync(enabled, recurse=False)  # type: ignore[operator]
    try:
        yield
    finally:
        for group, reduce_grads, all_reduce_grads in saved:
            group.reduce_grads = reduce_grads
            group.all_reduce_grads = all_reduce_grads


def _accelerate_ready() -> bool:
    # Accelerate's operations read the PartialState singleton; the Trainer creates it. Instantiating it here would
    # initialise a process group as a side effect, so without one the torch.distributed fallback is used.
    state = sys.modules.get("accelerate.state")
    return state is not None and bool(getattr(state.PartialState, "_shared_state", {}))


def _dist_ready() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def accelerate_all_reduce(t: Tensor) -> Tensor:
    """Σ over ranks of `t` (a new tensor) through `accelerate.utils.reduce`, the collective the LLQR curvature sharding
    is given by the trainer; torch.distributed when Accelerate has no state, `t` itself on one process."""
    if _accelerate_ready():
        from accelerate.utils import reduce

        return cast(Tensor, reduce(t, reduction="sum"))
    if _dist_ready():
        out = t.clone()
        dist.all_reduce(out)
        return out
    return t


def accelerate_broadcast(t: Tensor, src: int = 0) -> Tensor:
    """`t` ← rank `src`'s `t`, in place, through `accelerate.utils.broadcast` (torch.distributed without Accelerate
    state); returns `t`."""
    if _accelerate_ready():
        from accelerate.utils import broadcast

        return cast(Tensor, broadcast(t, from_process=src))
    if _dist_ready():
        dist.broadcast(t, src)
    return t


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if `flag` is True on any rank (a MAX reduce through Accelerate's `reduce`); the flag itself
    without a process group."""
    if not _dist_ready():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    if _accelerate_ready():
        from accelerate.utils import reduce

        t = cast(Tensor, reduce(t, reduction="max"))
    else:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


# ---------------------------------------------------------------------------------------------- the FSDP2 refresh


def _original_class(cls: type) -> type:
    # `fully_shard` swaps a module's class for a dynamic `FSDP<Class>(FSDPModule, Class)`: the first class of the MRO
    # that is not FSDP-derived is the user's class.
    fsdp = _fsdp_module_class()
    if fsdp is None or not issubclass(cls, fsdp):
        return cls
    return next(c for c in cls.__mro__ if not issubclass(c, fsdp))


def _is_fsdp_hook(hook: Any) -> bool:
    return str(getattr(hook, "__module__", "")).startswith(_FSDP_HOOK_MODULES)


@torch.no_grad()
def unsharded_view(model: nn.Module) -> nn.Module:
    """A hook-free, unsharded view of an FSDP2 model, on which the LLQR refresh runs (`docs/integration.md` §7.5).

    Why: through FSDP2's hooks the curvature products are silently zero. `torch.autograd.grad` is taken with respect
    to the sharded DTensor parameters, which FSDP2 keeps out of the autograd graph (the forward uses separate unsharded
    leaves), so every gradient comes back unused. The view gives the refresh ordinary leaves instead:

    - every module of the tree is shallow-copied into an instance of its own class (the `FSDP<Class>` swap undone);
    - FSDP2's forward hooks are dropped (every other hook is kept), so nothing is all-gathered, resharded or
      reduce-scattered while the refresh runs, and no FSDP2 state changes;
    - each DTensor parameter is replaced by a `full_tensor()` leaf (one all-gather each, in the parameter's own
      dtype: the fp32 master weights, whatever FSDP2's `MixedPrecisionPolicy` casts to in training);
    - buffers, names, configs and tied parameters are shared with `model`; bound-method attributes (Accelerate's
      autocast `forward`) are re-bound to the copy.

    The curvature problem computed on the view is that of the unsharded model, exactly (the g and G·v of a
    single process; test `tests/distributed/test_fsdp2_cpu.py`). Its cost per rank is one full copy of the trainable
    parameters for as long as the view lives (the refresh), on top of the sharded training state. `model` itself is
    not changed.

    Args:
        model (`nn.Module`): the unwrapped FSDP2 model (DDP/compile wrappers are stripped anyway).

    Returns:
        `nn.Module`: the view, with plain `nn.Parameter` leaves; discard it after the refresh.
    """
    from .llqr.sharding import full_tensor

    model = unwrap(model)
    leaves: dict[int, nn.Parameter] = {}
    for p in model.parameters():  # deduplicated: a tied parameter gets one leaf, shared by every module using it
        if id(p) not in leaves:
            leaves[id(p)] = nn.Parameter(full_tensor(p.detach()).clone(), requires_grad=p.requires_grad)
    memo: dict[int, nn.Module] = {}

    def view(module: nn.Module) -> nn.Module:
        if id(module) in memo:
            return memo[id(module)]
        cls = _original_class(type(module))
        new = cast(nn.Module, object.__new__(cls))
        state = dict(module.__dict__)
        for key, value in state.items():  # Accelerate's autocast forward is a method bound to `module`
            if isinstance(value, types.MethodType) and value.__self__ is module:
                state[key] = types.MethodType(value.__func__, new)
        state["_parameters"] = {n: None if p is None else leaves[id(p)] for n, p in module._parameters.items()}
        state["_buffers"] = dict(module._buffers)
        for attr, kwargs_attr in (
            ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs"),
            ("_forward_hooks", "_forward_hooks_with_kwargs"),
        ):
            hooks = OrderedDict((k, h) for k, h in getattr(module, attr).items() if not _is_fsdp_hook(h))
            state[attr] = hooks
            state[kwargs_attr] = {k: v for k, v in getattr(module, kwargs_attr, {}).items() if k in hooks}
        kept = state["_forward_hooks"]
        state["_forward_hooks_always_called"] = {
            k: v for k, v in getattr(module, "_forward_hooks_always_called", {}).items() if k in kept
        }
        new.__dict__.update(state)
        memo[id(module)] = new
        new.__dict__["_modules"] = {n: None if m is None else view(m) for n, m in module._modules.items()}
        return new

    return view(model)


def sharded_update_probe(
    probe: Callable[[Mapping[str, Tensor]], Mapping[str, Tensor]], params: Mapping[str, Tensor]
) -> Callable[[Mapping[str, Tensor]], dict[str, Tensor]]:
    """Wrap the `llqr_apply="update"` dry-run probe for FSDP2: the refresh's full g is cut to each parameter's shard
    (no communication), the optimizer's closed-form update Δ_opt(g) is computed on the shards with its sharded state,
    and Δ is gathered back to full tensors for the (replicated) inner loop."""
    from .llqr.sharding import full_tensor, shard_like

    def wrapped(grads: Mapping[str, Tensor]) -> dict[str, Tensor]:
        local = {n: shard_like(g, params[n]) if n in params else g for n, g in grads.items()}
        return {n: full_tensor(d) for n, d in probe(local).items()}

    return wrapped
