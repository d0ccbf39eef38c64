"""The reference's constrained Kronecker structures of U: `psd_ekfac`, `psd_sep_ekfac`, `diag_kfac`, `sym_kfac` and
`psd_sym_kfac` (`docs/algorithm.md` §6.1).

Each follows a class of the reference's `lqr_optimizer/_src/block_matrices_approx/block_structures.py`
(github.com/SimonDufLab/LLQR, d2c62b3; registered in `preconditioner.py:BLOCK_STRUCTURE_DICT`). In the reference
orientation X ∈ R^{m×n} of a kernel:

* `psd_ekfac` (`psd-e-kfac`, `PSDEKFACBlock`): `Q_A` (m×m), `Q_G` (n×n), `t` (m×n);
  U(X) = Q_A [(t² + ε) ⊙ (Q_Aᵀ X Q_G)] Q_Gᵀ.
* `psd_sep_ekfac` (`psd-sep-e-kfac`, `PSDSeparableEKFACBlock`): `Q_A`, `Q_G`, `t_a` (m), `t_b` (n);
  U(X) = (Q_A diag(t_a² + ε) Q_Aᵀ) X (Q_G diag(t_b² + ε) Q_Gᵀ).
* `diag_kfac` (`diag-kfac`, `DiagKroneckerBlock`): `a` (m), `b` (n); U(X) = diag(a) X diag(b).
* `sym_kfac` (`sym-kfac`, `MirrorSymKroneckerBlock`): `T_A` (m×m), `T_B` (n×n); U(X) = P(T_A) X P(T_B) with
  P(T) = T + Tᵀ − diag(T).
* `psd_sym_kfac` (`psd-sym-kfac`, `PSDSymKroneckerBlock`): `L_A` (m×m), `L_B` (n×n); U(X) = (L_A L_Aᵀ) X (L_B L_Bᵀ).

ε = 1e-12 (the reference's `eps` of `_psd_diag_from_raw` / `_psd_from_raw`). The PSD structures are symmetric
positive semi-definite for any parameters (Q D Qᵀ with D > 0, L Lᵀ); `sym_kfac` is symmetric; `diag_kfac` is
diagonal, of any sign. None is clamped. Tensors with a diagonal layout get a vector `d`, as in every Kronecker
family, and a vocabulary-side factor is a vector (`TensorLayout.diag_side`): diag(q) for the Q factors and for `a`,
`b`; T = diag(t) gives P = diag(t); L = diag(l) gives diag(l²).

**Identity.** Every structure starts at the identity, the PSD ones up to ε: t = 1 gives s_eff = 1 + 1e-12. With the
identity scaling s (`llqr_identity_scaling`) the factor s sits on the m side, as in [`~structures.KFACStructure`]:
`a` = s, `T_A` = s·I, `L_A` = √s·I, `t` = √s, `t_a` = √s. (The reference scales both factors of `diag-kfac`,
`sym-kfac` and `psd-sym-kfac`, which leaves s·U after its division by s; its presets use s = 1 only.)

**The triangular factors** (`sym_kfac`, `psd_sym_kfac`). As in the reference, T and L are stored as full n×n
tensors that are lower-triangular at rest: the inner loop moves the upper triangle too (the gradient of
T + Tᵀ − diag(T) or L Lᵀ w.r.t. an upper entry is not zero), and the merge projects the EMA onto the lower triangle,
U ← tril(β·U + (1 − β)·V) (`MirrorSymKroneckerBlock.update_blocks`, `PSDSymKroneckerBlock.update_blocks`). The
operator kept after the merge is therefore not the EMA of the learned operators; this is the reference's behaviour.
"""

import torch
from torch import Tensor

from .layout import TensorLayout
from .structures import Block, Structure, _KroneckerStructure, _left, _right

__all__ = [
    "EXTENDED",
    "PSD_EPS",
    "DiagKFACStructure",
    "PSDEKFACStructure",
    "PSDSepEKFACStructure",
    "PSDSymKFACStructure",
    "SymKFACStructure",
]

PSD_EPS = 1e-12


def _psd(raw: Tensor) -> Tensor:
    """raw² + ε: the reference's `_psd_diag_from_raw` / `_psd_from_raw`."""
    return raw * raw + PSD_EPS


class _ConstrainedKronecker(_KroneckerStructure):
    """Diagonal parts for the `llqr/u_*` summaries from the effective operator, not the raw tensors."""

    def _kernel_diagonals(self, block: Block) -> list[Tensor]:
        raise NotImplementedError

    def block_diagonal_parts(self, i: int) -> list[Tensor]:
        blk = self.blocks[i]
        if "d" in blk:
            return [blk["d"].detach().reshape(-1) / self.scale]
        parts = self._kernel_diagonals({k: t.detach() for k, t in blk.items()})
        return [parts[0].reshape(-1) / self.scale, *(p.reshape(-1) for p in parts[1:])]


