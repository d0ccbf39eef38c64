"""Training arguments: flat, prefixed `sam_*` / `llqr_*` fields on top of [`~transformers.TrainingArguments`].

The fields follow `docs/algorithm.md` §12.1 (defaults, with the reference knob each one maps to). They are checked when
the arguments are built, from the Python API and the CLI alike, by [`validate_llqrsam_args`]:

1. every field against its annotated type (`Literal` membership, `bool`, `int`, finite `float`, `X | None`),
   generically from the dataclass annotations;
2. every number against its range ([`_RANGES`]);
3. the cross-field rules, read from the [`~hf_llqrsam.modes.ModeSpec`] of the selected mode (window-only,
   global-only, own normaliser, where LLQR may enter);
4. the support matrix ([`~hf_llqrsam.compat.validate_setup_args`]);
5. flags that the run ignores (an `llqr_*` flag with `llqr` off, a mode's hyperparameter under another mode, a
   `sam_*` flag with `sam_mode="none"`, ...) get one `UserWarning` naming all of them.

Each failure is a `ValueError` naming the flag, its value and what is allowed. On the command line,
[`parse_args`] (or the [`cli_errors`] context manager) turns it into a one-line `prog: error: ...` and exit code 2.

[`LLQRSAMFields.to_sam_config`] and [`LLQRSAMFields.to_llqr_config`] build the typed, frozen configs the math
modules accept.
"""

import argparse
import contextlib
import math
import numbers
import os
import sys
import textwrap
import types
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import MISSING, dataclass, field, fields
from typing import TYPE_CHECKING, Any, ClassVar, Literal, NoReturn, Union, cast, get_args, get_origin, get_type_hints

from transformers import HfArgumentParser, Seq2SeqTrainingArguments, TrainingArguments

from .compat import validate_deepspeed_args, validate_setup_args
from .config import (
    Accumulation,
    BNStats,
    FisherSAMForm,
    FSAMEma,
    FSAMInit,
    InfoSAMVariance,
    Norm,
    RhoSchedule,
    SAMConfig,
    SAMMode,
    Scope,
    past_fsam_window,
)
from .llqr.config import (
    Apply,
    CGBeta,
    ClipGroups,
    CurvatureSharding,
    Divergence,
    InnerSolver,
    LLQRConfig,
    NGDScaling,
    Schedule,
    ShiftLabels,
    Structure,
    UpdateProbeScale,
)
from .llqr.schedules import parse_milestones
from .modes import MODES, SAM_MODE_NAMES

__all__ = [
    "SAM_MODES",
    "LLQRSAMFields",
    "LLQRSAMSeq2SeqTrainingArguments",
    "LLQRSAMTrainingArguments",
    "cli_errors",
    "flags_markdown",
    "ignored_flags",
    "parse_args",
    "validate_llqrsam_args",
    "validate_llqrsam_fields",
    "warn_ignored_flags",
]

SAM_MODES: tuple[str, ...] = SAM_MODE_NAMES
"""The `sam_mode` values, `"none"` first (= [`~hf_llqrsam.modes.SAM_MODE_NAMES`]; the `SAMMode` Literal lists them)."""


