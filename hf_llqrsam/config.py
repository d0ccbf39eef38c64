"""The typed, frozen SAM-family config: the only SAM settings object the math modules accept.

It is built from the flat CLI fields by [`~hf_llqrsam.args.LLQRSAMFields.to_sam_config`], field by field. The
`Literal` aliases below are the single source of the allowed values: the CLI fields are typed with the same aliases.

Pure Python: imports nothing but the standard library.
"""

from dataclasses import dataclass
from typing import Literal

__all__ = [
    "Accumulation",
    "BNStats",
    "FSAMEma",
    "FSAMInit",
    "FisherSAMForm",
    "InfoSAMVariance",
    "Norm",
    "RhoSchedule",
    "SAMConfig",
    "past_fsam_window",
    "SAMMode",
    "Scope",
]

# Must list exactly `hf_llqrsam.modes.SAM_MODE_NAMES` (a test checks it; mypy needs the values spelled out).
SAMMode = Literal[
    "none",
    "sam",
    "asam",
    "fsam",
    "fisher_sam",
    "gsam",
    "vasso",
    "infosam",
    "past_fsam",
    "looksam",
    "wsam",
    "flat_lora",
    "bi_lora",
]
RhoSchedule = Literal["constant", "iwslt14_cosine_ramp", "lr_proportional"]
Norm = Literal["euclidean", "matrix", "layer_euclidean", "layer_matrix"]
Accumulation = Literal["window", "micro"]
Scope = Literal["global", "local"]
BNStats = Literal["second", "first"]
FSAMInit = Literal["zero", "first_grad"]
FSAMEma = Literal["grad", "precond_grad", "direction"]
FisherSAMForm = Literal["reference", "paper"]
InfoSAMVariance = Literal["instant", "ema"]


def past_fsam_window(overlap: float) -> int:
    """K = round(1 / (1 − f)): how many fresh batches past-FSAM's one pass runs on, for `past_fsam_overlap` f.

    The reference (SimonDufLab/LLQR, `lqr_optimizer/_src/utils/utils.py:prepare_dataloader`) cuts the stream into
    chunks of `replace = round(B (1 − f))` examples and yields windows of `K = B / replace` consecutive chunks that
    advance by one chunk per step (it raises unless `B % replace == 0`), so consecutive batches share B − replace.
    """
    if not 0 <= overlap < 1:
        raise ValueError(f"Invalid past_fsam_overlap={overlap!r}. Must be in [0, 1).")
    return max(1, round(1.0 / (1.0 - overlap)))


