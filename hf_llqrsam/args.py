"""Training arguments: flat, prefixed `sam_*` / `llqr_*` fields on top of [`~transformers.TrainingArguments`].

The fields follow `algorithm.md` §12.1 (defaults, with the reference knob each one maps to) and are validated in
`__post_init__` by [`validate_llqrsam_args`], so a bad value fails at argument time with a message that names the
flag and the allowed values.
"""

from dataclasses import dataclass, field
from typing import Any, Literal

from transformers import Seq2SeqTrainingArguments, TrainingArguments

from .compat import validate_setup_args

SAMMode = Literal["none", "sam", "asam", "fsam", "fisher_sam", "gsam", "vasso", "infosam"]
SAM_MODES: tuple[str, ...] = SAMMode.__args__  # type: ignore[attr-defined]


@dataclass
class LLQRSAMFields:
    """The hf_llqrsam fields, mixed into both argument classes.

    > Parameters that control SAM

    sam_mode (`str`, *optional*, defaults to `"none"`):
        One of `none`, `sam`, `asam`, `fsam`, `fisher_sam`, `gsam`, `vasso`, `infosam`. `none` with `llqr` off is the
        stock [`~transformers.Trainer`] path, bit for bit.
    sam_rho (`float`, *optional*, defaults to `0.1`):
        Perturbation radius ρ; ε = ρ·Cv/√(ν² + sam_eps).
    sam_rho_schedule (`str`, *optional*, defaults to `"constant"`):
        `constant`, `iwslt14_cosine_ramp` (the reference's opt-in ramp) or `lr_proportional` (GSAM).
    sam_rho_min (`float`, *optional*, defaults to `0.0`):
        Lower end of the `lr_proportional` schedule.
    sam_start_step (`int`, *optional*, defaults to `0`):
        Optimizer steps before this one are plain (one-pass) steps.
    sam_interval (`int`, *optional*, defaults to `1`):
        Run SAM on every k-th step after `sam_start_step`; the other steps are plain.
    sam_norm (`str`, *optional*, defaults to `"euclidean"`):
        Normaliser ν: `euclidean` ‖Cv‖₂ or `matrix` √(vᵀCv).
    sam_eps (`float`, *optional*, defaults to `1e-12`):
        Added to ν² inside the square root.
    sam_accumulation (`str`, *optional*, defaults to `"window"`):
        `window`: one ε from the whole accumulated batch (reference semantics). `micro`: one ε per micro-batch.
    sam_scope (`str`, *optional*, defaults to `"global"`):
        `global`: ε from the all-reduced gradient. `local`: ε from each rank's own gradient (m-sharpness).
    sam_bn_stats (`str`, *optional*, defaults to `"second"`):
        Which pass leaves its BatchNorm running statistics: `second` (the reference) or `first`.
    sam_same_dropout (`bool`, *optional*, defaults to `False`):
        Replay pass 1's dropout masks in pass 2.

    > Parameters of the individual SAM modes

    asam_eta (`float`, *optional*, defaults to `0.01`): ASAM's T = |θ| + η.
    fsam_beta (`float`, *optional*, defaults to `0.9`): FSAM's EMA decay of the clean gradient ḡ.
    fsam_sigma (`float`, *optional*, defaults to `1.0`): FSAM's probe v = g − σ ḡ.
    fsam_init (`str`, *optional*, defaults to `"zero"`): `zero` (reference) or `first_grad` (official F-SAM code).
    fisher_sam_form (`str`, *optional*, defaults to `"reference"`): `reference` C = 1/(g² + η) or `paper`
        C = 1/(1 + η g²).
    fisher_sam_eta (`float`, *optional*): η; `None` means 0.1 for the reference form and 1.0 for the paper form.
    gsam_alpha (`float`, *optional*, defaults to `0.4`): GSAM's descent d = g̃ − α g⊥.
    vasso_theta (`float`, *optional*, defaults to `0.4`): VaSSO's d_t = (1 − θ) d_{t−1} + θ g_t.
    infosam_alpha (`float`, *optional*, defaults to `0.9`): infoSAM's gradient EMA decay (our choice).
    infosam_damping (`float`, *optional*, defaults to `1e-8`): floor δ of the noise estimate b.
    infosam_variance (`str`, *optional*, defaults to `"instant"`): `instant` b = (m − g)² (the prototype) or `ema`.

    > Parameters that control LLQR (arXiv 2605.04230)

    llqr (`bool`, *optional*, defaults to `False`): learn the inverse preconditioner U. With `sam_mode=sam` this is
        LLQR+SAM.
    llqr_* : see the README's LLQR section; names and defaults follow `algorithm.md` §12.1.
    """

    sam_mode: SAMMode = field(default="none", metadata={"help": "SAM variant; `none` with llqr off is stock."})
    sam_rho: float = field(default=0.1, metadata={"help": "Perturbation radius rho (> 0 when sam_mode != none)."})
    sam_rho_schedule: Literal["constant", "iwslt14_cosine_ramp", "lr_proportional"] = field(
        default="constant", metadata={"help": "Schedule of rho over the global step."}
    )
    sam_rho_min: float = field(default=0.0, metadata={"help": "Lower rho of the lr_proportional schedule."})
    sam_start_step: int = field(default=0, metadata={"help": "Plain steps before this optimizer step."})
    sam_interval: int = field(default=1, metadata={"help": "Run SAM every k-th step after sam_start_step."})
    sam_norm: Literal["euclidean", "matrix"] = field(
        default="euclidean", metadata={"help": "Normaliser of C v: euclidean ||Cv|| or matrix sqrt(v^T C v)."}
    )
    sam_eps: float = field(default=1e-12, metadata={"help": "Added to the squared normaliser."})
    sam_accumulation: Literal["window", "micro"] = field(
        default="window", metadata={"help": "One perturbation per accumulation window or per micro-batch."}
    )
    sam_scope: Literal["global", "local"] = field(
        default="global", metadata={"help": "Perturb along the all-reduced (global) or rank-local gradient."}
    )
    sam_bn_stats: Literal["second", "first"] = field(
        default="second", metadata={"help": "Which pass leaves its BatchNorm running statistics."}
    )
    sam_same_dropout: bool = field(default=False, metadata={"help": "Replay pass-1 dropout masks in pass 2."})

    asam_eta: float = field(default=0.01, metadata={"help": "ASAM: T = |theta| + eta."})
    fsam_beta: float = field(default=0.9, metadata={"help": "FSAM: EMA decay of the clean gradient, in [0, 1)."})
    fsam_sigma: float = field(default=1.0, metadata={"help": "FSAM: probe v = g - sigma * gbar."})
    fsam_init: Literal["zero", "first_grad"] = field(default="zero", metadata={"help": "FSAM: initial gbar."})
    fisher_sam_form: Literal["reference", "paper"] = field(
        default="reference", metadata={"help": "Fisher-SAM parameterisation."}
    )
    fisher_sam_eta: float | None = field(
        default=None, metadata={"help": "Fisher-SAM eta (None: 0.1 reference form, 1.0 paper form)."}
    )
    gsam_alpha: float = field(default=0.4, metadata={"help": "GSAM: descent g_tilde - alpha * g_perp."})
    vasso_theta: float = field(default=0.4, metadata={"help": "VaSSO: d = (1 - theta) d + theta g, in (0, 1]."})
    infosam_alpha: float = field(default=0.9, metadata={"help": "infoSAM: gradient EMA decay, in [0, 1)."})
    infosam_damping: float = field(default=1e-8, metadata={"help": "infoSAM: floor added to the noise estimate."})
    infosam_variance: Literal["instant", "ema"] = field(
        default="instant", metadata={"help": "infoSAM noise estimate: instant (m - g)^2 or an EMA of it."}
    )

    llqr: bool = field(default=False, metadata={"help": "Learn the LLQR inverse preconditioner U."})
    llqr_in_perturbation: bool = field(default=True, metadata={"help": "Use C = U in the perturbation."})
    llqr_on_update: bool = field(default=True, metadata={"help": "Use P = U on the descent gradient."})
    llqr_apply: Literal["gradient", "update"] = field(
        default="gradient", metadata={"help": "Precondition the gradient, or the base optimizer's update."}
    )
    llqr_divergence: Literal["ngd", "newton", "renyi", "reverse_kl"] = field(
        default="ngd", metadata={"help": "Curvature G of the quadratic model."}
    )
    llqr_ngd_scaling: Literal["sum", "mean"] = field(
        default="sum", metadata={"help": "NGD Fisher summed over rows (reference) or averaged."}
    )
    llqr_renyi_alpha: float = field(default=0.5, metadata={"help": "Order of the renyi divergence (> 0, != 1)."})
    llqr_structure: Literal["diagonal", "scalar", "kfac", "ekfac", "sep_ekfac"] = field(
        default="diagonal", metadata={"help": "Block structure of U."}
    )
    llqr_update_interval: int = field(default=1000, metadata={"help": "Refresh U every E optimizer steps."})
    llqr_update_until: int | None = field(default=None, metadata={"help": "No refresh at or after this step."})
    llqr_batch_size: int = field(default=64, metadata={"help": "Examples in the curvature batch."})
    llqr_inner_steps: int = field(default=50, metadata={"help": "Inner SGD-momentum steps per refresh."})
    llqr_inner_lr: float = field(default=1e-3, metadata={"help": "Inner-loop learning rate."})
    llqr_inner_momentum: float = field(default=0.9, metadata={"help": "Inner-loop momentum, in [0, 1)."})
    llqr_clip_norm: float = field(default=5.0, metadata={"help": "Per-group clip of the U-gradient (> 0)."})
    llqr_clip_groups: Literal["module", "tensor"] = field(
        default="module", metadata={"help": "Clip groups: one per leaf module or one per tensor."}
    )
    llqr_ema_decay: float = field(default=0.95, metadata={"help": "EMA merge U = b U_old + (1 - b) V, in [0, 1]."})
    llqr_warm_start: bool = field(default=True, metadata={"help": "Start the inner loop from the current U."})
    llqr_damping: float = field(default=0.0, metadata={"help": "Damping lambda of G + lambda I (>= 0)."})
    llqr_min_diag: float = field(default=1e-8, metadata={"help": "Positivity clamp of diagonal/scalar U (> 0)."})
    llqr_allow_inversion: bool = field(default=False, metadata={"help": "Skip the positivity clamp."})
    llqr_identity_scaling: float = field(default=1.0, metadata={"help": "Store s U and divide by s (> 0)."})
    llqr_include_pad_rows: bool = field(
        default=False, metadata={"help": "Count pad rows in the curvature problem, as the reference does."}
    )
    llqr_curvature_sharding: Literal["replicated", "sharded"] = field(
        default="replicated", metadata={"help": "Multi-process: same curvature batch everywhere, or sharded."}
    )
    llqr_chunk_size: int | None = field(default=None, metadata={"help": "Recompute the curvature batch in chunks."})


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def validate_llqrsam_args(args: Any) -> None:
    """Check the hf_llqrsam fields of `args`, alone and against each other (`integration.md` §8).

    Raises:
        `ValueError`: naming the offending field(s) and the allowed values.
    """
    mode = args.sam_mode
    sam_on = mode != "none"
    _check(mode in SAM_MODES, f"Invalid {mode=} for sam_mode. Must be one of {', '.join(SAM_MODES)}.")
    if sam_on:
        _check(args.sam_rho > 0, f"Invalid sam_rho={args.sam_rho}. Must be > 0 when sam_mode != 'none'.")
    _check(args.sam_rho_min >= 0, f"Invalid sam_rho_min={args.sam_rho_min}. Must be >= 0.")
    _check(args.sam_interval >= 1, f"Invalid sam_interval={args.sam_interval}. Must be >= 1.")
    _check(args.sam_start_step >= 0, f"Invalid sam_start_step={args.sam_start_step}. Must be >= 0.")
    _check(args.sam_eps > 0, f"Invalid sam_eps={args.sam_eps}. Must be > 0.")
    _check(0 <= args.fsam_beta < 1, f"Invalid fsam_beta={args.fsam_beta}. Must be in [0, 1).")
    _check(args.asam_eta >= 0, f"Invalid asam_eta={args.asam_eta}. Must be >= 0.")
    if args.fisher_sam_eta is not None:
        _check(args.fisher_sam_eta > 0, f"Invalid fisher_sam_eta={args.fisher_sam_eta}. Must be > 0 (or None).")
    _check(args.gsam_alpha >= 0, f"Invalid gsam_alpha={args.gsam_alpha}. Must be >= 0.")
    _check(0 < args.vasso_theta <= 1, f"Invalid vasso_theta={args.vasso_theta}. Must be in (0, 1].")
    _check(0 <= args.infosam_alpha < 1, f"Invalid infosam_alpha={args.infosam_alpha}. Must be in [0, 1).")
    _check(args.infosam_damping > 0, f"Invalid infosam_damping={args.infosam_damping}. Must be > 0.")

    if mode in ("asam", "fisher_sam"):
        _check(
            args.sam_norm == "euclidean",
            f"Invalid sam_norm={args.sam_norm!r} with sam_mode={mode!r}: {mode} has its own normaliser, "
            "so sam_norm must be 'euclidean'.",
        )
    if mode in ("fsam", "fisher_sam", "gsam", "vasso", "infosam"):
        _check(
            args.sam_accumulation == "window",
            f"Invalid sam_accumulation={args.sam_accumulation!r} with sam_mode={mode!r}: {mode} needs the window "
            "gradient, so sam_accumulation must be 'window'.",
        )
    if mode == "gsam":
        _check(
            args.sam_scope == "global",
            f"Invalid sam_scope={args.sam_scope!r} with sam_mode='gsam'. Must be 'global'.",
        )
    if args.sam_rho_schedule == "lr_proportional":
        _check(
            args.sam_rho_min <= args.sam_rho,
            f"Invalid sam_rho_min={args.sam_rho_min}. Must be <= sam_rho={args.sam_rho} for lr_proportional.",
        )

    _validate_llqr_args(args, mode)
    validate_setup_args(args)