@dataclass(kw_only=True)
class LLQRSAMFields:
    # No docstring here: __doc__ is generated from the fields' `help` below (`_fields_docstring`), the one source of
    # every flag's description, which the CLI `--help` and the docs' flag page (`flags_markdown`) read as well.

    sam_mode: SAMMode = field(
        default="none",
        metadata={
            "help": (
                "The SAM variant: `none`, or one of the modes of the SAM family template (`docs/algorithm.md` "
                "§8.2). `none` with `llqr` off is the stock [`~transformers.Trainer`] path, bit for bit."
            )
        },
    )
    sam_rho: float = field(
        default=0.1,
        metadata={
            "help": "Perturbation radius ρ; ε = ρ·Cv/√(ν² + sam_eps). Must be > 0 when `sam_mode` is not `none`."
        },
    )
    sam_rho_schedule: RhoSchedule = field(
        default="constant",
        metadata={
            "help": "`constant`, `iwslt14_cosine_ramp` (the reference's opt-in ramp) or `lr_proportional` (GSAM)."
        },
    )
    sam_rho_min: float = field(
        default=0.0,
        metadata={"help": "Lower end of the `lr_proportional` schedule (>= 0, <= `sam_rho`)."},
    )
    sam_start_step: int = field(
        default=0,
        metadata={"help": "Optimizer steps before this one are plain (one-pass) steps."},
    )
    sam_end_step: int | None = field(
        default=None,
        metadata={
            "help": (
                "Optimizer steps from this one on are plain again: SAM (every SAM-family mode) runs only in the "
                "window [`sam_start_step`, `sam_end_step`), the sharpness-aware mid-training recipe "
                "(arXiv 2605.02105). `None`: no end. Must be > `sam_start_step`."
            )
        },
    )
    sam_interval: int = field(
        default=1,
        metadata={"help": "Run SAM on every k-th step after `sam_start_step`; the other steps are plain."},
    )
    sam_norm: Norm = field(
        default="euclidean",
        metadata={
            "help": (
                "Normaliser ν: `euclidean` ‖Cv‖₂ or `matrix` √(vᵀCv) (the reference's `norm_mode` `euclidean`, "
                "`matrix_norm`), or the same per layer, `layer_euclidean` / `layer_matrix` (`layer_euclidean`, "
                "`layer_matrix_norm`): ε_l = ρ (Cv)_l / (ν_l √L) over the L modules that own parameters "
                "([`~hf_llqrsam.sam.layer_groups`]). Modes with their own normaliser need `euclidean`."
            )
        },
    )
    sam_eps: float = field(
        default=1e-12,
        metadata={"help": "Added to ν² inside the square root (> 0)."},
    )
    sam_accumulation: Accumulation = field(
        default="window",
        metadata={
            "help": (
                "`window`: one ε from the whole accumulated batch (reference semantics). `micro`: one ε per "
                "micro-batch (modes that need the window gradient are window-only)."
            )
        },
    )
    sam_scope: Scope = field(
        default="global",
        metadata={
            "help": (
                "`global`: ε from the all-reduced gradient. `local`: ε from each rank's own gradient (m-sharpness)."
            )
        },
    )
    sam_bn_stats: BNStats = field(
        default="second",
        metadata={"help": "Which pass leaves its BatchNorm running statistics: `second` (the reference) or `first`."},
    )
    sam_same_dropout: bool = field(
        default=False,
        metadata={"help": "Replay pass 1's dropout masks in pass 2."},
    )

    asam_eta: float = field(
        default=0.01,
        metadata={"help": "ASAM's T = |θ| + η (>= 0)."},
    )
    fsam_beta: float = field(
        default=0.9,
        metadata={"help": "FSAM's EMA decay of the clean gradient ḡ, in [0, 1)."},
    )
    fsam_sigma: float = field(
        default=1.0,
        metadata={"help": "FSAM's probe v = g − σ ḡ."},
    )
    fsam_init: FSAMInit = field(
        default="zero",
        metadata={"help": "FSAM's initial ḡ: `zero` (reference) or `first_grad` (official F-SAM code)."},
    )
    fisher_sam_form: FisherSAMForm = field(
        default="reference",
        metadata={"help": "`reference` C = 1/(g² + η) or `paper` C = 1/(1 + η g²)."},
    )
    fisher_sam_eta: float | None = field(
        default=None,
        metadata={"help": "Fisher-SAM's η (> 0); `None` means 0.1 for the reference form and 1.0 for the paper form."},
    )
    gsam_alpha: float = field(
        default=0.4,
        metadata={"help": "GSAM's descent d = g̃ − α g⊥ (>= 0)."},
    )
    vasso_theta: float = field(
        default=0.4,
        metadata={"help": "VaSSO's d_t = (1 − θ) d_{t−1} + θ g_t, θ in (0, 1]."},
    )
    infosam_alpha: float = field(
        default=0.9,
        metadata={"help": "infoSAM's gradient EMA decay, in [0, 1) (our choice)."},
    )
    infosam_damping: float = field(
        default=1e-08,
        metadata={"help": "Floor δ of infoSAM's noise estimate b (> 0)."},
    )
    infosam_variance: InfoSAMVariance = field(
        default="instant",
        metadata={"help": "infoSAM's noise estimate: `instant` b = (m − g)² (the prototype) or `ema`."},
    )
    fsam_ema: FSAMEma = field(
        default="precond_grad",
        metadata={
            "help": (
                "FSAM's and past-FSAM's reference `perturb_mode` (`lqr_optimizer/_src/utils/utils.py: "
                "make_perturbation_from_vector`, `update_gbar`). `precond_grad` (default; today's behaviour) is "
                "`ema_precond_grad`, the paper's LLQR-on FSAM sweep: ḡ is the EMA of the raw clean gradient and "
                "C = U when `--llqr` with `llqr_in_perturbation`. `grad` is `ema_grad`: the same EMA with U kept "
                "out of ε, so with `--llqr` it needs `--no_llqr_in_perturbation` (without U in ε the two are the "
                "same). `direction` is `ema_direction`: ḡ is renormalised to unit norm after every update and C "
                "v is made unit-norm before ν."
            )
        },
    )
    past_fsam_overlap: float = field(
        default=0.0,
        metadata={
            "help": (
                "past-FSAM's `batch_overlap_fraction` f, 1 − 1/K for an integer K (0, 0.5, 2/3, 0.75, ...): the "
                "one pass runs on the last K fresh batches (this step's and those of the K − 1 steps before, "
                "kept in the SAM state), so consecutive windows share a fraction f, as the reference's windows "
                "of K chunks that advance one chunk per step. `per_device_train_batch_size` is the reference's "
                "fresh chunk, `batch_size`·(1 − f). Single process."
            )
        },
    )
    looksam_interval: int = field(
        default=5,
        metadata={
            "help": (
                "LookSAM's k (>= 1): the full two-pass SAM step on every k-th step after `sam_start_step`, one "
                "pass between."
            )
        },
    )
    looksam_alpha: float = field(
        default=0.7,
        metadata={"help": "LookSAM's α (>= 0): the one-pass steps descend along g + α (‖g‖/‖g_v‖) g_v."},
    )
    wsam_gamma: float = field(
        default=0.9,
        metadata={
            "help": "WSAM's γ, in [0, 1): the loss L + γ/(1 − γ)·(L(θ + ε) − L), as in `pytorch_optimizer.WSAM`."
        },
    )
    wsam_decouple: bool = field(
        default=True,
        metadata={
            "help": (
                "WSAM's sharpness term γ/(1 − γ)(g̃ − g) as its own SGD step after the base optimizer stepped on "
                "g (the paper's Algorithm 1, `pytorch_optimizer`'s `decouple=True`), or (False) added to the "
                "gradient."
            )
        },
    )
    flat_lora_ramp_steps: int | None = field(
        default=None,
        metadata={
            "help": (
                "Flat-LoRA's ramp length T in optimizer steps (>= 1): the noise std σₜ = `sam_rho`·½(1 − cos(π·t/T)) "
                "grows from 0 to `sam_rho` over T steps and stays there (Li et al., ICML 2025: T is the whole run). "
                "`None`: `max_steps`, which must then be set."
            )
        },
    )
    bi_lora_lr: float | None = field(
        default=None,
        metadata={
            "help": (
                "Bi-LoRA's ascent step η₂ (> 0) of the auxiliary adapter θ₂: θ₂ ← Π(θ₂ + η₂·g₂/‖g₂‖) onto the "
                "ball ‖θ₂‖ <= `sam_rho`. `None`: `sam_rho`."
            )
        },
    )

    llqr: bool = field(
        default=False,
        metadata={
            "help": (
                'Learn the inverse preconditioner U (`use_preconditioner`). With `sam_mode="sam"` this is LLQR+SAM.'
            )
        },
    )
    llqr_in_perturbation: bool = field(
        default=True,
        metadata={
            "help": (
                "Use C = U in the perturbation. Only modes whose geometry is the preconditioner (`sam`, `fsam`) "
                "admit it; pass `--no_llqr_in_perturbation` with the others (ASAM)."
            )
        },
    )
    llqr_on_update: bool = field(
        default=True,
        metadata={
            "help": (
                'Use P = U on the descent gradient (required with `sam_mode="none"` and with `llqr_apply="update"`).'
            )
        },
    )
    llqr_apply: Apply = field(
        default="gradient",
        metadata={
            "help": (
                "`gradient`: U·g̃ replaces the gradient. `update`: U on the base optimizer's update "
                "(`precond_on_update`; SGD/Adam/AdamW only); its first refresh waits for the first step whose "
                "learning rate is > 0."
            )
        },
    )
    llqr_update_probe_scale: UpdateProbeScale = field(
        default="gradient_norm",
        metadata={
            "help": (
                '`llqr_apply="update"` only: the scale of the refresh\'s probe Δ_opt(g). `gradient_norm` (ours) '
                "rescales it to ‖g‖, so that U learns at the gradient mode's scale whatever the learning rate; "
                "`none` keeps the raw update, as the reference's `precond_on_update` does (its size is the LR, "
                "so with AdamW U barely moves)."
            )
        },
    )
    llqr_divergence: Divergence = field(
        default="ngd",
        metadata={
            "help": "Curvature G: `ngd` (Fisher/GGN), `newton` (exact Hessian), `renyi` (α·GGN) or `reverse_kl`."
        },
    )
    llqr_ngd_scaling: NGDScaling = field(
        default="sum",
        metadata={
            "help": "`sum`: G = Σ_rows JᵀFJ (the reference) or `mean`: the textbook GGN_mean. Used by `ngd` only."
        },
    )
    llqr_renyi_alpha: float = field(
        default=0.5,
        metadata={"help": "The Rényi order α (> 0, != 1). Used by `renyi` only."},
    )
    llqr_structure: Structure = field(
        default="diagonal",
        metadata={
            "help": (
                "Structure of U: `diagonal`, `scalar`, `kfac`, `ekfac`, `sep_ekfac`, or the reference's "
                "constrained `psd_ekfac`, `psd_sep_ekfac`, `diag_kfac`, `sym_kfac`, `psd_sym_kfac` "
                "([`~hf_llqrsam.llqr.structures_ext`])."
            )
        },
    )
    llqr_update_interval: int = field(
        default=1000,
        metadata={"help": "Refresh U every E optimizer steps (>= 1)."},
    )
    llqr_update_interval_milestones: str | None = field(
        default=None,
        metadata={
            "help": (
                'Piecewise-constant E, `"k1:E1,k2:E2"`: E = E_i from step k_i on (strictly increasing k_i >= 1, '
                "E_i >= 1), refreshes where k mod E(k) = 0 (the reference's `piecewise_constant` "
                "`precond_update_scheduler`)."
            )
        },
    )
    llqr_update_until: int | None = field(
        default=None,
        metadata={
            "help": (
                "No refresh at or after this step (>= 1; 0 would leave U = I for the whole run); `None` never stops."
            )
        },
    )
    llqr_batch_size: int = field(
        default=64,
        metadata={"help": "Examples in the curvature batch (>= 1)."},
    )
    llqr_inner_steps: int = field(
        default=50,
        metadata={"help": "Inner solver steps T per refresh (>= 0)."},
    )
    llqr_inner_solver: InnerSolver = field(
        default="momentum",
        metadata={
            "help": (
                "The reference's `precond_solver`: `momentum` (heavy ball), `sgd`, `adam` (optax defaults) or "
                "`cg` (its `cg_back_pr+`: PR+ nonlinear CG with Armijo backtracking, no clip, no learning rate)."
            )
        },
    )
    llqr_cg_beta: CGBeta = field(
        default="reference",
        metadata={
            "help": (
                "`cg` only: `reference` keeps the reference's β bookkeeping (β = 0 every step: steepest descent "
                "with the line search); `polak_ribiere` the textbook PR+ between consecutive iterates."
            )
        },
    )
    llqr_inner_lr: float = field(
        default=0.001,
        metadata={"help": "Inner-loop learning rate (> 0); not used by `cg`."},
    )
    llqr_inner_lr_schedule: Schedule = field(
        default="constant",
        metadata={
            "help": (
                "Schedule of the inner LR over the optimizer step: `constant`, `cosine` (from `llqr_inner_lr` at "
                "step 0 to `llqr_inner_lr_schedule_value` at step `llqr_inner_lr_schedule_steps`, then held) or "
                "`warmup` (linear from the value to `llqr_inner_lr`)."
            )
        },
    )
    llqr_inner_lr_schedule_value: float = field(
        default=0.0,
        metadata={"help": "The LR schedule's other end (>= 0): cosine's final value, warmup's value at step 0."},
    )
    llqr_inner_lr_schedule_steps: int | None = field(
        default=None,
        metadata={"help": "The LR schedule's length in optimizer steps (>= 1); required by `cosine` and `warmup`."},
    )
    llqr_inner_momentum: float = field(
        default=0.9,
        metadata={"help": "Inner-loop momentum, in [0, 1); `momentum` only."},
    )
    llqr_clip_norm: float = field(
        default=5.0,
        metadata={"help": "Per-group clip of the U-gradient (> 0)."},
    )
    llqr_clip_groups: ClipGroups = field(
        default="module",
        metadata={"help": "Clip groups: `module` (one per leaf module) or `tensor`."},
    )
    llqr_ema_decay: float = field(
        default=0.95,
        metadata={"help": "β of the EMA merge U ← βU + (1 − β)V, in [0, 1]."},
    )
    llqr_ema_schedule: Schedule = field(
        default="constant",
        metadata={
            "help": (
                "Schedule of β over the optimizer step, as `llqr_inner_lr_schedule` (the reference's "
                "`ema_scheduler`). The IWSLT variant (cosine from 0.8 to 0.925 over 133 epochs) is "
                "`--llqr_ema_decay 0.8 --llqr_ema_schedule cosine --llqr_ema_schedule_value 0.925 "
                "--llqr_ema_schedule_steps <133 × steps per epoch>`."
            )
        },
    )
    llqr_ema_schedule_value: float = field(
        default=0.0,
        metadata={"help": "The β schedule's other end, in [0, 1]: cosine's final value, warmup's value at step 0."},
    )
    llqr_ema_schedule_steps: int | None = field(
        default=None,
        metadata={"help": "The β schedule's length in optimizer steps (>= 1); required by `cosine` and `warmup`."},
    )
    llqr_warm_start: bool = field(
        default=True,
        metadata={"help": "Start the inner loop from the current U (else from the identity)."},
    )
    llqr_damping: float = field(
        default=0.0,
        metadata={"help": "Damping λ of G + λI (>= 0)."},
    )
    llqr_min_diag: float = field(
        default=1e-08,
        metadata={"help": "Positivity clamp of diagonal/scalar U (> 0)."},
    )
    llqr_allow_inversion: bool = field(
        default=False,
        metadata={"help": "Skip the positivity clamp."},
    )
    llqr_identity_scaling: float = field(
        default=1.0,
        metadata={"help": "Store s·U and divide by s when applying (> 0)."},
    )
    llqr_include_pad_rows: bool = field(
        default=False,
        metadata={"help": "Count padding target rows in the curvature problem, as the reference does."},
    )
    llqr_shift_labels: ShiftLabels = field(
        default="auto",
        metadata={
            "help": (
                "Pair the logits at position t with the label at t + 1 in the curvature problem, as a causal "
                "LM's loss does. `auto` decides from the model, looking through PEFT / `torch.compile` / DDP "
                "wrappers: decoder-only causal LMs shift; encoder–decoder and classification models do not; a "
                "model it cannot place raises a `ValueError` at the first LLQR refresh. `true` / `false` force "
                "it."
            )
        },
    )
    llqr_curvature_sharding: CurvatureSharding = field(
        default="replicated",
        metadata={
            "help": (
                "Multi-process: `replicated` (every rank runs the same refresh) or `sharded` (1/W of the batch "
                "per rank)."
            )
        },
    )
    llqr_chunk_size: int | None = field(
        default=None,
        metadata={"help": "Recompute the curvature batch in chunks of this many examples (>= 1); `None`: one chunk."},
    )

    llqr_unsupported: ClassVar[str | None] = None
    """`"<trainer>: <why>"` where this argument class refuses `llqr=True` (a trainer without LLQR: DPO), or `None`."""

    if TYPE_CHECKING:  # a field of TrainingArguments, which every concrete argument class mixes in

        @property
        def label_smoothing_factor(self) -> float: ...

        @property
        def max_steps(self) -> int: ...

        @property
        def seed(self) -> int: ...

    def to_sam_config(self) -> SAMConfig:
        """The frozen [`~hf_llqrsam.config.SAMConfig`] of these arguments, with `fisher_sam_eta` and
        `flat_lora_ramp_steps` resolved.

        `sam_<x>` becomes `x`; the per-mode fields keep their names. `fisher_sam_eta=None` becomes 0.1 for the
        reference form and 1.0 for the paper form (`docs/algorithm.md` §8.4); `flat_lora_ramp_steps=None` becomes
        `max_steps` (when > 0); `seed` is the run's `seed`.
        """
        eta = self.fisher_sam_eta
        if eta is None:
            eta = 0.1 if self.fisher_sam_form == "reference" else 1.0
        ramp = self.flat_lora_ramp_steps
        if ramp is None:  # the whole run
            ramp = self.max_steps if self.max_steps > 0 else None
        return SAMConfig(
            mode=self.sam_mode,
            rho=self.sam_rho,
            rho_schedule=self.sam_rho_schedule,
            rho_min=self.sam_rho_min,
            start_step=self.sam_start_step,
            end_step=self.sam_end_step,
            interval=self.sam_interval,
            norm=self.sam_norm,
            eps=self.sam_eps,
            accumulation=self.sam_accumulation,
            scope=self.sam_scope,
            bn_stats=self.sam_bn_stats,
            same_dropout=self.sam_same_dropout,
            asam_eta=self.asam_eta,
            fsam_beta=self.fsam_beta,
            fsam_sigma=self.fsam_sigma,
            fsam_init=self.fsam_init,
            fisher_sam_form=self.fisher_sam_form,
            fisher_sam_eta=eta,
            gsam_alpha=self.gsam_alpha,
            vasso_theta=self.vasso_theta,
            infosam_alpha=self.infosam_alpha,
            infosam_damping=self.infosam_damping,
            infosam_variance=self.infosam_variance,
            fsam_ema=self.fsam_ema,
            past_fsam_overlap=self.past_fsam_overlap,
            looksam_interval=self.looksam_interval,
            looksam_alpha=self.looksam_alpha,
            wsam_gamma=self.wsam_gamma,
            wsam_decouple=self.wsam_decouple,
            flat_lora_ramp_steps=ramp,
            bi_lora_lr=self.bi_lora_lr,
            seed=self.seed,
        )

    def to_llqr_config(self) -> LLQRConfig | None:
        """The frozen [`~hf_llqrsam.llqr.LLQRConfig`] of these arguments, or `None` when `llqr` is off.

        `llqr_<x>` becomes `x`; `label_smoothing` comes from `label_smoothing_factor`, so that the curvature problem
        uses the training loss (`docs/algorithm.md` §3).
        """
        if not self.llqr:
            return None
        return LLQRConfig(
            structure=self.llqr_structure,
            divergence=self.llqr_divergence,
            ngd_scaling=self.llqr_ngd_scaling,
            renyi_alpha=self.llqr_renyi_alpha,
            update_interval=self.llqr_update_interval,
            update_until=self.llqr_update_until,
            update_interval_milestones=self.llqr_update_interval_milestones,
            batch_size=self.llqr_batch_size,
            inner_steps=self.llqr_inner_steps,
            inner_solver=self.llqr_inner_solver,
            cg_beta=self.llqr_cg_beta,
            inner_lr=self.llqr_inner_lr,
            inner_lr_schedule=self.llqr_inner_lr_schedule,
            inner_lr_schedule_value=self.llqr_inner_lr_schedule_value,
            inner_lr_schedule_steps=self.llqr_inner_lr_schedule_steps,
            inner_momentum=self.llqr_inner_momentum,
            clip_norm=self.llqr_clip_norm,
            clip_groups=self.llqr_clip_groups,
            ema_decay=self.llqr_ema_decay,
            ema_schedule=self.llqr_ema_schedule,
            ema_schedule_value=self.llqr_ema_schedule_value,
            ema_schedule_steps=self.llqr_ema_schedule_steps,
            warm_start=self.llqr_warm_start,
            damping=self.llqr_damping,
            min_diag=self.llqr_min_diag,
            allow_inversion=self.llqr_allow_inversion,
            identity_scaling=self.llqr_identity_scaling,
            include_pad_rows=self.llqr_include_pad_rows,
            curvature_sharding=self.llqr_curvature_sharding,
            chunk_size=self.llqr_chunk_size,
            apply=self.llqr_apply,
            update_probe_scale=self.llqr_update_probe_scale,
            in_perturbation=self.llqr_in_perturbation,
            on_update=self.llqr_on_update,
            label_smoothing=self.label_smoothing_factor,
            shift_labels=self.llqr_shift_labels,
        )


