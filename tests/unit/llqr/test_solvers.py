"""§5.2: every `llqr_inner_solver` against a dense, flat-vector oracle of the reference's solver (golden-style: U after
one refresh on a fixed tiny net, float64), and the CG details (β, line search, no clip)."""

import math

import pytest
import torch

from hf_llqrsam.llqr import LLQRConfig, LLQRPreconditioner
from hf_llqrsam.llqr.fit import fit_structure
from hf_llqrsam.llqr.layout import clip_groups, tensor_layouts
from hf_llqrsam.llqr.registry import make_structure
from hf_llqrsam.llqr.solvers import make_optimizer
from tests.oracles.dense_llqr import (
    TanhNet,
    block_diag,
    dense_curvature,
    dense_objective,
    flatten,
    linear_weight_matrix,
    unflatten,
)
from tests.oracles.dense_solvers import backtracking_pr_cg, gradient_solver

DAMPING = 0.1
BETA = 0.4  # EMA decay of the merge


def _net_and_batch():
    model = TanhNet((3, 4, 3), seed=3)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(7, 3, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (7,), generator=gen)
    return model, x, y


def _oracle_objective(kind, model, g, G, template):
    """(value_and_grad of the dense J(g, G) over the flat structure parameters, clip groups as flat index lists).

    `template` (an identity structure) gives only the order, shapes and names of the raw tensors; the operator is
    assembled from them by the dense formulas of `tests/oracles/dense_llqr.py`.
    """
    shapes = [t.shape for t in template.parameters()]
    ids = [id(t) for t in template.parameters()]
    names = [lay.name for lay in template.layouts]
    sizes = dict(model.named_parameters())

    def matrix(flat):
        raw = unflatten(flat, [torch.empty(s) for s in shapes])
        mats = []
        for name, blk in zip(names, template.blocks, strict=True):
            block = {k: raw[ids.index(id(t))] for k, t in blk.items()}
            if "d" in block:
                mats.append(torch.diag(block["d"].reshape(-1)))
            else:
                out_f, in_f = sizes[name].shape
                mats.append(linear_weight_matrix(kind, block, out_f, in_f))
        return block_diag(mats)

    def value_and_grad(flat):
        leaf = flat.detach().clone().requires_grad_(True)
        J = dense_objective(g, G, DAMPING, matrix(leaf))
        (grad,) = torch.autograd.grad(J, leaf)
        return J.detach(), grad

    offsets = [0]
    for s in shapes:
        offsets.append(offsets[-1] + math.prod(s))
    # diagonal: one group per Linear, weight and bias together (`llqr_clip_groups="module"`); Kronecker: per tensor
    pairs = [[0, 1], [2, 3]] if kind == "diagonal" else [[i] for i in range(len(shapes))]
    groups = [[j for i in pair for j in range(offsets[i], offsets[i + 1])] for pair in pairs]
    return value_and_grad, groups


CASES = [
    # (structure, solver, lr, clip)
    ("diagonal", "momentum", 0.2, 0.05),
    ("diagonal", "sgd", 0.5, 0.05),
    ("diagonal", "adam", 0.05, 0.05),
    ("diagonal", "cg", None, None),
    ("sep_ekfac", "momentum", 0.2, 0.05),
    ("sep_ekfac", "adam", 0.05, 0.05),
    ("psd_ekfac", "sgd", 0.5, 0.05),
    ("psd_ekfac", "cg", None, None),
    ("sym_kfac", "cg", None, None),
]


