"""Inner solvers of one LLQR refresh: `momentum` (default), `sgd`, `adam` and the nonlinear `cg` (`llqr_inner_solver`).

Every solver minimises the same J(V) = gᵀδ + ½ δᵀ(G + λI)δ, δ = −V·g, over the structure parameters of V, from the
same start, with a fresh state on every refresh, and receives the same U-gradient: the surrogate gradient of
[`~hf_llqrsam.llqr.fit.surrogate_gradient`], sanitised (NaN → 0, ±Inf → ±1). The reference builds them in
`lqr_optimizer/_src/utils/utils.py:load_precond_optimizer` (github.com/SimonDufLab/LLQR, d2c62b3) as an optax chain
`clip_by_group_norm(precond_clip_norm)` → solver, run for `precond_steps` steps by
`preconditioner.py:BasePreconditioner._get_evaluate_lqr`:

* `momentum` (default): the reference's `momentum`, `optax.sgd(lr, momentum)`: buf ← ∇ + μ·buf, V ← V − η·buf
  (`torch.optim.SGD`, dampening 0, no Nesterov).
* `sgd`: the reference's `sgd`, `optax.sgd(lr)`: V ← V − η·∇.
* `adam`: the reference's `adam`, `optax.adam(lr)` with optax's defaults β₁ = 0.9, β₂ = 0.999, ε = 1e-8,
  ε_root = 0: m ← β₁m + (1 − β₁)∇, v ← β₂v + (1 − β₂)∇², V ← V − η·m̂/(√v̂ + ε) with m̂ = m/(1 − β₁ᵗ),
  v̂ = v/(1 − β₂ᵗ) at the t-th step (`torch.optim.Adam` is the same update).
* `cg`: the reference's `cg_back_pr+`, `nonlinear_cg(linesearch="optax_backtracking", method="pr+",
  optax_ls_kwargs=dict(max_backtracking_steps=20))`: see [`fit_cg`]. No clip and no learning rate.

The first three see the U-gradient after the per-group clip, as in the chain.

`momentum`, `sgd` and `adam` take η = `llqr_inner_lr` (or its schedule's value at the refresh step,
[`~hf_llqrsam.llqr.schedules.inner_lr_at`]). The reference's other CG entry, `cg_zoom_hz` (Hager–Zhang β with
optax's zoom strong-Wolfe line search), and the internal strong-Wolfe search of `nonlinear_cg` (selected by no
`precond_solver`) are not ported; see `docs/algorithm.md` §5.2.
"""

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .config import CGBeta, InnerSolver
from .structures import Structure

__all__ = [
    "ADAM_BETAS",
    "ADAM_EPS",
    "CG_DECREASE_FACTOR",
    "CG_INCREASE_FACTOR",
    "CG_MAX_BACKTRACKING_STEPS",
    "CG_MAX_STEP",
    "CG_SLOPE_RTOL",
    "FitStats",
    "fit_cg",
    "make_optimizer",
]

# optax.adam's defaults (optax 0.2.6, the reference's uv.lock): b1, b2, eps (eps_root = 0)
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
# optax.scale_by_backtracking_linesearch(max_backtracking_steps=20) with its defaults (optax/_src/linesearch.py)
CG_MAX_BACKTRACKING_STEPS = 20
CG_SLOPE_RTOL = 1e-4
CG_DECREASE_FACTOR = 0.8
CG_INCREASE_FACTOR = 1.5
CG_MAX_STEP = 1.0
# the floor of the squared norms in nonlinear_cg's _beta
_CG_TINY = 1e-30


@dataclass
class FitStats:
    """Inner-loop summaries of every solver, logged as `llqr/*` (`docs/integration.md` §11).

    Args:
        objective_start (`float`): J at the first inner step (NaN when there are none).
        objective_end (`float`): J at the last inner step, before its SGD step (NaN when there are none).
        ugrad_norm (`float`): mean over inner steps of the sanitised, unclipped U-gradient norm.
        clip_fraction (`float`): share of inner steps where at least one group was clipped.
        nonfinite_ugrad (`int`): non-finite U-gradient entries replaced, summed over inner steps.
        stopped (`bool`, *optional*, defaults to `False`): the loop stopped before its first step because J at the
            first inner step was not finite (only with `stop_if_nonfinite=True`); V is then untouched.
    """

    objective_start: float
    objective_end: float
    ugrad_norm: float
    clip_fraction: float
    nonfinite_ugrad: int
    stopped: bool = False


def make_optimizer(solver: InnerSolver, params: list[Tensor], lr: float, momentum: float) -> torch.optim.Optimizer:
    """A fresh torch optimizer for the gradient solvers `momentum`, `sgd` and `adam` (see the module table)."""
    match solver:
        case "momentum":
            return torch.optim.SGD(params, lr=lr, momentum=momentum, dampening=0.0, nesterov=False, foreach=True)
        case "sgd":
            return torch.optim.SGD(params, lr=lr, momentum=0.0, foreach=True)
        case "adam":
            return torch.optim.Adam(params, lr=lr, betas=ADAM_BETAS, eps=ADAM_EPS, foreach=True)
    raise ValueError(f"Invalid LLQRConfig.inner_solver={solver!r} for a gradient solver: 'momentum', 'sgd' or 'adam'.")


def _dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> float:
    return float(torch.dot(torch.cat([t.reshape(-1) for t in a]), torch.cat([t.reshape(-1) for t in b])))


