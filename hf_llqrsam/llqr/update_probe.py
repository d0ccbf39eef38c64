"""The optimizer's would-be update on the curvature gradient, for `llqr_apply="update"` (`docs/algorithm.md` §7.3).

With U applied to the base optimizer's output (θ ← θ_old + U·Δ_opt), the LLQR probe is δ = U·Δ_opt(g): the update
the optimizer would make from its current state if the gradient were the curvature gradient g, learning rate,
momentum or Adam normalisation and weight decay included. It is computed in closed form without mutating the
optimizer, for `torch.optim.SGD`, `torch.optim.Adam` and `torch.optim.AdamW`:

| optimizer | Δ_opt(g)                                                                                       |
|-----------|------------------------------------------------------------------------------------------------|
| SGD       | d = g + wd·θ; b = d (first step) or μ·b + (1 − τ)·d; Δ = −lr·(d + μ·b if nesterov else b)       |
| Adam      | d = g + wd·θ; m' = β₁m + (1 − β₁)d; v' = β₂v + (1 − β₂)d²; Δ = −lr/(1 − β₁ᵗ) · m'/(√v'/√(1 − β₂ᵗ) + ε) |
| AdamW     | as Adam with d = g, plus −lr·wd·θ (decoupled weight decay)                                     |

(t is the step about to be taken; `amsgrad` uses max(v_max, v'); `maximize` flips g.) Δ is a descent update, so the
probe points downhill. The reference negates it once more (**Open question** Q14); we do not.
"""

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["make_update_probe", "optimizer_update"]


def _sgd(group: dict[str, Any], state: dict[str, Any], p: Tensor, g: Tensor) -> Tensor:
    d = -g if group["maximize"] else g
    if group["weight_decay"]:
        d = d + group["weight_decay"] * p
    momentum = group["momentum"]
    if momentum:
        buf = state.get("momentum_buffer")
        buf = d if buf is None else momentum * buf + (1.0 - group["dampening"]) * d
        d = d + momentum * buf if group["nesterov"] else buf
    out: Tensor = -group["lr"] * d
    return out


def _adam(group: dict[str, Any], state: dict[str, Any], p: Tensor, g: Tensor) -> Tensor:
    beta1, beta2 = group["betas"]
    lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
    d = -g if group["maximize"] else g
    decay = torch.zeros_like(p)
    if wd:
        if group["decoupled_weight_decay"]:
            decay = -lr * wd * p
        else:
            d = d + wd * p
    step = float(state["step"]) + 1.0 if "step" in state else 1.0
    m = state["exp_avg"] if "exp_avg" in state else torch.zeros_like(p)
    v = state["exp_avg_sq"] if "exp_avg_sq" in state else torch.zeros_like(p)
    m = beta1 * m + (1.0 - beta1) * d
    v = beta2 * v + (1.0 - beta2) * d * d
    if group["amsgrad"]:
        v = torch.maximum(state["max_exp_avg_sq"], v) if "max_exp_avg_sq" in state else v
    bias1, bias2 = 1.0 - beta1**step, 1.0 - beta2**step
    denom = v.sqrt() / bias2**0.5 + eps
    # AdamW shrinks θ first and then adds the Adam step to the shrunk θ: both terms are linear in θ_old
    out: Tensor = decay - (lr / bias1) * m / denom
    return out


def optimizer_update(
    optimizer: torch.optim.Optimizer, params: Mapping[str, Tensor], grads: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """Δ_opt(g) for each named parameter, from the optimizer's current state, which is left untouched.

    Args:
        optimizer (`torch.optim.Optimizer`): an `SGD`, `Adam` or `AdamW` instance (not a wrapper).
        params (`Mapping[str, Tensor]`): canonical name → parameter, as handed to the optimizer.
        grads (`Mapping[str, Tensor]`): canonical name → gradient to probe with (the curvature gradient g).

    Returns:
        `dict[str, Tensor]`: canonical name → the update the optimizer would add to the parameter. Parameters the
        optimizer does not hold get a zero update.
    """
    match optimizer:
        case torch.optim.Adam():  # AdamW subclasses Adam with decoupled_weight_decay=True
            rule = _adam
        case torch.optim.SGD():
            rule = _sgd
        case _:
            raise ValueError(
                f"Invalid optimizer {type(optimizer).__name__} for LLQRConfig.apply='update': the dry-run update is "
                "implemented for torch.optim.SGD, Adam and AdamW only."
            )
    group_of = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    out = {}
    with torch.no_grad():
        for name, p in params.items():
            group = group_of.get(id(p))
            g = grads[name].to(p.dtype)
            out[name] = torch.zeros_like(g) if group is None else rule(group, optimizer.state.get(p, {}), p, g)
    return out


def make_update_probe(
    optimizer: torch.optim.Optimizer, model: nn.Module
) -> Callable[[Mapping[str, Tensor]], dict[str, Tensor]]:
    """The `update_probe` for [`~hf_llqrsam.llqr.LLQRPreconditioner.update`]: g ↦ Δ_opt(g) on `model`'s parameters."""
    params = dict(model.named_parameters())

    def probe(grads: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return optimizer_update(optimizer, {n: params[n] for n in grads}, grads)

    return probe