@dataclass(frozen=True)
class SAMConfig:
    """The SAM-family settings of one run (defaults from `docs/algorithm.md` §12.1).

    Each field mirrors a CLI field of [`~hf_llqrsam.args.LLQRSAMFields`]: `mode`, `rho`, `rho_schedule`, `rho_min`,
    `start_step`, `end_step`, `interval`, `norm`, `eps`, `accumulation`, `scope`, `bn_stats` and `same_dropout` are
    `sam_<name>`; the per-mode fields keep their CLI names. The defaults equal the CLI defaults, except `mode`
    (`"sam"` here, as the config is only consulted for a SAM run; `"none"` on the CLI) and `fisher_sam_eta`, which is
    resolved.

    Args:
        mode (`str`, *optional*, defaults to `"sam"`): the SAM variant (`none`, `sam`, `asam`, `fsam`, `fisher_sam`,
            `gsam`, `vasso`, `infosam`, `past_fsam`, `looksam`, `wsam`, `flat_lora`, `bi_lora`).
        rho (`float`, *optional*, defaults to `0.1`): radius ρ of ε = ρ·Cv/√(ν² + eps).
        rho_schedule (`str`, *optional*, defaults to `"constant"`): `constant`, `iwslt14_cosine_ramp` or
            `lr_proportional`.
        rho_min (`float`, *optional*, defaults to `0.0`): lower end of the `lr_proportional` schedule.
        start_step (`int`, *optional*, defaults to `0`): plain (one-pass) optimizer steps before this one.
        end_step (`int`, *optional*): optimizer steps from this one on are plain again: the SAM window is
            [`start_step`, `end_step`) (sharpness-aware mid-training, arXiv 2605.02105); `None`: no end.
        interval (`int`, *optional*, defaults to `1`): SAM on every k-th step after `start_step`.
        norm (`str`, *optional*, defaults to `"euclidean"`): ν = ‖Cv‖₂ (`euclidean`) or √(vᵀCv) (`matrix`), or the
            same per layer, each layer scaled by 1/√L (`layer_euclidean`, `layer_matrix`).
        eps (`float`, *optional*, defaults to `1e-12`): added to ν² inside the square root.
        accumulation (`str`, *optional*, defaults to `"window"`): one ε per accumulation window or per micro-batch.
        scope (`str`, *optional*, defaults to `"global"`): ε from the all-reduced or the rank-local gradient.
        bn_stats (`str`, *optional*, defaults to `"second"`): which pass leaves the BatchNorm running statistics.
        same_dropout (`bool`, *optional*, defaults to `False`): replay pass 1's dropout masks in pass 2.
        asam_eta (`float`, *optional*, defaults to `0.01`): ASAM's T = |θ| + η.
        fsam_beta (`float`, *optional*, defaults to `0.9`): FSAM's EMA decay of the clean gradient ḡ.
        fsam_sigma (`float`, *optional*, defaults to `1.0`): FSAM's probe v = g − σḡ.
        fsam_init (`str`, *optional*, defaults to `"zero"`): FSAM's initial ḡ: `zero` or `first_grad`.
        fisher_sam_form (`str`, *optional*, defaults to `"reference"`): C = 1/(g² + η) (`reference`) or
            C = 1/(1 + ηg²) (`paper`).
        fisher_sam_eta (`float`, *optional*, defaults to `0.1`): η, resolved: the CLI's `None` becomes 0.1 for the
            reference form and 1.0 for the paper form (`docs/algorithm.md` §8.4).
        gsam_alpha (`float`, *optional*, defaults to `0.4`): GSAM's descent g̃ − α g⊥.
        vasso_theta (`float`, *optional*, defaults to `0.4`): VaSSO's d ← (1 − θ)d + θg.
        infosam_alpha (`float`, *optional*, defaults to `0.9`): infoSAM's gradient EMA decay.
        infosam_damping (`float`, *optional*, defaults to `1e-8`): floor δ of infoSAM's noise estimate.
        infosam_variance (`str`, *optional*, defaults to `"instant"`): infoSAM's noise estimate: `instant` or `ema`.
        fsam_ema (`str`, *optional*, defaults to `"precond_grad"`): FSAM/past-FSAM's reference `perturb_mode`:
            `precond_grad`, `grad` (both: ḡ is the EMA of the raw gradient) or `direction` (ḡ and C v unit-norm).
        past_fsam_overlap (`float`, *optional*, defaults to `0.0`): past-FSAM's `batch_overlap_fraction` f; the pass
            runs on the last K = 1/(1 − f) fresh batches.
        looksam_interval (`int`, *optional*, defaults to `5`): LookSAM's k: the full two-pass step every k steps.
        looksam_alpha (`float`, *optional*, defaults to `0.7`): LookSAM's weight α of the reused component g_v.
        wsam_gamma (`float`, *optional*, defaults to `0.9`): WSAM's γ; the sharpness weight is γ / (1 − γ).
        wsam_decouple (`bool`, *optional*, defaults to `True`): WSAM's sharpness term as a separate SGD step after
            the base optimizer's step (the paper's Algorithm 1), or mixed into the gradient.
        flat_lora_ramp_steps (`int`, *optional*): Flat-LoRA's T: σₜ = ρ·½(1 − cos(π·min(t/T, 1))). Required with
            `mode="flat_lora"` (the CLI resolves `None` to `max_steps`).
        bi_lora_lr (`float`, *optional*): Bi-LoRA's ascent step η₂ of the auxiliary adapter; `None`: ρ.
        seed (`int`, *optional*, defaults to `42`): the run's seed (`TrainingArguments.seed`, same default):
            Flat-LoRA's noise and Bi-LoRA's auxiliary adapter are drawn from (seed, step), so a resumed run draws what
            the uninterrupted one drew.
    """

    mode: SAMMode = "sam"
    rho: float = 0.1
    rho_schedule: RhoSchedule = "constant"
    rho_min: float = 0.0
    start_step: int = 0
    end_step: int | None = None
    interval: int = 1
    norm: Norm = "euclidean"
    eps: float = 1e-12
    accumulation: Accumulation = "window"
    scope: Scope = "global"
    bn_stats: BNStats = "second"
    same_dropout: bool = False
    asam_eta: float = 0.01
    fsam_beta: float = 0.9
    fsam_sigma: float = 1.0
    fsam_init: FSAMInit = "zero"
    fisher_sam_form: FisherSAMForm = "reference"
    fisher_sam_eta: float = 0.1
    gsam_alpha: float = 0.4
    vasso_theta: float = 0.4
    infosam_alpha: float = 0.9
    infosam_damping: float = 1e-8
    infosam_variance: InfoSAMVariance = "instant"
    fsam_ema: FSAMEma = "precond_grad"
    past_fsam_overlap: float = 0.0
    looksam_interval: int = 5
    looksam_alpha: float = 0.7
    wsam_gamma: float = 0.9
    wsam_decouple: bool = True
    flat_lora_ramp_steps: int | None = None
    bi_lora_lr: float | None = None
    seed: int = 42
