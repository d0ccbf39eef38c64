"""Dense oracles for the LLQR objective: flat parameters, dense Hessians, dense G_D and dense structure matrices.

Everything here is built from definitions (`docs/algorithm.md` §2–3, §6.1): G_D is the Hessian of the metric-generating
function Φ of each divergence through the whole network, computed with `torch.autograd.functional.hessian`, and
the structure matrices M are assembled with Kronecker products from the raw factors. Nothing here calls
`hf_llqrsam.llqr` code, so the tests compare two independent computations.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call


class TanhNet(nn.Module):
    """Linear(+tanh) chain; `forward` returns logits (the layout the curvature code accepts as a plain tensor)."""

    def __init__(self, sizes: tuple[int, ...], dtype: torch.dtype = torch.float64, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.layers = nn.ModuleList(nn.Linear(a, b, dtype=dtype) for a, b in zip(sizes[:-1], sizes[1:], strict=True))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.tanh(x)
        return x


def named_trainable(model: nn.Module) -> list[tuple[str, Tensor]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def flatten(tensors) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten(vec: Tensor, like) -> list[Tensor]:
    out, offset = [], 0
    for t in like:
        out.append(vec[offset : offset + t.numel()].view_as(t))
        offset += t.numel()
    return out


def logits_fn(model: nn.Module, x: Tensor):
    """θ_flat ↦ logits (rows, C), through `functional_call` (eval mode, buffers as they are)."""
    named = named_trainable(model)
    names, params = [n for n, _ in named], [p for _, p in named]

    def f(theta: Tensor) -> Tensor:
        out = functional_call(model, dict(zip(names, unflatten(theta, params), strict=True)), (x,))
        return out.reshape(-1, out.shape[-1])

    return f, flatten([p.detach() for p in params])


def mean_ce(logits: Tensor, targets: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """The training loss, via torch's own cross-entropy (mean over targets ≠ −100)."""
    return F.cross_entropy(logits, targets, ignore_index=-100, label_smoothing=label_smoothing)


def phi(divergence: str, logits: Tensor, p0: Tensor, mask: Tensor, alpha: float = 0.5) -> Tensor:
    """The metric-generating function Φ of each divergence (`docs/algorithm.md` §3), rows in `mask` only."""
    logq = torch.log_softmax(logits, dim=-1)[mask]
    p0 = p0[mask]
    match divergence:
        case "ngd":
            return -(p0 * logq).sum()
        case "reverse_kl":
            return (logq.exp() * (logq - p0.log())).sum()
        case "renyi":
            return torch.log((p0**alpha * torch.exp((1 - alpha) * logq)).sum()) / (alpha - 1)
    raise ValueError(divergence)


def dense_curvature(
    model: nn.Module,
    x: Tensor,
    targets: Tensor,
    divergence: str,
    ngd_scaling: str = "sum",
    alpha: float = 0.5,
    label_smoothing: float = 0.0,
    include_pad_rows: bool = False,
) -> tuple[Tensor, Tensor]:
    """(g, G_D) as dense float tensors: g = ∇ mean CE, G_D = ∇²Φ (or ∇² of the mean loss for newton)."""
    f, theta0 = logits_fn(model, x)
    loss = lambda th: mean_ce(f(th), targets, label_smoothing)  # noqa: E731
    g = torch.autograd.functional.jacobian(loss, theta0)
    if divergence == "newton":
        return g, torch.autograd.functional.hessian(loss, theta0, vectorize=True)
    mask = torch.ones_like(targets, dtype=torch.bool) if include_pad_rows else targets != -100
    p0 = torch.softmax(f(theta0), dim=-1).detach()
    G = torch.autograd.functional.hessian(lambda th: phi(divergence, f(th), p0, mask, alpha), theta0, vectorize=True)
    if divergence == "ngd" and ngd_scaling == "mean":
        G = G / mask.sum()
    return g, G


def explicit_ggn_sum(model: nn.Module, x: Tensor, mask: Tensor) -> Tensor:
    """Σ_r J_rᵀ (diag p_r − p_r p_rᵀ) J_r from the explicit logit Jacobian (`docs/algorithm.md` T2)."""
    f, theta0 = logits_fn(model, x)
    jac = torch.autograd.functional.jacobian(f, theta0, vectorize=True)  # (rows, C, n)
    p = torch.softmax(f(theta0), dim=-1)
    out = torch.zeros(theta0.numel(), theta0.numel(), dtype=theta0.dtype)
    for r in range(p.shape[0]):
        if mask[r]:
            fr = torch.diag(p[r]) - torch.outer(p[r], p[r])
            out += jac[r].T @ fr @ jac[r]
    return out


