"""Typed, frozen configs built from the flat CLI fields: the only config types the math modules accept."""

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class SAMConfig:
    """The SAM-family settings of one run (see [`~hf_llqrsam.args.LLQRSAMFields`] for each field's meaning).

    `fisher_sam_eta` is resolved here: `None` becomes 0.1 for the reference form and 1.0 for the paper form
    (`algorithm.md` §8.4).
    """

    mode: str = "sam"
    rho: float = 0.1
    rho_schedule: str = "constant"
    rho_min: float = 0.0
    start_step: int = 0
    interval: int = 1
    norm: str = "euclidean"
    eps: float = 1e-12
    accumulation: str = "window"
    scope: str = "global"
    bn_stats: str = "second"
    same_dropout: bool = False
    asam_eta: float = 0.01
    fsam_beta: float = 0.9
    fsam_sigma: float = 1.0
    fsam_init: str = "zero"
    fisher_sam_form: str = "reference"
    fisher_sam_eta: float = 0.1
    gsam_alpha: float = 0.4
    vasso_theta: float = 0.4
    infosam_alpha: float = 0.9
    infosam_damping: float = 1e-8
    infosam_variance: str = "instant"

    @classmethod
    def from_args(cls, args: Any) -> "SAMConfig":
        """Build from any object carrying the `sam_*` / per-mode fields (a training-arguments instance)."""
        eta = args.fisher_sam_eta
        if eta is None:
            eta = 0.1 if args.fisher_sam_form == "reference" else 1.0
        return cls(
            mode=args.sam_mode,
            rho=args.sam_rho,
            rho_schedule=args.sam_rho_schedule,
            rho_min=args.sam_rho_min,
            start_step=args.sam_start_step,
            interval=args.sam_interval,
            norm=args.sam_norm,
            eps=args.sam_eps,
            accumulation=args.sam_accumulation,
            scope=args.sam_scope,
            bn_stats=args.sam_bn_stats,
            same_dropout=args.sam_same_dropout,
            asam_eta=args.asam_eta,
            fsam_beta=args.fsam_beta,
            fsam_sigma=args.fsam_sigma,
            fsam_init=args.fsam_init,
            fisher_sam_form=args.fisher_sam_form,
            fisher_sam_eta=eta,
            gsam_alpha=args.gsam_alpha,
            vasso_theta=args.vasso_theta,
            infosam_alpha=args.infosam_alpha,
            infosam_damping=args.infosam_damping,
            infosam_variance=args.infosam_variance,
        )
