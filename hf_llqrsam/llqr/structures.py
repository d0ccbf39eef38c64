"""Block structures: parameterisations of the learned inverse preconditioner U (`docs/algorithm.md` §6.1).

Every structure starts as the identity, is learned by the inner loop of [`~hf_llqrsam.llqr.fit.fit_structure`]
and is not a curvature statistic. In the reference orientation X ∈ R^{m×n} of a kernel (see
[`~hf_llqrsam.llqr.layout`]):

| structure   | block tensors                      | U(X)                                      |
|-------------|------------------------------------|-------------------------------------------|
| `diagonal`  | `d` (tensor-shaped)                | d ⊙ X                                     |
| `scalar`    | `c` (one per clip group)           | c · X                                     |
| `kfac`      | `A` (m×m), `B` (n×n)               | A X Bᵀ                                    |
| `ekfac`     | `Q_A` (m×m), `Q_G` (n×n), `s` (m×n) | Q_A [s ⊙ (Q_Aᵀ X Q_G)] Q_Gᵀ               |
| `sep_ekfac` | `Q_A`, `Q_G`, `a` (m), `b` (n)      | (Q_A diag(a) Q_Aᵀ) X (Q_G diag(b) Q_Gᵀ)   |

In the Kronecker families, tensors with a diagonal layout (biases, norms, …) get a vector `d`, and a factor on a
vocab side (`TensorLayout.diag_side`) is a vector q standing for diag(q). `s` is stored in X orientation.

Identity scaling s (`llqr_identity_scaling`): the stored operator is s·U and [`Structure.apply`] divides by s. The
factor s sits on `d`, `c`, `A`, the e-kfac `s` and the separable `a`. (The reference scales both kfac factors, which
gives s·U after the division instead of U; only s = 1 is used by its presets.)

The U-gradient needs no structure-specific code: [`Structure.apply`] is differentiable in [`Structure.parameters`].
"""

from collections.abc import Callable, Mapping, Sequence
from typing import ClassVar

import torch
from torch import Tensor

from .layout import TensorLayout, from_matrix, to_matrix
from .sharding import full_tensor, is_dtensor, local_tensor, shard_like

__all__ = [
    "DiagonalStructure",
    "EKFACStructure",
    "KFACStructure",
    "LLQRStateError",
    "ScalarStructure",
    "SepEKFACStructure",
    "Structure",
]

Block = dict[str, Tensor]


class LLQRStateError(ValueError):
    """Saved LLQR state that cannot be loaded into this run's U: malformed, non-finite, out of range or written
    under settings that would change what U means. The message names the tensor or setting and what to do."""


