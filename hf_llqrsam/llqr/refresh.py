"""The fit of U: one LLQR refresh on a curvature problem (arXiv 2605.04230; `docs/algorithm.md` §5.2–5.3).

    g, G ← curvature problem on the batch (eval mode, fp32)            [`refresh_problem`]
    V ← copy(U) (warm start) or I;  T solver steps on J(V) = −gᵀVg + ½ (Vg)ᵀ(G + λI)(Vg)
    U ← β·U + (1 − β)·V;  diagonal/scalar: U ← max(U, min_diag) unless inversion is allowed     [`Fit.fit_problem`]

The inner learning rate η and the EMA decay β are pure functions of the refresh's optimizer step
([`~hf_llqrsam.llqr.schedules`]); the inner loop is [`~hf_llqrsam.llqr.fit.fit_structure`].
"""

import logging
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .config import LLQRConfig
from .curvature import Extractor, curvature_problem
from .diagnostics import floor_fractions
from .fit import count_nonfinite, fit_structure
from .schedules import ema_decay_at, inner_lr_at
from .state import UState

__all__ = ["Fit", "refresh_problem", "rescale_probe"]

logger = logging.getLogger(__name__)

ProblemFn = Callable[[dict[str, Tensor]], Mapping[str, Tensor]]


def refresh_problem(
    config: LLQRConfig,
    model: nn.Module,
    batch: Mapping[str, Any],
    *,
    shift_labels: bool = False,
    extractor: Extractor | None = None,
    update_probe: Callable[[Mapping[str, Tensor]], Mapping[str, Tensor]] | None = None,
    pad_token_id: int | None = None,
    all_reduce: Callable[[Tensor], Tensor] | None = None,
) -> tuple[dict[str, Tensor], ProblemFn, Mapping[str, Tensor] | None, dict[str, Tensor]]:
    """The curvature problem of one refresh: g, v ↦ (G + λI)v, Δ_opt(g) with `apply="update"`, and the row counts.

    The arguments are those of [`~hf_llqrsam.llqr.LLQRPreconditioner.update`].

    Returns:
        `tuple`: g as {name: tensor}, the product on such dicts, Δ_opt(g) (`None` unless `config.apply == "update"`)
        and the diagnostics of [`~hf_llqrsam.llqr.curvature.curvature_problem`] (`rows`, `nonfinite_rows`).

    Raises:
        `ValueError`: naming `LLQRConfig.apply`, with `apply="update"` and no `update_probe`.
    """
    if config.apply == "update" and update_probe is None:
        raise ValueError(
            "LLQRConfig.apply='update' needs the optimizer's dry-run update: pass "
            "update_probe=make_update_probe(optimizer, model) to LLQRPreconditioner.update."
        )
    diagnostics: dict[str, Tensor] = {}
    g_dict, gv_dict = curvature_problem(
        model,
        batch,
        config,
        shift_labels=shift_labels,
        extractor=extractor,
        pad_token_id=pad_token_id,
        diagnostics=diagnostics,
        all_reduce=all_reduce,
    )
    probe = update_probe(g_dict) if config.apply == "update" and update_probe is not None else None
    return g_dict, gv_dict, probe, diagnostics


def rescale_probe(probe: list[Tensor], g: list[Tensor]) -> tuple[list[Tensor], float]:
    """`update_probe_scale="gradient_norm"`: the probe rescaled to ‖g‖₂ (global norms over U's tensors).

    Δ_opt(g) ← Δ_opt(g) · ‖g‖/‖Δ_opt(g)‖, so that J(U) = gᵀδ + ½ δᵀ(G + λI)δ at δ = U·Δ_opt(g) has the scale of
    the gradient mode's δ = −U·g, whatever the optimizer's learning rate (`docs/algorithm.md` §7.3, Q14). The
    direction, Adam's normalisation and momentum included, is kept. A zero probe stays zero (factor 0 logged).
    """
    g_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(g))).double()
    p_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(probe))).double()
    if not float(p_norm) > 0:
        return probe, 0.0
    factor = float(g_norm / p_norm)
    return list(torch._foreach_mul(probe, factor)), factor


