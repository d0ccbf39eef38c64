"""Learning U: the surrogate U-gradient and the inner loop of one LLQR update (`docs/algorithm.md` §2.1, §5.1–5.2).

The objective is J(U) = gᵀδ + ½ δᵀ(G + λI)δ with δ = −U g. With r = g + (G + λI)δ,

    ∂J/∂U = (∂δ/∂U)ᵀ r,   so   s(U) = ⟨stop_grad(r), δ(U)⟩   has   ∇_U s = ∇_U J

and one curvature product per inner step is enough for every structure (for U = diag(d): ∂J/∂d = −g ⊙ r).
The reference computes the same quantity with a control-adjoint sweep and an analytic pull-back per structure
(github.com/SimonDufLab/LLQR, d2c62b3, `preconditioner.py:BasePreconditioner`).
"""

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .config import CGBeta, InnerSolver
from .solvers import FitStats, fit_cg, make_optimizer
from .structures import DiagonalStructure, Structure

__all__ = [
    "FitStats",
    "clip_by_groups_",
    "count_nonfinite",
    "diagonal_surrogate_gradient",
    "fit_structure",
    "gradient_route",
    "group_index",
    "sanitize_",
    "surrogate_gradient",
]

ProductFn = Callable[[list[Tensor]], list[Tensor]]


def _flat(ts: Sequence[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in ts])


def _dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    """Σ_i ⟨a_i, b_i⟩ as one dot of the concatenations (differentiable; no per-tensor reductions)."""
    return torch.dot(_flat(a), _flat(b))


def surrogate_gradient(
    structure: Structure,
    g: Sequence[Tensor],
    gv: ProductFn,
    probe: Sequence[Tensor] | None = None,
    objective: bool = True,
) -> tuple[Tensor, list[Tensor]]:
    """J(U) and ∂J/∂(structure parameters) with one product (G + λI)·δ (`docs/algorithm.md` §5.1).

    Args:
        structure (`Structure`): U; its [`~Structure.parameters`] must be leaves that require grad.
        g (`Sequence[Tensor]`): the curvature-batch gradient, aligned with `structure.layouts`.
        gv (`Callable`): v ↦ (G + λI)·v on lists aligned with `structure.layouts`.
        probe (`Sequence[Tensor]`, *optional*): the vector U acts on, δ = −U·probe; defaults to g. With
            `llqr_apply="update"` it is −Δ_opt(g), so that δ = U·Δ_opt(g) (`docs/algorithm.md` §7.3).
        objective (`bool`, *optional*, defaults to `True`): also evaluate J (two dots); J is NaN when `False`.

    Returns:
        `tuple[Tensor, list[Tensor]]`: J (0-dim, detached) and the gradients, aligned with `structure.parameters()`.
    """
    params = structure.parameters()
    with torch.enable_grad():
        delta = [-u for u in structure.apply(g if probe is None else probe)]
        delta_d = [d.detach() for d in delta]
        g_delta = gv(delta_d)
        value = _dot(g, delta_d) + 0.5 * _dot(delta_d, g_delta) if objective else torch.tensor(float("nan"))
        residual = torch._foreach_add(list(g), g_delta)
        surrogate = _dot(residual, delta)
        got = torch.autograd.grad(surrogate, params, allow_unused=True)
    return value.detach(), [torch.zeros_like(p) if t is None else t for p, t in zip(params, got, strict=True)]


def diagonal_surrogate_gradient(
    structure: DiagonalStructure,
    g: Sequence[Tensor],
    gv: ProductFn,
    probe: Sequence[Tensor] | None = None,
    objective: bool = True,
) -> tuple[Tensor, list[Tensor]]:
    """[`surrogate_gradient`] in closed form for U = diag(d): the same values, bit for bit, without autograd.

    With s the identity scaling, δ = −(d ⊙ x)/s for x = `probe` (or g) and r = g + (G + λI)δ, so ∂s/∂d = (−r/s) ⊙ x,
    which is the chain autograd runs through [`~DiagonalStructure.apply`] (multiply, divide by s, negate), in the
    same order. It replaces per-tensor autograd nodes by a few fused multiplies: the refresh's bookkeeping outside
    the products (issue 20). The tensors of `g` and `probe` must have the structure's dtype.
    """
    x = list(g if probe is None else probe)
    d = [blk["d"] for blk in structure.blocks]
    with torch.no_grad():
        delta = torch._foreach_mul(d, x)
        if structure.scale != 1.0:
            torch._foreach_div_(delta, structure.scale)
        torch._foreach_neg_(delta)
        g_delta = gv(list(delta))
        value = _dot(g, delta) + 0.5 * _dot(delta, g_delta) if objective else torch.tensor(float("nan"))
        grads = torch._foreach_neg(torch._foreach_add(list(g), g_delta))
        if structure.scale != 1.0:
            torch._foreach_div_(grads, structure.scale)
        torch._foreach_mul_(grads, x)
    return value, list(grads)


