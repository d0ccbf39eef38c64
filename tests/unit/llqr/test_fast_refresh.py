"""Issue 20: the cheaper refresh gives the same U as the old route, bit for bit, with the old route as the oracle.

* the diagonal U-gradient in closed form ([`diagonal_surrogate_gradient`]) against the autograd
  [`surrogate_gradient`] it replaces for `diagonal` U;
* a whole refresh (inner loop, EMA, clamp, metrics) with the closed form against one forced onto autograd, on a tiny
  ViT and a tiny Marian (float32), with the momentum and CG solvers, identity scaling 1 and 2;
* the clip fed the sanitising pass's norms against the clip computing its own;
* the GGN product with its in-place F multiply against the out-of-place formula it replaced.
"""

import pytest
import torch

from hf_llqrsam.llqr import DiagonalStructure, LLQRConfig, LLQRPreconditioner
from hf_llqrsam.llqr import fit as llqr_fit
from hf_llqrsam.llqr.curvature import _Piece, curvature_context, logits_and_targets
from hf_llqrsam.llqr.fit import clip_by_groups_, diagonal_surrogate_gradient, group_index, surrogate_gradient
from hf_llqrsam.llqr.layout import clip_groups, tensor_layouts, trainable_parameters
from tests.oracles.dense_llqr import TanhNet
from tests.unit.llqr.test_hf_smoke import marian_batch, tiny_marian, tiny_vit, vit_batch


def _problem(dtype: torch.dtype, seed: int = 0):
    model = TanhNet((3, 5, 4), seed=seed, dtype=dtype)
    layouts = tensor_layouts(model)
    gen = torch.Generator().manual_seed(seed)
    g = [torch.randn(lay.shape, generator=gen, dtype=dtype) for lay in layouts]
    probe = [torch.randn(lay.shape, generator=gen, dtype=dtype) for lay in layouts]
    mats = [torch.randn(t.numel(), t.numel(), generator=gen, dtype=dtype) for t in g]
    gv = lambda v: [(m @ m.T @ x.reshape(-1)).reshape(x.shape) for m, x in zip(mats, v, strict=True)]  # noqa: E731
    return layouts, g, probe, gv


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scale", [1.0, 2.5])
@pytest.mark.parametrize("with_probe", [False, True])
@pytest.mark.parametrize("objective", [True, False])
def test_closed_form_diagonal_gradient_equals_autograd_bitwise(dtype, scale, with_probe, objective):
    layouts, g, probe, gv = _problem(dtype)
    u = DiagonalStructure(layouts, clip_groups(layouts, "module"), scale, dtype)
    gen = torch.Generator().manual_seed(9)
    for blk in u.blocks:
        blk["d"].copy_(scale * (0.5 + torch.rand(blk["d"].shape, generator=gen, dtype=dtype)))
    for p in u.parameters():
        p.requires_grad_(True)
    x = probe if with_probe else None
    value_ref, grads_ref = surrogate_gradient(u, g, gv, x, objective=objective)
    value, grads = diagonal_surrogate_gradient(u, g, gv, x, objective=objective)
    assert torch.equal(value, value_ref) or (torch.isnan(value) and torch.isnan(value_ref) and not objective)
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_ref, strict=True))
    assert llqr_fit.gradient_route(u, g, x) is diagonal_surrogate_gradient
    assert llqr_fit.gradient_route(u, [t.double() if dtype == torch.float32 else t.float() for t in g]) is (
        surrogate_gradient
    )


def _refresh(model, batch, config: LLQRConfig, steps: int = 2) -> tuple[list[torch.Tensor], list[dict]]:
    pre = LLQRPreconditioner(model, config)
    metrics = [pre.update(model, batch, step=k) for k in range(steps)]
    for m in metrics:
        m.pop("llqr/update_seconds")
    return [t.clone() for t in pre.structure.parameters()], metrics


@pytest.mark.parametrize("solver", ["momentum", "cg"])
@pytest.mark.parametrize("scale", [1.0, 2.0])
@pytest.mark.parametrize("name", ["vit", "marian"])
def test_refresh_equals_the_autograd_route_bitwise(monkeypatch, name, scale, solver):
    model, batch = (tiny_vit(), vit_batch(8)) if name == "vit" else (tiny_marian(), marian_batch())
    config = LLQRConfig(inner_steps=4 if solver == "cg" else 6, inner_lr=0.05, identity_scaling=scale,
                        inner_solver=solver)  # fmt: skip
    fast_u, fast_metrics = _refresh(model, batch, config)
    with monkeypatch.context() as patch:
        patch.setattr(llqr_fit, "gradient_route", lambda *args: surrogate_gradient)
        old_u, old_metrics = _refresh(model, batch, config)
    assert any(not torch.equal(t, torch.full_like(t, scale)) for t in fast_u)  # U moved: the test can fail
    assert all(torch.equal(a, b) for a, b in zip(fast_u, old_u, strict=True))
    assert fast_metrics == old_metrics


def test_clip_fed_the_sanitising_norms_equals_the_clip_alone():
    gen = torch.Generator().manual_seed(3)
    grads = [torch.randn(n, generator=gen) * s for n, s in ((5, 4.0), (3, 0.1), (7, 9.0))]
    group_of = group_index([[0, 1], [2]])
    alone = [t.clone() for t in grads]
    fed = [t.clone() for t in grads]
    replaced, norms = llqr_fit._sanitize_(fed)
    assert int(replaced) == 0 and norms is not None
    ref = clip_by_groups_(alone, group_of, 2.0)
    got = clip_by_groups_(fed, group_of, 2.0, norms=norms)
    assert all(torch.equal(a, b) for a, b in zip(ref, got, strict=True)) and bool(got[1])
    assert all(torch.equal(a, b) for a, b in zip(alone, fed, strict=True))
    bad = [torch.tensor([1.0, float("nan")]), torch.tensor([float("inf")])]
    replaced, norms = llqr_fit._sanitize_(bad)
    assert int(replaced) == 2 and norms is None  # replaced entries: the clip computes fresh norms


def test_ggn_product_in_place_equals_the_out_of_place_formula():
    """The old `product`: u = m ⊙ p ⊙ (Jv − (p ⊙ Jv)·1), then Jᵀu; on a Marian with masked rows."""
    model = tiny_marian()
    batch = marian_batch()
    batch["labels"][0, :3] = -100
    params = [p for _, p in trainable_parameters(model)]
    with curvature_context(model):
        piece = _Piece(model, batch, params, logits_and_targets, False, 0.0, False, None, products=True)
    gen = torch.Generator().manual_seed(5)
    v = [torch.randn(p.shape, generator=gen) for p in params]
    (jv,) = torch.autograd.grad(
        [t for _, t in piece._jt], piece.w0, grad_outputs=[v[i] for i, _ in piece._jt], retain_graph=True
    )
    u = piece.p_counted * (jv - (piece.p * jv).sum(dim=-1, keepdim=True))
    got = torch.autograd.grad(piece.logits, params, grad_outputs=u, retain_graph=True, allow_unused=True)
    expected = [torch.zeros_like(p) if t is None else t for p, t in zip(params, got, strict=True)]
    out = piece.product(v)
    assert any(t.abs().max() > 0 for t in out)
    assert all(torch.equal(a, b) for a, b in zip(out, expected, strict=True))
