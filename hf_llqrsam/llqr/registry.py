"""Every structure of U by its `LLQRConfig.structure` name, and [`make_structure`] (`docs/algorithm.md` §6.1).

The base families live in [`~hf_llqrsam.llqr.structures`], the reference's constrained Kronecker ones in
[`~hf_llqrsam.llqr.structures_ext`], which builds on the first; this module sits above both, so neither imports the
other back.
"""

from collections.abc import Sequence

import torch

from .layout import TensorLayout
from .structures import (
    DiagonalStructure,
    EKFACStructure,
    KFACStructure,
    ScalarStructure,
    SepEKFACStructure,
    Structure,
)
from .structures_ext import EXTENDED

__all__ = ["STRUCTURES", "make_structure"]

STRUCTURES: dict[str, type[Structure]] = {
    **{
        cls.kind: cls for cls in (DiagonalStructure, ScalarStructure, KFACStructure, EKFACStructure, SepEKFACStructure)
    },
    **EXTENDED,
}
"""`LLQRConfig.structure` value → class, in the order of `LLQRConfig.structure`'s `Literal`."""


def make_structure(
    kind: str,
    layouts: Sequence[TensorLayout],
    groups: Sequence[Sequence[int]],
    identity_scaling: float = 1.0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Structure:
    """The identity structure of `kind` (`LLQRConfig.structure`) over `layouts`.

    Raises:
        `ValueError`: naming `LLQRConfig.structure` and the allowed values, for an unknown `kind`.
    """
    if kind not in STRUCTURES:
        allowed = ", ".join(repr(k) for k in STRUCTURES)
        raise ValueError(f"Invalid LLQRConfig.structure={kind!r}. Must be one of {allowed}.")
    return STRUCTURES[kind](layouts, groups, identity_scaling, dtype, device)