class Fit:
    """Refreshes a [`~hf_llqrsam.llqr.state.UState`] from curvature problems; logs its two warnings once each.

    Args:
        u (`UState`): the U it refreshes (its `config` gives the settings).
    """

    def __init__(self, u: UState) -> None:
        self.u = u
        self.warned_skip = False  # the skipped-refresh warning is logged once per instance
        self.warned_floor = False  # so is the warning of entries driven to the min_diag floor

    def fit_problem(
        self,
        g_dict: Mapping[str, Tensor],
        gv_dict: ProblemFn,
        step: int | None = None,
        update: Mapping[str, Tensor] | None = None,
        *,
        rows: Tensor | int | None = None,
        nonfinite_rows: Tensor | int | None = None,
    ) -> dict[str, float]:
        """The refresh of U on a given curvature problem: inner loop, EMA merge, clamp (`docs/algorithm.md` §5.2–5.3).

        **Non-finite problems are skipped.** If g or Δ_opt(g) has a NaN/±Inf entry, or J at the first inner step
        is not finite (a non-finite or overflowing product (G + λI)·δ), U is not touched at all (no inner step, no
        EMA, no clamp; bit-identical), `num_updates` is unchanged, `last_update_step = step` (so the refresh is
        not retried before the next due step) and `llqr/skipped_refresh` is 1. The first skip of an instance logs
        one warning. The sanitised U-gradient of such a problem carries no information (one NaN curvature row
        makes g NaN everywhere, and NaN → 0, ±Inf → ±1), so a refresh on it would only count as one, or move U
        towards I without warm start.

        Args:
            g_dict (`Mapping[str, Tensor]`): name → g, for every name of U.
            gv_dict (`Callable`): maps such a dict v to (G + λI)v.
            step (`int`, *optional*): recorded as `last_update_step`; the schedules read it (0 when `None`).
            update (`Mapping[str, Tensor]`, *optional*): Δ_opt(g) for `apply="update"`; J is then evaluated
                at δ = U·Δ_opt(g) (`docs/algorithm.md` §7.3).
            rows (`Tensor` or `int`, *optional*), nonfinite_rows (`Tensor` or `int`, *optional*): the curvature
                batch's row count and its rows with a non-finite loss, for the warning of a skipped refresh.

        Returns:
            `dict[str, float]`: `llqr/updates`, `llqr/skipped_refresh` (1.0 or 0.0), `llqr/u_min`, `llqr/u_max`,
            `llqr/u_mean`, `llqr/u_rms_displacement`, `llqr/u_at_floor` ([`~hf_llqrsam.llqr.diagnostics`]) and
            `llqr/memory_bytes`; a refresh that ran also has `llqr/objective_start`, `llqr/objective_end`,
            `llqr/objective_ratio` (J_end / J_start, NaN when J_start is 0 or not finite), `llqr/ugrad_norm`,
            `llqr/clip_fraction`, `llqr/nonfinite_ugrad`, `llqr/inner_lr`, `llqr/ema_decay` and, with
            `apply="update"` and `update_probe_scale="gradient_norm"`, `llqr/update_probe_scale` (‖g‖/‖Δ_opt(g)‖).

        With `apply="update"` and `update_probe_scale="gradient_norm"` (the default) the probe is rescaled to ‖g‖
        before the inner loop ([`rescale_probe`]; `docs/algorithm.md` §7.3). A refresh that leaves more than 1 % of
        some tensor's entries at `min_diag` logs one warning per instance ([`_warn_floor`]).
        """
        u, cfg = self.u, self.u.config
        if set(g_dict) != set(u.names):
            raise ValueError("The model's trainable parameters changed since the LLQR preconditioner was built.")
        names = u.names
        g = [g_dict[n].to(u.dtype) for n in names]
        rows_info = (rows, nonfinite_rows)
        bad = count_nonfinite(g)
        if bad:
            return self._skip(step, f"the gradient g has {bad} non-finite entries", *rows_info)

        def gv(v: list[Tensor]) -> list[Tensor]:
            out = gv_dict(dict(zip(names, v, strict=True)))
            return [out[n].to(u.dtype) for n in names]

        probe = None if update is None else [-update[n].to(u.dtype) for n in names]  # δ = −U·probe = U·Δ_opt(g)
        if probe is not None and (bad := count_nonfinite(probe)):
            reason = f"the optimizer's dry-run update Δ_opt(g) has {bad} non-finite entries"
            return self._skip(step, reason, *rows_info)
        probe_scale = None
        if probe is not None and cfg.update_probe_scale == "gradient_norm":
            probe, probe_scale = rescale_probe(probe, g)
        whole = u.gathered()  # FSDP2: the inner loop runs on whole tensors, the same on every rank
        v_struct = whole.clone() if cfg.warm_start else whole.identity()
        # the schedules are pure functions of the refresh's optimizer step (`llqr/schedules.py`)
        lr, decay = inner_lr_at(cfg, 0 if step is None else step), ema_decay_at(cfg, 0 if step is None else step)
        stats = fit_structure(
            v_struct,
            g,
            gv,
            steps=cfg.inner_steps,
            lr=lr,
            momentum=cfg.inner_momentum,
            clip_norm=cfg.clip_norm,
            probe=probe,
            stop_if_nonfinite=True,
            solver=cfg.inner_solver,
            cg_beta=cfg.cg_beta,
        )
        if stats.stopped:
            reason = f"J at the first inner step is {stats.objective_start} (the curvature products are not finite)"
            return self._skip(step, reason, *rows_info)
        whole.ema_(v_struct, decay)
        if not cfg.allow_inversion:
            whole.clamp_(cfg.min_diag)
        u.scatter_(whole)  # a no-op unless sharded: `whole` is U itself
        u.num_updates += 1
        u.last_update_step = step
        self._warn_floor(step, floor_fractions(whole, u.min_diag), lr, decay)
        start_j, end_j = stats.objective_start, stats.objective_end
        extra = {} if probe_scale is None else {"llqr/update_probe_scale": probe_scale}
        return {
            "llqr/objective_start": start_j,
            "llqr/objective_end": end_j,
            "llqr/objective_ratio": end_j / start_j if start_j != 0 and math.isfinite(start_j) else float("nan"),
            **extra,
            "llqr/ugrad_norm": stats.ugrad_norm,
            "llqr/clip_fraction": stats.clip_fraction,
            "llqr/nonfinite_ugrad": float(stats.nonfinite_ugrad),
            "llqr/inner_lr": lr,
            "llqr/ema_decay": decay,
            **u.metrics(skipped=False, whole=whole),
        }

    def _warn_floor(self, step: int | None, fractions: Mapping[str, float], lr: float, decay: float) -> None:
        """Warn once per instance when a refresh leaves more than 1 % of some tensor's entries at `min_diag`."""
        hit = {name: frac for name, frac in fractions.items() if frac > 0.01}
        if not hit or self.warned_floor:
            return
        self.warned_floor = True
        min_diag = self.u.config.min_diag
        worst = sorted(hit.items(), key=lambda item: -item[1])
        shown = ", ".join(f"{name} {frac:.1%}" for name, frac in worst[:8]) + (
            f" and {len(worst) - 8} more" if len(worst) > 8 else ""
        )
        where = f" at step {step}" if step is not None else ""
        logger.warning(
            f"LLQR refresh{where} drove more than 1 % of the entries of {len(hit)} tensor(s) of U to the floor "
            f"LLQRConfig.min_diag={min_diag:g}: {shown}. Those entries scale their gradient by about {min_diag:g}, "
            f"which freezes the parameters. The settings that cause it: LLQRConfig.inner_lr={lr:g} (the inner "
            f"loop's step size; a large one overshoots below 0), LLQRConfig.ema_decay={decay:g} (a small β keeps "
            f"more of the overshoot) and LLQRConfig.min_diag={min_diag:g} (the floor itself). Lower inner_lr or "
            "raise ema_decay. Logged once; llqr/u_at_floor gives the fraction at every refresh."
        )

    def _skip(
        self, step: int | None, reason: str, rows: Tensor | int | None, nonfinite_rows: Tensor | int | None
    ) -> dict[str, float]:
        """Skip a refresh whose curvature problem is not finite: U and `num_updates` stay, the step is recorded."""
        self.u.last_update_step = step
        if not self.warned_skip:
            self.warned_skip = True
            where = f" at step {step}" if step is not None else ""
            counted = (
                f"; {int(nonfinite_rows)} of {int(rows)} curvature rows have a non-finite loss (NaN/Inf logits or "
                "inputs)"
                if nonfinite_rows is not None and rows is not None
                else ""
            )
            logger.warning(
                f"LLQR refresh{where} skipped: {reason}{counted}. U is kept unchanged and the refresh is not retried "
                "before the next due step. Further skips are counted in llqr/skipped_refresh without a warning."
            )
        return self.u.metrics(skipped=True)
