"""How each trainable tensor is viewed by the block structures of U, and the clip groups (`docs/algorithm.md`
§6.2–6.3).

A kernel is written in the reference orientation X ∈ R^{m×n}, m the fan-in side and n the fan-out side:

| tensor                                   | `kind`      | X                                | vocab side      |
|------------------------------------------|-------------|----------------------------------|-----------------|
| `nn.Linear.weight` (out, in)             | `out_in`    | Wᵀ (m = in, n = out)             | LM head: n      |
| `nn.Conv{1,2,3}d.weight` (cout, cin, k…) | `out_in`    | view (cout, cin·∏k), transposed  |                 |
| HF `Conv1D.weight` (in, out)             | `in_out`    | W                                |                 |
| `nn.Embedding.weight` (V, d)             | `embedding` | W (m = V)                        | m               |
| ViT `position_embeddings` (1, T, d)      | `matrix`    | view (T, d)                      |                 |
| anything else (biases, norms, cls token) | `diagonal`  | –                                |                 |

The vocab-side rule follows the reference's GPT e-kfac variant (github.com/SimonDufLab/LLQR, d2c62b3,
`block_structures.py:GPTEKFACBlock`): a V×V factor is never stored. An untied LM head is recognised as an
`nn.Linear` whose `out_features` equals the `num_embeddings` of a trainable `nn.Embedding` of the same model.
Matrix-like tensors that match no row fall back to diagonal (the reference raises instead); their
names are listed by [`fallback_names`].
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

__all__ = [
    "TensorLayout",
    "clip_groups",
    "fallback_names",
    "from_matrix",
    "tensor_layouts",
    "to_matrix",
    "trainable_parameters",
]

Kind = Literal["out_in", "in_out", "embedding", "matrix", "diagonal"]


@dataclass(frozen=True)
class TensorLayout:
    """The view of one trainable tensor used by the structures of U.

    Args:
        name (`str`): canonical parameter name (first name in `named_parameters()`).
        shape (`tuple[int, ...]`): the tensor's shape.
        kind (`str`): `out_in`, `in_out`, `embedding`, `matrix` or `diagonal` (see the module docstring).
        module (`str`): name of the module that owns the tensor; the `module` clip group.
        diag_side (`str`, *optional*): `"m"` or `"n"` when that Kronecker factor must stay a diagonal vector.
    """

    name: str
    shape: tuple[int, ...]
    kind: Kind
    module: str
    diag_side: Literal["m", "n"] | None = None

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """(m, n) of the reference-orientation view X; only for non-diagonal kinds."""
        match self.kind:
            case "out_in":
                return (self.numel // self.shape[0], self.shape[0])
            case "in_out" | "embedding":
                return (self.shape[0], self.shape[1])
            case "matrix":
                return (self.shape[-2], self.shape[-1])
            case _:
                raise ValueError(f"Tensor {self.name!r} has a diagonal layout and no matrix view.")

    @property
    def numel(self) -> int:
        return int(torch.Size(self.shape).numel())


def to_matrix(layout: TensorLayout, t: Tensor) -> Tensor:
    """The (m, n) view X of a parameter-shaped tensor `t` (a view, no copy, where strides allow)."""
    match layout.kind:
        case "out_in":
            return t.reshape(t.shape[0], -1).T
        case "in_out" | "embedding":
            return t
        case "matrix":
            return t.reshape(layout.matrix_shape)
        case _:
            raise ValueError(f"Tensor {layout.name!r} has a diagonal layout and no matrix view.")


def from_matrix(layout: TensorLayout, x: Tensor) -> Tensor:
    """Inverse of [`to_matrix`]: back to the parameter's shape."""
    match layout.kind:
        case "out_in":
            return x.T.reshape(layout.shape)
        case "in_out" | "embedding":
            return x
        case "matrix":
            return x.reshape(layout.shape)
        case _:
            raise ValueError(f"Tensor {layout.name!r} has a diagonal layout and no matrix view.")


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """θ: the `requires_grad` parameters of `model`, tied tensors once under their first name (`docs/algorithm.md`
    §1)."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _layout(name: str, p: Tensor, module_name: str, module: nn.Module, vocab_sizes: set[int]) -> TensorLayout:
    leaf = name.rsplit(".", 1)[-1]
    shape = tuple(p.shape)
    kind: Kind = "diagonal"
    diag_side: Literal["m", "n"] | None = None
    if leaf == "weight" and p.dim() >= 2:
        if isinstance(module, nn.Embedding):
            kind, diag_side = "embedding", "m"
        elif isinstance(module, nn.Linear):
            kind = "out_in"
            if module.out_features in vocab_sizes:
                diag_side = "n"
        elif isinstance(module, _CONV):
            kind = "out_in"
        elif type(module).__name__ == "Conv1D" and p.dim() == 2:  # HF GPT-2 style Conv1D, weight (in, out)
            kind = "in_out"
    elif leaf.endswith("position_embeddings") and p.dim() == 3 and shape[0] == 1:
        kind = "matrix"
    return TensorLayout(name=name, shape=shape, kind=kind, module=module_name, diag_side=diag_side)


def tensor_layouts(model: nn.Module, names: Sequence[str] | None = None) -> list[TensorLayout]:
    """Layouts of the trainable tensors of `model`, in [`trainable_parameters`] order (or for `names` only).

    Args:
        model (`nn.Module`): the unwrapped eager model.
        names (`Sequence[str]`, *optional*): restrict to these canonical names (default: all trainable tensors).
    """
    params = trainable_parameters(model)
    if names is not None:
        wanted = set(names)
        params = [(n, p) for n, p in params if n in wanted]
    vocab_sizes = {m.num_embeddings for m in model.modules() if isinstance(m, nn.Embedding) and m.weight.requires_grad}
    out = []
    for name, p in params:
        module_name = name.rsplit(".", 1)[0] if "." in name else ""
        out.append(_layout(name, p, module_name, model.get_submodule(module_name), vocab_sizes))
    return out


def fallback_names(layouts: Sequence[TensorLayout]) -> list[str]:
    """Matrix-like tensors (two or more dims of size > 1) that fell back to a diagonal block (worth logging once)."""
    return [lay.name for lay in layouts if lay.kind == "diagonal" and sum(s > 1 for s in lay.shape) >= 2]


def clip_groups(layouts: Sequence[TensorLayout], mode: Literal["module", "tensor"]) -> list[list[int]]:
    """Groups of layout indices for `diagonal`/`scalar` U (`docs/algorithm.md` §6.3).

    `module`: one group per module that owns parameters (Linear weight + bias, LayerNorm weight + bias, …);
    `tensor`: one group per tensor. Kronecker structures ignore this and clip each factor on its own.
    """
    match mode:
        case "tensor":
            return [[i] for i in range(len(layouts))]
        case "module":
            groups: dict[str, list[int]] = {}
            for i, lay in enumerate(layouts):
                groups.setdefault(lay.module, []).append(i)
            return list(groups.values())
        case _:
            raise ValueError(f"Invalid clip_groups={mode!r}. Must be 'module' or 'tensor'.")