if get_args(SAMMode) != SAM_MODE_NAMES:  # pragma: no cover - guarded by a test as well
    raise ImportError(f"SAMMode {get_args(SAMMode)} does not list hf_llqrsam.modes.SAM_MODE_NAMES {SAM_MODE_NAMES}.")

# ---------------------------------------------------------------------------------------------- 1. types

_Rule = tuple[Callable[[Any], bool], str]


def _is_int(x: Any) -> bool:  # numpy integers too; bools are not ints here
    return type(x) is int or (isinstance(x, numbers.Integral) and not isinstance(x, bool))


def _is_float(x: Any) -> bool:  # ints and numpy floats too; bools are not numbers here
    if type(x) is float or type(x) is int:
        return math.isfinite(x)
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


def _type_rule(name: str, hint: Any) -> _Rule:
    """(predicate, "what is allowed") for one annotation: Literal, bool, int, float, or `X | None` of those."""
    origin = get_origin(hint)
    if origin is Literal:
        allowed = get_args(hint)
        if not all(isinstance(a, str) for a in allowed):
            raise TypeError(f"Unsupported annotation {hint!r} of {name}: only str Literals are validated.")
        members = frozenset(allowed)
        return (lambda x: isinstance(x, str) and x in members), "one of " + ", ".join(map(repr, allowed))
    if origin in (Union, types.UnionType):
        inner = [a for a in get_args(hint) if a is not type(None)]
        if len(inner) != 1 or len(get_args(hint)) != 2:
            raise TypeError(f"Unsupported annotation {hint!r} of {name}: only `X | None` unions are validated.")
        check, what = _type_rule(name, inner[0])
        return (lambda x: x is None or check(x)), f"{what} or None"
    if hint is bool:
        return (lambda x: isinstance(x, bool)), "a bool (True or False)"
    if hint is int:
        return _is_int, "an int"
    if hint is float:
        return _is_float, "a finite float"
    if hint is str:
        return (lambda x: isinstance(x, str)), "a string"
    raise TypeError(f"Unsupported annotation {hint!r} of {name}: add a rule to hf_llqrsam.args._type_rule.")