def dense_objective(g: Tensor, G: Tensor, damping: float, M: Tensor) -> Tensor:
    """J(U) = −gᵀMg + ½ (Mg)ᵀ(G + λI)(Mg)."""
    mg = M @ g
    return -(g @ mg) + 0.5 * mg @ (G + damping * torch.eye(len(g), dtype=g.dtype)) @ mg


def transpose_permutation(rows: int, cols: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """P with vec_r(Wᵀ) = P vec_r(W) for W of shape (rows, cols) (row-major vec)."""
    P = torch.zeros(rows * cols, rows * cols, dtype=dtype)
    for i in range(rows):
        for j in range(cols):
            P[j * rows + i, i * cols + j] = 1.0
    return P


def _mat(q: Tensor) -> Tensor:
    return torch.diag(q) if q.dim() == 1 else q


def kernel_matrix(kind: str, block: dict[str, Tensor]) -> Tensor:
    """Dense M_X acting on vec_r(X), X ∈ R^{m×n}, from the raw factors (vec_r(A X B) = (A ⊗ Bᵀ) vec_r(X))."""
    match kind:
        case "kfac":  # A X Bᵀ
            return torch.kron(_mat(block["A"]).contiguous(), _mat(block["B"]).contiguous())
        case "ekfac":  # Q_A [s ⊙ (Q_Aᵀ X Q_G)] Q_Gᵀ
            Q = torch.kron(_mat(block["Q_A"]), _mat(block["Q_G"]))
            return Q @ torch.diag(block["s"].reshape(-1)) @ Q.T
        case "sep_ekfac":  # (Q_A diag(a) Q_Aᵀ) X (Q_G diag(b) Q_Gᵀ)
            qa, qg = _mat(block["Q_A"]), _mat(block["Q_G"])
            left = qa @ torch.diag(block["a"]) @ qa.T
            right = qg @ torch.diag(block["b"]) @ qg.T
            return torch.kron(left.contiguous(), right.T.contiguous())
        case "psd_ekfac":  # Q_A [(t² + ε) ⊙ (Q_Aᵀ X Q_G)] Q_Gᵀ
            Q = torch.kron(_mat(block["Q_A"]), _mat(block["Q_G"]))
            return Q @ torch.diag((block["t"] ** 2 + PSD_EPS).reshape(-1)) @ Q.T
        case "psd_sep_ekfac":  # (Q_A diag(t_a² + ε) Q_Aᵀ) X (Q_G diag(t_b² + ε) Q_Gᵀ)
            qa, qg = _mat(block["Q_A"]), _mat(block["Q_G"])
            left = qa @ torch.diag(block["t_a"] ** 2 + PSD_EPS) @ qa.T
            right = qg @ torch.diag(block["t_b"] ** 2 + PSD_EPS) @ qg.T
            return torch.kron(left.contiguous(), right.T.contiguous())
        case "diag_kfac":  # diag(a) X diag(b)
            return torch.diag(torch.outer(block["a"], block["b"]).reshape(-1))
        case "sym_kfac":  # P(T_A) X P(T_B), P(T) = T + Tᵀ − diag(T) (a vector t stands for diag(t))
            t_a, t_b = _mat(block["T_A"]), _mat(block["T_B"])
            p_a = t_a + t_a.T - torch.diag(t_a.diagonal())
            p_b = t_b + t_b.T - torch.diag(t_b.diagonal())
            return torch.kron(p_a.contiguous(), p_b.T.contiguous())
        case "psd_sym_kfac":  # (L_A L_Aᵀ) X (L_B L_Bᵀ)
            l_a, l_b = _mat(block["L_A"]), _mat(block["L_B"])
            return torch.kron((l_a @ l_a.T).contiguous(), (l_b @ l_b.T).T.contiguous())
    raise ValueError(kind)


PSD_EPS = 1e-12  # the reference's ε of raw² + ε (`block_structures.py:_psd_diag_from_raw`)


def linear_weight_matrix(kind: str, block: dict[str, Tensor], out_features: int, in_features: int) -> Tensor:
    """Dense M on vec_r(W) of an `nn.Linear` weight W = Xᵀ (m = in, n = out)."""
    P = transpose_permutation(out_features, in_features)  # vec(X) = vec(Wᵀ) = P vec(W)
    return P.T @ kernel_matrix(kind, block) @ P


def block_diag(mats: list[Tensor]) -> Tensor:
    return torch.block_diag(*mats)
