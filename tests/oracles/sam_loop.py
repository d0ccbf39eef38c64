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


def layer_slices(model: nn.Module) -> list[list[slice]]:
    """Per layer (the module owning the tensor: its name up to the last dot), the slices of the flat vector."""
    layers: dict[str, list[slice]] = {}
    start = 0
    for name, p in model.named_parameters():
        if p.requires_grad:
            layers.setdefault(name.rpartition(".")[0], []).append(slice(start, start + p.numel()))
            start += p.numel()
    return list(layers.values())


def normalise(model: nn.Module, norm: str, v: torch.Tensor, cv: torch.Tensor, rho: float, eps: float) -> torch.Tensor:
    """ε = ρ Cv/√(ν² + eps) globally, or per layer ε_l = ρ (Cv)_l / (√(ν_l² + eps) √L) (the reference's norm_mode)."""
    if norm in ("euclidean", "matrix"):
        nu2 = (v * cv).sum() if norm == "matrix" else (cv * cv).sum()
        return rho * cv / torch.sqrt(nu2 + eps)
    layers = layer_slices(model)
    out = torch.zeros_like(cv)
    for slices in layers:
        idx = torch.cat([torch.arange(s.start, s.stop) for s in slices])
        nu2 = (v[idx] * cv[idx]).sum() if norm == "layer_matrix" else (cv[idx] * cv[idx]).sum()
        out[idx] = rho * cv[idx] / (torch.sqrt(nu2 + eps) * len(layers) ** 0.5)
    return out


class OracleSAM:
    """One object per run; `step(model, batch)` performs one optimizer step."""

    def __init__(
        self,
        mode: str,
        rho: float,
        lr: float,
        *,
        eps: float = 1e-12,
        asam_eta: float = 0.01,
        fsam_beta: float = 0.9,
        fsam_sigma: float = 1.0,
        fisher_eta: float = 0.1,
        fisher_form: str = "reference",
        gsam_alpha: float = 0.4,
        vasso_theta: float = 0.4,
        infosam_alpha: float = 0.9,
        infosam_damping: float = 1e-8,
        norm: str = "euclidean",
        u: torch.Tensor | None = None,
        u_in_perturbation: bool = True,
        u_on_update: bool = True,
        fsam_ema: str = "precond_grad",
    ):
        self.mode, self.rho, self.lr, self.eps = mode, rho, lr, eps
        self.fsam_ema = fsam_ema
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
            new_gbar = self.fsam_beta * gbar + (1 - self.fsam_beta) * g
            if self.fsam_ema == "direction":  # the reference's ema_direction: unit ḡ and unit C v
                new_gbar = new_gbar / torch.sqrt((new_gbar * new_gbar).sum() + self.eps)
                cv = cv / torch.sqrt((cv * cv).sum() + self.eps)
            self.state["gbar"] = new_gbar
        elif mode == "asam":
            t = torch.cat(
                [
                    (torch.ones_like(p) if n.endswith("bias") else p.detach().abs() + self.asam_eta).reshape(-1)
                    for n, p in model.named_parameters()
                    if p.requires_grad
                ]
            )
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
        return normalise(model, self.norm, v, cv, rho, self.eps)

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


class OracleEfficientSAM:
    """past-FSAM, LookSAM and WSAM as hand-written loops on flat vectors, plain SGD; `step(model, batch)`.

    - past_fsam (the LLQR reference's `_build_past_fsam_train_step`): ε from the previous step's perturbed gradient
      g_last and ḡ, v = g_last − σḡ, then ḡ ← βḡ + (1 − β)g_last; one pass at w + ε on the batch and, with an overlap
      window of K batches, on the K − 1 batches before it too (mean of the K gradients); g_last ← that gradient.
    - looksam (Liu et al., CVPR 2022, Alg. 1): every k-th step g, g_s at w + ρg/‖g‖, g_v = g_s − ‖g_s‖cos(g, g_s)ĝ,
      descend on g_s; otherwise g only, descend on g + α‖g‖/‖g_v‖ g_v.
    - wsam (Yue et al., KDD 2023): descend on g + γ/(1 − γ)(g_s − g) (plain SGD: decoupled = coupled).
    """

    def __init__(
        self,
        mode: str,
        rho: float,
        lr: float,
        *,
        eps: float = 1e-12,
        fsam_beta: float = 0.9,
        fsam_sigma: float = 1.0,
        window: int = 1,
        k: int = 5,
        alpha: float = 0.7,
        gamma: float = 0.9,
        norm: str = "euclidean",
        u: torch.Tensor | None = None,
    ):
        self.mode, self.rho, self.lr, self.eps = mode, rho, lr, eps
        self.beta, self.sigma, self.window = fsam_beta, fsam_sigma, window
        self.k, self.alpha, self.gamma = k, alpha, gamma
        self.norm, self.u = norm, u
        self.g_last: torch.Tensor | None = None
        self.gbar: torch.Tensor | None = None
        self.gv: torch.Tensor | None = None
        self.previous: list[dict] = []
        self.t = 0

    def step(self, model: nn.Module, batch: dict) -> None:
        params = [p for p in model.parameters() if p.requires_grad]
        w = parameters_to_vector(params).detach().clone()
        u = self.u if self.u is not None else torch.ones_like(w)
        if self.mode == "past_fsam":
            g_last = self.g_last if self.g_last is not None else torch.zeros_like(w)
            gbar = self.gbar if self.gbar is not None else torch.zeros_like(w)
            v = g_last - self.sigma * gbar
            eps = normalise(model, self.norm, v, u * v, self.rho, self.eps)
            self.gbar = self.beta * gbar + (1 - self.beta) * g_last
            with torch.no_grad():
                vector_to_parameters(w + eps, params)
            batches = [batch, *self.previous]
            d = sum(flat_grad(model, b)[0] for b in batches) / len(batches)
            self.g_last = d.clone()
            self.previous = ([batch, *self.previous])[: self.window - 1]
            d = u * d
        else:
            g, _ = flat_grad(model, batch)
            full = self.mode == "wsam" or self.t % self.k == 0
            if full:
                eps = self.rho * g / torch.sqrt((g * g).sum() + self.eps)
                with torch.no_grad():
                    vector_to_parameters(w + eps, params)
                gs, _ = flat_grad(model, batch)
            if self.mode == "wsam":
                a = self.gamma / (1 - self.gamma)
                d = g + a * (gs - g)
            elif full:
                self.gv = gs - (g @ gs) / (g @ g) * g
                d = gs
            else:
                d = g if self.gv is None else g + self.alpha * g.norm() / self.gv.norm() * self.gv
        with torch.no_grad():
            vector_to_parameters(w - self.lr * d, params)
        self.t += 1
