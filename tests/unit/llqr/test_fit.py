"""T4 and §5.2: the inner loop reaches the closed-form optimum; sanitisation and per-group clipping (float64)."""

import math

import torch

from hf_llqrsam.llqr import DiagonalStructure, LLQRConfig, ScalarStructure, curvature_problem
from hf_llqrsam.llqr.fit import clip_by_groups_, count_nonfinite, fit_structure, group_index, sanitize_
from hf_llqrsam.llqr.layout import clip_groups, tensor_layouts
from tests.oracles.dense_llqr import TanhNet, dense_curvature, flatten, unflatten

DAMPING = 0.1


def _problem(seed: int = 5, sizes=(3, 2, 3)):
    model = TanhNet(sizes, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(7, sizes[0], generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (7,), generator=gen)
    g_dict, gv_dict = curvature_problem(model, {"x": x, "labels": y}, LLQRConfig(divergence="ngd", damping=DAMPING))
    names = list(g_dict)
    g = list(g_dict.values())
    gv = lambda v: list(gv_dict(dict(zip(names, v, strict=True))).values())  # noqa: E731
    g_ref, G_ref = dense_curvature(model, x, y, "ngd")
    return model, g, gv, g_ref, G_ref + DAMPING * torch.eye(len(g_ref), dtype=torch.float64)


def _heavy_ball(curv_max: float, curv_min: float) -> tuple[float, float, int]:
    """Optimal heavy-ball lr/momentum for a quadratic with Hessian spectrum in [curv_min, curv_max]."""
    kappa = curv_max / curv_min
    lr = 4.0 / (math.sqrt(curv_max) + math.sqrt(curv_min)) ** 2
    momentum = ((math.sqrt(kappa) - 1) / (math.sqrt(kappa) + 1)) ** 2
    return lr, momentum, int(20 * math.sqrt(kappa)) + 50


def test_diagonal_inner_loop_reaches_closed_form():
    """T4: d → solve(diag(g)(G + λI)diag(g), g ⊙ g) (ngd, λ = 0.1, no clip, no EMA)."""
    model, g, gv, g_ref, A_ref = _problem()
    H = torch.diag(g_ref) @ A_ref @ torch.diag(g_ref)  # Hessian of J in d
    d_star = torch.linalg.solve(H, g_ref * g_ref)
    eig = torch.linalg.eigvalsh(H)
    lr, momentum, steps = _heavy_ball(float(eig[-1]), float(eig[0]))
    layouts = tensor_layouts(model)
    structure = DiagonalStructure(layouts, clip_groups(layouts, "module"), dtype=torch.float64)
    stats = fit_structure(structure, g, gv, steps=steps, lr=lr, momentum=momentum, clip_norm=1e30)
    d = flatten([b["d"] for b in structure.blocks])
    torch.testing.assert_close(d, d_star, rtol=1e-7, atol=1e-9)
    j_star = -0.5 * (g_ref * g_ref) @ d_star  # J at the optimum of a quadratic: −½ bᵀH⁻¹b
    assert stats.objective_end < stats.objective_start
    torch.testing.assert_close(torch.tensor(stats.objective_end, dtype=torch.float64), j_star, rtol=1e-9, atol=0)
    assert stats.clip_fraction == 0.0 and stats.nonfinite_ugrad == 0


def test_scalar_inner_loop_reaches_closed_form():
    """T4: c → gᵀg / gᵀ(G + λI)g and J(c*) = −½ (gᵀg)² / gᵀ(G + λI)g."""
    model, g, gv, g_ref, A_ref = _problem(seed=2)
    layouts = tensor_layouts(model)
    structure = ScalarStructure(layouts, [list(range(len(layouts)))], dtype=torch.float64)  # one global scalar
    gg, gAg = float(g_ref @ g_ref), float(g_ref @ A_ref @ g_ref)
    curv = gAg  # d²J/dc²
    stats = fit_structure(structure, g, gv, steps=60, lr=0.5 / curv, momentum=0.1, clip_norm=1e30)
    (c,) = structure.parameters()
    assert math.isclose(float(c), gg / gAg, rel_tol=1e-12)
    assert math.isclose(stats.objective_end, -0.5 * gg**2 / gAg, rel_tol=1e-12)


def test_sanitize_maps_nan_and_infinities():
    t = torch.tensor([float("nan"), float("inf"), -float("inf"), 2.5, -1e300], dtype=torch.float64)
    u = torch.tensor([[float("nan"), 0.0]])
    count = sanitize_([t, u])
    assert int(count) == 4
    assert t.tolist() == [0.0, 1.0, -1.0, 2.5, -1e300]
    assert u.tolist() == [[0.0, 0.0]]


def test_sanitize_finite_tensors_are_untouched_even_when_their_norm_overflows():
    big = torch.tensor([1e30, -3e38, 1.0])  # finite, but ‖big‖ overflows to inf: the per-entry scan decides
    small = torch.tensor([0.5, -2.0])
    before = [big.clone(), small.clone()]
    assert int(sanitize_([big, small])) == 0
    assert torch.equal(big, before[0]) and torch.equal(small, before[1])
    assert int(sanitize_([small])) == 0 and torch.equal(small, before[1])


def test_clip_scales_each_group_by_min_one_clip_over_norm():
    a = torch.tensor([3.0, 4.0])  # group 0: norm 5·√2 with b
    b = torch.tensor([5.0])
    c = torch.tensor([0.3, 0.4])  # group 1: norm 0.5, unclipped
    z = torch.zeros(2)  # group 2: norm 0, unclipped
    group_of = group_index([[0, 1], [2], [3]])
    norm, clipped = clip_by_groups_([a, b, c, z], group_of, clip_norm=1.0)
    assert math.isclose(float(norm), math.sqrt(25 + 25 + 0.25), rel_tol=1e-6)
    assert bool(clipped)
    scale = 1.0 / math.sqrt(50.0)
    torch.testing.assert_close(a, torch.tensor([3.0, 4.0]) * scale)
    torch.testing.assert_close(b, torch.tensor([5.0]) * scale)
    torch.testing.assert_close(c, torch.tensor([0.3, 0.4]))
    assert torch.equal(z, torch.zeros(2))
    _, clipped = clip_by_groups_([c], group_index([[0]]), clip_norm=1.0)
    assert not bool(clipped)


def test_nonfinite_products_are_sanitised_in_the_inner_loop():
    """+Inf in G·δ gives ∂J/∂d = −g ⊙ ∞ = −Inf → −1 for g > 0, so one SGD step gives d = 1 + lr."""
    model = TanhNet((2, 2), seed=0)
    layouts = tensor_layouts(model)
    structure = DiagonalStructure(layouts, clip_groups(layouts, "tensor"), dtype=torch.float64)
    g = [torch.ones_like(p) for p in model.parameters()]
    gv = lambda v: [torch.full_like(t, float("inf")) for t in v]  # noqa: E731
    stats = fit_structure(structure, g, gv, steps=1, lr=0.25, momentum=0.9, clip_norm=1e30)
    for t in structure.parameters():
        assert torch.equal(t, torch.full_like(t, 1.25))
    assert stats.nonfinite_ugrad == sum(p.numel() for p in model.parameters())
    assert math.isnan(stats.objective_start) or math.isinf(stats.objective_start)


def test_zero_steps_leave_structure_and_report_nan():
    model = TanhNet((2, 2), seed=0)
    layouts = tensor_layouts(model)
    structure = DiagonalStructure(layouts, clip_groups(layouts, "module"), dtype=torch.float64)
    stats = fit_structure(structure, [torch.ones(2, 2)], lambda v: v, steps=0, lr=1.0, momentum=0.9, clip_norm=1.0)
    assert all(torch.equal(t, torch.ones_like(t)) for t in structure.parameters())
    assert math.isnan(stats.objective_start) and math.isnan(stats.objective_end)


def test_unflatten_oracle_helper():
    params = [torch.zeros(2, 3), torch.zeros(4)]
    v = torch.arange(10.0)
    out = unflatten(v, params)
    assert out[0].shape == (2, 3) and out[1].tolist() == [6.0, 7.0, 8.0, 9.0]


def test_stop_if_nonfinite_leaves_the_structure_untouched():
    """With `stop_if_nonfinite`, a non-finite J at the first inner step stops the loop before any step."""
    model = TanhNet((2, 2), seed=0)
    layouts = tensor_layouts(model)
    structure = DiagonalStructure(layouts, clip_groups(layouts, "tensor"), dtype=torch.float64)
    with torch.no_grad():
        for t in structure.parameters():
            t.fill_(0.7)
    g = [torch.ones_like(p) for p in model.parameters()]
    for bad in (float("inf"), float("nan")):
        gv = lambda v, bad=bad: [torch.full_like(t, bad) for t in v]  # noqa: E731
        stats = fit_structure(structure, g, gv, steps=3, lr=0.25, momentum=0.9, clip_norm=1.0, stop_if_nonfinite=True)
        assert stats.stopped and not math.isfinite(stats.objective_start) and stats.nonfinite_ugrad == 0
        assert all(torch.equal(t, torch.full_like(t, 0.7)) and not t.requires_grad for t in structure.parameters())
    stats = fit_structure(
        structure, g, lambda v: v, steps=3, lr=0.25, momentum=0.9, clip_norm=1.0, stop_if_nonfinite=True
    )
    assert not stats.stopped and math.isfinite(stats.objective_end)
    assert not all(torch.equal(t, torch.full_like(t, 0.7)) for t in structure.parameters())


def test_count_nonfinite_is_exact_also_when_a_norm_overflows():
    big = torch.full((3,), 1e30, dtype=torch.float32)  # finite, but its norm overflows fp32
    assert count_nonfinite([big]) == 0 and count_nonfinite([]) == 0
    assert count_nonfinite([big, torch.tensor([float("nan"), 1.0, -float("inf")])]) == 2
