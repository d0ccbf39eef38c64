"""[`LLQRSAMTrainer`]: two-pass SAM (and LLQR) inside `training_step`, glue only (`docs/integration.md` §3).

The Trainer keeps its loop, clipping, optimizer step, scheduler, logging and saving. This module decides *when*
(window position, sync, cadence) and moves tensors; every formula lives in `sam.py` and `llqr/`.
"""

import contextlib
import inspect
import json
import os
import time
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel, Seq2SeqTrainer, Trainer, TrainerCallback
from transformers.utils import logging

from .args import LLQRSAMFields, LLQRSAMTrainingArguments
from .card import method_card_section
from .checkpoint import STATE_FILE, LLQRSAMStateError, describe_state, load_state, save_state
from .compat import llqrsam_active, validate_fsdp_plugin, validate_launch, validate_setup_model
from .config import past_fsam_window
from .data import curvature_indices
from .distributed import (
    accelerate_all_reduce,
    accelerate_broadcast,
    any_rank,
    grad_sync,
    is_fsdp2,
    sharded_update_probe,
    unsharded_view,
    unwrap,
)
from .modes import MODES
from .sam import (
    SAMState,
    apply_perturbation_,
    batchnorm_buffers,
    compute_perturbation,
    copy_tensors_,
    gsam_descent_,
    is_dtensor,
    looksam_orthogonal,
    looksam_reuse_,
    restore_,
    total_norm,
    wsam_descent_,
)
from .schedules import rho_at
from .step import RunningMetrics, StepState, batchnorm_policy, copy_into_, replayed_rng, rng_state, set_rng_state

logger = logging.get_logger(__name__)

# Logged keys that are counts (summed over a logging interval); every other key is averaged.
U_SUMMARY_FILE = "llqr_u_summary.json"
"""The per-tensor summary of U written next to each checkpoint (`_save_llqrsam_state`)."""

_COUNTERS = ("sam/skipped", "sam/skipped_ascent", "llqr/nonfinite_ugrad", "llqr/skipped_refresh")


# mypy sees the mixin as a Trainer (it is only ever mixed into one); at run time it is a plain object.
if TYPE_CHECKING:
    _MixinBase = Trainer
else:
    _MixinBase = object


class _TrainAttempt(TrainerCallback):
    """Resets the per-step state at the start of every training attempt (`on_train_begin`).

    Under `auto_find_batch_size`, an out-of-memory error makes the Trainer rerun its inner loop with a smaller batch;
    each attempt starts with `on_train_begin`, so nothing of the failed attempt (window, ε, SAM state, U) survives.
    """

    def __init__(self, trainer: "LLQRSAMTrainerMixin") -> None:
        self.trainer = trainer

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.trainer._begin_attempt()


