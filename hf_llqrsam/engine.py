"""The SAM-family optimizer step, owned once: the engine the Trainer, the plain PyTorch API and the benchmarks drive.

One [`SAMEngine`] per training run. It owns, for every mode, everything between the gradients a driver computed and
the gradient the optimizer steps on (`docs/algorithm.md` §8.7):

- the schedule ([`step_kind`]): which steps take two passes, one pass at θ + ε (past-FSAM), or one pass at θ;
- the ascent: ε from the pass-1 gradient in `p.grad` (or from the state), through
  [`~hf_llqrsam.sam.compute_perturbation`] and the mode's [`~hf_llqrsam.modes.ModeSpec`];
- the backup, perturbation and restore-by-copy of θ, with the BatchNorm and dropout policies ([`perturbed`]);
- the descent, for every `descent` kind of the record, with tensors aligned by name (a parameter that has a
  gradient in one pass only reads as a zero gradient in the other);
- WSAM's decoupled sharpness step and LLQR's `apply="update"` rewrite, as hooks on the optimizer ([`attach`]);
- the LLQR refresh on its cadence ([`refresh`]);
- the skip rule: a step is committed only when everything it writes (ε, g̃, every descent term, the mode state) is
  finite. Otherwise the weights, the BatchNorm buffers, every mode buffer and U stay bit-identical, the optimizer
  is made to skip the step, and `sam/skipped` is counted.

The driver only runs the forward/backward passes (and decides gradient synchronisation). Everything that differs
between modes is read from the record. Pure torch: imports no Hugging Face package.
"""