_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(LLQRSAMFields))
_DEFAULTS: dict[str, Any] = {f.name: f.default for f in fields(LLQRSAMFields)}
_TYPE_RULES: dict[str, _Rule] = {
    name: _type_rule(name, hint) for name, hint in get_type_hints(LLQRSAMFields).items() if name in _DEFAULTS
}
if any(default is MISSING for default in _DEFAULTS.values()):  # pragma: no cover - the ignored-flag check needs them
    raise TypeError("Every LLQRSAMFields field needs a plain default.")

# ---------------------------------------------------------------------------------------------- 2. ranges

# Checked on every value that is not None, whatever the mode: a bad number is an error even where it is ignored.
# `sam_rho` is checked in the cross-field rules (> 0 only when SAM is on); `fsam_sigma` may be any finite float.
_RANGES: dict[str, _Rule] = {
    "sam_rho_min": (lambda x: x >= 0, ">= 0"),
    "sam_start_step": (lambda x: x >= 0, ">= 0"),
    "sam_end_step": (lambda x: x >= 1, ">= 1 (or None), and > sam_start_step"),
    "sam_interval": (lambda x: x >= 1, ">= 1"),
    "sam_eps": (lambda x: x > 0, "> 0"),
    "asam_eta": (lambda x: x >= 0, ">= 0"),
    "fsam_beta": (lambda x: 0 <= x < 1, "in [0, 1)"),
    "fisher_sam_eta": (lambda x: x > 0, "> 0 (or None)"),
    "gsam_alpha": (lambda x: x >= 0, ">= 0"),
    "vasso_theta": (lambda x: 0 < x <= 1, "in (0, 1]"),
    "infosam_alpha": (lambda x: 0 <= x < 1, "in [0, 1)"),
    "infosam_damping": (lambda x: x > 0, "> 0"),
    "past_fsam_overlap": (
        lambda x: 0 <= x < 1 and abs(1 / (1 - x) - past_fsam_window(x)) <= 0.01,
        "1 - 1/K for an integer K >= 1, in [0, 1) (0, 0.5, 0.667, 0.75, ...): the reference needs batch_size % "
        "(batch_size * (1 - f)) == 0",
    ),
    "looksam_interval": (lambda x: x >= 1, ">= 1"),
    "looksam_alpha": (lambda x: x >= 0, ">= 0"),
    "wsam_gamma": (lambda x: 0 <= x < 1, "in [0, 1)"),
    "flat_lora_ramp_steps": (lambda x: x >= 1, ">= 1 (or None)"),
    "bi_lora_lr": (lambda x: x > 0, "> 0 (or None)"),
    "llqr_renyi_alpha": (lambda x: x > 0 and x != 1, "> 0 and != 1"),
    "llqr_update_interval": (lambda x: x >= 1, ">= 1"),
    "llqr_update_until": (
        lambda x: x >= 1,
        ">= 1 (or None): the first refresh is at step 0 and none runs at or after llqr_update_until, so 0 would "
        "leave U = I for the whole run",
    ),
    "llqr_batch_size": (lambda x: x >= 1, ">= 1"),
    "llqr_inner_steps": (lambda x: x >= 0, ">= 0"),
    "llqr_inner_lr": (lambda x: x > 0, "> 0"),
    "llqr_inner_lr_schedule_value": (lambda x: x >= 0, ">= 0"),
    "llqr_inner_lr_schedule_steps": (lambda x: x >= 1, ">= 1 (or None)"),
    "llqr_inner_momentum": (lambda x: 0 <= x < 1, "in [0, 1)"),
    "llqr_clip_norm": (lambda x: x > 0, "> 0"),
    "llqr_ema_decay": (lambda x: 0 <= x <= 1, "in [0, 1]"),
    "llqr_ema_schedule_value": (lambda x: 0 <= x <= 1, "in [0, 1]"),
    "llqr_ema_schedule_steps": (lambda x: x >= 1, ">= 1 (or None)"),
    "llqr_damping": (lambda x: x >= 0, ">= 0"),
    "llqr_min_diag": (lambda x: x > 0, "> 0"),
    "llqr_identity_scaling": (lambda x: x > 0, "> 0"),
    "llqr_chunk_size": (lambda x: x >= 1, ">= 1 (or None)"),
}
_UNBOUNDED: frozenset[str] = frozenset({"sam_rho", "fsam_sigma"})  # finite is enough (sam_rho: see above)

