"""The operator U·t: U applied to named tensors (gradients, updates, perturbation directions), `docs/algorithm.md` §7.

Names that U does not hold (frozen tensors, say) are passed through as the identity. The default `diagonal` U is one
fused multiply over all tensors; FSDP2 shards multiply locally (U is sharded like its parameters, so U·g needs no
communication, `docs/integration.md` §7.5).
"""

from collections.abc import Sequence

import torch
from torch import Tensor

from .sharding import is_dtensor
from .state import UState
from .structures import DiagonalStructure

__all__ = ["apply_u", "apply_u_"]


@torch.no_grad()
def apply_u(u: UState, names: Sequence[str], tensors: Sequence[Tensor]) -> list[Tensor]:
    """U·t for each tensor as a new fp32 tensor (fp64 stays fp64); identity for names not in U.

    Args:
        u (`UState`): U.
        names (`Sequence[str]`): the canonical name of each tensor.
        tensors (`Sequence[Tensor]`): the tensors, left untouched.
    """
    # one fused multiply (DTensor shards too: a local product), unless DTensors and plain tensors are mixed
    uniform = len({is_dtensor(t) for t in tensors}) <= 1
    if list(names) == u.names and isinstance(u.structure, DiagonalStructure) and uniform:
        return u.structure.apply(tensors)  # the default: fused, no per-tensor loop (falls back on dtype)
    out = []
    for name, t in zip(names, tensors, strict=True):
        x = t.detach().to(torch.promote_types(t.dtype, torch.float32), copy=True)
        i = u.index.get(name)
        out.append(x if i is None else u.structure.apply_block(i, x.to(u.dtype)).to(x.dtype))
    return out


@torch.no_grad()
def apply_u_(u: UState, names: Sequence[str], tensors: Sequence[Tensor]) -> None:
    """t ← U·t in place, cast back to each tensor's dtype; names not in U are left untouched.

    Args:
        u (`UState`): U.
        names (`Sequence[str]`): the canonical name of each tensor.
        tensors (`Sequence[Tensor]`): the tensors, overwritten.
    """
    fast_t, fast_d = [], []
    for name, t in zip(names, tensors, strict=True):
        i = u.index.get(name)
        if i is None:
            continue
        if isinstance(u.structure, DiagonalStructure) and t.dtype == u.dtype:
            fast_t.append(t)
            fast_d.append(u.structure.blocks[i]["d"])
        else:
            t.copy_(u.structure.apply_block(i, t.to(u.dtype)))
    # one fused multiply per kind: FSDP2 shards multiply locally, but one foreach call cannot mix DTensors and
    # plain tensors (a parameter FSDP2 does not manage)
    for kind in {is_dtensor(t) for t in fast_t}:
        ts = [t for t in fast_t if is_dtensor(t) == kind]
        torch._foreach_mul_(ts, [d for t, d in zip(fast_t, fast_d, strict=True) if is_dtensor(t) == kind])
        if u.structure.scale != 1.0:
            torch._foreach_div_(ts, u.structure.scale)
