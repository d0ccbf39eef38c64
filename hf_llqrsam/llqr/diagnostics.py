"""How far U has moved from the identity, and how much of it sits at the positivity floor (issue 12, item 2).

Three numbers describe U after a refresh (`docs/algorithm.md` §5.3), over U's stored tensors t (each once: the
`scalar` structure's c is shared by its clip group), each compared with the tensor t_I of the identity structure
built with the same identity scaling s (`llqr_identity_scaling`):

* **RMS displacement** `u_rms_displacement = √( Σ_t ‖(t − t_I)/r_t‖² / Σ_t numel(t) )`, with r_t = max|t_I| the
  identity's entry scale of t (s for the tensors that carry s, √s for the PSD roots that carry √s, 1 otherwise), so
  that s cancels. Per structure:
  - `diagonal`: the RMS of U − 1 over all diagonal entries d/s of U;
  - `scalar`: the RMS of c − 1 over the clip groups' scalars (one stored entry per group, whatever its size);
  - Kronecker structures (`kfac`, `ekfac`, `sep_ekfac`, `diag_kfac`, `sym_kfac`, the PSD ones): the RMS of
    factor − identity over every stored factor entry (A − I, B − I, Q_A − I, s − 1, a − 1, t − √s, … off-diagonal
    entries included) and of d − 1 over the diagonal vectors of non-kernel tensors. It measures the parameters, not
    the operator: for `ekfac`, an orthogonal Q_A ≠ I with s = 1 still gives U = I.
* **Fraction at the floor** `u_at_floor`: for the clamped structures (`diagonal`, `scalar`, `positive = True`, with
  `llqr_allow_inversion` off), the share of stored entries t ≤ min_diag·(1 + 10⁻⁶), the clamp t ← max(t, min_diag)
  of the EMA merge being applied to the stored s·U; 0 for every other structure (no floor).
* **Objective ratio** J_end / J_start of the inner loop (computed by the preconditioner, not here).

[`block_summary`] gives the same numbers per tensor of U, with its min, max and mean (over the tensor's effective
diagonal parts, as `llqr/u_min|max|mean`), for the `llqr_u_summary.json` written next to checkpoints.
"""

import math
from typing import Any

import torch
from torch import Tensor

from .structures import Structure

__all__ = ["FLOOR_TOLERANCE", "block_summary", "floor_fractions", "u_diagnostics"]

FLOOR_TOLERANCE = 1e-6
"""An entry counts as at the floor when it is ≤ min_diag·(1 + FLOOR_TOLERANCE)."""


def _floor(structure: Structure, min_diag: float | None) -> float | None:
    """The floor's threshold, or `None` for structures without one (or with the clamp off)."""
    return None if min_diag is None or not structure.positive else min_diag * (1.0 + FLOOR_TOLERANCE)


def _sq_displacement(t: Tensor, t_id: Tensor) -> Tensor:
    """‖(t − t_I)/r‖², r = max|t_I|, in float64 (0-dim)."""
    ref = float(t_id.abs().max()) if t_id.numel() else 1.0
    diff = (t.detach().double() - t_id.double()) / (ref if ref > 0 else 1.0)
    return (diff * diff).sum()


@torch.no_grad()
def u_diagnostics(structure: Structure, min_diag: float | None) -> dict[str, float]:
    """`llqr/u_rms_displacement` and `llqr/u_at_floor` of U (see the module docstring).

    Args:
        structure (`Structure`): U, with whole (not sharded) tensors.
        min_diag (`float`, *optional*): `llqr_min_diag`, or `None` when the clamp is off (`llqr_allow_inversion`).
    """
    identity = structure.identity()
    floor = _floor(structure, min_diag)
    sq, n, low = 0.0, 0, 0
    for t, t_id in zip(structure.parameters(), identity.parameters(), strict=True):
        sq += float(_sq_displacement(t, t_id))
        n += t.numel()
        if floor is not None:
            low += int((t.detach() <= floor).sum())
    return {
        "llqr/u_rms_displacement": math.sqrt(sq / n) if n else 0.0,
        "llqr/u_at_floor": low / n if n and floor is not None else 0.0,
    }


@torch.no_grad()
def floor_fractions(structure: Structure, min_diag: float | None) -> dict[str, float]:
    """Canonical tensor name → the fraction of its stored entries at the floor; empty without a floor."""
    floor = _floor(structure, min_diag)
    if floor is None:
        return {}
    out = {}
    for layout, blk in zip(structure.layouts, structure.blocks, strict=True):
        n = sum(t.numel() for t in blk.values())
        out[layout.name] = sum(int((t.detach() <= floor).sum()) for t in blk.values()) / n if n else 0.0
    return out


@torch.no_grad()
def block_summary(structure: Structure, min_diag: float | None) -> dict[str, dict[str, Any]]:
    """Canonical tensor name → `structure`, `entries` (stored entries of its block), `min`, `max`, `mean` (of its
    effective diagonal parts), `rms_displacement` and `at_floor` (over its block's stored entries).

    A `scalar` block is its group's shared c: one entry, the same values for every tensor of the group.
    """
    identity = structure.identity()
    floor = _floor(structure, min_diag)
    out: dict[str, dict[str, Any]] = {}
    for i, layout in enumerate(structure.layouts):
        blk, blk_id = structure.blocks[i], identity.blocks[i]
        n = sum(t.numel() for t in blk.values())
        sq = sum(float(_sq_displacement(t, blk_id[k])) for k, t in blk.items())
        diag = torch.cat(structure.block_diagonal_parts(i)).double()
        low = sum(int((t.detach() <= floor).sum()) for t in blk.values()) if floor is not None else 0
        out[layout.name] = {
            "structure": structure.kind,
            "entries": n,
            "min": float(diag.min()),
            "max": float(diag.max()),
            "mean": float(diag.mean()),
            "rms_displacement": math.sqrt(sq / n) if n else 0.0,
            "at_floor": low / n if n else 0.0,
        }
    return out
