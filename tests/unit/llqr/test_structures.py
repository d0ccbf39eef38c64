"""T3 and §6: structures of U against dense Kronecker matrices, layouts, clip groups, memory (float64)."""

import pytest
import torch
from torch import nn

from hf_llqrsam.llqr import DiagonalStructure, LLQRStateError, ScalarStructure
from hf_llqrsam.llqr.fit import surrogate_gradient
from hf_llqrsam.llqr.layout import clip_groups, fallback_names, from_matrix, tensor_layouts, to_matrix
from hf_llqrsam.llqr.registry import make_structure
from tests.oracles.dense_llqr import (
    block_diag,
    dense_objective,
    flatten,
    kernel_matrix,
    linear_weight_matrix,
    transpose_permutation,
    unflatten,
)

KRONECKER = ["kfac", "ekfac", "sep_ekfac"]
DAMPING = 0.3


class _Net(nn.Module):
    """Embedding (vocab side diagonal), a Linear, a Conv2d and an untied LM head (out = vocab)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(5, 3, dtype=torch.float64)
        self.fc = nn.Linear(3, 4, dtype=torch.float64)
        self.conv = nn.Conv2d(2, 3, 2, dtype=torch.float64)
        self.norm = nn.LayerNorm(4, dtype=torch.float64)
        self.head = nn.Linear(4, 5, dtype=torch.float64)


# name -> (kind of the oracle view, out, in) ; "X" = the tensor is X itself, "T" = X is the (flattened) transpose
_VIEWS = {
    "emb.weight": ("X", 5, 3),
    "fc.weight": ("T", 4, 3),
    "conv.weight": ("T", 3, 8),
    "head.weight": ("T", 5, 4),
}


def _dense_matrix(kind: str, structure, model) -> torch.Tensor:
    """M of the whole structure, assembled from the raw block tensors (independent of `Structure.apply`)."""
    mats = []
    scale = structure.scale
    for lay, blk in zip(structure.layouts, structure.blocks, strict=True):
        if "d" in blk:
            mats.append(torch.diag(blk["d"].reshape(-1)) / scale)
        elif "c" in blk:
            mats.append(blk["c"] * torch.eye(lay.numel, dtype=torch.float64) / scale)
        else:
            view, out_f, in_f = _VIEWS[lay.name]
            m = kernel_matrix(kind, blk) if view == "X" else linear_weight_matrix(kind, blk, out_f, in_f)
            mats.append(m / scale)
    return block_diag(mats)


def _randomise(structure, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in structure.parameters():
            noise = torch.randn(t.shape, generator=gen, dtype=t.dtype)
            if t.dim() == 2 and t.shape[0] == t.shape[1] and torch.equal(t, torch.eye(t.shape[0], dtype=t.dtype)):
                t.add_(0.3 * noise)  # Q = I + 0.3·randn
            else:
                t.copy_(0.5 + torch.rand(t.shape, generator=gen, dtype=t.dtype) + 0.3 * noise)


def _make(kind: str, model=None, scale: float = 1.0, mode: str = "module"):
    model = model or _Net()
    layouts = tensor_layouts(model)
    return model, make_structure(kind, layouts, clip_groups(layouts, mode), scale, dtype=torch.float64)


def test_layouts_follow_the_mapping_table():
    model = _Net()
    by_name = {lay.name: lay for lay in tensor_layouts(model)}
    assert by_name["emb.weight"].kind == "embedding" and by_name["emb.weight"].diag_side == "m"
    assert by_name["emb.weight"].matrix_shape == (5, 3)
    assert by_name["fc.weight"].kind == "out_in" and by_name["fc.weight"].matrix_shape == (3, 4)
    assert by_name["fc.weight"].diag_side is None
    assert by_name["conv.weight"].kind == "out_in" and by_name["conv.weight"].matrix_shape == (8, 3)
    assert by_name["head.weight"].diag_side == "n"  # untied LM head: out_features == vocab
    for name in ("fc.bias", "conv.bias", "norm.weight", "norm.bias", "head.bias"):
        assert by_name[name].kind == "diagonal"
    # X views round-trip; Linear X = Wᵀ, Conv X = W.view(cout, -1)ᵀ
    w = model.conv.weight.detach()
    x = to_matrix(by_name["conv.weight"], w)
    torch.testing.assert_close(x, w.reshape(3, -1).T)
    torch.testing.assert_close(from_matrix(by_name["conv.weight"], x), w)


def test_layouts_conv1d_position_embeddings_fallback_and_frozen():
    class Conv1D(nn.Module):  # HF GPT-2 style: weight (in, out)
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(3, 7))
            self.bias = nn.Parameter(torch.zeros(7))

    class Embeddings(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.cls_token = nn.Parameter(torch.zeros(1, 1, 4))
            self.position_embeddings = nn.Parameter(torch.zeros(1, 5, 4))
            self.odd = nn.Parameter(torch.zeros(2, 3, 4))
            self.frozen = nn.Parameter(torch.zeros(4, 4), requires_grad=False)
            self.proj = nn.Linear(4, 4)

    model = nn.ModuleDict({"c": Conv1D(), "e": Embeddings()})
    layouts = tensor_layouts(model)
    by_name = {lay.name: lay for lay in layouts}
    assert by_name["c.weight"].kind == "in_out" and by_name["c.weight"].matrix_shape == (3, 7)
    assert by_name["e.position_embeddings"].kind == "matrix"
    assert by_name["e.position_embeddings"].matrix_shape == (5, 4)
    assert by_name["e.cls_token"].kind == "diagonal"
    assert by_name["e.odd"].kind == "diagonal"
    assert "e.frozen" not in by_name
    assert fallback_names(layouts) == ["e.odd"]
    groups = clip_groups(layouts, "module")
    names = [[layouts[i].name for i in g] for g in groups]
    assert ["c.weight", "c.bias"] in names and ["e.proj.weight", "e.proj.bias"] in names
    assert ["e.cls_token", "e.position_embeddings", "e.odd"] in names
    assert clip_groups(layouts, "tensor") == [[i] for i in range(len(layouts))]


@pytest.mark.parametrize("kind", ["diagonal", "scalar", *KRONECKER])
@pytest.mark.parametrize("scale", [1.0, 2.5])
def test_identity_init_applies_identity(kind, scale):
    model, structure = _make(kind, scale=scale)
    gen = torch.Generator().manual_seed(1)
    ts = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in model.parameters()]
    for t, u in zip(ts, structure.apply(ts), strict=True):
        torch.testing.assert_close(u, t, rtol=1e-15, atol=1e-15)


@pytest.mark.parametrize("kind", KRONECKER)
def test_apply_matches_dense_kronecker_matrix(kind):
    model, structure = _make(kind)
    _randomise(structure)
    M = _dense_matrix(kind, structure, model)
    params = list(model.parameters())
    v = torch.randn(M.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    got = flatten(structure.apply(unflatten(v, params)))
    torch.testing.assert_close(got, M @ v, rtol=1e-12, atol=1e-12)


def _random_problem(n: int, seed: int = 3):
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(n, generator=gen, dtype=torch.float64)
    a = torch.randn(n, n, generator=gen, dtype=torch.float64)
    G = a @ a.T / n - 0.2 * torch.eye(n, dtype=torch.float64)  # symmetric, slightly indefinite (Newton-like)
    return g, G


def _surrogate(structure, g, G, params):
    for t in structure.parameters():
        t.requires_grad_(True)
    A = G + DAMPING * torch.eye(len(g), dtype=torch.float64)
    return surrogate_gradient(structure, unflatten(g, params), lambda v: unflatten(A @ flatten(v), params))


@pytest.mark.parametrize("kind", KRONECKER + ["scalar"])
@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_u_gradient_matches_autograd_of_dense_objective(kind, scale):
    """T3: the surrogate gradient equals ∂/∂factors of J = −gᵀMg + ½(Mg)ᵀ(G + λI)(Mg) with M dense."""
    model, structure = _make(kind, scale=scale)
    _randomise(structure, seed=4)
    params = list(model.parameters())
    g, G = _random_problem(sum(p.numel() for p in params))
    objective, grads = _surrogate(structure, g, G, params)

    oracle = structure.clone(requires_grad=True)  # same raw tensors, differentiated through the dense M
    M = _dense_matrix(kind, oracle, model)
    J = dense_objective(g, G, DAMPING, M)
    expected = torch.autograd.grad(J, oracle.parameters())
    torch.testing.assert_close(objective, J.detach(), rtol=1e-12, atol=1e-12)
    assert len(grads) == len(expected)
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_diagonal_u_gradient_closed_form():
    """T3: ∂J/∂d = −g ⊙ (g − (G + λI)(d ⊙ g))."""
    model, structure = _make("diagonal")
    _randomise(structure, seed=5)
    params = list(model.parameters())
    g, G = _random_problem(sum(p.numel() for p in params), seed=6)
    _, grads = _surrogate(structure, g, G, params)
    d = flatten([b["d"] for b in structure.blocks]).detach()
    expected = -g * (g - (G + DAMPING * torch.eye(len(g), dtype=torch.float64)) @ (d * g))
    torch.testing.assert_close(flatten(grads), expected, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("scale", [1.0, 2.5])
def test_diagonal_fused_apply_matches_the_per_block_loop(scale):
    """The one-kernel `apply` of the diagonal structure equals `apply_block` per tensor, values and U-gradients."""
    model, structure = _make("diagonal", scale=scale)
    _randomise(structure, seed=7)
    gen = torch.Generator().manual_seed(8)
    ts = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in model.parameters()]
    for t in structure.parameters():
        t.requires_grad_(True)
    fused = structure.apply(ts)
    loop = [structure.apply_block(i, t) for i, t in enumerate(ts)]
    weights = [torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in ts]
    grads_fused = torch.autograd.grad(
        sum((w * f).sum() for w, f in zip(weights, fused, strict=True)), structure.parameters()
    )
    grads_loop = torch.autograd.grad(
        sum((w * f).sum() for w, f in zip(weights, loop, strict=True)), structure.parameters()
    )
    for a, b in zip([*fused, *grads_fused], [*loop, *grads_loop], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-15, atol=0)
    mixed = structure.apply([t.float() for t in ts])  # another dtype: the per-block path, promoted
    for a, b in zip(mixed, loop, strict=True):
        assert a.dtype == torch.float64
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_scalar_shares_one_value_per_module_group():
    model, structure = _make("scalar")
    assert isinstance(structure, ScalarStructure)
    assert len(structure.parameters()) == 5  # emb, fc, conv, norm, head
    assert structure.blocks[1]["c"] is structure.blocks[2]["c"]  # fc.weight and fc.bias
    _, per_tensor = _make("scalar", mode="tensor")
    assert len(per_tensor.parameters()) == len(list(model.parameters()))


def test_memory_accounting():
    model, diag = _make("diagonal")
    n_theta = sum(p.numel() for p in model.parameters())
    assert diag.memory_bytes() == 8 * n_theta
    bias_like = 4 + 3 + 4 + 4 + 5  # fc.bias, conv.bias, norm.weight, norm.bias, head.bias
    kernels = {"emb": (5, 3, "m"), "fc": (3, 4, None), "conv": (8, 3, None), "head": (4, 5, "n")}

    def factor(k, diag_side, side):
        return k if diag_side == side else k * k

    kfac = sum(factor(m, ds, "m") + factor(n, ds, "n") for m, n, ds in kernels.values())
    assert _make("kfac")[1].memory_bytes() == 8 * (kfac + bias_like)
    ekfac = sum(factor(m, ds, "m") + factor(n, ds, "n") + m * n for m, n, ds in kernels.values())
    assert _make("ekfac")[1].memory_bytes() == 8 * (ekfac + bias_like)
    sep = sum(factor(m, ds, "m") + factor(n, ds, "n") + m + n for m, n, ds in kernels.values())
    assert _make("sep_ekfac")[1].memory_bytes() == 8 * (sep + bias_like)
    assert _make("scalar")[1].memory_bytes() == 8 * 5


@pytest.mark.parametrize("kind", ["diagonal", *KRONECKER])
def test_kronecker_clip_groups_are_single_tensors(kind):
    _, structure = _make(kind)
    groups = structure.clip_groups()
    if kind == "diagonal":
        assert sorted(i for g in groups for i in g) == list(range(len(structure.parameters())))
        assert any(len(g) == 2 for g in groups)  # weight + bias of a module
    else:
        assert groups == [[i] for i in range(len(structure.parameters()))]


def test_ema_clamp_and_clone_are_independent():
    _, u = _make("diagonal")
    v = u.clone()
    for t in v.parameters():
        t.fill_(-3.0)
    assert all(torch.equal(t, torch.ones_like(t)) for t in u.parameters())  # clone does not alias
    u.ema_(v, 0.25)
    assert all(torch.allclose(t, torch.full_like(t, 0.25 - 0.75 * 3.0)) for t in u.parameters())
    u.clamp_(1e-8)
    assert all(torch.equal(t, torch.full_like(t, 1e-8)) for t in u.parameters())
    _, k = _make("kfac")
    w = k.clone()
    for t in w.parameters():
        t.fill_(-1.0)
    k.ema_(w, 0.0)
    k.clamp_(1e-8)  # no-op for Kronecker structures
    assert all(torch.equal(t, torch.full_like(t, -1.0)) for t in k.parameters())
    assert isinstance(_make("diagonal")[1], DiagonalStructure)


def test_state_dict_round_trip_and_mismatch():
    _, a = _make("ekfac")
    _randomise(a, seed=7)
    _, b = _make("ekfac")
    b.load_state_dict(a.state_dict())
    for x, y in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(x, y)
    bad = a.state_dict()
    bad.pop("fc.bias")
    with pytest.raises(ValueError, match="does not match"):
        b.load_state_dict(bad)
    bad = a.state_dict()
    bad["fc.weight"]["s"] = torch.zeros(2, 2)
    with pytest.raises(ValueError, match="shape"):
        b.load_state_dict(bad)


def _loaded_equals(structure, values) -> bool:
    return all(torch.equal(t, v) for t, v in zip(structure.parameters(), values, strict=True))


@pytest.mark.parametrize("kind", ["diagonal", "scalar", "kfac", "ekfac", "sep_ekfac"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_load_rejects_nonfinite_entries_and_copies_nothing(kind, bad):
    """Any NaN/±Inf entry is refused, even with inversion allowed, naming the key; U stays as it was."""
    _, saved = _make(kind)
    _randomise(saved, seed=3)
    state = saved.state_dict()
    last = list(state)[-1]
    tensor = next(iter(state[last]))
    state[last][tensor].view(-1)[0] = bad  # the last block: every earlier block passed its checks first
    _, target = _make(kind)
    before = [t.clone() for t in target.parameters()]
    for min_value in (None, 1e-8):
        with pytest.raises(LLQRStateError, match="non-finite") as err:
            target.load_state_dict(state, min_value=min_value, source="/ckpt/llqrsam_state.pt")
        msg = str(err.value)
        assert f"blocks[{last!r}][{tensor!r}]" in msg and "/ckpt/llqrsam_state.pt" in msg
        assert "restart with U = I" in msg and "earlier checkpoint" in msg
        assert _loaded_equals(target, before)


@pytest.mark.parametrize("kind", ["diagonal", "scalar"])
def test_load_rejects_entries_below_min_diag_unless_inversion_allowed(kind):
    _, saved = _make(kind)
    _, target = _make(kind)
    identity = [t.clone() for t in target.parameters()]
    for value in (0.0, -0.5, 1e-9):
        state = saved.state_dict()
        state["fc.bias"][next(iter(state["fc.bias"]))].fill_(value)  # for scalar: the fc group's c, in both blocks
        if kind == "scalar":
            state["fc.weight"]["c"].fill_(value)
        with pytest.raises(LLQRStateError, match=r"below LLQRConfig\.min_diag=1e-08") as err:
            target.load_state_dict(state, min_value=1e-8)
        first = "fc.weight" if kind == "scalar" else "fc.bias"  # scalar: the shared c, met first in fc.weight
        assert f"blocks[{first!r}]" in str(err.value) and "LLQRConfig.allow_inversion" in str(err.value)
        assert _loaded_equals(target, identity)
        target.load_state_dict(state, min_value=None)  # llqr_allow_inversion: any finite value
        assert any(bool((t == value).any()) for t in target.parameters())
        target.load_state_dict(saved.state_dict())
    # Kronecker structures have no clamp: a negative entry loads with the clamp on
    _, k_saved = _make("kfac")
    state = k_saved.state_dict()
    state["fc.weight"]["A"].fill_(-1.0)
    _, k = _make("kfac")
    k.load_state_dict(state, min_value=1e-8)
    assert torch.equal(k.blocks[[lay.name for lay in k.layouts].index("fc.weight")]["A"], state["fc.weight"]["A"])


def test_load_rejects_tensors_that_cannot_be_cast_and_casts_floats():
    _, saved = _make("diagonal")
    _randomise(saved, seed=1)
    _, target = _make("diagonal")
    for value, match in (
        (torch.ones(4, dtype=torch.long), "dtype torch.int64"),
        (torch.ones(4, dtype=torch.complex64), "dtype torch.complex64"),
        (torch.ones(4, dtype=torch.bool), "dtype torch.bool"),
        ([1.0, 1.0, 1.0, 1.0], "is a list, not a tensor"),
        (torch.ones(5, dtype=torch.float64), r"shape \(5,\), expected \(4,\)"),
    ):
        state = saved.state_dict()
        state["fc.bias"]["d"] = value
        with pytest.raises(LLQRStateError, match=match) as err:
            target.load_state_dict(state)
        assert "blocks['fc.bias']['d']" in str(err.value)
    state = saved.state_dict()
    with pytest.raises(LLQRStateError, match="has tensors"):
        target.load_state_dict({**state, "fc.bias": {"c": torch.ones(())}})
    state = {n: {k: t.float() for k, t in blk.items()} for n, blk in saved.state_dict().items()}
    target.load_state_dict(state)  # fp32 into fp64 U: cast
    assert _loaded_equals(target, [t.double() for t in (state[lay.name]["d"] for lay in target.layouts)])


def test_scalar_load_rejects_different_values_for_one_shared_group_value():
    """Module clip groups share one c per module: per-tensor values (another llqr_clip_groups) are refused."""
    _, per_tensor = _make("scalar", mode="tensor")
    with torch.no_grad():
        for i, t in enumerate(per_tensor.parameters()):
            t.fill_(1.0 + i)
    _, per_module = _make("scalar", mode="module")
    before = [t.clone() for t in per_module.parameters()]
    with pytest.raises(LLQRStateError, match=r"LLQRConfig\.clip_groups") as err:
        per_module.load_state_dict(per_tensor.state_dict())
    assert "blocks['fc.bias']['c'] differs from blocks['fc.weight']['c']" in str(err.value)
    assert _loaded_equals(per_module, before)
    _, same = _make("scalar", mode="tensor")
    same.load_state_dict(per_tensor.state_dict())
    assert _loaded_equals(same, list(per_tensor.parameters()))


def test_transpose_permutation_oracle():
    w = torch.arange(6.0, dtype=torch.float64).view(2, 3)
    torch.testing.assert_close(transpose_permutation(2, 3) @ w.reshape(-1), w.T.reshape(-1))