# ---------------------------------------------------------------------------------------------- the flag reference

# The one source of every flag's description is its field's `metadata["help"]`: the CLI `--help` (HfArgumentParser),
# the class docstring below and the docs' flag page ([`flags_markdown`]) all read it.
_SECTIONS: dict[str, str] = {  # the first field of each group -> the group's title
    "sam_mode": "Parameters that control SAM",
    "asam_eta": "Parameters of the individual SAM modes",
    "llqr": "Parameters that control LLQR (arXiv 2605.04230)",
}


def _type_name(hint: Any) -> str:
    """The docstring type of an annotation: `str` for a Literal, `X` for `X | None`."""
    if get_origin(hint) is Literal:
        return "str"
    if get_origin(hint) in (Union, types.UnionType):
        return _type_name(next(a for a in get_args(hint) if a is not type(None)))
    return str(hint.__name__)


def _default_text(value: Any) -> str:
    return f'"{value}"' if isinstance(value, str) else repr(value)


def _fields_docstring() -> str:
    """The [`LLQRSAMFields`] docstring, HF style (`name (`type`, *optional*, defaults to `x`):` + the help)."""
    hints = get_type_hints(LLQRSAMFields)
    lines = [
        "The hf_llqrsam fields, mixed into both argument classes; each is keyword-only, so positional arguments mean",
        "what they mean on the stock class.",
        "",
        "Args:",
    ]
    for f in fields(LLQRSAMFields):
        if f.name in _SECTIONS:
            lines += [f"    > {_SECTIONS[f.name]}", ""]
        default = "" if f.default is None else f", defaults to `{_default_text(f.default)}`"
        lines.append(f"    {f.name} (`{_type_name(hints[f.name])}`, *optional*{default}):")
        lines += textwrap.wrap(
            f.metadata["help"],
            width=111,
            initial_indent="        ",
            subsequent_indent="        ",
            break_long_words=False,
            break_on_hyphens=False,
        )
    return "\n".join(lines) + "\n"


