"""Exact LQR step by the backward Riccati recursion over the layers of a Linear(+tanh) chain (`docs/algorithm.md`
§2.2, T5).

The network is a chain of stages x_{i+1} = f_i(x_i, θ_i) over the whole batch (the state stacks every sample's
activation), θ_i = (vec W_i, b_i) in `nn.Linear` order, tanh on every stage but the last, and logits z = x_L.
With the costate p_L = ∇Φ(z⁰), p_i = A_iᵀ p_{i+1} and the stage Hamiltonian H_i = ⟨p_{i+1}, f_i(x_i, θ_i)⟩:

    A_i = ∂f_i/∂x_i,  B_i = ∂f_i/∂θ_i,  R_i = ∇²_θθ H_i + λI,  M_i = ∇²_θx H_i,  Q_i = ∇²_xx H_i
    K_L = ∇²Φ,  λ_L = c = ∇_z ℓ
    S_i = R_i + B_iᵀK_{i+1}B_i,  P_i = M_i + B_iᵀK_{i+1}A_i
    K_i = Q_i + A_iᵀK_{i+1}A_i − P_iᵀS_i⁻¹P_i,  λ_i = A_iᵀλ_{i+1} − P_iᵀS_i⁻¹B_iᵀλ_{i+1}
    forward: δx_0 = 0,  δθ_i = −S_i⁻¹(P_i δx_i + B_iᵀλ_{i+1}),  δx_{i+1} = A_i δx_i + B_i δθ_i

Used only as a test oracle: it never touches the full-network Hessian, only per-stage derivatives.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.functional import hessian, jacobian


def _stage(layer: nn.Linear, last: bool, batch: int):
    out_f, in_f = layer.weight.shape

    def f(x: Tensor, theta: Tensor) -> Tensor:
        w = theta[: out_f * in_f].view(out_f, in_f)
        b = theta[out_f * in_f :]
        y = x.view(batch, in_f) @ w.T + b
        return (y if last else torch.tanh(y)).reshape(-1)

    theta0 = torch.cat([layer.weight.detach().reshape(-1), layer.bias.detach()])
    return f, theta0


def _terminal(divergence: str, z0: Tensor, targets: Tensor, batch: int):
    """Φ and the loss ℓ as functions of the flat logits."""
    classes = z0.numel() // batch

    def loss(z: Tensor) -> Tensor:
        return F.cross_entropy(z.view(batch, classes), targets)

    if divergence == "newton":
        return loss, loss
    p0 = torch.softmax(z0.view(batch, classes), dim=-1).detach()

    def phi(z: Tensor) -> Tensor:  # ngd, summed over rows (the reference scaling)
        return -(p0 * torch.log_softmax(z.view(batch, classes), dim=-1)).sum()

    return phi, loss


def riccati_step(layers: list[nn.Linear], x0: Tensor, targets: Tensor, divergence: str, damping: float) -> Tensor:
    """δθ* of the exact LQR over the layer chain, flattened in parameter order (weight, bias per layer)."""
    batch = x0.shape[0]
    stages = [_stage(layer, i == len(layers) - 1, batch) for i, layer in enumerate(layers)]
    xs = [x0.reshape(-1).detach()]
    for f, theta in stages:
        xs.append(f(xs[-1], theta).detach())
    phi, loss = _terminal(divergence, xs[-1], targets, batch)
    c = jacobian(loss, xs[-1])
    K = hessian(phi, xs[-1])
    p = jacobian(phi, xs[-1])  # costate p_L = ∇Φ(z⁰)
    lam = c
    n_layers = len(stages)
    A, B, S_inv, P, lam_after = ([None] * n_layers for _ in range(5))
    for i in reversed(range(n_layers)):
        f, theta = stages[i]
        x = xs[i]
        Ai, Bi = jacobian(f, (x, theta))
        nx, nt = x.numel(), theta.numel()
        costate = p

        def ham(xt: Tensor) -> Tensor:
            return costate @ f(xt[:nx], xt[nx:])  # noqa: B023

        H = hessian(ham, torch.cat([x, theta]))
        Qi, Mi, Ri = H[:nx, :nx], H[nx:, :nx], H[nx:, nx:] + damping * torch.eye(nt, dtype=x.dtype)
        Si = Ri + Bi.T @ K @ Bi
        Pi = Mi + Bi.T @ K @ Ai
        Si_inv = torch.linalg.inv(Si)
        lam_next = lam
        K = Qi + Ai.T @ K @ Ai - Pi.T @ Si_inv @ Pi
        lam = Ai.T @ lam_next - Pi.T @ Si_inv @ (Bi.T @ lam_next)
        A[i], B[i], S_inv[i], P[i], lam_after[i] = Ai, Bi, Si_inv, Pi, lam_next
        p = Ai.T @ p
    dx = torch.zeros_like(xs[0])
    out = []
    for i in range(n_layers):
        dtheta = -S_inv[i] @ (P[i] @ dx + B[i].T @ lam_after[i])
        out.append(dtheta)
        dx = A[i] @ dx + B[i] @ dtheta
    return torch.cat(out)
