"""The label-noise benchmark's training loop: the trainer's step in plain torch on the package's public math API.

`tests/recipes/test_label_noise.py` checks it against `LLQRSAMTrainer` on a tiny MLP (parameters equal to 1e-6).
"""

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hf_llqrsam import LLQRConfig, LLQRPreconditioner, SAMConfig, SAMState, compute_perturbation
from hf_llqrsam.modes import MODES
from hf_llqrsam.sam import apply_perturbation_, looksam_orthogonal, looksam_reuse_, restore_, wsam_descent_

from .protocol import Method


def _grad_at(
    model: nn.Module, params: list[Tensor], xb: Tensor, yb: Tensor, eps: list[Tensor] | None = None
) -> list[Tensor]:
    """∇L on the batch at θ + ε (θ restored exactly afterwards), or at θ."""
    backups = apply_perturbation_(params, eps) if eps is not None else None
    try:
        return list(torch.autograd.grad(F.cross_entropy(model(xb), yb), params))
    finally:
        if backups is not None:
            restore_(params, backups)


def train(
    model: nn.Module,
    method: Method,
    optimizer: torch.optim.Optimizer,
    rho: float,
    batches: Sequence[Tensor],
    x: Tensor,
    y: Tensor,
    llqr: LLQRConfig | None = None,
    curvature_indices: Callable[[int], Sequence[int]] | None = None,
    on_refresh: Callable[[int, LLQRPreconditioner, dict], None] | None = None,
    looksam_interval: int | None = None,
    sam_kwargs: dict[str, Any] | None = None,
) -> dict:
    """The trainer's step, one optimizer step per entry of `batches` (index tensors into x, y).

    Per step, as `LLQRSAMTrainer` does: refresh U if due (before pass 1); pass 1 gradient g at θ; ε from
    `compute_perturbation` (C = U with LLQR); pass 2 gradient g̃ at θ + ε; θ restored by copy; the mode's descent
    (LookSAM's g_v stored on a full step or reused on the others, WSAM's g + a(g̃ − g) or, decoupled, g and then
    θ ← θ − lr·a(g̃ − g) after the step); g̃ ← U·g̃; optimizer step. past-FSAM has no pass 1: ε comes from the stored
    g̃ₜ₋₁ (zeros at the first step), and this step's g̃ is stored for the next. A non-finite ascent or descent skips
    the step.
    """
    names, params = (
        list(t) for t in zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad], strict=True)
    )
    extra = {} if looksam_interval is None else {"looksam_interval": looksam_interval}
    cfg = SAMConfig(
        mode=method.sam_mode if method.sam_mode != "none" else "sam", rho=rho, **extra, **(sam_kwargs or {})
    )
    state = SAMState()
    pre = LLQRPreconditioner(model, llqr) if llqr is not None else None
    period = cfg.looksam_interval if method.sam_mode == "looksam" else 1
    one_pass = method.sam_mode == "past_fsam"
    skipped = 0
    for step, idx in enumerate(batches):
        if pre is not None and pre.is_due(step):
            cidx = curvature_indices(step) if curvature_indices is not None else idx
            metrics = pre.update(model, {"x": x[cidx], "labels": y[cidx]}, step=step)
            if on_refresh is not None:
                on_refresh(step, pre, metrics)
        xb, yb = x[idx], y[idx]
        is_sam = method.sam_mode != "none" and step % period == 0
        geometry = pre if pre is not None and llqr is not None and llqr.in_perturbation else None
        ok, commit, sharp = True, {}, []
        if one_pass:
            before = (dict(state.buffers.get("gbar", {})), state.ascents)  # ḡ is put back on a skipped step
            pert = compute_perturbation(cfg, state, names, params, state.get("g_last", names, params), rho, geometry)
            ok = pert.finite
            g = _grad_at(model, params, xb, yb, pert.eps) if ok else []
            if ok:
                commit["g_last"] = [t.clone() for t in g]
        else:
            g = _grad_at(model, params, xb, yb)
        if is_sam and not one_pass:
            pert = compute_perturbation(cfg, state, names, params, g, rho, geometry)
            ok = pert.finite
            if ok:
                g = _grad_at(model, params, xb, yb, pert.eps)
                if method.sam_mode == "looksam":
                    commit["gv"] = looksam_orthogonal(pert.clean_grads, g)
                elif method.sam_mode == "wsam":
                    sharp = wsam_descent_(g, pert.clean_grads, cfg.wsam_gamma, cfg.wsam_decouple)
        elif method.sam_mode == "looksam" and state.has("gv"):
            looksam_reuse_(g, state.get("gv", names, g), cfg.looksam_alpha)
        if ok and pre is not None and llqr is not None and llqr.on_update and MODES[cfg.mode].llqr_descent:
            pre.apply_(names, g)
        ok = ok and all(bool(torch.isfinite(t).all()) for t in g)
        if not ok:
            skipped += 1
            if one_pass:
                gbar, state.ascents = before
                if gbar:
                    state.buffers["gbar"] = gbar
                else:
                    state.buffers.pop("gbar", None)
            continue
        for kind, tensors in commit.items():
            state.set(kind, names, tensors)
        for p, t in zip(params, g, strict=True):
            p.grad = t
        optimizer.step()
        for p in params:
            p.grad = None
        if sharp:  # decoupled WSAM: the sharpness term's own SGD step, at the group's lr
            with torch.no_grad():
                lr = float(optimizer.param_groups[0]["lr"])
                for p, t in zip(params, sharp, strict=True):
                    p.add_(t.to(p.dtype), alpha=-lr)
    return {"skipped": skipped, "refreshes": pre.num_updates if pre is not None else 0, "preconditioner": pre}