LLQRSAMFields.__doc__ = _fields_docstring()


def flags_markdown() -> str:
    """Every hf_llqrsam flag as Markdown, for the documentation's flag reference: per group, one line per flag with
    its type, default, allowed values (from its annotation and range rule) and help, read from the fields.

    Returns:
        `str`: Markdown, a `## <group>` heading per group and a bullet per flag.
    """
    hints = get_type_hints(LLQRSAMFields)
    lines: list[str] = []
    for f in fields(LLQRSAMFields):
        if f.name in _SECTIONS:
            lines += ["", f"## {_SECTIONS[f.name]}", ""] if lines else [f"## {_SECTIONS[f.name]}", ""]
        allowed = _TYPE_RULES[f.name][1]
        if f.name in _RANGES:
            allowed += f"; {_RANGES[f.name][1]}"
        if hints[f.name] is bool and f.default is True:
            allowed += f"; `--no_{f.name}` sets False"
        lines.append(
            f"- **`--{f.name}`** (`{_type_name(hints[f.name])}`, default `{_default_text(f.default)}`; "
            f"{allowed}): {f.metadata['help']}"
        )
    return "\n".join(lines) + "\n"


def _fail(message: str) -> NoReturn:
    raise ValueError(message)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def validate_llqrsam_fields(args: Any) -> None:
    """Check the hf_llqrsam fields of `args` alone and against each other (types, ranges, mode rules).

    Needs nothing but the fields of [`LLQRSAMFields`], so the argument classes run it before
    [`~transformers.TrainingArguments`] processes its own fields.

    Raises:
        `ValueError`: naming the offending field(s), the value and what is allowed.
    """
    for name in _FIELDS:
        value = getattr(args, name)
        check, allowed = _TYPE_RULES[name]
        if not check(value):
            _fail(f"Invalid {name}={value!r}. Must be {allowed}.")
        if value is not None and name in _RANGES:
            in_range, bound = _RANGES[name]
            if not in_range(value):
                _fail(f"Invalid {name}={value!r}. Must be {bound}.")
    _validate_sam_rules(args)
    if args.llqr:
        unsupported = getattr(args, "llqr_unsupported", None)
        if unsupported:
            _fail(f"Invalid llqr=True with {unsupported}")
        _validate_llqr_rules(args)
    _validate_run_length(args)


def _validate_run_length(args: Any) -> None:
    """Flat-LoRA's ramp needs the run's length (after the mode/LLQR rules, which name the more basic mistake)."""
    spec = MODES.get(args.sam_mode)
    if spec is None:
        return
    if "flat_lora_ramp_steps" in spec.hyperparameters and args.flat_lora_ramp_steps is None:
        _check(
            getattr(args, "max_steps", -1) > 0,
            f"Invalid flat_lora_ramp_steps=None with sam_mode={args.sam_mode!r} and no max_steps: Flat-LoRA's noise "
            "std ramps to sam_rho over the run, whose length in optimizer steps is not known here. Set --max_steps, "
            "or --flat_lora_ramp_steps (the ramp's length).",
        )


def _validate_sam_rules(args: Any) -> None:
    mode = args.sam_mode
    if mode != "none":
        _check(args.sam_rho > 0, f"Invalid sam_rho={args.sam_rho!r}. Must be > 0 when sam_mode != 'none'.")
    if args.sam_rho_schedule == "lr_proportional":
        _check(
            args.sam_rho_min <= args.sam_rho,
            f"Invalid sam_rho_min={args.sam_rho_min!r}. Must be <= sam_rho={args.sam_rho!r} for lr_proportional.",
        )
    end = args.sam_end_step
    _check(
        end is None or end > args.sam_start_step,
        f"Invalid sam_end_step={end!r}. Must be None or > sam_start_step={args.sam_start_step!r}: the SAM window is "
        "[sam_start_step, sam_end_step).",
    )
    spec = MODES.get(mode)
    if spec is None:
        return
    if spec.own_normaliser and args.sam_norm != "euclidean":
        _fail(
            f"Invalid sam_norm={args.sam_norm!r} with sam_mode={mode!r}: {mode} has its own normaliser, so sam_norm "
            "must be 'euclidean'.",
        )
    if spec.window_only and args.sam_accumulation != "window":
        _fail(
            f"Invalid sam_accumulation={args.sam_accumulation!r} with sam_mode={mode!r}: {mode} needs the window "
            f"gradient, so sam_accumulation must be 'window' (micro supports {_modes_where('window_only', False)}).",
        )
    if spec.global_only and args.sam_scope != "global":
        _fail(
            f"Invalid sam_scope={args.sam_scope!r} with sam_mode={mode!r}: {mode} needs the all-reduced gradient, "
            "so sam_scope must be 'global'.",
        )
    if spec.passes != "two" and args.sam_interval != 1:
        cadence = "looksam_interval" if spec.passes == "cadence" else "one pass on every step"
        _fail(
            f"Invalid sam_interval={args.sam_interval!r} with sam_mode={mode!r}: {mode} sets its own cadence "
            f"({cadence}), so sam_interval must be 1.",
        )


def _modes_where(attribute: str, value: bool) -> str:
    return ", ".join(repr(m) for m, spec in MODES.items() if getattr(spec, attribute) is value)