@pytest.mark.parametrize(("kind", "solver", "lr", "clip"), CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_u_after_one_refresh_equals_the_dense_oracle(kind, solver, lr, clip):
    """U = β·I + (1 − β)·V_T after one refresh from the identity, V_T from the oracle's T steps (the clamp of the
    diagonal structure never acts here)."""
    model, x, y = _net_and_batch()
    steps = 25
    config = LLQRConfig(
        structure=kind,
        inner_solver=solver,
        inner_steps=steps,
        inner_lr=lr or 1e-3,
        clip_norm=clip or 5.0,
        ema_decay=BETA,
        damping=DAMPING,
    )
    pre = LLQRPreconditioner(model, config)
    template = make_structure(kind, pre.structure.layouts, pre.structure.groups, dtype=torch.float64)
    metrics = pre.update(model, {"x": x, "labels": y}, step=0)

    value_and_grad, groups = _oracle_objective(kind, model, *dense_curvature(model, x, y, "ngd"), template)
    x0 = flatten(template.parameters())
    if solver == "cg":
        v_t = backtracking_pr_cg(x0, value_and_grad, steps)
    else:
        v_t = gradient_solver(solver, x0, value_and_grad, steps, lr, groups, clip)
    expected = _merge(kind, template, x0, v_t)
    got = flatten(pre.structure.parameters())
    assert float((expected - x0).abs().max()) > 1e-2  # U moved
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    if solver == "cg":
        assert metrics["llqr/clip_fraction"] == 0.0  # no clip in the reference's CG
    else:  # the clip was active on some inner steps, not on all
        assert 0.0 < metrics["llqr/clip_fraction"] <= 1.0
    j_start, j_end = value_and_grad(x0)[0], value_and_grad(v_t)[0]
    assert math.isclose(metrics["llqr/objective_start"], float(j_start), rel_tol=1e-12)
    assert metrics["llqr/objective_end"] < metrics["llqr/objective_start"]
    assert float(j_end) < float(j_start)


def _merge(kind, template, x0, v_t):
    """The reference's update_blocks: β·U + (1 − β)·V, then tril of the 2-D factors for the triangular structures."""
    merged = BETA * x0 + (1 - BETA) * v_t
    if kind not in ("sym_kfac", "psd_sym_kfac"):
        return merged
    tensors = unflatten(merged.clone(), template.parameters())
    keys = {id(t) for blk in template.blocks for k, t in blk.items() if k in ("T_A", "T_B", "L_A", "L_B")}
    return flatten(
        [
            torch.tril(t) if id(p) in keys and t.dim() == 2 else t
            for p, t in zip(template.parameters(), tensors, strict=True)
        ]
    )


def _stiff_problem(n):
    """g and G with a wide spectrum (1e-2 … 1e1), where the line search backtracks and PR+ β is not always 0."""
    gen = torch.Generator().manual_seed(12)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    G = q @ torch.diag(torch.logspace(-2, 1, n, dtype=torch.float64)) @ q.T
    return 2.0 * torch.randn(n, generator=gen, dtype=torch.float64), G


def _problem_fit(kind, beta):
    model, _, _ = _net_and_batch()
    layouts = tensor_layouts(model)
    structure = make_structure(kind, layouts, clip_groups(layouts, "module"), dtype=torch.float64)
    g, G = _stiff_problem(sum(p.numel() for p in model.parameters()))
    A = G + DAMPING * torch.eye(len(g), dtype=torch.float64)
    params = list(model.parameters())
    gv = lambda v: unflatten(A @ flatten(v), params)  # noqa: E731
    stats = fit_structure(
        structure, unflatten(g, params), gv, steps=25, lr=1.0, momentum=0.0, clip_norm=1e-9, solver="cg", cg_beta=beta
    )
    return structure, stats


def test_cg_polak_ribiere_variant_equals_its_oracle_and_differs_from_the_reference():
    """`cg_beta="polak_ribiere"` keeps ∇ at the iterate as ∇_prev: a textbook PR+ β, which is not always 0."""
    kind = "psd_ekfac"
    model, _, _ = _net_and_batch()
    pr, _ = _problem_fit(kind, "polak_ribiere")
    ref, _ = _problem_fit(kind, "reference")
    template = make_structure(kind, pr.layouts, pr.groups, dtype=torch.float64)
    value_and_grad, _ = _oracle_objective(kind, model, *_stiff_problem(len(flatten(model.parameters()))), template)
    x0 = flatten(template.parameters())
    torch.testing.assert_close(
        flatten(pr.parameters()), backtracking_pr_cg(x0, value_and_grad, 25, textbook=True), rtol=1e-10, atol=1e-12
    )
    assert float((flatten(pr.parameters()) - flatten(ref.parameters())).abs().max()) > 1e-6


def test_reference_cg_is_steepest_descent_with_armijo_backtracking():
    """With the reference's ∇_prev (the gradient at the new iterate) β = 0 at every step: the same U as plain
    steepest descent with the same line search; and clip_norm = 1e-9 changes nothing (CG does not clip)."""
    kind = "diagonal"
    model, _, _ = _net_and_batch()
    got, stats = _problem_fit(kind, "reference")
    template = make_structure(kind, got.layouts, got.groups, dtype=torch.float64)
    value_and_grad, _ = _oracle_objective(kind, model, *_stiff_problem(len(flatten(model.parameters()))), template)
    x_k = flatten(template.parameters())
    lr_prev, etas = 1.0, []
    for _ in range(25):  # hand-written steepest descent + optax backtracking
        f, grad = value_and_grad(x_k)
        p, slope, eta = -grad, -float(grad @ grad), min(1.5 * lr_prev, 1.0)
        for i in range(21):
            eta = eta if i == 0 else 0.8 * eta
            if float(value_and_grad(x_k + eta * p)[0]) - float(f) - eta * 1e-4 * slope <= 0:
                break
        x_k, lr_prev = x_k + eta * p, eta
        etas.append(eta)
    assert max(etas) < 1.0 and any(b > a for a, b in zip(etas[:-1], etas[1:], strict=True))  # backtracked; grew
    torch.testing.assert_close(flatten(got.parameters()), x_k, rtol=1e-10, atol=1e-12)
    assert stats.clip_fraction == 0.0 and stats.objective_end < stats.objective_start


def test_cg_zero_steps_and_a_nonfinite_start():
    model, x, y = _net_and_batch()
    layouts = tensor_layouts(model)
    structure = make_structure("diagonal", layouts, clip_groups(layouts, "module"), dtype=torch.float64)
    g = [torch.ones_like(p) for p in model.parameters()]
    stats = fit_structure(structure, g, lambda v: v, steps=0, lr=1.0, momentum=0.0, clip_norm=1.0, solver="cg")
    assert math.isnan(stats.objective_start)
    assert all(torch.equal(t, torch.ones_like(t)) for t in structure.parameters())
    bad = lambda v: [torch.full_like(t, float("nan")) for t in v]  # noqa: E731
    stats = fit_structure(
        structure, g, bad, steps=3, lr=1.0, momentum=0.0, clip_norm=1.0, solver="cg", stop_if_nonfinite=True
    )
    assert stats.stopped and all(torch.equal(t, torch.ones_like(t)) for t in structure.parameters())
    # without the stop, every trial is NaN: the line search takes the zero step and V stays put
    stats = fit_structure(structure, g, bad, steps=3, lr=1.0, momentum=0.0, clip_norm=1.0, solver="cg")
    assert not stats.stopped and all(torch.equal(t, torch.ones_like(t)) for t in structure.parameters())
    assert not any(t.requires_grad for t in structure.parameters())


def test_gradient_solvers_are_fresh_torch_optimizers_with_optax_defaults():
    p = [torch.zeros(2, requires_grad=True)]
    adam = make_optimizer("adam", p, 0.1, 0.9)
    assert isinstance(adam, torch.optim.Adam)
    assert adam.defaults["betas"] == (0.9, 0.999) and adam.defaults["eps"] == 1e-8
    sgd = make_optimizer("sgd", p, 0.1, 0.9)
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["momentum"] == 0.0
    mom = make_optimizer("momentum", p, 0.1, 0.7)
    assert mom.defaults["momentum"] == 0.7 and mom.defaults["dampening"] == 0.0 and not mom.defaults["nesterov"]
    with pytest.raises(ValueError, match="LLQRConfig.inner_solver='cg'"):
        make_optimizer("cg", p, 0.1, 0.9)


def test_default_solver_is_todays_momentum_loop():
    """The defaults (momentum, constant schedules, fixed E) give bit-for-bit the SGD-momentum refresh of before."""
    model, x, y = _net_and_batch()
    batch = {"x": x, "labels": y}
    pre = LLQRPreconditioner(model, LLQRConfig(inner_steps=5, inner_lr=0.3, ema_decay=0.5))
    pre.update(model, batch, step=0)
    layouts = tensor_layouts(model)
    v = make_structure("diagonal", layouts, clip_groups(layouts, "module"), dtype=torch.float64)
    from hf_llqrsam.llqr import curvature_problem

    g_dict, gv_dict = curvature_problem(model, batch, LLQRConfig(divergence="ngd"))
    names = list(g_dict)
    params = v.parameters()
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.SGD(params, lr=0.3, momentum=0.9, dampening=0.0, nesterov=False, foreach=True)
    from hf_llqrsam.llqr.fit import clip_by_groups_, group_index, sanitize_, surrogate_gradient

    group_of = group_index(v.clip_groups())
    for _ in range(5):
        _, grads = surrogate_gradient(
            v, list(g_dict.values()), lambda t: list(gv_dict(dict(zip(names, t, strict=True))).values())
        )
        sanitize_(grads)
        clip_by_groups_(grads, group_of, 5.0)
        for p, gr in zip(params, grads, strict=True):
            p.grad = gr
        opt.step()
    expected = [0.5 + 0.5 * t.detach() for t in params]
    for a, b in zip(pre.structure.parameters(), expected, strict=True):
        assert torch.equal(a, b)
