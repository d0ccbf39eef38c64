"""LLQR: the learned, block-structured inverse preconditioner U of arXiv 2605.04230, in pure torch.

Modules, from the bottom up (each imports only modules above it in this list; `tests/unit/llqr/test_layering.py`):
`config` (LLQRConfig), `sharding` (DTensor helpers), `layout` (tensor views, clip groups), `schedules` (inner LR,
EMA decay, refresh interval and cadence as functions of the step), `curvature` (g and G·v), `structures` (the
parameterisations of U), `structures_ext` (the reference's constrained Kronecker ones), `registry` (structure by
name), `solvers` (the inner solvers: momentum, sgd, adam, nonlinear CG), `fit` (surrogate U-gradient, inner loop),
`diagnostics` (how far U moved from I, its share at the `min_diag` floor), `state` (U's tensors, counters, FSDP2
placement, fingerprint), `apply` (the operator U·t), `refresh` (one refresh of U), `update_probe` (the optimizer's
dry-run update for `apply="update"`) and `preconditioner` (LLQRPreconditioner, their composition).
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