class PSDEKFACStructure(_ConstrainedKronecker):
    """U(X) = Q_A [(t² + ε) ⊙ (Q_Aᵀ X Q_G)] Q_Gᵀ: e-kfac with a PSD eigenbasis diagonal (`PSDEKFACBlock`)."""

    kind = "psd_ekfac"

    def _kernel_block(self, layout: TensorLayout, m: int, n: int) -> Block:
        return {
            "Q_A": self._factor(m, layout.diag_side == "m"),
            "Q_G": self._factor(n, layout.diag_side == "n"),
            "t": torch.full((m, n), self.scale**0.5, dtype=self.dtype, device=self.device),
        }

    def _kernel_apply(self, block: Block, x: Tensor) -> Tensor:
        q_a, q_g = block["Q_A"], block["Q_G"]
        x_hat = _right(_left(q_a, x, transpose=True), q_g)
        return _right(_left(q_a, _psd(block["t"]) * x_hat), q_g, transpose=True)

    def _kernel_diagonals(self, block: Block) -> list[Tensor]:
        return [_psd(block["t"])]


class PSDSepEKFACStructure(_ConstrainedKronecker):
    """U(X) = (Q_A diag(t_a² + ε) Q_Aᵀ) X (Q_G diag(t_b² + ε) Q_Gᵀ) (`PSDSeparableEKFACBlock`)."""

    kind = "psd_sep_ekfac"

    def _kernel_block(self, layout: TensorLayout, m: int, n: int) -> Block:
        return {
            "Q_A": self._factor(m, layout.diag_side == "m"),
            "Q_G": self._factor(n, layout.diag_side == "n"),
            "t_a": torch.full((m,), self.scale**0.5, dtype=self.dtype, device=self.device),
            "t_b": self._ones(n),
        }

    def _kernel_apply(self, block: Block, x: Tensor) -> Tensor:
        q_a, q_g = block["Q_A"], block["Q_G"]
        y = _left(q_a, _psd(block["t_a"])[:, None] * _left(q_a, x, transpose=True))
        return _right(_right(y, q_g) * _psd(block["t_b"])[None, :], q_g, transpose=True)

    def _kernel_diagonals(self, block: Block) -> list[Tensor]:
        return [_psd(block["t_a"]), _psd(block["t_b"])]


class DiagKFACStructure(_ConstrainedKronecker):
    """U(X) = diag(a) X diag(b) = a[:, None] ⊙ X ⊙ b[None, :] (`DiagKroneckerBlock`, "in the spirit of AdaFisher")."""

    kind = "diag_kfac"

    def _kernel_block(self, layout: TensorLayout, m: int, n: int) -> Block:
        return {"a": self._ones(m, scaled=True), "b": self._ones(n)}

    def _kernel_apply(self, block: Block, x: Tensor) -> Tensor:
        return block["a"][:, None] * x * block["b"][None, :]

    def _kernel_diagonals(self, block: Block) -> list[Tensor]:
        return [block["a"], block["b"]]


def _full(t: Tensor) -> Tensor:
    """A vocabulary-side vector stands for the diagonal matrix diag(t)."""
    return torch.diag(t) if t.dim() == 1 else t


class _TriangularKronecker(_ConstrainedKronecker):
    """Factors stored as full matrices, lower-triangular after every merge (see the module docstring)."""

    factor_keys: tuple[str, str]

    def _sym(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def _kernel_apply(self, block: Block, x: Tensor) -> Tensor:
        left, right = (self._sym(block[k]) for k in self.factor_keys)
        return _right(_left(left, x), right)  # both factors are symmetric: X·P_B = X·P_Bᵀ

    def _kernel_diagonals(self, block: Block) -> list[Tensor]:
        return [_full(self._sym(block[k])).diagonal() for k in self.factor_keys]

    @torch.no_grad()
    def ema_(self, other: Structure, decay: float) -> None:
        """U ← tril(β·U + (1 − β)·V) on the factor matrices; other tensors as the base class."""
        super().ema_(other, decay)
        for blk in self.blocks:
            for k in self.factor_keys:
                if k in blk and blk[k].dim() == 2:
                    blk[k].copy_(torch.tril(blk[k]))


class SymKFACStructure(_TriangularKronecker):
    """U(X) = P(T_A) X P(T_B), P(T) = T + Tᵀ − diag(T): symmetric factors (`MirrorSymKroneckerBlock`)."""

    kind = "sym_kfac"
    factor_keys = ("T_A", "T_B")

    def _kernel_block(self, layout: TensorLayout, m: int, n: int) -> Block:
        return {
            "T_A": self._factor(m, layout.diag_side == "m", scaled=True),
            "T_B": self._factor(n, layout.diag_side == "n"),
        }

    def _sym(self, t: Tensor) -> Tensor:
        if t.dim() == 1:
            return t
        return t + t.T - torch.diag(t.diagonal())


class PSDSymKFACStructure(_TriangularKronecker):
    """U(X) = (L_A L_Aᵀ) X (L_B L_Bᵀ): symmetric PSD factors (`PSDSymKroneckerBlock`)."""

    kind = "psd_sym_kfac"
    factor_keys = ("L_A", "L_B")

    def _kernel_block(self, layout: TensorLayout, m: int, n: int) -> Block:
        root = self.scale**0.5
        l_a = self._factor(m, layout.diag_side == "m")
        return {"L_A": l_a * root if root != 1.0 else l_a, "L_B": self._factor(n, layout.diag_side == "n")}

    def _sym(self, t: Tensor) -> Tensor:
        return t * t if t.dim() == 1 else t @ t.T


EXTENDED: dict[str, type[Structure]] = {
    cls.kind: cls
    for cls in (PSDEKFACStructure, PSDSepEKFACStructure, DiagKFACStructure, SymKFACStructure, PSDSymKFACStructure)
}
"""`LLQRConfig.structure` value → class, for [`~hf_llqrsam.llqr.registry.make_structure`]."""