class LLQRSAMTrainerMixin(_MixinBase):
    """Turns [`~transformers.Trainer`] into a two-pass SAM / LLQR+SAM trainer, driven by `sam_*` / `llqr_*` args.

    Per optimizer step (window mode, `docs/algorithm.md` §8.5): refresh U on schedule; pass 1 on every micro-batch
    gives g; ε = ρ·Cv/ν(v) (the mode's [`~hf_llqrsam.modes.ModeSpec`]); pass 2 re-runs the window at θ + ε; θ is
    restored by copy; the descent gradient P·g̃ (GSAM: g̃ − α g⊥) is left in `p.grad` for the Trainer's clip and
    optimizer step. `sam_mode="none"` with `llqr` off calls the stock `training_step` and nothing else.

    The step's state lives in one [`~hf_llqrsam.step.StepState`], made at the step's first micro-batch and dropped at
    its last (or when a call raises). Every Trainer-method override passes its arguments through to whatever base
    class the mixin is combined with.

    Example:

    ```python
    >>> from hf_llqrsam import LLQRSAMTrainer, LLQRSAMTrainingArguments
    >>> args = LLQRSAMTrainingArguments(output_dir="out", sam_mode="sam", sam_rho=0.05)
    >>> trainer = LLQRSAMTrainer(model=model, args=args, train_dataset=train_dataset)  # doctest: +SKIP
    >>> trainer.train()  # doctest: +SKIP
    ```
    """

    args: LLQRSAMTrainingArguments  # or the Seq2Seq variant: both carry LLQRSAMFields (checked in __init__)
    model: nn.Module

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, LLQRSAMFields):
            raise TypeError(
                f"Invalid args of type {type(self.args).__name__}: use LLQRSAMTrainingArguments or "
                "LLQRSAMSeq2SeqTrainingArguments."
            )
        validate_launch(self.args)
        validate_setup_model(self.args, self.model, self.train_dataset)
        validate_fsdp_plugin(self.args, getattr(self.accelerator.state, "fsdp_plugin", None))
        self.llqrsam_enabled = llqrsam_active(self.args)
        # True while pass 2 (at θ + ε) runs: a `compute_loss` that records metrics can skip them there
        self.llqrsam_perturbed_pass = False
        self.sam_config = self.args.to_sam_config()
        self.llqr_config = self.args.to_llqr_config()
        self.mode_spec = MODES.get(self.sam_config.mode)
        if self.sam_config.mode == "past_fsam" and self.sam_config.past_fsam_overlap > 0 and self.args.world_size > 1:
            raise ValueError(
                f"Invalid past_fsam_overlap={self.sam_config.past_fsam_overlap!r} with world_size="
                f"{self.args.world_size}: the overlap window keeps each rank's own recent batches, and a checkpoint "
                "holds rank 0's only, so it is single-process. Use past_fsam_overlap=0 with several processes."
            )
        # Where U enters: C = U (modes whose spec allows it) and P = U. Without --llqr, a fixed U that the user sets as
        # `trainer.preconditioner` (any `hf_llqrsam.sam.Preconditioner`) enters both.
        llqr = self.llqr_config
        self.u_in_perturbation = llqr.in_perturbation if llqr is not None else True
        self.u_on_update = llqr.on_update and llqr.apply == "gradient" if llqr is not None else True
        self.sam_state = SAMState()
        self.preconditioner: Any = None  # LLQRPreconditioner, built lazily on the first step
        self._llqrsam_metrics = RunningMetrics(_COUNTERS)
        self._named_params: list[tuple[str, nn.Parameter]] | None = None
        self._pending_state: tuple[str, dict[str, Any]] | None = None  # (path, contents) of a checkpoint's state
        self._step: StepState | None = None
        self._last_call_was_sam = False
        self._last_call_passes = 1  # forward/backward passes of the last training_step call (for floating_point_ops)
        # past-FSAM, per step: (ḡ and ascents before the ascent, to undo on a skipped step), the fresh batches'
        # num_items_in_batch, and how many stored steps of the overlap window the pass ran on
        self._past_undo: tuple[dict[str, Tensor], int] | None = None
        self._past_nitems: Any = None
        self._past_used = 0
        self._wsam_pending: list[tuple[Tensor, Tensor]] = []  # decoupled WSAM: (param, a(g̃ − g) in true units)
        self._attempt = 0
        self._attempt_snapshot: tuple[dict[str, Any], dict[str, Any] | None] | None = None
        self._pre_step_params: list[Tensor] = []
        self._fsdp2 = False  # the model is sharded by FSDP2 (resolved with the parameters, after prepare)
        self._llqr_shift: bool | None = None  # llqr_shift_labels, resolved at the first curvature batch
        self.add_callback(_TrainAttempt(self))

    # ------------------------------------------------------------------ attempts (train() and its retries)

    def train(self, *args: Any, **kwargs: Any) -> Any:
        """[`~transformers.Trainer.train`]; with `auto_find_batch_size`, SAM state and U are snapshot first, so an
        out-of-memory retry starts from the same state as the failed attempt did."""
        self._attempt = 0
        self._attempt_snapshot = None
        if self.llqrsam_enabled and self.args.auto_find_batch_size:
            pre = None if self.preconditioner is None else self.preconditioner.state_dict()
            self._attempt_snapshot = (self.sam_state.state_dict(), pre)
        return super().train(*args, **kwargs)

    def _begin_attempt(self) -> None:
        self._step = None
        self._wsam_pending = []
        self._llqrsam_metrics.drain()
        if self._attempt > 0 and self._attempt_snapshot is not None:
            sam, pre = self._attempt_snapshot
            self.sam_state = SAMState()
            self.sam_state.load_state_dict(sam, device=self.args.device)
            if pre is None:
                self.preconditioner = None
            else:
                self.preconditioner.load_state_dict(pre)
        self._attempt += 1

    # ------------------------------------------------------------------ the loop override

    def training_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Tensor | int | None = None
    ) -> Tensor:
        if not self.llqrsam_enabled:
            return super().training_step(model, inputs, num_items_in_batch)
        if self._step is None:
            self._step = self._begin_step(model)
        st = self._step
        st.calls += 1
        self._last_call_was_sam = st.is_sam
        self._last_call_passes = 2 if st.is_sam else 1
        last = self.accelerator.sync_gradients
        try:
            if not st.is_sam:
                loss = super().training_step(model, inputs, num_items_in_batch)
            elif self.mode_spec is not None and self.mode_spec.passes == "one":
                loss = self._past_call(st, model, inputs, num_items_in_batch, last)
            elif self.sam_config.accumulation == "window":
                loss = self._window_call(st, model, inputs, num_items_in_batch, last)
            else:
                loss = self._micro_call(st, model, inputs, num_items_in_batch)
            if last:
                self._finish_step(st, model)
        except BaseException:
            # A failed call (e.g. out of memory) leaves nothing behind: the weights were restored by `_replay`,
            # the BatchNorm statistics are put back here, and the next call starts a fresh step.
            copy_into_(batchnorm_buffers(model), st.bn_at_begin)
            self._undo_past_ascent()
            self._step = None
            raise
        if last:
            self._step = None
        return loss

    def _begin_step(self, model: nn.Module) -> StepState:
        self._resolve_params()
        if self._pending_state is not None:
            self._load_llqrsam_state(*self._pending_state)
            self._pending_state = None
        self._maybe_refresh_preconditioner(model)
        cfg, step = self.sam_config, self.state.global_step
        # LookSAM's cadence: the two-pass step every looksam_interval-th step (sam_interval is 1 then)
        period = cfg.looksam_interval if self.mode_spec is not None and self.mode_spec.passes == "cadence" else 1
        period *= cfg.interval
        is_sam = cfg.mode != "none" and step >= cfg.start_step and (step - cfg.start_step) % period == 0
        self._past_undo, self._past_used, self._wsam_pending = None, 0, []
        return StepState(step=step, is_sam=is_sam, bn_at_begin=[b.clone() for b in batchnorm_buffers(model)])

    def _past_call(self, st: StepState, model: nn.Module, inputs: dict[str, Any], nitems: Any, last: bool) -> Tensor:
        """past-FSAM: one pass at θ + ε on this micro-batch, ε built once per step from the state alone.

        The reference (`lqr_optimizer/_src/utils/sam_mode_handlers.py:_build_past_fsam_train_step`) runs no pass at
        θ: ε = ρ·Cv/ν with v = g̃ₜ₋₁ − σḡ, g̃ₜ₋₁ the previous step's gradient at its perturbed point, on the previous
        batch; this step's one pass gives g̃ₜ, the descent and the next g̃ₜ₋₁. With `past_fsam_overlap` f the last call
        also runs the stored micro-batches of the K − 1 previous steps at θ + ε (the reference's overlapping batch
        windows, `utils.py:prepare_dataloader`), and [`_finish_step`] averages over the K steps. θ is restored by copy
        after every call.
        """
        if st.calls == 1:
            self._past_nitems = nitems
            self._perturb_from_state(st)
        st.inputs.append(inputs)
        passes: list[tuple[dict[str, Any], Any]] = [(inputs, nitems)]
        if last:
            stored = self._past_window()
            self._past_used = len(stored)
            passes += [(mb, entry["num_items"]) for entry in stored for mb in entry["inputs"]]
        params = [p for _, p in self._named_params or []]
        pert = st.perturbation
        backups = apply_perturbation_(params, pert.eps) if pert is not None else None
        try:
            for j, (batch, n) in enumerate(passes):
                # one pass: the Trainer's own sync context; with stored batches, sync only the very last backward
                ctx = contextlib.nullcontext() if len(passes) == 1 else grad_sync(model, j == len(passes) - 1)
                with ctx:
                    loss_j = super().training_step(model, batch, n)
                if j == 0:
                    loss = loss_j
                    st.perturbed_loss += loss_j
        finally:
            if backups is not None:
                restore_(params, backups)
        self._last_call_passes = len(passes)
        return loss

    def _past_window(self) -> list[dict[str, Any]]:
        """The stored steps of past-FSAM's overlap window this step's pass runs on (at most K − 1, newest last)."""
        keep = past_fsam_window(self.sam_config.past_fsam_overlap) - 1
        return self.sam_state.batches[-keep:] if keep > 0 else []

    def _perturb_from_state(self, st: StepState) -> None:
        """past-FSAM's ε from the stored g̃ₜ₋₁ and ḡ (no pass 1); ḡ's update is undone if the step is skipped."""
        cfg = self.sam_config
        names = [n for n, _ in self._named_params or []]
        params = [p for _, p in self._named_params or []]
        g_last = self.sam_state.get("g_last", names, params)
        self._past_undo = (dict(self.sam_state.buffers.get("gbar", {})), self.sam_state.ascents)
        lr = float(cast(torch.optim.Optimizer, self.optimizer).param_groups[0]["lr"])
        rho = rho_at(cfg.rho_schedule, st.step, cfg.rho, cfg.rho_min, lr=lr, lr_max=self.args.learning_rate)
        pert = compute_perturbation(cfg, self.sam_state, names, params, g_last, rho, self._geometry())
        st.perturbation = pert if pert.finite else None
        if not pert.finite:
            st.drop = True
            self._record("sam/skipped_ascent", 1.0)
            return
        self._record("sam/perturbation_norm", pert.perturbation_norm)
        self._record("sam/rho", rho)
        self._record("sam/probe_norm", pert.probe_norm)

    def _undo_past_ascent(self) -> None:
        """Put ḡ and the ascent count back as they were before this step's past-FSAM ascent."""
        if self._past_undo is not None:
            gbar, ascents = self._past_undo
            if gbar:
                self.sam_state.buffers["gbar"] = gbar
            else:
                self.sam_state.buffers.pop("gbar", None)
            self.sam_state.ascents = ascents
            self._past_undo = None

    def _window_call(self, st: StepState, model: nn.Module, inputs: dict[str, Any], nitems: Any, last: bool) -> Tensor:
        """Pass 1 on this micro-batch; on the window's last call, one ε from the window gradient and the replays."""
        cfg = self.sam_config
        st.inputs.append(inputs)
        if cfg.same_dropout:
            st.rng.append(rng_state())
        # GA = 1 runs under the Trainer's nullcontext: "local" would silently become global without this.
        sync_ctx = grad_sync(model, False) if last and cfg.scope == "local" else contextlib.nullcontext()
        with sync_ctx:
            loss = super().training_step(model, inputs, nitems)
        st.clean_loss += loss
        if last:
            self._perturb(st)
            self._replay(st, model, st.inputs, st.rng, nitems, micro=False, bn_before=st.bn_at_begin)
        return loss

    def _micro_call(self, st: StepState, model: nn.Module, inputs: dict[str, Any], nitems: Any) -> Tensor:
        """One ε per micro-batch: pass 1 on its own gradient, then pass 2 accumulates onto the window's sum."""
        cfg = self.sam_config
        grads = [p.grad for _, p in self._named_params or [] if p.grad is not None]
        stash = {id(g): g.clone() for g in grads} if grads else None
        if grads:
            torch._foreach_zero_(grads)
        bn_before = [b.clone() for b in batchnorm_buffers(model)] if cfg.bn_stats == "second" else None
        rng = [rng_state()] if cfg.same_dropout else []
        with grad_sync(model, cfg.scope == "global"):  # set before the forward (davda54/sam#78)
            loss = super().training_step(model, inputs, nitems)
        st.clean_loss += loss
        self._perturb(st)
        self._replay(st, model, [inputs], rng, nitems, micro=True, bn_before=bn_before, stash=stash)
        return loss

    def _perturb(self, st: StepState) -> None:
        """ε from the pass-1 gradient in `p.grad` (the mode's spec decides how); a non-finite ascent drops the step."""
        cfg = self.sam_config
        names, params, grads = self._live_grads()
        lr = float(cast(torch.optim.Optimizer, self.optimizer).param_groups[0]["lr"])  # the live LR (public)
        rho = rho_at(cfg.rho_schedule, st.step, cfg.rho, cfg.rho_min, lr=lr, lr_max=self.args.learning_rate)
        pert = compute_perturbation(
            cfg, self.sam_state, names, params, grads, rho, self._geometry(), self._grad_scale()
        )
        finite = pert.finite
        if cfg.scope == "local":
            finite = not any_rank(not finite, self.args.device)
        st.perturbation = pert if finite else None
        if not finite:
            st.drop = True
            self._record("sam/skipped_ascent", 1.0)
            return
        self._record("sam/grad_norm", pert.grad_norm)
        self._record("sam/perturbation_norm", pert.perturbation_norm)
        self._record("sam/rho", rho)
        if self.mode_spec is not None and self.mode_spec.probe != "gradient":
            self._record("sam/probe_norm", pert.probe_norm)

    def _replay(
        self,
        st: StepState,
        model: nn.Module,
        replays: list[dict[str, Any]],
        rng: list[Any],
        nitems: Any,
        micro: bool,
        bn_before: list[Tensor] | None,
        stash: dict[int, Tensor] | None = None,
    ) -> None:
        """Pass 2 at θ + ε on `replays`, then the exact restore of θ (`docs/integration.md` §3.3–3.5).

        Window mode replays the whole window, synchronising only the last replay; micro mode runs one pass 2 under
        the Trainer's own sync context, accumulating onto `stash` (earlier micro-batches' pass-2 sum, if any). A
        skipped ascent still runs pass 2 at θ, so collectives stay aligned across ranks.
        """
        cfg = self.sam_config
        _, params, grads = self._live_grads()
        stashed = stash or {}
        restored = [g for g in grads if id(g) in stashed]
        if restored:
            copy_tensors_(restored, [stashed[id(g)] for g in restored])  # per tensor under FSDP2
        zeroed = [g for g in grads if id(g) not in stashed]
        if zeroed:
            torch._foreach_zero_(zeroed)
        pert = st.perturbation
        backups = apply_perturbation_(params, pert.eps) if pert is not None else None
        self.llqrsam_perturbed_pass = True
        try:
            with batchnorm_policy(batchnorm_buffers(model), cfg.bn_stats, bn_before), replayed_rng(cfg.same_dropout):
                for j, inputs in enumerate(replays):
                    if cfg.same_dropout:
                        set_rng_state(rng[j])
                    # Window replays: no sync until the last; micro: the Trainer's own context decides, except under
                    # FSDP2, where every pass 2 syncs: unsynced FSDP2 grads stay unsharded, and the next micro-batch's
                    # forced pass-1 sync would reduce-scatter them together with its own (`docs/integration.md` §7.4).
                    if micro:
                        ctx = grad_sync(model, True) if self._fsdp2 else contextlib.nullcontext()
                    else:
                        ctx = grad_sync(model, j == len(replays) - 1)
                    with ctx:
                        st.perturbed_loss += super().training_step(model, inputs, nitems)
        finally:
            self.llqrsam_perturbed_pass = False
            if backups is not None:
                restore_(params, backups)

    def _finish_step(self, st: StepState, model: nn.Module) -> None:
        """At the sync micro-batch: GSAM correction, P = U, finiteness guard and metrics; once per optimizer step.

        A skipped step (non-finite ascent, or a non-finite descent gradient) leaves the weights and the BatchNorm
        statistics exactly as they were before the step.
        """
        names, params, grads = self._live_grads()
        pert = st.perturbation
        spec = self.mode_spec
        commit = self._mode_descent_(st, names, params, grads) if spec is not None else {}
        descent_ok = spec is None or spec.llqr_descent
        if self.preconditioner is not None and self.u_on_update and descent_ok:
            self.preconditioner.apply_(names, grads)
        nonfinite = not bool(torch.isfinite(total_norm(grads)))
        if st.drop or nonfinite:
            self._record("sam/skipped", 1.0)
            copy_into_(batchnorm_buffers(model), st.bn_at_begin)
            self._undo_past_ascent()
            self._wsam_pending = []
            scaler = self.accelerator.scaler
            if scaler is not None and scaler.is_enabled():
                # the scaler skips the step and backs off; under FSDP2 every rank marks its own (non-empty) shard
                local = (cast(Any, g).to_local() if is_dtensor(g) else g for g in grads)
                target = next((t for t in local if t.numel()), None)
                if target is not None and not nonfinite:
                    target.view(-1)[0] = float("inf")
            else:
                for p in params:  # no scaler: no grads means the optimizer leaves these weights untouched
                    p.grad = None
        else:
            for kind, tensors in commit.items():
                self.sam_state.set(kind, names, tensors)
        keep = past_fsam_window(self.sam_config.past_fsam_overlap) - 1 if spec is not None and st.is_sam else 0
        if spec is not None and spec.passes == "one" and keep > 0:  # the overlap window advances by one step
            self.sam_state.batches.append({"inputs": list(st.inputs), "num_items": self._past_nitems})
            del self.sam_state.batches[:-keep]
        if st.is_sam:
            clean, perturbed = float(st.clean_loss), float(st.perturbed_loss)
            self._record("sam/loss_perturbed", perturbed)
            if pert is not None and spec is not None and spec.passes != "one":  # past-FSAM has no pass at θ
                self._record("sam/sharpness", perturbed - clean)

    def _mode_descent_(
        self, st: StepState, names: list[str], params: list[nn.Parameter], grads: list[Tensor]
    ) -> dict[str, list[Tensor]]:
        """The mode's descent, in place on the window gradient, before P = U; returns the SAM state to commit when
        the step is taken (past-FSAM's g̃ₜ₋₁, LookSAM's g_v), in true units.

        GSAM: g̃ − α g⊥. LookSAM (Liu et al., CVPR 2022, Alg. 1): a full step keeps g̃ and stores g_v, the component of
        g̃ orthogonal to g; the one-pass steps between become g + α‖g‖ g_v/‖g_v‖. WSAM (Yue et al., KDD 2023): g + a(g̃
        − g), or, decoupled, g now and θ ← θ − lr·a(g̃ − g) after the optimizer step ([`_wsam_sharpness_step`]).
        past-FSAM: with an overlap window, the mean over its K steps; g̃ is kept as the next step's g̃ₜ₋₁.
        """
        spec, cfg, pert = cast(Any, self.mode_spec), self.sam_config, st.perturbation
        scale = self._grad_scale()
        if spec.passes == "one":
            if not st.is_sam:
                return {}
            if self._past_used:
                torch._foreach_mul_(grads, 1.0 / (1 + self._past_used))
            fp32 = [t.float() if t.dtype in (torch.float16, torch.bfloat16) else t for t in grads]
            return {"g_last": list(torch._foreach_div(fp32, scale))}
        if spec.descent == "gsam" and pert is not None:
            gsam_descent_(grads, pert.clean_grads, cfg.gsam_alpha)
        elif spec.descent == "looksam":
            if pert is not None:
                return {"gv": list(torch._foreach_div(looksam_orthogonal(pert.clean_grads, grads), scale))}
            if not st.is_sam and st.step >= cfg.start_step and self.sam_state.has("gv"):
                looksam_reuse_(grads, self.sam_state.get("gv", names, grads), cfg.looksam_alpha)
        elif spec.descent == "wsam" and pert is not None:
            sharp = wsam_descent_(grads, pert.clean_grads, cfg.wsam_gamma, cfg.wsam_decouple)
            if sharp:  # decoupled: applied by the optimizer's post-hook
                self._wsam_pending = [(p, s.div_(scale)) for p, s in zip(params, sharp, strict=True)]
        return {}

    # ------------------------------------------------------------------ helpers

    def _resolve_params(self) -> None:
        # Resolved lazily, after `accelerator.prepare` (FSDP2 swaps params for DTensors there).
        if self._named_params is None:
            self._named_params = [(n, p) for n, p in unwrap(self.model).named_parameters() if p.requires_grad]
            self._fsdp2 = is_fsdp2(self.model)

    def _live_grads(self) -> tuple[list[str], list[nn.Parameter], list[Tensor]]:
        names, params, grads = [], [], []
        for n, p in self._named_params or []:
            if p.grad is not None:
                names.append(n)
                params.append(p)
                grads.append(p.grad)
        return names, params, grads

    def _grad_scale(self) -> float:
        scaler = self.accelerator.scaler
        return float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0

    def _geometry(self) -> Any:
        spec = self.mode_spec
        if self.preconditioner is not None and self.u_in_perturbation and spec is not None and spec.llqr_geometry:
            return self.preconditioner
        return None

    def _record(self, key: str, value: float) -> None:
        self._llqrsam_metrics.record(key, value)

    # ------------------------------------------------------------------ LLQR

    def _maybe_refresh_preconditioner(self, model: nn.Module) -> None:
        """Refresh U at global steps 0, E, 2E, … before `llqr_update_until` (`docs/algorithm.md` §5.4)."""
        llqr = self.llqr_config
        if llqr is None:
            return
        from .llqr import LLQRPreconditioner, make_update_probe

        module = unwrap(model)
        if self.preconditioner is None:
            self.preconditioner = LLQRPreconditioner(module, llqr, device=self.accelerator.device)
        step = self.state.global_step
        lr_at = self._scheduled_lr if llqr.apply == "update" else None
        if not self.preconditioner.is_due(step, lr_at=lr_at) or self.preconditioner.last_update_step == step:
            return
        if self.preconditioner.num_updates == 0:
            logger.info(f"LLQR: fitting U on {llqr.batch_size} curvature examples before step {step} (a pause).")
        probe = None
        if llqr.apply == "update":
            probe = make_update_probe(self._inner_optimizer(), module)
            if self._fsdp2:  # Δ_opt(g) from the sharded optimizer state, gathered for the inner loop
                probe = sharded_update_probe(probe, dict(module.named_parameters()))
        batch = self._curvature_batch(step)
        start = time.perf_counter()
        # FSDP2: the curvature runs on a hook-free unsharded view (through FSDP2's hooks every product is zero)
        target = unsharded_view(module) if self._fsdp2 else module
        metrics = self.preconditioner.update(
            target, batch, step=step, extractor=self.llqr_logits_and_targets, update_probe=probe,
            pad_token_id=_pad_token_id(module) if llqr.include_pad_rows else None, all_reduce=accelerate_all_reduce,
        )  # fmt: skip
        del target
        # identical U on every rank, free of floating-point drift (FSDP2 shards have one owner and are skipped)
        self.preconditioner.broadcast_(0, broadcast=accelerate_broadcast)
        seconds = time.perf_counter() - start
        metrics["llqr/update_seconds"] = seconds
        logger.info(
            f"LLQR refresh {self.preconditioner.num_updates} at step {step}: {seconds:.2f} s "
            f"(J {metrics.get('llqr/objective_start', float('nan')):.4g} -> "
            f"{metrics.get('llqr/objective_end', float('nan')):.4g})"
        )
        for key, value in metrics.items():
            self._record(key, value)

    def llqr_logits_and_targets(self, model: nn.Module, batch: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
        """`(logits[rows, C], targets[rows], row_mask[rows])` of the curvature batch (`docs/integration.md` §5.3).

        Override for heads the default does not know. The default handles classification heads, encoder–decoder
        LMs and causal LMs; labels are popped, so the model computes no loss of its own. Causal LMs pair the logits
        at t with the label at t + 1, as decided once, at the first call, by `llqr_shift_labels`
        ([`~hf_llqrsam.causal.resolve_shift_labels`]: `auto` looks through PEFT / compile / DDP wrappers to the
        model's config and class, and raises a `ValueError` naming the flag when it cannot tell).
        """
        from .llqr import logits_and_targets

        if self._llqr_shift is None:
            from .causal import resolve_shift_labels

            labels = batch.get("labels")
            labels = labels if isinstance(labels, Tensor) else None
            self._llqr_shift, why = resolve_shift_labels(self.args.llqr_shift_labels, model, labels)
            logger.info(f"LLQR curvature rows: {'shifted' if self._llqr_shift else 'unshifted'} labels ({why})")
        return logits_and_targets(model, batch, shift_labels=self._llqr_shift)

    def _curvature_batch(self, step: int) -> dict[str, Any]:
        """`llqr_batch_size` examples drawn as a pure function of (seed, step), through the training collator.

        Transforms run under a forked RNG, so the training stream is untouched and resume needs no extra state
        (`docs/algorithm.md` §5.5). Uses the Trainer's column filtering, as `get_train_dataloader` does. With
        `llqr_curvature_sharding="sharded"` each rank takes every W-th example; the partial sums are all-reduced.
        """
        import datasets

        llqr = cast(Any, self.llqr_config)
        dataset, collator = self.train_dataset, self.data_collator
        if isinstance(dataset, datasets.Dataset):
            dataset = self._remove_unused_columns(dataset, description="training")
        else:
            collator = self._get_collator_with_removed_columns(collator, description="training")
        indices = curvature_indices(self.args.seed, step, len(dataset), llqr.batch_size)  # type: ignore[arg-type]
        if llqr.curvature_sharding == "sharded" and self.args.world_size > 1:
            indices = indices[self.args.process_index :: self.args.world_size]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.args.seed + step)
            batch = collator([dataset[i] for i in indices])  # type: ignore[index]
        return self._prepare_inputs(batch)

    def _scheduled_lr(self, step: int) -> float:
        """The base optimizer's largest learning rate at optimizer step `step`, a pure function of the step.

        From the LR scheduler's multiplier (`LambdaLR`: every schedule of `get_scheduler` but
        `reduce_lr_on_plateau`): max over param groups of base_lr · λ(step). Other schedulers, or none yet, give the
        optimizer's current LR at the current step and treat earlier steps as LR > 0 (a refresh at an LR-0 grid step
        is then skipped, not deferred). Used by `llqr_apply="update"` to defer refreshes past LR 0
        ([`~hf_llqrsam.llqr.LLQRPreconditioner.is_due`]).
        """
        scheduler = getattr(self.lr_scheduler, "scheduler", self.lr_scheduler)
        if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
            return max(
                float(base) * float(fn(step))
                for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)
            )
        if step != self.state.global_step:
            return 1.0
        return max(float(group["lr"]) for group in self._inner_optimizer().param_groups)

    def _inner_optimizer(self) -> torch.optim.Optimizer:
        # Accelerate wraps the torch optimizer in an AcceleratedOptimizer once the Trainer prepared it
        return cast(torch.optim.Optimizer, getattr(self.optimizer, "optimizer", self.optimizer))

    def create_optimizer(self, *args: Any, **kwargs: Any) -> torch.optim.Optimizer:
        """The base optimizer; with `llqr_apply="update"`, step hooks rewrite θ ← θ_old + U(θ − θ_old).

        The hooks sit on the torch optimizer itself, so they fire only on steps that really happen (not on steps the
        fp16 scaler skips), and act on the full update: LR, momentum/Adam normalisation and weight decay included
        (`docs/algorithm.md` §7.3).
        """
        optimizer = super().create_optimizer(*args, **kwargs)
        llqr = self.llqr_config
        if llqr is not None and llqr.apply == "update":
            if type(optimizer) not in (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW):
                raise ValueError(
                    f"Invalid llqr_apply='update' with optimizer {type(optimizer).__name__} (optim="
                    f"{self.args.optim!r}): it needs the closed-form dry-run update of SGD, Adam or AdamW. Use "
                    "--optim sgd, adamw_torch or adam, or llqr_apply='gradient'."
                )
            optimizer.register_step_pre_hook(self._snapshot_before_step)
            optimizer.register_step_post_hook(self._precondition_update)
        if self.sam_config.mode == "wsam" and self.sam_config.wsam_decouple:
            optimizer.register_step_post_hook(self._wsam_sharpness_step)
        return optimizer

    def _wsam_sharpness_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """Decoupled WSAM, after the base optimizer stepped on g: θ ← θ − lr·a(g̃ − g), lr of the param's group.

        `pytorch_optimizer.WSAM.second_step` (4.1.0, `decouple=True`) and the paper's Algorithm 1 (Yue et al., KDD
        2023): the sharpness term takes a plain SGD step. A post-hook, so it runs only on steps the optimizer took.
        """
        if not self._wsam_pending:
            return
        lr = {id(p): float(group["lr"]) for group in optimizer.param_groups for p in group["params"]}
        with torch.no_grad():
            for p, sharp in self._wsam_pending:
                if id(p) in lr:
                    p.add_(sharp.to(p.dtype), alpha=-lr[id(p)])
        self._wsam_pending = []

    def _snapshot_before_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._pre_step_params = [p.detach().clone() for _, p in self._named_params or []]

    def _precondition_update(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self.preconditioner is None or self._named_params is None:
            return
        names = [n for n, _ in self._named_params]
        params = [p.detach() for _, p in self._named_params]
        with torch.no_grad():
            delta = list(torch._foreach_sub(params, self._pre_step_params))
            self.preconditioner.apply_(names, delta)
            copy_tensors_(params, torch._foreach_add(self._pre_step_params, delta))
        self._pre_step_params = []

    # ------------------------------------------------------------------ other Trainer overrides

    def floating_point_ops(self, *args: Any, **kwargs: Any) -> int:
        """Every pass is counted: two on SAM steps, one on LookSAM's reuse steps, one (plus the stored batches of the
        overlap window) on past-FSAM's (the Trainer calls this once per `training_step`)."""
        flops = super().floating_point_ops(*args, **kwargs)
        return self._last_call_passes * flops if self.llqrsam_enabled else flops

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Merge the `sam/*` and `llqr/*` metrics into training logs: counters summed, the rest averaged."""
        if self._llqrsam_metrics and "loss" in logs:
            logs.update(self._llqrsam_metrics.drain())
        super().log(logs, *args, **kwargs)

    # ------------------------------------------------------------------ checkpoints

    def _llqrsam_state_dict(self) -> dict[str, Any]:
        return {
            "sam": self.sam_state.state_dict(),
            "llqr": self.preconditioner.state_dict() if self.preconditioner is not None else None,
            "config": {"sam_mode": self.sam_config.mode, "llqr": self.llqr_config is not None},
        }

    def _load_llqrsam_state(self, path: str, state: dict[str, Any]) -> None:
        """Materialise a checkpoint's SAM state and U (validated); warn about any part this run will not use.

        An FSDP2 checkpoint's shards are read first, with DCP, into tensors like the live ones (a collective: this
        runs on every rank at the first `training_step`); SAM buffers are then stored like their parameters.
        """
        from .sharded_state import has_placeholders, load_sharded

        if self.llqr_config is not None and self.preconditioner is None and state["llqr"] is not None:
            from .llqr import LLQRPreconditioner

            self.preconditioner = LLQRPreconditioner(unwrap(self.model), self.llqr_config, self.accelerator.device)
        if has_placeholders(state):
            state = load_sharded(os.path.dirname(path), state, self._shard_template)
        config = state["config"]
        holds = describe_state(state)
        mode = self.sam_config.mode
        if config["sam_mode"] == mode:
            kinds = set(self.mode_spec.state) if self.mode_spec is not None else set()
            extra = set(state["sam"]["buffers"]) - kinds
            if extra:
                raise LLQRSAMStateError(
                    f"Invalid {path}: SAM buffers {sorted(extra)} do not belong to sam_mode={mode!r} "
                    f"(expected {sorted(kinds) or 'none'}). The file does not match this run; resume from a "
                    "checkpoint of this run or delete the file."
                )
            try:
                self.sam_state.load_state_dict(state["sam"], device=self.args.device)
            except ValueError as err:
                raise LLQRSAMStateError(f"{path}: {err}") from err
            self._align_sam_buffers()
        elif holds["sam"]:
            logger.warning(
                f"The checkpoint's SAM state was written with sam_mode={config['sam_mode']!r}; this run has "
                f"sam_mode={mode!r}, so that state is not used and the SAM state starts fresh."
            )
        if state["llqr"] is None:
            if self.llqr_config is not None:
                logger.warning("The checkpoint holds no LLQR state: this run starts with U = I.")
            return
        if self.llqr_config is None:
            logger.warning(
                "The checkpoint holds a learned LLQR preconditioner U, but this run has llqr=False: U is not used."
            )
            return
        from .llqr import LLQRPreconditioner

        if self.preconditioner is None:
            self.preconditioner = LLQRPreconditioner(unwrap(self.model), self.llqr_config, self.accelerator.device)
        self.preconditioner.load_state_dict(state["llqr"], source=path)

    def _shard_template(self, path: tuple[str, ...], size: torch.Size, dtype: torch.dtype) -> Tensor:
        """The tensor a DCP shard of an FSDP2 checkpoint is read into (`hf_llqrsam/sharded_state.py`).

        Like the live tensor it replaces (a tensor of U, or the parameter a SAM buffer belongs to): for a DTensor only
        this rank's shard is read, whatever the world size that wrote it; otherwise a plain tensor of the saved size,
        read whole (a DDP or one-process resume, or a tensor this run does not have, which validation then reports).
        """
        live: Tensor | None = None
        if len(path) == 4 and path[:2] == ("llqr", "blocks") and self.preconditioner is not None:
            names = self.preconditioner.names
            if path[2] in names:
                live = self.preconditioner.structure.blocks[names.index(path[2])].get(path[3])
        elif len(path) == 4 and path[:2] == ("sam", "buffers"):
            live = dict(self._named_params or []).get(path[3])
        if live is not None and tuple(live.shape) == tuple(size):
            return torch.empty_like(live, dtype=dtype)
        return torch.empty(size, dtype=dtype, device=self.args.device)

    def _align_sam_buffers(self) -> None:
        """Store each loaded SAM buffer like its parameter: an FSDP2 shard for a DTensor parameter (a local slice of
        a whole saved buffer), a whole tensor otherwise (a gathered shard)."""
        from .llqr.sharding import full_tensor, shard_like

        params = dict(self._named_params or [])
        for store in self.sam_state.buffers.values():
            for name, t in list(store.items()):
                p = params.get(name)
                if p is not None and is_dtensor(p) != is_dtensor(t):
                    store[name] = shard_like(t, p) if is_dtensor(p) else full_tensor(t)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        self._save_llqrsam_state(output_dir)

    def _save_llqrsam_state(self, output_dir: str) -> None:
        """`llqrsam_state.pt` (rank 0) next to the optimizer state; under FSDP2 also every rank's shards of U and of
        the SAM buffers, with DCP in `llqrsam_dcp/` (`hf_llqrsam/sharded_state.py`; the Trainer saves on all ranks).

        With LLQR, also `llqr_u_summary.json` (written by the saving rank, read by nothing): per tensor of U its
        structure, entries, min, max, mean, RMS displacement from I, fraction at `llqr_min_diag` and the step of
        the last refresh ([`~hf_llqrsam.llqr.LLQRPreconditioner.u_summary`]).
        """
        if not self.llqrsam_enabled:
            return
        from .sharded_state import save_sharded, split_dtensors

        state, shards = split_dtensors(self._llqrsam_state_dict())
        if shards:
            save_sharded(output_dir, shards)  # a collective
        summary = self.preconditioner.u_summary() if self.preconditioner is not None else None  # FSDP2: a collective
        if self.args.should_save:
            save_state(output_dir, state, sharded=bool(shards))
            if summary is not None:
                with open(os.path.join(output_dir, U_SUMMARY_FILE), "w") as f:
                    json.dump(summary, f, indent=1, allow_nan=True)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        self._load_llqrsam_checkpoint(checkpoint)

    def _load_llqrsam_checkpoint(self, checkpoint: str | None) -> None:
        """Read `llqrsam_state.pt` of a checkpoint; it is materialised on the first `training_step`, after prepare."""
        if checkpoint is None:
            return
        if not self.llqrsam_enabled:
            if os.path.isfile(os.path.join(checkpoint, STATE_FILE)):
                logger.warning(
                    f"{os.path.join(checkpoint, STATE_FILE)} holds SAM/LLQR state, but this run has sam_mode='none' "
                    "and llqr=False: it is not used."
                )
            return
        state = load_state(checkpoint)
        if state is None:
            if self.llqr_config is not None or (self.mode_spec is not None and self.mode_spec.state):
                logger.warning(f"No {STATE_FILE} in {checkpoint}: starting with U = I and empty SAM state.")
            return
        # materialised on the first training_step, after prepare (FSDP2 swaps the parameters there)
        self._pending_state = (os.path.join(checkpoint, STATE_FILE), state)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, *args: Any, **kwargs: Any) -> None:
        """Work around huggingface/transformers#43701 (5.x): resume silently drops renamed weights (e.g. ViT).

        `load_state_dict(strict=False)` skips checkpoint keys that 5.x `save_pretrained` wrote under their legacy
        names; `from_pretrained` applies the renames. The workaround runs only where the bug bites: transformers 5.x,
        a plain `PreTrainedModel` (no FSDP/DeepSpeed), and a checkpoint whose tensor names differ from the model's.
        The canary test `test_vit_resume_canary_43701` fails once upstream fixes it.
        """
        model = args[0] if args else kwargs.get("model")
        target = self.model if model is None else model
        weights = os.path.join(resume_from_checkpoint, "model.safetensors")
        if (
            _TRANSFORMERS_MAJOR >= 5
            and isinstance(target, PreTrainedModel)
            and os.path.isfile(weights)
            and not (self.is_fsdp_enabled or self.is_deepspeed_enabled or is_fsdp2(target))
            and _renamed_keys(weights, target)
        ):
            dtype = next(target.parameters()).dtype
            loaded = type(target).from_pretrained(resume_from_checkpoint, config=target.config, dtype=dtype)
            target.load_state_dict(loaded.state_dict(), strict=True)
            return
        super()._load_from_checkpoint(resume_from_checkpoint, *args, **kwargs)

    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        """The base class's card, tagged `hf-llqrsam`, the SAM mode and `llqr` (`docs/integration.md` §9), plus a
        section naming the method and its hyperparameters ([`~hf_llqrsam.card.method_card_section`]).

        The arguments are passed through to whatever `create_model_card` the base class has (the stock Trainer's,
        or TRL's `(model_name, dataset_name, tags)`); only `tags` is extended.
        """
        bound = inspect.signature(super().create_model_card).bind_partial(*args, **kwargs)
        tags = bound.arguments.get("tags")
        tags = [tags] if isinstance(tags, str) else list(tags or [])
        ours = ["hf-llqrsam"] + ([self.sam_config.mode] if self.sam_config.mode != "none" else [])
        ours += ["llqr"] if self.llqr_config is not None else []
        bound.arguments["tags"] = tags + [t for t in ours if t not in tags]
        super().create_model_card(*bound.args, **bound.kwargs)
        if self.is_world_process_zero():
            with open(os.path.join(str(self.args.output_dir), "README.md"), "a", encoding="utf-8") as f:
                f.write(method_card_section(self.args))


_TRANSFORMERS_MAJOR = int(__import__("transformers").__version__.split(".")[0])


def _renamed_keys(weights: str, model: nn.Module) -> bool:
    """Whether a checkpoint's tensor names differ from the model's own (the #43701 symptom)."""
    from safetensors import safe_open

    with safe_open(weights, framework="pt") as f:
        saved = set(f.keys())
    return bool(saved - set(model.state_dict()))


def _pad_token_id(model: nn.Module) -> int | None:
    """The target of pad rows with `llqr_include_pad_rows` (the reference's "predict pad"), from the model config."""
    config = getattr(model, "config", None)
    pad = getattr(config, "pad_token_id", None)
    return pad if isinstance(pad, int) else None


class LLQRSAMTrainer(LLQRSAMTrainerMixin, Trainer):
    """[`~transformers.Trainer`] with SAM-family and LLQR steps; see [`LLQRSAMTrainerMixin`]."""


class LLQRSAMSeq2SeqTrainer(LLQRSAMTrainerMixin, Seq2SeqTrainer):
    """[`~transformers.Seq2SeqTrainer`] with SAM-family and LLQR steps; see [`LLQRSAMTrainerMixin`]."""