class Structure:
    """Base class: U as a list of blocks aligned with `layouts`; each block is a dict of named fp32 tensors.

    Args:
        layouts (`Sequence[TensorLayout]`): the tensors U acts on, in order.
        groups (`Sequence[Sequence[int]]`): module clip groups as lists of layout indices (`docs/algorithm.md` §6.3).
        identity_scaling (`float`, *optional*, defaults to `1.0`): s; the stored operator is s·U.
        dtype (`torch.dtype`, *optional*, defaults to `torch.float32`): dtype of the block tensors.
        device (`torch.device`, *optional*): device of the block tensors.
    """

    kind: ClassVar[str]
    positive: ClassVar[bool] = False  # clamp entries to ≥ min_diag after the EMA merge (`docs/algorithm.md` §5.3)

    def __init__(
        self,
        layouts: Sequence[TensorLayout],
        groups: Sequence[Sequence[int]],
        identity_scaling: float = 1.0,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        self.layouts = list(layouts)
        self.groups = [list(g) for g in groups]
        self.scale = float(identity_scaling)
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.blocks: list[Block] = self._identity_blocks()

    # ---- construction -------------------------------------------------------------------------------------
    def _identity_blocks(self) -> list[Block]:
        return [self._identity_block(lay) for lay in self.layouts]

    def _identity_block(self, layout: TensorLayout) -> Block:
        raise NotImplementedError

    def _ones(self, *shape: int, scaled: bool = False) -> Tensor:
        return torch.full(shape, self.scale if scaled else 1.0, dtype=self.dtype, device=self.device)

    def _eye(self, n: int, scaled: bool = False) -> Tensor:
        eye = torch.eye(n, dtype=self.dtype, device=self.device)
        return eye * self.scale if scaled else eye

    def identity(self) -> "Structure":
        """A fresh identity structure over the same tensors."""
        return type(self)(self.layouts, self.groups, self.scale, self.dtype, self.device)

    def clone(self, requires_grad: bool = False) -> "Structure":
        """A deep copy (shared tensors stay shared), optionally as leaves that require grad."""
        new = type(self).__new__(type(self))
        new.__dict__.update(self.__dict__)
        copies: dict[int, Tensor] = {}
        for t in self.parameters():
            copies[id(t)] = t.detach().clone().requires_grad_(requires_grad)
        new.blocks = [{k: copies[id(t)] for k, t in blk.items()} for blk in self.blocks]
        return new

    def map_tensors(self, fn: Callable[[Tensor], Tensor]) -> "Structure":
        """The same structure over `fn(t)` for each of its tensors, each called once (shared tensors stay shared).

        Tensors that `fn` returns unchanged are shared with this structure. Used with
        [`~hf_llqrsam.llqr.sharding.full_tensor`] to gather FSDP2-sharded U for a refresh.
        """
        new = type(self).__new__(type(self))
        new.__dict__.update(self.__dict__)
        mapped = {id(t): fn(t) for t in self.parameters()}
        new.blocks = [{k: mapped[id(t)] for k, t in blk.items()} for blk in self.blocks]
        return new

    # ---- parameters and groups ----------------------------------------------------------------------------
    def parameters(self) -> list[Tensor]:
        """The learnable tensors, each once (the `scalar` structure shares one tensor across a group)."""
        seen: dict[int, Tensor] = {}
        for blk in self.blocks:
            for t in blk.values():
                seen.setdefault(id(t), t)
        return list(seen.values())

    def clip_groups(self) -> list[list[int]]:
        """Clip groups as lists of indices into [`parameters`]: one per factor or diagonal vector."""
        return [[i] for i in range(len(self.parameters()))]

    # ---- the operator -------------------------------------------------------------------------------------
    def apply_block(self, i: int, t: Tensor) -> Tensor:
        """U·t for the tensor of layout `i` (differentiable in the block tensors); `t` has the tensor's shape."""
        out = self._apply(self.blocks[i], self.layouts[i], t)
        return out if self.scale == 1.0 else out / self.scale

    def apply(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        """U·t for every tensor, aligned with `layouts`."""
        return [self.apply_block(i, t) for i, t in enumerate(tensors)]

    def _apply(self, block: Block, layout: TensorLayout, t: Tensor) -> Tensor:
        raise NotImplementedError

    # ---- merge, clamp, statistics -------------------------------------------------------------------------
    @torch.no_grad()
    def ema_(self, other: "Structure", decay: float) -> None:
        """U ← β·U + (1 − β)·V on the structure parameters (factors, not operators; `docs/algorithm.md` §5.3)."""
        # lerp: β = 1 keeps U and β = 0 gives V bit for bit, and U = V stays U (e.g. zero inner steps)
        for u, v in zip(self.parameters(), other.parameters(), strict=True):
            u.lerp_(v.detach(), 1.0 - decay)

    @torch.no_grad()
    def clamp_(self, min_value: float) -> None:
        """Positivity clamp, entries ≥ `min_value` (only structures with `positive = True`)."""
        if self.positive:
            for t in self.parameters():
                t.clamp_(min=min_value)

    def diagonal_parts(self) -> list[Tensor]:
        """Effective diagonal parts of U, for the `llqr/u_min|max|mean` summaries (every block's, in order)."""
        return [part for i in range(len(self.blocks)) for part in self.block_diagonal_parts(i)]

    def block_diagonal_parts(self, i: int) -> list[Tensor]:
        """Effective diagonal parts of the block of layout `i` (flat tensors): d, c, the e-kfac s, the separable a
        and b, the diagonals of the kfac A and B; the identity scaling s is divided out."""
        out = []
        for k, t in self.blocks[i].items():
            if k in ("d", "c", "s", "a"):
                out.append(t.detach().reshape(-1) / self.scale)
            elif k == "A":
                out.append((t.detach().diagonal() if t.dim() == 2 else t.detach()) / self.scale)
            elif k in ("B", "b"):
                out.append(t.detach().diagonal() if t.dim() == 2 else t.detach())
        return out

    def memory_bytes(self) -> int:
        """Bytes of U held by this rank: under FSDP2 the local shards of DTensor tensors (about 1/W of U)."""
        return sum(local_tensor(t).numel() * t.element_size() for t in self.parameters())

    # ---- (de)serialisation --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, dict[str, Tensor]]:
        """{canonical name: {tensor name: fp32 CPU tensor}}; FSDP2 shards stay DTensors (saved with DCP)."""
        return {
            lay.name: {
                k: t.detach().clone() if is_dtensor(t) else t.detach().to("cpu", copy=True) for k, t in blk.items()
            }
            for lay, blk in zip(self.layouts, self.blocks, strict=True)
        }

    @torch.no_grad()
    def load_state_dict(
        self,
        blocks: Mapping[str, Mapping[str, Tensor]],
        *,
        min_value: float | None = None,
        source: str = "llqrsam_state.pt",
    ) -> None:
        """Validate every saved tensor, then copy them all into U (nothing is copied if any check fails).

        A saved U is finite and, for `positive` structures (`diagonal`, `scalar`) with the clamp on, every stored
        entry of s·U is ≥ `min_diag` (§5.3). The checks, in the order they run:

        - the names are those of U and each block has the expected tensor names;
        - each value is a floating-point tensor of the expected shape (any real float dtype is cast to U's);
        - every entry is finite (no NaN/Inf);
        - with `min_value` set and `positive = True`: every entry is > 0 and ≥ `min_value`;
        - a tensor shared by several blocks (the `scalar` c of a clip group) has the same saved value in each.

        Args:
            blocks (`Mapping[str, Mapping[str, Tensor]]`): {canonical name: {tensor name: tensor}} from
                [`state_dict`].
            min_value (`float`, *optional*): `llqr_min_diag` when the positivity clamp is on (`None`: inversion is
                allowed, only finiteness is checked). Ignored by structures without a clamp.
            source (`str`, *optional*, defaults to `"llqrsam_state.pt"`): what to call the saved state in messages
                (pass the file's path).

        Raises:
            [`LLQRStateError`]: naming the checkpoint key `blocks[name][tensor]`, what is wrong and what to do.
        """
        remedy = f"Delete {source} to restart with U = I, or resume from an earlier checkpoint."
        names = [lay.name for lay in self.layouts]
        if not isinstance(blocks, Mapping):
            raise LLQRStateError(f"Invalid LLQR state in {source}: 'blocks' is a {type(blocks).__name__}, not a dict.")
        if set(blocks) != set(names):
            missing, extra = sorted(set(names) - set(blocks)), sorted(set(blocks) - set(names))
            raise LLQRStateError(
                f"LLQR state in {source} does not match the model: missing {missing[:5]}, unexpected {extra[:5]}. "
                + remedy
            )
        staged: list[tuple[Tensor, Tensor]] = []
        shared: dict[int, tuple[str, Tensor]] = {}
        for name, blk in zip(names, self.blocks, strict=True):
            saved = blocks[name]
            if not isinstance(saved, Mapping) or set(saved) != set(blk):
                got = sorted(saved) if isinstance(saved, Mapping) else type(saved).__name__
                raise LLQRStateError(
                    f"LLQR block {name!r} in {source} has tensors {got}, expected {sorted(blk)} "
                    f"(LLQRConfig.structure={self.kind!r}). " + remedy
                )
            for k, t in blk.items():
                key = f"blocks[{name!r}][{k!r}]"
                value = saved[k]
                # a DTensor (an FSDP2 shard read with DCP) is checked whole, one tensor at a time, on every rank
                whole = full_tensor(value) if isinstance(value, Tensor) else value
                self._check_tensor(key, whole, t, min_value, source, remedy)
                first = shared.setdefault(id(t), (key, value))
                if first[1] is not value and not torch.equal(first[1], value):
                    raise LLQRStateError(
                        f"Invalid LLQR state in {source}: {key} differs from {first[0]}, but both are the one shared "
                        f"{self.kind} value of a clip group in this run; the file was written with other "
                        "LLQRConfig.clip_groups or another model. " + remedy
                    )
                staged.append((t, value))
        for t, value in staged:
            # whole file → FSDP2 shard: a local slice; DCP shard → DDP / one process: gathered
            t.copy_(shard_like(value, t) if not is_dtensor(value) else value if is_dtensor(t) else full_tensor(value))

    def _check_tensor(
        self, key: str, value: object, target: Tensor, min_value: float | None, source: str, remedy: str
    ) -> None:
        """Raise [`LLQRStateError`] if `value` cannot be loaded into `target` (see [`load_state_dict`])."""
        where = f"Invalid LLQR state in {source}: U tensor {key}"
        if not isinstance(value, Tensor):
            raise LLQRStateError(f"{where} is a {type(value).__name__}, not a tensor. " + remedy)
        if not value.is_floating_point():
            raise LLQRStateError(
                f"{where} has dtype {value.dtype}, which cannot be cast to U's {target.dtype} (U is stored as real "
                "floating point). " + remedy
            )
        if tuple(value.shape) != tuple(target.shape):
            raise LLQRStateError(f"{where} has shape {tuple(value.shape)}, expected {tuple(target.shape)}. " + remedy)
        bad = ~torch.isfinite(value)
        if bool(bad.any()):
            first = tuple(int(i) for i in bad.nonzero()[0].tolist())
            raise LLQRStateError(
                f"{where} has {int(bad.sum())} non-finite entries (NaN/Inf) of {value.numel()}, the first at index "
                f"{first} = {value[first].item()}. A saved U is always finite, so the file is corrupt. " + remedy
            )
        if min_value is not None and self.positive:
            low = (value <= 0) | (value < min_value)
            if bool(low.any()):
                first = tuple(int(i) for i in low.nonzero()[0].tolist())
                raise LLQRStateError(
                    f"{where} has {int(low.sum())} entries below LLQRConfig.min_diag={min_value:g} (the first at "
                    f"index {first} = {value[first].item():g}). The positivity clamp is on, and a saved {self.kind} U "
                    "is always clamped, so the file is corrupt or was written with LLQRConfig.allow_inversion=True or "
                    "a smaller LLQRConfig.min_diag: resume with those settings. Otherwise: " + remedy
                )


class DiagonalStructure(Structure):
    """U = diag(d), d with each tensor's shape: U(X) = d ⊙ X (the default of every paper preset)."""

    kind = "diagonal"
    positive = True

    def _identity_block(self, layout: TensorLayout) -> Block:
        return {"d": self._ones(*layout.shape, scaled=True)}

    def _apply(self, block: Block, layout: TensorLayout, t: Tensor) -> Tensor:
        return block["d"] * t

    def apply(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        """d ⊙ t for every tensor as one fused (differentiable) multiply, the same values as the per-block loop."""
        if any(t.dtype != self.dtype for t in tensors):
            return super().apply(tensors)
        out = list(torch._foreach_mul([blk["d"] for blk in self.blocks], list(tensors)))
        return out if self.scale == 1.0 else list(torch._foreach_div(out, self.scale))

    def clip_groups(self) -> list[list[int]]:
        return self.groups  # one parameter per layout, so layout indices are parameter indices


class ScalarStructure(Structure):
    """U = c_k·I on clip group k (one scalar per group, as the reference's one scalar per layer)."""

    kind = "scalar"
    positive = True

    def _identity_blocks(self) -> list[Block]:
        blocks: list[Block | None] = [None] * len(self.layouts)
        for group in self.groups:
            c = self._ones(scaled=True)
            for i in group:
                blocks[i] = {"c": c}
        missing = [self.layouts[i].name for i, b in enumerate(blocks) if b is None]
        if missing:
            raise ValueError(f"Clip groups do not cover {missing[:5]}.")
        return [b for b in blocks if b is not None]

    def _apply(self, block: Block, layout: TensorLayout, t: Tensor) -> Tensor:
        return block["c"] * t


def _left(q: Tensor, x: Tensor, transpose: bool = False) -> Tensor:
    """q·X, with a vector q standing for diag(q)."""
    if q.dim() == 1:
        return q[:, None] * x
    return (q.T if transpose else q) @ x


def _right(x: Tensor, q: Tensor, transpose: bool = False) -> Tensor:
    """X·q, with a vector q standing for diag(q)."""
    if q.dim() == 1:
        return x * q[None, :]
    return x @ (q.T if transpose else q)


class _KroneckerStructure(Structure):
    """Shared layout handling: diagonal vectors for non-kernel tensors, factors for kernels."""

    def _factor(self, n: int, diagonal: bool, scaled: bool = False) -> Tensor:
        return self._ones(n, scaled=scaled) if diagonal else self._eye(n, scaled=scaled)

    def _identity_block(self, layout: TensorLayout) -> Block:
        if layout.kind == "diagonal":
            return {"d": self._ones(*layout.shape, scaled=True)}
        return self._kernel_block(layout, *layout.matrix_shape)

    def _kernel_block(self, layout: TensorLayout, m: int, n: int) -> Block:
        raise NotImplementedError

    def _apply(self, block: Block, layout: TensorLayout, t: Tensor) -> Tensor:
        if layout.kind == "diagonal":
            return block["d"] * t
        return from_matrix(layout, self._kernel_apply(block, to_matrix(layout, t)))

    def _kernel_apply(self, block: Block, x: Tensor) -> Tensor:
        raise NotImplementedError


class KFACStructure(_KroneckerStructure):
    """U(X) = A X Bᵀ with A ∈ R^{m×m}, B ∈ R^{n×n}, unconstrained (not even symmetric)."""

    kind = "kfac"

    def _kernel_block(self, layout: TensorLayout, m: int, n: int) -> Block:
        return {
            "A": self._factor(m, layout.diag_side == "m", scaled=True),
            "B": self._factor(n, layout.diag_side == "n"),
        }

    def _kernel_apply(self, block: Block, x: Tensor) -> Tensor:
        return _right(_left(block["A"], x), block["B"], transpose=True)


class EKFACStructure(_KroneckerStructure):
    """U(X) = Q_A [s ⊙ (Q_Aᵀ X Q_G)] Q_Gᵀ; Q factors are never re-orthogonalised, s may take any sign."""

    kind = "ekfac"

    def _kernel_block(self, layout: TensorLayout, m: int, n: int) -> Block:
        return {
            "Q_A": self._factor(m, layout.diag_side == "m"),
            "Q_G": self._factor(n, layout.diag_side == "n"),
            "s": self._ones(m, n, scaled=True),
        }

    def _kernel_apply(self, block: Block, x: Tensor) -> Tensor:
        q_a, q_g = block["Q_A"], block["Q_G"]
        x_hat = _right(_left(q_a, x, transpose=True), q_g)
        return _right(_left(q_a, block["s"] * x_hat), q_g, transpose=True)


class SepEKFACStructure(_KroneckerStructure):
    """U(X) = (Q_A diag(a) Q_Aᵀ) X (Q_G diag(b) Q_Gᵀ): symmetric, possibly indefinite."""

    kind = "sep_ekfac"

    def _kernel_block(self, layout: TensorLayout, m: int, n: int) -> Block:
        return {
            "Q_A": self._factor(m, layout.diag_side == "m"),
            "Q_G": self._factor(n, layout.diag_side == "n"),
            "a": self._ones(m, scaled=True),
            "b": self._ones(n),
        }

    def _kernel_apply(self, block: Block, x: Tensor) -> Tensor:
        q_a, q_g = block["Q_A"], block["Q_G"]
        y = _left(q_a, block["a"][:, None] * _left(q_a, x, transpose=True))
        return _right(_right(y, q_g) * block["b"][None, :], q_g, transpose=True)
