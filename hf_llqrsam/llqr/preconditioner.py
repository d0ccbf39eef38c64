"""The LLQR preconditioner: owns U, refreshes it from a curvature batch and applies it (arXiv 2605.04230).

One refresh (`docs/algorithm.md` §5.2–5.3):

    g, G ← curvature problem on the batch (eval mode, fp32)
    V ← copy(U) (warm start) or I;  T clipped SGD-momentum steps on J(V) = −gᵀVg + ½ (Vg)ᵀ(G + λI)(Vg)
    U ← β·U + (1 − β)·V;  diagonal/scalar: U ← max(U, min_diag) unless inversion is allowed
"""

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .config import LLQRConfig
from .curvature import Extractor, curvature_problem
from .diagnostics import block_summary, floor_fractions, u_diagnostics
from .fit import count_nonfinite, fit_structure
from .layout import clip_groups, fallback_names, tensor_layouts, trainable_parameters
from .schedules import check_schedules, ema_decay_at, inner_lr_at, update_interval_at
from .sharding import full_tensor, is_dtensor, shard_like
from .structures import DiagonalStructure, LLQRStateError, Structure, make_structure

__all__ = ["LLQRPreconditioner", "LLQRStateError"]

logger = logging.getLogger(__name__)


class LLQRPreconditioner:
    """The learned, block-structured inverse preconditioner U; the descent direction is U·g.

    Blocks are keyed by the canonical names of `model`'s trainable tensors (`requires_grad`, tied tensors once under
    their first `named_parameters()` name). Names it does not hold (frozen tensors, say) are passed through as
    the identity. It implements the [`~hf_llqrsam.sam.Preconditioner`] protocol. U is fp32 (fp64 for an fp64 model).

    Args:
        model (`nn.Module`): the unwrapped eager model.
        config (`LLQRConfig`): the LLQR settings.

    Example:

    ```python
    >>> import torch
    >>> from torch import nn
    >>> from hf_llqrsam.llqr import LLQRConfig, LLQRPreconditioner
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    >>> pre = LLQRPreconditioner(model, LLQRConfig(inner_steps=5))
    >>> metrics = pre.update(model, {"input": torch.randn(16, 4), "labels": torch.randint(0, 3, (16,))}, step=0)
    >>> grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]
    >>> pre.apply_(pre.names, grads)  # grads ← U·grads
    ```
    """

    def __init__(self, model: nn.Module, config: LLQRConfig, device: torch.device | str | None = None) -> None:
        """Build U = I over `model`'s trainable tensors.

        `device` places U (the trainer passes `accelerator.device`); it defaults to the parameters' device. Under
        FSDP2 (DTensor parameters) every tensor of U with its parameter's shape is a DTensor sharded like that
        parameter, created shard by shard (U is never materialised whole), and the `scalar` structure's c stays a
        replicated 0-dim tensor. Kronecker structures raise there ([`_materialise_sharded`]).
        """
        self.config = config
        self._milestones = check_schedules(config)
        params = [p for _, p in trainable_parameters(model)]
        if not params:
            raise ValueError("LLQR needs at least one trainable parameter.")
        layouts = tensor_layouts(model)
        self.names: list[str] = [lay.name for lay in layouts]
        self.fallback_names: list[str] = fallback_names(layouts)
        self._index = {n: i for i, n in enumerate(self.names)}
        self.dtype = torch.promote_types(params[0].dtype, torch.float32)
        self.structure: Structure = make_structure(
            config.structure,
            layouts,
            clip_groups(layouts, config.clip_groups),
            identity_scaling=config.identity_scaling,
            dtype=self.dtype,
            device="meta" if any(is_dtensor(p) for p in params) else (device or params[0].device),
        )
        self._sharded = self._materialise_sharded(model, device)
        self.num_updates: int = 0
        self.last_update_step: int | None = None
        self._warned_skip = False  # the skipped-refresh warning is logged once per instance
        self._warned_floor = False  # so is the warning of entries driven to the llqr_min_diag floor

    @property
    def _min_diag(self) -> float | None:
        """The positivity floor of U's stored entries, `None` when the clamp is off (`llqr_allow_inversion`)."""
        return None if self.config.allow_inversion else self.config.min_diag

    @torch.no_grad()
    def _materialise_sharded(self, model: nn.Module, device: torch.device | str | None) -> bool:
        """FSDP2: replace the meta identity of U by real tensors, each DTensor sharded like its parameter.

        The identity of `diagonal` and `scalar` U is the constant s (`llqr_identity_scaling`), so each shard is made
        in place with `full_like(parameter)`: no rank ever holds a whole tensor of U. Returns whether any tensor of
        U is sharded (`False`, and nothing done, when no parameter is a DTensor).
        """
        params = dict(trainable_parameters(model))
        if not any(is_dtensor(p) for p in params.values()):
            return False
        if self.config.structure not in ("diagonal", "scalar"):
            raise ValueError(
                f"Invalid llqr_structure={self.config.structure!r} under FSDP2: Kronecker factors act on both sides "
                "of each kernel (U(X) = A X Bᵀ), while FSDP2 shards every kernel by rows (Shard(0), the output side "
                "that Bᵀ mixes). Applying U to a gradient shard would need the kernel's whole gradient on every rank "
                "(an extra all-gather per kernel and step), and the n×n factor cannot be sharded like its parameter. "
                "Use llqr_structure='diagonal' or 'scalar' under FSDP2, or DDP for Kronecker structures."
            )
        first = next(iter(params.values()))
        plain_device = torch.device(device) if device is not None else first.device
        scale, real = self.structure.scale, {}
        for layout, block in zip(self.structure.layouts, self.structure.blocks, strict=True):
            p = params[layout.name]
            for key, meta in block.items():
                if id(meta) not in real:
                    if is_dtensor(p) and tuple(meta.shape) == tuple(p.shape):
                        real[id(meta)] = torch.full_like(p, scale, dtype=self.dtype)
                    else:  # scalar c (one per clip group, replicated), or a parameter FSDP2 does not manage
                        real[id(meta)] = torch.full(meta.shape, scale, dtype=self.dtype, device=plain_device)
                block[key] = real[id(meta)]
        self.structure.device = plain_device
        return True

    def _gathered(self) -> Structure:
        """U with whole tensors: U itself, or under FSDP2 a copy whose DTensor shards are all-gathered (collective)."""
        return self.structure.map_tensors(full_tensor) if self._sharded else self.structure

    @torch.no_grad()
    def _scatter_(self, whole: Structure) -> None:
        """U ← `whole` (from [`_gathered`]): each rank keeps its own shards (a local slice, no communication)."""
        for t, w in zip(self.structure.parameters(), whole.parameters(), strict=True):
            if t is not w:
                t.copy_(shard_like(w, t))

    # ---- cadence ------------------------------------------------------------------------------------------
    def _on_grid(self, step: int) -> bool:
        """k % E(k) == 0 and k < until: the refresh grid 0, E, 2E, … (§5.4)."""
        until = self.config.update_until
        return step % update_interval_at(self.config.update_interval, self._milestones, step) == 0 and (
            until is None or step < until
        )

    def is_due(self, step: int, lr_at: Callable[[int], float] | None = None) -> bool:
        """Whether a refresh runs before optimizer step `step`: k % E(k) == 0, k < until, once per k (§5.4).

        E(k) is `update_interval`, or piecewise constant with `update_interval_milestones`
        ([`~hf_llqrsam.llqr.schedules.update_interval_at`]); a pure function of k, so resume needs no state.

        With `llqr_apply="update"` and `lr_at` (k ↦ the base optimizer's learning rate at step k, from the LR
        schedule) a refresh needs an informative probe Δ_opt(g), which is zero at a zero learning rate: a grid step
        whose LR is 0 (a warm-up that starts at 0) is deferred to the first later step with LR > 0, and the grid
        itself is unchanged (the refreshes after it stay at E, 2E, …). So k is due when LR(k) > 0 and, walking back
        from k, a grid step is met before any earlier step with LR > 0; still a pure function of k and the
        schedule. In `gradient` mode, or without `lr_at`, `lr_at` is not read.
        """
        if step == self.last_update_step:
            return False
        if self.config.apply != "update" or lr_at is None:
            return self._on_grid(step)
        until = self.config.update_until
        if (until is not None and step >= until) or not lr_at(step) > 0:
            return False
        for k in range(step, -1, -1):  # usually two look-ups: LR(k) > 0 and LR(k − 1) > 0 end it off the grid
            if k < step and lr_at(k) > 0:
                return False  # a step with LR > 0 after the last grid step: that step had the refresh
            if self._on_grid(k):
                return True
        return False

    # ---- applying U ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def apply(self, names: Sequence[str], tensors: Sequence[Tensor]) -> list[Tensor]:
        """U·t for each tensor as a new fp32 tensor (fp64 stays fp64); identity for names not in U."""
        # one fused multiply (DTensor shards too: a local product), unless DTensors and plain tensors are mixed
        uniform = len({is_dtensor(t) for t in tensors}) <= 1
        if list(names) == self.names and isinstance(self.structure, DiagonalStructure) and uniform:
            return self.structure.apply(tensors)  # the default: fused, no per-tensor loop (falls back on dtype)
        out = []
        for name, t in zip(names, tensors, strict=True):
            x = t.detach().to(torch.promote_types(t.dtype, torch.float32), copy=True)
            i = self._index.get(name)
            out.append(x if i is None else self.structure.apply_block(i, x.to(self.dtype)).to(x.dtype))
        return out

    @torch.no_grad()
    def apply_(self, names: Sequence[str], tensors: Sequence[Tensor]) -> None:
        """t ← U·t in place, cast back to each tensor's dtype; names not in U are left untouched."""
        fast_t, fast_d = [], []
        for name, t in zip(names, tensors, strict=True):
            i = self._index.get(name)
            if i is None:
                continue
            if isinstance(self.structure, DiagonalStructure) and t.dtype == self.dtype:
                fast_t.append(t)
                fast_d.append(self.structure.blocks[i]["d"])
            else:
                t.copy_(self.structure.apply_block(i, t.to(self.dtype)))
        # one fused multiply per kind: FSDP2 shards multiply locally, but one foreach call cannot mix DTensors and
        # plain tensors (a parameter FSDP2 does not manage)
        for kind in {is_dtensor(t) for t in fast_t}:
            ts = [t for t in fast_t if is_dtensor(t) == kind]
            torch._foreach_mul_(ts, [d for t, d in zip(fast_t, fast_d, strict=True) if is_dtensor(t) == kind])
            if self.structure.scale != 1.0:
                torch._foreach_div_(ts, self.structure.scale)

    # ---- refreshing U -------------------------------------------------------------------------------------
    def update(
        self,
        model: nn.Module,
        batch: Mapping[str, Any],
        step: int | None = None,
        *,
        shift_labels: bool = False,
        extractor: Extractor | None = None,
        update_probe: Callable[[Mapping[str, Tensor]], Mapping[str, Tensor]] | None = None,
        pad_token_id: int | None = None,
        all_reduce: Callable[[Tensor], Tensor] | None = None,
    ) -> dict[str, float]:
        """One LLQR refresh of U on the curvature batch (`docs/algorithm.md` §5.2–5.3); leaves every `p.grad`
        untouched.

        A curvature problem that is not finite (g, Δ_opt(g), or J at the first inner step) skips the refresh and
        keeps U bit for bit (see [`fit_problem`]).

        Args:
            model (`nn.Module`): the unwrapped eager model (the one U was built for).
            batch (`Mapping[str, Any]`): model inputs plus `labels`.
            step (`int`, *optional*): the optimizer step, recorded as `last_update_step`.
            shift_labels (`bool`, *optional*, defaults to `False`): causal-LM shift of the default extractor.
            extractor (`Callable`, *optional*): `(model, batch) -> (logits, targets, row_mask)`.
            update_probe (`Callable`, *optional*): g ↦ Δ_opt(g), the base optimizer's dry-run update
                ([`~hf_llqrsam.llqr.update_probe.make_update_probe`]); required with `llqr_apply="update"`, where
                J is evaluated at δ = U·Δ_opt(g) (`docs/algorithm.md` §7.3).
            pad_token_id (`int`, *optional*): with `include_pad_rows`, the target of `labels == -100` rows (the
                reference's "predict pad" rows, `docs/algorithm.md` §4.1); without it those rows count in N but add
                nothing to the loss numerator. Ignored when `include_pad_rows` is off.
            all_reduce (`Callable`, *optional*): the sum over ranks used by `llqr_curvature_sharding="sharded"`,
                `t ↦ Σ_ranks t` (the trainer passes Accelerate's `reduce`); defaults to `torch.distributed`.

        Under FSDP2 pass an unsharded view of the model (`hf_llqrsam.distributed.unsharded_view`): the inner loop
        then runs on whole tensors of U, identical on every rank, and each rank keeps its shards of the result.

        Returns:
            `dict[str, float]`: the `llqr/*` metrics of `docs/integration.md` §11 (see [`fit_problem`]) and
            `llqr/update_seconds`.
        """
        cfg = self.config
        if cfg.apply == "update" and update_probe is None:
            raise ValueError(
                "llqr_apply='update' needs the optimizer's dry-run update: pass "
                "update_probe=make_update_probe(optimizer, model) to LLQRPreconditioner.update."
            )
        start = time.perf_counter()
        diagnostics: dict[str, Tensor] = {}
        g_dict, gv_dict = curvature_problem(
            model,
            batch,
            divergence=cfg.divergence,
            damping=cfg.damping,
            ngd_scaling=cfg.ngd_scaling,
            label_smoothing=cfg.label_smoothing,
            renyi_alpha=cfg.renyi_alpha,
            include_pad_rows=cfg.include_pad_rows,
            shift_labels=shift_labels,
            chunk_size=cfg.chunk_size,
            extractor=extractor,
            sharded=cfg.curvature_sharding == "sharded" and dist.is_available() and dist.is_initialized(),
            pad_token_id=pad_token_id,
            diagnostics=diagnostics,
            all_reduce=all_reduce,
        )
        probe_dict = update_probe(g_dict) if cfg.apply == "update" and update_probe is not None else None
        metrics = self.fit_problem(
            g_dict,
            gv_dict,
            step=step,
            update=probe_dict,
            rows=diagnostics["rows"],
            nonfinite_rows=diagnostics["nonfinite_rows"],
        )
        metrics["llqr/update_seconds"] = time.perf_counter() - start
        return metrics

    def fit_problem(
        self,
        g_dict: Mapping[str, Tensor],
        gv_dict: Callable[[dict[str, Tensor]], Mapping[str, Tensor]],
        step: int | None = None,
        update: Mapping[str, Tensor] | None = None,
        *,
        rows: Tensor | int | None = None,
        nonfinite_rows: Tensor | int | None = None,
    ) -> dict[str, float]:
        """The refresh of U on a given curvature problem: inner loop, EMA merge, clamp (`docs/algorithm.md` §5.2–5.3).

        [`update`] builds (g, G·v) from a model and a batch and calls this. Call it directly when the curvature
        problem comes from elsewhere (an analytic quadratic, as in the pothole toy).

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
            step (`int`, *optional*): recorded as `last_update_step`.
            update (`Mapping[str, Tensor]`, *optional*): Δ_opt(g) for `llqr_apply="update"`; J is then evaluated
                at δ = U·Δ_opt(g) (`docs/algorithm.md` §7.3).
            rows (`Tensor` or `int`, *optional*), nonfinite_rows (`Tensor` or `int`, *optional*): the curvature
                batch's row count and its rows with a non-finite loss, for the warning of a skipped refresh.

        Returns:
            `dict[str, float]`: `llqr/updates`, `llqr/skipped_refresh` (1.0 or 0.0), `llqr/u_min`, `llqr/u_max`,
            `llqr/u_mean`, `llqr/u_rms_displacement`, `llqr/u_at_floor` ([`~hf_llqrsam.llqr.diagnostics`]) and
            `llqr/memory_bytes`; a refresh that ran also has `llqr/objective_start`, `llqr/objective_end`,
            `llqr/objective_ratio` (J_end / J_start, NaN when J_start is 0 or not finite), `llqr/ugrad_norm`,
            `llqr/clip_fraction`, `llqr/nonfinite_ugrad`, `llqr/inner_lr`, `llqr/ema_decay` and, with
            `llqr_apply="update"` and `update_probe_scale="gradient_norm"`, `llqr/update_probe_scale` (‖g‖/‖Δ_opt(g)‖).

        With `apply="update"` and `update_probe_scale="gradient_norm"` (the default) the probe is rescaled to ‖g‖
        before the inner loop ([`_rescale_probe`]; `docs/algorithm.md` §7.3). A refresh that leaves more than 1 % of
        some tensor's entries at `min_diag` logs one warning per instance ([`_warn_floor`]).
        """
        cfg = self.config
        if set(g_dict) != set(self.names):
            raise ValueError("The model's trainable parameters changed since the LLQR preconditioner was built.")
        names = self.names
        g = [g_dict[n].to(self.dtype) for n in names]
        rows_info = (rows, nonfinite_rows)
        bad = count_nonfinite(g)
        if bad:
            return self._skip(step, f"the gradient g has {bad} non-finite entries", *rows_info)

        def gv(v: list[Tensor]) -> list[Tensor]:
            out = gv_dict(dict(zip(names, v, strict=True)))
            return [out[n].to(self.dtype) for n in names]

        probe = None if update is None else [-update[n].to(self.dtype) for n in names]  # δ = −U·probe = U·Δ_opt(g)
        if probe is not None and (bad := count_nonfinite(probe)):
            reason = f"the optimizer's dry-run update Δ_opt(g) has {bad} non-finite entries"
            return self._skip(step, reason, *rows_info)
        probe_scale = None
        if probe is not None and cfg.update_probe_scale == "gradient_norm":
            probe, probe_scale = self._rescale_probe(probe, g)
        whole = self._gathered()  # FSDP2: the inner loop runs on whole tensors, the same on every rank
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
        self._scatter_(whole)  # a no-op unless sharded: `whole` is U itself
        self.num_updates += 1
        self.last_update_step = step
        self._warn_floor(step, floor_fractions(whole, self._min_diag), lr, decay)
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
            **self._summary(skipped=False, whole=whole),
        }

    @staticmethod
    def _rescale_probe(probe: list[Tensor], g: list[Tensor]) -> tuple[list[Tensor], float]:
        """`llqr_update_probe_scale="gradient_norm"`: the probe rescaled to ‖g‖₂ (global norms over U's tensors).

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

    def _warn_floor(self, step: int | None, fractions: Mapping[str, float], lr: float, decay: float) -> None:
        """Warn once per instance when a refresh leaves more than 1 % of some tensor's entries at `llqr_min_diag`."""
        hit = {name: frac for name, frac in fractions.items() if frac > 0.01}
        if not hit or self._warned_floor:
            return
        self._warned_floor = True
        worst = sorted(hit.items(), key=lambda item: -item[1])
        shown = ", ".join(f"{name} {frac:.1%}" for name, frac in worst[:8]) + (
            f" and {len(worst) - 8} more" if len(worst) > 8 else ""
        )
        where = f" at step {step}" if step is not None else ""
        logger.warning(
            f"LLQR refresh{where} drove more than 1 % of the entries of {len(hit)} tensor(s) of U to the floor "
            f"llqr_min_diag={self.config.min_diag:g}: {shown}. Those entries scale their gradient by about "
            f"{self.config.min_diag:g}, which freezes the parameters. The flags that cause it: llqr_inner_lr={lr:g} "
            f"(the inner loop's step size; a large one overshoots below 0), llqr_ema_decay={decay:g} (a small β "
            f"keeps more of the overshoot) and llqr_min_diag={self.config.min_diag:g} (the floor itself). Lower "
            "llqr_inner_lr or raise llqr_ema_decay. Logged once; llqr/u_at_floor gives the fraction at every refresh."
        )

    def u_summary(self) -> dict[str, Any]:
        """Per tensor of U: structure, entries, min, max, mean, RMS displacement and fraction at the floor
        ([`~hf_llqrsam.llqr.diagnostics.block_summary`]), with the last refresh's step; a collective under FSDP2."""
        blocks = block_summary(self._gathered(), self._min_diag)
        for row in blocks.values():
            row["last_update_step"] = self.last_update_step
        return {
            "structure": self.config.structure,
            "num_updates": self.num_updates,
            "last_update_step": self.last_update_step,
            "min_diag": None if self._min_diag is None else float(self._min_diag),
            "modules": blocks,
        }

    def _summary(self, skipped: bool, whole: Structure | None = None) -> dict[str, float]:
        whole = whole or self._gathered()
        diag = torch.cat(whole.diagonal_parts())
        u_min, u_max, u_mean = (float(x) for x in (diag.min(), diag.max(), diag.mean()))
        return {
            "llqr/updates": float(self.num_updates),
            "llqr/skipped_refresh": 1.0 if skipped else 0.0,
            "llqr/u_min": u_min,
            "llqr/u_max": u_max,
            "llqr/u_mean": u_mean,
            **u_diagnostics(whole, self._min_diag),
            "llqr/memory_bytes": float(self.memory_bytes()),
        }

    def _skip(
        self, step: int | None, reason: str, rows: Tensor | int | None, nonfinite_rows: Tensor | int | None
    ) -> dict[str, float]:
        """Skip a refresh whose curvature problem is not finite: U and `num_updates` stay, the step is recorded."""
        self.last_update_step = step
        if not self._warned_skip:
            self._warned_skip = True
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
        return self._summary(skipped=True)

    # ---- multi-process, memory, checkpoints ---------------------------------------------------------------
    @torch.no_grad()
    def broadcast_(self, src: int = 0, broadcast: Callable[[Tensor, int], Tensor] | None = None) -> None:
        """Make every rank hold rank `src`'s U (removes floating-point drift between replicated updates).

        Args:
            src (`int`, *optional*, defaults to 0): the rank whose U is kept.
            broadcast (`Callable`, *optional*): `(tensor, src) ↦ tensor` holding rank `src`'s values, in place or
                returned (the trainer passes Accelerate's `broadcast`); defaults to `torch.distributed.broadcast`.

        All tensors go in one collective (their concatenation). DTensor shards of U (FSDP2) are skipped: every entry
        has exactly one owner, so there is nothing to agree on.
        """
        if not (dist.is_available() and dist.is_initialized()):
            return
        plain = [t for t in self.structure.parameters() if not is_dtensor(t)]
        if not plain:
            return
        flat = torch.cat([t.reshape(-1) for t in plain])
        if broadcast is None:
            dist.broadcast(flat, src)
        else:
            flat = broadcast(flat, src)
        offset = 0
        for t in plain:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()

    def memory_bytes(self) -> int:
        """Bytes held by the structure tensors of U."""
        return self.structure.memory_bytes()

    def fingerprint(self) -> dict[str, Any]:
        """Everything that gives the stored tensors of U their meaning, in `weights_only`-safe primitives.

        `structure`, `identity_scaling` (U is stored as s·U), `clip_groups` (the `scalar` structure holds one c per
        group), `blocks` (the ordered `[canonical name, shape]` of U's tensors) and `fallback_names` (matrix-like
        tensors with a diagonal block). `min_diag` and `allow_inversion` are recorded to explain range errors; they
        do not change U's meaning and are not compared.
        """
        cfg = self.config
        return {
            "structure": cfg.structure,
            "identity_scaling": float(cfg.identity_scaling),
            "clip_groups": cfg.clip_groups,
            "blocks": [[lay.name, list(lay.shape)] for lay in self.structure.layouts],
            "fallback_names": list(self.fallback_names),
            "min_diag": float(cfg.min_diag),
            "allow_inversion": bool(cfg.allow_inversion),
        }

    def state_dict(self) -> dict[str, Any]:
        """U, the counters and the [`fingerprint`]; tensors and primitives only (loads with `weights_only=True`)."""
        return {
            "structure": self.config.structure,
            "num_updates": self.num_updates,
            "last_update_step": self.last_update_step,
            "fingerprint": self.fingerprint(),
            "blocks": self.structure.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any], source: str = "llqrsam_state.pt") -> None:
        """Restore U and the counters after checking that they mean the same U in this run (nothing changes if not).

        Checks, in order: the keys of `state`; the [`fingerprint`] against this run (`llqr_structure`,
        `llqr_identity_scaling`, for `scalar` U `llqr_clip_groups`, the names and shapes of U's tensors and, for
        Kronecker structures, the diagonal fallbacks); then every tensor (finite, float, shape, and ≥ `min_diag`
        for `diagonal`/`scalar` U unless `allow_inversion`, see [`~Structure.load_state_dict`]).

        Args:
            state (`Mapping[str, Any]`): from [`state_dict`].
            source (`str`, *optional*, defaults to `"llqrsam_state.pt"`): what to call the saved state in messages;
                pass the file's path.

        Raises:
            [`LLQRStateError`] (a `ValueError`): naming the key or setting, both values and what to do.
        """
        remedy = f"delete {source} to restart with U = I, or resume from an earlier checkpoint"
        if not isinstance(state, Mapping):
            raise LLQRStateError(f"Invalid LLQR state in {source}: a {type(state).__name__}, not a dict; {remedy}.")
        if "fingerprint" not in state:
            raise LLQRStateError(
                f"Invalid resume: {source} holds LLQR state in an older format, without the fingerprint of the "
                "settings that give U its meaning (llqr_structure, llqr_identity_scaling, llqr_clip_groups, the "
                "tensors of U), so it cannot be checked against this run. Resume with the hf_llqrsam version that "
                f"wrote it, or {remedy}."
            )
        missing = [k for k in ("structure", "num_updates", "last_update_step", "blocks") if k not in state]
        if missing:
            raise LLQRStateError(f"Invalid LLQR state in {source}: missing keys {missing}; {remedy}.")
        self._check_fingerprint(state["fingerprint"], source, f"delete {source} to restart with U = I")
        num_updates, last = state["num_updates"], state["last_update_step"]
        if isinstance(num_updates, bool) or not isinstance(num_updates, int) or num_updates < 0:
            raise LLQRStateError(f"Invalid LLQR state in {source}: num_updates={num_updates!r}; {remedy}.")
        if last is not None and (isinstance(last, bool) or not isinstance(last, int)):
            raise LLQRStateError(f"Invalid LLQR state in {source}: last_update_step={last!r}; {remedy}.")
        min_value = None if self.config.allow_inversion else self.config.min_diag
        self.structure.load_state_dict(state["blocks"], min_value=min_value, source=source)
        self.num_updates = num_updates
        self.last_update_step = last

    def _check_fingerprint(self, saved: Any, source: str, remedy: str) -> None:
        """Raise [`LLQRStateError`] if the saved fingerprint gives U another meaning than this run's.

        `clip_groups` is compared for `scalar` U only, where each group holds one c; for the other structures it
        shapes only future inner loops. The diagonal fallbacks are compared for Kronecker structures only.
        """
        live = self.fingerprint()
        if not isinstance(saved, Mapping):
            raise LLQRStateError(f"Invalid LLQR state in {source}: the fingerprint is not a dict; {remedy}.")
        settings = ["structure", "identity_scaling"] + (["clip_groups"] if live["structure"] == "scalar" else [])
        for key in settings:
            if key not in saved:
                raise LLQRStateError(f"Invalid LLQR state in {source}: the fingerprint has no {key!r}; {remedy}.")
            if saved[key] != live[key]:
                raise LLQRStateError(
                    f"Invalid resume: {source} was written with llqr_{key}={saved[key]!r} but this run has "
                    f"llqr_{key}={live[key]!r}; U would silently change meaning. Resume with "
                    f"llqr_{key}={saved[key]!r}, or {remedy}."
                )
        saved_blocks = saved.get("blocks")
        if not isinstance(saved_blocks, list) or not all(
            isinstance(b, (list, tuple))
            and len(b) == 2
            and isinstance(b[0], str)
            and isinstance(b[1], (list, tuple))
            and all(isinstance(d, int) for d in b[1])
            for b in saved_blocks
        ):
            raise LLQRStateError(f"Invalid LLQR state in {source}: the fingerprint's 'blocks' is malformed; {remedy}.")
        old = {name: tuple(shape) for name, shape in saved_blocks}
        new = {name: tuple(shape) for name, shape in live["blocks"]}
        differ = [n for n in dict.fromkeys([*new, *old]) if old.get(n) != new.get(n)]
        if differ:
            shown = ", ".join(
                f"{n!r} (saved: {old.get(n, 'absent')}, this run: {new.get(n, 'absent')})" for n in differ[:5]
            )
            raise LLQRStateError(
                f"Invalid resume: {source} holds U for other trainable tensors than this run's: {len(differ)} "
                f"differ, e.g. {shown}; the state does not match the model (another model, or other frozen/trainable "
                f"parameters). Resume with the model that wrote it, or {remedy}."
            )
        if live["structure"] not in ("diagonal", "scalar"):
            old_fb, new_fb = set(saved.get("fallback_names", [])), set(live["fallback_names"])
            if old_fb != new_fb:
                changed = sorted(old_fb ^ new_fb)
                raise LLQRStateError(
                    f"Invalid resume: in {source} the tensors with a diagonal fallback block differ from this run's "
                    f"({changed[:5]}); their {live['structure']} blocks would change meaning. Resume with the "
                    f"hf_llqrsam version that wrote it, or {remedy}."
                )
