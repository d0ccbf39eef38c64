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
    §12.1), the only LLQR settings object the math accepts.

    Each field `x` is the flag `llqr_x` of [`~hf_llqrsam.args.LLQRSAMFields`], except `label_smoothing`, which comes
    from the stock `label_smoothing_factor` so that the curvature problem uses the training loss
    (`docs/algorithm.md` §3). Each is described once, in its flag's help: the flag reference
    (`docs/reference/flags.md`, generated from that help) and `--help` show it.
    [`~hf_llqrsam.args.LLQRSAMFields.to_llqr_config`] builds the config field by field; the defaults equal the flags'
    defaults (a test checks both).

    Example:

    ```python
    >>> from hf_llqrsam.llqr import LLQRConfig
    >>> LLQRConfig(update_interval=100, batch_size=128).inner_steps  # llqr_update_interval, llqr_batch_size
    50
    ```
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