import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from .checkpoint import LLQRSAMStateError, describe_state, validate_sam_state
from .config import SAMConfig, past_fsam_window
from .llqr import LLQRConfig, LLQRPreconditioner
from .lora_sam import (
    LoRALayer,
    NoisePlan,
    aux_forwards,
    bi_lora_ascent,
    bi_lora_init,
    flat_lora_plan,
    flat_lora_sigma,
    lora_forwards,
    lora_layers,
    mean_over_ranks,
    noisy_forwards,
)
from .modes import MODES, ModeSpec
from .sam import (
    Preconditioner,
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
from .step import RunningMetrics, StepKind, StepState, batchnorm_policy, replayed_rng

__all__ = ["COUNTERS", "SAMEngine", "refresh_progress", "step_kind"]

logger = logging.getLogger(__name__)

COUNTERS = ("sam/skipped", "sam/skipped_ascent", "llqr/nonfinite_ugrad", "llqr/skipped_refresh")
"""Logged keys that are counts (summed over a logging interval); every other key is averaged."""


def step_kind(config: SAMConfig | None, step: int) -> StepKind:
    """What optimizer step `step` runs under `config` (`None`, or mode `none`: every step is `plain`).

    Outside the window [`start_step`, `end_step`) every step is `plain` (`end_step=None`: no end). Inside it, a mode
    whose record has `passes="two"` takes two passes on every `interval`-th step; `passes="cadence"` (LookSAM) two
    passes every `looksam_interval`-th step and `reuse` between; `passes="one"` (past-FSAM, Flat-LoRA, Bi-LoRA) one
    pass at θ + ε on every step.
    """
    spec = MODES.get(config.mode) if config is not None else None
    if config is None or spec is None or step < config.start_step:
        return "plain"
    if config.end_step is not None and step >= config.end_step:
        return "plain"
    offset = step - config.start_step
    if spec.passes == "one":
        return "one" if offset % config.interval == 0 else "plain"
    period = config.interval * (config.looksam_interval if spec.passes == "cadence" else 1)
    if offset % period == 0:
        return "two"
    return "reuse" if spec.passes == "cadence" else "plain"


def refresh_progress(log: logging.Logger | Any, step: int, every_s: float = 5.0) -> Callable[[int, int], None]:
    """A `progress(done, total)` for the LLQR refresh before `step`: one INFO line at the first curvature product
    and then at most every `every_s` seconds, so a refresh of seconds to minutes shows where it is."""
    last = [-math.inf]

    def report(done: int, total: int) -> None:
        now = time.perf_counter()
        if now - last[0] >= every_s or done == 1:
            last[0] = now
            log.info(f"LLQR refresh before step {step}: curvature product {done} of {total}")

    return report


class SAMEngine:
    """One SAM-family (and LLQR) optimizer step at a time, for one model.

    A driver calls, per optimizer step: [`begin`]; its pass-1 backward(s) at θ (not on a `one` step); [`ascend`];
    its pass-2 backward(s) inside [`perturbed`]; [`descend`], which leaves the descent gradient in `p.grad` (or
    clears the step); [`end`]. The optimizer then steps on `p.grad` as usual. A driver that raises mid-step calls
    [`abort`].

    Args:
        module (`nn.Module`): the unwrapped model (no DDP / compile wrapper; an FSDP2 model as it is). Its parameters
            with `requires_grad` are the ones perturbed, keyed by their names in `module`.
        config (`SAMConfig`, *optional*): the SAM settings; `None` (or mode `none`) runs plain steps, with U on
            the descent when `llqr` is given (LLQR alone).
        llqr (`LLQRConfig`, *optional*): learn U with LLQR ([`refresh`]); enters C and P as the config says.
        preconditioner (`Preconditioner`, *optional*): a fixed U for C and P instead (ignored with `llqr`).
        device (`torch.device`, *optional*): where U lives.
        agree (`Callable[[bool], bool]`, *optional*): `flag -> any rank has flag`, for `scope="local"`, where each
            rank builds its own ε and all must skip together. `None` on one process.
        u_in_perturbation / u_on_update (`bool`, *optional*): whether U enters C and the gradient descent P; by
            default from `llqr` (`in_perturbation`; `on_update` with `apply="gradient"`), both for a fixed U.
    """

    def __init__(
        self,
        module: nn.Module,
        config: SAMConfig | None,
        *,
        llqr: LLQRConfig | None = None,
        preconditioner: Preconditioner | None = None,
        device: torch.device | str | None = None,
        agree: Callable[[bool], bool] | None = None,
        u_in_perturbation: bool | None = None,
        u_on_update: bool | None = None,
    ) -> None:
        self.module = module
        self.config = config
        self.spec: ModeSpec | None = MODES.get(config.mode) if config is not None else None
        self.llqr = llqr
        self.named_params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        self.sharded = any(is_dtensor(p) for _, p in self.named_params)  # FSDP2
        self.state = SAMState()
        self.preconditioner: Preconditioner | None = (
            LLQRPreconditioner(module, llqr, device=device) if llqr is not None else preconditioner
        )
        # Where U enters: C = U (modes whose record allows it) and P = U; with llqr.apply="update", P acts on the
        # optimizer's update instead ([`attach`]). A fixed U enters both.
        if u_in_perturbation is None:
            u_in_perturbation = llqr.in_perturbation if llqr is not None else True
        if u_on_update is None:
            u_on_update = llqr.on_update and llqr.apply == "gradient" if llqr is not None else True
        self.u_in_perturbation, self.u_on_update = u_in_perturbation, u_on_update
        self.agree = agree
        self.scaler: Any = None  # a GradScaler (or Accelerate's) when fp16 gradients carry a loss scale
        self.metrics = RunningMetrics(COUNTERS)
        self.current: StepState | None = None
        self.in_perturbed_pass = False  # True while the passes at θ + ε run (a compute_loss may skip its metrics)
        self.last_call_passes = 1  # forward/backward passes of the driver's last call (for FLOP counting)
        self._bn = batchnorm_buffers(module)
        self._post: list[tuple[Tensor, Tensor]] = []  # WSAM decoupled: (param, a(g̃ − g) in true units)
        self._before_update: list[Tensor] = []  # llqr.apply="update": θ before the optimizer step
        self._attached: set[int] = set()
        self._refreshed_at: int | None = None  # the step of this engine's last refresh
        # LoRA-aware modes (record.acts_on_lora): the LoRA layers they perturb, and this step's noise or auxiliary
        # adapter (leaf tensors whose gradient the one pass fills)
        self.lora: list[LoRALayer] = []
        self._lora_step: NoisePlan | dict[str, Tensor] | None = None
        self._lora_rho = 0.0  # this step's ρ (Bi-LoRA's ball)
        if self.spec is not None and self.spec.acts_on_lora:
            self._setup_lora()

    # ------------------------------------------------------------------ queries

    @property
    def learned(self) -> LLQRPreconditioner | None:
        """The LLQR preconditioner, when U is learned."""
        pre = self.preconditioner
        return pre if isinstance(pre, LLQRPreconditioner) else None

    def batchnorm_snapshot(self) -> list[Tensor]:
        """Copies of the model's BatchNorm running statistics."""
        return [b.clone() for b in self._bn]

    def grad_scale(self) -> float:
        """The loss scale S the gradients carry (1 without an enabled scaler)."""
        scaler = self.scaler
        return float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0

    def live_grads(self) -> tuple[list[str], list[Tensor], list[Tensor]]:
        """(names, params, grads) of the parameters that have a gradient now."""
        names: list[str] = []
        params: list[Tensor] = []
        grads: list[Tensor] = []
        for n, p in self.named_params:
            if p.grad is not None:
                names.append(n)
                params.append(p)
                grads.append(p.grad)
        return names, params, grads

    def geometry(self) -> Preconditioner | None:
        """C = U when the record allows LLQR in the perturbation (and it is asked for); `None` is the record's C."""
        spec = self.spec
        if self.preconditioner is not None and self.u_in_perturbation and spec is not None and spec.llqr_geometry:
            return self.preconditioner
        return None

    def overlap_window(self) -> list[dict[str, Any]]:
        """The stored steps of past-FSAM's overlap window the one pass also runs on (at most K − 1, newest last)."""
        keep = self._overlap_keep()
        return self.state.batches[-keep:] if keep > 0 else []

    def _overlap_keep(self) -> int:
        """K − 1 for a mode that reads `past_fsam_overlap` (past-FSAM), else 0."""
        config, spec = self.config, self.spec
        if config is None or spec is None or "past_fsam_overlap" not in spec.hyperparameters:
            return 0
        return past_fsam_window(config.past_fsam_overlap) - 1

    def _setup_lora(self) -> None:
        """Find the LoRA layers a LoRA-aware mode perturbs; refuse what it cannot run on, naming `sam_mode`."""
        config, spec = self.config, self.spec
        assert config is not None and spec is not None
        if self.sharded:
            raise ValueError(
                f"Invalid sam_mode={config.mode!r} with FSDP2: {config.mode} perturbs each LoRA layer's whole merged "
                "weight W + sBA in its forward, and FSDP2 shards W by rows across ranks. Use DDP (or one process)."
            )
        if spec.probe == "noise" and config.flat_lora_ramp_steps is None:
            raise ValueError(
                "Invalid flat_lora_ramp_steps=None with sam_mode='flat_lora': the noise std ramps to rho over "
                "flat_lora_ramp_steps optimizer steps (set it to the run's length)."
            )
        self.lora = lora_layers(self.module, config.mode)

    # ------------------------------------------------------------------ LLQR

    def refresh_due(self, step: int, lr_at: Callable[[int], float] | None = None) -> bool:
        """Whether U is refreshed before optimizer step `step` (`docs/algorithm.md` §5.4); at most once per step.

        "Once" is counted by this engine: after an out-of-memory retry the Trainer's step counter restarts at 0,
        and U is refreshed on its cadence again, from the weights and U the failed attempt left.

        Args:
            step (`int`): the optimizer step about to run.
            lr_at (`Callable[[int], float]`, *optional*): the scheduled LR at a step (`apply="update"` defers
                refreshes past LR 0).
        """
        pre = self.learned
        return pre is not None and pre.is_due(step, lr_at=lr_at) and self._refreshed_at != step

    def refresh(
        self,
        step: int,
        batch: Mapping[str, Any],
        *,
        model: nn.Module | None = None,
        broadcast: Callable[[Tensor, int], Tensor] | None = None,
        **update_kwargs: Any,
    ) -> dict[str, float]:
        """Refresh U before optimizer step `step` on the curvature `batch`; the refresh's metrics (also recorded).

        Args:
            step (`int`): the optimizer step about to run (before its pass 1).
            batch (`Mapping`): the curvature batch: model inputs plus `labels`.
            model (`nn.Module`, *optional*): the module the curvature runs through (defaults to the engine's).
            broadcast (`Callable`, *optional*): `(tensor, src) -> tensor`; U is then made identical on every rank,
                free of floating-point drift.
            update_kwargs: passed to [`~hf_llqrsam.llqr.LLQRPreconditioner.update`] (extractor, update probe, …).
        """
        pre = self.learned
        if pre is None:
            raise RuntimeError("SAMEngine.refresh needs an LLQR config (llqr=...).")
        self._refreshed_at = step
        start = time.perf_counter()
        metrics = pre.update(model if model is not None else self.module, batch, step=step, **update_kwargs)
        if broadcast is not None:
            pre.broadcast_(0, broadcast=broadcast)
        metrics["llqr/update_seconds"] = time.perf_counter() - start
        for key, value in metrics.items():
            self.metrics.record(key, value)
        return metrics

    # ------------------------------------------------------------------ one step

    def begin(self, step: int, bn_at_begin: list[Tensor] | None = None) -> StepState:
        """Start optimizer step `step`: its kind, and the BatchNorm snapshot a skipped step is restored to (taken
        now, or `bn_at_begin` when the driver took it before the step's first forward)."""
        self._post = []
        self._lora_step = None
        bn = bn_at_begin if bn_at_begin is not None else self.batchnorm_snapshot()
        self.current = StepState(step=step, kind=step_kind(self.config, step), bn_at_begin=bn)
        return self.current

    def ascend(self, rho: float) -> bool:
        """ε for the current step, from the gradient in `p.grad` (from the stored g̃ₜ₋₁ on a `one` step); whether it
        is finite. The mode state it would write is kept pending until [`descend`] commits the step."""
        st, config = self._current(), self.config
        assert config is not None
        if self.lora:
            return self._ascend_lora(st, config, rho)
        if st.kind == "one":
            names = [n for n, _ in self.named_params]
            params: list[Tensor] = [p for _, p in self.named_params]
            grads, scale = self.state.get("g_last", names, params), 1.0  # stored in true units
        else:
            names, params, grads = self.live_grads()
            scale = self.grad_scale()
        pert = compute_perturbation(
            config, self.state, names, params, grads, rho, self.geometry(), scale, commit=False
        )
        finite = pert.finite
        if config.scope == "local" and self.agree is not None:
            finite = not self.agree(not finite)
        if not finite:
            st.drop, st.perturbation = True, None
            self.metrics.record("sam/skipped_ascent", 1.0)
            return False
        st.perturbation, st.names, st.params = pert, names, params
        st.ascents += 1
        if pert.clean_grads:
            st.clean = dict(zip(names, pert.clean_grads, strict=True))
        if st.kind != "one":
            self.metrics.record("sam/grad_norm", pert.grad_norm)
        self.metrics.record("sam/perturbation_norm", pert.perturbation_norm)
        self.metrics.record("sam/rho", rho)
        if self.spec is not None and self.spec.probe != "gradient":
            self.metrics.record("sam/probe_norm", pert.probe_norm)
        return True

    def _ascend_lora(self, st: StepState, config: SAMConfig, rho: float) -> bool:
        """The one pass's perturbation of a LoRA-aware mode: Flat-LoRA's noise plan (seeds and per-row stds from the
        merged weights), or Bi-LoRA's auxiliary adapter from the state (drawn from the seed on the first step) as
        leaf tensors whose gradient the pass fills."""
        spec = self.spec
        assert spec is not None
        if spec.probe == "noise":
            assert config.flat_lora_ramp_steps is not None
            sigma = flat_lora_sigma(rho, st.step, config.flat_lora_ramp_steps)
            plan = flat_lora_plan(self.lora, sigma, config.seed, st.step)
            finite = bool(torch.isfinite(total_norm(plan.stds)))
            self._lora_step = plan
            self.metrics.record("sam/noise_sigma", sigma)
        else:
            names = [n for layer in self.lora for pair in layer.adapters for n in pair]
            if self.state.has("aux"):
                like = [dict(self.named_params)[n] for n in names]
                start = dict(zip(names, self.state.get("aux", names, like), strict=True))
            else:
                start = bi_lora_init(self.lora, rho, config.seed)
            self._lora_step = {n: t.detach().clone().requires_grad_(True) for n, t in start.items()}
            finite = bool(torch.isfinite(total_norm(list(start.values()))))
            self.metrics.record("sam/perturbation_norm", float(total_norm(list(start.values()))))
        if not finite:
            st.drop, self._lora_step = True, None
            self.metrics.record("sam/skipped_ascent", 1.0)
            return False
        st.ascents += 1
        self._lora_rho = rho
        self.metrics.record("sam/rho", rho)
        return True

    def stash_grads(self) -> dict[int, Tensor]:
        """Copies of the gradients accumulated so far, by `id` of the gradient, and the gradients zeroed (one ε per
        micro-batch: pass 1 must see this micro-batch's gradient alone, pass 2 adds onto the stash)."""
        _, _, grads = self.live_grads()
        stash = {id(g): g.clone() for g in grads}
        if grads:
            torch._foreach_zero_(grads)
        return stash

    @contextmanager
    def perturbed(
        self,
        *,
        zero_grads: bool = True,
        stash: Mapping[int, Tensor] | None = None,
        bn_before: list[Tensor] | None = None,
    ) -> Iterator[None]:
        """θ ← θ + ε for the passes run inside the block; on exit θ ← its backup by copy (bit-exact).

        Args:
            zero_grads (`bool`, *optional*, defaults to `True`): start the block's gradient from zero (pass 2), or
                from the stash. `False` keeps `p.grad` as it is (past-FSAM's one pass accumulates across calls).
            stash (`Mapping[int, Tensor]`, *optional*): [`stash_grads`]'s copies, put back before the block.
            bn_before (`list[Tensor]`, *optional*): the BatchNorm buffers before pass 1, for the `second` policy.

        A two-pass step keeps exactly one pass's BatchNorm update (`bn_stats`) and, with `same_dropout`, restores
        the post-pass-1 RNG state on exit. A skipped ascent still runs the block at θ (collectives stay aligned).
        """
        st, config = self._current(), self.config
        assert config is not None
        if zero_grads:
            _, _, grads = self.live_grads()
            stashed = stash or {}
            restored = [g for g in grads if id(g) in stashed]
            if restored:
                copy_tensors_(restored, [stashed[id(g)] for g in restored])
            zeroed = [g for g in grads if id(g) not in stashed]
            if zeroed:
                torch._foreach_zero_(zeroed)
        pert = st.perturbation
        backups = apply_perturbation_(st.params, pert.eps) if pert is not None else None
        policy = config.bn_stats if st.kind == "two" else "none"
        self.in_perturbed_pass = True
        try:
            with (
                batchnorm_policy(self._bn, policy, bn_before),
                replayed_rng(config.same_dropout and st.kind == "two"),
                self._lora_perturbed(),
            ):
                yield
        finally:
            self.in_perturbed_pass = False
            if backups is not None:
                restore_(st.params, backups)

    @contextmanager
    def _lora_perturbed(self) -> Iterator[None]:
        """The LoRA layers' base layers run with the step's noise or auxiliary adapter (W itself is never written)."""
        step = self._lora_step
        if step is None:
            yield
            return
        forwards = noisy_forwards(self.lora, step) if isinstance(step, NoisePlan) else aux_forwards(self.lora, step)
        with lora_forwards(self.lora, forwards):
            yield

    def descend(self) -> bool:
        """The mode's descent on the gradient in `p.grad`, P = U, and the skip rule; whether the step is taken.

        Taken: `p.grad` holds the descent gradient and the pending mode state is committed. Skipped: the BatchNorm
        buffers are put back, the state and U are untouched, and the optimizer is made to skip the step (`p.grad`
        cleared; under an enabled scaler an inf marks the step, so the scaler skips it and backs off).
        """
        st, spec, config = self._current(), self.spec, self.config
        scale = self.grad_scale()
        names, params, grads = self.live_grads()
        pert = st.perturbation
        pending: list[tuple[str, list[str], list[Tensor]]] = []
        if pert is not None:
            pending += [(kind, st.names, tensors) for kind, tensors in pert.pending.items()]
        post: list[tuple[Tensor, Tensor]] = []
        if spec is not None and config is not None:
            if st.kind == "one" and spec.probe == "past_difference":
                if st.extra_passes:  # past-FSAM's overlap window: the mean over its K steps
                    torch._foreach_mul_(grads, 1.0 / (1 + st.extra_passes))
                fp32 = [t.float() if t.dtype in (torch.float16, torch.bfloat16) else t for t in grads]
                pending.append(("g_last", names, list(torch._foreach_div(fp32, scale))))
            elif st.kind == "one" and isinstance(self._lora_step, dict):  # Bi-LoRA: the auxiliary adapter ascends
                aux = self._lora_step
                aux_names = list(aux)
                aux_grads = mean_over_ranks(
                    [t.grad if t.grad is not None else torch.zeros_like(t) for t in aux.values()]
                )
                rho = self._lora_rho
                moved = bi_lora_ascent(list(aux.values()), aux_grads, config.bi_lora_lr or rho, rho)
                pending.append(("aux", aux_names, moved))
            elif pert is not None and spec.keeps_clean:
                names, params, grads, clean = self._aligned_clean(names, params, st.clean)
                match spec.descent:
                    case "gsam":
                        gsam_descent_(grads, clean, config.gsam_alpha)
                    case "looksam":  # a full step keeps g̃ and stores g_v for the reuse steps
                        gv = list(torch._foreach_div(looksam_orthogonal(clean, grads), scale))
                        pending.append(("gv", names, gv))
                    case "wsam":
                        sharp = wsam_descent_(grads, clean, config.wsam_gamma, config.wsam_decouple)
                        post = list(zip(params, torch._foreach_div(sharp, scale), strict=True)) if sharp else []
            elif st.kind == "reuse" and spec.descent == "looksam" and self.state.has("gv"):
                looksam_reuse_(grads, self.state.get("gv", names, grads), config.looksam_alpha)
        if self.preconditioner is not None and self.u_on_update and (spec is None or spec.llqr_descent):
            self.preconditioner.apply_(names, grads)
        written = list(grads) + [t for _, _, ts in pending for t in ts] + [t for _, t in post]
        if st.drop or not bool(torch.isfinite(total_norm(written))):
            self._skip(st, grads)
            return False
        for kind, kind_names, tensors in pending:
            self.state.set(kind, kind_names, tensors)
        self.state.ascents += st.ascents
        self._post = post
        return True

    def end(self, record_losses: bool = True) -> None:
        """Close the current step: advance past-FSAM's overlap window and log the step's losses."""
        st = self._current()
        keep = self._overlap_keep() if st.kind == "one" else 0
        if keep > 0:  # the data window advances whether or not the step was taken (the reference's loader)
            self.state.batches.append({"inputs": list(st.inputs), "num_items": st.num_items})
            del self.state.batches[:-keep]
        if record_losses and st.is_sam:
            clean, perturbed = float(st.clean_loss), float(st.perturbed_loss)
            self.metrics.record("sam/loss_perturbed", perturbed)
            if st.perturbation is not None and st.kind == "two":
                self.metrics.record("sam/sharpness", perturbed - clean)
        self.current = None

    def abort(self) -> None:
        """Drop the current step after a failed pass (e.g. out of memory): θ was restored by [`perturbed`], the
        BatchNorm buffers are put back here, nothing was committed, and the next call starts a fresh step."""
        if self.current is not None:
            copy_tensors_(self._bn, self.current.bn_at_begin)
        self.current = None
        self.in_perturbed_pass = False
        self._post = []
        self._lora_step = None

    # ------------------------------------------------------------------ the optimizer's side

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Hook the engine's post-step terms onto the torch optimizer (once per optimizer).

        The hooks fire only on steps the optimizer really takes (not on steps an fp16 scaler skips): WSAM's decoupled
        sharpness step θ ← θ − lr·a(g̃ − g) after the base step (Yue et al., KDD 2023, Alg. 1), and with
        `llqr.apply="update"` the rewrite θ ← θ_old + U(θ − θ_old) of the full update (`docs/algorithm.md` §7.3).
        """
        if id(optimizer) in self._attached:
            return
        self._attached.add(id(optimizer))
        optimizer.register_step_post_hook(self._sharpness_step)
        if self.llqr is not None and self.llqr.apply == "update":
            optimizer.register_step_pre_hook(self._snapshot_before_step)
            optimizer.register_step_post_hook(self._precondition_update)

    def _sharpness_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        # `pytorch_optimizer.WSAM.second_step` (4.1.0, decouple=True): a plain SGD step at the parameter's group lr
        if not self._post:
            return
        lr = {id(p): float(group["lr"]) for group in optimizer.param_groups for p in group["params"]}
        with torch.no_grad():
            for p, sharp in self._post:
                if id(p) in lr:
                    p.add_(sharp.to(p.dtype), alpha=-lr[id(p)])
        self._post = []

    def _snapshot_before_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._before_update = [p.detach().clone() for _, p in self.named_params]

    def _precondition_update(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self.preconditioner is None or not self._before_update:
            return
        names = [n for n, _ in self.named_params]
        params = [p.detach() for _, p in self.named_params]
        with torch.no_grad():
            delta = list(torch._foreach_sub(params, self._before_update))
            self.preconditioner.apply_(names, delta)
            copy_tensors_(params, torch._foreach_add(self._before_update, delta))
        self._before_update = []

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """The SAM state and U, as the Trainer's `llqrsam_state.pt` holds them (`hf_llqrsam/checkpoint.py`)."""
        pre = self.learned
        mode = self.config.mode if self.config is not None else "none"
        return {
            "sam": self.state.state_dict(),
            "llqr": pre.state_dict() if pre is not None else None,
            "config": {"sam_mode": mode, "llqr": self.llqr is not None},
        }

    def load_state_dict(self, state: Mapping[str, Any], source: str = "llqrsam_state.pt") -> None:
        """Restore [`state_dict`]'s contents (validated against this run); warn about any part this run will not use.

        An FSDP2 checkpoint's shards are read first, with DCP, into tensors like the live ones (a collective: call it
        on every rank); SAM buffers are then stored like their parameters. Every refusal is an
        [`~hf_llqrsam.checkpoint.LLQRSAMStateError`] naming `source`.

        Args:
            state (`Mapping`): `{"sam": ..., "llqr": ..., "config": {"sam_mode": ..., "llqr": ...}}`.
            source (`str`, *optional*): the file it came from, named in errors.
        """
        from .sharded_state import has_placeholders, load_sharded

        if has_placeholders(state):
            state = load_sharded(os.path.dirname(source), dict(state), self._shard_template)
        mode = self.config.mode if self.config is not None else "none"
        validate_sam_state(state, source, mode=mode, params=dict(self.named_params))
        saved_mode = state["config"]["sam_mode"]
        if saved_mode == mode:  # kinds, names, shapes and dtypes were checked by validate_sam_state
            try:
                self.state.load_state_dict(state["sam"], device=self._device())
            except ValueError as err:
                raise LLQRSAMStateError(f"{source}: {err}") from err
            self._align_sam_buffers()
        elif describe_state(state)["sam"]:
            logger.warning(
                f"The checkpoint's SAM state was written with sam_mode={saved_mode!r}; this run has "
                f"sam_mode={mode!r}, so that state is not used and the SAM state starts fresh."
            )
        pre = self.learned
        if state["llqr"] is None:
            if pre is not None:
                logger.warning("The checkpoint holds no LLQR state: this run starts with U = I.")
        elif pre is None:
            logger.warning(
                "The checkpoint holds a learned LLQR preconditioner U, but this run has llqr=False: U is not used."
            )
        else:
            pre.load_state_dict(state["llqr"], source=source)

    def _device(self) -> torch.device | None:
        return self.named_params[0][1].device if self.named_params else None

    def _shard_template(self, path: tuple[str, ...], size: torch.Size, dtype: torch.dtype) -> Tensor:
        """The tensor a DCP shard of an FSDP2 checkpoint is read into (`hf_llqrsam/sharded_state.py`).

        Like the live tensor it replaces (a tensor of U, or the parameter a SAM buffer belongs to): for a DTensor only
        this rank's shard is read, whatever the world size that wrote it; otherwise a plain tensor of the saved size,
        read whole (a DDP or one-process resume, or a tensor this run does not have, which validation then reports).
        """
        live: Tensor | None = None
        pre = self.learned
        if len(path) == 4 and path[:2] == ("llqr", "blocks") and pre is not None:
            if path[2] in pre.names:
                live = pre.structure.blocks[pre.names.index(path[2])].get(path[3])
        elif len(path) == 4 and path[:2] == ("sam", "buffers"):
            live = dict(self.named_params).get(path[3])
        if live is not None and tuple(live.shape) == tuple(size):
            return torch.empty_like(live, dtype=dtype)
        return torch.empty(size, dtype=dtype, device=self._device())

    def _align_sam_buffers(self) -> None:
        """Store each loaded SAM buffer like its parameter: an FSDP2 shard for a DTensor parameter (a local slice of
        a whole saved buffer), a whole tensor otherwise (a gathered shard)."""
        from .llqr.sharding import full_tensor, shard_like

        params = dict(self.named_params)
        for store in self.state.buffers.values():
            for name, t in list(store.items()):
                p = params.get(name)
                if p is not None and is_dtensor(p) != is_dtensor(t):
                    store[name] = shard_like(t, p) if is_dtensor(p) else full_tensor(t)

    # ------------------------------------------------------------------ internals

    def _current(self) -> StepState:
        if self.current is None:
            raise RuntimeError("No optimizer step in progress: call SAMEngine.begin(step) first.")
        return self.current

    def _aligned_clean(
        self, names: list[str], params: list[Tensor], clean: Mapping[str, Tensor]
    ) -> tuple[list[str], list[Tensor], list[Tensor], list[Tensor]]:
        """(names, params, grads, clean) over the parameters with a gradient in either pass, in model order.

        A parameter with no pass-2 gradient gets a zero `p.grad`; one with no pass-1 gradient reads a zero clean
        gradient (LayerDrop, unused branches, MoE routing: `docs/algorithm.md` §8.7).
        """
        have = set(names)
        out_names: list[str] = []
        out_params: list[Tensor] = []
        out_grads: list[Tensor] = []
        out_clean: list[Tensor] = []
        for n, p in self.named_params:
            if n not in have and n not in clean:
                continue
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            g = p.grad
            out_names.append(n)
            out_params.append(p)
            out_grads.append(g)
            c = clean.get(n)
            out_clean.append(
                c if c is not None else torch.zeros_like(g, dtype=torch.promote_types(g.dtype, torch.float32))
            )
        return out_names, out_params, out_grads, out_clean

    def _skip(self, st: StepState, grads: Sequence[Tensor]) -> None:
        self.metrics.record("sam/skipped", 1.0)
        copy_tensors_(self._bn, st.bn_at_begin)
        self._post = []
        scaler = self.scaler
        if scaler is not None and scaler.is_enabled():
            # the scaler skips the step and backs off; under FSDP2 every rank marks its own (non-empty) shard
            local = (g.to_local() if is_dtensor(g) else g for g in grads)  # type: ignore[attr-defined]
            target = next((t for t in local if t.numel()), None)
            if target is not None and bool(torch.isfinite(total_norm(grads))):
                target.view(-1)[0] = float("inf")
        else:
            for _, p in self.named_params:  # no grads: the optimizer leaves these weights untouched
                p.grad = None
