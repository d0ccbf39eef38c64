"""A textbook SAM-family loop on flattened parameter vectors, written independently of `hf_llqrsam.sam`.

Each mode's ε and descent are spelled out from its paper (see `docs/algorithm.md` §8.2/§8.4 and `docs/infosam.md`),
with plain
SGD (no momentum, no weight decay) as the outer optimizer.
"""

import torch
from torch import nn
from torch.nn.utils import parameters_to_vector, vector_to_parameters


def flat_grad(model: nn.Module, batch: dict) -> tuple[torch.Tensor, float]:
    params = [p for p in model.parameters() if p.requires_grad]
    loss = model(**batch).loss
    grads = torch.autograd.grad(loss, params)
    return torch.cat([g.reshape(-1) for g in grads]), float(loss.detach())


class OracleSAM:
    """One object per run; `step(model, batch)` performs one optimizer step."""

    def __init__(self, mode: str, rho: float, lr: float, *, eps: float = 1e-12, asam_eta: float = 0.01,
                 fsam_beta: float = 0.9, fsam_sigma: float = 1.0, fisher_eta: float = 0.1,
                 fisher_form: str = "reference",
                 gsam_alpha: float = 0.4, vasso_theta: float = 0.4, infosam_alpha: float = 0.9,
                 infosam_damping: float = 1e-8, norm: str = "euclidean", u: torch.Tensor | None = None,
                 u_in_perturbation: bool = True, u_on_update: bool = True):
        self.mode, self.rho, self.lr, self.eps = mode, rho, lr, eps
        self.asam_eta, self.fsam_beta, self.fsam_sigma = asam_eta, fsam_beta, fsam_sigma
        self.fisher_eta, self.fisher_form, self.gsam_alpha = fisher_eta, fisher_form, gsam_alpha
        self.vasso_theta, self.infosam_alpha, self.infosam_damping = vasso_theta, infosam_alpha, infosam_damping
        self.norm, self.u = norm, u
        self.u_in_perturbation, self.u_on_update = u_in_perturbation, u_on_update
        self.state: dict[str, torch.Tensor] = {}
        self.t = 0

    def perturbation(self, model: nn.Module, g: torch.Tensor) -> torch.Tensor:
        mode, rho = self.mode, self.rho
        u = self.u if self.u is not None and self.u_in_perturbation else torch.ones_like(g)
        if mode in ("sam", "gsam"):
            v = g
            cv = u * v
        elif mode == "fsam":
            gbar = self.state.get("gbar", torch.zeros_like(g))
            v = g - self.fsam_sigma * gbar
            cv = u * v
            self.state["gbar"] = self.fsam_beta * gbar + (1 - self.fsam_beta) * g
        elif mode == "asam":
            t = torch.cat([
                (torch.ones_like(p) if n.endswith("bias") else p.detach().abs() + self.asam_eta).reshape(-1)
                for n, p in model.named_parameters() if p.requires_grad
            ])
            return rho * t * t * g / torch.sqrt((t * g).pow(2).sum() + self.eps)
        elif mode == "fisher_sam":
            c = 1 / (g * g + self.fisher_eta) if self.fisher_form == "reference" else 1 / (1 + self.fisher_eta * g * g)
            return rho * c * g / torch.sqrt((g * c * g).sum() + self.eps)
        elif mode == "vasso":
            d = (1 - self.vasso_theta) * self.state.get("d", torch.zeros_like(g)) + self.vasso_theta * g
            self.state["d"] = d
            v = cv = d
        elif mode == "infosam":
            if "m" not in self.state:
                self.state["m"] = g.clone()
                v = cv = g
            else:
                m = self.infosam_alpha * self.state["m"] + (1 - self.infosam_alpha) * g
                self.state["m"] = m
                b = (m - g) ** 2
                v = g
                cv = g / (b + self.infosam_damping)
        else:
            raise ValueError(mode)
        nu2 = (v * cv).sum() if self.norm == "matrix" else (cv * cv).sum()
        return rho * cv / torch.sqrt(nu2 + self.eps)

    def step(self, model: nn.Module, batch: dict) -> None:
        params = [p for p in model.parameters() if p.requires_grad]
        w = parameters_to_vector(params).detach().clone()
        g, _ = flat_grad(model, batch)
        eps = self.perturbation(model, g)
        with torch.no_grad():
            vector_to_parameters(w + eps, params)
        gt, _ = flat_grad(model, batch)
        with torch.no_grad():
            vector_to_parameters(w, params)
        d = gt
        if self.mode == "gsam":
            g_perp = g - (g @ gt) / (gt @ gt) * gt
            d = gt - self.gsam_alpha * g_perp
        if self.u is not None and self.u_on_update:
            d = self.u * d
        with torch.no_grad():
            vector_to_parameters(w - self.lr * d, params)
        self.t += 1


def averaged_sam_step(model: nn.Module, shards: list[dict], rho: float, lr: float) -> None:
    """One SGD step on the mean over `shards` of ∇L_j(θ + ε_j), with ε_j = ρ g_j/‖g_j‖ from shard j alone.

    This is SAM's m-sharpness: micro mode (shards = micro-batches) and local DDP scope (shards = ranks).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    w = [p.detach().clone() for p in params]
    descent = [torch.zeros_like(p) for p in params]
    for shard in shards:
        g = torch.autograd.grad(model(**shard).loss, params)
        norm = torch.sqrt(sum((x * x).sum() for x in g) + 1e-12)
        with torch.no_grad():
            for p, x in zip(params, g, strict=True):
                p.add_(rho * x / norm)
        gt = torch.autograd.grad(model(**shard).loss, params)
        with torch.no_grad():
            for p, w0, d, x in zip(params, w, descent, gt, strict=True):
                p.copy_(w0)
                d.add_(x / len(shards))
    with torch.no_grad():
        for p, d in zip(params, descent, strict=True):
            p.sub_(lr * d)