def fit_cg(
    structure: Structure,
    value_and_grad: Callable[[], tuple[Tensor, list[Tensor], int]],
    steps: int,
    stop_if_nonfinite: bool = False,
    beta: CGBeta = "reference",
) -> FitStats:
    """`steps` nonlinear-CG steps on V = `structure` in place (the reference's `cg_back_pr+`).

    The reference's `lqr_optimizer/_src/utils/precond_optimizers.py:nonlinear_cg` (method `pr+`, `enforce_descent`,
    no periodic restart) with optax's `scale_by_backtracking_linesearch` (optax 0.2.6), on the sanitised, unclipped
    U-gradient (its `update_fn` discards the clipped gradient of the chain and calls `value_and_grad_fn` itself).
    At the k-th step, with f, ∇ the value and U-gradient at V:

        p = −∇ (k = 0);  else β = max(⟨∇, ∇ − ∇_prev⟩ / max(‖∇_prev‖², 1e-30), 0),  p = −∇ + β·p_prev,
                          and p = −∇ if ⟨p, ∇⟩ ≥ 0
        η = min(1.5·η_prev, 1) (η_prev = 1 at the first step); try η, 0.8η, 0.8²η, … (at most 21 values) until
            e(η) = max(f(V + ηp) − f − η·1e-4·⟨p, ∇⟩, 0) = 0 (a NaN e counts as +Inf);
            if e = +Inf at the last try, η = 0; otherwise the last η tried is taken, even if e > 0
        V ← V + η·p;  η_prev ← η;  p_prev ← p

    `beta="reference"` stores as ∇_prev the gradient at V + ηp, as the reference does (`prev_grad=g1`); since the step
    taken is V + ηp itself, ∇ − ∇_prev = 0 at the next step, so β = 0 and the reference's CG is steepest descent with
    Armijo backtracking. `beta="polak_ribiere"` stores the gradient at the start of the step, which gives the
    textbook Polak–Ribière+ β between consecutive iterates. The line-search state η_prev and the CG state start
    afresh at every refresh (the reference's `optax_solver.init` per update). The step ignores `llqr_inner_lr`: with
    a constant precond-LR schedule the reference multiplies the CG step by 1; with a schedule it multiplies it by
    the scheduled lr, which shrinks the line-search step by that factor (not reproduced: `llqr_inner_lr_schedule` is
    ignored by `cg`).

    Each line-search trial costs one curvature product (G + λI)·δ; the value and U-gradient at the accepted point
    are those of its last trial, so no product is repeated.

    Args:
        structure (`Structure`): V; its parameters are leaves that require grad.
        value_and_grad (`Callable`): J at V's current parameters, the sanitised U-gradient there, and the number of
            its non-finite entries that were sanitised.
        steps (`int`): T.
        stop_if_nonfinite (`bool`, *optional*, defaults to `False`): stop before the first step, V untouched, if J at
            the start is not finite.
        beta (`str`, *optional*, defaults to `"reference"`): see above.
    """
    params = structure.parameters()
    if steps == 0:
        return FitStats(float("nan"), float("nan"), float("nan"), 0.0, 0)
    value, grad, bad = value_and_grad()
    first = float(value)
    if stop_if_nonfinite and not math.isfinite(first):
        return FitStats(first, float("nan"), float("nan"), 0.0, 0, stopped=True)
    norms: list[float] = []
    nonfinite = bad
    last = first
    prev_grad: list[Tensor] = []
    prev_dir: list[Tensor] = []
    step_size = 1.0  # optax's initial ScaleByBacktrackingLinesearchState.learning_rate
    for k in range(steps):
        f = float(value)
        last = f
        norms.append(math.sqrt(_dot(grad, grad)))
        if k == 0:
            direction = [-t for t in grad]
        else:
            y = list(torch._foreach_sub(grad, prev_grad))
            b = max(_dot(grad, y) / max(_dot(prev_grad, prev_grad), _CG_TINY), 0.0)
            direction = list(torch._foreach_add([-t for t in grad], prev_dir, alpha=b))
            if _dot(direction, grad) >= 0:  # enforce_descent
                direction = [-t for t in grad]
        slope = _dot(direction, grad)
        start = [p.detach().clone() for p in params]
        eta = min(CG_INCREASE_FACTOR * step_size, CG_MAX_STEP)
        error, tries = math.inf, 0
        trial: tuple[Tensor, list[Tensor], int] | None = None
        while not error <= 0.0 and tries <= CG_MAX_BACKTRACKING_STEPS:
            if tries > 0:
                eta = CG_DECREASE_FACTOR * eta
            with torch.no_grad():
                for p, x, d in zip(params, start, direction, strict=True):
                    p.copy_(x + eta * d)
            trial = value_and_grad()
            error = float(trial[0]) - f - eta * CG_SLOPE_RTOL * slope
            error = math.inf if math.isnan(error) else max(error, 0.0)
            tries += 1
        prev_dir = direction
        if beta == "polak_ribiere":
            prev_grad = grad
        if math.isinf(error) or trial is None:  # no finite trial: a zero step, V and (f, ∇) stay
            step_size = 0.0
            with torch.no_grad():
                for p, x in zip(params, start, strict=True):
                    p.copy_(x)
        else:  # V is at the last trial, V + ηp
            step_size = eta
            value, grad, bad = trial
            nonfinite += bad
        if beta == "reference":
            prev_grad = grad
    return FitStats(
        objective_start=first,
        objective_end=last,
        ugrad_norm=sum(norms) / len(norms),
        clip_fraction=0.0,
        nonfinite_ugrad=nonfinite,
    )
