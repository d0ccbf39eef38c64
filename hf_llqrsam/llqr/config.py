"""The typed, frozen LLQR config: the only settings object the `hf_llqrsam.llqr` math modules accept."""

from dataclasses import dataclass
from typing import Literal

Structure = Literal[
    "diagonal",
    "scalar",
    "kfac",
    "ekfac",
    "sep_ekfac",
    "psd_ekfac",
    "psd_sep_ekfac",
    "diag_kfac",
    "sym_kfac",
    "psd_sym_kfac",
]
Divergence = Literal["ngd", "newton", "renyi", "reverse_kl"]
NGDScaling = Literal["sum", "mean"]
ClipGroups = Literal["module", "tensor"]
CurvatureSharding = Literal["replicated", "sharded"]
Apply = Literal["gradient", "update"]
UpdateProbeScale = Literal["gradient_norm", "none"]
ShiftLabels = Literal["auto", "true", "false"]
InnerSolver = Literal["momentum", "sgd", "adam", "cg"]
CGBeta = Literal["reference", "polak_ribiere"]
Schedule = Literal["constant", "cosine", "warmup"]

__all__ = [
    "Apply",
    "CGBeta",
    "ClipGroups",
    "CurvatureSharding",
    "Divergence",
    "InnerSolver",
    "LLQRConfig",
    "NGDScaling",
    "Schedule",
    "ShiftLabels",
    "Structure",
    "UpdateProbeScale",
]