def gradient_route(
    structure: Structure, g: Sequence[Tensor], probe: Sequence[Tensor] | None = None
) -> Callable[..., tuple[Tensor, list[Tensor]]]:
    """The U-gradient function of an inner loop: [`diagonal_surrogate_gradient`] where it applies (a diagonal
    structure whose dtype the vectors share), else the autograd [`surrogate_gradient`], which stays its oracle."""
    x = g if probe is None else probe
    if isinstance(structure, DiagonalStructure) and all(t.dtype == structure.dtype for t in x):
        return diagonal_surrogate_gradient
    return surrogate_gradient


def _scan_nonfinite(tensors: Sequence[Tensor]) -> tuple[Tensor | None, Tensor | None]:
    """The count of NaN/±Inf entries, or `None` when all are finite (one host sync on the finite path), and the
    stacked per-tensor norms (`None` without tensors), which on the finite path are those of the tensors as they are.

    A finite norm proves a tensor finite, so the per-tensor scan runs only when some norm is not (a finite tensor
    whose norm overflows is scanned, and counted correctly as 0).
    """
    if not tensors:
        return None, None
    norms = torch.stack(torch._foreach_norm(list(tensors)))
    if bool(torch.isfinite(norms).all()):
        return None, norms
    return torch.stack([(~torch.isfinite(t)).sum() for t in tensors]).sum(), norms


def count_nonfinite(tensors: Sequence[Tensor]) -> int:
    """The number of NaN/±Inf entries over `tensors` (exact; a norm-based fast path when all are finite)."""
    bad, _ = _scan_nonfinite(tensors)
    return 0 if bad is None else int(bad)


def _sanitize_(tensors: Sequence[Tensor]) -> tuple[Tensor, Tensor | None]:
    """[`sanitize_`], and the per-tensor norms of the result when no entry was replaced (else `None`)."""
    bad, norms = _scan_nonfinite(tensors)
    if bad is None:
        return torch.zeros((), dtype=torch.long, device=tensors[0].device if tensors else None), norms
    for t in tensors:
        torch.nan_to_num_(t, nan=0.0, posinf=1.0, neginf=-1.0)
    return bad, None


def sanitize_(tensors: Sequence[Tensor]) -> Tensor:
    """nan → 0, +inf → +1, −inf → −1 in place (the reference's U-gradient sanitisation); returns the count replaced.

    A finite norm proves a tensor finite, so the per-tensor scan runs only when some norm is not.
    """
    return _sanitize_(tensors)[0]


def group_index(groups: Sequence[Sequence[int]], device: torch.device | None = None) -> Tensor:
    """For each tensor, the index of its clip group (`groups` must partition the tensors)."""
    n = sum(len(group) for group in groups)
    out = torch.full((n,), -1, dtype=torch.long)
    for k, group in enumerate(groups):
        out[list(group)] = k
    if (out < 0).any():
        raise ValueError("Clip groups must cover every tensor.")
    return out.to(device)