def _validate_llqr_rules(args: Any) -> None:
    """The rules that hold with `llqr=True`: where U may enter (C and/or P), and that it enters somewhere."""
    mode = args.sam_mode
    spec = MODES.get(mode)
    if spec is not None and not (spec.llqr_geometry or spec.llqr_descent):
        with_llqr = ", ".join(["'none'", *(repr(m) for m, s in MODES.items() if s.llqr_geometry or s.llqr_descent)])
        _fail(
            f"Invalid llqr=True with sam_mode={mode!r}: LLQR enters neither {mode}'s perturbation nor its descent. "
            f"LLQR combines with sam_mode {with_llqr}. Set --llqr false or choose another sam_mode."
        )
    if spec is not None and args.llqr_in_perturbation and not spec.llqr_geometry:
        _fail(
            f"Invalid llqr_in_perturbation=True with sam_mode={mode!r}: {mode} keeps its own perturbation geometry, "
            f"so U cannot enter C (it can with {_modes_where('llqr_geometry', True)}). Pass --no_llqr_in_perturbation."
        )
    if spec is not None and args.llqr_on_update and not spec.llqr_descent:
        _fail(
            f"Invalid llqr_on_update=True with sam_mode={mode!r}: {mode} has its own descent, so U cannot enter P "
            f"(it can with 'none', {_modes_where('llqr_descent', True)}). Pass --no_llqr_on_update."
        )
    in_c = spec is not None and spec.llqr_geometry and args.llqr_in_perturbation
    if not (args.llqr_on_update or in_c):
        _fail(
            f"Invalid llqr=True with U used nowhere (llqr_on_update=False, and with sam_mode={mode!r} U is not in "
            "the perturbation): enable llqr_on_update, or llqr_in_perturbation with "
            f"{_modes_where('llqr_geometry', True)}."
        )
    for name in ("inner_lr", "ema"):  # the LLQR schedules (`hf_llqrsam/llqr/schedules.py`)
        schedule, steps = getattr(args, f"llqr_{name}_schedule"), getattr(args, f"llqr_{name}_schedule_steps")
        _check(
            schedule == "constant" or steps is not None,
            f"Invalid llqr_{name}_schedule_steps=None with llqr_{name}_schedule={schedule!r}: the {schedule} "
            f"schedule needs its length in optimizer steps (set --llqr_{name}_schedule_steps).",
        )
    parse_milestones(args.llqr_update_interval_milestones, field="llqr_update_interval_milestones")
    if args.llqr_apply == "update":
        _check(args.llqr_on_update, "Invalid llqr_apply='update'. Requires llqr_on_update=True.")
    if args.sam_norm in ("matrix", "layer_matrix") and in_c:
        _check(
            args.llqr_structure in ("diagonal", "scalar"),
            f"Invalid sam_norm={args.sam_norm!r} with llqr_structure={args.llqr_structure!r}: the matrix norm needs "
            "a symmetric PSD U, so llqr_structure must be 'diagonal' or 'scalar' (or use sam_norm='euclidean').",
        )
    reads_ema = spec is not None and "fsam_ema" in spec.hyperparameters + spec.borrows
    if reads_ema and args.fsam_ema == "grad" and in_c:
        _fail(
            f"Invalid fsam_ema='grad' with llqr_in_perturbation=True (sam_mode={mode!r}): fsam_ema='grad' is the "
            "reference's perturb_mode=ema_grad, which keeps U out of the perturbation. Pass "
            "--no_llqr_in_perturbation, or use fsam_ema='precond_grad' (ema_precond_grad, C = U)."
        )


# ---------------------------------------------------------------------------------------------- 5. ignored flags

# flag -> the modes that read it: its owner first, then the modes that borrow it (ModeSpec.borrows)
_MODE_OF: dict[str, tuple[str, ...]] = {
    name: (mode, *(m for m, s in MODES.items() if name in s.borrows))
    for mode, spec in MODES.items()
    for name in spec.hyperparameters
}


def ignored_flags(args: Any) -> list[str]:
    """The hf_llqrsam flags set to a non-default value that this run does not use, each with the reason."""
    mode = args.sam_mode
    ignored = []
    for name in _FIELDS:
        if name in ("sam_mode", "llqr"):
            continue
        value = getattr(args, name)
        if value == _DEFAULTS[name]:
            continue
        if name.startswith("llqr_"):
            reason = _llqr_flag_unused(args, name)
        elif name in _MODE_OF:
            users = " or ".join(repr(m) for m in _MODE_OF[name])
            reason = f"only used with sam_mode={users}" if mode not in _MODE_OF[name] else None
        elif mode == "none":
            reason = "sam_mode='none'"
        elif name == "sam_rho_min" and args.sam_rho_schedule != "lr_proportional":
            reason = "only used with sam_rho_schedule='lr_proportional'"
        else:
            reason = None
        if reason is not None:
            ignored.append(f"{name}={value!r} ({reason})")
    return ignored


def _llqr_flag_unused(args: Any, name: str) -> str | None:
    if not args.llqr:
        return "llqr=False"
    if name == "llqr_in_perturbation" and args.sam_mode == "none":
        return "sam_mode='none' has no perturbation"
    if name == "llqr_renyi_alpha" and args.llqr_divergence != "renyi":
        return "only used with llqr_divergence='renyi'"
    if name == "llqr_ngd_scaling" and args.llqr_divergence != "ngd":
        return "only used with llqr_divergence='ngd'"
    if name == "llqr_update_probe_scale" and args.llqr_apply != "update":
        return "only used with llqr_apply='update'"
    return _llqr_solver_flag_unused(args, name)


def _llqr_solver_flag_unused(args: Any, name: str) -> str | None:
    """The inner-solver and schedule flags: which solver or schedule reads each (`hf_llqrsam/llqr/solvers.py`)."""
    solver = args.llqr_inner_solver
    if name == "llqr_inner_momentum" and solver != "momentum":
        return "only used with llqr_inner_solver='momentum'"
    if name == "llqr_cg_beta" and solver != "cg":
        return "only used with llqr_inner_solver='cg'"
    if solver == "cg" and (name in ("llqr_inner_lr", "llqr_clip_norm") or name.startswith("llqr_inner_lr_schedule")):
        return "llqr_inner_solver='cg' takes the line-search step on the unclipped U-gradient"
    for schedule in ("llqr_inner_lr_schedule", "llqr_ema_schedule"):
        if name in (f"{schedule}_value", f"{schedule}_steps") and getattr(args, schedule) == "constant":
            return f"{schedule}='constant'"
    return None


