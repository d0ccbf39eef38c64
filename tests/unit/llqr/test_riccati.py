"""T5: the exact LQR step (backward Riccati over layers) equals −(G_D + λI)⁻¹g from `curvature_problem` (float64)."""

import pytest
import torch
from torch import nn

from hf_llqrsam.llqr import LLQRConfig, curvature_problem
from tests.oracles.dense_llqr import TanhNet, dense_curvature, flatten, unflatten
from tests.oracles.riccati import riccati_step

DAMPING = 0.3


def _dense_problem(model, batch, **kw):
    g, gv = curvature_problem(model, batch, LLQRConfig(**kw))
    names, params = list(g), list(model.parameters())
    n = sum(p.numel() for p in params)
    cols = []
    for j in range(n):
        e = torch.zeros(n, dtype=torch.float64)
        e[j] = 1.0
        cols.append(flatten(gv(dict(zip(names, unflatten(e, params), strict=True))).values()))
    return flatten(g.values()), torch.stack(cols, dim=1)


@pytest.mark.parametrize("divergence", ["newton", "ngd"])
def test_riccati_step_equals_damped_newton_step(divergence):
    model = TanhNet((3, 4, 3, 3), seed=1)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (5,), generator=gen)
    g, A = _dense_problem(model, {"x": x, "labels": y}, divergence=divergence, damping=DAMPING)
    step_impl = -torch.linalg.solve(A, g)
    step_lqr = riccati_step(list(model.layers), x, y, divergence, DAMPING)
    torch.testing.assert_close(step_lqr, step_impl, rtol=1e-8, atol=1e-10)
    # and both agree with the whole-network Hessian oracle
    g_ref, G_ref = dense_curvature(model, x, y, divergence)
    step_ref = -torch.linalg.solve(G_ref + DAMPING * torch.eye(len(g_ref), dtype=torch.float64), g_ref)
    torch.testing.assert_close(step_lqr, step_ref, rtol=1e-8, atol=1e-10)
    if divergence == "newton":
        assert torch.linalg.eigvalsh(G_ref).min() < 0  # the indefinite case is really exercised


def test_two_layer_linear_net_hand_formulas():
    """z_n = W2 W1 x_n with CE: g, the GN matrix, the mixed residual block C (Newton) and the ngd sum, by hand."""
    torch.manual_seed(0)
    e_dim, h_dim, c_dim, n = 3, 2, 3, 4
    model = nn.Sequential(
        nn.Linear(e_dim, h_dim, bias=False, dtype=torch.float64),
        nn.Linear(h_dim, c_dim, bias=False, dtype=torch.float64),
    )
    w1, w2 = model[0].weight.detach(), model[1].weight.detach()
    x = torch.randn(n, e_dim, dtype=torch.float64)
    y = torch.randint(0, c_dim, (n,))
    a = x @ w1.T
    s = torch.softmax(a @ w2.T, dim=-1)
    r = s - torch.nn.functional.one_hot(y, c_dim).double()
    n1 = h_dim * e_dim
    # J_n = [∂z/∂vec W1 | ∂z/∂vec W2] = [W2 ⊗ x_nᵀ | I ⊗ a_nᵀ] (row-major vec)
    jac = [
        torch.cat([torch.kron(w2, x[i][None]), torch.kron(torch.eye(c_dim, dtype=torch.float64), a[i][None])], 1)
        for i in range(n)
    ]
    fisher = [torch.diag(s[i]) - torch.outer(s[i], s[i]) for i in range(n)]
    gn_sum = sum(j.T @ f @ j for j, f in zip(jac, fisher, strict=True))
    C = torch.zeros(n1 + c_dim * h_dim, n1 + c_dim * h_dim, dtype=torch.float64)
    for c in range(c_dim):
        for h in range(h_dim):
            for e in range(e_dim):
                value = sum(r[i, c] * x[i, e] for i in range(n)) / n
                C[n1 + c * h_dim + h, h * e_dim + e] = value  # C[W2_{c,h}, W1_{h,e}]
                C[h * e_dim + e, n1 + c * h_dim + h] = value
    g_w2 = sum(torch.outer(r[i], a[i]) for i in range(n)) / n
    g_w1 = sum(torch.outer(w2.T @ r[i], x[i]) for i in range(n)) / n
    g_hand = torch.cat([g_w1.reshape(-1), g_w2.reshape(-1)])

    batch = {"input": x, "labels": y}
    g, H = _dense_problem(model, batch, divergence="newton")
    torch.testing.assert_close(g, g_hand, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(H, gn_sum / n + C, rtol=1e-10, atol=1e-12)
    _, G = _dense_problem(model, batch, divergence="ngd")
    torch.testing.assert_close(G, gn_sum, rtol=1e-10, atol=1e-12)  # no 1/N, no C
