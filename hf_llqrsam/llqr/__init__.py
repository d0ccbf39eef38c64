"""LLQR: the learned, block-structured inverse preconditioner U of arXiv 2605.04230, in pure torch.

Modules: `config` (LLQRConfig), `curvature` (g and G·v), `layout` (tensor views, clip groups), `structures` (the
parameterisations of U) and `structures_ext` (the reference's constrained Kronecker ones), `fit` (surrogate
U-gradient, inner loop), `solvers` (the inner solvers: momentum, sgd, adam, nonlinear CG), `schedules` (inner LR, EMA
decay and refresh interval as functions of the step), `preconditioner` (LLQRPreconditioner), `diagnostics` (how far
U moved from I, its share at the `min_diag` floor) and `update_probe` (the optimizer's dry-run update for
`llqr_apply="update"`).
"""

from .config import LLQRConfig
from .curvature import curvature_problem, logits_and_targets
from .preconditioner import LLQRPreconditioner
from .structures import (
    DiagonalStructure,
    EKFACStructure,
    KFACStructure,
    LLQRStateError,
    ScalarStructure,
    SepEKFACStructure,
    Structure,
)
from .update_probe import make_update_probe, optimizer_update

__all__ = [
    "DiagonalStructure",
    "EKFACStructure",
    "KFACStructure",
    "LLQRConfig",
    "LLQRPreconditioner",
    "LLQRStateError",
    "ScalarStructure",
    "SepEKFACStructure",
    "Structure",
    "curvature_problem",
    "logits_and_targets",
    "make_update_probe",
    "optimizer_update",
]