def warn_ignored_flags(args: Any, stacklevel: int = 2) -> None:
    """One `UserWarning` naming every flag set to a non-default value that this run ignores (see [`ignored_flags`])."""
    ignored = ignored_flags(args)
    if ignored:
        warnings.warn(
            f"hf_llqrsam: these flags have no effect in this run (sam_mode={args.sam_mode!r}, llqr={args.llqr}): "
            + "; ".join(ignored)
            + ".",
            UserWarning,
            stacklevel=stacklevel + 1,
        )


def validate_llqrsam_args(args: Any, *, warn: bool = True) -> None:
    """Every argument-time check of `args` (`docs/integration.md` §8, §10): fields, support matrix, ignored flags.

    The argument classes run these checks when they are built; this function runs them again on an existing object,
    so that a field changed after construction (`args.sam_rho = float("nan")`, a `hyperparameter_search` trial) is
    refused as it would be at construction. The trainer calls it when it is built and when `train()` starts.

    Args:
        args (`Any`): an argument object with the [`LLQRSAMFields`] and the [`~transformers.TrainingArguments`]
            fields (an [`LLQRSAMTrainingArguments`], a TRL config of `hf_llqrsam.integrations.trl`).
        warn (`bool`, *optional*, defaults to `True`): also warn about flags the run ignores ([`warn_ignored_flags`]);
            `False` for a re-check of arguments already warned about.

    Raises:
        `ValueError`: naming the offending field(s), the value and what is allowed.

    Example:

    ```python
    >>> args = LLQRSAMTrainingArguments(output_dir="out", sam_mode="sam", report_to="none")
    >>> args.sam_rho = float("nan")
    >>> validate_llqrsam_args(args, warn=False)
    Traceback (most recent call last):
    ValueError: Invalid sam_rho=nan. Must be a finite float.
    ```
    """
    validate_llqrsam_fields(args)
    validate_setup_args(args)
    if warn:
        warn_ignored_flags(args, stacklevel=2)


def _post_init(args: Any, base_post_init: Callable[[], None]) -> None:
    validate_llqrsam_fields(args)
    validate_deepspeed_args(args)  # before the base class loads the DeepSpeed config (and imports deepspeed)
    base_post_init()
    validate_setup_args(args)
    # user code -> __init__ -> __post_init__ -> _post_init -> warn_ignored_flags
    warn_ignored_flags(args, stacklevel=4)


@dataclass
class LLQRSAMTrainingArguments(TrainingArguments, LLQRSAMFields):
    """[`~transformers.TrainingArguments`] with the hf_llqrsam fields (see [`LLQRSAMFields`]).

    NOTE: no default of [`~transformers.TrainingArguments`] is changed, and the hf_llqrsam fields are keyword-only,
    so a positional argument means what it means on the stock class (`LLQRSAMTrainingArguments("out")` is
    `output_dir="out"`).

    Example:

    ```python
    >>> from hf_llqrsam import LLQRSAMTrainingArguments
    >>> args = LLQRSAMTrainingArguments(output_dir="out", sam_mode="sam", sam_rho=0.05, report_to="none")
    >>> args.sam_mode
    'sam'
    >>> args.to_sam_config().rho
    0.05
    ```
    """

    def __post_init__(self) -> None:
        _post_init(self, super().__post_init__)


@dataclass
class LLQRSAMSeq2SeqTrainingArguments(Seq2SeqTrainingArguments, LLQRSAMFields):
    """[`~transformers.Seq2SeqTrainingArguments`] with the hf_llqrsam fields (see [`LLQRSAMFields`]).

    NOTE: no default of [`~transformers.Seq2SeqTrainingArguments`] is changed.
    """

    def __post_init__(self) -> None:
        _post_init(self, super().__post_init__)


# ---------------------------------------------------------------------------------------------- the CLI


@contextlib.contextmanager
def cli_errors(parser: argparse.ArgumentParser | None = None) -> Iterator[None]:
    """Turn a bad value on the command line into a one-line `prog: error: <message>` on stderr and exit code 2.

    Wrap only the parsing call (`parse_args_into_dataclasses`, `parse_yaml_file`, `parse_json_file`, `parse_dict`).
    Two kinds of error become one line:

    - a `ValueError` raised while the dataclasses are built: the validation of this module raises from
      `__post_init__`, which `HfArgumentParser` would otherwise let through as a traceback;
    - with `parser` given, argparse's own errors (an unknown `choice`, `--sam_interval 1.5`), which would otherwise
      print the whole usage line of every TrainingArguments flag first. `parser.error` is restored on exit.

    Example:

    ```python
    >>> parser = HfArgumentParser((ModelArguments, LLQRSAMTrainingArguments))
    >>> with cli_errors(parser):
    ...     model_args, training_args = parser.parse_args_into_dataclasses()
    ```
    """
    prog = parser.prog if parser is not None else os.path.basename(sys.argv[0])

    def error(message: str) -> NoReturn:
        sys.stderr.write(f"{prog}: error: {' '.join(str(message).split())}\n")  # one line, whatever the message
        raise SystemExit(2)

    patched = parser if parser is not None and "error" not in vars(parser) else None
    if patched is not None:
        patched.error = error  # type: ignore[method-assign]
    try:
        yield
    except ValueError as err:
        error(str(err))
    finally:
        if patched is not None:
            del patched.error


def parse_args(
    parser_or_dataclasses: HfArgumentParser | type | Iterable[type],
    argv: Sequence[str] | None = None,
    **kwargs: Any,
) -> tuple[Any, ...]:
    """`HfArgumentParser.parse_args_into_dataclasses(argv)` where a bad value exits 2 with a one-line error.

    Args:
        parser_or_dataclasses (`HfArgumentParser`, a dataclass type, or an iterable of them):
            the parser to use (keeps its `set_defaults`), or the dataclass types to build one for.
        argv (`Sequence[str]`, *optional*): the arguments; `None` reads `sys.argv[1:]`.
        kwargs: passed on to `parse_args_into_dataclasses` (e.g. `return_remaining_strings=True`).

    Returns:
        `tuple`: one instance per dataclass type, as `parse_args_into_dataclasses` returns them.

    Example:

    ```python
    >>> from hf_llqrsam.args import LLQRSAMTrainingArguments, parse_args
    >>> (args,) = parse_args(LLQRSAMTrainingArguments, ["--output_dir", "out", "--sam_mode", "sam"])
    ```
    """
    if isinstance(parser_or_dataclasses, HfArgumentParser):
        parser = parser_or_dataclasses
    else:
        parser = HfArgumentParser(cast(Any, parser_or_dataclasses))
    with cli_errors(parser):
        return tuple(parser.parse_args_into_dataclasses(args=None if argv is None else list(argv), **kwargs))
    raise AssertionError("unreachable")  # pragma: no cover - cli_errors exits or re-raises