def clip_by_groups_(
    tensors: Sequence[Tensor], group_of: Tensor, clip_norm: float, norms: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Scale each group by min(1, clip_norm / ‖group‖₂) in place (`docs/algorithm.md` §5.2, §6.3).

    Args:
        tensors (`Sequence[Tensor]`): the U-gradient, one tensor per structure parameter.
        group_of (`Tensor`): group index of each tensor (from [`group_index`]).
        clip_norm (`float`): the per-group bound.
        norms (`Tensor`, *optional*): the stacked per-tensor norms of `tensors` when the caller has them (the
            sanitising pass computes them); computed here otherwise.

    Returns:
        `tuple[Tensor, Tensor]`: the global norm before clipping and whether any group was clipped (0-dim, no sync).
    """
    sq = (torch.stack(torch._foreach_norm(list(tensors))) if norms is None else norms) ** 2
    # at most one group per tensor; unused group slots have norm 0 and factor 1
    group_norm = torch.zeros(len(sq), dtype=sq.dtype, device=sq.device).index_add_(0, group_of, sq).sqrt()
    factor = (clip_norm / group_norm).clamp(max=1.0)  # ‖group‖ = 0 gives inf, hence 1
    torch._foreach_mul_(list(tensors), list(factor[group_of].unbind()))
    return sq.sum().sqrt(), (factor < 1.0).any()


def fit_structure(
    structure: Structure,
    g: Sequence[Tensor],
    gv: ProductFn,
    steps: int,
    lr: float,
    momentum: float,
    clip_norm: float,
    probe: Sequence[Tensor] | None = None,
    stop_if_nonfinite: bool = False,
    solver: InnerSolver = "momentum",
    cg_beta: CGBeta = "reference",
) -> FitStats:
    """The inner loop on V = `structure` in place: `steps` clipped solver steps, then V ← nan_to_num(V).

    A new solver is built on every call, so no solver state outlives one update. The default, `momentum`, is a
    `torch.optim.SGD` (dampening 0, no Nesterov) whose heavy-ball step buf ← ∇ + μ·buf, V ← V − η·buf is the
    reference's default solver (`docs/algorithm.md` §5.2); `sgd` and `adam` replace it after the same clip, and
    `cg` runs [`~hf_llqrsam.llqr.solvers.fit_cg`] on the unclipped gradient (the reference's solvers,
    [`~hf_llqrsam.llqr.solvers`]). g and G are frozen during the loop.

    Args:
        structure (`Structure`): V; its parameters are made leaves that require grad.
        g (`Sequence[Tensor]`), gv (`Callable`): the curvature problem, aligned with `structure.layouts`.
        steps (`int`): T. lr (`float`): η (not used by `cg`). momentum (`float`): μ (`momentum` only).
        clip_norm (`float`): per-group clip (not used by `cg`).
        probe (`Sequence[Tensor]`, *optional*): δ = −V·probe instead of −V·g (see [`surrogate_gradient`]).
        stop_if_nonfinite (`bool`, *optional*, defaults to `False`): if J(V) at the first inner step is NaN/±Inf
            (a non-finite curvature product (G + λI)·δ, or one that overflows J), return at once with
            `stopped=True` and V bit-identical, instead of sanitising a U-gradient that carries no information.
        solver (`str`, *optional*, defaults to `"momentum"`): `momentum`, `sgd`, `adam` or `cg`.
        cg_beta (`str`, *optional*, defaults to `"reference"`): the β rule of `cg` (see [`~solvers.fit_cg`]).
    """
    params = structure.parameters()
    for p in params:
        p.requires_grad_(True)
    route = gradient_route(structure, g, probe)
    if solver == "cg":

        def value_and_grad() -> tuple[Tensor, list[Tensor], int]:
            value, grads = route(structure, g, gv, probe)
            return value, grads, int(sanitize_(grads))

        stats = fit_cg(structure, value_and_grad, steps, stop_if_nonfinite=stop_if_nonfinite, beta=cg_beta)
        with torch.no_grad():
            for p in params:
                if not stats.stopped:
                    torch.nan_to_num_(p)
                p.requires_grad_(False)
        return stats
    group_of = group_index(structure.clip_groups(), params[0].device if params else None)
    opt = make_optimizer(solver, params, lr, momentum)
    nan = torch.tensor(float("nan"))
    first = last = nan
    norms, clipped, bad = [], [], []
    for step in range(steps):
        # J is reported only at the first and last inner steps: skip its two dots in between
        objective, grads = route(structure, g, gv, probe, objective=step in (0, steps - 1))
        if step == 0:
            first = objective
            if stop_if_nonfinite and not bool(torch.isfinite(objective)):  # one host sync per call
                for p in params:
                    p.requires_grad_(False)
                return FitStats(float(objective), float("nan"), float("nan"), 0.0, 0, stopped=True)
        last = objective
        replaced, grad_norms = _sanitize_(grads)  # the norms of a finite U-gradient serve the clip as well
        bad.append(replaced)
        norm, any_clipped = clip_by_groups_(grads, group_of, clip_norm, norms=grad_norms)
        norms.append(norm)
        clipped.append(any_clipped)
        for p, grad in zip(params, grads, strict=True):
            p.grad = grad
        opt.step()
    with torch.no_grad():
        for p in params:
            p.grad = None
            torch.nan_to_num_(p)
            p.requires_grad_(False)
    return FitStats(
        objective_start=float(first),
        objective_end=float(last),
        ugrad_norm=float(torch.stack(norms).mean()) if norms else float("nan"),
        clip_fraction=float(torch.stack(clipped).float().mean()) if clipped else 0.0,
        nonfinite_ugrad=int(torch.stack(bad).sum()) if bad else 0,
    )
