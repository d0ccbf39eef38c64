"""§6.1: the reference's constrained Kronecker structures (`psd_ekfac`, `psd_sep_ekfac`, `diag_kfac`, `sym_kfac`,
`psd_sym_kfac`) against dense matrices assembled from their raw factors, and their U-gradients against autograd of
the dense objective and against central finite differences of it (float64)."""

import pytest
import torch
from torch import nn

from hf_llqrsam.llqr import LLQRConfig, LLQRPreconditioner
from hf_llqrsam.llqr.fit import surrogate_gradient
from hf_llqrsam.llqr.layout import clip_groups, tensor_layouts
from hf_llqrsam.llqr.registry import make_structure
from tests.oracles.dense_llqr import (
    PSD_EPS,
    TanhNet,
    block_diag,
    dense_objective,
    flatten,
    kernel_matrix,
    linear_weight_matrix,
    unflatten,
)

NEW = ["psd_ekfac", "psd_sep_ekfac", "diag_kfac", "sym_kfac", "psd_sym_kfac"]
PSD = {"psd_ekfac", "psd_sep_ekfac", "psd_sym_kfac"}
WITH_EPS = {"psd_ekfac", "psd_sep_ekfac"}  # raw² + ε: the identity up to ε = 1e-12
TRIANGULAR = {"sym_kfac": ("T_A", "T_B"), "psd_sym_kfac": ("L_A", "L_B")}
DAMPING = 0.3


class _Net(nn.Module):
    """Embedding (vocab side m, a vector factor), Linear, Conv2d, LayerNorm and an untied LM head (vocab side n)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(5, 3, dtype=torch.float64)
        self.fc = nn.Linear(3, 4, dtype=torch.float64)
        self.conv = nn.Conv2d(2, 3, 2, dtype=torch.float64)
        self.norm = nn.LayerNorm(4, dtype=torch.float64)
        self.head = nn.Linear(4, 5, dtype=torch.float64)


# name -> (view, out, in): "X" = the tensor is X itself, "T" = X is the (flattened) transpose of the weight
_VIEWS = {"emb.weight": ("X", 5, 3), "fc.weight": ("T", 4, 3), "conv.weight": ("T", 3, 8), "head.weight": ("T", 5, 4)}


def _make(kind, scale=1.0, model=None):
    model = model or _Net()
    layouts = tensor_layouts(model)
    return model, make_structure(kind, layouts, clip_groups(layouts, "module"), scale, dtype=torch.float64)


def _block_matrices(kind, structure):
    """(is a kernel, M of the block) for each tensor, from the raw block tensors (never `Structure.apply`)."""
    out = []
    for lay, blk in zip(structure.layouts, structure.blocks, strict=True):
        if "d" in blk:
            out.append((False, torch.diag(blk["d"].reshape(-1)) / structure.scale))
            continue
        view, out_f, in_f = _VIEWS[lay.name]
        m = kernel_matrix(kind, blk) if view == "X" else linear_weight_matrix(kind, blk, out_f, in_f)
        out.append((True, m / structure.scale))
    return out


def _dense(kind, structure):
    """M of the whole structure."""
    return block_diag([m for _, m in _block_matrices(kind, structure)])


def _randomise(structure, seed=0):
    """Square factors I + 0.3·randn (full, the upper triangle included), everything else 0.5 + U(0, 1) + 0.3·randn."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in structure.parameters():
            noise = torch.randn(t.shape, generator=gen, dtype=t.dtype)
            if t.dim() == 2 and t.shape[0] == t.shape[1] and torch.equal(t, torch.diag(t.diagonal())):
                t.copy_(torch.eye(t.shape[0], dtype=t.dtype) + 0.3 * noise)
            else:
                t.copy_(0.5 + torch.rand(t.shape, generator=gen, dtype=t.dtype) + 0.3 * noise)


