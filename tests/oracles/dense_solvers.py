"""Dense, flat-vector oracles of the reference's LLQR inner solvers (github.com/SimonDufLab/LLQR, d2c62b3).

Each takes the structure parameters as one flat float64 vector x₀ and a `value_and_grad(x) -> (J, ∇J)` built from a
dense objective, and runs the reference's optax chain as written there, without any `hf_llqrsam` code:

* `lqr_optimizer/_src/preconditioner.py:BasePreconditioner._get_evaluate_lqr`: the U-gradient is sanitised
  (`nan_to_num(nan=0, posinf=1, neginf=-1)`), then the chain of `utils.py:load_precond_optimizer` runs
  (`clip_by_group_norm` → solver), `precond_steps` times, from a fresh solver state;
* `optax.sgd(lr, momentum)` (`trace` then `scale(-lr)`), `optax.sgd(lr)`, `optax.adam(lr)` (defaults
  b1 = 0.9, b2 = 0.999, eps = 1e-8, eps_root = 0);
* `precond_optimizers.py:nonlinear_cg(linesearch="optax_backtracking", method="pr+")` around
  `optax.scale_by_backtracking_linesearch(max_backtracking_steps=20)` (optax 0.2.6 defaults: slope_rtol 1e-4,
  decrease_factor 0.8, increase_factor 1.5, max_learning_rate 1.0, atol = rtol = 0, store_grad False), whose
  update ignores the chain's (clipped) gradient; the outer loop then multiplies the update by precond_lr = 1.
"""

import math
from collections.abc import Callable

import torch
from torch import Tensor

ValueAndGrad = Callable[[Tensor], tuple[Tensor, Tensor]]


def sanitize(v: Tensor) -> Tensor:
    return torch.nan_to_num(v, nan=0.0, posinf=1.0, neginf=-1.0)


def clip_by_group_norm(v: Tensor, groups: list[list[int]], max_norm: float) -> Tensor:
    """Each group (a list of flat indices) scaled by max_norm / max(max_norm, ‖group‖)."""
    out = v.clone()
    for idx in groups:
        norm = float(torch.linalg.vector_norm(v[idx]))
        out[idx] = v[idx] * (max_norm / max(max_norm, norm))
    return out


def gradient_solver(
    kind: str,
    x0: Tensor,
    value_and_grad: ValueAndGrad,
    steps: int,
    lr: float,
    groups: list[list[int]],
    clip: float,
    momentum: float = 0.9,
) -> Tensor:
    """`momentum`, `sgd` or `adam` after the clip, as optax computes them."""
    x = x0.clone()
    trace = torch.zeros_like(x)
    mu, nu, count = torch.zeros_like(x), torch.zeros_like(x), 0
    b1, b2, eps = 0.9, 0.999, 1e-8
    for _ in range(steps):
        _, grad = value_and_grad(x)
        u = clip_by_group_norm(sanitize(grad), groups, clip)
        if kind == "momentum":  # optax.trace(decay=momentum): t = g + decay·t; then scale by −lr
            trace = u + momentum * trace
            update = -lr * trace
        elif kind == "sgd":
            update = -lr * u
        elif kind == "adam":  # optax.scale_by_adam, then scale by −lr
            mu = b1 * mu + (1 - b1) * u
            nu = b2 * nu + (1 - b2) * u * u
            count += 1
            mu_hat = mu / (1 - b1**count)
            nu_hat = nu / (1 - b2**count)
            update = -lr * mu_hat / (torch.sqrt(nu_hat + 0.0) + eps)
        else:
            raise ValueError(kind)
        x = x + update
    return torch.nan_to_num(x)


def backtracking_pr_cg(x0: Tensor, value_and_grad: ValueAndGrad, steps: int, textbook: bool = False) -> Tensor:
    """The reference's `cg_back_pr+`. `textbook=True` keeps the gradient of the iterate as `prev_grad` instead of
    the reference's `g1` (the gradient at params + update), which is what a textbook PR+ does."""

    def vg(x: Tensor) -> tuple[float, Tensor]:
        f, grad = value_and_grad(x)
        return float(f), sanitize(grad)

    x = x0.clone()
    state = {"step": 0, "prev_grad": torch.zeros_like(x), "prev_dir": torch.zeros_like(x), "ls_lr": 1.0}
    for _ in range(steps):
        fx, g = vg(x)  # nonlinear_cg.update_fn: fx, g = value_and_grad_fn(params)
        if state["step"] == 0:
            p = -g
        else:  # _beta("pr+"): max(g·y / max(g_prev·g_prev, 1e-30), 0); enforce_descent restart
            y = g - state["prev_grad"]
            gg_prev = max(float(state["prev_grad"] @ state["prev_grad"]), 1e-30)
            beta = max(float(g @ y) / gg_prev, 0.0)
            p = -g + beta * state["prev_dir"]
            if float(p @ g) >= 0:
                p = -g
        # optax.scale_by_backtracking_linesearch.update_fn(p, state, params, value=fx, grad=g, value_fn=...)
        slope = float(p @ g)
        search = {"lr": min(1.5 * state["ls_lr"], 1.0), "err": math.inf, "iter": 0}
        while (not search["err"] <= 0.0) and search["iter"] <= 20:
            lr = 0.8 * search["lr"] if search["iter"] > 0 else search["lr"]
            new_value, _ = vg(x + lr * p)
            err = new_value - (1.0 + 0.0) * fx - lr * 1e-4 * slope
            err = math.inf if math.isnan(err) else max(err, 0.0)
            search = {"lr": lr, "err": err, "iter": search["iter"] + 1}
        step = 0.0 if math.isinf(search["err"]) else search["lr"]
        update = step * p
        x1 = x + update
        _, g1 = vg(x1)
        state = {"step": state["step"] + 1, "prev_grad": g if textbook else g1, "prev_dir": p, "ls_lr": step}
        x = x + 1.0 * update  # the outer loop: updates · precond_lr (1 with a constant schedule), apply_updates
    return torch.nan_to_num(x)