def _validate_llqr_args(args: Any, mode: str) -> None:
    _check(
        args.llqr_update_interval >= 1, f"Invalid llqr_update_interval={args.llqr_update_interval}. Must be >= 1."
    )
    if args.llqr_update_until is not None:
        _check(args.llqr_update_until >= 0, f"Invalid llqr_update_until={args.llqr_update_until}. Must be >= 0.")
    _check(args.llqr_batch_size >= 1, f"Invalid llqr_batch_size={args.llqr_batch_size}. Must be >= 1.")
    _check(args.llqr_inner_steps >= 0, f"Invalid llqr_inner_steps={args.llqr_inner_steps}. Must be >= 0.")
    _check(args.llqr_inner_lr > 0, f"Invalid llqr_inner_lr={args.llqr_inner_lr}. Must be > 0.")
    _check(
        0 <= args.llqr_inner_momentum < 1,
        f"Invalid llqr_inner_momentum={args.llqr_inner_momentum}. Must be in [0, 1).",
    )
    _check(args.llqr_clip_norm > 0, f"Invalid llqr_clip_norm={args.llqr_clip_norm}. Must be > 0.")
    _check(0 <= args.llqr_ema_decay <= 1, f"Invalid llqr_ema_decay={args.llqr_ema_decay}. Must be in [0, 1].")
    _check(args.llqr_damping >= 0, f"Invalid llqr_damping={args.llqr_damping}. Must be >= 0.")
    _check(args.llqr_min_diag > 0, f"Invalid llqr_min_diag={args.llqr_min_diag}. Must be > 0.")
    _check(
        args.llqr_renyi_alpha > 0 and args.llqr_renyi_alpha != 1,
        f"Invalid llqr_renyi_alpha={args.llqr_renyi_alpha}. Must be > 0 and != 1.",
    )
    _check(
        args.llqr_identity_scaling > 0,
        f"Invalid llqr_identity_scaling={args.llqr_identity_scaling}. Must be > 0.",
    )
    if args.llqr_chunk_size is not None:
        _check(args.llqr_chunk_size >= 1, f"Invalid llqr_chunk_size={args.llqr_chunk_size}. Must be >= 1.")
    if not args.llqr:
        return
    if mode in ("fisher_sam", "gsam", "vasso", "infosam"):
        raise ValueError(
            f"Invalid llqr=True with sam_mode={mode!r}: LLQR combines with sam_mode none, sam, fsam or asam. "
            "Set --llqr false or choose another sam_mode."
        )
    if mode == "asam":
        _check(
            not args.llqr_in_perturbation,
            "Invalid llqr_in_perturbation=True with sam_mode='asam': ASAM keeps its own geometry, so only "
            "llqr_on_update may be on. Pass --no_llqr_in_perturbation.",
        )
    _check(
        args.llqr_on_update or (mode in ("sam", "fsam") and args.llqr_in_perturbation),
        "Invalid llqr=True with U used nowhere: enable llqr_on_update, or llqr_in_perturbation with sam/fsam.",
    )
    if args.llqr_apply == "update":
        _check(args.llqr_on_update, "Invalid llqr_apply='update'. Requires llqr_on_update=True.")
    if args.sam_norm == "matrix" and mode in ("sam", "fsam") and args.llqr_in_perturbation:
        _check(
            args.llqr_structure in ("diagonal", "scalar"),
            f"Invalid sam_norm='matrix' with llqr_structure={args.llqr_structure!r}: the matrix norm needs a "
            "symmetric PSD U, so llqr_structure must be 'diagonal' or 'scalar'.",
        )


@dataclass
class LLQRSAMTrainingArguments(TrainingArguments, LLQRSAMFields):
    """[`~transformers.TrainingArguments`] with the hf_llqrsam fields (see [`LLQRSAMFields`]).

    NOTE: no default of [`~transformers.TrainingArguments`] is changed.

    Example:

    ```python
    >>> from hf_llqrsam import LLQRSAMTrainingArguments
    >>> args = LLQRSAMTrainingArguments(output_dir="out", sam_mode="sam", sam_rho=0.05, report_to="none")
    >>> args.sam_mode
    'sam'
    ```
    """

    def __post_init__(self) -> None:
        super().__post_init__()  # type: ignore[no-untyped-call]
        validate_llqrsam_args(self)


@dataclass
class LLQRSAMSeq2SeqTrainingArguments(Seq2SeqTrainingArguments, LLQRSAMFields):
    """[`~transformers.Seq2SeqTrainingArguments`] with the hf_llqrsam fields (see [`LLQRSAMFields`]).

    NOTE: no default of [`~transformers.Seq2SeqTrainingArguments`] is changed.
    """

    def __post_init__(self) -> None:
        super().__post_init__()  # type: ignore[no-untyped-call]
        validate_llqrsam_args(self)