@dataclass(frozen=True)
class LLQRConfig:
    """Settings of the learned LLQR inverse preconditioner U (arXiv 2605.04230; defaults from `docs/algorithm.md`
    §12.1).

    Each field `x` mirrors the CLI field `llqr_x` of [`~hf_llqrsam.args.LLQRSAMFields`], except `label_smoothing`,
    which comes from `label_smoothing_factor` so that the curvature problem uses the training loss
    (`docs/algorithm.md` §3).
    [`~hf_llqrsam.args.LLQRSAMFields.to_llqr_config`] builds it field by field; the defaults equal the CLI defaults.

    Args:
        structure (`str`, *optional*, defaults to `"diagonal"`):
            Block structure of U: `diagonal`, `scalar`, `kfac`, `ekfac`, `sep_ekfac`, `psd_ekfac`, `psd_sep_ekfac`,
            `diag_kfac`, `sym_kfac` or `psd_sym_kfac` (`docs/algorithm.md` §6.1).
        divergence (`str`, *optional*, defaults to `"ngd"`):
            Curvature G of J(U) = −gᵀUg + ½ (Ug)ᵀ(G + λI)(Ug): `ngd`, `newton`, `renyi` or `reverse_kl` (§3).
        ngd_scaling (`str`, *optional*, defaults to `"sum"`):
            `sum`: G = Σ_r J_rᵀF_rJ_r (reference); `mean`: G = (1/N) Σ_r J_rᵀF_rJ_r.
        renyi_alpha (`float`, *optional*, defaults to `0.5`): order α of `renyi`, G = α·GGN_mean.
        update_interval (`int`, *optional*, defaults to `1000`): refresh U every E optimizer steps.
        update_until (`int`, *optional*): no refresh at or after this step; `None` never stops.
        batch_size (`int`, *optional*, defaults to `64`): examples in the curvature batch.
        update_interval_milestones (`str`, *optional*): piecewise-constant E, `"k₁:E₁,k₂:E₂,…"`
            ([`~hf_llqrsam.llqr.schedules.parse_milestones`]); `None`: E = `update_interval` throughout.
        inner_steps (`int`, *optional*, defaults to `50`): inner steps T per refresh.
        inner_solver (`str`, *optional*, defaults to `"momentum"`): the inner solver, `momentum`, `sgd`, `adam` or
            `cg` ([`~hf_llqrsam.llqr.solvers`]).
        cg_beta (`str`, *optional*, defaults to `"reference"`): `cg` only: β from the reference's stored gradient
            (`reference`) or Polak–Ribière+ between consecutive iterates (`polak_ribiere`).
        inner_lr (`float`, *optional*, defaults to `1e-3`): inner-loop learning rate (not used by `cg`).
        inner_lr_schedule (`str`, *optional*, defaults to `"constant"`): `constant`, `cosine` or `warmup` over the
            optimizer step ([`~hf_llqrsam.llqr.schedules`]).
        inner_lr_schedule_value (`float`, *optional*, defaults to `0.0`): the schedule's other end (cosine: the
            final value; warmup: the value at step 0).
        inner_lr_schedule_steps (`int`, *optional*): the schedule's length S in optimizer steps.
        inner_momentum (`float`, *optional*, defaults to `0.9`): inner-loop heavy-ball momentum (`momentum` only).
        clip_norm (`float`, *optional*, defaults to `5.0`): per-group U-gradient clip, scale min(1, c/‖group‖₂).
        clip_groups (`str`, *optional*, defaults to `"module"`): `module` (one group per leaf module) or `tensor`.
        ema_decay (`float`, *optional*, defaults to `0.95`): EMA merge U ← βU + (1 − β)V of the structure parameters.
        ema_schedule (`str`, *optional*, defaults to `"constant"`): schedule of β over the optimizer step, as
            `inner_lr_schedule`. ema_schedule_value (`float`, *optional*, defaults to `0.0`), ema_schedule_steps
            (`int`, *optional*): its other end and length.
        warm_start (`bool`, *optional*, defaults to `True`): start the inner loop from U (else from the identity).
        damping (`float`, *optional*, defaults to `0.0`): λ in G + λI.
        min_diag (`float`, *optional*, defaults to `1e-8`): positivity clamp of `diagonal` / `scalar` U.
        allow_inversion (`bool`, *optional*, defaults to `False`): skip the positivity clamp.
        identity_scaling (`float`, *optional*, defaults to `1.0`): store s·U and divide by s when applying.
        include_pad_rows (`bool`, *optional*, defaults to `False`): count `labels == -100` rows, as the reference.
        curvature_sharding (`str`, *optional*, defaults to `"replicated"`): `replicated` or `sharded` (§5.6).
        chunk_size (`int`, *optional*): recompute the curvature batch in chunks of this many examples (§4.5).
        apply (`str`, *optional*, defaults to `"gradient"`): precondition the gradient or the optimizer's update.
        update_probe_scale (`str`, *optional*, defaults to `"gradient_norm"`): `apply="update"` only: rescale the
            probe Δ_opt(g) to ‖g‖ (`gradient_norm`, ours) or keep the raw update (`none`, the reference's
            `precond_on_update`), `docs/algorithm.md` §7.3.
        in_perturbation (`bool`, *optional*, defaults to `True`): use U as the perturbation geometry, C = U in
            ε = ρ·Cv/√(ν² + eps); only modes whose `ModeSpec.llqr_geometry` is set admit it (`sam`, `fsam`).
        on_update (`bool`, *optional*, defaults to `True`): use U as the descent preconditioner, P = U on the descent
            gradient (or, with `apply="update"`, on the base optimizer's update).
        label_smoothing (`float`, *optional*, defaults to `0.0`): ε_ls of the training loss.
        shift_labels (`str`, *optional*, defaults to `"auto"`): pair logits at t with labels at t + 1 (causal LMs):
            `auto` decides from the model (`hf_llqrsam.causal.resolve_shift_labels`), `true` or `false`.
    """

    structure: Structure = "diagonal"
    divergence: Divergence = "ngd"
    ngd_scaling: NGDScaling = "sum"
    renyi_alpha: float = 0.5
    update_interval: int = 1000
    update_until: int | None = None
    update_interval_milestones: str | None = None
    batch_size: int = 64
    inner_steps: int = 50
    inner_solver: InnerSolver = "momentum"
    cg_beta: CGBeta = "reference"
    inner_lr: float = 1e-3
    inner_lr_schedule: Schedule = "constant"
    inner_lr_schedule_value: float = 0.0
    inner_lr_schedule_steps: int | None = None
    inner_momentum: float = 0.9
    clip_norm: float = 5.0
    clip_groups: ClipGroups = "module"
    ema_decay: float = 0.95
    ema_schedule: Schedule = "constant"
    ema_schedule_value: float = 0.0
    ema_schedule_steps: int | None = None
    warm_start: bool = True
    damping: float = 0.0
    min_diag: float = 1e-8
    allow_inversion: bool = False
    identity_scaling: float = 1.0
    include_pad_rows: bool = False
    curvature_sharding: CurvatureSharding = "replicated"
    chunk_size: int | None = None
    apply: Apply = "gradient"
    update_probe_scale: UpdateProbeScale = "gradient_norm"
    in_perturbation: bool = True
    on_update: bool = True
    label_smoothing: float = 0.0
    shift_labels: ShiftLabels = "auto"