def _problem(n, seed=3):
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(n, generator=gen, dtype=torch.float64)
    a = torch.randn(n, n, generator=gen, dtype=torch.float64)
    return g, a @ a.T / n - 0.2 * torch.eye(n, dtype=torch.float64)  # symmetric, slightly indefinite


@pytest.mark.parametrize("kind", NEW)
@pytest.mark.parametrize("scale", [1.0, 2.5])
def test_identity_init_applies_identity(kind, scale):
    """U = I at init; psd_ekfac and psd_sep_ekfac up to the reference's ε = 1e-12 (t = √s gives s + ε)."""
    model, structure = _make(kind, scale)
    ts = [
        torch.randn(p.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        for p in model.parameters()
    ]
    tol = 3e-12 if kind in WITH_EPS else 1e-15
    for t, u in zip(ts, structure.apply(ts), strict=True):
        torch.testing.assert_close(u, t, rtol=tol, atol=tol)
    M = _dense(kind, structure)
    torch.testing.assert_close(M, torch.eye(len(M), dtype=torch.float64), rtol=0, atol=tol)
    if kind in WITH_EPS:  # and not exactly I: the ε of raw² + ε is there
        assert not torch.equal(M, torch.eye(len(M), dtype=torch.float64))


@pytest.mark.parametrize("kind", NEW)
def test_apply_matches_dense_matrix(kind):
    model, structure = _make(kind)
    _randomise(structure)
    M = _dense(kind, structure)
    params = list(model.parameters())
    v = torch.randn(M.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(flatten(structure.apply(unflatten(v, params))), M @ v, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", sorted(PSD | {"sym_kfac"}))
def test_symmetric_and_psd_for_any_parameters(kind):
    """On every kernel, sym_kfac is symmetric and the PSD structures are symmetric PSD, whatever the (random, full)
    raw tensors. (The diagonal vectors of biases and norms are unconstrained, as in the reference.)"""
    _, structure = _make(kind)
    _randomise(structure, seed=11)
    kernels = [M for is_kernel, M in _block_matrices(kind, structure) if is_kernel]
    assert len(kernels) == 4
    low = []
    for M in kernels:
        torch.testing.assert_close(M, M.T, rtol=0, atol=1e-13)
        low.append(float(torch.linalg.eigvalsh(M).min()))
    if kind in PSD:
        assert min(low) > 0.0
    else:
        assert min(low) < 0.0  # sym_kfac may be indefinite


def _dense_j(kind, structure, values, g, G):
    """J(U) = −gᵀMg + ½(Mg)ᵀ(G + λI)(Mg) with M assembled from `values` (the structure's tensors, in order)."""
    oracle = structure.clone()
    oracle.blocks = [
        {k: values[[id(p) for p in structure.parameters()].index(id(t))] for k, t in blk.items()}
        for blk in structure.blocks
    ]
    return dense_objective(g, G, DAMPING, _dense(kind, oracle))


@pytest.mark.parametrize("kind", NEW)
@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_u_gradient_matches_dense_autograd_and_finite_differences(kind, scale):
    """T3: the surrogate U-gradient equals ∂J/∂(raw tensors) of the dense J, by autograd and by central differences."""
    model, structure = _make(kind, scale)
    _randomise(structure, seed=4)
    params = list(model.parameters())
    g, G = _problem(sum(p.numel() for p in params))
    A = G + DAMPING * torch.eye(len(g), dtype=torch.float64)
    for t in structure.parameters():
        t.requires_grad_(True)
    objective, grads = surrogate_gradient(structure, unflatten(g, params), lambda v: unflatten(A @ flatten(v), params))
    raw = [t.detach().clone().requires_grad_(True) for t in structure.parameters()]
    J = _dense_j(kind, structure, raw, g, G)
    expected = torch.autograd.grad(J, raw)
    torch.testing.assert_close(objective, J.detach(), rtol=1e-12, atol=1e-12)
    assert len(grads) == len(expected) == len(raw)
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-11)
    # central differences of the dense J along one random direction u_i per raw tensor, and along all of them at
    # once: (J(θ + h u) − J(θ − h u)) / 2h = ⟨∇J, u⟩ + O(h²), with O(1e-16/h) rounding
    h = 1e-5
    base = [t.detach() for t in raw]
    gen = torch.Generator().manual_seed(9)
    dirs = [torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in base]
    cases = [[u if k == i else torch.zeros_like(u) for k, u in enumerate(dirs)] for i in range(len(dirs))] + [dirs]
    for case in cases:
        plus = [b + h * u for b, u in zip(base, case, strict=True)]
        minus = [b - h * u for b, u in zip(base, case, strict=True)]
        fd = (_dense_j(kind, structure, plus, g, G) - _dense_j(kind, structure, minus, g, G)) / (2 * h)
        analytic = sum(float((got * u).sum()) for got, u in zip(grads, case, strict=True))
        assert abs(float(fd) - analytic) <= 1e-7 * (1.0 + abs(analytic)), (float(fd), analytic)


@pytest.mark.parametrize("kind", sorted(TRIANGULAR))
def test_merge_is_the_lower_triangle_of_the_ema(kind):
    """The reference's update_blocks: U ← tril(β·U + (1 − β)·V) on the factor matrices, plain EMA elsewhere."""
    _, u = _make(kind)
    _randomise(u, seed=5)
    _, v = _make(kind)
    _randomise(v, seed=6)
    before = [t.clone() for t in u.parameters()]
    u.ema_(v, 0.25)
    keys = TRIANGULAR[kind]
    for blk_u, blk_v in zip(u.blocks, v.blocks, strict=True):
        for k, t in blk_u.items():
            old = before[[id(p) for p in u.parameters()].index(id(t))]
            ema = 0.25 * old + 0.75 * blk_v[k]
            if k in keys and t.dim() == 2:
                torch.testing.assert_close(t, torch.tril(ema), rtol=1e-15, atol=1e-15)
                assert torch.count_nonzero(torch.triu(t, 1)) == 0 and torch.count_nonzero(torch.triu(ema, 1)) > 0
            else:
                torch.testing.assert_close(t, ema, rtol=1e-15, atol=1e-15)


@pytest.mark.parametrize("kind", ["psd_ekfac", "psd_sep_ekfac", "diag_kfac"])
def test_merge_is_the_plain_ema(kind):
    _, u = _make(kind)
    _randomise(u, seed=5)
    _, v = _make(kind)
    _randomise(v, seed=6)
    with torch.no_grad():
        v.parameters()[0].fill_(-2.0)  # below the diagonal clamp: the merge must keep it
    before = [t.clone() for t in u.parameters()]
    u.ema_(v, 0.25)
    u.clamp_(1e-8)  # a no-op: these structures have no clamp
    for t, old, new in zip(u.parameters(), before, v.parameters(), strict=True):
        torch.testing.assert_close(t, 0.25 * old + 0.75 * new, rtol=1e-15, atol=1e-15)
    assert bool((u.parameters()[0] < 0).all())


def test_memory_and_tensor_names():
    """Per kernel (m, n): psd_ekfac m² + n² + mn, psd_sep_ekfac m² + n² + m + n, diag_kfac m + n, the symmetric
    ones m² + n²; a vocabulary side is a vector of length V."""
    bias_like = 4 + 3 + 4 + 4 + 5
    kernels = {"emb": (5, 3, "m"), "fc": (3, 4, None), "conv": (8, 3, None), "head": (4, 5, "n")}

    def sq(k, ds, side):
        return k if ds == side else k * k

    expected = {
        "psd_ekfac": sum(sq(m, ds, "m") + sq(n, ds, "n") + m * n for m, n, ds in kernels.values()),
        "psd_sep_ekfac": sum(sq(m, ds, "m") + sq(n, ds, "n") + m + n for m, n, ds in kernels.values()),
        "diag_kfac": sum(m + n for m, n, _ in kernels.values()),
        "sym_kfac": sum(sq(m, ds, "m") + sq(n, ds, "n") for m, n, ds in kernels.values()),
        "psd_sym_kfac": sum(sq(m, ds, "m") + sq(n, ds, "n") for m, n, ds in kernels.values()),
    }
    names = {
        "psd_ekfac": {"Q_A", "Q_G", "t"},
        "psd_sep_ekfac": {"Q_A", "Q_G", "t_a", "t_b"},
        "diag_kfac": {"a", "b"},
        "sym_kfac": {"T_A", "T_B"},
        "psd_sym_kfac": {"L_A", "L_B"},
    }
    for kind in NEW:
        _, structure = _make(kind)
        assert structure.memory_bytes() == 8 * (expected[kind] + bias_like), kind
        kernel_blocks = [
            set(b) for b, lay in zip(structure.blocks, structure.layouts, strict=True) if lay.kind != "diagonal"
        ]
        assert all(b == names[kind] for b in kernel_blocks), kind
        assert structure.clip_groups() == [[i] for i in range(len(structure.parameters()))]


@pytest.mark.parametrize("kind", NEW)
def test_diagonal_parts_are_the_operators_diagonals(kind):
    """`llqr/u_*` summarise the effective factor diagonals: each kernel's M is (diag parts) ⊗ (diag parts)."""
    _, structure = _make(kind, scale=2.0)
    _randomise(structure, seed=8)
    parts = structure.diagonal_parts()
    i = 0
    for blk in structure.blocks:
        if "d" in blk:
            torch.testing.assert_close(parts[i], blk["d"].reshape(-1) / 2.0)
            i += 1
            continue
        block = {k: t.detach() for k, t in blk.items()}
        if kind in ("psd_ekfac",):  # one eigenbasis diagonal
            torch.testing.assert_close(parts[i], (block["t"] ** 2 + PSD_EPS).reshape(-1) / 2.0)
            i += 1
            continue
        left, right = {
            "psd_sep_ekfac": lambda b: (b["t_a"] ** 2 + PSD_EPS, b["t_b"] ** 2 + PSD_EPS),
            "diag_kfac": lambda b: (b["a"], b["b"]),
            "sym_kfac": lambda b: tuple(b[k].diagonal() if b[k].dim() == 2 else b[k] for k in ("T_A", "T_B")),
            "psd_sym_kfac": lambda b: tuple(
                (b[k] ** 2).sum(1) if b[k].dim() == 2 else b[k] ** 2 for k in ("L_A", "L_B")
            ),
        }[kind](block)
        torch.testing.assert_close(parts[i], left / 2.0)
        torch.testing.assert_close(parts[i + 1], right)
        i += 2
    assert i == len(parts)


@pytest.mark.parametrize("kind", NEW)
def test_state_round_trip_and_a_refresh_lowers_j(kind):
    """A refresh from the identity on a tiny net lowers J; its U survives state_dict / load_state_dict."""
    model = TanhNet((3, 4, 3), seed=1)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(6, 3, generator=gen, dtype=torch.float64)
    batch = {"x": x, "labels": torch.randint(0, 3, (6,), generator=gen)}
    config = LLQRConfig(structure=kind, inner_steps=10, inner_lr=0.05, ema_decay=0.0, damping=0.1)
    pre = LLQRPreconditioner(model, config)
    metrics = pre.update(model, batch, step=0)
    assert metrics["llqr/objective_end"] < metrics["llqr/objective_start"]
    fresh = LLQRPreconditioner(model, config)
    fresh.load_state_dict(pre.state_dict())
    for a, b in zip(pre.structure.parameters(), fresh.structure.parameters(), strict=True):
        assert torch.equal(a, b)


def test_unknown_structure_names_every_value():
    with pytest.raises(
        ValueError, match=r"LLQRConfig\.structure='sym-kfac'.*'sep_ekfac', 'psd_ekfac'.*'psd_sym_kfac'"
    ):
        _make("sym-kfac")
